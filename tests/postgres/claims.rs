//! Claims between processes beyond the contract: a stale claim of the same row, and
//! times judged on the database's clock.

use std::time::Duration;

use faceio_relay::event::now_ms;
use faceio_relay::store::postgres::PostgresStore;
use faceio_relay::store::{ClaimRequest, Delivery, Outcome, Store};

use crate::common::pg::{TestDb, within};
use crate::common::store::{LONG, request, verified};
use crate::pg_config;

/// Claims a due delivery of `destination` for `store` as soon as one is free (a lease on
/// it ran out), polling.
async fn claim_once_free(store: &PostgresStore, destination: &str, lease: Duration) -> Delivery {
    let got = std::sync::Mutex::new(None);
    within(Duration::from_secs(10), "a lease to run out", || async {
        let claimed = store.claim(request(destination, lease)).await.unwrap();
        let any = !claimed.is_empty();
        if let Some(d) = claimed.into_iter().next() {
            *got.lock().unwrap() = Some(d);
        }
        any
    })
    .await;
    got.into_inner().unwrap().unwrap()
}

/// `SELECT <expr> FROM deliveries WHERE destination = $1` (one row).
async fn row_value(db: &TestDb, expr: &str, destination: &str) -> i64 {
    let mut c = db.connect().await;
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT {expr} FROM deliveries WHERE destination = $1"
    )))
    .bind(destination)
    .fetch_one(&mut c)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_stale_claim_never_touches_a_newer_claim_of_the_same_row() {
    let db = TestDb::create().await;
    let one = PostgresStore::open(&pg_config(&db)).await.unwrap();
    let two = PostgresStore::open(&pg_config(&db)).await.unwrap();
    let short = Duration::from_millis(300);
    one.insert_event(&verified("AUTH"), &["s"]).await.unwrap();
    // One's attempt stalls past its lease; two claims the row, stalls past its lease in
    // turn; then one claims the row again. The same process holds the row as before:
    // only the claim token tells the stale claim from the newer one.
    let stale = one.claim(request("s", short)).await.unwrap().remove(0);
    let theirs = claim_once_free(&two, "s", short).await;
    let newer = claim_once_free(&one, "s", LONG).await;
    assert_eq!((theirs.id, newer.id), (stale.id, stale.id));

    // The stale attempts come back late: they neither extend, nor give back, nor finish
    // the newer claim.
    assert!(
        !one.renew(&stale, LONG).await.unwrap(),
        "a stale claim renewed the newer one"
    );
    assert!(!two.renew(&theirs, LONG).await.unwrap());
    one.unclaim(std::slice::from_ref(&stale)).await.unwrap();
    two.unclaim(std::slice::from_ref(&theirs)).await.unwrap();
    assert!(
        two.claim(request("s", LONG)).await.unwrap().is_empty(),
        "a stale unclaim released the newer claim: the delivery could go out twice at once"
    );
    let far = now_ms() + 3_600_000;
    for outcome in [
        Outcome::Done { attempts: 1 },
        Outcome::Dead {
            attempts: 1,
            error: "stale".into(),
        },
        Outcome::Retry {
            attempts: 1,
            next_attempt_at_ms: far,
            error: "stale".into(),
        },
    ] {
        one.record(&stale, outcome.clone()).await.unwrap();
        two.record(&theirs, outcome).await.unwrap();
    }
    assert_eq!(
        db.count("pending").await,
        1,
        "a stale outcome finished the row"
    );
    assert_eq!(
        row_value(&db, "attempts::bigint", "s").await,
        0,
        "a stale retry was recorded"
    );

    // The newer claim is intact: it renews, and its outcome is the one recorded.
    assert!(one.renew(&newer, LONG).await.unwrap());
    one.record(&newer, Outcome::Done { attempts: 1 })
        .await
        .unwrap();
    assert_eq!(db.count("done").await, 1);
    one.close().await;
    two.close().await;
}

#[tokio::test]
async fn due_times_and_leases_are_on_the_databases_clock_not_the_relays() {
    let db = TestDb::create().await;
    let store = PostgresStore::open(&pg_config(&db)).await.unwrap();
    let mut c = db.connect().await;
    let minute: i64 = 60_000;
    let hour: i64 = 3_600_000;
    // The database's clock (which every relay compares against) is an hour ahead of this
    // relay's, then an hour behind: this relay's clock is wrong.
    for (skew, dest) in [(hour, "relay_behind"), (-hour, "relay_ahead")] {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "CREATE OR REPLACE FUNCTION faceio_relay_now_ms() RETURNS BIGINT LANGUAGE sql VOLATILE
             AS $$ SELECT (extract(epoch FROM clock_timestamp()) * 1000)::BIGINT + ({skew}) $$"
        )))
        .execute(&mut c)
        .await
        .unwrap();

        // A delivery accepted here is due at once, on the database's clock.
        store
            .insert_event(&verified("AUTH"), &[dest])
            .await
            .unwrap();
        let claimed = store.claim(request(dest, LONG)).await.unwrap();
        assert_eq!(
            claimed.len(),
            1,
            "{dest}: a new delivery is not due at once"
        );
        let lease = row_value(&db, "lease_until - faceio_relay_now_ms()", dest).await;
        assert!(
            (minute - 10_000..=minute + 1).contains(&lease),
            "{dest}: a 60 s lease runs out in {lease} ms on the database's clock"
        );

        // A retry in a minute is a minute away on the database's clock: no other relay
        // retries it early (or an hour late).
        store
            .record(
                &claimed[0],
                Outcome::Retry {
                    attempts: 1,
                    next_attempt_at_ms: now_ms() + minute,
                    error: "HTTP 500".into(),
                },
            )
            .await
            .unwrap();
        let due_in = row_value(&db, "next_attempt_at - faceio_relay_now_ms()", dest).await;
        assert!(
            (minute - 10_000..=minute + 1).contains(&due_in),
            "{dest}: a retry in 60 s is due in {due_in} ms on the database's clock"
        );
        // Nor does this relay: due and claim ask the database's clock.
        assert!(
            store.due(dest, now_ms(), 10).await.unwrap().is_empty(),
            "{dest}: retried early"
        );
        assert!(
            store.claim(request(dest, LONG)).await.unwrap().is_empty(),
            "{dest}: retried early"
        );
        let next = store.next_due_after(dest, now_ms()).await.unwrap();
        let wait = next.map(|at| at - now_ms());
        assert!(
            wait.is_some_and(|w| (minute - 10_000..=minute + 1_000).contains(&w)),
            "{dest}: next due in {wait:?} ms by this relay's clock, not about 60000"
        );
        // A minute on, it is due.
        let later = ClaimRequest {
            now_ms: now_ms() + minute + 1_000,
            ..request(dest, LONG)
        };
        assert_eq!(store.claim(later).await.unwrap().len(), 1, "{dest}");
    }
    store.close().await;
}
