//! The shared PostgreSQL store (`store: { backend: postgres, url, pool_size }`): several
//! relays behind a load balancer use one database and act as one relay.
//!
//! # Tables
//! The same `events` and `deliveries` as the SQLite store (see `migrations/postgres/`,
//! applied on start under sqlx's migration lock), plus three columns on `deliveries`:
//! `claimed_by` (the relay process that claimed the row), `lease_until` (when that claim
//! runs out) and `claim_seq` (bumped by every claim), and `relay_destinations` (which
//! destinations each live relay has configured). Migrations only ever add, and relays
//! start with `ignore_missing`, so an older relay runs on a newer schema (rolling
//! upgrades); `dead-letters` commands never migrate.
//!
//! # One clock
//! Every time the relays compare (`next_attempt_at`, leases, announcements) is taken from
//! the database's clock (`faceio_relay_now_ms()`): a relay's own clock only measures
//! offsets ("due now", "retry in 30 s"), so a relay whose clock is off delays or hurries
//! nothing. `received_at` is the accepting relay's clock, as in SQLite.
//!
//! # Durability
//! Events are written in groups: [`Store::insert_event`] hands the event to one of a few
//! inserter tasks and waits; an inserter takes every event waiting (up to
//! [`MAX_INSERT_BATCH`]) and writes them with their deliveries in one statement (one round
//! trip, one transaction, one WAL flush), so under load one commit carries many events
//! instead of each event waiting its turn for a pool connection and a flush of its own.
//! `insert_event` returns once PostgreSQL has committed its group with
//! `synchronous_commit` set for the session on connect (`on`, or the `remote_*` level
//! the database asks for), so the 200 follows a WAL flush. A group PostgreSQL refuses
//! for its data (SQLSTATE classes 22 and 23) is written again one event at a time, so one
//! bad event never fails the others; any other failure (connection, timeout, shutdown)
//! fails the whole group at once (503s), without a statement per event. An event whose
//! caller stopped waiting (its answer was a 503) is still written: the sender does not
//! retry, so it is delivered rather than lost.
//!
//! The wake-up notification is *not* part of the insert's transaction (a `NOTIFY`
//! serializes every notifying commit in the cluster on one lock, across its WAL flush): a
//! background task sends it after the commit, coalesced per destination, as its own
//! asynchronously committed statement. Losing one costs a poll, not an event.
//!
//! Outcomes ([`Store::record`]) are written in groups too, by one recorder task, and
//! committed without waiting for the WAL flush, as in SQLite: if PostgreSQL itself
//! crashes, the last outcomes may be lost, and those deliveries are sent again (at least
//! once, never lost). Claims and renewals do wait for the flush: a claim lost that way
//! could let a second relay attempt a delivery under way.
//!
//! # One dispatcher per destination in the cluster
//! [`Store::own`] takes a session-level advisory lock,
//! `pg_try_advisory_lock(faceio_relay_destination_key(name))`, on one dedicated connection
//! per relay. The relay holding it is the only one that dispatches the destination, so its
//! in-process claims, rate limiter and `Retry-After` pause hold for the whole cluster.
//! When that relay dies, PostgreSQL ends its session and drops the lock; another relay
//! takes it at its next try (every `poll_interval`). Every session asks for TCP
//! keepalives ([`SESSION_OPTIONS`]), so PostgreSQL also ends the session of a relay whose
//! machine vanished within about 20 s. The lock connection is checked every
//! [`LOCK_CHECK_INTERVAL`]; when it fails, every [`Ownership`] it carried is reported
//! lost and the dispatchers stop until they own their destination again. The next lock
//! connection ends the previous lock session if PostgreSQL still has it (a hung network
//! path), so this relay's locks are free at once rather than when keepalives give up.
//!
//! # Claims under a lease
//! Ownership can move while the old owner still has attempts under way (its connection
//! died, but the process did not). So rows are also claimed: [`Store::claim`] takes due
//! rows that nobody holds (or whose lease ran out) with `FOR UPDATE SKIP LOCKED`, stamps
//! them with this process's ID, a lease and a new `claim_seq`; [`Store::renew`] re-checks
//! and extends the claim before an attempt that starts more than a second after its
//! claim was asked for (a younger claim's own lease still covers the attempt, by the same
//! argument: see `delivery::worker`); [`Store::renew`], [`Store::unclaim`]
//! and [`Store::record`] apply only while the row still carries that claim (instance and
//! `claim_seq`). The dispatcher adds two rules on its own monotonic clock (see
//! `delivery::worker`): a new owner leaves rows claimed by other relays alone for one full
//! lease, and an attempt whose renewal came back late skips or is cut short, so it ends
//! before its lease does. A row is therefore never attempted by two live relays at once.
//!
//! # Wake-ups
//! Every relay listens on `faceio_relay_new` on a dedicated connection and passes the
//! destination names to its dispatchers ([`Store::subscribe`]), so a delivery accepted
//! by any relay starts within milliseconds at the relay that owns its destination.
//!
//! # Connections that stop answering
//! A statement whose caller gave up (a timeout) closes its pooled connection instead of
//! returning it: sqlx would first check it with a round trip that has no time limit,
//! which on a dead network path holds a pool slot for as long as TCP retransmits.

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use sqlx::Row;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgListener, PgPool, PgPoolOptions, PgRow};
use sqlx::{AssertSqlSafe, Connection, Executor, Postgres};
use tokio::sync::{Mutex, Notify, broadcast};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{
    ClaimRequest, DeadLetter, Delivery, DestinationStats, EventRow, Outcome, Ownership,
    REPLAY_RECORD_TTL, REPLAY_REFUSED, ReplayDecisions, ReplayVerdict, Selection, Store,
    StoreError, Wake,
};
use crate::config::PostgresConfig;
use crate::event::VerifiedEvent;
use crate::event::now_ms;

/// The schema migrations, shipped in the binary. Additive only (see
/// `migrations/postgres/0002_*.sql`): relays of older versions run on the newer schema.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "initial",
        include_str!("../../../migrations/postgres/0001_initial.sql"),
    ),
    (
        2,
        "claim tokens and announcements",
        include_str!("../../../migrations/postgres/0002_claim_tokens_and_announcements.sql"),
    ),
    (
        3,
        "replay requests",
        include_str!("../../../migrations/postgres/0003_replay_requests.sql"),
    ),
];

/// Where sqlx records applied migrations (named after us, not `_sqlx_migrations`).
const MIGRATIONS_TABLE: &str = "faceio_relay_migrations";

/// The NOTIFY channel for new deliveries; the payload is the destination name.
const CHANNEL: &str = "faceio_relay_new";

/// Set on every session at connect. The TCP keepalives make PostgreSQL end the session
/// of a relay whose machine vanished within about 20 s (10 s idle, then 3 probes 3 s
/// apart; 15 s for data left unacknowledged) instead of the server default of hours,
/// which would keep that relay's destination locks, and so its destinations, stuck.
/// (`tcp_user_timeout` needs PostgreSQL 12 or later.) Notices (such as "relation …
/// already exists, skipping" from a migration check) would land in the operator's
/// terminal at INFO: keep only warnings.
///
/// Every statement is planned for its own parameters (`plan_cache_mode`): a prepared
/// statement's generic plan is made once per connection from the statistics of that
/// moment, and on a fresh database (no rows yet, no autoanalyze for up to a minute) that
/// plan scans whole tables. In the benchmark the outcome group update, planned on an
/// empty table, then took over 10 s per group at 60,000 rows and stalled delivery.
/// Planning each statement costs well under a millisecond; the statements that run
/// often carry whole groups.
const SESSION_OPTIONS: [(&str, &str); 6] = [
    ("client_min_messages", "warning"),
    ("plan_cache_mode", "force_custom_plan"),
    ("tcp_keepalives_idle", "10"),
    ("tcp_keepalives_interval", "3"),
    ("tcp_keepalives_count", "3"),
    ("tcp_user_timeout", "15000"),
];

