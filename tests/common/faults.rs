//! Helpers for the fault tests (`tests/faults_*.rs`): what /proc says about the daemon,
//! a ledger of acknowledged events checked against the sink and the dead-letter store,
//! and senders that keep posting until the daemon goes away.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::{Receiver, TOKEN, WAIT, event};

/// utime + stime of `pid` (from /proc/PID/stat; USER_HZ = 100).
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // utime and stime are fields 14 and 15 of the line: indexes 11 and 12 after ")".
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|v| v.parse::<u64>().ok()))
        .sum();
    Duration::from_millis(ticks * 10)
}

/// A `/proc/PID/status` field in kB (`VmRSS:`, `VmHWM:`).
pub fn status_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Resets `VmHWM` to the current RSS, so the next reading is the peak from now on.
pub fn reset_peak_rss(pid: u32) {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").expect("clear_refs (needs root)");
}

/// Facial IDs of the events whose delivery is in the dead-letter store of database `db`.
pub fn dead_lettered_faces(db: &Path) -> BTreeSet<String> {
    let db = rusqlite::Connection::open(db).unwrap();
    let mut stmt = db
        .prepare(
            "SELECT e.facial_id FROM deliveries d JOIN events e ON e.id = d.event_id
             WHERE d.state = 'dead'",
        )
        .unwrap();
    stmt.query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

/// Takes everything the receiver has got so far into `seen` (Facial ID → arrivals).
pub async fn drain_receiver(receiver: &mut Receiver, seen: &mut BTreeMap<String, usize>) {
    while let Some(r) = receiver.next_within(Duration::ZERO).await {
        let face = r.json()["facialId"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        *seen.entry(face).or_default() += 1;
    }
}

/// Waits (up to `within`) until every Facial ID of `ledger` has reached the receiver or
/// the dead-letter store of database `db`; returns the arrivals per Facial ID. Panics naming the losses.
pub async fn await_ledger(
    receiver: &mut Receiver,
    db: &Path,
    ledger: &BTreeSet<String>,
    within: Duration,
) -> BTreeMap<String, usize> {
    await_accounted(receiver, Some(db), ledger, within).await
}

/// Waits (up to `within`) until every Facial ID of `ledger` has reached the receiver or,
/// when `dead_letters` names a database, its dead-letter store; returns the arrivals per
/// Facial ID. Panics naming the ones still missing.
async fn await_accounted(
    receiver: &mut Receiver,
    dead_letters: Option<&Path>,
    ledger: &BTreeSet<String>,
    within: Duration,
) -> BTreeMap<String, usize> {
    let deadline = Instant::now() + within;
    let mut seen = BTreeMap::new();
    loop {
        drain_receiver(receiver, &mut seen).await;
        let mut missing: Vec<&String> = ledger.iter().filter(|f| !seen.contains_key(*f)).collect();
        if let Some(db) = dead_letters.filter(|_| !missing.is_empty()) {
            let dead = dead_lettered_faces(db);
            missing.retain(|f| !dead.contains(*f));
        }
        if missing.is_empty() {
            return seen;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} acknowledged events {}: {:?}",
            missing.len(),
            ledger.len(),
            match dead_letters {
                Some(_) => "lost (neither delivered nor dead-lettered)",
                None => "never reached the destination",
            },
            missing.iter().take(20).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every answer the senders got, by status (`0` = no answer: connection error).
pub type Answers = Arc<Mutex<BTreeMap<u16, usize>>>;

/// `senders` tasks post events `{prefix}-{sender}-{n}` to `url` one after the other until
/// a request fails without an answer (the daemon is gone) or `stop` is set. A Facial ID
/// enters `ledger` only with its 200.
pub fn spawn_senders(
    url: &str,
    prefix: &str,
    senders: usize,
    ledger: &Arc<Mutex<BTreeSet<String>>>,
    answers: &Answers,
    stop: &Arc<std::sync::atomic::AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..senders)
        .map(|s| {
            let (url, prefix) = (url.to_string(), prefix.to_string());
            let (ledger, answers, stop) = (ledger.clone(), answers.clone(), stop.clone());
            tokio::spawn(async move {
                let client = reqwest::Client::builder().timeout(WAIT).build().unwrap();
                for n in 0.. {
                    if stop.load(std::sync::atomic::Ordering::SeqCst) {
                        return;
                    }
                    let face = format!("{prefix}-{s}-{n}");
                    let name = ["ENROLL", "AUTH", "AUTH", "DELETION"][n % 4];
                    let sent = client
                        .post(&url)
                        .header("WWW-Authenticate", format!("Bearer {TOKEN}"))
                        .json(&event(name, &face))
                        .send()
                        .await;
                    let status = match sent {
                        Ok(r) => r.status().as_u16(),
                        Err(_) => 0,
                    };
                    *answers.lock().unwrap().entry(status).or_default() += 1;
                    match status {
                        200 => {
                            ledger.lock().unwrap().insert(face);
                        }
                        0 => return,
                        _ => {}
                    }
                }
            })
        })
        .collect()
}

/// A small xorshift generator, seeded from the clock and printed, so a failing random
/// schedule can be replayed with `FAULTS_SEED=…`.
pub struct Rng(u64);

impl Rng {
    pub fn from_env_or_clock() -> Self {
        let seed = std::env::var("FAULTS_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
                    | 1
            });
        println!("FAULTS_SEED={seed}");
        Self(seed)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// Waits (up to `within`) until every Facial ID of `ledger` has reached the receiver
/// itself; returns the arrivals per Facial ID.
pub async fn await_delivered(
    receiver: &mut Receiver,
    ledger: &BTreeSet<String>,
    within: Duration,
) -> BTreeMap<String, usize> {
    await_accounted(receiver, None, ledger, within).await
}
