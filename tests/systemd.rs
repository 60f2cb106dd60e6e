//! The systemd notify protocol, driven for real: a datagram socket as NOTIFY_SOCKET.

mod common;

use common::*;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

/// Reads notify datagrams until one contains `want`, returning every message seen.
fn until(sock: &UnixDatagram, want: &str) -> Vec<(Instant, String)> {
    let deadline = Instant::now() + WAIT;
    let mut seen = vec![];
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no {want:?} from the daemon; saw {seen:?}");
        sock.set_read_timeout(Some(left)).unwrap();
        let n = sock.recv(&mut buf).expect("a notify message");
        let msg = String::from_utf8_lossy(&buf[..n]).to_string();
        let done = msg.lines().any(|l| l == want);
        seen.push((Instant::now(), msg));
        if done {
            return seen;
        }
    }
}

#[test]
fn ready_watchdog_reload_and_stopping() {
    let setup = Setup::new();
    let config = setup.write_config(
        "destinations:\n  audit:\n    type: file\n    path: e.jsonl\nroutes:\n  - to: [audit]\n",
    );
    let sock_path = setup.path("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    let daemon = Daemon::start_with_env(
        &config,
        &[
            ("NOTIFY_SOCKET", sock_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "200000"),
        ],
    );
    until(&sock, "READY=1");
    // READY came after the port accepts connections.
    std::net::TcpStream::connect(daemon.addr).expect("listening when READY=1 is sent");
    // A STATUS= line with live figures follows.
    let deadline = Instant::now() + WAIT;
    let mut buf = [0u8; 4096];
    loop {
        assert!(Instant::now() < deadline, "no STATUS= with figures");
        sock.set_read_timeout(Some(WAIT)).unwrap();
        let n = sock.recv(&mut buf).unwrap();
        let msg = String::from_utf8_lossy(&buf[..n]).to_string();
        if let Some(status) = msg
            .lines()
            .find_map(|l| l.strip_prefix("STATUS="))
            .filter(|s| s.contains("accepted"))
        {
            assert!(status.contains("pending"), "{status}");
            break;
        }
    }

    // Watchdog pings at half of WATCHDOG_USEC (100 ms).
    let mut pings = vec![];
    while pings.len() < 6 {
        let seen = until(&sock, "WATCHDOG=1");
        pings.push(seen.last().unwrap().0);
    }
    for w in pings.windows(2) {
        let gap = w[1] - w[0];
        assert!(
            gap >= Duration::from_millis(40) && gap <= Duration::from_millis(400),
            "ping gap {gap:?}"
        );
    }

    // SIGHUP: RELOADING=1 (with MONOTONIC_USEC), then READY=1.
    daemon.signal("HUP");
    let seen = until(&sock, "RELOADING=1");
    assert!(
        seen.last().unwrap().1.contains("MONOTONIC_USEC="),
        "{seen:?}"
    );
    until(&sock, "READY=1");
    daemon.wait_for_log("configuration reloaded");

    // SIGTERM: STOPPING=1, exit 0.
    daemon.signal("TERM");
    until(&sock, "STOPPING=1");
    let mut daemon = daemon;
    assert!(daemon.wait_exit().success());
}

#[tokio::test]
async fn an_invalid_config_on_sighup_keeps_the_old_one_running() {
    let setup = Setup::new();
    let body =
        "destinations:\n  audit:\n    type: file\n    path: e.jsonl\nroutes:\n  - to: [audit]\n";
    let config = setup.write_config(body);
    let daemon = Daemon::start(&config);
    std::fs::write(
        &config,
        std::fs::read_to_string(&config)
            .unwrap()
            .replace("to: [audit]", "to: [audti]"),
    )
    .unwrap();
    daemon.signal("HUP");
    daemon.wait_for_log("still running on the previous one");
    let log = daemon.log_text();
    assert!(
        log.contains("routes[0].to[0]: unknown destination"),
        "{log}"
    );
    assert!(
        log.contains("relay.yaml:"),
        "errors name the file, line and column: {log}"
    );
    let client = reqwest::Client::new();
    let (status, _) = send(
        &client,
        &daemon.url(),
        Some(TOKEN),
        &event("AUTH", "still-up"),
    )
    .await;
    assert_eq!(status, 200);
    assert!(daemon.terminate().success());
}

