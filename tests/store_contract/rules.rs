//! The contract: one function per rule, generic over the backend.

use std::time::Duration;

use faceio_relay::event::now_ms;
use faceio_relay::store::{
    ClaimRequest, Outcome, Selection, Store, StoreError, orphaned_reason, replay_refused_reason,
};

use crate::Backend;
use crate::common::pg::within;
use crate::common::store::{LONG, claim_and_dead_letter, request, verified};

/// `dead-letters replay` through the store: requested, decided by a relay running
/// `running`, collected. Returns how many were queued again.
async fn replay(store: &impl Store, selection: &Selection, running: &[&str]) -> u64 {
    store.request_replay(selection, "test-batch").await.unwrap();
    store.decide_replays(running).await.unwrap();
    let verdict = store.replay_verdict("test-batch").await.unwrap();
    store.forget_replay("test-batch").await.unwrap();
    verdict.replayed.iter().map(|(_, n)| n).sum()
}

/// Insert, then due, per destination; the backlog figures; a durable write.
pub async fn an_inserted_event_is_due_for_each_destination<B: Backend>() {
    let (_backend, store) = B::open().await;
    let ev = verified("ENROLL");
    store.insert_event(&ev, &["a", "b"]).await.unwrap();
    let due_a = store.due("a", now_ms(), 10).await.unwrap();
    assert_eq!(due_a.len(), 1);
    assert_eq!(due_a[0].event_id, ev.id());
    assert_eq!(due_a[0].body, ev.body());
    assert_eq!(due_a[0].attempts, 0);
    assert_eq!(store.due("b", now_ms(), 10).await.unwrap().len(), 1);
    assert!(store.due("c", now_ms(), 10).await.unwrap().is_empty());
    let stats = store.destination_stats().await.unwrap();
    assert_eq!(stats.len(), 2);
    assert_eq!(stats[0].destination, "a");
    assert_eq!(stats[0].pending, 1);
    assert_eq!(stats[0].oldest_pending_ms, Some(ev.received_at_ms()));
    assert_eq!(stats[0].dead, 0);
    store.ping().await.unwrap();
    store.close().await;
}

/// A retry is not due before its time, then is, with its attempts; done ends it.
pub async fn outcomes_move_a_delivery_through_retry_and_done<B: Backend>() {
    let (_backend, store) = B::open().await;
    let slack = B::CLOCK_SLACK_MS;
    store
        .insert_event(&verified("AUTH"), &["a", "b"])
        .await
        .unwrap();
    let due_a = store.due("a", now_ms(), 10).await.unwrap();
    let a = store.claim(request("a", LONG)).await.unwrap().remove(0);
    assert_eq!(a.id, due_a[0].id);
    assert_eq!(
        a.claim.is_some(),
        store.shared(),
        "a claim in a shared store carries its token"
    );
    let later = now_ms() + 60_000;
    let retry = Outcome::Retry {
        attempts: 1,
        next_attempt_at_ms: later,
        error: "HTTP 500".into(),
    };
    store.record(&a, retry).await.unwrap();
    assert!(
        store.due("a", now_ms(), 10).await.unwrap().is_empty(),
        "not due before its time"
    );
    let next = store.next_due_after("a", now_ms()).await.unwrap().unwrap();
    assert!((next - later).abs() <= slack, "{next} vs {later}");
    assert_eq!(
        store.next_due_after("a", later + slack).await.unwrap(),
        None
    );
    let again = store.due("a", later + slack, 10).await.unwrap();
    assert_eq!(again[0].attempts, 1);
    let a = store
        .claim(ClaimRequest {
            now_ms: later + slack,
            ..request("a", LONG)
        })
        .await
        .unwrap()
        .remove(0);
    store
        .record(&a, Outcome::Done { attempts: 2 })
        .await
        .unwrap();
    assert_eq!(store.next_due_after("a", 0).await.unwrap(), None);
    store.close().await;
}

