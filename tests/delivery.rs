//! Delivery: retries, Retry-After, rate limits, isolation, at-least-once across restarts.

mod common;

use common::*;
use std::sync::Arc;
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

/// The daemon's stderr as JSON objects (`log_format: json`), skipping other lines.
fn json_log(daemon: &Daemon) -> Vec<serde_json::Value> {
    daemon
        .log_text()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Waits (bounded, without blocking the runtime) for a JSON log line with this message
/// and destination, and returns it.
async fn await_outcome_line(
    daemon: &Daemon,
    message: &str,
    destination: &str,
) -> serde_json::Value {
    let found = |log: &[serde_json::Value]| {
        log.iter()
            .find(|l| l["message"] == message && l["destination"] == destination)
            .cloned()
    };
    eventually(&format!("log line {message:?} for {destination}"), || {
        found(&json_log(daemon)).is_some()
    })
    .await;
    found(&json_log(daemon)).unwrap()
}

#[tokio::test]
async fn a_destination_timeout_is_retried_and_recorded_as_a_timeout() {
    // The first request is never answered; the second is answered 200 at once.
    let mut api = Holder::start(1).await;
    let setup = Setup::new();
    let config = setup.write_config(&format!(
        "log_format: json\ndestinations:\n{}routes:\n  - to: [api]\n",
        http_dest(
            "api",
            &api.url(),
            "    timeout: 200ms\n    retry: { max_attempts: 3, initial_delay: 10ms, max_delay: 20ms }\n"
        )
    ));
    let daemon = Daemon::start(&config);
    let id = daemon.accept("AUTH", "face-t").await;

    let first = api.next().await;
    assert_eq!(first.header("x-faceio-relay-attempt").unwrap(), "1");
    let second = api.next().await;
    assert_eq!(second.header("x-faceio-relay-attempt").unwrap(), "2");
    assert_eq!(second.body, first.body);
    assert!(
        second.at - first.at >= Duration::from_millis(200),
        "retried after {:?}, before the 200ms timeout",
        second.at - first.at
    );
    eventually("delivery marked done", || count(&setup, "done") == 1).await;
    let attempts: i64 = setup
        .db()
        .query_row("SELECT attempts FROM deliveries", [], |r| r.get(0))
        .unwrap();
    assert_eq!(attempts, 2, "delivered on the second attempt");

    // The first attempt's outcome says why it failed.
    let retry = await_outcome_line(&daemon, "delivery failed; will retry", "api").await;
    assert_eq!(retry["event_id"], id.as_str(), "{retry}");
    assert_eq!(retry["attempt"], 1, "{retry}");
    assert_eq!(retry["status"], "retry", "{retry}");
    // The relay's own classification leads the text (the client library's follows).
    let error = retry["error"].as_str().unwrap_or_default();
    assert!(error.starts_with("timed out"), "{retry}");
    // It ended at the destination's timeout, not before.
    assert!(retry["latency_ms"].as_u64().unwrap() >= 200, "{retry}");
    let done = await_outcome_line(&daemon, "delivery succeeded", "api").await;
    assert_eq!(done["attempt"], 2, "{done}");
    assert!(daemon.terminate().success());
}

#[tokio::test]
async fn concurrency_caps_the_requests_open_at_a_destination() {
    let mut api = Holder::start(usize::MAX).await;
    let setup = Setup::new();
    let cfg = format!(
        "destinations:\n{}routes:\n  - to: [api]\n",
        http_dest("api", &api.url(), "    concurrency: 2\n    timeout: 30s\n")
    );
    let relay = TestRelay::start(setup.config(&cfg)).await;
    for i in 0..6 {
        assert_eq!(
            relay.send(&event("AUTH", &format!("face-{i}"))).await.0,
            200
        );
    }
    // Two requests in flight at once: not one after the other.
    let mut faces = std::collections::BTreeSet::new();
    for _ in 0..2 {
        faces.insert(api.next().await.json()["facialId"].to_string());
    }
    assert_eq!(api.open(), 2);
    // No signal says the dispatcher is waiting for a slot, so this negative is a short
    // bounded wait: a dispatcher ignoring its cap sends the other four within a few ms.
    let third = api.next_within(Duration::from_millis(200)).await;
    assert!(
        third.is_none(),
        "a third request while two were open: {third:?}"
    );
    // Each answer frees one slot, which the next delivery takes.
    while faces.len() < 6 {
        api.release(1);
        faces.insert(api.next().await.json()["facialId"].to_string());
        assert!(api.max_open() <= 2, "{} open at once", api.max_open());
    }
    api.release_all();
    eventually("all six done", || count(&setup, "done") == 6).await;
    assert_eq!(api.max_open(), 2);
    relay.shutdown().await;
}

fn slack_dest(url: &str) -> String {
    format!(
        "destinations:\n  s:\n    type: slack\n    webhook_url: {url}\n\
         \x20   retry: {{ max_attempts: 5, initial_delay: 10ms, max_delay: 20ms }}\n\
         routes:\n  - to: [s]\n"
    )
}

#[tokio::test]
async fn slack_429_waits_for_retry_after_then_delivers_once() {
    let mut slack = Receiver::ok().await;
    slack.script([Reply::status(429)
        .header("retry-after", "1")
        .body("rate_limited")]);
    let setup = Setup::new();
    let relay = TestRelay::start(setup.config(&slack_dest(&slack.url()))).await;
    relay.send(&event("AUTH", "face-s429")).await;
    let limited = slack.next().await;
    let delivered = slack.next().await;
    let gap = delivered.at - limited.at;
    // The backoff alone would retry after 10..20 ms; Retry-After says one second.
    assert!(gap >= Duration::from_millis(950), "retried after {gap:?}");
    assert!(
        delivered.json()["text"]
            .as_str()
            .is_some_and(|t| t.contains("face-s429")),
        "{:?}",
        delivered.json()
    );
    eventually("delivered", || count(&setup, "done") == 1).await;
    let attempts: i64 = setup
        .db()
        .query_row("SELECT attempts FROM deliveries", [], |r| r.get(0))
        .unwrap();
    assert_eq!(attempts, 2);
    // Every attempt's request arrives before its outcome is recorded: none came after.
    assert!(slack.next_within(Duration::ZERO).await.is_none());
    relay.shutdown().await;
}

#[tokio::test]
async fn slack_5xx_answers_are_retried_until_delivered() {
    let mut slack = Receiver::ok().await;
    slack.script([
        Reply::status(500).body("internal_error"),
        Reply::status(503).body("service_unavailable"),
    ]);
    let setup = Setup::new();
    let relay = TestRelay::start(setup.config(&slack_dest(&slack.url()))).await;
    relay.send(&event("AUTH", "face-s5xx")).await;
    let mut texts = vec![];
    for _ in 0..3 {
        texts.push(slack.next().await.json()["text"].clone());
    }
    assert!(texts.windows(2).all(|w| w[0] == w[1]), "{texts:?}");
    eventually("delivered", || count(&setup, "done") == 1).await;
    let attempts: i64 = setup
        .db()
        .query_row("SELECT attempts FROM deliveries", [], |r| r.get(0))
        .unwrap();
    assert_eq!(attempts, 3);
    assert_eq!(count(&setup, "dead"), 0);
    assert!(slack.next_within(Duration::ZERO).await.is_none());
    relay.shutdown().await;
}

#[tokio::test]
async fn each_delivery_outcome_is_logged_with_its_fields() {
    let ok = Receiver::ok().await;
    let refusing = Receiver::start(Reply::status(400).body("no thanks")).await;
    let setup = Setup::new();
    let config = setup.write_config(&format!(
        "log_format: json\ndestinations:\n{}{}routes:\n  - to: [good, bad]\n",
        http_dest("good", &ok.url(), ""),
        http_dest("bad", &refusing.url(), "")
    ));
    let daemon = Daemon::start(&config);
    let id = daemon.accept("AUTH", "face-l").await;

    for (destination, message, outcome) in [
        ("good", "delivery succeeded", "delivered"),
        (
            "bad",
            "delivery failed for good; moved to dead letters",
            "dead",
        ),
    ] {
        let line = await_outcome_line(&daemon, message, destination).await;
        assert_eq!(line["event_id"], id, "{line}");
        assert_eq!(line["attempt"], 1, "{line}");
        assert_eq!(line["status"], outcome, "{line}");
        assert!(line["latency_ms"].is_u64(), "{line}");
    }
    assert!(daemon.terminate().success());
}

/// The text format (stderr that is not a terminal) writes fields as `key=value` without
/// quotes, so `grep event_id=ID` finds an event's whole story.
#[tokio::test]
async fn text_log_lines_carry_the_event_id_unquoted() {
    let ok = Receiver::ok().await;
    let setup = Setup::new();
    let config = setup.write_config(&format!(
        "destinations:\n{}routes:\n  - to: [good]\n",
        http_dest("good", &ok.url(), "")
    ));
    let daemon = Daemon::start(&config);
    let id = daemon.accept("AUTH", "t").await;
    daemon
        .log_count_eventually(&format!("event_id={id}"), 2)
        .await;
    let log = daemon.log_text();
    let line = |message: &str| {
        log.lines()
            .find(|l| l.contains(message) && l.contains(&format!("event_id={id}")))
            .unwrap_or_else(|| panic!("no {message:?} line for {id}:\n{log}"))
            .to_string()
    };
    assert!(line("event accepted").contains("INFO"));
    let delivered = line("delivery succeeded");
    for field in [
        "destination=good",
        "attempt=1",
        "status=delivered",
        "latency_ms=",
    ] {
        assert!(delivered.contains(field), "{field} missing: {delivered}");
    }
    assert!(daemon.terminate().success());
}

/// A config for the daemon binary (`proc::Relayd`, `proc::cli_env`): one `http`
/// destination `api` at `url`, every event routed to it.
fn daemon_config(setup: &Setup, url: &str) -> std::path::PathBuf {
    let config = setup.path("relay.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: 127.0.0.1:0\nadmin_listen: off\nstore:\n  path: relay.db\n\
             applications:\n  - app_id: {APP}\n    token: {TOKEN}\n\
             destinations:\n  api:\n    type: http\n    url: {url}\n\
             routes:\n  - to: [api]\n"
        ),
    )
    .unwrap();
    config
}

