//! What relays announce decides for the others: which destinations are orphans, and
//! which dead letters a replay queues again.

use std::time::Duration;

use faceio_relay::store::postgres::PostgresStore;
use faceio_relay::store::{Selection, Store};

use crate::common::pg::{TestDb, within};
use crate::common::store::{LONG, claim_and_dead_letter, verified};
use crate::pg_config;

#[tokio::test]
async fn the_orphan_sweep_spares_destinations_another_live_relay_announced() {
    let db = TestDb::create().await;
    // `one` runs a config with destination `a` only; `two` one with `b1` and `b2` (a
    // rolling config change), whose dispatchers own neither yet.
    let one = PostgresStore::open(&pg_config(&db)).await.unwrap();
    let two = PostgresStore::open(&pg_config(&db)).await.unwrap();
    one.insert_event(&verified("AUTH"), &["a", "b1", "b2"])
        .await
        .unwrap();
    two.announce(&["b1", "b2"], LONG).await.unwrap();
    assert_eq!(
        one.dead_letter_orphans(&["a"]).await.unwrap(),
        [],
        "dead-lettered deliveries of destinations a live relay has"
    );
    assert_eq!(db.count("pending").await, 3);

    // Two's config drops b1: its deliveries are orphans at once.
    two.announce(&["b2"], LONG).await.unwrap();
    assert_eq!(
        one.dead_letter_orphans(&["a"]).await.unwrap(),
        [("b1".to_string(), 1)],
        "b1 (withdrawn) goes, b2 (announced) stays"
    );
    assert_eq!(
        one.dead_letters(None, 10).await.unwrap()[0].destination,
        "b1"
    );

    // Two falls silent: once its announcement runs out, b2's deliveries are orphans too.
    two.announce(&["b2"], Duration::from_millis(300))
        .await
        .unwrap();
    within(
        Duration::from_secs(10),
        "two's announcement to run out",
        || async { one.dead_letter_orphans(&["a"]).await.unwrap() == [("b2".to_string(), 1)] },
    )
    .await;
    assert_eq!(db.count("dead").await, 2);
    assert_eq!(db.count("pending").await, 1, "a is still pending");
    one.close().await;
    two.close().await;
}

#[tokio::test]
async fn a_replay_is_decided_by_what_the_running_relays_have() {
    let db = TestDb::create().await;
    // `one` runs destination `a`; `two` runs `b` (announced); nobody runs `c`.
    let one = PostgresStore::open(&pg_config(&db)).await.unwrap();
    let two = PostgresStore::open(&pg_config(&db)).await.unwrap();
    let cli_store = PostgresStore::open_admin(&pg_config(&db)).await.unwrap();
    one.insert_event(&verified("AUTH"), &["a", "b", "c"])
        .await
        .unwrap();
    for d in ["a", "b", "c"] {
        claim_and_dead_letter(&one, d, "HTTP 500").await;
    }
    two.announce(&["b"], LONG).await.unwrap();

    // The command only records the request: nothing moves until a relay decides.
    assert_eq!(
        cli_store
            .request_replay(&Selection::All, "batch")
            .await
            .unwrap(),
        3
    );
    assert_eq!(db.count("dead").await, 3);
    assert_eq!(
        cli_store.replay_verdict("batch").await.unwrap().undecided,
        3
    );

    // `one` decides all three: its own `a`, and `b` which `two` runs, are queued again;
    // `c` stays a dead letter with the reason.
    let decided = one.decide_replays(&["a"]).await.unwrap();
    assert_eq!(
        decided.replayed,
        [("a".to_string(), 1), ("b".to_string(), 1)]
    );
    assert_eq!(decided.refused, [("c".to_string(), 1)]);
    assert_eq!(
        two.decide_replays(&["b"]).await.unwrap(),
        Default::default()
    );
    let verdict = cli_store.replay_verdict("batch").await.unwrap();
    assert_eq!(verdict.undecided, 0);
    assert_eq!(verdict.refused, [("c".to_string(), 1)]);
    assert_eq!(db.count("pending").await, 2);
    let dead = one.dead_letters(None, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].destination, "c");
    assert_eq!(
        dead[0].last_error,
        faceio_relay::store::replay_refused_reason("c")
    );
    cli_store.forget_replay("batch").await.unwrap();
    assert_eq!(
        cli_store.replay_verdict("batch").await.unwrap(),
        Default::default()
    );
    one.close().await;
    two.close().await;
}
