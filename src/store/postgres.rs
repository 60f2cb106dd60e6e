//! The shared PostgreSQL store (`store: { backend: postgres, url, pool_size }`): several
//! relays behind a load balancer use one database and act as one relay.
//!
//! # Tables
//! The same `events` and `deliveries` as the SQLite store (see
//! `migrations/postgres/0001_initial.sql`, applied on start under sqlx's migration lock),
//! plus two columns on `deliveries`: `claimed_by` (the relay process that claimed the row)
//! and `lease_until` (when that claim runs out, on the database's clock).
//!
//! # Durability
//! An event and its deliveries are written by one statement (one round trip, its own
//! transaction) that also sends `NOTIFY faceio_relay_new, '<destination>'` per destination;
//! it returns once PostgreSQL has committed it with `synchronous_commit` on (turned on
//! per connection if the database default is `off`), so the 200 follows a WAL flush.
//! Group commit is PostgreSQL's own: concurrent commits share WAL flushes. Outcomes are
//! committed the same way (PostgreSQL has no cheaper per-statement choice without extra
//! round trips).
//!
//! # One dispatcher per destination in the cluster
//! [`Store::own`] takes a session-level advisory lock,
//! `pg_try_advisory_lock(faceio_relay_destination_key(name))`, on one dedicated connection
//! per relay. The relay holding it is the only one that dispatches the destination, so its
//! in-process claims, rate limiter and `Retry-After` pause hold for the whole cluster.
//! When that relay dies, PostgreSQL ends its session and drops the lock; another relay
//! takes it at its next try (every `poll_interval`). The connection is checked every
//! [`LOCK_CHECK_INTERVAL`]; when it fails, every [`Ownership`] it carried is reported lost
//! and the dispatchers stop until they own their destination again.
//!
//! # Claims under a lease
//! Ownership can move while the old owner still has attempts under way (its connection
//! died, but the process did not). So rows are also claimed: [`Store::claim`] takes due
//! rows that nobody holds (or whose lease ran out) with `FOR UPDATE SKIP LOCKED` and stamps
//! them with this process's ID and a lease; [`Store::renew`] re-checks and extends the
//! claim just before each attempt; [`Store::record`] applies only while the claim is
//! still this process's (or nobody's). A row is therefore never attempted by two live
//! relays at once: a new owner waits for the old owner's leases to run out.
//!
//! # Wake-ups
//! Every relay listens on `faceio_relay_new` on a dedicated connection and passes the
//! destination names to its dispatchers ([`Store::subscribe`]), so a delivery accepted
//! by any relay starts within milliseconds at the relay that owns its destination.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use sqlx::Row;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgListener, PgPool, PgPoolOptions, PgRow};
use sqlx::{AssertSqlSafe, Connection, Executor};
use tokio::sync::{Mutex, broadcast};
use tokio_util::sync::CancellationToken;

use super::{
    DeadLetter, Delivery, DestinationStats, Outcome, Ownership, Selection, Store, StoreError, Wake,
};
use crate::config::PostgresConfig;
use crate::ingress::VerifiedEvent;
use crate::ingress::verify::now_ms;

/// The schema migrations, shipped in the binary.
const MIGRATIONS: &[(i64, &str, &str)] = &[(
    1,
    "initial",
    include_str!("../../migrations/postgres/0001_initial.sql"),
)];

/// Where sqlx records applied migrations (named after us, not `_sqlx_migrations`).
const MIGRATIONS_TABLE: &str = "faceio_relay_migrations";

/// The NOTIFY channel for new deliveries; the payload is the destination name.
const CHANNEL: &str = "faceio_relay_new";

/// Rows deleted per prune statement.
const PRUNE_CHUNK: i64 = 5000;

/// Longest wait for a pooled connection; past it the caller gets `Unavailable` (ingress:
/// 503), well inside ingress's own `store_timeout`.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);

/// Longest wait to open a connection or run a query on the lock connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How often the lock connection is checked. A lock lost with its connection is noticed
/// within this; the leases cover the time until then.
pub const LOCK_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Longest pause between attempts to re-listen after the listening connection failed.
const MAX_LISTEN_BACKOFF: Duration = Duration::from_secs(10);

