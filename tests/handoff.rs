//! The in-memory hand-off of committed deliveries to their dispatcher
//! (`store/sqlite/fresh.rs`, `delivery/worker.rs`): with the store's periodic read as
//! good as off (`poll_interval: 1h`), a new event and its retry still go out at once,
//! because the dispatcher knows everything that can fall due without reading the store.

mod common;

use common::*;

/// A config whose dispatchers never poll the store within a test.
fn config_without_polls(setup: &Setup, body: &str) -> faceio_relay::config::Config {
    let path = setup.write_config(body);
    let yaml = std::fs::read_to_string(&path)
        .unwrap()
        .replace("poll_interval: 200ms", "poll_interval: 1h");
    std::fs::write(&path, yaml).unwrap();
    match faceio_relay::config::load(&path) {
        Ok((c, _)) => c,
        Err(e) => panic!("test config invalid:\n{e}"),
    }
}

#[tokio::test]
async fn new_events_and_their_retries_go_out_without_waiting_for_a_poll() {
    let mut api = Receiver::ok().await;
    api.script([Reply::status(500)]);
    let setup = Setup::new();
    let body = format!(
        "destinations:\n  api:\n    type: http\n    url: {}\n\
         \x20   retry: {{ max_attempts: 5, initial_delay: 50ms, max_delay: 50ms }}\n\
         routes:\n  - to: [api]\n",
        api.url()
    );
    let relay = TestRelay::start(config_without_polls(&setup, &body)).await;
    let first = event("AUTH", "face-0");
    assert_eq!(relay.send(&first).await.0, 200);
    // Handed over in memory, refused, retried 50 ms later (not at the next poll, an
    // hour away): each within `WAIT`.
    for attempt in ["1", "2"] {
        let got = api.next().await;
        assert_eq!(got.body, first.to_string().as_bytes());
        assert_eq!(got.header("x-faceio-relay-attempt").unwrap(), attempt);
    }
    for i in 1..=20 {
        let e = event("AUTH", &format!("face-{i}"));
        assert_eq!(relay.send(&e).await.0, 200);
        assert_eq!(api.next().await.body, e.to_string().as_bytes());
    }
    eventually("every delivery marked done", || count(&setup, "done") == 21).await;
    relay.shutdown().await;
}