/// The environment naming `proxy` in `var` (`HTTP_PROXY` or `HTTPS_PROXY`) and its
/// lower-case spelling, with no `NO_PROXY` exceptions whatever the test's own
/// environment holds.
fn proxy_env<'a>(var: &'static str, proxy: &'a str) -> [(&'a str, &'a str); 4] {
    let lower = match var {
        "HTTP_PROXY" => "http_proxy",
        _ => "https_proxy",
    };
    [
        (var, proxy),
        (lower, proxy),
        ("NO_PROXY", ""),
        ("no_proxy", ""),
    ]
}

/// An HTTP destination sends through the proxy the environment names (`HTTP_PROXY`, read
/// as curl reads it), so a relay behind an egress proxy delivers: the proxy gets the
/// event for the configured host (a name the relay never resolves itself) with the proxy
/// URL's credentials.
#[tokio::test]
async fn http_destinations_send_through_the_proxy_the_environment_names() {
    let mut proxy = Receiver::ok().await;
    let setup = Setup::new();
    let config = daemon_config(&setup, "http://api.internal.invalid/hook");
    let proxy_url = format!("http://relay:pw%40x@{}", proxy.addr);
    let daemon = proc::Relayd::start_with(&config, &proxy_env("HTTP_PROXY", &proxy_url)).await;
    let e = event("AUTH", "face-proxy");
    let (status, _) = send(&reqwest::Client::new(), &daemon.url(), Some(TOKEN), &e).await;
    assert_eq!(status, 200);
    let got = proxy.next().await;
    assert_eq!(got.header("host").as_deref(), Some("api.internal.invalid"));
    // base64("relay:pw@x"): the proxy URL's user and (decoded) password.
    assert_eq!(
        got.header("proxy-authorization").as_deref(),
        Some("Basic cmVsYXk6cHdAeA==")
    );
    assert_eq!(got.body, e.to_string().as_bytes());
}

