//! The durable store: events, their deliveries, and the dead-letter store.
//!
//! # Invariants
//! - **An event is durable before it is answered.** [`Store::insert_event`] returns `Ok`
//!   only after the event *and one pending delivery per target destination* are committed
//!   in one transaction and synced to stable storage (`fdatasync` of the WAL). Ingress
//!   answers 200 only after that; any error or a timeout becomes 503.
//! - **A delivery is never deleted without an outcome.** A delivery row is `pending` until a
//!   worker records `done` or `dead`; a retry only moves its `next_attempt_at`. Rows in
//!   `done` are pruned after the retention period; `dead` rows stay until an operator
//!   purges them.
//! - **Outcomes need not be synced.** Recording `done`/retry/`dead` is committed but not
//!   forced to disk: a power cut can lose the mark, which at worst delivers once more
//!   (at-least-once allows duplicates, never losses).
//! - **One daemon per store.** The SQLite backend holds an exclusive lock file while the
//!   daemon runs, so two daemons cannot deliver the same rows. The `dead-letters` commands
//!   open the same database without that lock; SQLite's own locking keeps them safe.
//! - **One dispatcher per destination in the whole cluster.** A dispatcher dispatches only
//!   while it holds its destination's [`Ownership`] ([`Store::own`]). For SQLite that is
//!   immediate and never lost (one daemon per store). The [`postgres`] backend, shared by
//!   several relays, grants it to one relay at a time and takes it back when that relay's
//!   session ends; so the dispatcher's claims, rate limit and `Retry-After` pause hold for
//!   the cluster.
//! - **A delivery is attempted by at most one live process.** Besides ownership, shared
//!   backends claim rows under a lease ([`Store::claim`]) and the dispatcher re-checks
//!   its claim ([`Store::renew`]) before any attempt that starts more than a second after
//!   the claim was asked for (the lease of a younger claim still covers the attempt), so
//!   even while ownership moves from one relay to another no row is attempted by two
//!   relays at once.
//!
//! Backends implement [`Store`]; [`sqlite`] is the default, [`postgres`] the shared one.

pub mod postgres;
mod shared;
pub mod sqlite;
mod wake;

pub use wake::{Wake, Wakers};

pub use self::shared::{ORPHANED, orphaned_reason};

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde::Serialize;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::config::{StoreBackend, StoreConfig};
use crate::event::VerifiedEvent;

/// The columns of one event insert and its destinations, owned so the insert can cross
/// threads (SQLite's writer) and tasks (PostgreSQL's inserters).
pub(crate) struct EventRow {
    pub id: String,
    pub received_at: i64,
    pub app_id: String,
    pub event_name: String,
    pub facial_id: String,
    pub client_ip: String,
    /// The body exactly as FACEIO sent it (valid UTF-8: `verify` checked).
    pub body: Bytes,
    pub destinations: Vec<String>,
}

impl EventRow {
    pub fn new(event: &VerifiedEvent, destinations: &[&str]) -> Self {
        let p = event.payload();
        Self {
            id: event.id().to_string(),
            received_at: event.received_at_ms(),
            app_id: p.app_id.clone(),
            event_name: p.event_name.clone(),
            facial_id: p.facial_id.clone(),
            client_ip: p.client_ip.clone(),
            body: event.body().clone(),
            destinations: destinations.iter().map(|d| d.to_string()).collect(),
        }
    }
}

/// What can go wrong talking to the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store cannot take writes right now (disk full, I/O error, locked too long).
    /// Ingress answers 503; the daemon keeps running and tries again.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The store's writer has stopped (shutdown).
    #[error("store is closed")]
    Closed,
    /// Opening or migrating the database failed.
    #[error("cannot open store {path}: {reason}")]
    Open { path: String, reason: String },
    /// The store is already used by another running daemon.
    #[error("store {path} is in use by another faceio-relay process (lock {lock} is held)")]
    Locked { path: String, lock: String },
}

