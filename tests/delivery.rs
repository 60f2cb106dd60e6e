//! Delivery: retries, Retry-After, rate limits, isolation, at-least-once across restarts.

mod common;

use common::*;
use std::time::Duration;

fn http_dest(name: &str, url: &str, extra: &str) -> String {
    format!("  {name}:\n    type: http\n    url: {url}\n{extra}")
}

#[tokio::test]
async fn retryable_failures_are_retried_until_success() {
    let mut api = Receiver::ok().await;
    api.script([Reply::status(500), Reply::status(503), Reply::status(408)]);
    let setup = Setup::new();
    let cfg = format!(
        "destinations:\n{}routes:\n  - to: [api]\n",
        http_dest(
            "api",
            &api.url(),
            "    retry: { max_attempts: 5, initial_delay: 10ms, max_delay: 40ms }\n"
        )
    );
    let relay = TestRelay::start(setup.config(&cfg)).await;
    let e = event("AUTH", "face-r");
    relay.send(&e).await;
    for attempt in 1..=4 {
        let got = api.next().await;
        assert_eq!(
            got.body,
            e.to_string().as_bytes(),
            "same bytes on every attempt"
        );
        assert_eq!(
            got.header("x-faceio-relay-attempt").unwrap(),
            attempt.to_string()
        );
    }
    eventually("delivery marked done", || count(&setup, "done") == 1).await;
    let attempts: i64 = setup
        .db()
        .query_row("SELECT attempts FROM deliveries", [], |r| r.get(0))
        .unwrap();
    assert_eq!(attempts, 4);
    assert!(
        api.next_within(Duration::from_millis(200)).await.is_none(),
        "no attempt after success"
    );
    relay.shutdown().await;
}

#[tokio::test]
async fn connection_refused_is_retried() {
    // Nothing listens on that port for the first attempts.
    let port = free_port();
    let setup = Setup::new();
    let cfg = format!(
        "destinations:\n{}routes:\n  - to: [api]\n",
        http_dest(
            "api",
            &format!("http://127.0.0.1:{port}/x"),
            "    retry: { max_attempts: 50, initial_delay: 20ms, max_delay: 50ms }\n"
        )
    );
    let relay = TestRelay::start(setup.config(&cfg)).await;
    relay.send(&event("AUTH", "face-c")).await;
    eventually("a failed attempt recorded", || {
        setup
            .db()
            .query_row("SELECT attempts FROM deliveries", [], |r| {
                r.get::<_, i64>(0)
            })
            .unwrap_or(0)
            >= 1
    })
    .await;
    let error: String = setup
        .db()
        .query_row("SELECT last_error FROM deliveries", [], |r| r.get(0))
        .unwrap();
    assert!(error.contains("connection failed"), "{error}");
    // The destination comes up on that port: the delivery gets through.
    let mut api = Receiver::ok_on(port).await;
    assert_eq!(api.next().await.json()["facialId"], "face-c");
    eventually("done", || count(&setup, "done") == 1).await;
    relay.shutdown().await;
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let mut api = Receiver::ok().await;
    api.script([Reply::status(429).header("retry-after", "1")]);
    let setup = Setup::new();
    let cfg = format!(
        "destinations:\n{}routes:\n  - to: [api]\n",
        http_dest(
            "api",
            &api.url(),
            "    retry: { max_attempts: 5, initial_delay: 10ms, max_delay: 20ms }\n"
        )
    );
    let relay = TestRelay::start(setup.config(&cfg)).await;
    relay.send(&event("AUTH", "face-429")).await;
    let first = api.next().await;
    let second = api.next().await;
    let gap = second.at - first.at;
    // The backoff alone would retry after 10 ms; Retry-After says one second.
    assert!(gap >= Duration::from_millis(950), "retried after {gap:?}");
    relay.shutdown().await;
}