/// A proxy on 127.0.0.1:0 that reports each request head it gets (up to the blank line)
/// and refuses every request and tunnel with a 403.
async fn refusing_proxy() -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let (mut head, mut buf) = (Vec::new(), [0u8; 1024]);
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = tx.send(String::from_utf8_lossy(&head).into_owned());
                let _ = conn
                    .write_all(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n")
                    .await;
            });
        }
    });
    (addr, rx)
}

/// An `https` destination behind the environment's proxy is reached through a CONNECT
/// tunnel with the proxy URL's credentials: the proxy learns the host and port, never
/// the request (whose path is often the credential, as a Slack URL's is).
#[tokio::test]
async fn https_destinations_tunnel_through_the_environments_proxy() {
    let (proxy, mut heads) = refusing_proxy().await;
    let setup = Setup::new();
    let config = daemon_config(&setup, "https://api.internal.invalid/services/pathSECRET42");
    let proxy_url = format!("http://relay:pw%40x@{proxy}");
    let daemon = proc::Relayd::start_with(&config, &proxy_env("HTTPS_PROXY", &proxy_url)).await;
    let (status, _) = send(
        &reqwest::Client::new(),
        &daemon.url(),
        Some(TOKEN),
        &event("AUTH", "face-tunnel"),
    )
    .await;
    assert_eq!(status, 200);
    let head = tokio::time::timeout(WAIT, heads.recv())
        .await
        .expect("the proxy was asked in time")
        .unwrap();
    assert!(
        head.starts_with("CONNECT api.internal.invalid:443 HTTP/1.1\r\n"),
        "{head}"
    );
    // base64("relay:pw@x"): the proxy URL's user and (decoded) password.
    let auth = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("proxy-authorization: ")
                .map(|_| l["proxy-authorization: ".len()..].to_string())
        })
        .expect("the CONNECT carries Proxy-Authorization");
    assert_eq!(auth, "Basic cmVsYXk6cHdAeA==", "{head}");
    assert!(!head.contains("pathSECRET42"), "{head}");
}