/// Dead letters: listed, shown, replayed (asked for, decided, collected), purged.
pub async fn dead_letters_are_listed_shown_replayed_and_purged<B: Backend>() {
    let (_backend, store) = B::open().await;
    let ev = verified("AUTH");
    store.insert_event(&ev, &["a", "b"]).await.unwrap();
    let a = store.claim(request("a", LONG)).await.unwrap().remove(0);
    store
        .record(&a, Outcome::Done { attempts: 1 })
        .await
        .unwrap();
    let b = claim_and_dead_letter(&store, "b", "HTTP 404: channel_not_found").await;
    let dead = store.dead_letters(None, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].id, b.id);
    assert_eq!(dead[0].last_error, "HTTP 404: channel_not_found");
    assert_eq!(dead[0].event_name, "AUTH");
    assert_eq!(store.dead_letters(Some("a"), 10).await.unwrap(), vec![]);
    let (shown, body) = store.dead_letter(b.id).await.unwrap().unwrap();
    assert_eq!(shown, dead[0]);
    assert_eq!(body, ev.body());
    assert!(store.dead_letter(a.id).await.unwrap().is_none(), "not dead");
    let stats = store.destination_stats().await.unwrap();
    assert_eq!(stats.len(), 1, "a is done: {stats:?}");
    assert_eq!((stats[0].destination.as_str(), stats[0].dead), ("b", 1));

    let destination_b = Selection::Destination("b".into());
    assert_eq!(
        store
            .request_replay(&destination_b, "batch-1")
            .await
            .unwrap(),
        1
    );
    // Asked for, not yet decided: still a dead letter.
    assert!(store.due("b", now_ms(), 10).await.unwrap().is_empty());
    assert_eq!(store.replay_verdict("batch-1").await.unwrap().undecided, 1);
    let decided = store.decide_replays(&["a", "b"]).await.unwrap();
    assert_eq!(decided.replayed, [("b".to_string(), 1)]);
    let verdict = store.replay_verdict("batch-1").await.unwrap();
    assert_eq!(
        (verdict.undecided, verdict.replayed),
        (0, vec![("b".to_string(), 1)])
    );
    store.forget_replay("batch-1").await.unwrap();
    assert_eq!(
        store.replay_verdict("batch-1").await.unwrap(),
        Default::default()
    );
    let replayed = store.due("b", now_ms(), 10).await.unwrap();
    assert_eq!(replayed[0].attempts, 0, "attempts start over");

    let b = claim_and_dead_letter(&store, "b", "again").await;
    assert_eq!(replay(&store, &Selection::Ids(vec![b.id]), &["b"]).await, 1);
    let b = claim_and_dead_letter(&store, "b", "again").await;
    assert_eq!(store.purge(&Selection::Ids(vec![b.id])).await.unwrap(), 1);
    assert!(store.dead_letters(None, 10).await.unwrap().is_empty());
    store.close().await;
}

/// A relay replays only dead letters of destinations it runs; the others stay, with
/// the reason, and keep their history.
pub async fn a_replay_of_a_destination_no_relay_runs_is_refused<B: Backend>() {
    let (_backend, store) = B::open().await;
    store
        .insert_event(&verified("AUTH"), &["kept", "gone"])
        .await
        .unwrap();
    for name in ["kept", "gone"] {
        let d = store.claim(request(name, LONG)).await.unwrap().remove(0);
        let dead = Outcome::Dead {
            attempts: 3,
            error: "HTTP 500".into(),
        };
        store.record(&d, dead).await.unwrap();
    }
    assert_eq!(store.request_replay(&Selection::All, "b").await.unwrap(), 2);
    // Nothing to decide twice; the daemon runs only `kept`.
    let decided = store.decide_replays(&["kept"]).await.unwrap();
    assert_eq!(decided.replayed, [("kept".to_string(), 1)]);
    assert_eq!(decided.refused, [("gone".to_string(), 1)]);
    assert_eq!(
        store.decide_replays(&["kept"]).await.unwrap(),
        Default::default()
    );
    assert_eq!(store.due("kept", now_ms(), 10).await.unwrap().len(), 1);
    assert!(store.due("gone", now_ms(), 10).await.unwrap().is_empty());
    let dead = store.dead_letters(None, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].last_error, replay_refused_reason("gone"));
    assert_eq!(dead[0].attempts, 3, "a refused replay keeps its history");
    let verdict = store.replay_verdict("b").await.unwrap();
    assert_eq!(verdict.refused, [("gone".to_string(), 1)]);
    assert_eq!(verdict.replayed, [("kept".to_string(), 1)]);
    store.close().await;
}

