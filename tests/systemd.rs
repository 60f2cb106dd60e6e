//! The systemd notify protocol, driven for real: a datagram socket as NOTIFY_SOCKET. And
//! where the logs go and at which level: journald, JSON lines, `log_level`, `RUST_LOG`.

mod common;

use common::*;
use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
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

const AUDIT: &str =
    "destinations:\n  audit:\n    type: file\n    path: e.jsonl\nroutes:\n  - to: [audit]\n";

/// Writes the config with `body` and ingress on a port chosen here (so the test knows
/// it before the daemon says anything); returns the config path and that address.
fn config_on_free_port(setup: &Setup, body: &str) -> (PathBuf, SocketAddr) {
    let path = setup.write_config(body);
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let text = std::fs::read_to_string(&path).unwrap().replacen(
        "listen: 127.0.0.1:0\n",
        &format!("listen: {addr}\n"),
        1,
    );
    std::fs::write(&path, text).unwrap();
    (path, addr)
}

/// The notify socket in `setup`'s directory, and its path for `NOTIFY_SOCKET`.
fn notify_socket(setup: &Setup) -> (UnixDatagram, String) {
    let path = setup.path("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    (sock, path.to_str().unwrap().to_string())
}

#[test]
fn ready_is_sent_once_the_port_accepts_and_the_store_is_open() {
    let setup = Setup::new();
    let (config, addr) = config_on_free_port(&setup, AUDIT);
    let (sock, sock_path) = notify_socket(&setup);
    // Nothing waits for the log line: READY=1 is the only readiness signal here.
    let daemon = Daemon::spawn(&config, &[("NOTIFY_SOCKET", Some(&sock_path))]);
    until(&sock, "READY=1");
    // At that moment, with no retry: the port takes connections and the store is there.
    std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).unwrap_or_else(|e| {
        panic!(
            "READY=1 was sent before {addr} accepted connections: {e}\n{}",
            daemon.log_text()
        )
    });
    let db = setup.path("relay.db");
    assert!(db.exists(), "READY=1 before the store file exists");
    let events: i64 = rusqlite::Connection::open(&db)
        .unwrap()
        .query_row("SELECT COUNT(*) FROM events", [], |r| r.get(0))
        .expect("the store's tables exist when READY=1 is sent");
    assert_eq!(events, 0);

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
    let mut daemon = daemon;
    daemon.signal("TERM");
    assert!(daemon.wait_exit().success());
}

#[test]
fn watchdog_pings_at_half_of_watchdog_usec() {
    let setup = Setup::new();
    let (config, _) = config_on_free_port(&setup, AUDIT);
    let (sock, sock_path) = notify_socket(&setup);
    let mut daemon = Daemon::spawn(
        &config,
        &[
            ("NOTIFY_SOCKET", Some(&sock_path)),
            ("WATCHDOG_USEC", Some("200000")),
        ],
    );
    until(&sock, "READY=1");
    // systemd kills a service that misses WATCHDOG_USEC; pinging at half of it (100 ms)
    // leaves a margin. Pinging at the full period (200 ms) must fail this.
    let mut pings = vec![];
    while pings.len() < 11 {
        let seen = until(&sock, "WATCHDOG=1");
        pings.push(seen.last().unwrap().0);
    }
    // The mean gap, from the first and last pings only: a stall of this test in between
    // (pings read late, then several at once) does not move it.
    let mean = (pings[10] - pings[0]) / 10;
    let gaps: Vec<Duration> = pings.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(
        mean >= Duration::from_millis(70) && mean <= Duration::from_millis(140),
        "mean gap between WATCHDOG=1 pings {mean:?} (all: {gaps:?}); want about 100 ms"
    );
    daemon.signal("TERM");
    assert!(daemon.wait_exit().success());
}

#[test]
fn sighup_sends_reloading_then_ready_and_sigterm_stopping() {
    let setup = Setup::new();
    let (config, _) = config_on_free_port(&setup, AUDIT);
    let (sock, sock_path) = notify_socket(&setup);
    let mut daemon = Daemon::spawn(&config, &[("NOTIFY_SOCKET", Some(&sock_path))]);
    until(&sock, "READY=1");

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
    assert!(daemon.wait_exit().success());
}

/// (line, column), both from 1, of the first `needle` in `text`.
fn position(text: &str, needle: &str) -> (usize, usize) {
    text.lines()
        .enumerate()
        .find_map(|(i, l)| l.find(needle).map(|c| (i + 1, c + 1)))
        .unwrap_or_else(|| panic!("{needle:?} not in:\n{text}"))
}

