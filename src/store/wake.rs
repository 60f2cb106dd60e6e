//! "New work is pending": how the paths that commit deliveries tell the dispatchers.
//!
//! One receiver, [`Wakers`], for every path: ingress, after its group commit, wakes the
//! dispatchers of the event's destinations in this process
//! ([`Wakers::destination`]); a `dead-letters replay` decided here does the same; a shared
//! store ([`super::Store::subscribe`]) passes on what the other relays committed
//! (PostgreSQL `LISTEN`) as [`Wake`] notices ([`Wakers::notice`]). A wake is only a hint to look at the store now: a lost one
//! costs at most a poll interval, never an event (dispatchers also poll).

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::Notify;

/// A reason to look at the store now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wake {
    /// A delivery for this destination was committed.
    Destination(String),
    /// Notifications may have been missed (a lost connection): look at every destination.
    All,
}

/// The running dispatchers' wake-up handles, by destination name (replaced as a whole
/// when a reload changes the dispatchers).
#[derive(Clone, Default)]
pub struct Wakers {
    by_destination: Arc<HashMap<String, Arc<Notify>>>,
}

impl Wakers {
    pub fn new(handles: impl IntoIterator<Item = (String, Arc<Notify>)>) -> Self {
        Self {
            by_destination: Arc::new(handles.into_iter().collect()),
        }
    }

    /// Wakes `destination`'s dispatcher (a no-op for unknown names).
    pub fn destination(&self, destination: &str) {
        if let Some(n) = self.by_destination.get(destination) {
            n.notify_one();
        }
    }

    /// Wakes every dispatcher.
    pub fn all(&self) {
        for n in self.by_destination.values() {
            n.notify_one();
        }
    }

    /// Acts on a notice.
    pub fn notice(&self, wake: &Wake) {
        match wake {
            Wake::Destination(name) => self.destination(name),
            Wake::All => self.all(),
        }
    }
}