#[tokio::test]
async fn slack_permanent_errors_dead_letter_at_once() {
    for (status, body) in [
        (400, "invalid_payload"),
        (403, "action_prohibited"),
        (404, "channel_not_found"),
        (410, "channel_is_archived"),
    ] {
        let mut slack = Receiver::start(Reply::status(status).body(body)).await;
        let setup = Setup::new();
        let cfg = format!(
            "destinations:\n  s:\n    type: slack\n    webhook_url: {}\n    retry: {{ max_attempts: 5, initial_delay: 10ms, max_delay: 20ms }}\nroutes:\n  - to: [s]\n",
            slack.url()
        );
        let relay = TestRelay::start(setup.config(&cfg)).await;
        relay.send(&event("AUTH", "face-p")).await;
        slack.next().await;
        eventually("dead-lettered", || count(&setup, "dead") == 1).await;
        let (attempts, error): (i64, String) = setup
            .db()
            .query_row("SELECT attempts, last_error FROM deliveries", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!(attempts, 1, "{status} is permanent");
        assert!(error.contains(body), "{error}");
        assert!(
            slack
                .next_within(Duration::from_millis(100))
                .await
                .is_none()
        );
        relay.shutdown().await;
    }
}

#[tokio::test]
async fn rate_limit_spaces_deliveries_without_failing_them() {
    let mut api = Receiver::ok().await;
    let setup = Setup::new();
    let cfg = format!(
        "destinations:\n{}routes:\n  - to: [api]\n",
        http_dest(
            "api",
            &api.url(),
            "    concurrency: 4\n    rate_limit: { per_second: 5, burst: 1 }\n"
        )
    );
    let relay = TestRelay::start(setup.config(&cfg)).await;
    for i in 0..5 {
        assert_eq!(
            relay.send(&event("AUTH", &format!("face-{i}"))).await.0,
            200
        );
    }
    let mut arrivals = vec![];
    for _ in 0..5 {
        arrivals.push(api.next().await.at);
    }
    let span = *arrivals.last().unwrap() - arrivals[0];
    // Five deliveries at 5/s with a burst of 1: at least four 200 ms intervals.
    assert!(
        span >= Duration::from_millis(750),
        "5 deliveries in {span:?}"
    );
    for w in arrivals.windows(2) {
        assert!(
            w[1] - w[0] >= Duration::from_millis(150),
            "gap {:?}",
            w[1] - w[0]
        );
    }
    eventually("all done", || count(&setup, "done") == 5).await;
    let attempts: i64 = setup
        .db()
        .query_row("SELECT MAX(attempts) FROM deliveries", [], |r| r.get(0))
        .unwrap();
    assert_eq!(
        attempts, 1,
        "waiting for the rate limit is not a failed attempt"
    );
    relay.shutdown().await;
}

#[tokio::test]
async fn a_hanging_destination_does_not_delay_the_others() {
    // A server that accepts connections and never answers.
    let hang = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hang_addr = hang.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = vec![];
        while let Ok((s, _)) = hang.accept().await {
            held.push(s);
        }
    });
    let mut fast = Receiver::ok().await;
    let setup = Setup::new();
    let cfg = format!(
        "destinations:\n{}{}routes:\n  - to: [stuck, fast]\n",
        http_dest(
            "stuck",
            &format!("http://{hang_addr}/"),
            "    timeout: 30s\n    concurrency: 2\n"
        ),
        http_dest("fast", &fast.url(), "")
    );
    let relay = TestRelay::start(setup.config(&cfg)).await;
    for i in 0..20 {
        relay.send(&event("AUTH", &format!("face-{i}"))).await;
    }
    for _ in 0..20 {
        fast.next().await;
    }
    eventually("fast deliveries recorded done", || {
        setup
            .db()
            .query_row(
                "SELECT COUNT(*) FROM deliveries WHERE destination = 'fast' AND state = 'done'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .unwrap()
            == 20
    })
    .await;
    let stuck_pending: i64 = setup
        .db()
        .query_row(
            "SELECT COUNT(*) FROM deliveries WHERE destination = 'stuck' AND state = 'pending'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(
        stuck_pending, 20,
        "the stuck destination's deliveries wait, none lost"
    );
    relay.shutdown().await;
}

