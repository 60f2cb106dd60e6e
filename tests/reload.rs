//! Reload: a new config takes over at once, nothing queued is lost.

mod common;

use common::*;
use std::time::Duration;

fn http(name: &str, url: &str) -> String {
    format!(
        "  {name}:\n    type: http\n    url: {url}\n    retry: {{ max_attempts: 100, initial_delay: 1h, max_delay: 1h }}\n"
    )
}

#[tokio::test]
async fn routes_and_destinations_switch_on_reload() {
    let mut a = Receiver::ok().await;
    let mut b = Receiver::ok().await;
    let setup = Setup::new();
    let relay = TestRelay::start(setup.config(&format!(
        "destinations:\n{}routes:\n  - to: [a]\n",
        http("a", &a.url())
    )))
    .await;
    relay.send(&event("AUTH", "before")).await;
    assert!(a.next().await.json()["facialId"] == "before");

    let summary = relay
        .relay
        .reload(setup.config(&format!(
            "destinations:\n{}{}routes:\n  - to: [b]\n",
            http("a", &a.url()),
            http("b", &b.url())
        )))
        .await
        .unwrap();
    assert!(summary.contains("started: b"), "{summary}");
    relay.send(&event("AUTH", "after")).await;
    assert_eq!(b.next().await.json()["facialId"], "after");
    assert!(a.next_within(Duration::from_millis(300)).await.is_none());
    relay.shutdown().await;
}

#[tokio::test]
async fn tokens_change_on_reload() {
    let setup = Setup::new();
    let relay = TestRelay::start(setup.config("")).await;
    assert_eq!(relay.send(&event("AUTH", "x")).await.0, 200);
    let path = setup.write_config("");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace(TOKEN, "rotated-token");
    std::fs::write(&path, text).unwrap();
    let (config, _) = faceio_relay::config::load(&path).unwrap();
    relay.relay.reload(config).await.unwrap();
    assert_eq!(
        relay.send(&event("AUTH", "x")).await.0,
        401,
        "old token refused"
    );
    let (status, _) = send(
        &relay.client,
        &relay.url,
        Some("rotated-token"),
        &event("AUTH", "x"),
    )
    .await;
    assert_eq!(status, 200);
    relay.shutdown().await;
}

#[tokio::test]
async fn a_removed_destinations_queue_goes_to_dead_letters() {
    let setup = Setup::new();
    let down = format!("127.0.0.1:{}", free_port());
    let relay = TestRelay::start(setup.config(&format!(
        "destinations:\n{}  audit:\n    type: file\n    path: e.jsonl\nroutes:\n  - to: [gone, audit]\n",
        http("gone", &format!("http://{down}/"))
    )))
    .await;
    for i in 0..3 {
        relay.send(&event("AUTH", &format!("f{i}"))).await;
    }
    let summary = relay
        .relay
        .reload(setup.config("destinations:\n  audit:\n    type: file\n    path: e.jsonl\nroutes:\n  - to: [audit]\n"))
        .await
        .unwrap();
    assert!(summary.contains("stopped: gone"), "{summary}");
    assert!(summary.contains("dead-lettered: 3"), "{summary}");
    let reasons: Vec<String> = setup
        .db()
        .prepare("SELECT last_error FROM deliveries WHERE destination = 'gone' AND state = 'dead'")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(reasons.len(), 3);
    assert!(
        reasons
            .iter()
            .all(|r| r.contains("no longer in the config")),
        "{reasons:?}"
    );
    relay.shutdown().await;
}

#[tokio::test]
async fn file_destinations_reopen_their_file_on_reload() {
    let setup = Setup::new();
    let cfg = "destinations:\n  audit:\n    type: file\n    path: events.jsonl\nroutes:\n  - to: [audit]\n";
    let relay = TestRelay::start(setup.config(cfg)).await;
    let live = setup.path("events.jsonl");
    let rotated = setup.path("events.jsonl.1");
    relay.send(&event("AUTH", "one")).await;
    eventually("first line", || {
        std::fs::read_to_string(&live)
            .map(|t| t.lines().count() == 1)
            .unwrap_or(false)
    })
    .await;
    // logrotate moves the file, then reloads the relay.
    std::fs::rename(&live, &rotated).unwrap();
    relay.relay.reload(setup.config(cfg)).await.unwrap();
    relay.send(&event("AUTH", "two")).await;
    eventually("second line in the new file", || {
        std::fs::read_to_string(&live)
            .map(|t| t.contains("\"two\""))
            .unwrap_or(false)
    })
    .await;
    let old = std::fs::read_to_string(&rotated).unwrap();
    assert!(old.contains("\"one\"") && !old.contains("\"two\""), "{old}");
    relay.shutdown().await;
}

#[tokio::test]
async fn a_changed_destination_does_not_deliver_twice_what_is_under_way() {
    // A slow destination: the reload restarts its dispatcher while an attempt is in flight.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let release = std::sync::Arc::new(tokio::sync::Notify::new());
    let gate = release.clone();
    let app = axum::Router::new().fallback(move |body: axum::body::Bytes| {
        let tx = tx.clone();
        let gate = gate.clone();
        async move {
            let _ = tx.send(body);
            gate.notified().await;
            "ok"
        }
    });
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let setup = Setup::new();
    let cfg = |timeout: &str| {
        format!(
            "destinations:\n  slow:\n    type: http\n    url: http://{addr}/\n    timeout: {timeout}\nroutes:\n  - to: [slow]\n"
        )
    };
    let relay = TestRelay::start(setup.config(&cfg("20s"))).await;
    relay.send(&event("AUTH", "once")).await;
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .unwrap()
        .unwrap();
    let summary = relay.relay.reload(setup.config(&cfg("21s"))).await.unwrap();
    assert!(summary.contains("restarted: slow"), "{summary}");
    // The new dispatcher must not pick up the delivery the old one is still attempting.
    assert!(
        tokio::time::timeout(Duration::from_millis(700), rx.recv())
            .await
            .is_err()
    );
    release.notify_waiters();
    eventually("done once", || count(&setup, "done") == 1).await;
    relay.shutdown().await;
}
