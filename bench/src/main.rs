//! `loadgen`: faceio-relay against a do-nothing baseline, in one run.
//!
//! 1. a sink (the relay's HTTP destination) that records when each event arrives;
//! 2. a baseline: a bare hyper server answering 200 to the same POSTs;
//! 3. the same FACEIO POSTs at the baseline, then at the release build of the relay
//!    (SQLite on disk, durable before 200, one HTTP destination → the sink): closed loop
//!    at concurrency 64 and 256, open loop at 1k and 5k req/s;
//!    and the same again with the PostgreSQL store (`relay-pg` rows: a fresh database on
//!    the local server, `--postgres URL` / `--skip-postgres`);
//! 4. a backlog run (sink down, N events pushed, sink up, drain measured) and
//!    start-to-ready times;
//! 5. one table on stdout and the same as JSON (`bench/results/latest.json`).
//!
//! Usage (BENCHMARKS.md): `cargo run --release -p faceio-relay-bench -- [--quick]
//! [--backlog N] [--out FILE] [--relay-bin PATH] [--skip-backlog]`.

mod forwarder;
mod idle;
mod load;
mod queues;
mod relay;
mod servers;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use serde_json::{Value, json};

use relay::{RelayProc, ScratchDb, StoreKind};
use servers::{Sink, Track};

/// One monotonic clock for the whole process, in nanoseconds, so send times (senders)
/// and arrival times (sink) compare directly.
mod clock {
    use std::sync::OnceLock;
    use std::time::Instant;

    static START: OnceLock<Instant> = OnceLock::new();

    fn start() -> Instant {
        *START.get_or_init(Instant::now)
    }

    pub fn now_ns() -> u64 {
        at(Instant::now())
    }

    pub fn at(t: Instant) -> u64 {
        t.saturating_duration_since(start()).as_nanos() as u64
    }
}

/// How big each part of a run is.
#[derive(Debug, Clone)]
struct Plan {
    /// Requests per closed-loop scenario.
    closed_count: usize,
    /// Seconds per open-loop scenario.
    open_secs: f64,
    concurrencies: Vec<usize>,
    rates: Vec<f64>,
    /// Events pushed while the sink is down (0: no backlog run).
    backlog: usize,
    /// Relay starts timed for start-to-ready.
    starts: usize,
}

impl Plan {
    fn full() -> Self {
        Self {
            closed_count: 100_000,
            open_secs: 20.0,
            concurrencies: vec![64, 256],
            rates: vec![100.0, 1000.0, 5000.0],
            backlog: 1_000_000,
            starts: 10,
        }
    }

    fn quick() -> Self {
        Self {
            closed_count: 3_000,
            open_secs: 3.0,
            concurrencies: vec![64, 256],
            rates: vec![100.0, 1000.0, 5000.0],
            backlog: 20_000,
            starts: 5,
        }
    }
}

struct Args {
    quick: bool,
    backlog: Option<usize>,
    out: PathBuf,
    relay_bin: Option<PathBuf>,
    /// Overrides of the plan, for profiling one scenario.
    closed_count: Option<usize>,
    open_secs: Option<f64>,
    concurrencies: Option<Vec<usize>>,
    rates: Option<Vec<f64>>,
    starts: Option<usize>,
    skip_baseline: bool,
    /// `--forward-reqwest`: a second forwarder row, sending with reqwest.
    forward_reqwest: bool,
    /// A database URL of the PostgreSQL server for the `relay-pg` rows; `None`: skipped.
    postgres: Option<String>,
    /// `--idle S`: only the idle measurement, over S seconds.
    idle: Option<f64>,
    /// `--queues N`: only the queue destinations' row, N events per kind.
    queues: Option<usize>,
}

/// Where the `relay-pg` rows' databases are created (as in the tests' `FACEIO_TEST_PG`).
const DEFAULT_POSTGRES: &str = "postgres://postgres@127.0.0.1:5432/test";