#[tokio::test]
async fn pending_deliveries_survive_a_restart() {
    let setup = Setup::new();
    let port = free_port();
    let cfg = format!(
        "destinations:\n{}routes:\n  - to: [api]\n",
        http_dest(
            "api",
            &format!("http://127.0.0.1:{port}/x"),
            "    retry: { max_attempts: 100, initial_delay: 50ms, max_delay: 100ms }\n"
        )
    );
    let relay = TestRelay::start(setup.config(&cfg)).await;
    for i in 0..10 {
        assert_eq!(
            relay.send(&event("AUTH", &format!("face-{i}"))).await.0,
            200
        );
    }
    relay.shutdown().await;
    assert_eq!(count(&setup, "pending"), 10);

    // Same config, destination up now.
    let mut api = Receiver::ok_on(port).await;
    let relay = TestRelay::start(setup.config(&cfg)).await;
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < 10 {
        seen.insert(
            api.next().await.json()["facialId"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    eventually("all done", || count(&setup, "done") == 10).await;
    relay.shutdown().await;
}

#[tokio::test]
async fn deliveries_to_a_removed_destination_are_dead_lettered_not_dropped() {
    let setup = Setup::new();
    let port = free_port();
    let cfg = format!(
        "destinations:\n{}  audit:\n    type: file\n    path: e.jsonl\nroutes:\n  - to: [gone, audit]\n",
        http_dest(
            "gone",
            &format!("http://127.0.0.1:{port}/x"),
            "    retry: { max_attempts: 100, initial_delay: 1s, max_delay: 1s }\n"
        )
    );
    let relay = TestRelay::start(setup.config(&cfg)).await;
    relay.send(&event("AUTH", "face-x")).await;
    relay.shutdown().await;

    let cfg =
        "destinations:\n  audit:\n    type: file\n    path: e.jsonl\nroutes:\n  - to: [audit]\n";
    let relay = TestRelay::start(setup.config(cfg)).await;
    let error: String = setup
        .db()
        .query_row(
            "SELECT last_error FROM deliveries WHERE destination = 'gone' AND state = 'dead'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(error.contains("no longer in the config"), "{error}");
    relay.shutdown().await;
}

#[tokio::test]
async fn retry_after_pauses_the_whole_destination() {
    // Several deliveries in flight at once: after a 429 none of them is sent before
    // Retry-After has passed.
    let mut api = Receiver::ok().await;
    api.script([Reply::status(429).header("retry-after", "1")]);
    let setup = Setup::new();
    let cfg = format!(
        "destinations:\n{}routes:\n  - to: [api]\n",
        http_dest(
            "api",
            &api.url(),
            "    concurrency: 1\n    retry: { max_attempts: 5, initial_delay: 10ms, max_delay: 20ms }\n"
        )
    );
    let relay = TestRelay::start(setup.config(&cfg)).await;
    for i in 0..3 {
        relay.send(&event("AUTH", &format!("p{i}"))).await;
    }
    let limited = api.next().await;
    for _ in 0..3 {
        let next = api.next().await;
        assert!(
            next.at - limited.at >= Duration::from_millis(950),
            "sent {:?} after the 429",
            next.at - limited.at
        );
    }
    eventually("all done", || count(&setup, "done") == 3).await;
    relay.shutdown().await;
}

#[tokio::test]
async fn an_error_body_quoting_our_secrets_is_redacted() {
    // An API that echoes the request's credentials back in its error.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().fallback(|headers: axum::http::HeaderMap| async move {
        let auth = headers
            .get("authorization")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        (
            axum::http::StatusCode::BAD_REQUEST,
            format!("rejected credentials {auth} for /hook?key=q-secret-77"),
        )
    });
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let setup = Setup::new();
    let cfg = format!(
        "destinations:\n  api:\n    type: http\n    url: http://{addr}/hook?key=q-secret-77\n    headers: {{ Authorization: \"Bearer sk-echoed-1234\" }}\nroutes:\n  - to: [api]\n"
    );
    let relay = TestRelay::start(setup.config(&cfg)).await;
    relay.send(&event("AUTH", "echo")).await;
    eventually("dead-lettered", || count(&setup, "dead") == 1).await;
    let error: String = setup
        .db()
        .query_row("SELECT last_error FROM deliveries", [], |r| r.get(0))
        .unwrap();
    assert!(error.starts_with("HTTP 400"), "{error}");
    assert!(error.contains("[redacted]"), "{error}");
    assert!(
        !error.contains("sk-echoed-1234") && !error.contains("q-secret-77"),
        "{error}"
    );
    relay.shutdown().await;
}
