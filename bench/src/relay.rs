//! The relay under test: its release binary as a child process, a config in a temp dir
//! on disk, readiness from its `faceio-relay ready addr=…` log line, and what /proc says
//! about it (peak RSS, CPU time).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::load::{APP_ID, TOKEN};

/// `RUST_LOG` for the relay (`--relay-log`); unset = the relay's default (`info`).
pub static RELAY_LOG: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// How long a relay may take to print its ready line.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The relay's `concurrency` for the sink (and the forwarder's).
pub const DESTINATION_CONCURRENCY: usize = 64;

/// Where the relay under test keeps its queue.
#[derive(Debug, Clone)]
pub enum StoreKind {
    /// `relay.db` in the run's temp dir (on disk).
    Sqlite,
    /// A database of the local PostgreSQL server (the URL names it).
    Postgres(String),
}

/// The relay's config for a run: the store, `destinations` HTTP destinations (all the
/// sink: `sink`, `sink2`, …), every event routed to all of them. Every request comes
/// from 127.0.0.1, so the per-source connection cap (64 by default) is raised to the
/// relay's total (1024): the closed loop at c=256 and the open loop need more.
pub fn write_config(
    dir: &Path,
    store: &StoreKind,
    sink: SocketAddr,
    dest_timeout: &str,
    destinations: usize,
) -> anyhow::Result<PathBuf> {
    let store = match store {
        StoreKind::Sqlite => format!("store:\n  path: {}\n", dir.join("relay.db").display()),
        StoreKind::Postgres(url) => format!("store:\n  backend: postgres\n  url: {url}\n"),
    };
    let names: Vec<String> = (1..=destinations.max(1))
        .map(|i| {
            if i == 1 {
                "sink".into()
            } else {
                format!("sink{i}")
            }
        })
        .collect();
    let dests: String = names
        .iter()
        .map(|name| {
            format!(
                "  {name}:\n    type: http\n    url: http://{sink}/sink\n\
                 \x20   concurrency: {DESTINATION_CONCURRENCY}\n    timeout: {dest_timeout}\n"
            )
        })
        .collect();
    let yaml = format!(
        "# Written by loadgen (BENCHMARKS.md).\n\
         listen: 127.0.0.1:0\n\
         admin_listen: off\n\
         ingress:\n  max_connections_per_ip: 1024\n\
         {store}\
         applications:\n  - app_id: {APP_ID}\n    token: {TOKEN}\n\
         destinations:\n{dests}\
         routes:\n  - to: [{}]\n",
        names.join(", ")
    );
    let path = dir.join("relay.yaml");
    std::fs::write(&path, yaml)?;
    Ok(path)
}

/// A running relay.
pub struct RelayProc {
    child: Child,
    pub addr: SocketAddr,
    /// stderr lines so far (the relay logs one per event and one per delivery at `info`).
    pub log_lines: Arc<AtomicU64>,
    /// The last stderr lines, for error messages.
    tail: Arc<std::sync::Mutex<Vec<String>>>,
}