/// Notifications buffered for dispatchers that are slow to read them (a lagging reader
/// wakes every dispatcher instead).
const WAKE_BUFFER: usize = 1024;

/// PostgreSQL-backed [`Store`].
pub struct PostgresStore {
    /// Connections for everything but the locks and the listener.
    pool: PgPool,
    /// This process's ID in `deliveries.claimed_by` (new on every start).
    instance: String,
    /// The connection holding this relay's destination locks.
    locks: Arc<Locks>,
    /// New-delivery notifications from the listening connection; started on the first
    /// [`Store::subscribe`].
    wakes: std::sync::Mutex<Option<broadcast::Sender<Wake>>>,
    /// The connection options, for the dedicated connections.
    options: PgConnectOptions,
    /// Stops the background tasks (lock check, listener).
    stop: CancellationToken,
}

/// The lock connection and what depends on it.
struct Locks {
    options: PgConnectOptions,
    state: Mutex<LockState>,
    /// Stops the check task.
    stop: CancellationToken,
}

struct LockState {
    /// `None` until the first [`Store::own`] and after a failure.
    conn: Option<PgConnection>,
    /// Cancelled when `conn` fails: every ownership granted on it is lost.
    lost: CancellationToken,
    /// Bumped on every new connection, so a release meant for a dead one is dropped.
    generation: u64,
    /// Whether the check task runs.
    checking: bool,
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// What [`StoreError::Open`] names: never the URL (it may hold a password).
const WHAT: &str = "the PostgreSQL database (store.url)";

fn open_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Open {
        path: WHAT.into(),
        reason: e.to_string(),
    }
}

/// Makes sure commits on `conn` wait for the WAL flush. Anything but `off` is kept
/// (`remote_apply` and the like are stronger).
async fn ensure_synchronous_commit(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    let mode: String = sqlx::query_scalar("SELECT current_setting('synchronous_commit')")
        .fetch_one(&mut *conn)
        .await?;
    if mode == "off" {
        conn.execute("SET synchronous_commit = on").await?;
    }
    Ok(())
}

impl PostgresStore {
    /// Connects, applies the migrations and returns the store for the daemon.
    pub async fn open(config: &PostgresConfig) -> Result<Self, StoreError> {
        let store = Self::connect(config).await?;
        let mut migrator = Migrator::with_migrations(
            MIGRATIONS
                .iter()
                .map(|&(version, name, sql)| {
                    Migration::new(
                        version,
                        Cow::Borrowed(name),
                        MigrationType::Simple,
                        sqlx::SqlStr::from_static(sql),
                        false,
                    )
                })
                .collect(),
        );
        migrator.dangerous_set_table_name(MIGRATIONS_TABLE);
        tokio::time::timeout(CONNECT_TIMEOUT * 6, migrator.run(&store.pool))
            .await
            .map_err(|_| open_err("the schema migration did not finish in time"))?
            .map_err(open_err)?;
        Ok(store)
    }

    /// Like [`PostgresStore::open`], for the `dead-letters` commands (the same thing: the
    /// database is shared, there is no daemon lock to skip).
    pub async fn open_admin(config: &PostgresConfig) -> Result<Self, StoreError> {
        Self::open(config).await
    }

    async fn connect(config: &PostgresConfig) -> Result<Self, StoreError> {
        let options: PgConnectOptions = config
            .url
            .expose()
            .parse()
            .map_err(|_| open_err("store.url is not a valid PostgreSQL URL"))?;
        // Notices (such as "relation … already exists, skipping" from a migration
        // check) would land in the operator's terminal at INFO: keep only warnings.
        let options = options
            .application_name("faceio-relay")
            .options([("client_min_messages", "warning")]);
        // No test query before handing out a connection: it would double the round trips
        // of every insert. A connection that died while idle fails one statement (503 or
        // a retried outcome) and is replaced.
        let pool = PgPoolOptions::new()
            .max_connections(config.pool_size)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .test_before_acquire(false)
            .after_connect(|conn, _| Box::pin(ensure_synchronous_commit(conn)))
            .connect_with(options.clone())
            .await
            .map_err(open_err)?;
        let stop = CancellationToken::new();
        Ok(Self {
            pool,
            instance: uuid::Uuid::now_v7().simple().to_string(),
            locks: Arc::new(Locks {
                options: options.clone(),
                state: Mutex::new(LockState {
                    conn: None,
                    lost: CancellationToken::new(),
                    generation: 0,
                    checking: false,
                }),
                stop: stop.child_token(),
            }),
            wakes: std::sync::Mutex::new(None),
            options,
            stop,
        })
    }

