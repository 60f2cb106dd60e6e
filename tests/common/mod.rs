//! Test harness: the real relay (in-process or as the built binary) on 127.0.0.1:0,
//! fake receivers (Slack, HTTP APIs) that record what they get, and FACEIO-like senders.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use tokio::sync::mpsc;

use faceio_relay::Relay;
use faceio_relay::config::{self, Config};

/// How long any single wait in a test may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(10);

pub const TOKEN: &str = "tok-test-0123456789";
pub const APP: &str = "fioa-test";

/// One request a fake receiver got.
#[derive(Debug, Clone)]
pub struct Received {
    pub headers: HeaderMap,
    pub body: Bytes,
    pub at: Instant,
}

impl Received {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("receiver got JSON")
    }
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
    }
}

/// How a fake receiver answers one request.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: String,
    pub headers: Vec<(String, String)>,
}

impl Reply {
    pub fn status(status: u16) -> Self {
        Self {
            status,
            body: String::new(),
            headers: vec![],
        }
    }
    pub fn body(mut self, body: &str) -> Self {
        self.body = body.into();
        self
    }
    pub fn header(mut self, k: &str, v: &str) -> Self {
        self.headers.push((k.into(), v.into()));
        self
    }
}

struct ReceiverState {
    script: Mutex<VecDeque<Reply>>,
    default: Mutex<Reply>,
    tx: mpsc::UnboundedSender<Received>,
}

/// A fake Slack / HTTP API on 127.0.0.1:0. Answers from its script, then its default.
pub struct Receiver {
    pub addr: SocketAddr,
    rx: mpsc::UnboundedReceiver<Received>,
    state: Arc<ReceiverState>,
    task: tokio::task::JoinHandle<()>,
}

async fn receive(State(s): State<Arc<ReceiverState>>, headers: HeaderMap, body: Bytes) -> Response {
    let at = Instant::now();
    let reply = s
        .script
        .lock()
        .unwrap()
        .pop_front()
        .unwrap_or_else(|| s.default.lock().unwrap().clone());
    let _ = s.tx.send(Received { headers, body, at });
    let mut r = (StatusCode::from_u16(reply.status).unwrap(), reply.body).into_response();
    for (k, v) in reply.headers {
        r.headers_mut().insert(
            axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    r
}

impl Receiver {
    /// Starts a receiver answering `default` to everything not scripted.
    pub async fn start(default: Reply) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve(listener, default)
    }

    /// A receiver answering `200 ok` on a given port (one from [`free_port`], where a
    /// destination was already pointed while nothing listened).
    pub async fn ok_on(port: u16) -> Self {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        Self::serve(listener, Reply::status(200).body("ok"))
    }

    fn serve(listener: tokio::net::TcpListener, default: Reply) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let state = Arc::new(ReceiverState {
            script: Mutex::new(VecDeque::new()),
            default: Mutex::new(default),
            tx,
        });
        let app = axum::Router::new()
            .fallback(receive)
            .with_state(Arc::clone(&state));
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self {
            addr,
            rx,
            state,
            task,
        }
    }

    /// A receiver that answers 200 `ok` (Slack's success answer).
    pub async fn ok() -> Self {
        Self::start(Reply::status(200).body("ok")).await
    }

    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    /// Queues answers for the next requests.
    pub fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        self.state.script.lock().unwrap().extend(replies);
    }

    pub fn set_default(&self, reply: Reply) {
        *self.state.default.lock().unwrap() = reply;
    }

    /// The next request, or panics after [`WAIT`].
    pub async fn next(&mut self) -> Received {
        next_request(&mut self.rx).await
    }

    /// Whether a request arrives within `within` (for asserting that nothing comes).
    pub async fn next_within(&mut self, within: Duration) -> Option<Received> {
        request_within(&mut self.rx, within).await
    }

    /// Stops answering (connections are refused from now on).
    pub fn stop(&self) {
        self.task.abort();
    }
}

/// The next request a fake destination reported, or panics after [`WAIT`].
async fn next_request(rx: &mut mpsc::UnboundedReceiver<Received>) -> Received {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("the fake destination got nothing in time")
        .expect("the fake destination stopped")
}

/// The next request a fake destination reports within `within`, if any.
async fn request_within(
    rx: &mut mpsc::UnboundedReceiver<Received>,
    within: Duration,
) -> Option<Received> {
    tokio::time::timeout(within, rx.recv()).await.ok().flatten()
}