/// The right to dispatch one destination, held until dropped. See the module invariants.
///
/// Dropping it gives the destination up (a shared backend lets another relay take it).
pub struct Ownership {
    /// Cancelled when the backend can no longer vouch for the ownership (its connection
    /// ended); the dispatcher then stops and asks again.
    lost: CancellationToken,
    /// Runs on drop: gives the destination back.
    release: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl Ownership {
    /// Ownership that is never lost and needs no release (a store used by one daemon).
    pub fn exclusive() -> Self {
        Self {
            lost: CancellationToken::new(),
            release: None,
        }
    }

    /// Ownership that ends when `lost` is cancelled; `release` runs on drop.
    pub fn new(lost: CancellationToken, release: impl FnOnce() + Send + Sync + 'static) -> Self {
        Self {
            lost,
            release: Some(Box::new(release)),
        }
    }

    /// Completes when the ownership is lost.
    pub async fn lost(&self) {
        self.lost.cancelled().await
    }

    /// Whether the ownership is lost.
    pub fn is_lost(&self) -> bool {
        self.lost.is_cancelled()
    }

    /// A token cancelled when the ownership is lost, for attempts that outlive a borrow
    /// of the ownership (they must stop before renewing a claim once it is lost).
    pub fn lost_token(&self) -> CancellationToken {
        self.lost.clone()
    }

    /// The same ownership, running `first` on drop before its own release.
    pub(crate) fn on_release(mut self, first: impl FnOnce() + Send + Sync + 'static) -> Self {
        let then = self.release.take();
        self.release = Some(Box::new(move || {
            first();
            if let Some(then) = then {
                then();
            }
        }));
        self
    }
}

impl Drop for Ownership {
    fn drop(&mut self) {
        if let Some(release) = self.release.take() {
            release();
        }
    }
}

impl std::fmt::Debug for Ownership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ownership")
            .field("lost", &self.is_lost())
            .finish()
    }
}

/// One delivery a worker can attempt.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Delivery row ID (also the dead-letter ID).
    pub id: i64,
    /// The event's ID.
    pub event_id: String,
    /// Destination name.
    pub destination: String,
    /// Attempts made so far (0 before the first).
    pub attempts: u32,
    /// When the event arrived, Unix ms.
    pub received_at_ms: i64,
    /// The original FACEIO body.
    pub body: Bytes,
    /// The claim's token in a shared store (`deliveries.claim_seq`, bumped by every
    /// claim): [`Store::renew`], [`Store::unclaim`] and [`Store::record`] act only while
    /// the row still carries it, so a stale attempt never touches a newer claim. `None`
    /// in a store used by one daemon, which ignores it.
    pub claim: Option<i64>,
}

#[cfg(test)]
impl Delivery {
    /// A fresh delivery `id` of an empty event for `destination`, claimed by nobody.
    pub(crate) fn fixture(id: i64, destination: &str) -> Self {
        Self {
            id,
            event_id: format!("e{id}"),
            destination: destination.into(),
            attempts: 0,
            received_at_ms: 0,
            body: Bytes::from_static(b"{}"),
            claim: None,
        }
    }
}

/// What [`Store::claim`] is asked for.
#[derive(Debug, Clone, Copy)]
pub struct ClaimRequest<'a> {
    pub destination: &'a str,
    /// "Now" on the caller's clock: deliveries due by then are returned. A shared store
    /// judges this on the database's clock (it only uses the caller's offset from its own
    /// now), so a relay whose clock is off neither delays nor hurries deliveries.
    pub now_ms: i64,
    /// Most deliveries to return.
    pub want: usize,
    /// Deliveries this process has under way: never returned (a shared store would
    /// otherwise take a row back from an attempt whose lease ran out while it waited).
    pub in_flight: &'a [i64],
    /// How long the claim lasts.
    pub lease: Duration,
    /// Whether rows another process claimed (and whose lease ran out) may be taken.
    /// False during the first lease after taking ownership of the destination: the old
    /// owner may still be finishing attempts whose lease looks over on the database's
    /// clock but not on its own.
    pub take_over: bool,
}

/// The result of one attempt, as recorded.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Delivered; nothing more to do.
    Done { attempts: u32 },
    /// Failed, try again at `next_attempt_at_ms`.
    Retry {
        attempts: u32,
        next_attempt_at_ms: i64,
        error: String,
    },
    /// Failed for good: moved to the dead-letter store.
    Dead { attempts: u32, error: String },
}