    /// This process's ID in `deliveries.claimed_by`.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// The connection pool (tests inspect the tables through it).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Locks {
    /// Tries to take `destination`'s lock on the lock connection (opening it if needed).
    async fn try_own(self: &Arc<Self>, destination: &str) -> Result<Option<Ownership>, StoreError> {
        let mut state = self.state.lock().await;
        if state.conn.is_none() {
            let conn =
                tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(&self.options))
                    .await
                    .map_err(|_| unavailable("connecting for destination locks timed out"))?
                    .map_err(unavailable)?;
            state.conn = Some(conn);
            state.lost = CancellationToken::new();
            state.generation += 1;
            if !state.checking {
                state.checking = true;
                tokio::spawn(Arc::clone(self).check());
            }
        }
        let conn = state.conn.as_mut().expect("connected above");
        let query = sqlx::query_scalar::<_, bool>(
            "SELECT pg_try_advisory_lock(faceio_relay_destination_key($1))",
        )
        .bind(destination)
        .fetch_one(conn);
        let owned = match tokio::time::timeout(CONNECT_TIMEOUT, query).await {
            Ok(Ok(owned)) => owned,
            Ok(Err(e)) => {
                state.fail();
                return Err(unavailable(e));
            }
            Err(_) => {
                state.fail();
                return Err(unavailable("taking a destination lock timed out"));
            }
        };
        if !owned {
            return Ok(None);
        }
        let locks = Arc::clone(self);
        let generation = state.generation;
        let destination = destination.to_string();
        Ok(Some(Ownership::new(state.lost.clone(), move || {
            // Drop cannot wait: unlock in the background. (Locks stack per session, so
            // this unlock cannot undo a newer `own` of the same destination.)
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move { locks.release(&destination, generation).await });
            }
        })))
    }

    async fn release(&self, destination: &str, generation: u64) {
        let mut state = self.state.lock().await;
        if state.generation != generation {
            return; // that connection is gone, and its locks with it
        }
        let Some(conn) = state.conn.as_mut() else {
            return;
        };
        let query = sqlx::query("SELECT pg_advisory_unlock(faceio_relay_destination_key($1))")
            .bind(destination)
            .execute(conn);
        if !matches!(
            tokio::time::timeout(CONNECT_TIMEOUT, query).await,
            Ok(Ok(_))
        ) {
            state.fail();
        }
    }

    /// Checks the lock connection every [`LOCK_CHECK_INTERVAL`] until the store stops.
    async fn check(self: Arc<Self>) {
        loop {
            tokio::select! {
                () = tokio::time::sleep(LOCK_CHECK_INTERVAL) => {}
                () = self.stop.cancelled() => break,
            }
            let mut state = self.state.lock().await;
            let Some(conn) = state.conn.as_mut() else {
                continue;
            };
            if !matches!(
                tokio::time::timeout(CONNECT_TIMEOUT, conn.ping()).await,
                Ok(Ok(()))
            ) {
                tracing::warn!(
                    "the PostgreSQL connection holding this relay's destination locks failed; \
                     its destinations stop here until it owns them again"
                );
                state.fail();
            }
        }
        // The store is gone: closing the connection gives every destination back.
        let mut state = self.state.lock().await;
        if let Some(conn) = state.conn.take() {
            let _ = tokio::time::timeout(CONNECT_TIMEOUT, conn.close()).await;
        }
        state.lost.cancel();
    }
}

impl LockState {
    /// The lock connection failed: its locks are (or will soon be) gone.
    fn fail(&mut self) {
        self.conn = None;
        self.lost.cancel();
    }
}

