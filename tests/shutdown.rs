//! SIGTERM: exit 0, nothing pending lost, requests under way still answered.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::proc::*;
use common::*;

/// `delivery.shutdown_grace` in Setup's config.
const GRACE: Duration = Duration::from_secs(2);

fn http_through(setup: &Setup, gate: &Gate, extra: &str) -> std::path::PathBuf {
    setup.write_config(&format!(
        "destinations:\n  api:\n    type: http\n    url: {}\n{extra}routes:\n  - to: [api]\n",
        gate.url("/ingest")
    ))
}

fn assert_clean_exit(exited: &Exited) {
    assert!(
        exited.status.success(),
        "exit {:?}:\n{}",
        exited.status,
        exited.text()
    );
    let last = exited.log.iter().rev().find(|l| !l.trim().is_empty());
    assert!(
        last.is_some_and(|l| l.contains("shutdown complete")),
        "log does not end with shutdown complete:\n{}",
        exited.text()
    );
}

fn pending_attempts(setup: &Setup) -> Vec<i64> {
    let db = setup.db();
    let mut stmt = db
        .prepare("SELECT attempts FROM deliveries WHERE state = 'pending' ORDER BY id")
        .unwrap();
    stmt.query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

async fn send_faces(url: &str, faces: &[&str]) {
    let client = reqwest::Client::new();
    for face in faces {
        let (status, answer) = send(&client, url, Some(TOKEN), &event("AUTH", face)).await;
        assert_eq!(status, 200, "{answer}");
    }
}

/// Waits until the receiver got every Facial ID in `faces`.
async fn receive_all(receiver: &mut Receiver, faces: &[&str]) {
    let want: BTreeSet<&str> = faces.iter().copied().collect();
    let mut got = BTreeSet::new();
    while !want.iter().all(|f| got.contains(*f)) {
        let r = receiver.next().await;
        got.insert(r.json()["facialId"].as_str().unwrap().to_string());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_and_ctrl_c_exit_zero_and_say_shutdown_complete() {
    for signal in ["TERM", "INT"] {
        let setup = Setup::new();
        let config = setup.write_config(
            "destinations:\n  audit:\n    type: file\n    path: events.jsonl\nroutes:\n  - to: [audit]\n",
        );
        let daemon = Relayd::start(&config).await;
        send_faces(&daemon.url(), &["t1"]).await;
        eventually("delivered", || count(&setup, "done") == 1).await;
        daemon.signal(signal);
        let exited = daemon.wait_exit(WAIT).await;
        assert_clean_exit(&exited);
        assert!(exited.text().contains("shutting down"), "{}", exited.text());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_deliveries_stay_pending_and_are_delivered_after_restart() {
    let mut receiver = Receiver::ok().await;
    let gate = Gate::start(receiver.addr, GateMode::Refuse).await;
    let setup = Setup::new();
    let config = http_through(
        &setup,
        &gate,
        "    retry: { max_attempts: 100000, initial_delay: 10ms, max_delay: 50ms }\n",
    );
    let daemon = Relayd::start(&config).await;
    let faces = ["p1", "p2", "p3", "p4", "p5"];
    send_faces(&daemon.url(), &faces).await;
    eventually("every delivery failed at least once", || {
        let a = pending_attempts(&setup);
        a.len() == 5 && a.iter().all(|n| *n >= 1)
    })
    .await;

    let exited = daemon.terminate(WAIT).await;
    assert_clean_exit(&exited);
    assert_eq!(
        pending_attempts(&setup).len(),
        5,
        "still pending after exit"
    );
    assert_eq!(count(&setup, "done") + count(&setup, "dead"), 0);

    gate.set(GateMode::Open);
    let daemon = Relayd::start(&config).await;
    receive_all(&mut receiver, &faces).await;
    eventually("all done", || count(&setup, "done") == 5).await;
    assert_clean_exit(&daemon.terminate(WAIT).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempts_under_way_get_the_grace_then_stay_pending() {
    let mut receiver = Receiver::ok().await;
    let gate = Gate::start(receiver.addr, GateMode::Hang).await;
    let setup = Setup::new();
    let config = http_through(&setup, &gate, "    timeout: 60s\n");
    let daemon = Relayd::start(&config).await;
    let faces = ["h1", "h2", "h3"];
    send_faces(&daemon.url(), &faces).await;
    // All three attempts are hanging on the destination.
    eventually("three attempts under way", || gate.accepted() >= 3).await;

    let signalled = Instant::now();
    let exited = daemon.terminate(GRACE + WAIT).await;
    let took = signalled.elapsed();
    assert_clean_exit(&exited);
    assert!(
        took >= GRACE - Duration::from_millis(100),
        "attempts under way were not given the grace: exited after {took:?}"
    );
    assert!(
        took < GRACE + Duration::from_secs(3),
        "exit took {took:?} with a {GRACE:?} grace"
    );
    assert!(exited.text().contains("abandon"), "{}", exited.text());
    assert_eq!(
        pending_attempts(&setup),
        [0, 0, 0],
        "abandoned attempts are not counted"
    );

    gate.set(GateMode::Open);
    let daemon = Relayd::start(&config).await;
    receive_all(&mut receiver, &faces).await;
    eventually("all done", || count(&setup, "done") == 3).await;
    assert_clean_exit(&daemon.terminate(WAIT).await);
}

/// Reads from `s` until `buf` contains `needle` (bounded).
async fn read_until(s: &mut tokio::net::TcpStream, buf: &mut Vec<u8>, needle: &[u8]) {
    let deadline = Instant::now() + WAIT;
    while !buf.windows(needle.len()).any(|w| w == needle) {
        let mut chunk = [0u8; 1024];
        let left = deadline.saturating_duration_since(Instant::now());
        let n = tokio::time::timeout(left, s.read(&mut chunk))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "no {:?} in time; got {:?}",
                    String::from_utf8_lossy(needle),
                    String::from_utf8_lossy(buf)
                )
            })
            .unwrap();
        assert!(
            n > 0,
            "connection closed; got {:?}",
            String::from_utf8_lossy(buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_under_way_at_sigterm_is_still_answered() {
    let setup = Setup::new();
    let config = setup.write_config(
        "destinations:\n  audit:\n    type: file\n    path: events.jsonl\nroutes:\n  - to: [audit]\n",
    );
    let daemon = Relayd::start(&config).await;
    let body = event("ENROLL", "slow-upload").to_string();
    let (first, rest) = body.split_at(body.len() / 2);

    let mut conn = tokio::net::TcpStream::connect(daemon.addr).await.unwrap();
    let head = format!(
        "POST /webhook HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\n\
         WWW-Authenticate: Bearer {TOKEN}\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    // 100 Continue: the handler has authenticated and started reading the body.
    let mut got = Vec::new();
    read_until(&mut conn, &mut got, b"\r\n\r\n").await;
    assert!(
        got.starts_with(b"HTTP/1.1 100"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    conn.write_all(first.as_bytes()).await.unwrap();

    daemon.sigterm();
    daemon.wait_log("shutting down").await;
    // Ingress has stopped accepting: new connections are refused.
    let deadline = Instant::now() + WAIT;
    while tokio::net::TcpStream::connect(daemon.addr).await.is_ok() {
        assert!(Instant::now() < deadline, "still accepting after SIGTERM");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    conn.write_all(rest.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    read_until(&mut conn, &mut answer, b"}").await;
    let text = String::from_utf8_lossy(&answer).to_string();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let json = &text[text.find("\r\n\r\n").unwrap() + 4..];
    let id = serde_json::from_str::<serde_json::Value>(json).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();

    let exited = daemon.wait_exit(WAIT).await;
    assert_clean_exit(&exited);
    let stored: String = setup
        .db()
        .query_row("SELECT facial_id FROM events WHERE id = ?1", [&id], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(stored, "slow-upload");
}

/// While the relay drains, `/readyz` says 503 (so a load balancer stops sending) instead
/// of vanishing with the listener; the admin endpoint closes only at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_answers_503_while_shutdown_drains() {
    let receiver = Receiver::ok().await;
    let gate = Gate::start(receiver.addr, GateMode::Hang).await;
    let setup = Setup::new();
    let relay = TestRelay::start(setup.config(&format!(
        "destinations:\n  api:\n    type: http\n    url: {}\n    timeout: 30s\nroutes:\n  - to: [api]\n",
        gate.url("/ingest")
    )))
    .await;
    let readyz = format!("http://{}/readyz", relay.relay.admin_addr().unwrap());
    let client = reqwest::Client::new();
    assert_eq!(client.get(&readyz).send().await.unwrap().status(), 200);
    relay.send(&event("AUTH", "hung")).await;
    eventually("the attempt under way", || gate.accepted() >= 1).await;

    // The hung attempt holds shutdown in its grace period.
    let started = Instant::now();
    let shutdown = tokio::spawn(relay.shutdown());
    let reason = loop {
        let answer = client
            .get(&readyz)
            .send()
            .await
            .unwrap_or_else(|e| panic!("/readyz gone while draining: {e}"));
        if answer.status() == 503 {
            break answer.json::<serde_json::Value>().await.unwrap()["reason"].clone();
        }
        assert!(
            started.elapsed() < GRACE,
            "/readyz stayed 200 after shutdown began"
        );
        tokio::task::yield_now().await;
    };
    assert!(
        reason.as_str().unwrap().contains("shutting down"),
        "{reason}"
    );
    shutdown.await.unwrap();
    assert!(
        client.get(&readyz).send().await.is_err(),
        "the admin endpoint outlived the relay"
    );
}

/// A scraper stuck half way through a request to the admin endpoint does not hold the
/// shutdown (systemd would kill the relay before its store is closed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_sent_admin_request_does_not_hold_the_shutdown() {
    let setup = Setup::new();
    let relay = TestRelay::start(setup.config("")).await;
    let admin = relay.relay.admin_addr().unwrap();
    let mut stuck = tokio::net::TcpStream::connect(admin).await.unwrap();
    stuck
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: relay\r\n")
        .await
        .unwrap();
    // Connections are accepted in order: once a request on a later one is answered, the
    // admin endpoint serves the stuck one too.
    assert_eq!(
        reqwest::get(format!("http://{admin}/healthz"))
            .await
            .unwrap()
            .status(),
        200
    );
    tokio::time::timeout(WAIT, relay.shutdown())
        .await
        .expect("shutdown waited for a half-sent admin request");
}