/// A failed delivery in the dead-letter store.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DeadLetter {
    /// Dead-letter ID (the delivery's ID); what `show`, `replay` and `purge` take.
    pub id: i64,
    pub event_id: String,
    pub destination: String,
    pub attempts: u32,
    pub last_error: String,
    /// When it was dead-lettered, RFC 3339.
    pub failed_at: String,
    /// The event's name, for a readable listing.
    pub event_name: String,
}

/// What the relays decided about one `dead-letters replay` ([`Store::replay_verdict`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReplayVerdict {
    /// Requests no relay has decided yet.
    pub undecided: u64,
    /// Queued for delivery again, per destination.
    pub replayed: Vec<(String, u64)>,
    /// Refused (still dead letters, with [`replay_refused_reason`]), per destination.
    pub refused: Vec<(String, u64)>,
    /// No longer dead letters when a relay looked (purged or replayed meanwhile).
    pub gone: u64,
}

impl ReplayVerdict {
    /// Adds one `(outcome, destination, count)` group as the stores read it (`None`:
    /// undecided).
    pub(crate) fn add(&mut self, (outcome, destination, n): (Option<String>, String, u64)) {
        match outcome.as_deref() {
            None => self.undecided += n,
            Some("replayed") => self.replayed.push((destination, n)),
            Some("refused") => self.refused.push((destination, n)),
            _ => self.gone += n,
        }
    }
}

/// What one [`Store::decide_replays`] did, per destination.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReplayDecisions {
    pub replayed: Vec<(String, u64)>,
    pub refused: Vec<(String, u64)>,
}

/// Decided replay requests nobody collected (the asking command was interrupted) are
/// deleted after this long.
pub const REPLAY_RECORD_TTL: Duration = Duration::from_secs(3600);

/// The text around the destination's name in a refused replay's `last_error`, kept in
/// two parts so the stores can build it in SQL for many rows at once.
pub const REPLAY_REFUSED: (&str, &str) = (
    "replay refused: no running relay has destination ",
    " in its config (add it and reload, then replay again; or purge these dead letters)",
);

/// The `last_error` of a dead letter whose replay a relay refused.
pub fn replay_refused_reason(destination: &str) -> String {
    format!("{}{destination}{}", REPLAY_REFUSED.0, REPLAY_REFUSED.1)
}

/// Backlog figures for one destination (metrics and `STATUS=`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DestinationStats {
    pub destination: String,
    /// Pending deliveries (due now or scheduled for a retry).
    pub pending: u64,
    /// Arrival time of the oldest pending delivery's event, Unix ms.
    pub oldest_pending_ms: Option<i64>,
    /// Dead letters.
    pub dead: u64,
}

/// Which dead letters a command acts on.
#[derive(Debug, Clone, PartialEq)]
pub enum Selection {
    Ids(Vec<i64>),
    All,
    Destination(String),
}