/// Rows deleted per prune statement.
const PRUNE_CHUNK: i64 = 5000;

/// Longest wait for a pooled connection; past it the caller gets `Unavailable` (ingress:
/// 503), well inside ingress's own `store_timeout`.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);

/// Longest wait to open a connection or run a statement of our own (lock connection,
/// listener, notifications).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How often the lock connection is checked. A lock lost with its connection is noticed
/// within this; the leases cover the time until then.
pub const LOCK_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// First pause before listening again after the listening connection failed; doubled
/// (up to [`MAX_LISTEN_BACKOFF`]) until a connection lives [`LISTEN_STABLE`].
const LISTEN_BACKOFF: Duration = Duration::from_millis(100);

/// Longest pause between attempts to re-listen after the listening connection failed.
const MAX_LISTEN_BACKOFF: Duration = Duration::from_secs(10);

/// A listening connection that lived this long was healthy: the next failure starts the
/// backoff over. One that dies sooner (ended right after connecting, say) keeps it
/// growing, so a relay does not reconnect in a tight loop.
const LISTEN_STABLE: Duration = Duration::from_secs(5);

/// How often the idle listening connection is checked with a round trip: nothing else
/// would notice a connection that hangs without failing.
const LISTEN_CHECK_INTERVAL: Duration = Duration::from_secs(10);

/// Least time between two "look at every destination" wake-ups (each costs every
/// dispatcher a store read).
const WAKE_ALL_INTERVAL: Duration = Duration::from_secs(1);

/// Notifications buffered for dispatchers that are slow to read them (a lagging reader
/// wakes every dispatcher instead).
const WAKE_BUFFER: usize = 1024;

/// Pause after sending notifications: inserts committed meanwhile share the next
/// statement, one notification per destination. Short next to the milliseconds a
/// wake-up may take.
const NOTIFY_COALESCE: Duration = Duration::from_millis(2);

/// Most events written by one insert statement.
pub const MAX_INSERT_BATCH: usize = 256;

/// Events waiting for an inserter before `insert_event` waits for room (and outcomes
/// waiting for a recorder before `record` does). Four groups' worth: bodies are at most
/// `max_body` each, so this also bounds the memory a slow database can pin.
const INSERT_QUEUE: usize = 1024;

/// Most outcomes written by one statement.
const MAX_OUTCOME_BATCH: usize = 256;

/// Longest one group insert may take before its connection is dropped and its events
/// answered with an error (ingress has answered 503 long before).
const INSERT_TIMEOUT: Duration = Duration::from_secs(10);

/// Announcements (`relay_destinations`) this long expired belong to relays long gone and
/// are deleted.
const ANNOUNCEMENT_RETENTION: Duration = Duration::from_secs(86_400);

/// PostgreSQL-backed [`Store`].
pub struct PostgresStore {
    /// Connections for everything but the locks, the listener and the admin reads.
    pool: PgPool,
    /// One connection of its own for `/readyz` and the `/metrics` backlog gauges (and the
    /// status line): however often they are asked, they never take a connection that
    /// inserts need. Opened on first use.
    admin: PgPool,
    /// This process's ID in `deliveries.claimed_by` (new on every start).
    instance: String,
    /// The connection holding this relay's destination locks.
    locks: Arc<Locks>,
    /// New-delivery notifications from the listening connection; started on the first
    /// [`Store::subscribe`].
    wakes: std::sync::Mutex<Option<broadcast::Sender<Wake>>>,
    /// Events for the inserter tasks (which pass committed destinations on to the
    /// notification task).
    inserts: tokio::sync::mpsc::Sender<PendingInsert>,
    /// Outcomes for the recorder task.
    outcomes: tokio::sync::mpsc::Sender<PendingOutcome>,
    /// The connection options, for the dedicated connections.
    options: PgConnectOptions,
    /// Stops the background tasks (lock check, listener, notifications, inserters,
    /// recorder).
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
    /// The session of the latest lock connection: its backend PID and start (µs since
    /// the epoch, so a reused PID is not mistaken for it). Kept after a failure: the next
    /// lock connection ends that session if PostgreSQL still has it.
    session: Option<(i32, i64)>,
    /// Cancelled when `conn` fails: every ownership granted on it is lost.
    lost: CancellationToken,
    /// Bumped on every new connection, so a release meant for a dead one is dropped.
    generation: u64,
    /// Whether the check task runs.
    checking: bool,
}

/// One event waiting to be written, and who waits for it.
struct PendingInsert {
    row: EventRow,
    done: tokio::sync::oneshot::Sender<Result<(), StoreError>>,
}

/// One outcome waiting to be written, and who waits for it.
struct PendingOutcome {
    id: i64,
    /// The claim the outcome is for (`claim_seq`).
    seq: i64,
    /// The new state: `done`, `dead`, or `pending` for a retry.
    state: &'static str,
    attempts: i32,
    /// A retry's delay from now (ms); the database adds it to its own clock.
    delay_ms: i64,
    error: Option<String>,
    done: tokio::sync::oneshot::Sender<Result<(), StoreError>>,
}

/// Queues `item` for its writer task and waits for the writer's answer.
async fn hand_over<T>(
    queue: &tokio::sync::mpsc::Sender<T>,
    item: T,
    answer: tokio::sync::oneshot::Receiver<Result<(), StoreError>>,
) -> Result<(), StoreError> {
    let closed = || unavailable("the store is closing");
    queue.send(item).await.map_err(|_| closed())?;
    answer.await.map_err(|_| closed())?
}

/// A queue several tasks take groups from.
type SharedQueue<T> = Arc<Mutex<tokio::sync::mpsc::Receiver<T>>>;

/// Takes every item waiting in `queue` (at least one, at most `max`) into `batch`, one
/// task at a time; `false` when `stop` fired or the store is gone.
async fn next_group<T>(
    queue: &SharedQueue<T>,
    batch: &mut Vec<T>,
    max: usize,
    stop: &CancellationToken,
) -> bool {
    let mut queue = tokio::select! {
        q = queue.lock() => q,
        () = stop.cancelled() => return false,
    };
    tokio::select! {
        n = queue.recv_many(batch, max) => n > 0,
        () = stop.cancelled() => false,
    }
}

/// Destinations waiting for their notification, and the task's wake-up.
#[derive(Default)]
struct Notices {
    pending: std::sync::Mutex<HashSet<String>>,
    ready: Notify,
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

/// Sets `synchronous_commit` for the session, so commits on `conn` wait for the WAL
/// flush whatever the database or server default says, now or after a configuration
/// reload (a session-level setting outlives both). The `remote_*` levels are kept: they
/// wait for more.
async fn set_synchronous_commit(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    conn.execute(
        "SELECT set_config('synchronous_commit',
             CASE WHEN current_setting('synchronous_commit') IN ('remote_write', 'remote_apply')
                  THEN current_setting('synchronous_commit') ELSE 'on' END,
             false)",
    )
    .await?;
    Ok(())
}

