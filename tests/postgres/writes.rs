//! Writing in groups: several relays applying the schema at once, events and outcomes
//! written together, each landing (or failing) on its own.

use faceio_relay::event::VerifiedEvent;
use faceio_relay::event::now_ms;
use faceio_relay::store::postgres::PostgresStore;
use faceio_relay::store::{ClaimRequest, Outcome, Store};

use crate::common::pg::TestDb;
use crate::common::store::{LONG, request, verified};
use crate::pg_config;

#[tokio::test]
async fn relays_starting_at_once_apply_the_schema_once() {
    let db = TestDb::create().await;
    // Three processes starting at once apply the schema once (the migration lock).
    let cfg = pg_config(&db);
    let (a, b, c) = tokio::join!(
        PostgresStore::open(&cfg),
        PostgresStore::open(&cfg),
        PostgresStore::open(&cfg),
    );
    let (store, _b, _c) = (a.unwrap(), b.unwrap(), c.unwrap());
    assert_eq!(store.backend(), "postgres");

    // One schema, shared: what one writes, the others read.
    _b.insert_event(&verified("AUTH"), &["a"]).await.unwrap();
    assert_eq!(store.due("a", now_ms(), 10).await.unwrap().len(), 1);
    store.close().await;
}

/// Events are written in groups; an event PostgreSQL refuses (here: an ID already
/// stored) fails alone, never the events that shared its group.
#[tokio::test]
async fn a_refused_event_fails_alone_not_its_group() {
    let db = TestDb::create().await;
    let store = PostgresStore::open(&pg_config(&db)).await.unwrap();
    let twice = verified("AUTH");
    store.insert_event(&twice, &["d"]).await.unwrap();
    let others: Vec<VerifiedEvent> = (0..40).map(|_| verified("ENROLL")).collect();
    // All at once, so they queue together and are written in as few groups as possible.
    let (again, results) = tokio::join!(
        store.insert_event(&twice, &["d"]),
        futures_util::future::join_all(others.iter().map(|e| store.insert_event(e, &["d"]))),
    );
    assert!(again.is_err(), "the same event ID twice is refused");
    for r in results {
        r.expect("an event grouped with a refused one is still written");
    }
    assert_eq!(db.count("pending").await, 41);
    store.close().await;
}

/// Outcomes are written in groups too: a group of mixed outcomes, recorded at once,
/// applies each one to its own row (done, retried later with its error, dead-lettered).
/// An error text with U+0000 (which PostgreSQL text cannot hold, and which would fail
/// the whole group at every retry) is stored with U+FFFD in its place.
#[tokio::test]
async fn outcomes_recorded_together_each_land_on_their_own_row() {
    let db = TestDb::create().await;
    let store = PostgresStore::open(&pg_config(&db)).await.unwrap();
    for _ in 0..30 {
        store.insert_event(&verified("AUTH"), &["m"]).await.unwrap();
    }
    let claimed = store
        .claim(ClaimRequest {
            want: 30,
            ..request("m", LONG)
        })
        .await
        .unwrap();
    assert_eq!(claimed.len(), 30);
    let minute = 60_000;
    let outcome = |i: usize| match i % 3 {
        0 => Outcome::Done { attempts: 1 },
        1 => Outcome::Retry {
            attempts: 1,
            next_attempt_at_ms: now_ms() + minute,
            error: format!("retry {i}"),
        },
        _ => Outcome::Dead {
            attempts: 1,
            error: format!("dead\0{i}"),
        },
    };
    let recorded = futures_util::future::join_all(
        claimed
            .iter()
            .enumerate()
            .map(|(i, d)| store.record(d, outcome(i))),
    )
    .await;
    assert!(recorded.iter().all(Result::is_ok), "{recorded:?}");
    assert_eq!(db.count("done").await, 10);
    assert_eq!(db.count("dead").await, 10);
    assert_eq!(db.count("pending").await, 10);
    // The retried ones are not due now, are due in a minute, and carry their own error.
    assert!(store.due("m", now_ms(), 100).await.unwrap().is_empty());
    let later = store
        .due("m", now_ms() + minute + 1_000, 100)
        .await
        .unwrap();
    assert_eq!(later.len(), 10);
    let mut conn = db.connect().await;
    let rows: Vec<(i64, String, i32, Option<String>)> =
        sqlx::query_as("SELECT id, state, attempts, last_error FROM deliveries ORDER BY id")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    for (i, d) in claimed.iter().enumerate() {
        let (_, state, attempts, error) = rows.iter().find(|r| r.0 == d.id).unwrap();
        assert_eq!(*attempts, 1);
        match i % 3 {
            0 => assert_eq!((state.as_str(), error.as_deref()), ("done", None)),
            1 => assert_eq!(
                (state.as_str(), error.as_deref()),
                ("pending", Some(format!("retry {i}").as_str()))
            ),
            _ => assert_eq!(
                (state.as_str(), error.as_deref()),
                ("dead", Some(format!("dead\u{FFFD}{i}").as_str()))
            ),
        }
    }
    store.close().await;
}

