//! The in-memory hand-off of the shared store: deliveries a relay inserts for a
//! destination it dispatches are claimed in the insert and handed to its dispatcher,
//! without a notification or a claim statement; they stay safe for the other relays.

use std::time::Duration;

use faceio_relay::event::now_ms;
use faceio_relay::store::postgres::PostgresStore;
use faceio_relay::store::{Delivery, Outcome, Ownership, Store, Wake};

use crate::common::pg::{TestDb, within};
use crate::common::store::{LONG, request, verified};
use crate::wakes::listening_pair;

/// Two relays on one database: `one` listens for notifications, owns destination `h`
/// and has read it once (as its dispatcher does on start, which starts the hand-off);
/// `two` does neither.
struct Pair {
    one: PostgresStore,
    wakes: tokio::sync::broadcast::Receiver<Wake>,
    ownership: Ownership,
    two: PostgresStore,
}

impl Pair {
    async fn new(db: &TestDb) -> Self {
        let (one, two, wakes) = listening_pair(db).await;
        let ownership = one.own("h").await.unwrap().expect("free");
        assert!(one.claim(request("h", LONG)).await.unwrap().is_empty());
        Self {
            one,
            wakes,
            ownership,
            two,
        }
    }
}

/// Waits for the wake-up naming `destination`; returns the ones before it.
async fn wake_for(
    wakes: &mut tokio::sync::broadcast::Receiver<Wake>,
    destination: &str,
) -> Vec<Wake> {
    let mut before = Vec::new();
    loop {
        let wake = tokio::time::timeout(Duration::from_secs(10), wakes.recv())
            .await
            .unwrap_or_else(|_| panic!("no wake-up for {destination}"))
            .unwrap();
        if wake == Wake::Destination(destination.into()) {
            return before;
        }
        before.push(wake);
    }
}

/// `(claimed_by, lease_until > now, claim_seq)` of `destination`'s one delivery.
async fn claim_of(db: &TestDb, destination: &str) -> (Option<String>, Option<bool>, i64) {
    let mut c = db.connect().await;
    sqlx::query_as(
        "SELECT claimed_by, lease_until > faceio_relay_now_ms(), claim_seq
         FROM deliveries WHERE destination = $1",
    )
    .bind(destination)
    .fetch_one(&mut c)
    .await
    .unwrap()
}

#[tokio::test]
async fn an_owned_destinations_deliveries_are_claimed_as_inserted_and_handed_over() {
    let db = TestDb::create().await;
    let Pair {
        one,
        mut wakes,
        ownership,
        two,
    } = Pair::new(&db).await;
    assert!(one.hands_off());
    assert!(one.take_fresh("h", 10).unwrap().is_empty());

    let ev = verified("AUTH");
    one.insert_event(&ev, &["h"]).await.unwrap();
    one.insert_event(&verified("AUTH"), &["elsewhere"])
        .await
        .unwrap();
    let handed = one
        .take_fresh("h", 10)
        .expect("the hand-off holds everything");
    let [(d, _asked)] = handed.as_slice() else {
        panic!("one delivery handed over: {handed:?}");
    };
    assert_eq!((d.event_id.as_str(), d.attempts), (ev.id(), 0));
    assert_eq!(&d.body, ev.body());
    // Claimed in the store as a claim statement would have: another relay's read, even
    // one allowed to take over, does not get it while the lease runs.
    let (by, live, seq) = claim_of(&db, "h").await;
    assert_eq!(by.as_deref(), Some(one.instance()));
    assert_eq!(live, Some(true));
    assert_eq!(Some(seq), d.claim);
    assert!(two.claim(request("h", LONG)).await.unwrap().is_empty());
    assert_eq!(
        claim_of(&db, "elsewhere").await.0,
        None,
        "a destination this relay does not own is left unclaimed"
    );
    // Nobody was notified of h (the relay that dispatches it inserted it), while the
    // destination it does not own was. Notices wait in a set until sent, so one for h
    // would go out with "elsewhere" at the latest: it would have arrived before the
    // notice of a later insert.
    let mut heard = wake_for(&mut wakes, "elsewhere").await;
    one.insert_event(&verified("AUTH"), &["later"])
        .await
        .unwrap();
    heard.extend(wake_for(&mut wakes, "later").await);
    assert!(
        !heard.contains(&Wake::Destination("h".into())),
        "notified of an owned destination: {heard:?}"
    );

    // The claim is as good as any: renewed, then recorded.
    assert!(one.renew(d, LONG).await.unwrap());
    one.record(d, Outcome::Done { attempts: 1 }).await.unwrap();
    within(Duration::from_secs(10), "the outcome recorded", || async {
        one.due("h", now_ms(), 10).await.unwrap().is_empty()
    })
    .await;
    drop(ownership);
    one.close().await;
    two.close().await;
}

