//! `Retry-After` at concurrency > 1: after a 429, no request reaches the destination
//! before the pause it asked for has passed (except requests the relay had already sent
//! when the 429 reached it). Kept in its own test binary so no sibling test competes
//! for the CPU while the pauses are timed.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};

use common::proc::*;
use common::*;

/// Requests the relay had already sent when a 429 reached it may still arrive just after
/// that 429.
const IN_FLIGHT_GRACE: Duration = Duration::from_millis(200);

/// How the test receiver answers a Facial ID's first request: 429 after a delay, or 200.
#[derive(Clone, Copy)]
enum First {
    TooMany { after: Duration },
    Ok,
}

/// A receiver that logs every request with its answer, in answer order.
struct Storm {
    /// (when answered, status, Facial ID, when it arrived)
    log: Mutex<Vec<(Instant, u16, String, Instant)>>,
    /// Any request while positive gets `429 Retry-After: 1` (and decrements it).
    storm: AtomicUsize,
    /// Per Facial ID: how its first request is answered (when `storm` is 0).
    first: fn(&str) -> First,
    firsts: Mutex<BTreeSet<String>>,
}

async fn answer(State(s): State<Arc<Storm>>, body: Bytes) -> Response {
    let arrived = Instant::now();
    let face = serde_json::from_slice::<serde_json::Value>(&body).unwrap()["facialId"]
        .as_str()
        .unwrap()
        .to_string();
    let stormed = s
        .storm
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    let first = s.firsts.lock().unwrap().insert(face.clone());
    let limited = match (stormed, first, (s.first)(&face)) {
        (true, _, _) => true,
        (false, true, First::TooMany { after }) => {
            tokio::time::sleep(after).await;
            true
        }
        _ => false,
    };
    let status = if limited { 429 } else { 200 };
    s.log
        .lock()
        .unwrap()
        .push((Instant::now(), status, face, arrived));
    if limited {
        (
            axum::http::StatusCode::TOO_MANY_REQUESTS,
            [("retry-after", "1")],
            "slow down",
        )
            .into_response()
    } else {
        (axum::http::StatusCode::OK, "ok").into_response()
    }
}

async fn start_storm(storm: usize, first: fn(&str) -> First) -> (Arc<Storm>, std::net::SocketAddr) {
    let state = Arc::new(Storm {
        log: Mutex::new(Vec::new()),
        storm: AtomicUsize::new(storm),
        first,
        firsts: Mutex::new(BTreeSet::new()),
    });
    let app = axum::Router::new()
        .fallback(answer)
        .with_state(Arc::clone(&state));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (state, addr)
}

/// A relay whose one destination is `addr`, at `concurrency`, with a backoff (10..50 ms)
/// far shorter than `Retry-After`, so an ignored pause shows.
async fn relay_to(setup: &Setup, addr: std::net::SocketAddr, concurrency: usize) -> Relayd {
    let config = setup.write_config(&format!(
        "destinations:\n  api:\n    type: http\n    url: http://{addr}/api\n    concurrency: {concurrency}\n\
         \x20   retry: {{ max_attempts: 100, initial_delay: 10ms, max_delay: 50ms }}\n\
         routes:\n  - to: [api]\n"
    ));
    Relayd::start(&config).await
}

async fn await_all_200(state: &Storm, faces: &BTreeSet<String>) {
    let deadline = Instant::now() + 3 * WAIT;
    loop {
        let delivered: BTreeSet<String> = state
            .log
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, status, _, _)| *status == 200)
            .map(|(_, _, f, _)| f.clone())
            .collect();
        if &delivered == faces {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not all delivered: {delivered:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Requests that arrived after a 429 (past the in-flight grace) but before its
/// `Retry-After: 1` had passed.
fn violations(log: &[(Instant, u16, String, Instant)]) -> Vec<String> {
    let mut out = Vec::new();
    for (t429, status, face, _) in log {
        if *status != 429 {
            continue;
        }
        let pause_end = *t429 + Duration::from_secs(1);
        for (_, st, f, at) in log {
            if *at > *t429 + IN_FLIGHT_GRACE && *at < pause_end {
                out.push(format!(
                    "{f} ({st}) arrived {:?} after the 429 to {face}",
                    at.duration_since(*t429)
                ));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_storm_pauses_every_worker_for_retry_after() {
    let (state, addr) = start_storm(16, |_| First::Ok).await;
    let setup = Setup::new();
    let daemon = relay_to(&setup, addr, 8).await;
    let client = reqwest::Client::new();
    let faces: BTreeSet<String> = (0..30).map(|i| format!("storm-{i}")).collect();
    let sends: Vec<_> = faces
        .iter()
        .map(|face| {
            let (client, url, face) = (client.clone(), daemon.url(), face.clone());
            tokio::spawn(
                async move { send(&client, &url, Some(TOKEN), &event("AUTH", &face)).await },
            )
        })
        .collect();
    for s in sends {
        assert_eq!(s.await.unwrap().0, 200);
    }
    await_all_200(&state, &faces).await;

    let log = state.log.lock().unwrap().clone();
    let limited = log.iter().filter(|(_, s, _, _)| *s == 429).count();
    let last_200 = log.iter().rfind(|(_, s, _, _)| *s == 200).unwrap().0;
    println!(
        "429 storm: {limited} answers 429, {} requests in all, last delivery {:?} after the first request",
        log.len(),
        last_200 - log[0].0
    );
    assert_eq!(limited, 16);
    let early = violations(&log);
    assert!(early.is_empty(), "Retry-After not honoured: {early:#?}");
    // Every 429 was retried, none dead-lettered.
    eventually("all done", || count(&setup, "done") == 30).await;
    assert_eq!(count(&setup, "dead"), 0);
    daemon.terminate(WAIT).await;
}

/// Two requests in flight (concurrency 2): `b` gets a 429 at once, `a` gets one 500 ms
/// later. A third delivery, `c`, takes the slot `b` freed, sees `b`'s pause and sleeps
/// until it ends; `a`'s 429 extends the pause meanwhile, so `c` must wait again (it used
/// to be sent about 0.5 s after `a`'s 429 instead of 1 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_extended_while_an_attempt_sleeps_is_honoured() {
    let (state, addr) = start_storm(0, |face| match face {
        "extend-a" => First::TooMany {
            after: Duration::from_millis(500),
        },
        "extend-b" => First::TooMany {
            after: Duration::ZERO,
        },
        _ => First::Ok,
    })
    .await;
    let setup = Setup::new();
    let daemon = relay_to(&setup, addr, 2).await;
    let client = reqwest::Client::new();
    let faces: BTreeSet<String> = ["extend-a", "extend-b", "extend-c"]
        .iter()
        .map(|f| f.to_string())
        .collect();
    for face in ["extend-a", "extend-b", "extend-c"] {
        assert_eq!(
            send(&client, &daemon.url(), Some(TOKEN), &event("AUTH", face))
                .await
                .0,
            200
        );
    }
    await_all_200(&state, &faces).await;
    let log = state.log.lock().unwrap().clone();
    let early = violations(&log);
    assert!(early.is_empty(), "Retry-After not honoured: {early:#?}");
    daemon.terminate(WAIT).await;
}
