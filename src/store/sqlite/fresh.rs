//! The in-memory hand-off: deliveries this process committed, per destination, kept for
//! its dispatcher to take ([`Store::take_fresh`]) instead of reading them back from the
//! database.
//!
//! A destination is *tracked* from the moment its dispatcher reads the store
//! ([`Store::claim`] empties and starts its queue just before the read): from then on
//! the writer thread appends every delivery for it that commits, after the commit and
//! before the inserter hears of it. So the read and the queue together hold every
//! delivery committed since (a delivery that commits while the read runs may be in
//! both: the dispatcher skips what the read returned). The dispatcher decides when that
//! is everything due ([`crate::delivery`]); the store is the truth and is read again
//! whenever a queue is not tracked.
//!
//! A queue stops being tracked, and is emptied, when it would grow past [`MAX_FRESH`]
//! (its dispatcher has fallen behind; the store holds everything), and when replays or
//! an orphan sweep change the destination's rows in the store.
//!
//! [`Store::take_fresh`]: crate::store::Store::take_fresh
//! [`Store::claim`]: crate::store::Store::claim

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use tokio::time::Instant;

use crate::store::Delivery;

/// Most deliveries held per destination; past it the dispatcher reads the store.
pub(super) const MAX_FRESH: usize = 4096;

/// Tracked destinations and their committed, not yet taken deliveries.
#[derive(Default)]
pub(super) struct Fresh {
    by_destination: Mutex<HashMap<String, VecDeque<Delivery>>>,
}

impl Fresh {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, VecDeque<Delivery>>> {
        self.by_destination
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Starts tracking `destination` with an empty queue (call just before reading it).
    pub fn track(&self, destination: &str) {
        let mut by_destination = self.lock();
        match by_destination.get_mut(destination) {
            Some(q) => q.clear(),
            None => {
                by_destination.insert(destination.to_string(), VecDeque::new());
            }
        }
    }

    /// Stops tracking `destination`: its dispatcher reads the store next time.
    pub fn untrack(&self, destination: &str) {
        self.lock().remove(destination);
    }

    /// Up to `max` deliveries for `destination`, oldest first, each with now as the
    /// moment its claim was asked for (this store claims nothing); `None` if it is not
    /// tracked (read the store).
    pub fn take(&self, destination: &str, max: usize) -> Option<Vec<(Delivery, Instant)>> {
        let now = Instant::now();
        let mut by_destination = self.lock();
        let q = by_destination.get_mut(destination)?;
        let n = q.len().min(max);
        Some(q.drain(..n).map(|d| (d, now)).collect())
    }

    /// Appends committed deliveries to the queues of tracked destinations.
    pub fn push(&self, committed: Vec<Delivery>) {
        if committed.is_empty() {
            return;
        }
        let mut by_destination = self.lock();
        for d in committed {
            let Some(q) = by_destination.get_mut(&d.destination) else {
                continue;
            };
            if q.len() >= MAX_FRESH {
                by_destination.remove(&d.destination);
            } else {
                q.push_back(d);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(id: i64, destination: &str) -> Delivery {
        Delivery::fixture(id, destination)
    }

    #[test]
    fn only_tracked_destinations_collect_and_a_full_queue_stops_tracking() {
        let fresh = Fresh::default();
        fresh.push(vec![delivery(1, "a")]);
        assert!(fresh.take("a", 10).is_none(), "not tracked: read the store");
        fresh.track("a");
        fresh.push(vec![delivery(2, "a"), delivery(3, "b"), delivery(4, "a")]);
        let ids: Vec<i64> = fresh
            .take("a", 10)
            .unwrap()
            .iter()
            .map(|(d, _)| d.id)
            .collect();
        assert_eq!(ids, [2, 4], "in commit order, only a's");
        assert!(fresh.take("a", 10).unwrap().is_empty());

        fresh.push(
            (0..MAX_FRESH as i64 + 1)
                .map(|i| delivery(i, "a"))
                .collect(),
        );
        assert!(
            fresh.take("a", 10).is_none(),
            "past MAX_FRESH the queue is dropped and the store read again"
        );
    }
}