/// A backend for events and deliveries.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Stores the event and one pending delivery per destination, durably, in one
    /// transaction. See the module invariants.
    async fn insert_event(
        &self,
        event: &VerifiedEvent,
        destinations: &[&str],
    ) -> Result<(), StoreError>;

    /// Pending deliveries for `destination` due at `now_ms`, oldest first.
    async fn due(
        &self,
        destination: &str,
        now_ms: i64,
        limit: usize,
    ) -> Result<Vec<Delivery>, StoreError>;

    /// The earliest time after `after_ms` at which a pending delivery for `destination`
    /// falls due, if any. (Deliveries due at or before `after_ms` are either being
    /// attempted or were just read, so the dispatcher asks about the future only.)
    async fn next_due_after(
        &self,
        destination: &str,
        after_ms: i64,
    ) -> Result<Option<i64>, StoreError>;

    /// Records an attempt's outcome (committed, not synced). In a shared store it applies
    /// only while `delivery`'s claim ([`Delivery::claim`]) is still this process's:
    /// a late outcome never overwrites the result of a newer claim.
    async fn record(&self, delivery: &Delivery, outcome: Outcome) -> Result<(), StoreError>;

    /// Dead letters, newest first, optionally for one destination.
    async fn dead_letters(
        &self,
        destination: Option<&str>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, StoreError>;

    /// One dead letter with the event body.
    async fn dead_letter(&self, id: i64) -> Result<Option<(DeadLetter, Bytes)>, StoreError>;

    /// Asks the running relays to replay the selected dead letters (`dead-letters
    /// replay`): records one request per dead letter under `batch` and changes nothing
    /// else. A relay decides each request ([`Store::decide_replays`]). Returns how many
    /// were requested.
    async fn request_replay(&self, selection: &Selection, batch: &str) -> Result<u64, StoreError>;

    /// What the relays decided so far about the requests of `batch`.
    async fn replay_verdict(&self, batch: &str) -> Result<ReplayVerdict, StoreError>;

    /// Deletes the decided requests of `batch` (the asker has read them). Undecided ones
    /// stay, for a relay to decide when it runs.
    async fn forget_replay(&self, batch: &str) -> Result<(), StoreError>;

    /// Decides every undecided replay request, in the daemon: a dead letter of a
    /// destination in `running` (the dispatchers this process runs now) or, in a shared
    /// store, one another live relay has announced, becomes pending again, due now, with
    /// attempts reset; any other stays a dead letter with the reason
    /// [`replay_refused_reason`]. Returns how many of each, per destination.
    async fn decide_replays(&self, running: &[&str]) -> Result<ReplayDecisions, StoreError>;

    /// Deletes the selected dead letters. Returns how many.
    async fn purge(&self, selection: &Selection) -> Result<u64, StoreError>;

    /// Moves every pending delivery for a destination that no longer exists to the
    /// dead-letter store, so nothing waits forever for a worker. Returns how many, per
    /// destination (only those with any). A shared store leaves alone destinations
    /// another live process has announced ([`Store::announce`]) or dispatches.
    async fn dead_letter_orphans(&self, known: &[&str]) -> Result<Vec<(String, u64)>, StoreError>;

    /// Proves the store takes durable writes now (a synced write of a heartbeat row).
    async fn ping(&self) -> Result<(), StoreError>;

    /// Pending and dead counts per destination that has any.
    async fn destination_stats(&self) -> Result<Vec<DestinationStats>, StoreError>;

    /// Deletes `done` deliveries and fully delivered events older than `cutoff_ms`.
    async fn prune(&self, cutoff_ms: i64) -> Result<u64, StoreError>;

    /// The backend's name for logs and `check`: `sqlite` or `postgres`.
    fn backend(&self) -> &'static str;

    /// Asks for the right to dispatch `destination`: `Some` once granted, `None` while
    /// another process holds it (ask again later). The default suits a store used by one
    /// daemon: granted at once, never lost.
    async fn own(&self, _destination: &str) -> Result<Option<Ownership>, StoreError> {
        Ok(Some(Ownership::exclusive()))
    }

    /// Up to `want` due deliveries, oldest first, never one of `in_flight` once the
    /// caller has skipped its own. A shared store claims them for this process for
    /// `lease`: no `claim` (in any process) returns them again until the lease runs out
    /// or their outcome is recorded. See [`ClaimRequest`]. The default suits a store used
    /// by one daemon (one process, one dispatcher per destination): it reads like
    /// [`Store::due`], `want` rows plus as many as are in flight (the caller skips its
    /// own), and claims nothing in the store.
    async fn claim(&self, request: ClaimRequest<'_>) -> Result<Vec<Delivery>, StoreError> {
        self.due(
            request.destination,
            request.now_ms,
            request.want + request.in_flight.len(),
        )
        .await
    }

    /// Whether [`Store::take_fresh`] hands this process's committed deliveries over in
    /// memory. Then every delivery that can fall due without a write of this process is
    /// known to the dispatcher: fresh ones are handed over, retries it records itself,
    /// and anything else (replays, orphan sweeps, a full hand-off queue, and in a shared
    /// store another process's insert, as its notification arrives) stops the hand-off
    /// until the next [`Store::claim`]. False by default; a shared store only while it
    /// listens for the other processes' notifications.
    fn hands_off(&self) -> bool {
        false
    }

    /// Deliveries for `destination` committed by this process since its last
    /// [`Store::claim`] began (at most `max`, in commit order), taken over so they need
    /// not be read back, each with the moment its claim was asked for (a shared store
    /// claims them as it inserts them; a store used by one daemon claims nothing: now);
    /// `None` when they are not all held (read the store). A delivery that committed
    /// while that claim ran may be in both. Only for stores that [`Store::hands_off`].
    fn take_fresh(
        &self,
        _destination: &str,
        _max: usize,
    ) -> Option<Vec<(Delivery, tokio::time::Instant)>> {
        None
    }

    /// A shared store's deliveries for `destination` that this process claimed as it
    /// committed them and has not handed over (at most `max`, in commit order), whether
    /// or not [`Store::take_fresh`] would say the hand-off holds everything: a claim
    /// read of the store does not return them (their lease is live), so the dispatcher
    /// takes them after each read. Empty for a store that claims nothing.
    fn take_claimed(
        &self,
        _destination: &str,
        _max: usize,
    ) -> Vec<(Delivery, tokio::time::Instant)> {
        Vec::new()
    }

    /// Just before an attempt: extends this process's claim on `delivery` to `lease`
    /// from now. `false` if the claim was lost (another claim took the row after its
    /// lease ran out, or it is no longer pending): the attempt must not start.
    async fn renew(&self, _delivery: &Delivery, _lease: Duration) -> Result<bool, StoreError> {
        Ok(true)
    }

    /// Gives up this process's claims on deliveries that will not be attempted now, so
    /// other processes need not wait for their lease. A claim that is no longer the one
    /// `Delivery::claim` names is left alone.
    async fn unclaim(&self, _deliveries: &[Delivery]) -> Result<(), StoreError> {
        Ok(())
    }

    /// Whether other processes share the store (they then need [`Store::announce`] and a
    /// periodic orphan sweep). False for a store used by one daemon.
    fn shared(&self) -> bool {
        false
    }

    /// Tells the other processes sharing the store that this one has `destinations`
    /// configured, for `alive_for` from now: [`Store::dead_letter_orphans`] in any
    /// process leaves their deliveries alone meanwhile. Called at start, before a reload
    /// and periodically. A no-op for a store used by one daemon.
    async fn announce(
        &self,
        _destinations: &[&str],
        _alive_for: Duration,
    ) -> Result<(), StoreError> {
        Ok(())
    }

    /// Destinations that got a new delivery in any process sharing the store, as the
    /// deliveries commit, so the dispatcher here can start at once. `None` when no other
    /// process writes the store (ingress wakes its own dispatchers). A lagging receiver
    /// should wake every dispatcher.
    fn subscribe(&self) -> Option<broadcast::Receiver<Wake>> {
        None
    }

    /// Ends background work and gives back what this process holds (destination
    /// ownership), at the end of shutdown. Nothing pending is affected.
    async fn close(&self) {}
}