/// Listens for new deliveries and passes them on until `stop`; after a lost connection,
/// wakes every dispatcher (notifications may have been missed).
async fn listen(pool: PgPool, tx: broadcast::Sender<Wake>, stop: CancellationToken) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let listener = async {
            let mut l = PgListener::connect_with(&pool).await?;
            l.listen(CHANNEL).await?;
            Ok::<_, sqlx::Error>(l)
        };
        let mut listener = tokio::select! {
            l = listener => match l {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64,
                        "cannot listen for new deliveries; dispatchers poll meanwhile");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = stop.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(MAX_LISTEN_BACKOFF);
                    continue;
                }
            },
            () = stop.cancelled() => return,
        };
        backoff = Duration::from_millis(100);
        // Anything committed while we were not listening.
        let _ = tx.send(Wake::All);
        loop {
            let next = tokio::select! {
                n = listener.try_recv() => n,
                () = stop.cancelled() => return,
            };
            match next {
                Ok(Some(n)) => {
                    let _ = tx.send(Wake::Destination(n.payload().to_string()));
                }
                // The connection was lost (and re-established): some may be missed.
                Ok(None) => {
                    let _ = tx.send(Wake::All);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "lost the connection listening for new deliveries");
                    break;
                }
            }
        }
    }
}

fn rfc3339(ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_millis(t).to_string()
}

const DEAD_LETTER_COLUMNS: &str =
    "d.id, d.event_id, d.destination, d.attempts, d.last_error, d.updated_at, e.event_name";

fn dead_letter_row(row: &PgRow) -> Result<DeadLetter, sqlx::Error> {
    Ok(DeadLetter {
        id: row.try_get(0)?,
        event_id: row.try_get(1)?,
        destination: row.try_get(2)?,
        attempts: row.try_get::<i32, _>(3)?.max(0) as u32,
        last_error: row.try_get::<Option<String>, _>(4)?.unwrap_or_default(),
        failed_at: rfc3339(row.try_get(5)?),
        event_name: row.try_get(6)?,
    })
}

fn delivery_row(row: &PgRow, destination: &str) -> Result<Delivery, sqlx::Error> {
    Ok(Delivery {
        id: row.try_get(0)?,
        event_id: row.try_get(1)?,
        destination: destination.to_string(),
        attempts: row.try_get::<i32, _>(2)?.max(0) as u32,
        received_at_ms: row.try_get(3)?,
        body: Bytes::from(row.try_get::<String, _>(4)?),
    })
}