/// An outcome applies while the delivery is pending and still carries the claim the
/// outcome names ([`Delivery::claim`]). A store used by one daemon issues no claim
/// tokens (`claim` is `None`) and applies an outcome to any pending row: its daemon never
/// has an attempt under way for a row that is not pending (the orphan sweep waits for
/// attempts of removed destinations, and only dead letters are replayed). A shared store
/// applies none without its claim: an outcome of a delivery read without claiming it
/// (`due`), or of a claim from before the row was dead-lettered and replayed, is dropped;
/// the row stays pending and is delivered again (at least once, never lost).
pub async fn an_outcome_applies_only_to_the_claim_it_names<B: Backend>() {
    let (backend, store) = B::open().await;
    let tokens = store.shared();

    // Read without a claim.
    store.insert_event(&verified("AUTH"), &["u"]).await.unwrap();
    let unclaimed = store.due("u", now_ms(), 10).await.unwrap().remove(0);
    assert_eq!(unclaimed.claim, None);
    store
        .record(&unclaimed, Outcome::Done { attempts: 1 })
        .await
        .unwrap();
    let applied = backend.count("done").await == 1;
    assert_eq!(
        applied, !tokens,
        "an outcome without a claim is applied by a store without claim tokens only"
    );
    if !applied {
        assert_eq!(backend.count("pending").await, 1, "left pending, not lost");
        let u = store.claim(request("u", LONG)).await.unwrap().remove(0);
        store
            .record(&u, Outcome::Done { attempts: 1 })
            .await
            .unwrap();
    }

    // An old outcome arriving after a replay.
    store.insert_event(&verified("AUTH"), &["b"]).await.unwrap();
    let b = claim_and_dead_letter(&store, "b", "HTTP 500").await;
    assert_eq!(
        replay(&store, &Selection::Destination("b".into()), &["b"]).await,
        1
    );
    let late = Outcome::Dead {
        attempts: 1,
        error: "late".into(),
    };
    store.record(&b, late).await.unwrap();
    if tokens {
        assert_eq!(
            backend.count("pending").await,
            1,
            "an outcome for the claim from before the replay was applied"
        );
    } else {
        assert_eq!(backend.count("dead").await, 1);
        assert_eq!(store.purge(&Selection::Ids(vec![b.id])).await.unwrap(), 1);
    }
    store.close().await;
}

/// Pending deliveries of a destination no longer configured become dead letters with
/// the reason; the others stay pending.
pub async fn deliveries_of_a_removed_destination_become_dead_letters<B: Backend>() {
    let (_backend, store) = B::open().await;
    store
        .insert_event(&verified("AUTH"), &["kept", "removed"])
        .await
        .unwrap();
    assert_eq!(
        store.dead_letter_orphans(&["kept"]).await.unwrap(),
        [("removed".to_string(), 1)]
    );
    let dead = store.dead_letters(None, 10).await.unwrap();
    assert_eq!(dead[0].destination, "removed");
    assert!(dead[0].last_error.contains("no longer in the config"));
    assert_eq!(dead[0].last_error, orphaned_reason("removed"));
    assert_eq!(store.due("kept", now_ms(), 10).await.unwrap().len(), 1);
    assert_eq!(store.dead_letter_orphans(&["kept"]).await.unwrap(), []);
    store.close().await;
}