#[tokio::test]
async fn an_invalid_config_on_sighup_is_reported_in_full_and_the_old_one_keeps_running() {
    let setup = Setup::new();
    let (config, addr) = config_on_free_port(&setup, AUDIT);
    let (sock, sock_path) = notify_socket(&setup);
    let daemon = Daemon::spawn(&config, &[("NOTIFY_SOCKET", Some(&sock_path))]);
    until(&sock, "READY=1");

    // Two distinct errors, and a change that would send events elsewhere if any of this
    // file were applied.
    let broken = std::fs::read_to_string(&config)
        .unwrap()
        .replace(
            "    path: e.jsonl\n",
            "    path: elsewhere.jsonl\n    retry: { max_attemps: 3 }\n",
        )
        .replace("to: [audit]", "to: [audti]");
    std::fs::write(&config, &broken).unwrap();
    daemon.signal("HUP");
    until(&sock, "RELOADING=1");
    until(&sock, "READY=1");
    daemon
        .log_eventually("still running on the previous one")
        .await;
    let log = daemon.log_text();
    for (needle, key) in [
        (
            "max_attemps",
            "destinations.audit.retry.max_attemps: unknown field",
        ),
        ("audti", "routes[0].to[0]: unknown destination"),
    ] {
        let (line, col) = position(&broken, needle);
        let want = format!("relay.yaml:{line}:{col}: {key}");
        assert!(
            log.lines().any(|l| l.contains(&want)),
            "the log should name {want:?}:\n{log}"
        );
    }

    let client = reqwest::Client::new();
    let url = format!("http://{addr}/webhook");
    let (status, answer) = send(&client, &url, Some(TOKEN), &event("AUTH", "still-up")).await;
    assert_eq!(status, 200, "{answer}");
    let id = answer["id"].as_str().unwrap().to_string();
    let old_route = setup.path("e.jsonl");
    eventually("the event delivered by the old routes", || {
        std::fs::read_to_string(&old_route).is_ok_and(|t| t.contains(&id))
    })
    .await;
    assert!(!setup.path("elsewhere.jsonl").exists());
    let mut daemon = daemon;
    daemon.signal("TERM");
    assert!(daemon.wait_exit().success());
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

/// A child process killed when dropped (a failing test leaves no daemon behind).
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Under systemd (JOURNAL_STREAM set) lines go to journald with structured fields, so
/// `journalctl EVENT_ID=…` tells one event's story: accepted, then each destination's
/// outcome. journald's socket path is fixed, so this test plays journald on it when no
/// real one runs (as on this project's CI machines, where it runs as root); where
/// journald runs, it is skipped.
#[tokio::test]
async fn under_journald_fields_are_journal_fields() {
    use std::os::unix::fs::MetadataExt;
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
    let down = format!("http://127.0.0.1:{}/", free_port());
    let config = setup.write_config(&format!(
        "destinations:\n  audit:\n    type: file\n    path: e.jsonl\n  \
         down:\n    type: http\n    url: {down}\n    retry: {{ max_attempts: 1 }}\n\
         routes:\n  - to: [audit, down]\n"
    ));
    // systemd connects stderr to the journal and names that stream (device:inode) in
    // JOURNAL_STREAM; do the same with a file, so the daemon sees a real match.
    let stderr = std::fs::File::create(setup.path("stderr.log")).unwrap();
    let meta = stderr.metadata().unwrap();
    // The ready line goes to the journal too, so start the child by hand and find its
    // address in the journal messages.
    let _child = Child(
        std::process::Command::new(binary())
            .args(["run", "--config"])
            .arg(&config)
            .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + WAIT;
    let mut buf = vec![0u8; 65536];
    let mut read = || {
        assert!(Instant::now() < deadline, "journal messages did not come");
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
    let field = |m: &Fields, k: &str| m.get(k).cloned();
    let addr = field(&ready, "ADDR").expect("ADDR field");
    assert_eq!(
        field(&ready, "SYSLOG_IDENTIFIER"),
        Some("faceio-relay".into())
    );
    let client = reqwest::Client::new();
    let (_, answer) = send(
        &client,
        &format!("http://{addr}/webhook"),
        Some(TOKEN),
        &event("AUTH", "jf"),
    )
    .await;
    let id = answer["id"].as_str().unwrap().to_string();
    let (mut accepted, mut delivered, mut dead) = (None, None, None);
    while accepted.is_none() || delivered.is_none() || dead.is_none() {
        let m = read();
        if m.get("EVENT_ID") != Some(&id) {
            continue;
        }
        let slot = match m.get("MESSAGE").map(String::as_str) {
            Some("event accepted") => &mut accepted,
            Some("delivery succeeded") => &mut delivered,
            Some("delivery failed for good; moved to dead letters") => &mut dead,
            _ => continue,
        };
        *slot = Some(m);
    }
    let accepted = accepted.unwrap();
    assert_eq!(
        field(&accepted, "EVENT_NAME"),
        Some("AUTH".into()),
        "{accepted:?}"
    );
    let delivered = delivered.unwrap();
    assert_eq!(
        field(&delivered, "DESTINATION"),
        Some("audit".into()),
        "{delivered:?}"
    );
    assert_eq!(
        field(&delivered, "STATUS"),
        Some("delivered".into()),
        "{delivered:?}"
    );
    assert_eq!(
        field(&delivered, "ATTEMPT"),
        Some("1".into()),
        "{delivered:?}"
    );
    let dead = dead.unwrap();
    assert_eq!(field(&dead, "DESTINATION"), Some("down".into()), "{dead:?}");
    assert_eq!(field(&dead, "STATUS"), Some("dead".into()), "{dead:?}");
    assert!(dead.contains_key("ERROR"), "{dead:?}");
    for m in [&accepted, &delivered, &dead] {
        assert!(m.values().all(|v| !v.contains(TOKEN)), "{m:?}");
    }
}

/// One journal entry's fields.
type Fields = std::collections::HashMap<String, String>;

/// Parses one datagram of journald's native protocol: `KEY=value\n`, or
/// `KEY\n<u64 little-endian length><value>\n` for values that may hold newlines.
fn parse_journal(mut d: &[u8]) -> Fields {
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

// Log levels. The probe is a debug line of the relay's own: a connection that sends
// nothing within `ingress.header_timeout` is closed with "connection sent nothing in
// time" at DEBUG.

const SILENT_CONNECTION: &str = "reason=no_request";

/// A config whose silent connections are closed after 200 ms, with `extra` top-level keys.
fn level_config(setup: &Setup, extra: &str) -> PathBuf {
    setup.write_config(&format!(
        "ingress:\n  header_timeout: 200ms\n{extra}{AUDIT}"
    ))
}

/// Whether the daemon logs a debug line now: opens a connection that sends nothing and
/// waits until the daemon closes it, then sends an event and waits for its info line.
/// Lines are written in the order they are logged, so a debug line logged before the
/// close is in the log by then.
async fn logs_debug(daemon: &Daemon) -> bool {
    use tokio::io::AsyncReadExt;
    let before = daemon.log_count(SILENT_CONNECTION);
    let mut silent = tokio::net::TcpStream::connect(daemon.addr).await.unwrap();
    let mut byte = [0u8; 1];
    let closed = tokio::time::timeout(WAIT, silent.read(&mut byte)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "a silent connection was not closed: {closed:?}"
    );
    let client = reqwest::Client::new();
    let (status, answer) = send(&client, &daemon.url(), Some(TOKEN), &event("AUTH", "p")).await;
    assert_eq!(status, 200, "{answer}");
    daemon.log_eventually(answer["id"].as_str().unwrap()).await;
    let after = daemon.log_count(SILENT_CONNECTION);
    if after > before {
        let log = daemon.log_text();
        let line = log
            .lines()
            .rfind(|l| l.contains(SILENT_CONNECTION))
            .unwrap();
        assert!(line.contains("DEBUG"), "not a debug line: {line}");
    }
    after > before
}

/// Rewrites `log_level:` in the config, sends SIGHUP and waits for the `n`th reload.
async fn reload_log_level(daemon: &Daemon, config: &std::path::Path, level: &str, n: usize) {
    let text = std::fs::read_to_string(config).unwrap();
    let text = match text.lines().find(|l| l.starts_with("log_level:")) {
        Some(line) => text.replace(line, &format!("log_level: {level}")),
        None => format!("log_level: {level}\n{text}"),
    };
    std::fs::write(config, text).unwrap();
    daemon.signal("HUP");
    daemon
        .log_count_eventually("configuration reloaded", n)
        .await;
}

#[tokio::test]
async fn log_level_in_the_config_sets_the_level() {
    let setup = Setup::new();
    let config = level_config(&setup, "log_level: debug\n");
    let mut daemon = Daemon::spawn(&config, &[("RUST_LOG", None)]);
    daemon.await_ready_line().await;
    assert!(
        logs_debug(&daemon).await,
        "log_level: debug, yet no debug line:\n{}",
        daemon.log_text()
    );
    assert!(daemon.terminate().success());
}

#[tokio::test]
async fn rust_log_wins_over_log_level_at_start_and_on_reload() {
    let setup = Setup::new();
    let config = level_config(&setup, "log_level: info\n");
    let mut daemon = Daemon::spawn(&config, &[("RUST_LOG", Some("debug"))]);
    daemon.await_ready_line().await;
    assert!(
        logs_debug(&daemon).await,
        "RUST_LOG=debug, yet no debug line:\n{}",
        daemon.log_text()
    );
    // A reload with another log_level leaves RUST_LOG in charge.
    reload_log_level(&daemon, &config, "faceio_relay=info,warn", 1).await;
    assert!(
        logs_debug(&daemon).await,
        "a reload's log_level overrode RUST_LOG:\n{}",
        daemon.log_text()
    );
    assert!(daemon.terminate().success());
}

#[tokio::test]
async fn a_reload_applies_a_changed_log_level() {
    let setup = Setup::new();
    let config = level_config(&setup, "");
    let mut daemon = Daemon::spawn(&config, &[("RUST_LOG", None)]);
    daemon.await_ready_line().await;
    assert!(
        !logs_debug(&daemon).await,
        "debug lines at the default level:\n{}",
        daemon.log_text()
    );
    reload_log_level(&daemon, &config, "debug", 1).await;
    assert!(
        logs_debug(&daemon).await,
        "log_level: debug after a reload, yet no debug line:\n{}",
        daemon.log_text()
    );
    reload_log_level(&daemon, &config, "info", 2).await;
    assert!(
        !logs_debug(&daemon).await,
        "log_level: info after a reload, yet debug lines:\n{}",
        daemon.log_text()
    );
    assert!(daemon.terminate().success());
}