fn list<T: std::str::FromStr>(v: Option<String>, what: &str) -> anyhow::Result<Vec<T>> {
    v.with_context(|| format!("{what} needs a comma-separated list"))?
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.trim()
                .parse::<T>()
                .map_err(|_| anyhow::anyhow!("{what}: bad value {s:?}"))
        })
        .collect()
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        quick: false,
        backlog: None,
        out: PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/results/latest.json")),
        relay_bin: None,
        closed_count: None,
        open_secs: None,
        concurrencies: None,
        rates: None,
        starts: None,
        skip_baseline: false,
        forward_reqwest: false,
        postgres: Some(
            std::env::var("FACEIO_BENCH_PG").unwrap_or_else(|_| DEFAULT_POSTGRES.to_string()),
        ),
        idle: None,
        queues: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => args.quick = true,
            "--backlog" => {
                args.backlog = Some(
                    it.next()
                        .context("--backlog needs a number")?
                        .replace('_', "")
                        .parse()?,
                )
            }
            "--skip-backlog" => args.backlog = Some(0),
            "--out" => args.out = it.next().context("--out needs a path")?.into(),
            "--relay-bin" => {
                args.relay_bin = Some(it.next().context("--relay-bin needs a path")?.into())
            }
            "--closed-count" => {
                args.closed_count = Some(
                    it.next()
                        .context("--closed-count needs a number")?
                        .parse()?,
                )
            }
            "--open-secs" => {
                args.open_secs = Some(it.next().context("--open-secs needs a number")?.parse()?)
            }
            "--concurrencies" => args.concurrencies = Some(list(it.next(), "--concurrencies")?),
            "--rates" => args.rates = Some(list(it.next(), "--rates")?),
            "--starts" => {
                args.starts = Some(it.next().context("--starts needs a number")?.parse()?)
            }
            "--skip-baseline" => args.skip_baseline = true,
            "--forward-reqwest" => args.forward_reqwest = true,
            "--postgres" => {
                args.postgres = Some(it.next().context("--postgres needs a URL")?);
            }
            "--skip-postgres" => args.postgres = None,
            "--idle" => {
                args.idle = Some(it.next().context("--idle needs seconds")?.parse()?);
            }
            "--queues" => {
                args.queues = Some(it.next().context("--queues needs a number")?.parse()?);
            }
            "--relay-log" => {
                let level = it.next().context("--relay-log needs a level")?;
                let _ = relay::RELAY_LOG.set(level);
            }
            "-h" | "--help" => {
                println!(
                    "loadgen [--quick] [--backlog N | --skip-backlog] [--out FILE] [--relay-bin PATH]\n\
                     \x20       [--closed-count N] [--open-secs S] [--concurrencies 64,256] [--rates 1000,5000]\n\
                     \x20       [--starts N] [--skip-baseline] [--forward-reqwest] [--relay-log RUST_LOG]\n\
                     \x20       [--postgres URL | --skip-postgres] [--idle SECONDS] [--queues N]\n\
                     Full run (default): 100k requests per closed-loop scenario, 20 s per open-loop rate,\n\
                     a 1,000,000-event backlog; --quick: small counts, under a minute."
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    Ok(args)
}

/// Builds the relay's release binary (so the run never measures a stale one) and
/// returns its path in the workspace's target directory.
fn relay_binary() -> anyhow::Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    eprintln!("building the relay: cargo build --release -p faceio-relay --bin faceio-relay");
    let status = Command::new(&cargo)
        .args([
            "build",
            "--release",
            "-p",
            "faceio-relay",
            "--bin",
            "faceio-relay",
        ])
        .current_dir(&root)
        .status()?;
    if !status.success() {
        bail!("building the relay failed");
    }
    let meta = Command::new(&cargo)
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .current_dir(&root)
        .output()?;
    let meta: Value = serde_json::from_slice(&meta.stdout)?;
    let target = meta["target_directory"]
        .as_str()
        .context("cargo metadata names no target directory")?;
    Ok(Path::new(target).join("release/faceio-relay"))
}

/// Milliseconds, for tables.
fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// One line of the table.
#[derive(Default)]
struct Row {
    target: &'static str,
    scenario: String,
    sent: usize,
    ok: u64,
    failures: std::collections::BTreeMap<String, u64>,
    req_s: f64,
    ack_p50_ms: f64,
    ack_p99_ms: f64,
    ack_p999_ms: f64,
    ack_max_ms: f64,
    e2e_p50_ms: Option<f64>,
    e2e_p99_ms: Option<f64>,
    delivered: Option<u64>,
    delivered_s: Option<f64>,
    duplicates: Option<u64>,
    lost: Option<u64>,
    peak_rss_mb: Option<f64>,
    cpu_s: Option<f64>,
    /// CPU µs of the target's process per event delivered (relay, forwarder).
    cpu_us_per_event: Option<f64>,
    ratio: Option<f64>,
    /// This row's req/s and CPU per event over the forwarder's in the same scenario.
    over_forward_req: Option<f64>,
    over_forward_cpu: Option<f64>,
}

