//! `loadgen --idle S`: what an idle relay costs. A relay with 10 HTTP destinations (all
//! the sink) on a fresh SQLite store, no traffic: its CPU over S seconds from
//! `/proc/<pid>/stat`, then its system calls over another S seconds with
//! `strace -c -f -p PID` (a separate window: strace slows every call it sees, so it
//! must not be in the CPU figure).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{Value, json};

use crate::relay::{self, RelayProc, StoreKind};
use crate::servers::Sink;

/// Destinations of the idle relay.
const DESTINATIONS: usize = 10;

/// Left to the relay after its ready line before the window opens (start-up work, the
/// first claim of every dispatcher), so the window sees the steady idle state only.
const SETTLE: Duration = Duration::from_secs(3);

pub async fn run(bin: &Path, secs: f64, out: &Path) -> anyhow::Result<()> {
    let sink = Sink::start().await?;
    let dir = tempfile::Builder::new()
        .prefix("loadgen-idle-")
        .tempdir_in(std::env::temp_dir())?;
    let config = relay::write_config(
        dir.path(),
        &StoreKind::Sqlite,
        sink.addr,
        "10s",
        DESTINATIONS,
    )?;
    let (relay, _) = RelayProc::start(bin, &config)?;
    let pid = relay.pid();
    eprintln!(
        "idle: relay pid {pid}, {DESTINATIONS} destinations; {secs} s of CPU, then {secs} s under strace"
    );
    tokio::time::sleep(SETTLE).await;
    let window = Duration::from_secs_f64(secs);
    let (cpu0, t0) = (relay::cpu_time(pid), Instant::now());
    tokio::time::sleep(window).await;
    let cpu = relay::cpu_time(pid) - cpu0;
    let elapsed = t0.elapsed();
    let percent = cpu.as_secs_f64() / elapsed.as_secs_f64() * 100.0;
    println!(
        "idle relay ({DESTINATIONS} destinations): {:.0} ms of CPU in {:.1} s = {percent:.3}% of one core",
        cpu.as_secs_f64() * 1000.0,
        elapsed.as_secs_f64()
    );
    let syscalls = strace(pid, window).await;
    match &syscalls {
        Ok(table) => {
            println!("system calls over {secs} s (strace -c -f):");
            for row in table {
                println!(
                    "  {:<16} {:>8} calls  {:>8.2}/s",
                    row["syscall"].as_str().unwrap_or(""),
                    row["calls"],
                    row["calls"].as_f64().unwrap_or(0.0) / secs
                );
            }
        }
        Err(e) => println!("no syscall counts: {e:#}"),
    }
    relay.stop()?;
    let report = json!({
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "destinations": DESTINATIONS,
        "window_s": secs,
        "cpu_ms": (cpu.as_secs_f64() * 1000.0).round(),
        "cpu_percent_of_one_core": (percent * 1000.0).round() / 1000.0,
        "syscalls": syscalls.unwrap_or_default(),
    });
    let path = out.with_file_name("idle-latest.json");
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&path, serde_json::to_string_pretty(&report)? + "\n")?;
    println!("wrote {}", path.display());
    Ok(())
}

/// `strace -c -f -p pid` for `window`, then detached (SIGINT); its summary rows.
async fn strace(pid: u32, window: Duration) -> anyhow::Result<Vec<Value>> {
    let file = tempfile::NamedTempFile::new()?;
    let mut child = Command::new("strace")
        .args(["-c", "-f", "-q", "-p", &pid.to_string(), "-o"])
        .arg(file.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot run strace (apt-get install strace)")?;
    tokio::time::sleep(window).await;
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()?;
    child.wait()?;
    let text = std::fs::read_to_string(file.path())?;
    // "% time  seconds  usecs/call  calls  errors  syscall": errors may be blank.
    let mut rows = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 5 || f[0].parse::<f64>().is_err() {
            continue;
        }
        let name = f[f.len() - 1];
        let calls: u64 = f[3].parse().unwrap_or(0);
        rows.push(json!({"syscall": name, "calls": calls}));
    }
    anyhow::ensure!(!rows.is_empty(), "strace printed no summary:\n{text}");
    Ok(rows)
}
