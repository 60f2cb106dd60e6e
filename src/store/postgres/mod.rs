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
//! A delivery for a destination this relay dispatches is claimed in that same statement
//! and handed to its dispatcher in memory once committed (see `handed.rs`): no
//! notification, no claim statement. The others are notified:
//! the wake-up notification is *not* part of the insert's transaction (a `NOTIFY`
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
//!
//! # Layout
//! - `conn.rs`: session settings, time limits, and the `Conn` that closes a hung
//!   connection instead of returning it.
//! - `migrations.rs`: the schema migrations and applying them on start.
//! - `locks.rs`: the lock connection and destination ownership.
//! - `handed.rs`: deliveries claimed as they are inserted, handed over in memory.
//! - `wakes.rs`: LISTEN/NOTIFY, both directions.
//! - `writers.rs`: the inserter and recorder tasks that write in groups.
//! - `queries.rs`: the [`Store`] implementation; `rows.rs`: reading its rows.
//!
//! [`Store::insert_event`]: super::Store::insert_event
//! [`Store::record`]: super::Store::record
//! [`Store::own`]: super::Store::own
//! [`Store::claim`]: super::Store::claim
//! [`Store::renew`]: super::Store::renew
//! [`Store::unclaim`]: super::Store::unclaim
//! [`Store::subscribe`]: super::Store::subscribe
//! [`Ownership`]: super::Ownership
//! [`Store`]: super::Store

mod conn;
mod handed;
mod locks;
mod migrations;
mod queries;
mod rows;
mod wakes;
mod writers;

use std::sync::Arc;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use tokio::sync::{Mutex, broadcast};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::conn::{ACQUIRE_TIMEOUT, Conn, SESSION_OPTIONS, conn, open_err, set_synchronous_commit};
use self::handed::Handed;
use self::locks::Locks;
use self::wakes::{Notices, send_notices};
use self::writers::{
    INSERT_QUEUE, Inserter, PendingInsert, PendingOutcome, insert_events, record_outcomes,
};
use super::{StoreError, Wake};
use crate::config::PostgresConfig;
use crate::event::now_ms;

pub use self::locks::LOCK_CHECK_INTERVAL;
pub use self::writers::MAX_INSERT_BATCH;

/// PostgreSQL-backed [`Store`](super::Store).
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
    /// Deliveries claimed as they were inserted, for this relay's dispatchers.
    handed: Arc<Handed>,
    /// Destinations to notify the relays of (sent by a background task).
    notices: Arc<Notices>,
    /// Claims being given back in the background (waited for by `close`).
    give_backs: TaskTracker,
    /// New-delivery notifications from the listening connection; started on the first
    /// [`Store::subscribe`](super::Store::subscribe).
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

impl PostgresStore {
    /// Connects, applies the migrations and returns the store for the daemon.
    pub async fn open(config: &PostgresConfig) -> Result<Self, StoreError> {
        let store = Self::connect(config).await?;
        migrations::apply(&store.pool).await?;
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
        let instance = uuid::Uuid::now_v7().simple().to_string();
        let handed = Arc::new(Handed::default());
        let give_backs = TaskTracker::new();
        for _ in 0..(config.pool_size / 2).clamp(1, 4) {
            let inserter = Inserter {
                pool: pool.clone(),
                instance: instance.clone(),
                notices: Arc::clone(&notices),
                handed: Arc::clone(&handed),
                give_backs: give_backs.clone(),
            };
            tokio::spawn(insert_events(
                inserter,
                Arc::clone(&queue),
                stop.child_token(),
            ));
        }
        // Outcomes: one recorder, one connection at a time (they are small and unsynced).
        let (outcomes, queue) = tokio::sync::mpsc::channel(INSERT_QUEUE);
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
            locks: Arc::new(Locks::new(options.clone(), stop.child_token())),
            handed,
            notices,
            give_backs,
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
