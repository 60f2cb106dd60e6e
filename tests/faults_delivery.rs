//! Destination faults: an outage and its recovery (without spinning while down), and a
//! destination that refuses for good. (429 storms: `faults_retry_after.rs`.)

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::faults::*;
use common::proc::*;
use common::*;

/// How long the outage's CPU is measured.
const OUTAGE_WINDOW: Duration = Duration::from_secs(3);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_is_waited_out_without_spinning_and_everything_pending_is_delivered() {
    let mut receiver = Receiver::ok().await;
    let api = Gate::start(receiver.addr, GateMode::Refuse).await;
    let doomed = Gate::start(receiver.addr, GateMode::Refuse).await;
    let setup = Setup::new();
    // `api` is down for a while and has a budget that outlasts the outage; `doomed` stays
    // down and has a budget of 3 attempts.
    let config = setup.write_config(&format!(
        "destinations:\n\
         \x20 api:\n    type: http\n    url: {}\n    concurrency: 4\n\
         \x20   retry: {{ max_attempts: 1000, initial_delay: 500ms, max_delay: 2s }}\n\
         \x20 doomed:\n    type: http\n    url: {}\n\
         \x20   retry: {{ max_attempts: 3, initial_delay: 50ms, max_delay: 100ms }}\n\
         routes:\n  - to: [api]\n  - match: {{ eventName: DELETION }}\n    to: [doomed]\n",
        api.url("/api"),
        doomed.url("/doomed"),
    ));
    let daemon = Relayd::start(&config).await;
    let client = reqwest::Client::new();
    let mut ledger = BTreeSet::new();
    for i in 0..20 {
        let face = format!("outage-{i}");
        let name = if i % 4 == 0 { "DELETION" } else { "AUTH" };
        let (status, body) = send(&client, &daemon.url(), Some(TOKEN), &event(name, &face)).await;
        assert_eq!(status, 200, "{body}");
        ledger.insert(face);
    }
    eventually("every api delivery failed at least once", || {
        api.accepted() >= 20
    })
    .await;

    // The outage: the relay waits between retries instead of spinning.
    let pid = daemon.pid();
    let (cpu0, attempts0, t0) = (cpu_time(pid), api.accepted(), Instant::now());
    tokio::time::sleep(OUTAGE_WINDOW).await;
    let (cpu, attempts, wall) = (
        cpu_time(pid) - cpu0,
        api.accepted() - attempts0,
        t0.elapsed(),
    );
    let share = cpu.as_secs_f64() / wall.as_secs_f64();
    println!(
        "outage: relay CPU {:.0} ms over {:.1} s ({:.1}% of one core), {attempts} attempts to the down destination",
        cpu.as_secs_f64() * 1000.0,
        wall.as_secs_f64(),
        share * 100.0
    );
    assert!(
        share < 0.10,
        "busy while the destination is down: {share:.3} of a core"
    );
    // 20 deliveries backing off 500 ms..2 s make well under 20 / 0.5 s attempts a second.
    assert!(
        (attempts as f64) < 20.0 / 0.5 * wall.as_secs_f64(),
        "{attempts} attempts in {wall:?}"
    );

    // Nothing of `api` is dead-lettered while its budget lasts; `doomed` spends exactly
    // its 3 attempts per delivery, then dead-letters.
    let db = setup.db();
    let api_dead: i64 = db
        .query_row(
            "SELECT COUNT(*) FROM deliveries WHERE destination = 'api' AND state = 'dead'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(api_dead, 0, "dead-lettered before the budget was spent");
    eventually("every doomed delivery dead", || {
        setup
            .db()
            .query_row(
                "SELECT COUNT(*) FROM deliveries WHERE destination = 'doomed' AND state = 'dead'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .unwrap()
            == 5
    })
    .await;
    let attempts: Vec<i64> = db
        .prepare("SELECT attempts FROM deliveries WHERE destination = 'doomed'")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        attempts,
        vec![3; 5],
        "each doomed delivery tried exactly 3 times"
    );

    // The destination comes back: everything pending arrives, nothing is dead.
    api.set(GateMode::Open);
    await_delivered(&mut receiver, &ledger, 3 * WAIT).await;
    eventually("api has nothing pending", || {
        setup
            .db()
            .query_row(
                "SELECT COUNT(*) FROM deliveries WHERE destination = 'api' AND state != 'done'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .unwrap()
            == 0
    })
    .await;
    daemon.terminate(WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_400_dead_letters_at_once_and_is_never_retried() {
    let mut receiver = Receiver::start(Reply::status(400).body("bad request")).await;
    let setup = Setup::new();
    let config = setup.write_config(&format!(
        "destinations:\n  api:\n    type: http\n    url: {}\n    concurrency: 4\n\
         \x20   retry: {{ max_attempts: 10, initial_delay: 10ms, max_delay: 20ms }}\n\
         routes:\n  - to: [api]\n",
        receiver.url()
    ));
    let daemon = Relayd::start(&config).await;
    let client = reqwest::Client::new();
    for i in 0..5 {
        let (status, _) = send(
            &client,
            &daemon.url(),
            Some(TOKEN),
            &event("AUTH", &format!("perm-{i}")),
        )
        .await;
        assert_eq!(status, 200);
    }
    eventually("all five dead-lettered", || count(&setup, "dead") == 5).await;
    let mut got = BTreeMap::new();
    for _ in 0..5 {
        let r = receiver.next().await;
        *got.entry(r.json()["facialId"].as_str().unwrap().to_string())
            .or_insert(0) += 1;
    }
    assert!(got.values().all(|n| *n == 1), "{got:?}");
    // A retry would come after 10..20 ms; give it fifty times that.
    assert!(
        receiver.next_within(Duration::from_secs(1)).await.is_none(),
        "a permanent failure was retried"
    );
    let rows: Vec<(i64, String)> = setup
        .db()
        .prepare("SELECT attempts, last_error FROM deliveries")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    for (attempts, error) in &rows {
        assert_eq!(*attempts, 1, "{error}");
        assert!(error.contains("400"), "{error}");
    }
    daemon.terminate(WAIT).await;
}

/// A delivery to `destination` answered by a 302: dead at its first attempt (a redirect is
/// the endpoint's answer), and the redirect target never reached.
async fn assert_302_not_followed(setup: &Setup, destination: &str, target: &mut Receiver) {
    let dead = || {
        setup
            .db()
            .query_row(
                "SELECT attempts, last_error FROM deliveries WHERE destination = ?1 AND state = 'dead'",
                [destination],
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)),
            )
            .ok()
    };
    eventually("the delivery dead-lettered", || dead().is_some()).await;
    let (attempts, error) = dead().unwrap();
    assert_eq!(attempts, 1, "a redirect is permanent: {error}");
    assert!(error.contains("302"), "{error}");
    assert!(
        target
            .next_within(Duration::from_millis(300))
            .await
            .is_none(),
        "the 302 was followed"
    );
}

#[tokio::test]
async fn redirects_are_not_followed_unless_configured() {
    let mut target = Receiver::ok().await;
    let mut moved = Receiver::start(Reply::status(302).header("Location", &target.url())).await;
    let setup = Setup::new();
    let relay = TestRelay::start(setup.config(&format!(
        "destinations:\n  api:\n    type: http\n    url: {}\nroutes:\n  - to: [api]\n",
        moved.url()
    )))
    .await;
    relay.send(&event("AUTH", "moved")).await;
    moved.next().await;
    assert_302_not_followed(&setup, "api", &mut target).await;
    relay.shutdown().await;
}

#[tokio::test]
async fn with_follow_redirects_a_307_is_followed_with_the_body_and_a_302_is_not() {
    // The API moved its endpoint on the same server (same scheme, host and port).
    let mut temporary = Receiver::ok().await;
    temporary.script([Reply::status(307).header("Location", "/moved")]);
    let mut target = Receiver::ok().await;
    let found = Receiver::start(Reply::status(302).header("Location", &target.url())).await;
    let setup = Setup::new();
    let relay = TestRelay::start(setup.config(&format!(
        "destinations:\n\
         \x20 temporary:\n    type: http\n    url: {}\n    follow_redirects: true\n\
         \x20   headers: {{ Authorization: Bearer api-secret-1, X-Api-Key: key-secret-2 }}\n\
         \x20   signing_secret: whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n\
         \x20 found:\n    type: http\n    url: {}\n    follow_redirects: true\n\
         routes:\n  - match: {{ eventName: AUTH }}\n    to: [temporary]\n\
         \x20 - match: {{ eventName: ENROLL }}\n    to: [found]\n",
        temporary.url(),
        found.url()
    )))
    .await;

    // 307: the same POST, byte for byte, with every header, reaches the new path.
    let sent = event("AUTH", "via-307");
    relay.send(&sent).await;
    let first = temporary.next().await;
    let arrived = temporary.next().await;
    assert_eq!(arrived.json(), sent);
    for header in [
        "authorization",
        "x-api-key",
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
        "x-faceio-relay-event-id",
    ] {
        assert_eq!(
            arrived.header(header),
            first.header(header),
            "{header} after the redirect"
        );
        assert!(arrived.header(header).is_some(), "{header} dropped");
    }
    eventually("the 307 delivery done", || count(&setup, "done") == 1).await;

    // 302 would become a GET without the event: not followed, a permanent failure.
    relay.send(&event("ENROLL", "via-302")).await;
    assert_302_not_followed(&setup, "found", &mut target).await;
    relay.shutdown().await;
}

#[tokio::test]
async fn with_follow_redirects_a_307_to_another_origin_is_not_followed() {
    // Another port of the same address is another origin: the configured headers (an
    // API key, the signature) would go somewhere the config never named.
    let mut elsewhere = Receiver::ok().await;
    let moved = Receiver::start(Reply::status(307).header("Location", &elsewhere.url())).await;
    let setup = Setup::new();
    let relay = TestRelay::start(setup.config(&format!(
        "destinations:\n  api:\n    type: http\n    url: {}\n    follow_redirects: true\n\
         \x20   headers: {{ X-Api-Key: key-secret-2 }}\nroutes:\n  - to: [api]\n",
        moved.url()
    )))
    .await;
    relay.send(&event("AUTH", "cross-origin")).await;
    eventually("a dead letter", || count(&setup, "dead") == 1).await;
    let error: String = setup
        .db()
        .query_row("SELECT last_error FROM deliveries", [], |r| r.get(0))
        .unwrap();
    assert!(error.contains("307"), "{error}");
    assert!(
        elsewhere
            .next_within(Duration::from_millis(300))
            .await
            .is_none(),
        "the redirect to another origin was followed"
    );
    relay.shutdown().await;
}