/// A port nothing listens on (bound then released), for a destination that is down.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A fake API that holds requests open: the first `hold` requests wait until the test
/// releases them (then get `200 ok`, or the status given to [`Holder::answering`]),
/// later ones are answered at once. It counts
/// the requests open at a time, for tests of a destination's concurrency and timeout.
pub struct Holder {
    pub addr: SocketAddr,
    rx: mpsc::UnboundedReceiver<Received>,
    state: Arc<HolderState>,
    task: tokio::task::JoinHandle<()>,
}

struct HolderState {
    hold: usize,
    status: StatusCode,
    seen: std::sync::atomic::AtomicUsize,
    open: std::sync::atomic::AtomicUsize,
    max_open: std::sync::atomic::AtomicUsize,
    /// One permit lets one held request go; closed, it lets every one go.
    gate: tokio::sync::Semaphore,
    tx: mpsc::UnboundedSender<Received>,
}

/// Counts a request as open until its handler ends, answered or dropped (client gone).
/// It ends before the answer is written, so the client cannot act on an answer while
/// its request still counts as open.
struct OpenRequest<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for OpenRequest<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

async fn hold_request(
    State(s): State<Arc<HolderState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    use std::sync::atomic::Ordering::SeqCst;
    let n = s.seen.fetch_add(1, SeqCst);
    let open = s.open.fetch_add(1, SeqCst) + 1;
    let _open = OpenRequest(&s.open);
    s.max_open.fetch_max(open, SeqCst);
    // Reported after it counts as open.
    let _ = s.tx.send(Received {
        headers,
        body,
        at: Instant::now(),
    });
    if n < s.hold {
        // Err: the gate is closed, every request goes.
        if let Ok(permit) = s.gate.acquire().await {
            permit.forget();
        }
    }
    (s.status, "ok").into_response()
}

impl Holder {
    /// Holds the first `hold` requests (`usize::MAX`: all of them).
    pub async fn start(hold: usize) -> Self {
        Self::answering(hold, 200).await
    }