/// A pooled connection for one statement. Unless [`Conn::finish`] saw the statement
/// end, dropping it closes the connection instead of returning it to the pool (where
/// sqlx would check it with a round trip that has no time limit): a caller that gave up
/// waiting on a hung connection gets its pool slot back.
struct Conn {
    conn: PoolConnection<Postgres>,
    finished: bool,
}

impl Conn {
    fn get(&mut self) -> &mut PgConnection {
        &mut self.conn
    }

    /// Marks the statement as ended and maps its error.
    fn finish<T>(&mut self, result: Result<T, sqlx::Error>) -> Result<T, StoreError> {
        self.finished = true;
        result.map_err(unavailable)
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if !self.finished {
            self.conn.close_on_drop();
        }
    }
}

async fn conn(pool: &PgPool) -> Result<Conn, StoreError> {
    let conn = pool.acquire().await.map_err(unavailable)?;
    Ok(Conn {
        conn,
        finished: false,
    })
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
        // A newer relay may have applied versions this one does not know. They only add
        // (see the migrations), so this one works on them: leave them alone.
        migrator.set_ignore_missing(true);
        tokio::time::timeout(CONNECT_TIMEOUT * 6, migrator.run(&store.pool))
            .await
            .map_err(|_| open_err("the schema migration did not finish in time"))?
            .map_err(open_err)?;
        Ok(store)
    }

    /// Like [`PostgresStore::open`], for the `dead-letters` commands, but never creates
    /// or migrates the schema: a command run with a newer binary than the relays must not
    /// change the database under them (and one pointed at the wrong database must not
    /// create tables there). The commands use only what version 1 of the schema has,
    /// except `replay`, which needs version 3 (it says so when the relays are older).
    pub async fn open_admin(config: &PostgresConfig) -> Result<Self, StoreError> {
        let store = Self::connect(config).await?;
        let ready: bool = sqlx::query_scalar(
            "SELECT to_regclass('deliveries') IS NOT NULL AND to_regclass('events') IS NOT NULL",
        )
        .fetch_one(&store.pool)
        .await
        .map_err(open_err)?;
        if !ready {
            return Err(open_err(
                "this database has no faceio-relay tables; start a relay on it once \
                 (relays create and migrate the schema)",
            ));
        }
        Ok(store)
    }

    async fn connect(config: &PostgresConfig) -> Result<Self, StoreError> {
        let options: PgConnectOptions = config
            .url
            .expose()
            .parse()
            .map_err(|_| open_err("store.url is not a valid PostgreSQL URL"))?;
        let options = options
            .application_name("faceio-relay")
            .options(SESSION_OPTIONS);
        // No test query before handing out a connection: it would double the round trips
        // of every insert. A connection that died while idle fails one statement (503 or
        // a retried outcome) and is replaced.
        let pool = PgPoolOptions::new()
            .max_connections(config.pool_size)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .test_before_acquire(false)
            .after_connect(|conn, _| Box::pin(set_synchronous_commit(conn)))
            .connect_with(options.clone())
            .await
            .map_err(open_err)?;
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .test_before_acquire(false)
            .after_connect(|conn, _| Box::pin(set_synchronous_commit(conn)))
            .connect_lazy_with(options.clone());
        let stop = CancellationToken::new();
        let notices = Arc::new(Notices::default());
        tokio::spawn(send_notices(
            pool.clone(),
            Arc::clone(&notices),
            stop.child_token(),
        ));
        // Up to half the pool writes events (with `pool_size` below 4, claims and renewals
        // may wait for a connection while inserts run); each inserter holds a connection
        // only while it writes.
        let (inserts, queue) = tokio::sync::mpsc::channel(INSERT_QUEUE);
        let queue = Arc::new(Mutex::new(queue));
        for _ in 0..(config.pool_size / 2).clamp(1, 4) {
            tokio::spawn(insert_events(
                pool.clone(),
                Arc::clone(&queue),
                Arc::clone(&notices),
                stop.child_token(),
            ));
        }
        // Outcomes: one recorder, one connection at a time (they are small and unsynced).
        let (outcomes, queue) = tokio::sync::mpsc::channel(INSERT_QUEUE);
        let instance = uuid::Uuid::now_v7().simple().to_string();
        tokio::spawn(record_outcomes(
            pool.clone(),
            instance.clone(),
            Arc::new(Mutex::new(queue)),
            stop.child_token(),
        ));
        Ok(Self {
            pool,
            admin,
            instance,
            locks: Arc::new(Locks {
                options: options.clone(),
                state: Mutex::new(LockState {
                    conn: None,
                    session: None,
                    lost: CancellationToken::new(),
                    generation: 0,
                    checking: false,
                }),
                stop: stop.child_token(),
            }),
            wakes: std::sync::Mutex::new(None),
            inserts,
            outcomes,
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

    async fn conn(&self) -> Result<Conn, StoreError> {
        conn(&self.pool).await
    }

    /// One heartbeat write on the admin connection.
    async fn ping_once(&self) -> Result<(), StoreError> {
        let mut c = conn(&self.admin).await?;
        let r = sqlx::query(
            "INSERT INTO meta (key, value) VALUES ('heartbeat', $1)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        )
        .bind(now_ms().to_string())
        .execute(c.get())
        .await;
        c.finish(r)?;
        Ok(())
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
            let conn = self.reconnect(&mut state).await?;
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

    /// Opens a new lock connection, ends the previous lock session if PostgreSQL still
    /// has it, and remembers the new one.
    async fn reconnect(&self, state: &mut LockState) -> Result<PgConnection, StoreError> {
        let setup = async {
            let mut conn = PgConnection::connect_with(&self.options).await?;
            if let Some((pid, started)) = state.session {
                // Only that session: the PID with the same start time, still ours.
                let ended: Option<bool> = sqlx::query_scalar(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                     WHERE pid = $1 AND application_name = 'faceio-relay'
                       AND (extract(epoch FROM backend_start) * 1000000)::bigint = $2",
                )
                .bind(pid)
                .bind(started)
                .fetch_optional(&mut conn)
                .await?;
                if ended == Some(true) {
                    tracing::warn!(
                        pid,
                        "ended this relay's previous PostgreSQL session for destination locks, \
                         which no longer answered; its locks are free again"
                    );
                }
            }
            let session: (i32, i64) = sqlx::query_as(
                "SELECT pid, (extract(epoch FROM backend_start) * 1000000)::bigint
                 FROM pg_stat_activity WHERE pid = pg_backend_pid()",
            )
            .fetch_one(&mut conn)
            .await?;
            Ok::<_, sqlx::Error>((conn, session))
        };
        let (conn, session) = tokio::time::timeout(CONNECT_TIMEOUT, setup)
            .await
            .map_err(|_| unavailable("connecting for destination locks timed out"))?
            .map_err(unavailable)?;
        state.session = Some(session);
        Ok(conn)
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

/// Sends the notifications for committed deliveries until `stop`: one statement for
/// every destination that got deliveries since the last one, then a short pause so a
/// burst of inserts shares the next. Each is its own transaction, committed without
/// waiting for the WAL flush (a notification needs no durability), so no insert waits
/// for the cluster-wide lock NOTIFY takes at commit. A failure costs the other relays a
/// poll, nothing more.
async fn send_notices(pool: PgPool, notices: Arc<Notices>, stop: CancellationToken) {
    loop {
        tokio::select! {
            () = notices.ready.notified() => {}
            () = stop.cancelled() => return,
        }
        let destinations: Vec<String> = notices
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .collect();
        if destinations.is_empty() {
            continue;
        }
        let sent = tokio::time::timeout(CONNECT_TIMEOUT, async {
            let mut c = conn(&pool).await?;
            let r = sqlx::query(
                "SELECT set_config('synchronous_commit', 'off', true), pg_notify($1, dest)
                 FROM unnest($2::text[]) AS dest",
            )
            .bind(CHANNEL)
            .bind(&destinations)
            .execute(c.get())
            .await;
            c.finish(r)
        })
        .await;
        match sent {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::debug!(error = %e,
                "cannot notify the other relays of new deliveries; they find them at their next poll"),
            Err(_) => tracing::debug!(
                "notifying the other relays of new deliveries timed out; they find them at their next poll"
            ),
        }
        tokio::select! {
            () = tokio::time::sleep(NOTIFY_COALESCE) => {}
            () = stop.cancelled() => return,
        }
    }
}

/// An inserter: takes every event waiting (up to [`MAX_INSERT_BATCH`]) and writes them in
/// one statement, until `stop` (events still queued then are answered with an error: the
/// relay is closing the store, ingress no longer answers 200).
async fn insert_events(
    pool: PgPool,
    queue: SharedQueue<PendingInsert>,
    notices: Arc<Notices>,
    stop: CancellationToken,
) {
    let mut batch = Vec::with_capacity(MAX_INSERT_BATCH);
    // One inserter gathers at a time; the others write meanwhile.
    while next_group(&queue, &mut batch, MAX_INSERT_BATCH, &stop).await {
        // Ingress gave up on these (`store_timeout`) and answered 503: not stored.
        batch.retain(|p| !p.done.is_closed());
        if batch.is_empty() {
            continue;
        }
        let written: Vec<Result<(), StoreError>> = match write_group(&pool, &batch).await {
            Ok(()) => batch.iter().map(|_| Ok(())).collect(),
            // PostgreSQL refused the statement (not the connection): find the event it
            // refused by writing them one by one.
            Err(Refused::Statement(_)) if batch.len() > 1 => {
                let mut each = Vec::with_capacity(batch.len());
                let mut unreachable = None;
                for one in &batch {
                    // Once the database stops answering, the rest fail without a try.
                    if let Some(e) = &unreachable {
                        each.push(Err(StoreError::Unavailable(reason(e))));
                        continue;
                    }
                    match write_group(&pool, std::slice::from_ref(one)).await {
                        Ok(()) => each.push(Ok(())),
                        Err(Refused::Statement(e)) => each.push(Err(e)),
                        Err(Refused::Unreachable(e)) => {
                            each.push(Err(StoreError::Unavailable(reason(&e))));
                            unreachable = Some(e);
                        }
                    }
                }
                each
            }
            // The database is unreachable or slow: every event of the group fails alike.
            Err(e) => {
                let e = reason(&e.into_error());
                batch
                    .iter()
                    .map(|_| Err(StoreError::Unavailable(e.clone())))
                    .collect()
            }
        };
        let mut committed: HashSet<String> = HashSet::new();
        for (pending, result) in batch.drain(..).zip(written) {
            if result.is_ok() {
                committed.extend(pending.row.destinations.iter().cloned());
            }
            // The caller may have given up waiting (its answer was a 503); the event is
            // stored all the same, and delivered: at least once.
            let _ = pending.done.send(result);
        }
        // Committed: now tell the other relays (in the background, see `send_notices`).
        if !committed.is_empty() {
            notices
                .pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(committed);
            notices.ready.notify_one();
        }
    }
}

/// The text of a store error without its "store unavailable: " prefix, to build another
/// `Unavailable` from it.
fn reason(e: &StoreError) -> String {
    match e {
        StoreError::Unavailable(m) => m.clone(),
        other => other.to_string(),
    }
}

/// Why a group of events was not written.
enum Refused {
    /// PostgreSQL ran the statement and refused it (a constraint, a value): another
    /// group without the offending event can succeed.
    Statement(StoreError),
    /// No connection, a broken one, or no answer in time: any statement would fail.
    Unreachable(StoreError),
}

impl Refused {
    fn into_error(self) -> StoreError {
        match self {
            Refused::Statement(e) | Refused::Unreachable(e) => e,
        }
    }
}

/// The recorder: writes every outcome waiting (up to [`MAX_OUTCOME_BATCH`]) with one
/// statement, committed without waiting for the WAL flush (see the module docs). A
/// failed group fails every outcome in it; their attempts retry them.
async fn record_outcomes(
    pool: PgPool,
    instance: String,
    queue: SharedQueue<PendingOutcome>,
    stop: CancellationToken,
) {
    let mut batch = Vec::with_capacity(MAX_OUTCOME_BATCH);
    while next_group(&queue, &mut batch, MAX_OUTCOME_BATCH, &stop).await {
        let written =
            tokio::time::timeout(INSERT_TIMEOUT, write_outcomes(&pool, &instance, &batch))
                .await
                .unwrap_or_else(|_| Err(unavailable("recording outcomes timed out")));
        match written {
            Ok(applied) => {
                for pending in batch.drain(..) {
                    if !applied.contains(&pending.id) {
                        tracing::debug!(
                            delivery = pending.id,
                            "outcome dropped: the delivery was claimed again or is no longer pending"
                        );
                    }
                    let _ = pending.done.send(Ok(()));
                }
            }
            Err(e) => {
                let e = reason(&e);
                for pending in batch.drain(..) {
                    let _ = pending.done.send(Err(StoreError::Unavailable(e.clone())));
                }
            }
        }
    }
}

/// Writes a group of outcomes in one statement; returns the IDs it applied to (an
/// outcome whose claim is no longer on its row applies to nothing).
async fn write_outcomes(
    pool: &PgPool,
    instance: &str,
    outcomes: &[PendingOutcome],
) -> Result<HashSet<i64>, StoreError> {
    let ids: Vec<i64> = outcomes.iter().map(|o| o.id).collect();
    let seqs: Vec<i64> = outcomes.iter().map(|o| o.seq).collect();
    let states: Vec<&str> = outcomes.iter().map(|o| o.state).collect();
    let attempts: Vec<i32> = outcomes.iter().map(|o| o.attempts).collect();
    let delays: Vec<i64> = outcomes.iter().map(|o| o.delay_ms).collect();
    // PostgreSQL text cannot hold U+0000 (it would refuse the whole group, again at every
    // retry); a destination's error text may carry one.
    let errors: Vec<Option<Cow<'_, str>>> = outcomes
        .iter()
        .map(|o| {
            o.error.as_deref().map(|e| match e.contains('\0') {
                true => Cow::Owned(e.replace('\0', "\u{FFFD}")),
                false => Cow::Borrowed(e),
            })
        })
        .collect();
    let mut c = conn(pool).await?;
    // Committed without waiting for the WAL flush, as outcomes are in SQLite: the
    // statement's own transaction turns `synchronous_commit` off for itself.
    let r = sqlx::query_scalar::<_, i64>(
        "UPDATE deliveries AS d SET
             state = u.state,
             attempts = u.attempts,
             next_attempt_at = CASE WHEN u.state = 'pending'
                                    THEN faceio_relay_now_ms() + u.delay
                                    ELSE d.next_attempt_at END,
             last_error = u.error,
             updated_at = faceio_relay_now_ms(), claimed_by = NULL, lease_until = NULL
         FROM unnest($2::bigint[], $3::bigint[], $4::text[], $5::int[], $6::bigint[], $7::text[])
                  AS u(id, seq, state, attempts, delay, error),
              (SELECT set_config('synchronous_commit', 'off', true)) AS async_commit
         WHERE d.id = u.id AND d.state = 'pending' AND d.claimed_by = $1 AND d.claim_seq = u.seq
         RETURNING d.id",
    )
    .bind(instance)
    .bind(&ids)
    .bind(&seqs)
    .bind(&states)
    .bind(&attempts)
    .bind(&delays)
    .bind(&errors)
    .fetch_all(c.get())
    .await;
    Ok(c.finish(r)?.into_iter().collect())
}

/// Writes `events` and their deliveries, due now on the database's clock, in one
/// statement (its own transaction).
async fn write_group(pool: &PgPool, events: &[PendingInsert]) -> Result<(), Refused> {
    let rows = || events.iter().map(|e| &e.row);
    let col = |f: fn(&EventRow) -> &str| -> Vec<&str> { rows().map(f).collect() };
    let received: Vec<i64> = rows().map(|e| e.received_at).collect();
    let payloads = rows()
        .map(|e| std::str::from_utf8(&e.body))
        .collect::<Result<Vec<&str>, _>>()
        .map_err(|e| Refused::Statement(unavailable(e)))?;
    let (mut event_ids, mut destinations) = (Vec::new(), Vec::new());
    for e in rows() {
        for d in &e.destinations {
            event_ids.push(e.id.as_str());
            destinations.push(d.as_str());
        }
    }
    let write = async {
        let mut c = conn(pool).await.map_err(Refused::Unreachable)?;
        let r = sqlx::query(
            "WITH e AS (
                 INSERT INTO events (id, received_at, app_id, event_name, facial_id, client_ip, payload)
                 SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[],
                                      $5::text[], $6::text[], $7::text[])
             )
             INSERT INTO deliveries (event_id, destination, state, attempts, next_attempt_at, updated_at)
             SELECT ev, dest, 'pending', 0, clock.now, clock.now
             FROM unnest($8::text[], $9::text[]) WITH ORDINALITY AS d(ev, dest, n),
                  (SELECT faceio_relay_now_ms() AS now) AS clock
             ORDER BY d.n",
        )
        .bind(col(|e| &e.id))
        .bind(&received)
        .bind(col(|e| &e.app_id))
        .bind(col(|e| &e.event_name))
        .bind(col(|e| &e.facial_id))
        .bind(col(|e| &e.client_ip))
        .bind(&payloads)
        .bind(&event_ids)
        .bind(&destinations)
        .execute(c.get())
        .await;
        // Refused for its data (class 22) or a constraint (class 23): another group
        // without the offending event can succeed. Anything else (shutdown, a timeout,
        // serialization, resources) would fail every statement alike.
        let refused_statement = matches!(&r, Err(sqlx::Error::Database(db))
            if db.code().is_some_and(|c| c.starts_with("22") || c.starts_with("23")));
        match c.finish(r) {
            Ok(_) => Ok(()),
            Err(e) if refused_statement => Err(Refused::Statement(e)),
            Err(e) => Err(Refused::Unreachable(e)),
        }
    };
    tokio::time::timeout(INSERT_TIMEOUT, write)
        .await
        .unwrap_or_else(|_| {
            Err(Refused::Unreachable(unavailable(
                "writing events timed out",
            )))
        })
}

/// Why [`listen_until_lost`] returned.
enum Ended {
    Stopped,
    Lost(String),
}

/// Listens for new deliveries and passes them on until `stop`; after a lost connection,
/// wakes every dispatcher (notifications may have been missed), at most once per
/// [`WAKE_ALL_INTERVAL`].
async fn listen(options: PgConnectOptions, tx: broadcast::Sender<Wake>, stop: CancellationToken) {
    let mut backoff = LISTEN_BACKOFF;
    let mut last_wake_all: Option<Instant> = None;
    loop {
        // A pool of its own for each connection: the listener keeps that connection for
        // good, and one that hung must not be handed back (sqlx would check it first, with
        // no time limit, and hold the only slot meanwhile).
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(CONNECT_TIMEOUT)
            .connect_lazy_with(options.clone());
        let listener = async {
            let mut l = PgListener::connect_with(&pool).await?;
            // The listener reconnects by itself otherwise, without any pause; we want
            // every reconnection to go through the backoff below.
            l.eager_reconnect(false);
            l.listen(CHANNEL).await?;
            Ok::<_, sqlx::Error>(l)
        };
        let connected = tokio::select! {
            l = tokio::time::timeout(CONNECT_TIMEOUT, listener) => l,
            () = stop.cancelled() => return,
        };
        let lost = match connected {
            Ok(Ok(mut listener)) => {
                let since = Instant::now();
                // Anything committed while we were not listening.
                if let Some(last) = last_wake_all {
                    tokio::select! {
                        () = tokio::time::sleep_until(last + WAKE_ALL_INTERVAL) => {}
                        () = stop.cancelled() => return,
                    }
                }
                last_wake_all = Some(Instant::now());
                let _ = tx.send(Wake::All);
                let ended = listen_until_lost(&mut listener, &tx, &stop).await;
                if since.elapsed() >= LISTEN_STABLE {
                    backoff = LISTEN_BACKOFF;
                }
                match ended {
                    Ended::Stopped => return,
                    Ended::Lost(why) => why,
                }
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => "connecting timed out".to_string(),
        };
        tracing::warn!(error = %lost, retry_in_ms = backoff.as_millis() as u64,
            "not listening for new deliveries; dispatchers poll meanwhile");
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = stop.cancelled() => return,
        }
        backoff = (backoff * 2).min(MAX_LISTEN_BACKOFF);
    }
}

/// Passes notifications on until the connection fails (or stops answering a check) or
/// `stop`.
async fn listen_until_lost(
    listener: &mut PgListener,
    tx: &broadcast::Sender<Wake>,
    stop: &CancellationToken,
) -> Ended {
    let mut check = tokio::time::interval_at(
        Instant::now() + LISTEN_CHECK_INTERVAL,
        LISTEN_CHECK_INTERVAL,
    );
    loop {
        // `try_recv` is cancel-safe: a check (or the stop) never loses a notification.
        tokio::select! {
            n = listener.try_recv() => match n {
                Ok(Some(n)) => {
                    let _ = tx.send(Wake::Destination(n.payload().to_string()));
                }
                Ok(None) => return Ended::Lost("the connection was closed".into()),
                Err(e) => return Ended::Lost(e.to_string()),
            },
            _ = check.tick() => {
                let ping = sqlx::query("SELECT 1").execute(&mut *listener);
                match tokio::time::timeout(CONNECT_TIMEOUT, ping).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Ended::Lost(e.to_string()),
                    Err(_) => return Ended::Lost("the connection stopped answering".into()),
                }
            }
            () = stop.cancelled() => return Ended::Stopped,
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

/// A delivery from `id, event_id, attempts, received_at, payload[, claim_seq]`.
fn delivery_row(row: &PgRow, destination: &str) -> Result<Delivery, sqlx::Error> {
    Ok(Delivery {
        id: row.try_get(0)?,
        event_id: row.try_get(1)?,
        destination: destination.to_string(),
        attempts: row.try_get::<i32, _>(2)?.max(0) as u32,
        received_at_ms: row.try_get(3)?,
        body: Bytes::from(row.try_get::<String, _>(4)?),
        claim: if row.len() > 5 {
            Some(row.try_get(5)?)
        } else {
            None
        },
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

/// How far `at_ms` (the caller's clock) is from now on this process's clock: what the
/// statements add to the database's clock.
fn offset_from_now(at_ms: i64) -> i64 {
    at_ms - now_ms()
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[async_trait]
impl Store for PostgresStore {
    async fn insert_event(
        &self,
        event: &VerifiedEvent,
        destinations: &[&str],
    ) -> Result<(), StoreError> {
        let (done, written) = tokio::sync::oneshot::channel();
        let pending = PendingInsert {
            row: EventRow::new(event, destinations),
            done,
        };
        hand_over(&self.inserts, pending, written).await
    }

    async fn due(
        &self,
        destination: &str,
        now_ms: i64,
        limit: usize,
    ) -> Result<Vec<Delivery>, StoreError> {
        let mut c = self.conn().await?;
        let r = sqlx::query(
            "SELECT d.id, d.event_id, d.attempts, e.received_at, e.payload
             FROM deliveries d JOIN events e ON e.id = d.event_id
             WHERE d.destination = $1 AND d.state = 'pending'
               AND d.next_attempt_at <= (SELECT faceio_relay_now_ms()) + $2
             ORDER BY d.next_attempt_at -- the index's order: see `claim`
             LIMIT $3",
        )
        .bind(destination)
        .bind(offset_from_now(now_ms))
        .bind(limit as i64)
        .fetch_all(c.get())
        .await;
        let rows = c.finish(r)?;
        rows.iter()
            .map(|r| delivery_row(r, destination))
            .collect::<Result<_, _>>()
            .map_err(unavailable)
    }

    async fn claim(&self, request: ClaimRequest<'_>) -> Result<Vec<Delivery>, StoreError> {
        // Due on the database's clock. Rows under someone's live lease are not returned;
        // rows whose lease ran out are, if they are this process's or `take_over` says
        // another's may be taken; rows this process has under way never are (their lease
        // may have run out while they waited for the rate limit); rows another claim is
        // locking right now are skipped. Each claim gets a new `claim_seq`.
        let mut c = self.conn().await?;
        let r = sqlx::query(
            "WITH picked AS (
                 SELECT id FROM deliveries
                 WHERE destination = $1 AND state = 'pending'
                   AND next_attempt_at <= (SELECT faceio_relay_now_ms()) + $2
                   AND (lease_until IS NULL
                        OR (lease_until < (SELECT faceio_relay_now_ms())
                            AND ($6 OR claimed_by = $4)))
                   AND id <> ALL($7)
                 -- Exactly the order of `deliveries_due` (destination, next_attempt_at):
                 -- the scan stops after `$3` rows. With `, id` added PostgreSQL read and
                 -- sorted every due row at each claim, which made a claim's cost grow
                 -- with the backlog (27,000 rows read per claim of 128 in the benchmark).
                 -- Equal times come in the index's order (roughly insertion order).
                 ORDER BY next_attempt_at
                 LIMIT $3
                 FOR UPDATE SKIP LOCKED
             ), claimed AS (
                 UPDATE deliveries d SET claimed_by = $4, lease_until = faceio_relay_now_ms() + $5,
                     claim_seq = d.claim_seq + 1
                 FROM picked WHERE d.id = picked.id
                 RETURNING d.id, d.event_id, d.attempts, d.next_attempt_at, d.claim_seq
             )
             SELECT c.id, c.event_id, c.attempts, e.received_at, e.payload, c.claim_seq
             FROM claimed c JOIN events e ON e.id = c.event_id
             ORDER BY c.next_attempt_at, c.id",
        )
        .bind(request.destination)
        .bind(offset_from_now(request.now_ms))
        .bind(request.want as i64)
        .bind(&self.instance)
        .bind(millis(request.lease))
        .bind(request.take_over)
        .bind(request.in_flight)
        .fetch_all(c.get())
        .await;
        let rows = c.finish(r)?;
        rows.iter()
            .map(|r| delivery_row(r, request.destination))
            .collect::<Result<_, _>>()
            .map_err(unavailable)
    }

    async fn renew(&self, delivery: &Delivery, lease: Duration) -> Result<bool, StoreError> {
        let Some(seq) = delivery.claim else {
            return Ok(false); // never claimed here
        };
        let mut c = self.conn().await?;
        let r = sqlx::query(
            "UPDATE deliveries SET lease_until = faceio_relay_now_ms() + $4
             WHERE id = $1 AND state = 'pending' AND claimed_by = $2 AND claim_seq = $3",
        )
        .bind(delivery.id)
        .bind(&self.instance)
        .bind(seq)
        .bind(millis(lease))
        .execute(c.get())
        .await;
        Ok(c.finish(r)?.rows_affected() == 1)
    }

    async fn unclaim(&self, deliveries: &[Delivery]) -> Result<(), StoreError> {
        let (ids, seqs): (Vec<i64>, Vec<i64>) = deliveries
            .iter()
            .filter_map(|d| d.claim.map(|seq| (d.id, seq)))
            .unzip();
        if ids.is_empty() {
            return Ok(());
        }
        let mut c = self.conn().await?;
        let r = sqlx::query(
            "UPDATE deliveries d SET claimed_by = NULL, lease_until = NULL
             FROM unnest($1::bigint[], $2::bigint[]) AS mine(id, seq)
             WHERE d.id = mine.id AND d.claim_seq = mine.seq AND d.claimed_by = $3",
        )
        .bind(&ids)
        .bind(&seqs)
        .bind(&self.instance)
        .execute(c.get())
        .await;
        c.finish(r)?;
        Ok(())
    }

    async fn next_due_after(
        &self,
        destination: &str,
        after_ms: i64,
    ) -> Result<Option<i64>, StoreError> {
        // Asked and answered on the caller's clock, compared on the database's: the answer
        // is the database's "in how long", added to the caller's now.
        let now = now_ms();
        let mut c = self.conn().await?;
        let r = sqlx::query_scalar::<_, Option<i64>>(
            "SELECT MIN(next_attempt_at) - (SELECT faceio_relay_now_ms()) FROM deliveries
             WHERE destination = $1 AND state = 'pending'
               AND next_attempt_at > (SELECT faceio_relay_now_ms()) + $2",
        )
        .bind(destination)
        .bind(after_ms - now)
        .fetch_one(c.get())
        .await;
        Ok(c.finish(r)?.map(|in_ms| now + in_ms))
    }

    async fn record(&self, delivery: &Delivery, outcome: Outcome) -> Result<(), StoreError> {
        // Applies only while the row still carries this claim: a relay whose lease ran out
        // and whose row was claimed again (here or elsewhere) cannot overwrite that
        // claim's result, not even after it was recorded. `state = 'pending'` guards
        // against an operator's purge, as in SQLite. Written in groups, as events are.
        let Some(seq) = delivery.claim else {
            tracing::debug!(
                delivery = delivery.id,
                "outcome of an unclaimed delivery dropped"
            );
            return Ok(());
        };
        let (state, attempts, delay_ms, error) = match outcome {
            Outcome::Done { attempts } => ("done", attempts, 0, None),
            // The retry's delay is added by the database, to its own clock.
            Outcome::Retry {
                attempts,
                next_attempt_at_ms,
                error,
            } => (
                "pending",
                attempts,
                offset_from_now(next_attempt_at_ms),
                Some(error),
            ),
            Outcome::Dead { attempts, error } => ("dead", attempts, 0, Some(error)),
        };
        let (done, recorded) = tokio::sync::oneshot::channel();
        let pending = PendingOutcome {
            id: delivery.id,
            seq,
            state,
            attempts: attempts as i32,
            delay_ms,
            error,
            done,
        };
        hand_over(&self.outcomes, pending, recorded).await
    }

    async fn dead_letters(
        &self,
        destination: Option<&str>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        let mut c = self.conn().await?;
        let r = sqlx::query(AssertSqlSafe(format!(
            "SELECT {DEAD_LETTER_COLUMNS} FROM deliveries d JOIN events e ON e.id = d.event_id
             WHERE d.state = 'dead' AND ($1::text IS NULL OR d.destination = $1)
             ORDER BY d.updated_at DESC, d.id DESC LIMIT $2"
        )))
        .bind(destination)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(c.get())
        .await;
        let rows = c.finish(r)?;
        rows.iter()
            .map(dead_letter_row)
            .collect::<Result<_, _>>()
            .map_err(unavailable)
    }

    async fn dead_letter(&self, id: i64) -> Result<Option<(DeadLetter, Bytes)>, StoreError> {
        let mut c = self.conn().await?;
        let r = sqlx::query(AssertSqlSafe(format!(
            "SELECT {DEAD_LETTER_COLUMNS}, e.payload FROM deliveries d
             JOIN events e ON e.id = d.event_id WHERE d.state = 'dead' AND d.id = $1"
        )))
        .bind(id)
        .fetch_optional(c.get())
        .await;
        let row = c.finish(r)?;
        row.map(|r| {
            Ok::<_, sqlx::Error>((
                dead_letter_row(&r)?,
                Bytes::from(r.try_get::<String, _>(7)?),
            ))
        })
        .transpose()
        .map_err(unavailable)
    }

    async fn request_replay(&self, selection: &Selection, batch: &str) -> Result<u64, StoreError> {
        let mut c = self.conn().await?;
        let r = sqlx::query_scalar::<_, bool>("SELECT to_regclass('replay_requests') IS NOT NULL")
            .fetch_one(c.get())
            .await;
        if !c.finish(r)? {
            return Err(StoreError::Unavailable(
                "the relays on this database are older than this command: replay needs \
                 schema version 3, which a relay of this version applies when it starts"
                    .into(),
            ));
        }
        // The selection binds $1 when it has a parameter; the batch comes after it.
        let batch_param = if matches!(selection, Selection::All) {
            "$1"
        } else {
            "$2"
        };
        let sql = format!(
            "INSERT INTO replay_requests (delivery_id, batch, requested_at)
             SELECT id, {batch_param}, faceio_relay_now_ms() FROM deliveries WHERE {{filter}}
             ON CONFLICT (delivery_id) DO UPDATE SET batch = excluded.batch,
                 requested_at = excluded.requested_at, outcome = NULL,
                 destination = NULL, decided_at = NULL
             WHERE replay_requests.outcome IS NOT NULL"
        );
        let q = selection_query(&sql, selection).bind(batch.to_string());
        let mut c = self.conn().await?;
        let r = q.execute(c.get()).await;
        Ok(c.finish(r)?.rows_affected())
    }

    async fn replay_verdict(&self, batch: &str) -> Result<ReplayVerdict, StoreError> {
        let mut c = self.conn().await?;
        let r = sqlx::query(
            "SELECT outcome, coalesce(destination, ''), count(*) FROM replay_requests
             WHERE batch = $1 GROUP BY 1, 2 ORDER BY 2",
        )
        .bind(batch)
        .fetch_all(c.get())
        .await;
        let mut verdict = ReplayVerdict::default();
        for row in c.finish(r)? {
            verdict.add((
                row.get::<Option<String>, _>(0),
                row.get::<String, _>(1),
                row.get::<i64, _>(2) as u64,
            ));
        }
        Ok(verdict)
    }

    async fn forget_replay(&self, batch: &str) -> Result<(), StoreError> {
        let mut c = self.conn().await?;
        let r = sqlx::query("DELETE FROM replay_requests WHERE batch = $1 AND outcome IS NOT NULL")
            .bind(batch)
            .execute(c.get())
            .await;
        c.finish(r)?;
        Ok(())
    }

    async fn decide_replays(&self, running: &[&str]) -> Result<ReplayDecisions, StoreError> {
        // A destination is run when this relay's dispatchers run it or another relay's
        // announcement of it is live (this relay's own announcement may still name one a
        // reload just removed). Requests another relay is deciding now are skipped.
        let running: Vec<String> = running.iter().map(|k| k.to_string()).collect();
        let mut c = self.conn().await?;
        let r = sqlx::query(
            "WITH req AS (
                 SELECT r.delivery_id, d.destination, d.state FROM replay_requests r
                 LEFT JOIN deliveries d ON d.id = r.delivery_id
                 WHERE r.outcome IS NULL
                 FOR UPDATE OF r SKIP LOCKED
             ), verdict AS (
                 SELECT delivery_id, destination,
                     CASE WHEN state IS DISTINCT FROM 'dead' THEN 'gone'
                          WHEN destination = ANY($1) OR EXISTS (
                              SELECT 1 FROM relay_destinations a
                              WHERE a.destination = req.destination AND a.instance <> $2
                                AND a.alive_until > faceio_relay_now_ms()) THEN 'replayed'
                          ELSE 'refused' END AS outcome
                 FROM req
             ), replayed AS (
                 UPDATE deliveries d SET state = 'pending', attempts = 0,
                     next_attempt_at = faceio_relay_now_ms(), updated_at = faceio_relay_now_ms(),
                     claimed_by = NULL, lease_until = NULL
                 FROM verdict v
                 WHERE d.id = v.delivery_id AND v.outcome = 'replayed' AND d.state = 'dead'
                 RETURNING d.id
             ), refused AS (
                 UPDATE deliveries d SET last_error = $3 || d.destination || $4,
                     updated_at = faceio_relay_now_ms()
                 FROM verdict v
                 WHERE d.id = v.delivery_id AND v.outcome = 'refused' AND d.state = 'dead'
                 RETURNING d.id
             ), marked AS (
                 UPDATE replay_requests r SET outcome = v.outcome, destination = v.destination,
                     decided_at = faceio_relay_now_ms()
                 FROM verdict v WHERE r.delivery_id = v.delivery_id
             ), forgotten AS (
                 DELETE FROM replay_requests
                 WHERE outcome IS NOT NULL AND decided_at < faceio_relay_now_ms() - $5
             )
             SELECT outcome, destination, count(*) FROM verdict
             WHERE outcome <> 'gone' GROUP BY 1, 2 ORDER BY 2",
        )
        .bind(&running)
        .bind(&self.instance)
        .bind(REPLAY_REFUSED.0)
        .bind(REPLAY_REFUSED.1)
        .bind(millis(REPLAY_RECORD_TTL))
        .fetch_all(c.get())
        .await;
        let mut decided = ReplayDecisions::default();
        for row in c.finish(r)? {
            let group = (row.get::<String, _>(1), row.get::<i64, _>(2) as u64);
            if row.get::<String, _>(0) == "replayed" {
                decided.replayed.push(group);
            } else {
                decided.refused.push(group);
            }
        }
        if !decided.replayed.is_empty() {
            // Wake the relays that own them (as a new delivery does); a failure costs a poll.
            let names: Vec<&str> = decided.replayed.iter().map(|(d, _)| d.as_str()).collect();
            let mut c = self.conn().await?;
            let r = sqlx::query("SELECT pg_notify($1, dest) FROM unnest($2::text[]) AS dest")
                .bind(CHANNEL)
                .bind(&names)
                .execute(c.get())
                .await;
            if let Err(e) = c.finish(r) {
                tracing::debug!(error = %e, "cannot notify the other relays of replayed deliveries");
            }
        }
        Ok(decided)
    }

    async fn purge(&self, selection: &Selection) -> Result<u64, StoreError> {
        let q = selection_query("DELETE FROM deliveries WHERE {filter}", selection);
        let mut c = self.conn().await?;
        let r = q.execute(c.get()).await;
        Ok(c.finish(r)?.rows_affected())
    }

    async fn dead_letter_orphans(&self, known: &[&str]) -> Result<Vec<(String, u64)>, StoreError> {
        // Another relay may run a config with a destination this one lacks (a rolling
        // config change): its deliveries are not orphans while a relay other than this
        // one has announced it and the announcement has not expired, or while some
        // session holds its advisory lock (a relay of version 1, which does not
        // announce). The destinations with pending deliveries are found by skipping
        // through the index, one probe per destination, so the sweep stays cheap with a
        // large backlog.
        let known: Vec<String> = known.iter().map(|k| k.to_string()).collect();
        let mut c = self.conn().await?;
        let r = sqlx::query(
            "WITH RECURSIVE pending AS (
                 (SELECT destination FROM deliveries WHERE state = 'pending'
                  ORDER BY destination LIMIT 1)
                 UNION ALL
                 SELECT (SELECT d.destination FROM deliveries d
                         WHERE d.state = 'pending' AND d.destination > p.destination
                         ORDER BY d.destination LIMIT 1)
                 FROM pending p WHERE p.destination IS NOT NULL
             ), owned AS (
                 SELECT (classid::bigint << 32) | objid::bigint AS key FROM pg_locks
                 WHERE locktype = 'advisory' AND objsubid = 1 AND granted
                   AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
             ), orphans AS (
                 SELECT p.destination FROM pending p
                 WHERE p.destination IS NOT NULL AND p.destination <> ALL($1)
                   AND NOT EXISTS (
                       SELECT 1 FROM relay_destinations r
                       WHERE r.destination = p.destination AND r.instance <> $2
                         AND r.alive_until > faceio_relay_now_ms())
                   AND faceio_relay_destination_key(p.destination) NOT IN (SELECT key FROM owned)
             ), moved AS (
                 UPDATE deliveries SET state = 'dead', updated_at = faceio_relay_now_ms(),
                     claimed_by = NULL, lease_until = NULL,
                     last_error = 'destination ' || destination || ' is no longer in the config'
                 WHERE state = 'pending' AND destination IN (SELECT destination FROM orphans)
                 RETURNING destination
             )
             SELECT destination, count(*) FROM moved GROUP BY destination",
        )
        .bind(&known)
        .bind(&self.instance)
        .fetch_all(c.get())
        .await;
        Ok(c.finish(r)?
            .iter()
            .map(|row| (row.get::<String, _>(0), row.get::<i64, _>(1) as u64))
            .collect())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        // The admin connection is used rarely: after an outage it may be a dead one, which
        // fails one statement and is closed. One more try on a fresh connection tells a
        // dead connection from a dead server.
        match self.ping_once().await {
            Err(_) => self.ping_once().await,
            ok => ok,
        }
    }

    async fn destination_stats(&self) -> Result<Vec<DestinationStats>, StoreError> {
        // Both scans ride the partial indexes; the oldest pending delivery is the one with
        // the smallest id, whose event is then looked up once.
        let mut c = conn(&self.admin).await?;
        let r = sqlx::query(
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
        .fetch_all(c.get())
        .await;
        let rows = c.finish(r)?;
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
            let mut c = self.conn().await?;
            let r = sqlx::query(
                "DELETE FROM deliveries WHERE id IN (
                     SELECT id FROM deliveries WHERE state = 'done' AND updated_at < $1 LIMIT $2)",
            )
            .bind(cutoff_ms)
            .bind(PRUNE_CHUNK)
            .execute(c.get())
            .await;
            let deliveries = c.finish(r)?.rows_affected();
            let mut c = self.conn().await?;
            let r = sqlx::query(
                "DELETE FROM events WHERE id IN (
                     SELECT id FROM events WHERE received_at < $1
                     AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_id = events.id)
                     LIMIT $2)",
            )
            .bind(cutoff_ms)
            .bind(PRUNE_CHUNK)
            .execute(c.get())
            .await;
            let events = c.finish(r)?.rows_affected();
            total += deliveries + events;
            if deliveries + events == 0 {
                return Ok(total);
            }
        }
    }

    fn backend(&self) -> &'static str {
        "postgres"
    }

    fn shared(&self) -> bool {
        true
    }

    async fn announce(&self, destinations: &[&str], alive_for: Duration) -> Result<(), StoreError> {
        // This relay's rows are replaced (the destinations it no longer has go); rows of
        // relays gone long ago are deleted by whoever gets to them first.
        let destinations: Vec<String> = destinations.iter().map(|d| d.to_string()).collect();
        let mut c = self.conn().await?;
        let r = sqlx::query(
            "WITH gone AS (
                 DELETE FROM relay_destinations WHERE instance = $1 AND destination <> ALL($2)
             ), stale AS (
                 DELETE FROM relay_destinations WHERE (destination, instance) IN (
                     SELECT destination, instance FROM relay_destinations
                     WHERE instance <> $1 AND alive_until < faceio_relay_now_ms() - $4
                     FOR UPDATE SKIP LOCKED)
             )
             INSERT INTO relay_destinations (destination, instance, alive_until)
             SELECT DISTINCT dest, $1, faceio_relay_now_ms() + $3 FROM unnest($2::text[]) AS dest
             ON CONFLICT (destination, instance) DO UPDATE SET alive_until = excluded.alive_until",
        )
        .bind(&self.instance)
        .bind(&destinations)
        .bind(millis(alive_for))
        .bind(millis(ANNOUNCEMENT_RETENTION))
        .execute(c.get())
        .await;
        c.finish(r)?;
        Ok(())
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
        tokio::spawn(listen(
            self.options.clone(),
            tx.clone(),
            self.stop.child_token(),
        ));
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
