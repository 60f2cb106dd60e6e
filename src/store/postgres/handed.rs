//! The in-memory hand-off of the shared store: deliveries this relay commits for a
//! destination it dispatches are claimed for it in the insert's own transaction and
//! handed to its dispatcher in memory ([`Store::take_fresh`], [`Store::take_claimed`]),
//! instead of a notification, a wake-up and a claim statement per group.
//!
//! # When a delivery is claimed as it is inserted
//! Only while this relay owns the destination ([`Store::own`]: an entry's `owner`) and
//! its dispatcher has read the store since (which gives the lease, [`Handed::track`]),
//! and only while fewer than its prefetch wait in its queue (a relay that dies leaves no
//! more waiting for their lease than one claim statement would have). The claim is the one a claim
//! statement would make (this process's ID, a lease from the database's clock, the first
//! `claim_seq`), committed and flushed with the event: a claim read of the store never
//! returns the row while that lease runs, a renewal checks it, and another relay that
//! takes the destination over leaves it alone until the lease ends, as for any claim.
//! The moment the insert was sent is kept with each delivery as the moment its claim was
//! asked for (the dispatcher renews a claim older than a second before attempting it).
//!
//! When the ownership ends ([`Handed::disown`], on the ownership's drop), the deliveries
//! still waiting are taken out and their claims given back; one whose insert commits
//! after that is given back by its inserter. Either way the destination's next owner
//! (here or at another relay) finds it unclaimed, and is woken.
//!
//! # When the hand-off holds everything
//! `complete` is set when the dispatcher reads the store ([`Handed::track`], just before
//! the read) and cleared by anything that makes due deliveries appear in the store
//! without passing through this queue: a notification from another relay (the listener
//! clears it before passing the wake-up on), a lost listening connection, a replay
//! decided here, a delivery not claimed for want of room, a claim given back. While it
//! is clear [`Store::take_fresh`] says "read the store"; the claimed deliveries are still
//! handed over, after that read ([`Store::take_claimed`]).
//!
//! [`Store::take_fresh`]: crate::store::Store::take_fresh
//! [`Store::take_claimed`]: crate::store::Store::take_claimed
//! [`Store::own`]: crate::store::Store::own

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::store::Delivery;

/// Most claimed deliveries waiting per destination when the dispatcher names no smaller
/// bound (its prefetch, [`Handed::track`]); past it new ones are left unclaimed in the
/// store.
pub(super) const MAX_FRESH: usize = 4096;

/// One destination's hand-off.
#[derive(Default)]
struct Entry {
    /// The ownership this relay holds of the destination (an ID per [`Handed::own`]).
    owner: Option<u64>,
    /// The lease its dispatcher claims for; set by its first read of the store.
    lease: Option<Duration>,
    /// Most deliveries claimed and waiting: the dispatcher's prefetch, so no more are
    /// claimed ahead than one read of the store would claim (a relay that dies leaves
    /// no more than that waiting for a lease, and a destination that falls behind leaves
    /// the rest unclaimed for whoever dispatches it).
    max: usize,
    /// The last read of the store and this queue hold every due delivery.
    complete: bool,
    /// Claimed, committed, not yet taken: each with the moment its claim was asked for.
    queue: VecDeque<(Delivery, Instant)>,
    /// Inserts under way that may add to `queue` (room kept for them).
    reserved: usize,
}

/// Every destination's hand-off.
#[derive(Default)]
pub(super) struct Handed {
    by_destination: Mutex<HashMap<String, Entry>>,
    next_owner: AtomicU64,
    /// The listener is connected: another relay's insert is heard of. Without it the
    /// hand-off never holds everything.
    listening: AtomicBool,
}

impl Handed {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.by_destination
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// This relay now owns `destination`; returns the ID [`Handed::disown`] takes.
    /// Nothing is claimed as inserted until the new owner's dispatcher reads the store
    /// (with its own lease: a reload may have changed the destination's timeout).
    pub fn own(&self, destination: &str) -> u64 {
        let id = self.next_owner.fetch_add(1, Ordering::Relaxed);
        let mut by_destination = self.lock();
        let entry = by_destination.entry(destination.to_string()).or_default();
        entry.owner = Some(id);
        entry.lease = None;
        entry.complete = false;
        id
    }

    /// Whether the listener is connected (set by it). Either way nothing is complete
    /// any more: notifications were missed while it was down, or will be now.
    pub fn set_listening(&self, listening: bool) {
        self.listening.store(listening, Ordering::SeqCst);
        self.untrack_all();
    }