/// An `https` destination must prove its name with a certificate from the public roots:
/// a self-signed one fails the attempt (a retryable error naming the certificate), and
/// no request is sent on the connection.
#[tokio::test]
async fn an_https_destination_with_an_untrusted_certificate_gets_nothing() {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

    let pem = self_signed();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from_pem_slice(pem.cert.as_bytes()).unwrap()],
            PrivateKeyDer::from_pem_slice(pem.key.as_bytes()).unwrap(),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, mut handshakes) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            let _ = tx.send(acceptor.accept(conn).await.is_ok());
        }
    });

    let setup = Setup::new();
    let cfg = format!(
        "destinations:\n{}routes:\n  - to: [api]\n",
        http_dest(
            "api",
            &format!("https://localhost:{port}/hook"),
            "    retry: { max_attempts: 1 }\n"
        )
    );
    let relay = TestRelay::start(setup.config(&cfg)).await;
    relay.send(&event("AUTH", "face-tls")).await;
    let completed = tokio::time::timeout(WAIT, handshakes.recv())
        .await
        .expect("the relay connected in time")
        .unwrap();
    assert!(
        !completed,
        "the relay completed a handshake with a self-signed server"
    );
    eventually("delivery dead-lettered", || count(&setup, "dead") == 1).await;
    let error: String = setup
        .db()
        .query_row("SELECT last_error FROM deliveries", [], |r| r.get(0))
        .unwrap();
    assert!(error.contains("certificate"), "{error}");
}

