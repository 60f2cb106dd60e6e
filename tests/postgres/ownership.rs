//! Destination ownership through session advisory locks: one process at a time, lost
//! with its connection, and freed when that connection hangs.

use std::time::Duration;

use faceio_relay::config::{PostgresConfig, Secret};
use faceio_relay::store::Store;
use faceio_relay::store::postgres::PostgresStore;

use crate::common::pg::{self, TestDb, within};
use crate::common::store::verified;
use crate::pg_config;

#[tokio::test]
async fn ownership_keeps_processes_apart_and_is_lost_with_its_connection() {
    let db = TestDb::create().await;
    let one = PostgresStore::open(&pg_config(&db)).await.unwrap();
    let two = PostgresStore::open(&pg_config(&db)).await.unwrap();
    // Ownership: one process at a time; re-entrant within a process.
    let owned = one.own("x").await.unwrap().expect("free");
    assert!(two.own("x").await.unwrap().is_none());
    let again = one.own("x").await.unwrap().expect("same process");
    let _y = two.own("y").await.unwrap().expect("per destination");
    // Deliveries of a destination some process owns are not orphans, even to a process
    // whose config lacks it.
    one.insert_event(&verified("AUTH"), &["y", "gone"])
        .await
        .unwrap();
    assert_eq!(
        one.dead_letter_orphans(&["x"]).await.unwrap(),
        [("gone".to_string(), 1)]
    );
    assert_eq!(
        one.dead_letters(None, 10).await.unwrap()[0].destination,
        "gone"
    );
    drop(owned);
    drop(again);
    within(Duration::from_secs(10), "x to be given up", || async {
        two.own("x").await.unwrap().is_some()
    })
    .await;

    // A lost lock connection is reported, and the destination goes to the other process.
    let lost = one.own("z").await.unwrap().expect("free");
    let mut c = db.connect().await;
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_locks
         WHERE locktype = 'advisory' AND pid <> pg_backend_pid()
           AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
           AND objid = (faceio_relay_destination_key('z') & 4294967295)::oid",
    )
    .execute(&mut c)
    .await
    .unwrap();
    tokio::time::timeout(Duration::from_secs(10), lost.lost())
        .await
        .expect("loss reported");
    // Two's lock connection was the one terminated, or one's: either way `z` is free
    // again for whoever asks first now.
    within(Duration::from_secs(10), "z to be free", || async {
        two.own("z").await.is_ok_and(|o| o.is_some())
            || one.own("z").await.is_ok_and(|o| o.is_some())
    })
    .await;
    one.close().await;
    two.close().await;
}

#[tokio::test]
async fn a_hung_lock_session_is_ended_so_its_destinations_move_on() {
    let db = TestDb::create().await;
    // One reaches PostgreSQL through a proxy whose open connections can be made to hang.
    let proxy = pg::FreezingProxy::start().await;
    let one = PostgresStore::open(&PostgresConfig {
        url: Secret::new(proxy.url(&db)),
        pool_size: 2,
    })
    .await
    .unwrap();
    let two = PostgresStore::open(&pg_config(&db)).await.unwrap();
    let owned = one.own("x").await.unwrap().expect("free");
    assert!(two.own("x").await.unwrap().is_none());

    // The network path to one's sessions hangs: one's lock connection stops answering,
    // but PostgreSQL keeps its session (the proxy's end acknowledges everything), and with
    // it the lock on x.
    proxy.freeze();
    tokio::time::timeout(Duration::from_secs(20), owned.lost())
        .await
        .expect("the hung lock connection is reported lost");
    assert!(
        two.own("x").await.unwrap().is_none(),
        "the hung session still holds x"
    );
    // One's next lock connection (a new one passes) ends the hung session: x is free
    // for another relay, not only when TCP keepalives would give up (never, here).
    let _w = one.own("w").await.unwrap().expect("free");
    within(
        Duration::from_secs(10),
        "x to be free for another relay",
        || async { two.own("x").await.unwrap().is_some() },
    )
    .await;
    two.close().await;
}