#[tokio::test]
async fn another_relays_insert_sends_the_dispatcher_back_to_the_store() {
    let db = TestDb::create().await;
    let Pair {
        one,
        mut wakes,
        ownership: _ownership,
        two,
    } = Pair::new(&db).await;
    assert!(one.take_fresh("h", 10).unwrap().is_empty());

    // Two (not the owner) inserts: unclaimed, and notified.
    two.insert_event(&verified("AUTH"), &["h"]).await.unwrap();
    wake_for(&mut wakes, "h").await;
    assert!(
        one.take_fresh("h", 10).is_none(),
        "the hand-off no longer holds everything: read the store"
    );
    // One's own insert meanwhile is still claimed and handed over, after the read.
    one.insert_event(&verified("AUTH"), &["h"]).await.unwrap();
    let read = one.claim(request("h", LONG)).await.unwrap();
    assert_eq!(read.len(), 1, "the read returns two's delivery");
    let handed = one.take_claimed("h", 10);
    assert_eq!(handed.len(), 1, "and the hand-off one's own");
    assert_ne!(read[0].id, handed[0].0.id);
    assert!(
        one.take_fresh("h", 10).unwrap().is_empty(),
        "after that read the hand-off holds everything again"
    );
    one.close().await;
    two.close().await;
}

#[tokio::test]
async fn deliveries_claimed_for_an_ownership_that_ended_are_given_back_at_once() {
    let db = TestDb::create().await;
    let Pair {
        one,
        mut wakes,
        ownership,
        two,
    } = Pair::new(&db).await;
    one.insert_event(&verified("AUTH"), &["h"]).await.unwrap();
    assert_eq!(claim_of(&db, "h").await.0.as_deref(), Some(one.instance()));

    // The dispatcher stops (a lost connection, shutdown) before taking it: the claim is
    // given back and the destination's next owner told, so it need not wait a lease.
    drop(ownership);
    wake_for(&mut wakes, "h").await;
    assert_eq!(claim_of(&db, "h").await.0, None);
    assert!(one.take_claimed("h", 10).is_empty(), "nothing left here");
    // The lock itself is given back in the background too.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let _theirs = loop {
        if let Some(o) = two.own("h").await.unwrap() {
            break o;
        }
        assert!(std::time::Instant::now() < deadline, "h was never given up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut taken: Vec<Delivery> = two
        .claim(faceio_relay::store::ClaimRequest {
            take_over: false,
            ..request("h", LONG)
        })
        .await
        .unwrap();
    assert_eq!(taken.len(), 1, "the new owner claims it at once");
    assert!(two.renew(&taken.remove(0), LONG).await.unwrap());

    // One no longer owns h: what it inserts now is left for the owner.
    one.insert_event(&verified("AUTH"), &["h"]).await.unwrap();
    let mut c = db.connect().await;
    let claimed_by_one: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM deliveries WHERE destination = 'h' AND claimed_by = $1",
    )
    .bind(one.instance())
    .fetch_one(&mut c)
    .await
    .unwrap();
    assert_eq!(claimed_by_one, 0);
    one.close().await;
    two.close().await;
}