/// Recording outcomes keeps its pace however many deliveries this relay has claimed,
/// on a fresh table without statistics (autoanalyze comes a minute later). Before, the
/// planner could scan every pending row for each group and compare it with each outcome
/// of the group: 1.3 s per group of 256 with 15,000 rows claimed (EXPLAIN ANALYZE), so
/// under load outcomes fell behind delivery, more rows stayed claimed, and the next group
/// was slower still. Here 60,000 rows are claimed (the old statement took several seconds
/// for these 256 outcomes; the new one takes milliseconds).
#[tokio::test]
async fn outcomes_are_recorded_promptly_with_many_deliveries_claimed() {
    let db = TestDb::create().await;
    let store = PostgresStore::open(&pg_config(&db)).await.unwrap();
    let events: Vec<VerifiedEvent> = (0..256).map(|_| verified("AUTH")).collect();
    for r in
        futures_util::future::join_all(events.iter().map(|e| store.insert_event(e, &["m"]))).await
    {
        r.unwrap();
    }
    let claimed = store
        .claim(ClaimRequest {
            want: 256,
            ..request("m", LONG)
        })
        .await
        .unwrap();
    assert_eq!(claimed.len(), 256);
    // Deliveries under way at this relay whose outcomes are not in yet.
    let mut conn = db.connect().await;
    sqlx::query(
        "INSERT INTO events (id, received_at, app_id, event_name, facial_id, client_ip, payload)
         SELECT 'busy-' || g, 0, 'app', 'AUTH', 'f', '1.2.3.4', '{}'
         FROM generate_series(1, 60000) AS g",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO deliveries (event_id, destination, state, attempts, next_attempt_at,
                                 updated_at, claimed_by, lease_until, claim_seq)
         SELECT 'busy-' || g, 'm', 'pending', 0, faceio_relay_now_ms(), faceio_relay_now_ms(),
                $1, faceio_relay_now_ms() + 60000, 1
         FROM generate_series(1, 60000) AS g",
    )
    .bind(store.instance())
    .execute(&mut conn)
    .await
    .unwrap();

    let started = std::time::Instant::now();
    let recorded = futures_util::future::join_all(
        claimed
            .iter()
            .map(|d| store.record(d, Outcome::Done { attempts: 1 })),
    )
    .await;
    let took = started.elapsed();
    assert!(recorded.iter().all(Result::is_ok), "{recorded:?}");
    assert_eq!(db.count("done").await, 256);
    assert_eq!(db.count("pending").await, 60_000);
    assert!(
        took < std::time::Duration::from_secs(2),
        "256 outcomes took {took:?} to record with 60,000 deliveries claimed"
    );
    store.close().await;
}