/// A 2xx is a delivery even when its body stalls: the body is read until the attempt's
/// deadline and no longer, and the status decides. (A timeout here would send the event
/// again on every attempt and finally dead-letter it, though the API took it each time.)
#[tokio::test]
async fn a_success_whose_body_stalls_is_delivered_once() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, mut requests) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut conn, _)) = listener.accept().await {
            let (mut head, mut buf) = (Vec::new(), [0u8; 4096]);
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match conn.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let _ = tx.send(());
            // Two bytes of the hundred promised, then nothing: the connection stays open.
            let _ = conn
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nok")
                .await;
            held.push(conn);
        }
    });
    let setup = Setup::new();
    let cfg = format!(
        "destinations:\n{}routes:\n  - to: [api]\n",
        http_dest(
            "api",
            &format!("http://{addr}/hook"),
            "    timeout: 300ms\n    retry: { max_attempts: 3, initial_delay: 10ms }\n"
        )
    );
    let relay = TestRelay::start(setup.config(&cfg)).await;
    relay.send(&event("AUTH", "face-stall")).await;
    eventually("delivery marked done", || count(&setup, "done") == 1).await;
    let attempts: i64 = setup
        .db()
        .query_row("SELECT attempts FROM deliveries", [], |r| r.get(0))
        .unwrap();
    assert_eq!(attempts, 1, "delivered at the first attempt");
    requests.recv().await.unwrap();
    assert!(requests.try_recv().is_err(), "the event was sent once");
}

/// Credentials in a destination's URL (`https://user:pass@host/…`) are sent as
/// `Authorization: Basic`, decoded, as curl sends them, unless `headers` sets
/// `Authorization`; and a server that quotes them back in an error does not get them
/// into the dead letter (decoded, or as the token).
#[tokio::test]
async fn credentials_in_the_url_are_sent_as_basic_authorization_and_never_shown() {
    let token = "YXBpa2V5X3VzZXIxOnBAc3Mtc2VjcmV0"; // base64("apikey_user1:p@ss-secret")
    let mut api = Receiver::ok().await;
    let mut own = Receiver::ok().await;
    let mut refusing = Receiver::start(
        Reply::status(401).body(&format!("bad Basic {token} for apikey_user1 / p@ss-secret")),
    )
    .await;
    let setup = Setup::new();
    let creds = |r: &Receiver| format!("http://apikey_user1:p%40ss-secret@{}/hook", r.addr);
    let cfg = format!(
        "destinations:
{}{}{}routes:
  - to: [api, own, refusing]
",
        http_dest("api", &creds(&api), ""),
        http_dest(
            "own",
            &creds(&own),
            "    headers:
      Authorization: Bearer configured
"
        ),
        http_dest("refusing", &creds(&refusing), ""),
    );
    let relay = TestRelay::start(setup.config(&cfg)).await;
    relay.send(&event("AUTH", "face-basic")).await;
    assert_eq!(
        api.next().await.header("authorization").as_deref(),
        Some(format!("Basic {token}").as_str())
    );
    assert_eq!(
        own.next().await.header("authorization").as_deref(),
        Some("Bearer configured")
    );
    refusing.next().await;
    eventually("the refused delivery is dead", || {
        count(&setup, "dead") == 1
    })
    .await;
    let error: String = setup
        .db()
        .query_row(
            "SELECT last_error FROM deliveries WHERE state = 'dead'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(error.starts_with("HTTP 401"), "{error}");
    for secret in [token, "apikey_user1", "p@ss-secret"] {
        assert!(!error.contains(secret), "{secret} in {error}");
    }
}

/// A destination the environment sends through a proxy the relay cannot speak to
/// (`https://`, `socks5://`) is refused by `check` (and the same way at start), naming
/// the problem, rather than failing every attempt.
#[tokio::test]
async fn a_proxy_of_another_kind_is_refused_by_check() {
    let setup = Setup::new();
    let config = daemon_config(&setup, "https://api.example.com/hook");
    for proxy in ["https://proxy.example:3128", "socks5://proxy.example:1080"] {
        let out = proc::cli_env(&config, &["check"], &proxy_env("HTTPS_PROXY", proxy)).await;
        assert!(!out.ok(), "{}", out.all());
        assert!(
            out.all()
                .contains("error: destination api: the environment's proxy for this URL"),
            "{}",
            out.all()
        );
        assert!(
            out.all().contains("only http:// proxies are supported"),
            "{}",
            out.all()
        );
    }
}
