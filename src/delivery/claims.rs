//! Which deliveries of one destination are claimed by an attempt.
//!
//! The dispatcher reads due rows through a separate connection, so a read can start just
//! before an attempt commits its outcome and finish just after the attempt released its
//! claim: the row still looks `pending` in that read. Dropping the claim at release
//! would let the stale row be claimed again and delivered twice. So a released ID is
//! remembered with the release's epoch, and a read that began before that epoch may not
//! claim it; a read that began after sees the committed outcome and needs no memory.

use std::collections::{HashMap, HashSet};

/// Claims for one destination (shared by its dispatchers across reloads).
#[derive(Debug, Default)]
pub struct Claims {
    /// Claimed and not yet released.
    active: HashSet<i64>,
    /// Released IDs and the epoch of their release.
    released: HashMap<i64, u64>,
    /// Bumped by every release.
    epoch: u64,
    /// Reads under way (two dispatchers share the claims for a moment during a reload).
    reads: usize,
}

impl Claims {
    /// Call before reading due rows; pass the result to [`Claims::claim`], and call
    /// [`Claims::read_finished`] afterwards whether the read worked or not.
    pub fn read_started(&mut self) -> u64 {
        self.reads += 1;
        self.epoch
    }

    /// Claims `id` from a read that started at `read_epoch`. False if it is claimed, or
    /// was released after that read started (so the read may have seen a stale state).
    pub fn claim(&mut self, id: i64, read_epoch: u64) -> bool {
        if self.released.get(&id).is_some_and(|&e| e > read_epoch) {
            return false;
        }
        self.active.insert(id)
    }

    /// Releases `id` once its outcome is committed (or it was never attempted).
    pub fn release(&mut self, id: i64) {
        if self.active.remove(&id) {
            self.epoch += 1;
            self.released.insert(id, self.epoch);
        }
    }

    /// Ends a read. When no read is under way, forgets the releases: every later read
    /// starts after them and sees their committed outcome.
    pub fn read_finished(&mut self) {
        self.reads = self.reads.saturating_sub(1);
        if self.reads == 0 {
            self.released.clear();
        }
    }

    /// Whether `id` is claimed now.
    pub fn contains(&self, id: i64) -> bool {
        self.active.contains(&id)
    }

    /// The claimed IDs.
    pub fn ids(&self) -> Vec<i64> {
        self.active.iter().copied().collect()
    }

    /// How many are claimed.
    pub fn len(&self) -> usize {
        self.active.len()
    }

    pub fn is_empty(&self) -> bool {
        self.active.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claimed_id_cannot_be_claimed_twice() {
        let mut c = Claims::default();
        let r = c.read_started();
        assert!(c.claim(1, r));
        assert!(!c.claim(1, r));
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn a_read_older_than_a_release_cannot_reclaim_it() {
        let mut c = Claims::default();
        let r0 = c.read_started();
        assert!(c.claim(7, r0));
        // A read starts, then the attempt commits and releases 7, then the read returns 7.
        let stale_read = c.read_started();
        c.release(7);
        assert!(
            !c.claim(7, stale_read),
            "stale row must not be claimed again"
        );
        c.read_finished();
        c.read_finished();
        // A read that starts after the release saw the committed outcome; if 7 is due
        // again (a retry), it may be claimed.
        let fresh = c.read_started();
        assert!(c.claim(7, fresh));
    }

    #[test]
    fn finished_reads_forget_old_releases() {
        let mut c = Claims::default();
        for id in 0..100 {
            let r = c.read_started();
            c.claim(id, r);
            c.release(id);
            c.read_finished();
        }
        assert!(
            c.released.is_empty(),
            "no read under way: nothing remembered"
        );
        let first = c.read_started();
        assert!(c.claim(500, first));
        c.read_finished();
        let older = c.read_started();
        let _newer = c.read_started();
        c.release(500);
        c.read_finished();
        assert!(
            !c.claim(500, older),
            "an older read still under way keeps its protection"
        );
        c.read_finished();
        assert!(c.released.is_empty());
        assert!(c.is_empty());
    }
}