/// Opens the configured store for the daemon.
pub async fn open(config: &StoreConfig) -> Result<Arc<dyn Store>, StoreError> {
    Ok(match &config.backend {
        StoreBackend::Sqlite => {
            let path = config.path.clone();
            Arc::new(
                tokio::task::spawn_blocking(move || sqlite::SqliteStore::open(&path))
                    .await
                    .map_err(|_| StoreError::Closed)??,
            )
        }
        StoreBackend::Postgres(pg) => Arc::new(postgres::PostgresStore::open(pg).await?),
    })
}

/// Opens the configured store for the `dead-letters` commands, beside a running daemon.
pub async fn open_admin(config: &StoreConfig) -> Result<Arc<dyn Store>, StoreError> {
    Ok(match &config.backend {
        StoreBackend::Sqlite => {
            let path = config.path.clone();
            Arc::new(
                tokio::task::spawn_blocking(move || sqlite::SqliteStore::open_admin(&path))
                    .await
                    .map_err(|_| StoreError::Closed)??,
            )
        }
        StoreBackend::Postgres(pg) => Arc::new(postgres::PostgresStore::open_admin(pg).await?),
    })
}

/// How logs name the configured store: the SQLite path, or `postgres` (never its URL).
pub fn describe(config: &StoreConfig) -> String {
    match &config.backend {
        StoreBackend::Sqlite => config.path.display().to_string(),
        StoreBackend::Postgres(_) => "postgres".into(),
    }
}
