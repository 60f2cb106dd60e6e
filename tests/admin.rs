//! The admin endpoint: metrics, health and readiness.

mod common;

use common::*;

#[tokio::test]
async fn metrics_count_events_rejections_deliveries_and_backlog() {
    let mut api = Receiver::ok().await;
    api.script([Reply::status(500)]);
    let setup = Setup::new();
    let down = format!("127.0.0.1:{}", free_port());
    let cfg = format!(
        "destinations:
  api:
    type: http
    url: {}
    retry: {{ max_attempts: 5, initial_delay: 10ms, max_delay: 20ms }}
  down:
    type: http
    url: http://{down}/
    retry: {{ max_attempts: 100, initial_delay: 1h, max_delay: 1h }}
routes:
  - to: [api, down]
",
        api.url()
    );
    let relay = TestRelay::start(setup.config(&cfg)).await;
    let admin = relay.relay.admin_addr().expect("admin enabled");
    relay.send(&event("ENROLL", "f1")).await;
    relay.send(&event("AUTH", "f2")).await;
    send(
        &relay.client,
        &relay.url,
        Some("wrong"),
        &event("AUTH", "f3"),
    )
    .await;
    // Not the webhook: refused, and counted and logged like every refusal.
    let wrong_method = relay.client.get(&relay.url).send().await.unwrap();
    assert_eq!(wrong_method.status(), 405);
    let no_such_path = relay
        .client
        .post(relay.url.replace("/webhook", "/elsewhere"))
        .send()
        .await
        .unwrap();
    assert_eq!(no_such_path.status(), 404);
    api.next().await;
    api.next().await;
    api.next().await;
    eventually("api deliveries done", || {
        setup
            .db()
            .query_row(
                "SELECT COUNT(*) FROM deliveries WHERE destination = 'api' AND state = 'done'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .unwrap()
            == 2
    })
    .await;
    let text = metrics_text(admin).await;
    let get = |k: &str| metric(&text, k).unwrap_or_else(|| panic!("{k} missing:\n{text}"));
    assert_eq!(
        get("faceio_relay_events_received_total{app_id=\"fioa-test\",event_name=\"ENROLL\"}"),
        1.0
    );
    assert_eq!(
        get("faceio_relay_events_received_total{app_id=\"fioa-test\",event_name=\"AUTH\"}"),
        1.0
    );
    assert_eq!(
        get("faceio_relay_ingress_rejections_total{reason=\"unauthorized\"}"),
        1.0
    );
    assert_eq!(
        get("faceio_relay_ingress_responses_total{status=\"401\"}"),
        1.0
    );
    for (reason, status) in [("method_not_allowed", 405), ("not_found", 404)] {
        assert_eq!(
            get(&format!(
                "faceio_relay_ingress_rejections_total{{reason=\"{reason}\"}}"
            )),
            1.0
        );
        assert_eq!(
            get(&format!(
                "faceio_relay_ingress_responses_total{{status=\"{status}\"}}"
            )),
            1.0
        );
    }
    assert_eq!(
        get("faceio_relay_deliveries_total{destination=\"api\",outcome=\"delivered\"}"),
        2.0
    );
    assert_eq!(
        get("faceio_relay_deliveries_total{destination=\"api\",outcome=\"retry\"}"),
        1.0
    );
    assert_eq!(
        get("faceio_relay_delivery_attempt_duration_seconds_count{destination=\"api\"}"),
        3.0
    );
    assert_eq!(
        get("faceio_relay_end_to_end_latency_seconds_count{destination=\"api\"}"),
        2.0
    );
    assert_eq!(get("faceio_relay_ack_latency_seconds_count"), 2.0);
    // The dead destination's backlog is read from the store.
    eventually("down attempted once each", || {
        setup
            .db()
            .query_row(
                "SELECT COUNT(*) FROM deliveries WHERE destination = 'down' AND attempts = 1",
                [],
                |r| r.get::<_, i64>(0),
            )
            .unwrap()
            == 2
    })
    .await;
    let text = metrics_text(admin).await;
    assert_eq!(
        metric(
            &text,
            "faceio_relay_pending_deliveries{destination=\"down\"}"
        ),
        Some(2.0),
        "{text}"
    );
    assert!(
        metric(
            &text,
            "faceio_relay_oldest_pending_age_seconds{destination=\"down\"}"
        )
        .unwrap()
            >= 0.0
    );
    assert!(!text.contains(&api.url()), "no destination URL in metrics");
    relay.shutdown().await;
}

#[tokio::test]
async fn readyz_reports_a_store_that_cannot_write() {
    let setup = Setup::new();
    let relay = TestRelay::start(setup.config("")).await;
    let admin = format!("http://{}", relay.relay.admin_addr().unwrap());
    let ok = reqwest::get(format!("{admin}/healthz")).await.unwrap();
    assert_eq!(ok.status(), 200);
    let ready = reqwest::get(format!("{admin}/readyz")).await.unwrap();
    assert_eq!(ready.status(), 200);

    // Another process holds the write lock longer than the probe waits: not ready (the
    // answer may come from a probe up to a second old, so within a second and the probe).
    let db = setup.db();
    db.execute_batch("BEGIN IMMEDIATE").unwrap();
    let ready = readyz_within(&admin, 503).await;
    let body: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(body["ready"], false);
    db.execute_batch("ROLLBACK").unwrap();
    readyz_within(&admin, 200).await;
    relay.shutdown().await;
}

/// Asks `/readyz` until it answers `status`, for at most [`WAIT`].
async fn readyz_within(admin: &str, status: u16) -> reqwest::Response {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let ready = reqwest::get(format!("{admin}/readyz")).await.unwrap();
        if ready.status() == status {
            return ready;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "/readyz never answered {status}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn admin_can_be_turned_off() {
    let setup = Setup::new();
    let path = setup.write_config("");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("admin_listen: 127.0.0.1:0", "admin_listen: off");
    std::fs::write(&path, text).unwrap();
    let (config, _) = faceio_relay::config::load(&path).unwrap();
    let relay = TestRelay::start(config).await;
    assert_eq!(relay.relay.admin_addr(), None);
    relay.shutdown().await;
}

/// Deliveries of `destination` in `state`.
fn deliveries(setup: &Setup, destination: &str, state: &str) -> i64 {
    setup
        .db()
        .query_row(
            "SELECT COUNT(*) FROM deliveries WHERE destination = ?1 AND state = ?2",
            [destination, state],
            |r| r.get(0),
        )
        .unwrap()
}

#[tokio::test]
async fn a_delivery_that_waits_for_its_rate_limit_is_counted() {
    let setup = Setup::new();
    let relay = TestRelay::start(setup.config(
        "destinations:
  limited:
    type: file
    path: limited.jsonl
    rate_limit: { per_second: 0.5, burst: 1 }
  free:
    type: file
    path: free.jsonl
routes:
  - to: [limited, free]
",
    ))
    .await;
    let admin = relay.relay.admin_addr().expect("admin enabled");
    // The first delivery takes the only token; the second, attempted well within two
    // seconds of it, waits for the next (about two seconds).
    assert_eq!(relay.send(&event("AUTH", "r1")).await.0, 200);
    assert_eq!(relay.send(&event("AUTH", "r2")).await.0, 200);
    eventually("both delivered to both destinations", || {
        deliveries(&setup, "limited", "done") == 2 && deliveries(&setup, "free", "done") == 2
    })
    .await;
    let text = metrics_text(admin).await;
    let series =
        |name: &str, labels: &str| metric(&text, &format!("faceio_relay_{name}{{{labels}}}"));
    assert_eq!(
        series("rate_limit_waits_total", "destination=\"limited\""),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        series("rate_limit_waits_total", "destination=\"free\""),
        Some(0.0),
        "a destination without a rate limit never waits:\n{text}"
    );
    // Waiting is not a failure.
    assert_eq!(
        series(
            "deliveries_total",
            "destination=\"limited\",outcome=\"delivered\""
        ),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        series(
            "deliveries_total",
            "destination=\"limited\",outcome=\"retry\""
        ),
        Some(0.0),
        "{text}"
    );
    relay.shutdown().await;
}

#[tokio::test]
async fn a_permanent_failure_shows_as_a_dead_letter_and_a_dead_outcome() {
    let mut api = Receiver::start(Reply::status(400).body("invalid")).await;
    let setup = Setup::new();
    let relay = TestRelay::start(setup.config(&format!(
        "destinations:
  api:
    type: http
    url: {}
    retry: {{ max_attempts: 5, initial_delay: 10ms, max_delay: 20ms }}
  audit:
    type: file
    path: e.jsonl
routes:
  - to: [api, audit]
",
        api.url()
    )))
    .await;
    let admin = relay.relay.admin_addr().expect("admin enabled");
    for face in ["d1", "d2"] {
        assert_eq!(relay.send(&event("AUTH", face)).await.0, 200);
    }
    api.next().await;
    api.next().await;
    eventually("both api deliveries dead-lettered", || {
        deliveries(&setup, "api", "dead") == 2
    })
    .await;
    eventually("both audit deliveries done", || {
        deliveries(&setup, "audit", "done") == 2
    })
    .await;
    let text = metrics_text(admin).await;
    let series = |s: &str| metric(&text, &format!("faceio_relay_{s}"));
    assert_eq!(
        series("dead_letters{destination=\"api\"}"),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        series("dead_letters{destination=\"audit\"}"),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        series("deliveries_total{destination=\"api\",outcome=\"dead\"}"),
        Some(2.0),
        "{text}"
    );
    // Permanent: dead at the first attempt, never retried.
    assert_eq!(
        series("deliveries_total{destination=\"api\",outcome=\"retry\"}"),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        series("pending_deliveries{destination=\"api\"}"),
        Some(0.0),
        "{text}"
    );
    relay.shutdown().await;
}

/// Every configured destination's series exist at 0 from the start: a counter born at 1
/// shows no `increase()`, so the first dead letter would never fire the README's alert,
/// and dashboards would show no data instead of 0.
#[tokio::test]
async fn an_idle_relay_exports_every_destination_series_at_zero() {
    let setup = Setup::new();
    let relay = TestRelay::start(setup.config(
        "destinations:\n  audit:\n    type: file\n    path: a.jsonl\nroutes:\n  - to: [audit]\n",
    ))
    .await;
    let text = metrics_text(relay.relay.admin_addr().unwrap()).await;
    let d = "destination=\"audit\"";
    for series in [
        format!("faceio_relay_deliveries_total{{{d},outcome=\"dead\"}}"),
        format!("faceio_relay_deliveries_total{{{d},outcome=\"delivered\"}}"),
        format!("faceio_relay_rate_limit_waits_total{{{d}}}"),
        format!("faceio_relay_pending_deliveries{{{d}}}"),
        format!("faceio_relay_oldest_pending_age_seconds{{{d}}}"),
        format!("faceio_relay_dead_letters{{{d}}}"),
        "faceio_relay_ingress_responses_total{status=\"503\"}".to_string(),
    ] {
        assert_eq!(metric(&text, &series), Some(0.0), "{series}:\n{text}");
    }
    relay.shutdown().await;
}

#[tokio::test]
async fn admin_token_guards_metrics_but_not_health_checks() {
    let setup = Setup::new();
    let relay = TestRelay::start(setup.config("admin:\n  token: s3cret-scrape-token\n")).await;
    let admin = relay.relay.admin_addr().expect("admin enabled");
    let client = reqwest::Client::new();
    let get = |path: &str, auth: Option<&str>| {
        let mut req = client.get(format!("http://{admin}{path}"));
        if let Some(a) = auth {
            req = req.header("Authorization", a);
        }
        req.send()
    };
    let none = get("/metrics", None).await.unwrap();
    assert_eq!(none.status(), 401);
    assert_eq!(none.headers()["www-authenticate"], "Bearer");
    let body = none.text().await.unwrap();
    assert!(!body.contains("faceio_relay_"), "{body}");
    assert!(!body.contains("s3cret"), "{body}");
    for wrong in [
        "Bearer s3cret",
        "Basic s3cret-scrape-token",
        "s3cret-scrape-token",
    ] {
        assert_eq!(
            get("/metrics", Some(wrong)).await.unwrap().status(),
            401,
            "{wrong}"
        );
    }
    let ok = get("/metrics", Some("Bearer s3cret-scrape-token"))
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    assert!(ok.text().await.unwrap().contains("faceio_relay_"));
    assert_eq!(get("/readyz", None).await.unwrap().status(), 200);
    assert_eq!(get("/healthz", None).await.unwrap().status(), 200);
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_event_names_do_not_grow_the_metrics() {
    let setup = Setup::new();
    let relay = TestRelay::start(setup.config(
        "destinations:\n  f:\n    type: file\n    path: out.jsonl\n\
         routes:\n  - match: { eventName: [ENROLL, CUSTOM_SIGNUP] }\n    to: [f]\n",
    ))
    .await;
    let admin = relay.relay.admin_addr().unwrap();
    relay
        .send(&event("CUSTOM_SIGNUP", "named-by-a-route"))
        .await;
    relay.send(&event("AUTH", "documented")).await;
    let relay = std::sync::Arc::new(relay);
    let mut tasks = Vec::new();
    for worker in 0..16 {
        let relay = std::sync::Arc::clone(&relay);
        tasks.push(tokio::spawn(async move {
            for i in 0..625 {
                let name = format!("PAYLOAD_TEXT_{worker}_{i}_{}", "x".repeat(200));
                let (status, _) = relay.send(&event(&name, "f")).await;
                assert_eq!(status, 200);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let text = metrics_text(admin).await;
    let series = |name: &str| {
        metric(
            &text,
            &format!(
                "faceio_relay_events_received_total{{app_id=\"{APP}\",event_name=\"{name}\"}}"
            ),
        )
    };
    assert_eq!(series("other"), Some(10_000.0), "{text}");
    assert_eq!(series("CUSTOM_SIGNUP"), Some(1.0));
    assert_eq!(series("AUTH"), Some(1.0));
    assert!(!text.contains("PAYLOAD_TEXT"));
    // Three series for 10,002 events with 10,000 names (each 200+ bytes long), and the
    // whole exposition stays small.
    let received = text
        .lines()
        .filter(|l| l.starts_with("faceio_relay_events_received_total{"))
        .count();
    assert_eq!(received, 3, "{text}");
    assert!(text.len() < 16 * 1024, "/metrics is {} bytes", text.len());
}
