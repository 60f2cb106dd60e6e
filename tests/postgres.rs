//! The PostgreSQL store against the real server on 127.0.0.1:5432 (`.ci/run` starts it):
//! the `Store` contract, claims, leases and ownership between processes, and several
//! relays on one database (in-process, and as binaries for kill -9). Every test makes its
//! own database and drops it.

mod common;
use common::pg;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use faceio_relay::config::{Application, PostgresConfig, Secret, StoreBackend};
use faceio_relay::event::VerifiedEvent;
use faceio_relay::event::now_ms;
use faceio_relay::event::verify::{authenticate, verify};
use faceio_relay::store::postgres::PostgresStore;
use faceio_relay::store::{ClaimRequest, Delivery, Outcome, Selection, Store, Wake};

use common::proc::{Relayd, cli, dead_letters_json};
use common::{APP, Receiver, Reply, TOKEN, TestRelay, event};
use pg::{TestDb, Tracker, within};

fn pg_config(db: &TestDb) -> PostgresConfig {
    PostgresConfig {
        url: Secret::new(db.url.clone()),
        pool_size: 4,
    }
}

fn verified(name: &str) -> VerifiedEvent {
    let apps = vec![Application::new(APP, Secret::new(TOKEN.into()))];
    let auth = authenticate(&apps, Some(TOKEN.as_bytes())).unwrap();
    let body =
        format!(r#"{{"eventName":"{name}","facialId":"f","appId":"{APP}","clientIp":"1.2.3.4"}}"#);
    verify(auth, Bytes::from(body)).unwrap()
}

const LONG: Duration = Duration::from_secs(60);

/// A claim of up to 10 due deliveries of `destination`, nothing in flight, taking over
/// from other processes allowed.
fn request(destination: &str, lease: Duration) -> ClaimRequest<'_> {
    ClaimRequest {
        destination,
        now_ms: now_ms(),
        want: 10,
        in_flight: &[],
        lease,
        take_over: true,
    }
}

/// Claims the first due delivery of `destination` and records it dead with `error`.
async fn claim_and_dead_letter(store: &PostgresStore, destination: &str, error: &str) -> Delivery {
    let d = store
        .claim(request(destination, LONG))
        .await
        .unwrap()
        .remove(0);
    store
        .record(
            &d,
            Outcome::Dead {
                attempts: 1,
                error: error.into(),
            },
        )
        .await
        .unwrap();
    d
}

/// `dead-letters replay` through the store: requested, decided by a relay running
/// `running`, collected. Returns how many were queued again.
async fn replay(store: &PostgresStore, selection: &Selection, running: &[&str]) -> u64 {
    store.request_replay(selection, "test-batch").await.unwrap();
    store.decide_replays(running).await.unwrap();
    let verdict = store.replay_verdict("test-batch").await.unwrap();
    store.forget_replay("test-batch").await.unwrap();
    verdict.replayed.iter().map(|(_, n)| n).sum()
}