    /// Like [`Holder::start`], answering `status` instead of 200.
    pub async fn answering(hold: usize, status: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        let state = Arc::new(HolderState {
            hold,
            status: StatusCode::from_u16(status).unwrap(),
            seen: Default::default(),
            open: Default::default(),
            max_open: Default::default(),
            gate: tokio::sync::Semaphore::new(0),
            tx,
        });
        let app = axum::Router::new()
            .fallback(hold_request)
            .with_state(Arc::clone(&state));
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self {
            addr,
            rx,
            state,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    /// The next request to arrive (held or not), or panics after [`WAIT`].
    pub async fn next(&mut self) -> Received {
        next_request(&mut self.rx).await
    }

    /// Whether a request arrives within `within` (for asserting that nothing comes).
    pub async fn next_within(&mut self, within: Duration) -> Option<Received> {
        request_within(&mut self.rx, within).await
    }

    /// Lets `n` held requests (the longest waiting first) be answered.
    pub fn release(&self, n: usize) {
        self.state.gate.add_permits(n);
    }

    /// Lets every held request, and every later one, be answered.
    pub fn release_all(&self) {
        self.state.gate.close();
    }

    /// Requests open now.
    pub fn open(&self) -> usize {
        self.state.open.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Most requests ever open at once.
    pub fn max_open(&self) -> usize {
        self.state
            .max_open
            .load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        self.release_all();
        self.task.abort();
    }
}

/// A scratch directory with a relay.yaml and a store.
pub struct Setup {
    pub dir: tempfile::TempDir,
}

impl Setup {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes `relay.yaml` from the given destinations and routes YAML (indented as
    /// top-level keys), with one application using [`APP`]/[`TOKEN`], and returns its path.
    pub fn write_config(&self, body: &str) -> PathBuf {
        let yaml = format!(
            "listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\nwebhook_path: /webhook\nstore:\n  path: relay.db\n\
             applications:\n  - app_id: {APP}\n    token: {TOKEN}\n\
             delivery:\n  poll_interval: 200ms\n  shutdown_grace: 2s\n{body}"
        );
        let path = self.path("relay.yaml");
        std::fs::write(&path, yaml).unwrap();
        path
    }

    /// Like [`Setup::write_config`], with more applications (`app_id`, `token`) listed
    /// after [`APP`] (which stays the first, the one `simulate` picks by default).
    pub fn write_config_with_apps(&self, apps: &[(&str, &str)], body: &str) -> PathBuf {
        let path = self.write_config(body);
        let first = format!("    token: {TOKEN}\n");
        let more: String = apps
            .iter()
            .map(|(id, token)| format!("  - app_id: {id}\n    token: {token}\n"))
            .collect();
        let yaml =
            std::fs::read_to_string(&path)
                .unwrap()
                .replacen(&first, &format!("{first}{more}"), 1);
        std::fs::write(&path, yaml).unwrap();
        path
    }

    /// Loads the written config through the real loader.
    pub fn config(&self, body: &str) -> Config {
        let path = self.write_config(body);
        match config::load(&path) {
            Ok((c, _warnings)) => c,
            Err(e) => panic!("test config invalid:\n{e}"),
        }
    }

    pub fn db(&self) -> rusqlite::Connection {
        rusqlite::Connection::open(self.path("relay.db")).unwrap()
    }
}

/// A relay running in this process.
pub struct TestRelay {
    pub relay: Relay,
    pub url: String,
    pub client: reqwest::Client,
}

impl TestRelay {
    pub async fn start(config: Config) -> Self {
        let relay = Relay::start(config).await.expect("relay starts");
        let url = format!("http://{}/webhook", relay.local_addr());
        Self {
            relay,
            url,
            client: reqwest::Client::new(),
        }
    }

    /// POSTs a FACEIO event with the right token; returns status and JSON body.
    pub async fn send(&self, event: &serde_json::Value) -> (u16, serde_json::Value) {
        send(&self.client, &self.url, Some(TOKEN), event).await
    }

    pub async fn shutdown(self) {
        self.relay.shutdown().await;
    }
}

/// POSTs `event` as FACEIO does.
pub async fn send(
    client: &reqwest::Client,
    url: &str,
    token: Option<&str>,
    event: &serde_json::Value,
) -> (u16, serde_json::Value) {
    let mut req = client.post(url).json(event);
    if let Some(t) = token {
        req = req.header("WWW-Authenticate", format!("Bearer {t}"));
    }
    let resp = req.send().await.expect("relay answers");
    let status = resp.status().as_u16();
    let body = resp.json().await.unwrap_or(serde_json::Value::Null);
    (status, body)
}

/// A FACEIO payload.
pub fn event(name: &str, facial_id: &str) -> serde_json::Value {
    let mut e = serde_json::json!({
        "eventName": name,
        "facialId": facial_id,
        "appId": APP,
        "clientIp": "203.0.113.7",
    });
    if name == "ENROLL" {
        e["details"] =
            serde_json::json!({"timestamp": "2026-11-27", "gender": "female", "age": 31});
    }
    e
}

/// Waits until `check` is true, looking every 20 ms, failing after [`WAIT`].
pub async fn eventually<F: FnMut() -> bool>(what: &str, mut check: F) {
    let deadline = Instant::now() + WAIT;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Counts the events in the store.
pub fn stored_events(setup: &Setup) -> i64 {
    setup
        .db()
        .query_row("SELECT COUNT(*) FROM events", [], |r| r.get(0))
        .unwrap()
}

/// Counts deliveries in `state` (pending, done, dead).
pub fn count(setup: &Setup, state: &str) -> i64 {
    setup
        .db()
        .query_row(
            "SELECT COUNT(*) FROM deliveries WHERE state = ?1",
            [state],
            |r| r.get(0),
        )
        .unwrap()
}

/// The relay as a child process (for kill -9 and signal tests).
pub struct Daemon {
    pub child: Child,
    pub addr: SocketAddr,
    /// Every stderr line so far (a reader thread keeps collecting).
    pub log: Arc<Mutex<Vec<String>>>,
}

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_faceio-relay")
}

/// A failing test must not leave a daemon behind.
impl Drop for Daemon {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Daemon {
    /// Starts `faceio-relay run --config <config>` and waits for its ready line.
    pub fn start(config: &Path) -> Self {
        Self::start_with_env(config, &[])
    }

    /// Like [`Daemon::start`], with extra environment variables (`RUST_LOG` among them
    /// replaces the default `info`).
    pub fn start_with_env(config: &Path, env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(binary())
            .args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("binary starts");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if line.contains("faceio-relay ready") {
                        let _ = tx.send(line.clone());
                    }
                    log.lock().unwrap().push(line);
                }
            });
        }
        let ready = rx.recv_timeout(WAIT).unwrap_or_else(|_| {
            panic!("daemon not ready; log:\n{}", log.lock().unwrap().join("\n"))
        });
        // Text lines say `addr=IP:PORT`; JSON lines `"addr":"IP:PORT"`.
        let addr = ready
            .split_whitespace()
            .find_map(|w| w.strip_prefix("addr="))
            .map(str::to_string)
            .or_else(|| {
                serde_json::from_str::<serde_json::Value>(&ready)
                    .ok()
                    .and_then(|v| v["addr"].as_str().map(str::to_string))
            })
            .expect("ready line names addr")
            .parse()
            .unwrap();
        Self { child, addr, log }
    }

    pub fn url(&self) -> String {
        format!("http://{}/webhook", self.addr)
    }

    /// POSTs a FACEIO event with the right token, asserts the 200, returns the event ID.
    pub async fn accept(&self, name: &str, facial_id: &str) -> String {
        let client = reqwest::Client::new();
        let (status, answer) =
            send(&client, &self.url(), Some(TOKEN), &event(name, facial_id)).await;
        assert_eq!(status, 200, "{answer}");
        answer["id"]
            .as_str()
            .expect("the answer names the event")
            .to_string()
    }

    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Waits for the process to exit, failing after [`WAIT`].
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not exit:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        self.child.wait().unwrap()
    }

