//! What the queue destinations' tests (nats, redis, amqp) share: sending many events,
//! a steady flow with interruptions, waiting for a server-side count, reading the store.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Setup, TestRelay, event};

/// Sends `n` events one after the other (AUTH and ENROLL alternating), each answered 200;
/// returns them in the order sent.
pub async fn send_in_order(relay: &TestRelay, n: usize) -> Vec<serde_json::Value> {
    let mut sent = Vec::new();
    for i in 0..n {
        let e = event(
            if i % 2 == 0 { "AUTH" } else { "ENROLL" },
            &format!("face-{i}"),
        );
        assert_eq!(relay.send(&e).await.0, 200);
        sent.push(e);
    }
    sent
}

/// Top-level config for [`flow_with_interruptions`]: at 200 requests a second on a busy
/// machine, more than the default 64 connections from 127.0.0.1 can be open at once.
pub const FLOW_INGRESS: &str = "ingress:\n  max_connections_per_ip: 1024\n";

/// Sends `total` events at 200 a second (configure [`FLOW_INGRESS`]) (each its own request, so a slow answer does
/// not slow the flow), calling `interrupt` before the events numbered in `at`; checks
/// every answer is 200 and returns what the interruptions returned, summed.
pub async fn flow_with_interruptions(
    relay: Arc<TestRelay>,
    total: usize,
    at: &[usize],
    mut interrupt: impl AsyncFnMut() -> i64,
) -> i64 {
    let mut ticker = tokio::time::interval(Duration::from_millis(5));
    let mut sends = Vec::new();
    let mut interrupted = 0;
    for i in 0..total {
        ticker.tick().await;
        if at.contains(&i) {
            interrupted += interrupt().await;
        }
        let relay = Arc::clone(&relay);
        sends.push(tokio::spawn(async move {
            relay.send(&event("AUTH", &format!("face-{i}"))).await.0
        }));
    }
    for s in sends {
        assert_eq!(s.await.unwrap(), 200);
    }
    interrupted
}

/// Waits until `count()` reaches `n`, failing after `within`.
pub async fn wait_for_count<N: PartialOrd + std::fmt::Display>(
    what: &str,
    n: N,
    within: Duration,
    mut count: impl AsyncFnMut() -> N,
) {
    let deadline = Instant::now() + within;
    loop {
        let have = count().await;
        if have >= n {
            return;
        }
        assert!(Instant::now() < deadline, "{have} of {n} {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Attempts and last error of the only dead-lettered delivery.
pub fn the_dead_letter(setup: &Setup) -> (i64, String) {
    setup
        .db()
        .query_row(
            "SELECT attempts, last_error FROM deliveries WHERE state = 'dead'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap()
}

/// Deliveries that needed more than one attempt.
pub fn retried(setup: &Setup) -> i64 {
    setup
        .db()
        .query_row(
            "SELECT COUNT(*) FROM deliveries WHERE attempts > 1",
            [],
            |r| r.get(0),
        )
        .unwrap()
}

/// The stored events' IDs and arrival times (Unix ms), in the order received.
pub fn stored_ids(setup: &Setup) -> Vec<(String, i64)> {
    setup
        .db()
        .prepare("SELECT id, received_at FROM events ORDER BY received_at, rowid")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}