/// Prune deletes `done` deliveries older than the cutoff and events none of whose
/// deliveries is left; a dead letter keeps its event. It counts both.
pub async fn prune_deletes_done_deliveries_and_fully_delivered_events<B: Backend>() {
    let (_backend, store) = B::open().await;
    let started = now_ms();
    store
        .insert_event(&verified("ENROLL"), &["a", "b"])
        .await
        .unwrap();
    let a = store.claim(request("a", LONG)).await.unwrap().remove(0);
    store
        .record(&a, Outcome::Done { attempts: 1 })
        .await
        .unwrap();
    claim_and_dead_letter(&store, "b", "HTTP 500").await;
    store.purge(&Selection::All).await.unwrap();
    store
        .insert_event(&verified("AUTH"), &["kept", "removed"])
        .await
        .unwrap();
    store.dead_letter_orphans(&["kept"]).await.unwrap();
    let kept = store.claim(request("kept", LONG)).await.unwrap().remove(0);
    store
        .record(&kept, Outcome::Done { attempts: 1 })
        .await
        .unwrap();

    let slack = B::CLOCK_SLACK_MS;
    assert_eq!(
        store.prune(started - slack - 1).await.unwrap(),
        0,
        "rows newer than the cutoff stay"
    );
    // `a` (done) and `kept` (done) go, and the first event with them (its dead letter
    // was purged). The dead letter keeps its event.
    let cutoff = now_ms() + slack + 1;
    assert_eq!(store.prune(cutoff).await.unwrap(), 3);
    assert_eq!(store.dead_letters(None, 10).await.unwrap().len(), 1);
    store.purge(&Selection::All).await.unwrap();
    assert_eq!(
        store.prune(cutoff).await.unwrap(),
        1,
        "now the event goes too"
    );
    store.close().await;
}

/// Claims (and reads) return the deliveries due first, first, and no more than asked
/// for.
pub async fn claims_come_oldest_due_first<B: Backend>() {
    let (_backend, store) = B::open().await;
    for _ in 0..3 {
        store.insert_event(&verified("AUTH"), &["o"]).await.unwrap();
    }
    let claimed = store.claim(request("o", LONG)).await.unwrap();
    assert_eq!(claimed.len(), 3);
    // Retried to fall due again in the order 2nd, 3rd, 1st; far enough apart that times
    // re-expressed on another clock keep their order.
    let gap = 2 * B::CLOCK_SLACK_MS + 1000;
    let base = now_ms() + 60_000;
    let mut by_rank = Vec::new();
    for (d, rank) in claimed.iter().zip([3, 1, 2]) {
        by_rank.push((rank, d.id));
        let retry = Outcome::Retry {
            attempts: 1,
            next_attempt_at_ms: base + rank * gap,
            error: "HTTP 500".into(),
        };
        store.record(d, retry).await.unwrap();
    }
    by_rank.sort();
    let by_due: Vec<i64> = by_rank.into_iter().map(|(_, id)| id).collect();
    let after_all = base + 4 * gap;
    let all = store
        .claim(ClaimRequest {
            now_ms: after_all,
            ..request("o", LONG)
        })
        .await
        .unwrap();
    assert_eq!(all.iter().map(|d| d.id).collect::<Vec<_>>(), by_due);
    let first_two = store.due("o", after_all, 2).await.unwrap();
    let first_two: Vec<i64> = first_two.iter().map(|d| d.id).collect();
    assert_eq!(first_two, by_due[..2], "the first two due, in order");
    store.close().await;
}

/// A claim never hands this process a delivery it still has in flight, and still finds
/// up to `want` others: a shared store leaves the in-flight ones out, a store used by one
/// daemon returns as many more rows and the caller skips its own (the dispatcher does).
/// Either way, after that skip, no attempt starts twice on one delivery.
pub async fn a_claim_passes_over_what_this_process_has_in_flight<B: Backend>() {
    let (_backend, store) = B::open().await;
    for _ in 0..5 {
        store.insert_event(&verified("AUTH"), &["f"]).await.unwrap();
    }
    fn two(in_flight: &[i64]) -> ClaimRequest<'_> {
        ClaimRequest {
            want: 2,
            in_flight,
            ..request("f", LONG)
        }
    }
    let held: Vec<i64> = store
        .claim(two(&[]))
        .await
        .unwrap()
        .iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(held.len(), 2);
    let mut started = held.clone();
    for round in 0..2 {
        let in_flight = started.clone();
        let next: Vec<i64> = store
            .claim(two(&in_flight))
            .await
            .unwrap()
            .iter()
            .map(|d| d.id)
            .filter(|id| !in_flight.contains(id))
            .collect();
        let expected = if round == 0 { 2 } else { 1 };
        assert_eq!(
            next.len(),
            expected,
            "round {round}: {next:?} besides {in_flight:?}"
        );
        started.extend(next);
    }
    started.sort_unstable();
    started.dedup();
    assert_eq!(started.len(), 5, "each delivery started once: {started:?}");
    store.close().await;
}