impl RelayProc {
    /// Spawns `bin run --config config` and waits for the ready line; also returns the
    /// time from spawn to that line.
    pub fn start(bin: &Path, config: &Path) -> anyhow::Result<(Self, Duration)> {
        let spawned = Instant::now();
        let mut cmd = Command::new(bin);
        match RELAY_LOG.get() {
            Some(level) => cmd.env("RUST_LOG", level),
            None => cmd.env_remove("RUST_LOG"),
        };
        let mut child = cmd
            .args(["run", "--config"])
            .arg(config)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot run {}", bin.display()))?;
        let stderr = child.stderr.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        let log_lines = Arc::new(AtomicU64::new(0));
        let tail = Arc::new(std::sync::Mutex::new(Vec::new()));
        {
            let (log_lines, tail) = (Arc::clone(&log_lines), Arc::clone(&tail));
            std::thread::spawn(move || {
                let mut ready_sent = false;
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    log_lines.fetch_add(1, Ordering::Relaxed);
                    if !ready_sent && line.contains("faceio-relay ready") {
                        let _ = tx.send((Instant::now(), line.clone()));
                        ready_sent = true;
                    }
                    let mut tail = tail.lock().unwrap();
                    if tail.len() >= 50 {
                        tail.remove(0);
                    }
                    tail.push(line);
                }
            });
        }
        let (at, line) = match rx.recv_timeout(READY_TIMEOUT) {
            Ok(r) => r,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "relay not ready within {READY_TIMEOUT:?}:\n{}",
                    tail.lock().unwrap().join("\n")
                );
            }
        };
        let addr = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("addr="))
            .context("ready line names no addr")?
            .parse()?;
        Ok((
            Self {
                child,
                addr,
                log_lines,
                tail,
            },
            at - spawned,
        ))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Peak resident set size since start or the last [`RelayProc::reset_peak`], in kB.
    pub fn peak_rss_kb(&self) -> u64 {
        peak_rss_kb(self.pid())
    }

    /// User + system CPU time so far.
    pub fn cpu_time(&self) -> Duration {
        cpu_time(self.pid())
    }

    pub fn log_tail(&self) -> String {
        self.tail.lock().unwrap().join("\n")
    }

    /// SIGTERM and wait (then SIGKILL after 20 s).
    pub fn stop(mut self) -> anyhow::Result<()> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    eprintln!("relay exited with {status}:\n{}", self.log_tail());
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!(
                    "relay did not stop within 20 s after SIGTERM; its last log lines:\n{}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RelayProc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `VmHWM` of `pid` (peak RSS since start or the last [`reset_peak`]), in kB.
pub fn peak_rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Resets the peak RSS of `pid` to its current RSS (`echo 5 > /proc/PID/clear_refs`).
pub fn reset_peak(pid: u32) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

/// utime + stime of `pid` from /proc/PID/stat.
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // utime and stime are fields 14 and 15 of the line: indexes 11 and 12 after ")".
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|v| v.parse::<u64>().ok()))
        .sum();
    // USER_HZ is 100 on every Linux this runs on.
    Duration::from_millis(ticks * 10)
}

/// The filesystem type and device holding `path`, from /proc/mounts (longest prefix).
pub fn filesystem_of(path: &Path) -> String {
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let mut best: Option<(usize, String)> = None;
    for line in mounts.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 3 {
            continue;
        }
        if path.starts_with(f[1]) && best.as_ref().is_none_or(|(len, _)| f[1].len() > *len) {
            best = Some((f[1].len(), format!("{} on {} ({})", f[0], f[1], f[2])));
        }
    }
    best.map(|(_, s)| s).unwrap_or_else(|| "unknown".into())
}

/// A database of its own on the PostgreSQL server for one relay run (created with
/// `psql`, dropped when this is dropped), so runs never see each other's rows.
pub struct ScratchDb {
    admin_url: String,
    name: String,
    /// The URL the relay's config names.
    pub url: String,
}

impl ScratchDb {
    /// Creates `faceio_bench_<pid>_<n>` through `admin_url` (any database of the server).
    pub fn create(admin_url: &str) -> anyhow::Result<Self> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "faceio_bench_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let server = admin_url
            .rfind('/')
            .filter(|&i| i > "postgres://".len() && !admin_url.contains('?'))
            .map(|i| &admin_url[..i])
            .context("--postgres takes postgres://user@host:port/database (no query string)")?;
        psql(admin_url, &format!("CREATE DATABASE {name}"))?;
        Ok(Self {
            admin_url: admin_url.to_string(),
            url: format!("{server}/{name}"),
            name,
        })
    }

    /// `pg_database_size` of this database, in bytes (0 when psql cannot tell).
    pub fn size_bytes(&self) -> u64 {
        Command::new("psql")
            .args([&self.admin_url, "-X", "-q", "-t", "-A", "-c"])
            .arg(format!("SELECT pg_database_size('{}')", self.name))
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for ScratchDb {
    fn drop(&mut self) {
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        if let Err(e) = psql(&self.admin_url, &sql) {
            eprintln!("cannot drop the benchmark database {}: {e:#}", self.name);
        }
    }
}

/// Runs one SQL statement with `psql` (Debian's postgresql-client).
fn psql(url: &str, sql: &str) -> anyhow::Result<()> {
    let out = Command::new("psql")
        .args([url, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .output()
        .context("cannot run psql (install postgresql-client, or pass --skip-postgres)")?;
    if !out.status.success() {
        bail!(
            "psql: {sql}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
