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
    // Each first attempt has failed and the next is an hour away: nothing of `gone` is
    // under way (an attempt under way would hold its sweep until it ends).
    eventually("the first attempts to gone recorded", || {
        setup
            .db()
            .query_row(
                "SELECT COUNT(*) FROM deliveries WHERE destination = 'gone' AND attempts = 1",
                [],
                |r| r.get::<_, i64>(0),
            )
            .unwrap()
            == 3
    })
    .await;
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

/// The state and last error of `destination`'s only delivery.
fn state_of(setup: &Setup, destination: &str) -> (String, String) {
    setup
        .db()
        .query_row(
            "SELECT state, coalesce(last_error, '') FROM deliveries WHERE destination = ?1",
            [destination],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap()
}

#[tokio::test]
async fn attempts_under_way_when_their_destination_is_removed_finish_before_the_sweep() {
    let mut arrives = Holder::start(usize::MAX).await;
    let mut fails = Holder::answering(usize::MAX, 500).await;
    let setup = Setup::new();
    let limits = "ingress:\n  body_timeout: 200ms\n  store_timeout: 200ms\n";
    let relay = TestRelay::start(setup.config(&format!(
        "{limits}destinations:\n{}{}routes:\n  - to: [arrives, fails]\n",
        http("arrives", &arrives.url()),
        http("fails", &fails.url())
    )))
    .await;
    relay.send(&event("AUTH", "removed-mid-send")).await;
    arrives.next().await;
    fails.next().await;

    // Both attempts are under way when their destinations leave the config.
    let summary = relay
        .relay
        .reload(setup.config(&format!("{limits}destinations: {{}}\nroutes: []\n")))
        .await
        .unwrap();
    assert!(summary.contains("stopped: "), "{summary}");
    assert!(summary.contains("dead-lettered: 0"), "{summary}");
    arrives.release_all();
    fails.release_all();

    // The delivery that arrived is done, not a dead letter (replaying it would send it
    // twice); the one that failed has no destination left to retry it, so the later
    // sweep moves it to the dead letters.
    eventually("the arrived delivery recorded as done", || {
        state_of(&setup, "arrives").0 == "done"
    })
    .await;
    eventually("the failed delivery dead-lettered", || {
        state_of(&setup, "fails").0 == "dead"
    })
    .await;
    let (_, reason) = state_of(&setup, "fails");
    assert!(reason.contains("no longer in the config"), "{reason}");
    assert_eq!(state_of(&setup, "arrives").0, "done");
    relay.shutdown().await;
}

// Reload through SIGHUP, as systemd's `ExecReload` does.

/// Rewrites the daemon's config with `edit`, sends SIGHUP and waits for the `n`th
/// "configuration reloaded".
async fn sighup_with(
    daemon: &Daemon,
    config: &std::path::Path,
    n: usize,
    edit: impl Fn(String) -> String,
) {
    let text = edit(std::fs::read_to_string(config).unwrap());
    std::fs::write(config, text).unwrap();
    daemon.signal("HUP");
    daemon
        .log_count_eventually("configuration reloaded", n)
        .await;
}

/// A FACEIO event whose JSON body is at least `size` bytes (unknown fields are kept).
fn event_of_size(face: &str, size: usize) -> serde_json::Value {
    let mut e = event("AUTH", face);
    e["padding"] = "x".repeat(size).into();
    e
}

const AUDIT: &str =
    "destinations:\n  audit:\n    type: file\n    path: e.jsonl\nroutes:\n  - to: [audit]\n";

#[tokio::test]
async fn sighup_applies_new_ingress_limits() {
    let setup = Setup::new();
    let config = setup.write_config(&format!("ingress:\n  max_body: 8KiB\n{AUDIT}"));
    let mut daemon = Daemon::spawn(&config, &[]);
    daemon.await_ready_line().await;
    let client = reqwest::Client::new();
    let url = daemon.url();
    let post = |e: serde_json::Value| {
        let (client, url) = (client.clone(), url.clone());
        async move { send(&client, &url, Some(TOKEN), &e).await.0 }
    };
    assert_eq!(post(event_of_size("big-1", 3000)).await, 200);

    // max_body lowered: the same body is now refused unread; small ones still pass.
    sighup_with(&daemon, &config, 1, |t| {
        t.replace("max_body: 8KiB", "max_body: 2KiB")
    })
    .await;
    assert_eq!(post(event_of_size("big-2", 3000)).await, 413);
    assert_eq!(post(event_of_size("small-1", 100)).await, 200);

    // allow_ips set to a network the test is not in: 403 for everything from here.
    sighup_with(&daemon, &config, 2, |t| {
        t.replace("ingress:\n", "ingress:\n  allow_ips: [192.0.2.0/24]\n")
    })
    .await;
    assert_eq!(post(event_of_size("small-2", 100)).await, 403);

    // And back in: allowed again.
    sighup_with(&daemon, &config, 3, |t| {
        t.replace("192.0.2.0/24", "127.0.0.1")
    })
    .await;
    assert_eq!(post(event_of_size("small-3", 100)).await, 200);
    assert!(daemon.terminate().success());
}

#[tokio::test]
async fn restart_only_settings_are_named_in_a_warning_and_kept() {
    let setup = Setup::new();
    let config = setup.write_config(AUDIT);
    let mut daemon = Daemon::spawn(&config, &[]);
    daemon.await_ready_line().await;
    let elsewhere = format!("127.0.0.1:{}", free_port());
    // Settings that need a restart, and a token rotation that applies at once.
    sighup_with(&daemon, &config, 1, |t| {
        t.replace(
            "listen: 127.0.0.1:0\nadmin",
            &format!("listen: {elsewhere}\nadmin"),
        )
        .replace("  path: relay.db\n", "  path: other.db\n  retention: 1d\n")
        .replace(TOKEN, "rotated-token")
    })
    .await;
    let log = daemon.log_text();
    let warning = log
        .lines()
        .find(|l| l.contains("change only on restart"))
        .unwrap_or_else(|| panic!("no restart warning:\n{log}"));
    assert!(warning.contains("WARN"), "{warning}");
    for setting in ["listen", "store.path", "store.retention"] {
        assert!(
            warning.split(['=', ',', ' ']).any(|w| w == setting),
            "the warning does not name {setting}: {warning}"
        );
    }

    // The rest of the reload applied: the new token works, the old one does not.
    let client = reqwest::Client::new();
    let url = daemon.url();
    assert_eq!(
        send(&client, &url, Some(TOKEN), &event("AUTH", "old"))
            .await
            .0,
        401
    );
    let (status, answer) = send(&client, &url, Some("rotated-token"), &event("AUTH", "kept")).await;
    // Still on the old address, storing into the old database.
    assert_eq!(status, 200, "{answer}");
    let stored: i64 = setup
        .db()
        .query_row(
            "SELECT COUNT(*) FROM events WHERE facial_id = 'kept'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(
        stored, 1,
        "the event is in the database the relay started with"
    );
    assert!(
        !setup.path("other.db").exists(),
        "a new database was opened"
    );
    assert!(
        std::net::TcpStream::connect(&elsewhere).is_err(),
        "the relay listens on the new address as well"
    );
    assert!(daemon.terminate().success());
}

/// Reads from `conn` until `buf` contains `end`, failing after [`WAIT`].
async fn read_until(conn: &mut tokio::net::TcpStream, buf: &mut Vec<u8>, end: &[u8]) {
    use tokio::io::AsyncReadExt;
    let deadline = std::time::Instant::now() + WAIT;
    while !buf.windows(end.len()).any(|w| w == end) {
        let mut chunk = [0u8; 1024];
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let n = tokio::time::timeout(left, conn.read(&mut chunk))
            .await
            .expect("answer in time")
            .unwrap();
        assert!(n > 0, "closed; got {:?}", String::from_utf8_lossy(buf));
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[tokio::test]
async fn a_reload_that_lowers_limits_sweeps_after_requests_under_the_old_ones() {
    use tokio::io::AsyncWriteExt;
    let setup = Setup::new();
    let down = format!("http://127.0.0.1:{}/", free_port());
    let audit = "  audit:\n    type: file\n    path: e.jsonl\n";
    // Old limits: a body may take 4 s. New limits: 200 ms, and `gone` is removed.
    let relay = TestRelay::start(setup.config(&format!(
        "ingress:\n  body_timeout: 4s\n  store_timeout: 1s\n\
         destinations:\n{}{audit}routes:\n  - to: [gone, audit]\n",
        http("gone", &down)
    )))
    .await;

    // A slow sender: its handler starts (100 Continue) under the old routes and limits.
    let body = event("AUTH", "slow-across-reload").to_string();
    let (first, rest) = body.split_at(body.len() / 2);
    let mut conn = tokio::net::TcpStream::connect(relay.relay.local_addr())
        .await
        .unwrap();
    let head = format!(
        "POST /webhook HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\n\
         WWW-Authenticate: Bearer {TOKEN}\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    read_until(&mut conn, &mut got, b"\r\n\r\n").await;
    assert!(got.starts_with(b"HTTP/1.1 100"), "{got:?}");
    conn.write_all(first.as_bytes()).await.unwrap();

    relay
        .relay
        .reload(setup.config(&format!(
            "ingress:\n  body_timeout: 200ms\n  store_timeout: 200ms\n\
             destinations:\n{audit}routes:\n  - to: [audit]\n"
        )))
        .await
        .unwrap();
    // The sender is slow, but within its 4 s: it finishes after a sweep timed from the
    // new limits (0.4 s + 1 s) would have run.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    conn.write_all(rest.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    read_until(&mut conn, &mut answer, b"}").await;
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");

    // Its delivery for the removed destination must not wait for a dispatcher that will
    // never come: the sweep waits for the old limits.
    eventually(
        "the late delivery for the removed destination dead-lettered",
        || state_of(&setup, "gone").0 == "dead",
    )
    .await;
    assert!(
        state_of(&setup, "gone")
            .1
            .contains("no longer in the config")
    );
    relay.shutdown().await;
}

#[tokio::test]
async fn an_invalid_config_on_sighup_still_reopens_files() {
    let setup = Setup::new();
    let config = setup.write_config(
        "destinations:\n  audit:\n    type: file\n    path: events.jsonl\nroutes:\n  - to: [audit]\n",
    );
    let mut daemon = Daemon::spawn(&config, &[]);
    daemon.await_ready_line().await;
    let live = setup.path("events.jsonl");
    let rotated = setup.path("events.jsonl.1");
    daemon.accept("AUTH", "before-rotation").await;
    eventually("first line", || {
        std::fs::read_to_string(&live).is_ok_and(|t| t.contains("before-rotation"))
    })
    .await;

    // logrotate moves the file and sends SIGHUP, while relay.yaml names a variable the
    // daemon's environment lacks: the config is refused, the files are reopened anyway.
    std::fs::rename(&live, &rotated).unwrap();
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace(TOKEN, "${UNSET_IN_THE_DAEMON}")).unwrap();
    daemon.signal("HUP");
    daemon
        .log_eventually("the new configuration is invalid")
        .await;

    daemon.accept("AUTH", "after-rotation").await;
    eventually("the new line in a new file", || {
        std::fs::read_to_string(&live).is_ok_and(|t| t.contains("after-rotation"))
    })
    .await;
    let old = std::fs::read_to_string(&rotated).unwrap();
    assert!(
        !old.contains("after-rotation"),
        "written into the rotated file: {old}"
    );
    assert!(daemon.terminate().success());
}