#[tokio::test]
async fn store_contract_holds_on_postgres() {
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

    // insert / due / stats
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

    // retry / next_due_after / done; outcomes apply to the claim they name
    let a = store.claim(request("a", LONG)).await.unwrap().remove(0);
    assert_eq!(a.id, due_a[0].id);
    assert!(a.claim.is_some(), "a claim carries its token");
    let later = now_ms() + 60_000;
    store
        .record(
            &a,
            Outcome::Retry {
                attempts: 1,
                next_attempt_at_ms: later,
                error: "HTTP 500".into(),
            },
        )
        .await
        .unwrap();
    assert!(store.due("a", now_ms(), 10).await.unwrap().is_empty());
    // Times go through the database's clock: equal to the relay's here, give or take
    // the round trips.
    let next = store.next_due_after("a", now_ms()).await.unwrap().unwrap();
    assert!((next - later).abs() < 1000, "{next} vs {later}");
    assert_eq!(store.next_due_after("a", later + 1000).await.unwrap(), None);
    assert_eq!(
        store.due("a", later + 1000, 10).await.unwrap()[0].attempts,
        1
    );
    let a = store
        .claim(ClaimRequest {
            now_ms: later + 1000,
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

    // dead letters: list, show, replay, purge
    let b = claim_and_dead_letter(&store, "b", "HTTP 404: channel_not_found").await;
    let dead = store.dead_letters(None, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].id, b.id);
    assert_eq!(dead[0].last_error, "HTTP 404: channel_not_found");
    assert_eq!(dead[0].event_name, "ENROLL");
    assert_eq!(store.dead_letters(Some("a"), 10).await.unwrap(), vec![]);
    let (shown, body) = store.dead_letter(b.id).await.unwrap().unwrap();
    assert_eq!(shown, dead[0]);
    assert_eq!(body, ev.body());
    assert!(store.dead_letter(a.id).await.unwrap().is_none(), "not dead");
    let stats = store.destination_stats().await.unwrap();
    assert_eq!(stats.len(), 1, "a is done: {stats:?}");
    assert_eq!((stats[0].destination.as_str(), stats[0].dead), ("b", 1));
    assert_eq!(
        replay(&store, &Selection::Destination("b".into()), &["b"]).await,
        1
    );
    assert_eq!(store.due("b", now_ms(), 10).await.unwrap()[0].attempts, 0);
    // An outcome for the claim from before the replay is not applied.
    store
        .record(
            &b,
            Outcome::Dead {
                attempts: 1,
                error: "late".into(),
            },
        )
        .await
        .unwrap();
    assert_eq!(db.count("pending").await, 1);
    let b = claim_and_dead_letter(&store, "b", "again").await;
    assert_eq!(replay(&store, &Selection::Ids(vec![b.id]), &["b"]).await, 1);
    let b = claim_and_dead_letter(&store, "b", "again").await;
    assert_eq!(store.purge(&Selection::Ids(vec![b.id])).await.unwrap(), 1);
    assert!(store.dead_letters(None, 10).await.unwrap().is_empty());

    // orphans, then prune: the dead letter keeps its event, the done delivery goes
    let ev2 = verified("AUTH");
    store
        .insert_event(&ev2, &["kept", "removed"])
        .await
        .unwrap();
    assert_eq!(
        store.dead_letter_orphans(&["kept", "a"]).await.unwrap(),
        [("removed".to_string(), 1)]
    );
    let dead = store.dead_letters(None, 10).await.unwrap();
    assert_eq!(dead[0].destination, "removed");
    assert!(dead[0].last_error.contains("no longer in the config"));
    let kept = store.claim(request("kept", LONG)).await.unwrap().remove(0);
    store
        .record(&kept, Outcome::Done { attempts: 1 })
        .await
        .unwrap();
    // `a` (done) and `kept` (done) go, and the first event with them. The rows' times
    // come from the database's clock, rounded to the nearest ms (this process truncates),
    // so the cutoff is a second ahead, not one ms: with +1 the test failed once in CI.
    let cutoff = now_ms() + 1_000;
    assert_eq!(store.prune(cutoff).await.unwrap(), 3);
    assert_eq!(store.dead_letters(None, 10).await.unwrap().len(), 1);
    store.purge(&Selection::All).await.unwrap();
    assert_eq!(store.prune(cutoff).await.unwrap(), 1, "now ev2 goes");

    store.ping().await.unwrap();
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

#[tokio::test]
async fn claims_leases_and_ownership_keep_processes_apart() {
    let db = TestDb::create().await;
    let one = PostgresStore::open(&pg_config(&db)).await.unwrap();
    let two = PostgresStore::open(&pg_config(&db)).await.unwrap();
    let minute = Duration::from_secs(60);

    // A claimed row is not handed to another process, nor to the same one twice.
    one.insert_event(&verified("AUTH"), &["c"]).await.unwrap();
    let claimed = one.claim(request("c", minute)).await.unwrap();
    assert_eq!(claimed.len(), 1);
    let c = claimed[0].clone();
    assert!(two.claim(request("c", minute)).await.unwrap().is_empty());
    assert!(one.claim(request("c", minute)).await.unwrap().is_empty());
    assert!(!two.renew(&c, minute).await.unwrap(), "not two's claim");
    assert!(one.renew(&c, minute).await.unwrap());
    // Given back, it goes to the other; the first may neither renew nor record it.
    one.unclaim(std::slice::from_ref(&c)).await.unwrap();
    let c2 = two.claim(request("c", minute)).await.unwrap().remove(0);
    assert_eq!(c2.id, c.id);
    assert!(!one.renew(&c, minute).await.unwrap());
    one.record(&c, Outcome::Done { attempts: 1 }).await.unwrap();
    assert_eq!(
        db.count("pending").await,
        1,
        "one's outcome was not applied"
    );
    two.record(&c2, Outcome::Done { attempts: 1 })
        .await
        .unwrap();
    assert_eq!(db.count("done").await, 1);

    // A lease that runs out frees the row for another process, unless it asks not to take
    // over others' rows (a new owner, during its first lease).
    one.insert_event(&verified("AUTH"), &["d"]).await.unwrap();
    let short = Duration::from_millis(300);
    let d = one.claim(request("d", short)).await.unwrap().remove(0);
    assert!(two.claim(request("d", minute)).await.unwrap().is_empty());
    let taken = std::sync::Mutex::new(Vec::new());
    within(Duration::from_secs(10), "the lease to run out", || async {
        let patient = ClaimRequest {
            take_over: false,
            ..request("d", minute)
        };
        assert!(
            two.claim(patient).await.unwrap().is_empty(),
            "taken over from another process although asked not to"
        );
        let got = two.claim(request("d", minute)).await.unwrap();
        let any = !got.is_empty();
        taken.lock().unwrap().extend(got);
        any
    })
    .await;
    assert_eq!(taken.lock().unwrap()[0].id, d.id);
    assert!(!one.renew(&d, minute).await.unwrap(), "one lost it");

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
        one.dead_letter_orphans(&["c", "d", "x"]).await.unwrap(),
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

/// Two stores on `db`; the first listens for wake-ups and is ready to hear them.
async fn listening_pair(
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

#[tokio::test]
async fn a_relay_that_does_not_own_a_file_destination_never_opens_or_repairs_it() {
    let db = TestDb::create().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("shared/events.jsonl");
    let config = pg::write_config(
        dir.path(),
        &db,
        "200ms",
        &format!(
            "destinations:\n  audit:\n    type: file\n    path: {}\nroutes:\n  - to: audit\n",
            file.display()
        ),
    );
    let load = || faceio_relay::config::load(&config).unwrap().0;
    let owner = TestRelay::start(load()).await;
    owner.send(&event("AUTH", "first")).await;
    within(
        Duration::from_secs(10),
        "the owner wrote a line",
        || async { std::fs::read_to_string(&file).is_ok_and(|t| t.contains("first")) },
    )
    .await;
    // The owner is half way through a line (as seen on shared storage): a relay that
    // opened the file would cut this tail as torn.
    let mut text = std::fs::read_to_string(&file).unwrap();
    text.push_str("{\"id\":\"being-written");
    std::fs::write(&file, &text).unwrap();

    let standby = TestRelay::start(load()).await;
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        text,
        "a relay that does not own the destination repaired its file at start"
    );
    standby.relay.reload(load()).await.unwrap();
    standby.relay.reopen().await;
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        text,
        "a relay that does not own the destination reopened its file on reload"
    );
    standby.shutdown().await;
    owner.shutdown().await;
}

/// Destinations and routes for relays sending every event to `url` over HTTP.
fn http_destination(url: &str, extra: &str) -> String {
    format!(
        "destinations:\n  api:\n    type: http\n    url: {url}\n    timeout: 2s\n{extra}\
         routes:\n  - to: api\n"
    )
}

async fn start_three(config: &std::path::Path) -> Vec<TestRelay> {
    let mut relays = Vec::new();
    for _ in 0..3 {
        let (cfg, _) = faceio_relay::config::load(config).unwrap();
        relays.push(TestRelay::start(cfg).await);
    }
    relays
}

#[tokio::test]
async fn three_relays_deliver_each_event_once_and_start_at_once() {
    let db = TestDb::create().await;
    let dir = tempfile::tempdir().unwrap();
    let tracker = Tracker::start(Duration::ZERO).await;
    // A long poll interval: only the notification can explain a delivery that starts
    // quickly at the owner when another relay accepted the event.
    let config = pg::write_config(
        dir.path(),
        &db,
        "10s",
        &http_destination(&tracker.url(), ""),
    );
    let relays = start_three(&config).await;
    let mut ids = Vec::new();
    let mut slowest = Duration::ZERO;
    for i in 0..30 {
        let relay = &relays[i % 3];
        let sent = Instant::now();
        let (status, body) = relay.send(&event("AUTH", &format!("f{i}"))).await;
        assert_eq!(status, 200, "{body}");
        let id = body["id"].as_str().unwrap().to_string();
        within(Duration::from_secs(5), "the delivery", || async {
            tracker.per_event().contains_key(&id)
        })
        .await;
        slowest = slowest.max(sent.elapsed());
        ids.push(id);
    }
    assert!(
        slowest < Duration::from_secs(2),
        "a delivery took {slowest:?}: not woken by the notification"
    );
    let per_event = tracker.per_event();
    for id in &ids {
        assert_eq!(per_event.get(id), Some(&1), "event {id} delivered once");
    }
    assert_eq!(tracker.max_concurrent(), 1);
    within(Duration::from_secs(10), "outcomes recorded", || async {
        db.count("done").await == 30
    })
    .await;
    for r in relays {
        r.shutdown().await;
    }
}

#[tokio::test]
async fn a_rate_limit_holds_across_three_relays() {
    let db = TestDb::create().await;
    let dir = tempfile::tempdir().unwrap();
    let tracker = Tracker::start(Duration::ZERO).await;
    let config = pg::write_config(
        dir.path(),
        &db,
        "200ms",
        &http_destination(
            &tracker.url(),
            "    concurrency: 4\n    rate_limit: { per_second: 5, burst: 1 }\n",
        ),
    );
    let relays = start_three(&config).await;
    let n = 26;
    for i in 0..n {
        let (status, _) = relays[i % 3].send(&event("AUTH", &format!("f{i}"))).await;
        assert_eq!(status, 200);
    }
    within(LONG, "every delivery", || async {
        tracker.arrivals().len() >= n
    })
    .await;
    let arrivals = tracker.arrivals();
    assert_eq!(arrivals.len(), n, "no duplicates");
    let span = arrivals[n - 1].at - arrivals[0].at;
    let rate = (n - 1) as f64 / span.as_secs_f64();
    assert!(
        (4.5..=5.5).contains(&rate),
        "{rate:.2}/s over {span:?} across three relays; the limit is 5/s"
    );
    for r in relays {
        r.shutdown().await;
    }
}

#[tokio::test]
async fn kill_9_of_the_owner_under_load_loses_nothing_and_never_overlaps() {
    let db = TestDb::create().await;
    let dir = tempfile::tempdir().unwrap();
    // Each request takes a while, so attempts are under way when the owner dies.
    let tracker = Tracker::start(Duration::from_millis(40)).await;
    let config = pg::write_config(
        dir.path(),
        &db,
        "200ms",
        &http_destination(&tracker.url(), "    concurrency: 4\n"),
    );
    let mut relays = Vec::new();
    for _ in 0..3 {
        relays.push(Relayd::start(&config).await);
    }
    // The first started owns `api`; the others say they stand by.
    relays[1].wait_log("standing by").await;
    relays[2].wait_log("standing by").await;
    let urls: Vec<String> = relays.iter().map(Relayd::url).collect();
    let owner = relays.remove(0);

    let client = reqwest::Client::new();
    let accepted = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let total = 240;
    let senders: Vec<_> = (0..4)
        .map(|s| {
            let client = client.clone();
            let urls = urls.clone();
            let accepted = Arc::clone(&accepted);
            tokio::spawn(async move {
                for i in (s..total).step_by(4) {
                    let url = &urls[i % 3];
                    let mut req = client.post(url).json(&event("AUTH", &format!("f{i}")));
                    req = req.header("WWW-Authenticate", format!("Bearer {TOKEN}"));
                    // A killed relay refuses or drops the request: that event got no
                    // 200, so it is not counted.
                    if let Ok(resp) = req.send().await
                        && resp.status() == 200
                        && let Ok(body) = resp.json::<serde_json::Value>().await
                    {
                        accepted
                            .lock()
                            .unwrap()
                            .push(body["id"].as_str().unwrap().to_string());
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        })
        .collect();
    within(LONG, "deliveries under way", || async {
        tracker.arrivals().len() >= 40
    })
    .await;
    let killed_at = Instant::now();
    owner.kill9().await;
    for s in senders {
        s.await.unwrap();
    }
    let accepted: Vec<String> = accepted.lock().unwrap().clone();
    assert!(accepted.len() > total / 2, "most events were accepted");

    // Every accepted event reaches the destination (or the dead letters), after the
    // survivors take the destination over and the dead owner's leases run out.
    let mut c = db.connect().await;
    let deadline = Instant::now() + LONG;
    loop {
        let delivered: HashSet<String> = tracker.per_event().into_keys().collect();
        let dead: HashSet<String> =
            sqlx::query_scalar("SELECT event_id FROM deliveries WHERE state = 'dead'")
                .fetch_all(&mut c)
                .await
                .unwrap()
                .into_iter()
                .collect();
        let missing: Vec<&String> = accepted
            .iter()
            .filter(|id| !delivered.contains(*id) && !dead.contains(*id))
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} accepted events never delivered: {missing:?}",
            missing.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        tracker.arrivals().iter().any(|a| a.at > killed_at),
        "a survivor took over"
    );
    assert_eq!(
        tracker.max_concurrent(),
        1,
        "an event was under way at two relays at once"
    );
    for r in relays {
        r.terminate(Duration::from_secs(10)).await;
    }
}

#[tokio::test]
async fn ownership_moving_away_from_a_live_relay_never_overlaps_attempts() {
    let db = TestDb::create().await;
    let dir = tempfile::tempdir().unwrap();
    // Slow answers: the old owner's attempts are still under way when the other relay
    // becomes the owner.
    let tracker = Tracker::start(Duration::from_millis(1500)).await;
    let config = pg::write_config(
        dir.path(),
        &db,
        "200ms",
        &http_destination(&tracker.url(), "    concurrency: 4\n"),
    );
    let relays = start_three(&config).await;
    let mut ids = Vec::new();
    for i in 0..8 {
        let (status, body) = relays[i % 3].send(&event("AUTH", &format!("h{i}"))).await;
        assert_eq!(status, 200);
        ids.push(body["id"].as_str().unwrap().to_string());
    }
    within(Duration::from_secs(10), "attempts under way", || async {
        tracker.arrivals().len() >= 4
    })
    .await;
    // The owner's lock connection dies while the owner lives on: another relay takes the
    // destination at once, the old owner notices within a second.
    let mut c = db.connect().await;
    let ended: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_locks
         WHERE locktype = 'advisory' AND granted
           AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
           AND objid = (faceio_relay_destination_key('api') & 4294967295)::oid",
    )
    .fetch_all(&mut c)
    .await
    .unwrap();
    assert_eq!(ended, vec![true], "one owner");
    within(LONG, "every event delivered", || async {
        let got = tracker.per_event();
        ids.iter().all(|id| got.contains_key(id))
    })
    .await;
    within(LONG, "every outcome recorded", || async {
        db.count("done").await == 8
    })
    .await;
    assert_eq!(
        tracker.max_concurrent(),
        1,
        "an event was under way at two relays at once"
    );
    let per_event = tracker.per_event();
    assert!(
        per_event.values().all(|&n| n == 1),
        "the new owner re-sent a delivery the old one had under way: {per_event:?}"
    );
    for r in relays {
        r.shutdown().await;
    }
}

#[tokio::test]
async fn attempts_waiting_when_ownership_is_lost_give_their_deliveries_back() {
    let db = TestDb::create().await;
    let dir = tempfile::tempdir().unwrap();
    let tracker = Tracker::start(Duration::ZERO).await;
    // One delivery every 10 s: after the first, four attempts (four slots) wait for the
    // rate limit, their deliveries claimed for a lease of 35 s (timeout + 5 s); the sixth
    // waits, read ahead (claimed too) or not yet read.
    let body = format!(
        "destinations:\n  api:\n    type: http\n    url: {}\n    timeout: 30s\n    concurrency: 4\n    \
         rate_limit: {{ per_second: 0.1, burst: 1 }}\nroutes:\n  - to: api\n",
        tracker.url()
    );
    let config = pg::write_config(dir.path(), &db, "200ms", &body);
    let (cfg, _) = faceio_relay::config::load(&config).unwrap();
    let relay = TestRelay::start(cfg).await;
    for i in 0..6 {
        let (status, body) = relay.send(&event("AUTH", &format!("r{i}"))).await;
        assert_eq!(status, 200, "{body}");
    }
    let mut c = db.connect().await;
    let claimed =
        "SELECT COUNT(*) FROM deliveries WHERE state = 'pending' AND claimed_by IS NOT NULL";
    within(
        Duration::from_secs(10),
        "one delivered, the next four claimed",
        || async {
            let mut c = db.connect().await;
            let n: i64 = sqlx::query_scalar(claimed).fetch_one(&mut c).await.unwrap();
            tracker.arrivals().len() == 1 && db.count("done").await == 1 && n >= 4
        },
    )
    .await;

    // Another process takes the destination over: it queues for the lock, and the
    // relay's lock session ends (the relay lives on).
    let key = "(faceio_relay_destination_key('api') & 4294967295)::oid";
    let mut holder = db.connect().await;
    let taken = tokio::spawn(async move {
        sqlx::query("SELECT pg_advisory_lock(faceio_relay_destination_key('api'))")
            .execute(&mut holder)
            .await
            .unwrap();
        holder
    });
    within(
        Duration::from_secs(10),
        "the lock to be asked for",
        || async {
            let mut c = db.connect().await;
            let waiting: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted
               AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
               AND objid = {key}"
            )))
            .fetch_one(&mut c)
            .await
            .unwrap();
            waiting == 1
        },
    )
    .await;
    let ended: Vec<bool> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT pg_terminate_backend(pid) FROM pg_locks
         WHERE locktype = 'advisory' AND granted
           AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
           AND objid = {key}"
    )))
    .fetch_all(&mut c)
    .await
    .unwrap();
    assert_eq!(ended, vec![true], "one owner");
    let holder = tokio::time::timeout(Duration::from_secs(10), taken)
        .await
        .expect("the new owner gets the lock")
        .unwrap();

    // The relay notices within a second; its waiting attempts stop and give their claims
    // back, so the new owner has all five at once rather than after the 35 s lease (or
    // after the old owner sent them past the new owner's rate limit).
    let new_owner = PostgresStore::open(&pg_config(&db)).await.unwrap();
    let got = std::sync::Mutex::new(Vec::new());
    within(
        Duration::from_secs(10),
        "the five deliveries given back",
        || async {
            let claimed = new_owner.claim(request("api", LONG)).await.unwrap();
            let mut got = got.lock().unwrap();
            got.extend(claimed);
            got.len() == 5
        },
    )
    .await;
    assert_eq!(
        tracker.arrivals().len(),
        1,
        "the old owner sent a delivery after losing the destination"
    );
    assert_eq!(db.count("pending").await, 5, "nothing lost");
    relay.shutdown().await;
    new_owner.close().await;
    drop(holder);
}

