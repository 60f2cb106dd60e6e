//! The admin port under attack: 1,000 idle connections and a flood of `/readyz` and
//! `/metrics` for 10 s, on SQLite and on PostgreSQL, while webhooks flow at 500 req/s from
//! another address. Webhooks get no 503 (the admin probes never take what inserts need),
//! and a health check from a third address is still answered promptly.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use common::attack::*;
use common::pg::{self, TestDb};
use common::proc::*;
use common::*;

const FLOOD: Duration = Duration::from_secs(10);

/// The ingress setting for these tests: the admin port is under test, so FACEIO's own
/// connections (up to 500 a second, open loop) are not limited by the per-source cap.
const INGRESS: &str = "ingress:\n  max_connections_per_ip: 1024\n";

/// One flood at a time: two on two cores would measure each other.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Floods `/readyz` and `/metrics` from the attacker on `tasks` keep-alive clients until
/// `stop`; how many were answered.
fn admin_flood(
    admin: SocketAddr,
    tasks: usize,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        let mut handles = Vec::new();
        for t in 0..tasks {
            let stop = stop.clone();
            handles.push(tokio::spawn(async move {
                let client = client_from(ATTACKER);
                let path = if t % 2 == 0 { "readyz" } else { "metrics" };
                let mut answered = 0;
                while !stop.is_cancelled() {
                    if client
                        .get(format!("http://{admin}/{path}"))
                        .send()
                        .await
                        .is_ok()
                    {
                        answered += 1;
                    }
                }
                answered
            }));
        }
        let mut total = 0;
        for h in handles {
            total += h.await.unwrap();
        }
        total
    })
}

async fn attack_admin_while_faceio_posts(config: &Path) {
    let _alone = ONE_AT_A_TIME.lock().await;
    let daemon = Relayd::start(config).await;
    let admin = daemon.admin.expect("admin enabled");
    // 1,000 idle connections to the admin port (most closed at once by its caps).
    let mut idle = Vec::new();
    for _ in 0..1000 {
        idle.push(connect_from(ATTACKER, admin).await);
    }
    let stop = CancellationToken::new();
    let flood = admin_flood(admin, 16, stop.clone());
    let sender = tokio::spawn(paced_sender(client_from(FACEIO), daemon.url(), 500, FLOOD));

    // A monitor from a third address, once a second during the attack.
    let monitor = client_from(MONITOR);
    let mut worst = Duration::ZERO;
    let started = Instant::now();
    while started.elapsed() < FLOOD - Duration::from_secs(1) {
        let t = Instant::now();
        let r = monitor
            .get(format!("http://{admin}/healthz"))
            .send()
            .await
            .expect("the monitor's health check is answered during the flood");
        assert_eq!(r.status(), 200);
        worst = worst.max(t.elapsed());
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let report = sender.await.unwrap();
    stop.cancel();
    let flooded = flood.await.unwrap();
    let five_hundred_threes = report.statuses.iter().filter(|&&s| s == 503).count();
    println!(
        "admin flood: {flooded} admin answers; webhooks: {} sent, {} not 200 ({five_hundred_threes} 503), p99 {:?}; monitor worst {worst:?}",
        report.statuses.len(),
        report.non_200(),
        report.p99()
    );
    assert_eq!(five_hundred_threes, 0);
    assert_eq!(
        report.non_200(),
        0,
        "{} of {} webhooks not answered 200 ({})",
        report.non_200(),
        report.statuses.len(),
        report.why()
    );
    assert!(flooded > 100, "the flood was answered too ({flooded})");
    // Far inside any health checker's timeout (the README records the measured value).
    assert!(worst < Duration::from_secs(1), "monitor waited {worst:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_admin_flood_costs_webhooks_nothing() {
    let setup = Setup::new();
    let config = setup.write_config(INGRESS);
    attack_admin_while_faceio_posts(&config).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_admin_flood_costs_webhooks_nothing() {
    let db = TestDb::create().await;
    let dir = tempfile::tempdir().unwrap();
    let config = pg::write_config(dir.path(), &db, "200ms", INGRESS);
    attack_admin_while_faceio_posts(&config).await;
}
