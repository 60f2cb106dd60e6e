//! LISTEN/NOTIFY: every relay hears of new deliveries, never before they can be read.

use std::time::Duration;

use faceio_relay::event::now_ms;
use faceio_relay::store::postgres::PostgresStore;
use faceio_relay::store::{Store, Wake};

use crate::common::pg::TestDb;
use crate::common::store::verified;
use crate::pg_config;

/// Two stores on `db`; the first listens for wake-ups and is ready to hear them.
pub(crate) async fn listening_pair(
    db: &TestDb,
) -> (
    PostgresStore,
    PostgresStore,
    tokio::sync::broadcast::Receiver<Wake>,
) {
    let one = PostgresStore::open(&pg_config(db)).await.unwrap();
    let two = PostgresStore::open(&pg_config(db)).await.unwrap();
    let mut wakes = one.subscribe().expect("postgres notifies");
    // Listening starts in the background; it announces itself with `All`.
    let first = tokio::time::timeout(Duration::from_secs(10), wakes.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first, Wake::All);
    (one, two, wakes)
}

#[tokio::test]
async fn every_process_hears_about_new_deliveries() {
    let db = TestDb::create().await;
    let (one, two, mut wakes) = listening_pair(&db).await;
    two.insert_event(&verified("AUTH"), &["n"]).await.unwrap();
    let heard = tokio::time::timeout(Duration::from_secs(10), wakes.recv())
        .await
        .expect("notified")
        .unwrap();
    assert_eq!(heard, Wake::Destination("n".into()));
    one.close().await;
    two.close().await;
}

#[tokio::test]
async fn a_wake_up_never_arrives_before_its_delivery_can_be_read() {
    let db = TestDb::create().await;
    let (one, two, mut wakes) = listening_pair(&db).await;
    // Inserts of deliveries commit slowly here (a deferred trigger waits just before the
    // commit), so a wake-up sent before the commit would reach one while the delivery
    // cannot be read yet: one would look, find nothing, and wait for its next poll.
    let mut c = db.connect().await;
    for sql in [
        "CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql
         AS $$ BEGIN PERFORM pg_sleep(0.3); RETURN NULL; END $$",
        "CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON deliveries
         DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit()",
    ] {
        sqlx::query(sql).execute(&mut c).await.unwrap();
    }
    for i in 0..3 {
        let dest = format!("w{i}");
        let ev = verified("AUTH");
        let woken = async {
            loop {
                let wake = tokio::time::timeout(Duration::from_secs(10), wakes.recv())
                    .await
                    .expect("woken for the new delivery")
                    .unwrap();
                if wake == Wake::Destination(dest.clone()) {
                    break;
                }
            }
            one.due(&dest, now_ms(), 10).await.unwrap()
        };
        let dests = [dest.as_str()];
        let (inserted, seen) = tokio::join!(two.insert_event(&ev, &dests), woken);
        inserted.unwrap();
        assert_eq!(
            seen.len(),
            1,
            "woken for {dest} before its delivery was committed"
        );
        assert_eq!(seen[0].event_id, ev.id());
    }
    one.close().await;
    two.close().await;
}