#[test]
fn the_postgres_fixture_is_typed_as_written() {
    let file =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/config/valid/postgres.yaml");
    let text = std::fs::read_to_string(&file).unwrap();
    let env = |name: &str| match name {
        "FACEIO_TOKEN" => Some("tok".to_string()),
        "CRM_TOKEN" => Some("pg-password-77".to_string()),
        _ => None,
    };
    let (config, warnings) = faceio_relay::config::load_str(&text, &file, &env).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    let StoreBackend::Postgres(pg) = &config.store.backend else {
        panic!("{:?}", config.store.backend)
    };
    assert_eq!(pg.pool_size, 16);
    assert!(
        pg.url
            .expose()
            .contains(":pg-password-77@db.internal:5432/relay")
    );
    assert_eq!(config.store.retention, Duration::from_secs(3 * 86_400));
    let shown = format!("{config:?}\n{}", config.summary());
    assert!(shown.contains("store postgres"), "{shown}");
    assert!(!shown.contains("pg-password-77"), "{shown}");
    assert!(!shown.contains("db.internal"), "{shown}");
}

#[tokio::test]
async fn postgres_down_means_503_never_200_and_recovery_delivers() {
    let db = TestDb::create().await;
    let dir = tempfile::tempdir().unwrap();
    let tracker = Tracker::start(Duration::ZERO).await;
    let config = pg::write_config(
        dir.path(),
        &db,
        "200ms",
        &http_destination(&tracker.url(), ""),
    );
    let (cfg, _) = faceio_relay::config::load(&config).unwrap();
    let relay = TestRelay::start(cfg).await;
    let admin = format!("http://{}/readyz", relay.relay.admin_addr().unwrap());
    assert_eq!(
        reqwest::get(&admin).await.unwrap().status(),
        200,
        "ready while PostgreSQL answers"
    );

    db.cut_off().await;
    for i in 0..3 {
        let (status, body) = relay.send(&event("AUTH", &format!("down{i}"))).await;
        assert_eq!(status, 503, "{body}");
    }
    // `/readyz` answers from a probe at most a second old.
    within(Duration::from_secs(10), "/readyz says 503", || async {
        reqwest::get(&admin).await.unwrap().status() == 503
    })
    .await;

    db.restore().await;
    // Like FACEIO, retry until accepted: the pool reconnects.
    let deadline = Instant::now() + Duration::from_secs(20);
    let id = loop {
        let (status, body) = relay.send(&event("AUTH", "back")).await;
        assert!(status == 200 || status == 503, "{status} {body}");
        if status == 200 {
            break body["id"].as_str().unwrap().to_string();
        }
        assert!(Instant::now() < deadline, "never accepted again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // The dispatcher lost its destination lock with the connection and takes it again.
    within(Duration::from_secs(20), "the delivery", || async {
        tracker.per_event().contains_key(&id)
    })
    .await;
    assert_eq!(
        tracker.per_event().len(),
        1,
        "nothing answered 503 was delivered"
    );
    // Ready again once a probe (at most a second old) sees PostgreSQL answer.
    within(
        Duration::from_secs(10),
        "/readyz says 200 again",
        || async { reqwest::get(&admin).await.unwrap().status() == 200 },
    )
    .await;
    relay.shutdown().await;
}

#[tokio::test]
async fn check_dead_letters_and_metrics_work_against_postgres() {
    let db = TestDb::create().await;
    let dir = tempfile::tempdir().unwrap();
    let mut receiver = Receiver::start(Reply::status(404).body("no_such_hook")).await;
    let body = format!(
        "destinations:\n  api:\n    type: http\n    url: {}\n  spare:\n    type: http\n    url: {}\n\
         routes:\n  - to: [api, spare]\n",
        receiver.url(),
        receiver.url()
    );
    let config = pg::write_config(dir.path(), &db, "200ms", &body);
    // A password in the URL (trust auth ignores it) must never be shown.
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("postgres://postgres@", "postgres://postgres:pw-s3cret-42@");
    std::fs::write(&config, text).unwrap();

    let out = cli(&config, &["check"]).await;
    assert!(out.ok(), "{}", out.all());
    assert!(out.stdout.contains("store postgres"), "{}", out.stdout);
    assert!(!out.all().contains("pw-s3cret-42"), "{}", out.all());
    assert!(!out.all().contains(&db.name), "{}", out.all());

    let (cfg, _) = faceio_relay::config::load(&config).unwrap();
    assert!(matches!(cfg.store.backend, StoreBackend::Postgres(_)));
    let relay = TestRelay::start(cfg).await;
    let (status, _) = relay.send(&event("ENROLL", "dl")).await;
    assert_eq!(status, 200);
    receiver.next().await;
    receiver.next().await;
    within(Duration::from_secs(10), "two dead letters", || async {
        db.count("dead").await == 2
    })
    .await;

    let table = cli(&config, &["dead-letters", "list"]).await;
    assert!(table.ok(), "{}", table.all());
    assert!(
        !table.stderr.contains("already exists"),
        "PostgreSQL notices reach the terminal: {}",
        table.stderr
    );
    let listed = dead_letters_json(&config).await;
    assert_eq!(listed.len(), 2);
    assert_eq!(
        listed[0]["last_error"].as_str().map(|e| e.contains("404")),
        Some(true)
    );
    let id = listed.iter().find(|d| d["destination"] == "api").unwrap()["id"]
        .as_i64()
        .unwrap();
    let shown = cli(
        &config,
        &["dead-letters", "show", &id.to_string(), "--json"],
    )
    .await;
    assert!(shown.ok(), "{}", shown.all());
    assert!(
        shown.stdout.contains("\"dl\""),
        "payload shown: {}",
        shown.stdout
    );

    let metrics = format!("http://{}/metrics", relay.relay.admin_addr().unwrap());
    let text = reqwest::get(&metrics).await.unwrap().text().await.unwrap();
    assert!(
        text.contains("faceio_relay_dead_letters{destination=\"api\"} 1"),
        "{text}"
    );
    let ready = format!("http://{}/readyz", relay.relay.admin_addr().unwrap());
    assert_eq!(reqwest::get(&ready).await.unwrap().status(), 200);

    receiver.set_default(Reply::status(200).body("ok"));
    let replayed = cli(&config, &["dead-letters", "replay", &id.to_string()]).await;
    assert!(replayed.ok(), "{}", replayed.all());
    assert!(
        replayed.stdout.contains("replayed 1"),
        "{}",
        replayed.stdout
    );
    receiver.next().await;
    within(Duration::from_secs(10), "the replay delivered", || async {
        db.count("done").await == 1
    })
    .await;
    let purged = cli(&config, &["dead-letters", "purge", "--all"]).await;
    assert!(purged.stdout.contains("purged 1"), "{}", purged.all());
    assert!(dead_letters_json(&config).await.is_empty());
    for out in [&out, &shown, &replayed, &purged] {
        assert!(!out.all().contains("pw-s3cret-42"));
    }
    relay.shutdown().await;
}
