//! Process-level helpers for the binary tests (cli, dead_letters, crash, shutdown, secrets):
//! running `faceio-relay` commands with a bounded wait, a daemon child that takes extra
//! environment variables, keeps its whole stderr, is killed if the test panics and whose
//! exit is awaited with a deadline, and a [`Gate`]: a TCP front for a fake destination that
//! can refuse, hang or forward connections while keeping the same address.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::{WAIT, binary};

/// What a finished `faceio-relay` command printed.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn ok(&self) -> bool {
        self.status.success()
    }
    /// stdout and stderr together, for "appears nowhere" checks and failure messages.
    pub fn all(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

/// Runs `faceio-relay <args>` (no implicit `--config`) with `envs` added, from `cwd` when
/// given; fails the test if it does not finish within [`WAIT`].
pub async fn run_cli(args: &[&str], envs: &[(&str, &str)], cwd: Option<&Path>) -> Output {
    let mut cmd = tokio::process::Command::new(binary());
    cmd.args(args)
        .env_remove("FACEIO_RELAY_CONFIG")
        .env_remove("FACEIO_APP_ID")
        .env_remove("FACEIO_TOKEN")
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    let out = tokio::time::timeout(WAIT, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("`faceio-relay {}` did not finish in time", args.join(" ")))
        .expect("binary runs");
    Output {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `faceio-relay --config <config> <args>`.
pub async fn cli(config: &Path, args: &[&str]) -> Output {
    cli_env(config, args, &[]).await
}

/// `faceio-relay --config <config> <args>` with extra environment variables.
pub async fn cli_env(config: &Path, args: &[&str], envs: &[(&str, &str)]) -> Output {
    let config = config.to_str().expect("UTF-8 temp path");
    let mut all = vec!["--config", config];
    all.extend_from_slice(args);
    run_cli(&all, envs, None).await
}

/// `dead-letters list --json` parsed: one JSON object per line.
pub async fn dead_letters_json(config: &Path) -> Vec<serde_json::Value> {
    let out = cli(config, &["dead-letters", "list", "--json"]).await;
    assert!(out.ok(), "list failed: {}", out.all());
    out.stdout
        .lines()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not one JSON object: {l}: {e}"))
        })
        .collect()
}

/// `faceio-relay run --config <config>` as a child process. Killed (SIGKILL) when dropped,
/// so a failing test leaves no daemon behind.
pub struct Relayd {
    child: Option<Child>,
    pub addr: SocketAddr,
    /// The admin endpoint (`/metrics`, `/healthz`, `/readyz`), unless `admin_listen: off`.
    pub admin: Option<SocketAddr>,
    pub config: PathBuf,
    log: Arc<Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

/// How a daemon ended: its status and every line it wrote to stderr.
#[derive(Debug)]
pub struct Exited {
    pub status: ExitStatus,
    pub log: Vec<String>,
}

impl Exited {
    pub fn text(&self) -> String {
        self.log.join("\n")
    }
}

impl Relayd {
    /// Starts the daemon and waits (bounded) for its ready line.
    pub async fn start(config: &Path) -> Self {
        Self::start_with(config, &[]).await
    }

    /// Starts the daemon with extra environment variables (e.g. for `${VAR}` in the config).
    pub async fn start_with(config: &Path, envs: &[(&str, &str)]) -> Self {
        let config = config.to_path_buf();
        let envs: Vec<(String, String)> = envs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        tokio::task::spawn_blocking(move || Self::start_blocking(config, envs))
            .await
            .expect("start task")
    }

    fn start_blocking(config: PathBuf, envs: Vec<(String, String)>) -> Self {
        let mut cmd = Command::new(binary());
        cmd.args(["run", "--config"])
            .arg(&config)
            .env_remove("FACEIO_RELAY_CONFIG")
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in &envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("binary starts");
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if line.contains("faceio-relay ready") {
                        let _ = tx.send(line.clone());
                    }
                    log.lock().unwrap().push(line);
                }
            })
        };
        let mut me = Self {
            child: Some(child),
            addr: "0.0.0.0:0".parse().unwrap(),
            admin: None,
            config,
            log,
            reader: Some(reader),
        };
        let ready = match rx.recv_timeout(WAIT) {
            Ok(line) => line,
            Err(_) => panic!("daemon not ready; log:\n{}", me.log_text()),
        };
        let field = |name: &str| {
            ready
                .split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .map(str::to_string)
        };
        me.addr = field("addr=")
            .expect("ready line names addr")
            .parse()
            .expect("ready addr parses");
        me.admin = field("admin=").and_then(|a| a.parse().ok());
        me
    }

    pub fn url(&self) -> String {
        format!("http://{}/webhook", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Waits (bounded) until a stderr line contains `needle`.
    pub async fn wait_log(&self, needle: &str) {
        let deadline = Instant::now() + WAIT;
        while !self.log.lock().unwrap().iter().any(|l| l.contains(needle)) {
            assert!(
                Instant::now() < deadline,
                "daemon never logged {needle:?}; log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Sends SIGTERM without waiting.
    pub fn sigterm(&self) {
        self.signal("TERM");
    }

    /// Sends a signal by name (`TERM`, `INT`, ...) with kill(1), without waiting.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.pid().to_string()])
            .status()
            .expect("kill(1) runs");
        assert!(status.success(), "kill -{name} failed");
    }

    /// SIGKILL, then reaps the process.
    pub async fn kill9(mut self) -> Exited {
        self.child
            .as_mut()
            .expect("running")
            .kill()
            .expect("SIGKILL");
        self.wait_exit(WAIT).await
    }

    /// SIGTERM, then waits (at most `within`) for the exit.
    pub async fn terminate(self, within: Duration) -> Exited {
        self.sigterm();
        self.wait_exit(within).await
    }

    /// Waits (at most `within`) for the process to exit and its stderr to end.
    pub async fn wait_exit(mut self, within: Duration) -> Exited {
        let deadline = Instant::now() + within;
        let status = loop {
            if let Some(s) = self.child.as_mut().unwrap().try_wait().expect("try_wait") {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not exit within {within:?}; log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        self.child = None;
        // The pipe closes with the process: the reader finishes promptly.
        let reader = self.reader.take().unwrap();
        let deadline = Instant::now() + WAIT;
        while !reader.is_finished() {
            assert!(Instant::now() < deadline, "stderr reader did not finish");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        reader.join().expect("reader thread");
        let log = self.log.lock().unwrap().clone();
        Exited { status, log }
    }
}

impl Drop for Relayd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// How a [`Gate`] treats new connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateMode {
    /// Accept and close at once: the destination is down.
    Refuse = 0,
    /// Accept and never answer: the destination hangs.
    Hang = 1,
    /// Forward to the target: the destination is up.
    Open = 2,
}

/// A fixed address in front of a fake destination that can be down, hanging or up, so
/// a daemon configured with its URL sees the destination go down and come back without
/// any port being reused.
pub struct Gate {
    pub addr: SocketAddr,
    mode: Arc<AtomicU8>,
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Gate {
    /// A gate on 127.0.0.1:0 that forwards to `target` when open.
    pub async fn start(target: SocketAddr, mode: GateMode) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mode = Arc::new(AtomicU8::new(mode as u8));
        let accepted = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn({
            let mode = Arc::clone(&mode);
            let accepted = Arc::clone(&accepted);
            async move {
                loop {
                    let Ok((mut inbound, _)) = listener.accept().await else {
                        continue;
                    };
                    accepted.fetch_add(1, Ordering::SeqCst);
                    match mode.load(Ordering::SeqCst) {
                        0 => drop(inbound),
                        1 => {
                            tokio::spawn(async move {
                                let mut sink = tokio::io::sink();
                                let _ = tokio::io::copy(&mut inbound, &mut sink).await;
                            });
                        }
                        _ => {
                            tokio::spawn(async move {
                                if let Ok(mut out) = tokio::net::TcpStream::connect(target).await {
                                    let _ =
                                        tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                                }
                            });
                        }
                    }
                }
            }
        });
        Self {
            addr,
            mode,
            accepted,
            task,
        }
    }

    pub fn set(&self, mode: GateMode) {
        self.mode.store(mode as u8, Ordering::SeqCst);
    }

    /// Connections accepted so far (in any mode).
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// A URL through the gate with the given path.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.task.abort();
    }
}