impl Row {
    fn json(&self) -> Value {
        json!({
            "target": self.target,
            "scenario": self.scenario,
            "sent": self.sent,
            "ok": self.ok,
            "failures": self.failures,
            "ingest_req_s": round(self.req_s),
            "ack_ms": {"p50": self.ack_p50_ms, "p99": self.ack_p99_ms,
                       "p99_9": self.ack_p999_ms, "max": self.ack_max_ms},
            "end_to_end_ms": {"p50": self.e2e_p50_ms, "p99": self.e2e_p99_ms},
            "delivered": self.delivered,
            "delivered_per_s": self.delivered_s.map(round),
            "duplicates": self.duplicates,
            "lost": self.lost,
            "relay_peak_rss_mb": self.peak_rss_mb.map(round1),
            "cpu_s": self.cpu_s.map(|c| (c * 100.0).round() / 100.0),
            "cpu_us_per_delivered_event": self.cpu_us_per_event.map(round1),
            "ratio_over_baseline_req_s": self.ratio.map(round3),
            "ratio_over_forward_req_s": self.over_forward_req.map(round3),
            "ratio_over_forward_cpu_per_event": self.over_forward_cpu.map(round3),
        })
    }
}

fn round(v: f64) -> f64 {
    v.round()
}

fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// Waits until every event answered 200 in `track` reached the sink, or nothing new
/// arrived for `stall`; returns (delivered, lost, e2e histogram in µs, delivered/s).
async fn await_deliveries(
    track: &Track,
    acked: u64,
    stall: Duration,
) -> (u64, u64, Histogram<u64>, f64) {
    let mut last = 0;
    let mut last_change = std::time::Instant::now();
    loop {
        let n = track.arrivals.load(Ordering::Relaxed);
        if n >= acked {
            break;
        }
        if n != last {
            last = n;
            last_change = std::time::Instant::now();
        } else if last_change.elapsed() > stall {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut e2e = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).expect("bounds");
    let (mut first, mut last_arrival, mut delivered, mut lost) = (u64::MAX, 0u64, 0u64, 0u64);
    for (origin, arrived) in track.origin_ns.iter().zip(&track.arrived_ns) {
        let (o, a) = (
            origin.load(Ordering::Relaxed),
            arrived.load(Ordering::Relaxed),
        );
        if o == 0 {
            continue;
        }
        if a == 0 {
            lost += 1;
            continue;
        }
        delivered += 1;
        first = first.min(o);
        last_arrival = last_arrival.max(a);
        e2e.saturating_record((a.saturating_sub(o) / 1000).max(1));
    }
    let span = last_arrival.saturating_sub(first) as f64 / 1e9;
    let rate = if span > 0.0 {
        delivered as f64 / span
    } else {
        0.0
    };
    (delivered, lost, e2e, rate)
}

#[derive(Clone, Copy)]
enum Shape {
    Closed(usize),
    Open(f64),
}

impl Shape {
    fn name(self) -> String {
        match self {
            Shape::Closed(c) => format!("closed c={c}"),
            Shape::Open(r) if r < 1000.0 => format!("open {r}/s"),
            Shape::Open(r) => format!("open {}k/s", r / 1000.0),
        }
    }
}

struct Run {
    sink: Arc<Sink>,
    next_sid: usize,
}

impl Run {
    async fn scenario(
        &mut self,
        target: &'static str,
        addr: SocketAddr,
        shape: Shape,
        plan: &Plan,
        process: Option<u32>,
    ) -> Row {
        self.next_sid += 1;
        let sid = self.next_sid;
        let count = match shape {
            Shape::Closed(_) => plan.closed_count,
            Shape::Open(rate) => (rate * plan.open_secs) as usize,
        };
        let track = Arc::new(Track::new(count));
        self.sink.track(sid, Arc::clone(&track));
        if let Some(pid) = process {
            relay::reset_peak(pid);
        }
        let cpu0 = process.map(relay::cpu_time);
        eprintln!("{target}: {} ({count} requests)", shape.name());
        let out = match shape {
            Shape::Closed(c) => load::closed_loop(addr, sid, count, c, Arc::clone(&track)).await,
            Shape::Open(rate) => load::open_loop(addr, sid, count, rate, Arc::clone(&track)).await,
        };
        let mut row = Row {
            target,
            scenario: shape.name(),
            sent: count,
            ok: out.ok(),
            req_s: out.ok() as f64 / out.elapsed.as_secs_f64(),
            ack_p50_ms: ms(out.acks.value_at_quantile(0.50)),
            ack_p99_ms: ms(out.acks.value_at_quantile(0.99)),
            ack_p999_ms: ms(out.acks.value_at_quantile(0.999)),
            ack_max_ms: ms(out.acks.max()),
            failures: out.failures.clone(),
            ..Row::default()
        };
        if let Some(pid) = process {
            let (delivered, lost, e2e, rate) =
                await_deliveries(&track, out.ok(), Duration::from_secs(30)).await;
            row.delivered = Some(delivered);
            row.lost = Some(lost);
            row.duplicates = Some(track.duplicates.load(Ordering::Relaxed));
            row.delivered_s = Some(rate);
            row.e2e_p50_ms = Some(ms(e2e.value_at_quantile(0.50)));
            row.e2e_p99_ms = Some(ms(e2e.value_at_quantile(0.99)));
            row.peak_rss_mb = Some(relay::peak_rss_kb(pid) as f64 / 1024.0);
            row.cpu_s = cpu0.map(|c0| (relay::cpu_time(pid) - c0).as_secs_f64());
            row.cpu_us_per_event = row
                .cpu_s
                .filter(|_| delivered > 0)
                .map(|c| c * 1e6 / delivered as f64);
        }
        row
    }
}

fn machine(store_dir: &Path) -> Value {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    let mem = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:").map(|v| v.trim().to_string()))
        .unwrap_or_default();
    let fs = relay::filesystem_of(store_dir);
    let device = fs
        .split_whitespace()
        .next()
        .unwrap_or("")
        .trim_start_matches("/dev/")
        .to_string();
    let rotational = read(&format!("/sys/block/{device}/queue/rotational"));
    json!({
        "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu": cpu,
        "memory": mem,
        "kernel": read("/proc/sys/kernel/osrelease").trim(),
        "store_filesystem": fs,
        "store_disk": match rotational.trim() { "0" => "non-rotational (SSD / virtual disk)", "1" => "rotational", _ => "unknown" },
    })
}

fn print_table(rows: &[Row]) {
    let f = |v: Option<f64>, w: usize, p: usize| match v {
        Some(v) => format!("{v:>w$.p$}"),
        None => format!("{:>w$}", "-"),
    };
    println!(
        "{:<9} {:<13} {:>9} {:>8} {:>8} {:>8} {:>9} {:>8} {:>9} {:>10} {:>8} {:>7} {:>8} {:>6} {:>6} {:>6}",
        "target",
        "scenario",
        "req/s",
        "ack p50",
        "ack p99",
        "p99.9",
        "ack max",
        "e2e p50",
        "e2e p99",
        "deliv/s",
        "RSS MB",
        "ratio",
        "CPU µs",
        "÷fwd",
        "cpu÷f",
        "fail"
    );
    for r in rows {
        println!(
            "{:<9} {:<13} {:>9.0} {:>8.2} {:>8.2} {:>8.2} {:>9.2} {} {} {} {} {} {} {} {} {:>6}",
            r.target,
            r.scenario,
            r.req_s,
            r.ack_p50_ms,
            r.ack_p99_ms,
            r.ack_p999_ms,
            r.ack_max_ms,
            f(r.e2e_p50_ms, 8, 2),
            f(r.e2e_p99_ms, 9, 2),
            f(r.delivered_s, 10, 0),
            f(r.peak_rss_mb, 8, 1),
            f(r.ratio, 7, 3),
            f(r.cpu_us_per_event, 8, 1),
            f(r.over_forward_req, 6, 2),
            f(r.over_forward_cpu, 6, 2),
            r.failures.values().sum::<u64>() + r.lost.unwrap_or(0),
        );
    }
    println!(
        "(latencies in ms; ACK = POST to answer, open loop from the scheduled send; e2e = same origin to arrival at the sink; \
         RSS = the process's VmHWM during the scenario; ratio = req/s / baseline req/s; CPU µs = the process's utime+stime per \
         event delivered; ÷fwd, cpu÷f = req/s and CPU µs over the forwarder's in the same scenario; \
         fail = non-200 answers + events answered 200 that never reached the sink)"
    );
}

fn main() -> anyhow::Result<()> {
    clock::now_ns();
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.first().map(String::as_str) == Some(forwarder::SUBCOMMAND) {
        return forwarder::child_main(&argv[1..]);
    }
    let args = parse_args()?;
    let mut plan = if args.quick {
        Plan::quick()
    } else {
        Plan::full()
    };
    if let Some(n) = args.backlog {
        plan.backlog = n;
    }
    if let Some(n) = args.closed_count {
        plan.closed_count = n;
    }
    if let Some(s) = args.open_secs {
        plan.open_secs = s;
    }
    if let Some(c) = args.concurrencies.clone() {
        plan.concurrencies = c;
    }
    if let Some(r) = args.rates.clone() {
        plan.rates = r;
    }
    if let Some(n) = args.starts {
        plan.starts = n;
    }
    let bin = match &args.relay_bin {
        Some(b) => b.clone(),
        None => relay_binary()?,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    if let Some(secs) = args.idle {
        return runtime.block_on(idle::run(&bin, secs, &args.out));
    }
    if let Some(n) = args.queues {
        return runtime.block_on(queues::run(&bin, n, &args.out));
    }
    runtime.block_on(run(args, plan, bin))
}

async fn run(args: Args, plan: Plan, bin: PathBuf) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let sink = Sink::start().await?;
    let baseline = servers::start_baseline().await?;
    let mut run = Run {
        sink: Arc::clone(&sink),
        next_sid: 0,
    };
    let shapes: Vec<Shape> = plan
        .concurrencies
        .iter()
        .map(|&c| Shape::Closed(c))
        .chain(plan.rates.iter().map(|&r| Shape::Open(r)))
        .collect();

    // Every target is started first, then each scenario runs against each target in
    // turn: rows of one scenario are minutes apart at most, so a busy spell on the
    // machine touches the targets alike.
    let dir = tempfile::Builder::new()
        .prefix("loadgen-")
        .tempdir_in(std::env::temp_dir())?;
    let machine = machine(dir.path());
    let mut targets = Vec::new();
    if !args.skip_baseline {
        targets.push(Target::new("baseline", baseline, None));
        // The ceiling of any relay that delivers by HTTP: one request in, one out.
        let forwarder = forwarder::ForwarderProc::start(
            sink.addr,
            relay::DESTINATION_CONCURRENCY,
            servers::ForwardClient::Hyper,
        )?;
        eprintln!("forward pid {} on {}", forwarder.pid(), forwarder.addr);
        targets.push(Target::new(
            "forward",
            forwarder.addr,
            Some(forwarder.pid()),
        ));
        targets.last_mut().expect("pushed").forwarder = Some(forwarder);
        if args.forward_reqwest {
            // The same forwarder sending with reqwest, as the relay's HTTP destinations did.
            let forwarder = forwarder::ForwarderProc::start(
                sink.addr,
                relay::DESTINATION_CONCURRENCY,
                servers::ForwardClient::Reqwest,
            )?;
            eprintln!(
                "forward-reqwest pid {} on {}",
                forwarder.pid(),
                forwarder.addr
            );
            targets.push(Target::new(
                "forward-reqwest",
                forwarder.addr,
                Some(forwarder.pid()),
            ));
            targets.last_mut().expect("pushed").forwarder = Some(forwarder);
        }
    }
    targets.push(Target::relay(
        "relay",
        &bin,
        dir.path(),
        StoreKind::Sqlite,
        sink.addr,
    )?);
    // The same scenarios with the shared PostgreSQL store, in a fresh database.
    let mut postgres = json!({"skipped": "--skip-postgres"});
    let mut pg_db = None;
    let pg_dir = tempfile::Builder::new()
        .prefix("loadgen-pg-")
        .tempdir_in(std::env::temp_dir())?;
    if let Some(admin) = &args.postgres {
        // A failed PostgreSQL start is reported, not allowed to lose the rest.
        match ScratchDb::create(admin).and_then(|db| {
            let store = StoreKind::Postgres(db.url.clone());
            let t = Target::relay("relay-pg", &bin, pg_dir.path(), store, sink.addr)?;
            Ok((db, t))
        }) {
            Ok((db, t)) => {
                targets.push(t);
                pg_db = Some(db);
            }
            Err(e) => {
                eprintln!("relay-pg rows skipped: {e:#}");
                postgres = json!({"skipped": format!("{e:#}")});
            }
        }
    }
    for &shape in &shapes {
        for t in &mut targets {
            let row = run.scenario(t.name, t.addr, shape, &plan, t.process).await;
            if let Some(relay) = &t.relay {
                t.peak_kb = t.peak_kb.max(relay.peak_rss_kb());
                if !row.failures.is_empty() {
                    eprintln!(
                        "{}: {} failed; its last log lines:\n{}",
                        t.name,
                        row.scenario,
                        relay.log_tail()
                    );
                }
            }
            t.rows.push(row);
        }
    }
    ratios(&mut targets);
    let mut rows = Vec::new();
    let (mut load_peak_kb, mut log_lines) = (0, 0);
    for t in targets {
        if let Some(relay) = t.relay {
            if t.name == "relay" {
                (load_peak_kb, log_lines) = (t.peak_kb, relay.log_lines.load(Ordering::Relaxed));
            } else if let (Some(db), Some(admin)) = (&pg_db, &args.postgres) {
                postgres = json!({
                    "server_version": postgres_version(admin),
                    "peak_rss_load_mb": round1(t.peak_kb as f64 / 1024.0),
                    "database_bytes_after": db.size_bytes(),
                });
            }
            // Reported, not allowed to lose the table.
            if let Err(e) = relay.stop() {
                eprintln!("{}: {e:#}", t.name);
            }
        }
        rows.extend(t.rows);
    }
    drop((dir, pg_db, pg_dir));

    let backlog = if plan.backlog > 0 {
        Some(backlog_run(&mut run, &bin, plan.backlog).await?)
    } else {
        None
    };
    let starts = start_times(&bin, sink.addr, plan.starts)?;

    print_table(&rows);
    if let Some(b) = &backlog {
        println!(
            "backlog: {} events pushed at {:.0} req/s with the sink down (peak RSS {:.1} MB); sink up: drained at {:.0} events/s \
             (99% in {:.1} s, all in {:.1} s; {} lost, {} duplicates); peak RSS over push and drain {:.1} MB",
            b["events"],
            b["push_req_s"].as_f64().unwrap_or(0.0),
            b["peak_rss_push_mb"].as_f64().unwrap_or(0.0),
            b["drain_events_per_s"].as_f64().unwrap_or(0.0),
            b["drain_99pct_s"].as_f64().unwrap_or(0.0),
            b["drain_all_s"].as_f64().unwrap_or(0.0),
            b["lost"],
            b["duplicates"],
            b["peak_rss_mb"].as_f64().unwrap_or(0.0)
        );
    }
    println!(
        "start to ready over {} starts: min {:.1} ms, median {:.1} ms, max {:.1} ms",
        plan.starts,
        starts["min_ms"].as_f64().unwrap_or(0.0),
        starts["median_ms"].as_f64().unwrap_or(0.0),
        starts["max_ms"].as_f64().unwrap_or(0.0)
    );

    let goals = goals(&rows, backlog.as_ref(), &starts, load_peak_kb);
    for g in goals.as_array().into_iter().flatten() {
        println!(
            "goal {:<58} {:<6} {}",
            g["goal"].as_str().unwrap_or(""),
            if g["met"].as_bool() == Some(true) {
                "MET"
            } else {
                "MISSED"
            },
            g["measured"].as_str().unwrap_or("")
        );
    }
    let report = json!({
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "mode": if args.quick { "quick" } else { "full" },
        "duration_s": round1(started.elapsed().as_secs_f64()),
        "machine": machine,
        "plan": {"closed_count": plan.closed_count, "open_secs": plan.open_secs,
                 "concurrencies": plan.concurrencies, "rates": plan.rates,
                 "backlog": plan.backlog, "starts": plan.starts},
        "relay": {"binary": bin.display().to_string(), "config": "SQLite on disk (synchronous=FULL WAL, group commit), one http destination (concurrency 64) -> sink, admin_listen off",
                  "rust_log": relay::RELAY_LOG.get().cloned().unwrap_or_else(|| "unset (info)".into()),
                  "log_lines_during_load": log_lines, "peak_rss_load_mb": round1(load_peak_kb as f64 / 1024.0)},
        "postgres": postgres,
        "sink_strays": sink.strays.load(Ordering::Relaxed),
        "rows": rows.iter().map(Row::json).collect::<Vec<_>>(),
        "backlog": backlog,
        "start_to_ready": starts,
        "goals": goals,
    });
    if let Some(parent) = args.out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)? + "\n")?;
    println!(
        "wrote {} ({:.0} s)",
        args.out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// One server under test and the rows it got.
struct Target {
    name: &'static str,
    addr: SocketAddr,
    /// Its own process, for CPU time and RSS (none for the in-process baseline).
    process: Option<u32>,
    relay: Option<RelayProc>,
    forwarder: Option<forwarder::ForwarderProc>,
    rows: Vec<Row>,
    /// Peak RSS over all its scenarios.
    peak_kb: u64,
}

impl Target {
    fn new(name: &'static str, addr: SocketAddr, process: Option<u32>) -> Self {
        Self {
            name,
            addr,
            process,
            relay: None,
            forwarder: None,
            rows: Vec::new(),
            peak_kb: 0,
        }
    }

    /// A relay on `store` (config and SQLite file in `dir`) delivering to `sink`.
    fn relay(
        name: &'static str,
        bin: &Path,
        dir: &Path,
        store: StoreKind,
        sink: SocketAddr,
    ) -> anyhow::Result<Self> {
        let config = relay::write_config(dir, &store, sink, "10s", 1)?;
        let (relay, ready) = RelayProc::start(bin, &config)?;
        eprintln!(
            "{name} pid {} ready in {ready:?} on {}",
            relay.pid(),
            relay.addr
        );
        let mut t = Self::new(name, relay.addr, Some(relay.pid()));
        t.relay = Some(relay);
        Ok(t)
    }
}

/// Fills each row's ratios: over the baseline's req/s, and over the forwarder's req/s
/// and CPU per event, in the same scenario.
fn ratios(targets: &mut [Target]) {
    let of = |name: &str| -> Vec<(String, f64, Option<f64>)> {
        targets
            .iter()
            .filter(|t| t.name == name)
            .flat_map(|t| &t.rows)
            .map(|r| (r.scenario.clone(), r.req_s, r.cpu_us_per_event))
            .collect()
    };
    let (baseline, forward) = (of("baseline"), of("forward"));
    for t in targets.iter_mut().filter(|t| t.name != "baseline") {
        for r in &mut t.rows {
            if let Some((_, req_s, _)) = baseline.iter().find(|b| b.0 == r.scenario) {
                r.ratio = Some(r.req_s / req_s);
            }
            if t.name == "forward" {
                continue;
            }
            if let Some((_, req_s, cpu)) = forward.iter().find(|f| f.0 == r.scenario) {
                r.over_forward_req = Some(r.req_s / req_s);
                r.over_forward_cpu = r.cpu_us_per_event.zip(*cpu).map(|(a, b)| a / b);
            }
        }
    }
}

/// `SHOW server_version` through psql, for the JSON.
fn postgres_version(url: &str) -> String {
    Command::new("psql")
        .args([url, "-X", "-q", "-t", "-A", "-c", "SHOW server_version"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Sink down, `n` events pushed at concurrency 256, sink up, drain timed.
async fn backlog_run(run: &mut Run, bin: &Path, n: usize) -> anyhow::Result<Value> {
    let dir = tempfile::Builder::new()
        .prefix("loadgen-backlog-")
        .tempdir_in(std::env::temp_dir())?;
    // "Down" = the sink holds the relay's requests unanswered: the relay has its
    // `concurrency` attempts stuck and the rest of the backlog waits in the store untried.
    // (A refusing sink would measure the retry backoff's schedule on sink start, not the
    // relay's drain throughput.)
    let config = relay::write_config(dir.path(), &StoreKind::Sqlite, run.sink.addr, "1h", 1)?;
    run.sink.set_up(false);
    let (relay, _) = RelayProc::start(bin, &config)?;
    run.next_sid += 1;
    let sid = run.next_sid;
    let track = Arc::new(Track::new(n));
    run.sink.track(sid, Arc::clone(&track));
    eprintln!("backlog: pushing {n} events with the sink down");
    let cpu0 = relay.cpu_time();
    let out = load::closed_loop(relay.addr, sid, n, 256, Arc::clone(&track)).await;
    if !out.failures.is_empty() {
        eprintln!(
            "backlog: {:?} while pushing; the relay's last log lines:\n{}",
            out.failures,
            relay.log_tail()
        );
    }
    let push_peak = relay.peak_rss_kb();
    let push_cpu = relay.cpu_time() - cpu0;
    let db_bytes: u64 = std::fs::read_dir(dir.path())?
        .filter_map(Result::ok)
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum();
    eprintln!(
        "backlog: {} acknowledged in {:.1} s; sink up",
        out.ok(),
        out.elapsed.as_secs_f64()
    );
    let up_at = clock::now_ns();
    run.sink.set_up(true);
    let (delivered, lost, _, _) = await_deliveries(&track, out.ok(), Duration::from_secs(60)).await;
    let mut arrivals: Vec<u64> = track
        .arrived_ns
        .iter()
        .map(|a| a.load(Ordering::Relaxed))
        .filter(|&a| a > 0)
        .collect();
    arrivals.sort_unstable();
    let since_up = |a: u64| a.saturating_sub(up_at) as f64 / 1e9;
    let all = arrivals.last().map_or(0.0, |&a| since_up(a));
    let p99 = arrivals
        .get(((arrivals.len() as f64) * 0.99) as usize)
        .or(arrivals.last())
        .map_or(0.0, |&a| since_up(a));
    let peak = relay.peak_rss_kb();
    relay.stop()?;
    Ok(json!({
        "events": n,
        "acknowledged": out.ok(),
        "push_failures": out.failures,
        "push_req_s": round(out.ok() as f64 / out.elapsed.as_secs_f64()),
        "push_relay_cpu_s": round1(push_cpu.as_secs_f64()),
        "store_bytes_after_push": db_bytes,
        "peak_rss_push_mb": round1(push_peak as f64 / 1024.0),
        "peak_rss_mb": round1(peak as f64 / 1024.0),
        "delivered": delivered,
        "lost": lost,
        "duplicates": track.duplicates.load(Ordering::Relaxed),
        "drain_all_s": round1(all),
        "drain_99pct_s": round1(p99),
        "drain_events_per_s": round(if all > 0.0 { delivered as f64 / all } else { 0.0 }),
    }))
}

/// Spawn → ready line, over `n` starts on a fresh store each.
fn start_times(bin: &Path, sink: SocketAddr, n: usize) -> anyhow::Result<Value> {
    let mut times = Vec::new();
    for _ in 0..n {
        let dir = tempfile::Builder::new()
            .prefix("loadgen-start-")
            .tempdir_in(std::env::temp_dir())?;
        let config = relay::write_config(dir.path(), &StoreKind::Sqlite, sink, "10s", 1)?;
        let (relay, ready) = RelayProc::start(bin, &config)?;
        times.push(ready.as_secs_f64() * 1000.0);
        relay.stop()?;
    }
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let pick = |q: f64| {
        sorted
            .get((sorted.len().saturating_sub(1) as f64 * q).round() as usize)
            .copied()
            .unwrap_or(0.0)
    };
    Ok(json!({
        "starts": n,
        "times_ms": times.iter().map(|t| round1(*t)).collect::<Vec<_>>(),
        "min_ms": round1(pick(0.0)),
        "median_ms": round1(pick(0.5)),
        "max_ms": round1(pick(1.0)),
    }))
}

/// The goals, judged on this run's figures.
fn goals(rows: &[Row], backlog: Option<&Value>, starts: &Value, load_peak_kb: u64) -> Value {
    let relay = |scenario: &str| {
        rows.iter()
            .find(|r| r.target == "relay" && r.scenario == scenario)
    };
    let mut out = Vec::new();
    if let Some(r) = relay("closed c=256") {
        let ratio = r.ratio.unwrap_or(0.0);
        // What the forwarder (HTTP in, HTTP out, nothing else) reached: no relay that
        // delivers by HTTP can do better on this machine.
        let ceiling = rows
            .iter()
            .find(|f| f.target == "forward" && f.scenario == "closed c=256")
            .map(|f| {
                format!(
                    "; ceiling (forwarder) {:.0} req/s = {:.1}% of baseline, relay = {:.1}% of it",
                    f.req_s,
                    f.ratio.unwrap_or(0.0) * 100.0,
                    r.req_s / f.req_s * 100.0
                )
            })
            .unwrap_or_default();
        out.push(
            json!({"goal": "ingest at c=256 >= 50% of baseline req/s", "met": ratio >= 0.5,
            "measured": format!("{:.0} req/s = {:.1}% of baseline{ceiling}", r.req_s, ratio * 100.0)}),
        );
    }
    if let Some(r) = relay("open 1k/s") {
        out.push(
            json!({"goal": "ACK p99 < 10 ms at 1k req/s open loop", "met": r.ack_p99_ms < 10.0,
            "measured": format!("p99 {:.2} ms", r.ack_p99_ms)}),
        );
    }
    let worst = rows
        .iter()
        .filter(|r| r.target == "relay")
        .map(|r| r.ack_max_ms)
        .fold(0.0, f64::max);
    out.push(
        json!({"goal": "ACK never above 1 s at any load", "met": worst < 1000.0,
        "measured": format!("worst ACK {worst:.1} ms over all relay scenarios")}),
    );
    let best_delivered = rows
        .iter()
        .filter(|r| r.target == "relay")
        .filter_map(|r| r.delivered_s)
        .fold(0.0, f64::max);
    let drain = backlog
        .and_then(|b| b["drain_events_per_s"].as_f64())
        .unwrap_or(0.0);
    out.push(json!({"goal": "end-to-end >= 10,000 events/s to one HTTP destination",
        "met": drain.max(best_delivered) >= 10_000.0,
        "measured": format!("backlog drain {drain:.0}/s; best live delivered/s {best_delivered:.0}")}));
    let load_mb = load_peak_kb as f64 / 1024.0;
    out.push(
        json!({"goal": "RSS < 50 MB at full load", "met": load_mb < 50.0,
        "measured": format!("peak {load_mb:.1} MB")}),
    );
    if let Some(b) = backlog {
        let mb = b["peak_rss_mb"].as_f64().unwrap_or(f64::MAX);
        out.push(json!({"goal": format!("RSS < 64 MB with a {}-delivery backlog", b["events"]), "met": mb < 64.0,
            "measured": format!("peak {mb:.1} MB")}));
    }
    let median = starts["median_ms"].as_f64().unwrap_or(f64::MAX);
    let max = starts["max_ms"].as_f64().unwrap_or(f64::MAX);
    out.push(
        json!({"goal": "start to ready < 100 ms", "met": max < 100.0,
        "measured": format!("median {median:.1} ms, max {max:.1} ms")}),
    );
    Value::Array(out)
}
