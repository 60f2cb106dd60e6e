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
//!
//! Backends implement [`Store`]; [`sqlite`] is the default.

pub mod sqlite;

use async_trait::async_trait;
use bytes::Bytes;
use serde::Serialize;

use crate::ingress::VerifiedEvent;

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

    /// Records an attempt's outcome (committed, not synced).
    async fn record(&self, delivery_id: i64, outcome: Outcome) -> Result<(), StoreError>;

    /// Dead letters, newest first, optionally for one destination.
    async fn dead_letters(
        &self,
        destination: Option<&str>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, StoreError>;

    /// One dead letter with the event body.
    async fn dead_letter(&self, id: i64) -> Result<Option<(DeadLetter, Bytes)>, StoreError>;

    /// Makes the selected dead letters pending again, due now, with attempts reset.
    /// Returns how many were replayed.
    async fn replay(&self, selection: &Selection) -> Result<u64, StoreError>;

    /// Deletes the selected dead letters. Returns how many.
    async fn purge(&self, selection: &Selection) -> Result<u64, StoreError>;

    /// Moves every pending delivery for a destination that no longer exists to the
    /// dead-letter store, so nothing waits forever for a worker. Returns how many.
    async fn dead_letter_orphans(&self, known: &[&str]) -> Result<u64, StoreError>;

    /// Proves the store takes durable writes now (a synced write of a heartbeat row).
    async fn ping(&self) -> Result<(), StoreError>;

    /// Pending and dead counts per destination that has any.
    async fn destination_stats(&self) -> Result<Vec<DestinationStats>, StoreError>;

    /// Deletes `done` deliveries and fully delivered events older than `cutoff_ms`.
    async fn prune(&self, cutoff_ms: i64) -> Result<u64, StoreError>;
}