/// No two processes hold a claim on the same delivery. A backend used by one daemon
/// keeps the second process out of the store altogether; a shared one hands a claimed
/// delivery to nobody else (nor twice to the same process) until it is given back, and
/// the process that gave it back can neither renew nor finish it.
pub async fn no_two_processes_claim_the_same_delivery<B: Backend>() {
    let (backend, one) = B::open().await;
    let two = match backend.second().await {
        Err(e) => {
            assert!(
                !one.shared(),
                "a shared store refused a second process: {e}"
            );
            assert!(matches!(e, StoreError::Locked { .. }), "{e}");
            return;
        }
        Ok(two) => two,
    };
    assert!(one.shared(), "a second daemon opened a store used by one");
    one.insert_event(&verified("AUTH"), &["c"]).await.unwrap();
    let claimed = one.claim(request("c", LONG)).await.unwrap();
    assert_eq!(claimed.len(), 1);
    let c = claimed[0].clone();
    assert!(two.claim(request("c", LONG)).await.unwrap().is_empty());
    assert!(one.claim(request("c", LONG)).await.unwrap().is_empty());
    assert!(!two.renew(&c, LONG).await.unwrap(), "not two's claim");
    assert!(one.renew(&c, LONG).await.unwrap());
    // Given back, it goes to the other; the first may neither renew nor record it.
    one.unclaim(std::slice::from_ref(&c)).await.unwrap();
    let c2 = two.claim(request("c", LONG)).await.unwrap().remove(0);
    assert_eq!(c2.id, c.id);
    assert!(!one.renew(&c, LONG).await.unwrap());
    one.record(&c, Outcome::Done { attempts: 1 }).await.unwrap();
    assert_eq!(
        backend.count("pending").await,
        1,
        "one's outcome was not applied"
    );
    two.record(&c2, Outcome::Done { attempts: 1 })
        .await
        .unwrap();
    assert_eq!(backend.count("done").await, 1);
    one.close().await;
    two.close().await;
}

/// A claim lasts its lease. A backend used by one daemon has no leases: its claims
/// renew for as long as the daemon asks. In a shared store, a lease that runs out frees
/// the delivery for another process, unless that one asks not to take over others' rows
/// (a new owner, during its first lease); the first process has lost it then.
pub async fn a_lease_that_runs_out_frees_the_delivery<B: Backend>() {
    let (backend, one) = B::open().await;
    one.insert_event(&verified("AUTH"), &["d"]).await.unwrap();
    let short = Duration::from_millis(300);
    let d = one.claim(request("d", short)).await.unwrap().remove(0);
    let Ok(two) = backend.second().await else {
        assert!(!one.shared());
        assert!(one.renew(&d, LONG).await.unwrap(), "a claim was lost");
        one.unclaim(std::slice::from_ref(&d)).await.unwrap();
        assert_eq!(one.due("d", now_ms(), 10).await.unwrap().len(), 1);
        return;
    };
    assert!(two.claim(request("d", LONG)).await.unwrap().is_empty());
    let taken = std::sync::Mutex::new(Vec::new());
    within(Duration::from_secs(10), "the lease to run out", || async {
        let patient = ClaimRequest {
            take_over: false,
            ..request("d", LONG)
        };
        assert!(
            two.claim(patient).await.unwrap().is_empty(),
            "taken over from another process although asked not to"
        );
        let got = two.claim(request("d", LONG)).await.unwrap();
        let any = !got.is_empty();
        taken.lock().unwrap().extend(got);
        any
    })
    .await;
    assert_eq!(taken.lock().unwrap()[0].id, d.id);
    assert!(!one.renew(&d, LONG).await.unwrap(), "one lost it");
    one.close().await;
    two.close().await;
}