    /// Ownership `id` of `destination` ended: nothing more is claimed as it is inserted,
    /// and what waits is returned, for its claims to be given back. A no-op when a newer
    /// ownership of this relay replaced `id` (a reload hands over to a new dispatcher).
    pub fn disown(&self, destination: &str, id: u64) -> Vec<Delivery> {
        let mut by_destination = self.lock();
        let Some(entry) = by_destination.get_mut(destination) else {
            return Vec::new();
        };
        if entry.owner != Some(id) {
            return Vec::new();
        }
        entry.owner = None;
        entry.lease = None;
        entry.complete = false;
        entry.queue.drain(..).map(|(d, _)| d).collect()
    }

    /// The dispatcher is about to read `destination` with `lease`, `max` deliveries at a
    /// time: from now on the hand-off holds whatever commits here (while the listener
    /// hears the other relays), and up to `max` new deliveries are claimed as they are
    /// inserted while this relay owns the destination.
    pub fn track(&self, destination: &str, lease: Duration, max: usize) {
        let mut by_destination = self.lock();
        // Read under the lock: `set_listening(false)` stores before `untrack_all` locks,
        // so a listener lost meanwhile is either seen here or clears this afterwards.
        let listening = self.listening.load(Ordering::SeqCst);
        let entry = by_destination.entry(destination.to_string()).or_default();
        entry.lease = Some(lease);
        entry.max = max.clamp(1, MAX_FRESH);
        entry.complete = listening;
    }

    /// Due deliveries of `destination` may be in the store and not here: the dispatcher
    /// reads the store next time.
    pub fn untrack(&self, destination: &str) {
        if let Some(entry) = self.lock().get_mut(destination) {
            entry.complete = false;
        }
    }

    /// [`Handed::untrack`] for every destination.
    pub fn untrack_all(&self) {
        for entry in self.lock().values_mut() {
            entry.complete = false;
        }
    }

    /// For each of `destinations` (one per delivery about to be inserted), the lease to
    /// claim it for, or `None` to leave it unclaimed. Room is kept in the queue for each
    /// claimed one until [`Handed::push`] or [`Handed::abandon`]; a delivery left
    /// unclaimed for want of room ends the hand-off's completeness.
    pub fn leases(&self, destinations: &[&str]) -> Vec<Option<Duration>> {
        let mut by_destination = self.lock();
        destinations
            .iter()
            .map(|d| {
                let entry = by_destination.get_mut(*d)?;
                let lease = entry.owner.and(entry.lease)?;
                if entry.queue.len() + entry.reserved >= entry.max {
                    entry.complete = false;
                    return None;
                }
                entry.reserved += 1;
                Some(lease)
            })
            .collect()
    }

