//! Several whole relays on one database (in-process, and as binaries for kill -9): each
//! event delivered once, one rate limit, ownership moving without overlapping attempts.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use faceio_relay::store::Store;
use faceio_relay::store::postgres::PostgresStore;

use crate::common::pg::{self, TestDb, Tracker, within};
use crate::common::proc::Relayd;
use crate::common::store::{LONG, request};
use crate::common::{TOKEN, TestRelay, event};
use crate::pg_config;

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
pub(crate) fn http_destination(url: &str, extra: &str) -> String {
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