#[tokio::test]
async fn json_log_format_prints_one_object_per_line() {
    let setup = Setup::new();
    let config = setup.write_config("log_format: json\n");
    let daemon = Daemon::start(&config);
    let client = reqwest::Client::new();
    send(&client, &daemon.url(), Some(TOKEN), &event("AUTH", "j")).await;
    daemon.wait_for_log("event accepted");
    let log = daemon.log_text();
    let accepted: serde_json::Value = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["message"] == "event accepted")
        .expect("a JSON line for the accepted event");
    assert_eq!(accepted["event_name"], "AUTH");
    assert!(accepted["event_id"].as_str().is_some_and(|s| s.len() == 36));
    assert!(daemon.terminate().success());
}

/// Under systemd (JOURNAL_STREAM set) lines go to journald with structured fields.
/// journald's socket path is fixed, so this test plays journald on it when no real one
/// runs (as on CI machines); where journald runs, it checks the real journal instead.
#[tokio::test]
async fn under_journald_fields_are_journal_fields() {
    let socket = std::path::Path::new("/run/systemd/journal/socket");
    if socket.exists() {
        eprintln!("a real journald runs here; this test needs its socket path free: skipped");
        return;
    }
    if std::fs::create_dir_all(socket.parent().unwrap()).is_err() {
        eprintln!("cannot create /run/systemd/journal (not root?): skipped");
        return;
    }
    struct Remove<'a>(&'a std::path::Path);
    impl Drop for Remove<'_> {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(self.0);
        }
    }
    let journal = UnixDatagram::bind(socket).unwrap();
    let _cleanup = Remove(socket);

    let setup = Setup::new();
    let config = setup.write_config("");
    // The ready line goes to the journal too, so start the child by hand and find its
    // address in the journal messages.
    let mut child = std::process::Command::new(binary())
        .args(["run", "--config"])
        .arg(&config)
        .env("JOURNAL_STREAM", "8:12345")
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = vec![0u8; 65536];
    let mut read = || {
        journal.set_read_timeout(Some(WAIT)).unwrap();
        let n = journal.recv(&mut buf).expect("journal message");
        parse_journal(&buf[..n])
    };
    let ready = loop {
        let m = read();
        if m.get("MESSAGE").is_some_and(|v| v == "faceio-relay ready") {
            break m;
        }
    };
    let addr = ready.get("ADDR").expect("ADDR field").clone();
    assert_eq!(ready["SYSLOG_IDENTIFIER"], "faceio-relay");
    let client = reqwest::Client::new();
    let (_, answer) = send(
        &client,
        &format!("http://{addr}/webhook"),
        Some(TOKEN),
        &event("AUTH", "jf"),
    )
    .await;
    let id = answer["id"].as_str().unwrap().to_string();
    let accepted = loop {
        let m = read();
        if m.get("MESSAGE").is_some_and(|v| v == "event accepted") {
            break m;
        }
    };
    assert_eq!(accepted["EVENT_ID"], id, "{accepted:?}");
    assert_eq!(accepted["EVENT_NAME"], "AUTH");
    assert!(accepted.values().all(|v| !v.contains(TOKEN)));
    child.kill().unwrap();
    child.wait().unwrap();
}

/// Parses one datagram of journald's native protocol: `KEY=value\n`, or
/// `KEY\n<u64 little-endian length><value>\n` for values that may hold newlines.
fn parse_journal(mut d: &[u8]) -> std::collections::HashMap<String, String> {
    let mut fields = std::collections::HashMap::new();
    while !d.is_empty() {
        let end = d.iter().position(|&b| b == b'\n').unwrap_or(d.len());
        let line = &d[..end];
        if let Some(eq) = line.iter().position(|&b| b == b'=') {
            fields.insert(
                String::from_utf8_lossy(&line[..eq]).to_string(),
                String::from_utf8_lossy(&line[eq + 1..]).to_string(),
            );
            d = &d[(end + 1).min(d.len())..];
        } else {
            let key = String::from_utf8_lossy(line).to_string();
            let rest = &d[end + 1..];
            let len = u64::from_le_bytes(rest[..8].try_into().unwrap()) as usize;
            let value = String::from_utf8_lossy(&rest[8..8 + len]).to_string();
            fields.insert(key, value);
            d = &rest[(8 + len + 1).min(rest.len())..];
        }
    }
    fields
}