    /// Releases the room kept for `destinations`' claims whose insert failed.
    pub fn abandon<'a>(&self, destinations: impl IntoIterator<Item = &'a str>) {
        let mut by_destination = self.lock();
        for d in destinations {
            if let Some(entry) = by_destination.get_mut(d) {
                entry.reserved = entry.reserved.saturating_sub(1);
                // The insert may have committed after all (a timeout): its claims then
                // wait for their lease, unseen by the dispatcher's reads until then.
                entry.complete = false;
            }
        }
    }

    /// Hands over deliveries claimed by a committed insert. Those whose destination this
    /// relay no longer owns are returned, for their claims to be given back.
    pub fn push(&self, claimed: Vec<(Delivery, Instant)>) -> Vec<Delivery> {
        let mut orphans = Vec::new();
        let mut by_destination = self.lock();
        for (d, asked) in claimed {
            match by_destination.get_mut(&d.destination) {
                Some(entry) => {
                    entry.reserved = entry.reserved.saturating_sub(1);
                    if entry.owner.is_some() {
                        entry.queue.push_back((d, asked));
                    } else {
                        entry.complete = false;
                        orphans.push(d);
                    }
                }
                None => orphans.push(d),
            }
        }
        orphans
    }

    /// Up to `max` claimed deliveries of `destination`, in commit order; `None` when the
    /// hand-off may not hold every due delivery (read the store, then
    /// [`Handed::take_claimed`]).
    pub fn take(&self, destination: &str, max: usize) -> Option<Vec<(Delivery, Instant)>> {
        let mut by_destination = self.lock();
        let entry = by_destination.get_mut(destination)?;
        if !entry.complete {
            return None;
        }
        let n = entry.queue.len().min(max);
        Some(entry.queue.drain(..n).collect())
    }

    /// Up to `max` claimed deliveries of `destination`, in commit order, whether or not
    /// the hand-off holds everything.
    pub fn take_claimed(&self, destination: &str, max: usize) -> Vec<(Delivery, Instant)> {
        let mut by_destination = self.lock();
        let Some(entry) = by_destination.get_mut(destination) else {
            return Vec::new();
        };
        let n = entry.queue.len().min(max);
        entry.queue.drain(..n).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(40);

    /// A delivery claimed as inserted (`claim_seq` 1).
    fn delivery(id: i64, destination: &str) -> (Delivery, Instant) {
        let d = Delivery {
            claim: Some(1),
            ..Delivery::fixture(id, destination)
        };
        (d, Instant::now())
    }

    fn ids(v: &[(Delivery, Instant)]) -> Vec<i64> {
        v.iter().map(|(d, _)| d.id).collect()
    }

    /// A hand-off that hears the other relays.
    fn listening() -> Handed {
        let h = Handed::default();
        h.set_listening(true);
        h
    }

    #[test]
    fn claims_only_for_an_owned_destination_whose_dispatcher_has_read() {
        let h = listening();
        assert_eq!(h.leases(&["a"]), [None], "unknown: not claimed");
        h.track("a", LEASE, 10);
        assert_eq!(
            h.leases(&["a"]),
            [None],
            "read but not owned (a test, a reload)"
        );
        let id = h.own("a");
        assert_eq!(
            h.leases(&["a"]),
            [None],
            "owned, not read since: no lease yet"
        );
        h.track("a", LEASE, 10);
        assert_eq!(h.leases(&["a", "b"]), [Some(LEASE), None]);
        assert!(h.push(vec![delivery(1, "a")]).is_empty());
        assert_eq!(ids(&h.take("a", 10).unwrap()), [1]);
        assert!(
            h.take("b", 10).is_none(),
            "b is not tracked: read the store"
        );

        // The ownership ends: what waits comes back for its claims to be given back, and
        // an insert that claimed before the end gives its delivery back too.
        assert_eq!(h.leases(&["a"]), [Some(LEASE)]);
        assert!(h.push(vec![delivery(2, "a")]).is_empty());
        assert_eq!(h.leases(&["a"]), [Some(LEASE)]);
        let waiting: Vec<i64> = h.disown("a", id).iter().map(|d| d.id).collect();
        assert_eq!(waiting, [2]);
        let late: Vec<i64> = h
            .push(vec![delivery(3, "a")])
            .iter()
            .map(|d| d.id)
            .collect();
        assert_eq!(late, [3]);
        assert_eq!(h.leases(&["a"]), [None], "not owned: not claimed");
        assert!(h.take("a", 10).is_none(), "read the store");
    }

    #[test]
    fn a_newer_ownership_is_not_ended_by_the_older_ones_drop() {
        let h = listening();
        let old = h.own("a");
        h.track("a", LEASE, 10);
        assert_eq!(h.leases(&["a"]), [Some(LEASE)]);
        assert!(h.push(vec![delivery(1, "a")]).is_empty());
        // A reload: the new dispatcher owns before the old one lets go, and claims with
        // its own lease once it has read.
        let new = h.own("a");
        assert_eq!(
            h.leases(&["a"]),
            [None],
            "the old lease is not used for the new owner"
        );
        h.track("a", 2 * LEASE, 10);
        assert_eq!(h.leases(&["a"]), [Some(2 * LEASE)]);
        assert!(h.push(vec![delivery(2, "a")]).is_empty());
        assert!(
            h.disown("a", old).is_empty(),
            "the reload's new dispatcher keeps it"
        );
        assert_eq!(ids(&h.take_claimed("a", 10)), [1, 2]);
        assert!(h.disown("a", new).is_empty());
        assert_eq!(h.leases(&["a"]), [None]);
    }

    #[test]
    fn outside_changes_and_a_full_queue_send_the_dispatcher_to_the_store() {
        let h = listening();
        h.own("a");
        h.track("a", LEASE, 10);
        h.untrack("a");
        assert!(
            h.take("a", 10).is_none(),
            "another relay's insert: read the store"
        );
        assert_eq!(h.leases(&["a"]), [Some(LEASE)], "still claimed as inserted");
        assert!(h.push(vec![delivery(1, "a")]).is_empty());
        assert!(h.take("a", 10).is_none());
        assert_eq!(
            ids(&h.take_claimed("a", 10)),
            [1],
            "handed over after the read"
        );

        // No more claimed ahead than the dispatcher's prefetch.
        h.track("a", LEASE, 3);
        assert_eq!(h.leases(&["a"; 3]), [Some(LEASE); 3]);
        assert_eq!(
            h.leases(&["a"]),
            [None],
            "no room: left unclaimed in the store"
        );
        assert!(h.take("a", 10).is_none(), "and the store must be read");
        h.abandon(["a"; 3]);
        h.track("a", LEASE, 3);
        assert_eq!(h.leases(&["a"]), [Some(LEASE)], "room again");

        h.track("a", LEASE, 3);
        h.untrack_all();
        assert!(
            h.take("a", 10).is_none(),
            "a lost listener: read everything"
        );
        h.set_listening(false);
        h.track("a", LEASE, 3);
        assert!(
            h.take("a", 10).is_none(),
            "not listening: another relay's insert would go unheard"
        );
    }
}