    /// Sends a signal by name (`HUP`, `TERM`, …).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits until a log line contains `needle`.
    pub fn wait_for_log(&self, needle: &str) {
        let deadline = Instant::now() + WAIT;
        while !self.log_text().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "log never said {needle:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}
pub mod attack;
pub mod faults;
pub mod pg;
pub mod proc;
pub mod proxy;
pub mod queues;
pub mod store;

/// A daemon started without waiting for anything, for tests that watch readiness
/// themselves (the notify socket) or decide its environment (no `RUST_LOG`).
impl Daemon {
    /// `faceio-relay run --config <config>` with `env` applied (`None` removes a variable;
    /// `RUST_LOG` is `info` unless `env` says otherwise); returns at once. `addr` is
    /// `0.0.0.0:0` until [`Daemon::await_ready_line`] reads it from the ready line.
    pub fn spawn(config: &Path, env: &[(&str, Option<&str>)]) -> Self {
        let mut cmd = Command::new(binary());
        cmd.args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        let mut child = cmd.spawn().expect("binary starts");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    log.lock().unwrap().push(line);
                }
            });
        }
        Self {
            child,
            addr: "0.0.0.0:0".parse().unwrap(),
            log,
        }
    }

    /// Waits (bounded, without blocking the runtime) for the text ready line and takes
    /// the ingress address from it.
    pub async fn await_ready_line(&mut self) {
        self.log_eventually("faceio-relay ready").await;
        let log = self.log_text();
        let ready = log
            .lines()
            .find(|l| l.contains("faceio-relay ready"))
            .unwrap();
        self.addr = ready
            .split_whitespace()
            .find_map(|w| w.strip_prefix("addr="))
            .expect("ready line names addr")
            .parse()
            .unwrap();
    }

    /// How many stderr lines so far contain `needle`.
    pub fn log_count(&self, needle: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Waits (bounded, without blocking the runtime) until a stderr line contains `needle`.
    pub async fn log_eventually(&self, needle: &str) {
        self.log_count_eventually(needle, 1).await;
    }

    /// Waits (bounded, without blocking the runtime) until `n` stderr lines contain `needle`.
    pub async fn log_count_eventually(&self, needle: &str, n: usize) {
        let deadline = Instant::now() + WAIT;
        while self.log_count(needle) < n {
            assert!(
                Instant::now() < deadline,
                "log never said {needle:?} {n} time(s):\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// The admin endpoint's `/metrics` text.
pub async fn metrics_text(admin: SocketAddr) -> String {
    let answer = reqwest::get(format!("http://{admin}/metrics"))
        .await
        .expect("admin endpoint answers");
    assert_eq!(answer.status(), 200);
    answer.text().await.unwrap()
}

/// The value of one series (`name{labels}` exactly as exported) in a `/metrics` text.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.split(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A self-signed certificate for 127.0.0.1 and localhost, in PEM.
pub struct Pem {
    pub cert: String,
    pub key: String,
}

pub fn self_signed() -> Pem {
    let c =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    Pem {
        cert: c.cert.pem(),
        key: c.signing_key.serialize_pem(),
    }
}