/// A query over the dead letters a [`Selection`] names; `{filter}` in `sql` is replaced
/// by the condition, whose only parameter is `$1`.
fn selection_query(
    sql: &str,
    selection: &Selection,
) -> sqlx::query::Query<'static, sqlx::Postgres, sqlx::postgres::PgArguments> {
    let (filter, bind): (&str, Option<Result<String, Vec<i64>>>) = match selection {
        Selection::All => ("state = 'dead'", None),
        Selection::Destination(d) => ("state = 'dead' AND destination = $1", Some(Ok(d.clone()))),
        Selection::Ids(ids) => ("state = 'dead' AND id = ANY($1)", Some(Err(ids.clone()))),
    };
    let q = sqlx::query(AssertSqlSafe(sql.replace("{filter}", filter)));
    match bind {
        None => q,
        Some(Ok(d)) => q.bind(d),
        Some(Err(ids)) => q.bind(ids),
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn insert_event(
        &self,
        event: &VerifiedEvent,
        destinations: &[&str],
    ) -> Result<(), StoreError> {
        let p = event.payload();
        let payload = std::str::from_utf8(event.body()).map_err(unavailable)?;
        let destinations: Vec<String> = destinations.iter().map(|d| d.to_string()).collect();
        // One statement, one round trip, one transaction: the event, its deliveries and
        // the notifications (sent on commit). The final SELECT reads `n` so that the
        // notifying CTE runs.
        sqlx::query(
            "WITH e AS (
                 INSERT INTO events (id, received_at, app_id, event_name, facial_id, client_ip, payload)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)
             ), d AS (
                 INSERT INTO deliveries (event_id, destination, state, attempts, next_attempt_at, updated_at)
                 SELECT $1, dest, 'pending', 0, $8, $8 FROM unnest($9::text[]) AS dest
             ), n AS (
                 SELECT pg_notify('faceio_relay_new', dest) FROM unnest($9::text[]) AS dest
             )
             SELECT count(*) FROM n",
        )
        .bind(event.id())
        .bind(event.received_at_ms())
        .bind(&p.app_id)
        .bind(&p.event_name)
        .bind(&p.facial_id)
        .bind(&p.client_ip)
        .bind(payload)
        .bind(now_ms())
        .bind(&destinations)
        .execute(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(())
    }

    async fn due(
        &self,
        destination: &str,
        now_ms: i64,
        limit: usize,
    ) -> Result<Vec<Delivery>, StoreError> {
        let rows = sqlx::query(
            "SELECT d.id, d.event_id, d.attempts, e.received_at, e.payload
             FROM deliveries d JOIN events e ON e.id = d.event_id
             WHERE d.destination = $1 AND d.state = 'pending' AND d.next_attempt_at <= $2
             ORDER BY d.next_attempt_at, d.id
             LIMIT $3",
        )
        .bind(destination)
        .bind(now_ms)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        rows.iter()
            .map(|r| delivery_row(r, destination))
            .collect::<Result<_, _>>()
            .map_err(unavailable)
    }

    async fn claim(
        &self,
        destination: &str,
        now_ms: i64,
        want: usize,
        _in_flight: usize,
        lease: Duration,
    ) -> Result<Vec<Delivery>, StoreError> {
        // Rows under someone's live lease (including this process's attempts under way,
        // hence no need to read past them) are not returned; rows another claim is
        // locking right now are skipped.
        let rows = sqlx::query(
            "WITH picked AS (
                 SELECT id FROM deliveries
                 WHERE destination = $1 AND state = 'pending' AND next_attempt_at <= $2
                   AND (lease_until IS NULL OR lease_until < faceio_relay_now_ms())
                 ORDER BY next_attempt_at, id
                 LIMIT $3
                 FOR UPDATE SKIP LOCKED
             ), claimed AS (
                 UPDATE deliveries d SET claimed_by = $4, lease_until = faceio_relay_now_ms() + $5
                 FROM picked WHERE d.id = picked.id
                 RETURNING d.id, d.event_id, d.attempts, d.next_attempt_at
             )
             SELECT c.id, c.event_id, c.attempts, e.received_at, e.payload
             FROM claimed c JOIN events e ON e.id = c.event_id
             ORDER BY c.next_attempt_at, c.id",
        )
        .bind(destination)
        .bind(now_ms)
        .bind(want as i64)
        .bind(&self.instance)
        .bind(lease.as_millis() as i64)
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        rows.iter()
            .map(|r| delivery_row(r, destination))
            .collect::<Result<_, _>>()
            .map_err(unavailable)
    }

    async fn renew(&self, delivery_id: i64, lease: Duration) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE deliveries SET lease_until = faceio_relay_now_ms() + $3
             WHERE id = $1 AND state = 'pending' AND claimed_by = $2",
        )
        .bind(delivery_id)
        .bind(&self.instance)
        .bind(lease.as_millis() as i64)
        .execute(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(done.rows_affected() == 1)
    }

    async fn unclaim(&self, delivery_ids: &[i64]) -> Result<(), StoreError> {
        if delivery_ids.is_empty() {
            return Ok(());
        }
        sqlx::query(
            "UPDATE deliveries SET claimed_by = NULL, lease_until = NULL
             WHERE id = ANY($1) AND claimed_by = $2",
        )
        .bind(delivery_ids)
        .bind(&self.instance)
        .execute(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(())
    }

    async fn next_due_after(
        &self,
        destination: &str,
        after_ms: i64,
    ) -> Result<Option<i64>, StoreError> {
        sqlx::query_scalar(
            "SELECT MIN(next_attempt_at) FROM deliveries
             WHERE destination = $1 AND state = 'pending' AND next_attempt_at > $2",
        )
        .bind(destination)
        .bind(after_ms)
        .fetch_one(&self.pool)
        .await
        .map_err(unavailable)
    }

    async fn record(&self, delivery_id: i64, outcome: Outcome) -> Result<(), StoreError> {
        // Applies only while the claim is this process's, or nobody's: a relay whose
        // lease ran out and whose row another relay took cannot overwrite that relay's
        // state. `state = 'pending'` guards against an operator's purge, as in SQLite.
        const MINE: &str =
            "id = $1 AND state = 'pending' AND (claimed_by = $2 OR claimed_by IS NULL)";
        let now = now_ms();
        let q = match &outcome {
            Outcome::Done { attempts } => sqlx::query(AssertSqlSafe(format!(
                "UPDATE deliveries SET state = 'done', attempts = $3, last_error = NULL,
                 updated_at = $4, claimed_by = NULL, lease_until = NULL WHERE {MINE}"
            )))
            .bind(delivery_id)
            .bind(&self.instance)
            .bind(*attempts as i32)
            .bind(now),
            Outcome::Retry {
                attempts,
                next_attempt_at_ms,
                error,
            } => sqlx::query(AssertSqlSafe(format!(
                "UPDATE deliveries SET attempts = $3, next_attempt_at = $4, last_error = $5,
                 updated_at = $6, claimed_by = NULL, lease_until = NULL WHERE {MINE}"
            )))
            .bind(delivery_id)
            .bind(&self.instance)
            .bind(*attempts as i32)
            .bind(*next_attempt_at_ms)
            .bind(error.clone())
            .bind(now),
            Outcome::Dead { attempts, error } => sqlx::query(AssertSqlSafe(format!(
                "UPDATE deliveries SET state = 'dead', attempts = $3, last_error = $4,
                 updated_at = $5, claimed_by = NULL, lease_until = NULL WHERE {MINE}"
            )))
            .bind(delivery_id)
            .bind(&self.instance)
            .bind(*attempts as i32)
            .bind(error.clone())
            .bind(now),
        };
        q.execute(&self.pool).await.map_err(unavailable)?;
        Ok(())
    }

    async fn dead_letters(
        &self,
        destination: Option<&str>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {DEAD_LETTER_COLUMNS} FROM deliveries d JOIN events e ON e.id = d.event_id
             WHERE d.state = 'dead' AND ($1::text IS NULL OR d.destination = $1)
             ORDER BY d.updated_at DESC, d.id DESC LIMIT $2"
        )))
        .bind(destination)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        rows.iter()
            .map(dead_letter_row)
            .collect::<Result<_, _>>()
            .map_err(unavailable)
    }

    async fn dead_letter(&self, id: i64) -> Result<Option<(DeadLetter, Bytes)>, StoreError> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {DEAD_LETTER_COLUMNS}, e.payload FROM deliveries d
             JOIN events e ON e.id = d.event_id WHERE d.state = 'dead' AND d.id = $1"
        )))
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(unavailable)?;
        row.map(|r| {
            Ok::<_, sqlx::Error>((
                dead_letter_row(&r)?,
                Bytes::from(r.try_get::<String, _>(7)?),
            ))
        })
        .transpose()
        .map_err(unavailable)
    }

    async fn replay(&self, selection: &Selection) -> Result<u64, StoreError> {
        let now = now_ms();
        let sql = format!(
            "UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = {now},
             updated_at = {now}, claimed_by = NULL, lease_until = NULL WHERE {{filter}}"
        );
        let done = selection_query(&sql, selection)
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(done.rows_affected())
    }

    async fn purge(&self, selection: &Selection) -> Result<u64, StoreError> {
        let done = selection_query("DELETE FROM deliveries WHERE {filter}", selection)
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(done.rows_affected())
    }

    async fn dead_letter_orphans(&self, known: &[&str]) -> Result<u64, StoreError> {
        // Another relay may run a newer config with a destination this one lacks: its
        // deliveries are not orphans while some relay owns that destination (holds its
        // advisory lock in this database).
        let known: Vec<String> = known.iter().map(|k| k.to_string()).collect();
        let done = sqlx::query(
            "WITH owned AS (
                 SELECT (classid::bigint << 32) | objid::bigint AS key FROM pg_locks
                 WHERE locktype = 'advisory' AND objsubid = 1 AND granted
                   AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
             )
             UPDATE deliveries SET state = 'dead', updated_at = $2, claimed_by = NULL,
                 lease_until = NULL,
                 last_error = 'destination ' || destination || ' is no longer in the config'
             WHERE state = 'pending' AND destination <> ALL($1)
               AND faceio_relay_destination_key(destination) NOT IN (SELECT key FROM owned)",
        )
        .bind(&known)
        .bind(now_ms())
        .execute(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(done.rows_affected())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO meta (key, value) VALUES ('heartbeat', $1)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        )
        .bind(now_ms().to_string())
        .execute(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(())
    }

    async fn destination_stats(&self) -> Result<Vec<DestinationStats>, StoreError> {
        // Both scans ride the partial indexes; the oldest pending delivery is the one with
        // the smallest id, whose event is then looked up once.
        let rows = sqlx::query(
            "WITH p AS (
                 SELECT destination, COUNT(*) AS n, MIN(id) AS oldest FROM deliveries
                 WHERE state = 'pending' GROUP BY destination
             ), d AS (
                 SELECT destination, COUNT(*) AS n FROM deliveries
                 WHERE state = 'dead' GROUP BY destination
             )
             SELECT COALESCE(p.destination, d.destination), COALESCE(p.n, 0), e.received_at,
                    COALESCE(d.n, 0)
             FROM p FULL JOIN d ON d.destination = p.destination
             LEFT JOIN deliveries od ON od.id = p.oldest
             LEFT JOIN events e ON e.id = od.event_id
             ORDER BY 1",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        rows.iter()
            .map(|r| {
                Ok(DestinationStats {
                    destination: r.try_get(0)?,
                    pending: r.try_get::<i64, _>(1)?.max(0) as u64,
                    oldest_pending_ms: r.try_get(2)?,
                    dead: r.try_get::<i64, _>(3)?.max(0) as u64,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(unavailable)
    }

    async fn prune(&self, cutoff_ms: i64) -> Result<u64, StoreError> {
        // In chunks, each its own short statement, so no transaction holds many row locks
        // or delays the other relays' writes for long.
        let mut total = 0;
        loop {
            let deliveries = sqlx::query(
                "DELETE FROM deliveries WHERE id IN (
                     SELECT id FROM deliveries WHERE state = 'done' AND updated_at < $1 LIMIT $2)",
            )
            .bind(cutoff_ms)
            .bind(PRUNE_CHUNK)
            .execute(&self.pool)
            .await
            .map_err(unavailable)?
            .rows_affected();
            let events = sqlx::query(
                "DELETE FROM events WHERE id IN (
                     SELECT id FROM events WHERE received_at < $1
                     AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_id = events.id)
                     LIMIT $2)",
            )
            .bind(cutoff_ms)
            .bind(PRUNE_CHUNK)
            .execute(&self.pool)
            .await
            .map_err(unavailable)?
            .rows_affected();
            total += deliveries + events;
            if deliveries + events == 0 {
                return Ok(total);
            }
        }
    }

    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn own(&self, destination: &str) -> Result<Option<Ownership>, StoreError> {
        self.locks.try_own(destination).await
    }

    fn subscribe(&self) -> Option<broadcast::Receiver<Wake>> {
        let mut wakes = self.wakes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = wakes.as_ref() {
            return Some(tx.subscribe());
        }
        let (tx, rx) = broadcast::channel(WAKE_BUFFER);
        // Its own one-connection pool: the listener keeps that connection for good.
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(CONNECT_TIMEOUT)
            .connect_lazy_with(self.options.clone());
        tokio::spawn(listen(pool, tx.clone(), self.stop.child_token()));
        *wakes = Some(tx);
        Some(rx)
    }

    async fn close(&self) {
        self.stop.cancel();
        // Give the destinations back now rather than when the process exits.
        let mut state = self.locks.state.lock().await;
        if let Some(conn) = state.conn.take() {
            let _ = tokio::time::timeout(CONNECT_TIMEOUT, conn.close()).await;
        }
        state.lost.cancel();
        drop(state);
        let _ = tokio::time::timeout(CONNECT_TIMEOUT, self.pool.close()).await;
    }
}
