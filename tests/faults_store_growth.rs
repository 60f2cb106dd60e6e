//! The store under sustained load: the SQLite WAL must not grow without bound while
//! events keep arriving and the dispatcher keeps reading (its size feeds the wal-index
//! the relay maps into memory, and every read of a page searches it).

mod common;

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::faults::*;
use common::proc::*;
use common::*;

/// The WAL this test tolerates after about 10,000 events. SQLite's automatic checkpoint
/// restarts the WAL every 1,000 pages (4 MiB); a few times that leaves room for a
/// checkpoint that lags behind a burst.
const WAL_LIMIT: u64 = 24 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wal_stays_bounded_under_sustained_load() {
    let mut receiver = Receiver::ok().await;
    let setup = Setup::new();
    let config = setup.write_config(&format!(
        "destinations:\n  api:\n    type: http\n    url: {}\n    concurrency: 16\n\
         routes:\n  - to: [api]\n",
        receiver.url()
    ));
    let daemon = Relayd::start(&config).await;
    let ledger = Arc::new(Mutex::new(std::collections::BTreeSet::new()));
    let answers: Answers = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let senders = spawn_senders(&daemon.url(), "wal", 16, &ledger, &answers, &stop);
    let wal = setup.path("relay.db-wal");
    let mut largest = 0;
    let deadline = std::time::Instant::now() + 6 * WAIT;
    while ledger.lock().unwrap().len() < 10_000 {
        assert!(
            std::time::Instant::now() < deadline,
            "10,000 events took too long"
        );
        largest = largest.max(std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for s in senders {
        tokio::time::timeout(WAIT, s).await.unwrap().unwrap();
    }
    let ledger = ledger.lock().unwrap().clone();
    await_delivered(&mut receiver, &ledger, 6 * WAIT).await;
    largest = largest.max(std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0));
    println!(
        "{} events: largest WAL {:.1} MB, answers {:?}",
        ledger.len(),
        largest as f64 / (1 << 20) as f64,
        answers.lock().unwrap()
    );
    assert!(
        answers.lock().unwrap().keys().all(|s| *s == 200),
        "{:?}",
        answers.lock().unwrap()
    );
    assert!(
        largest < WAL_LIMIT,
        "WAL grew to {:.1} MB for {} events",
        largest as f64 / (1 << 20) as f64,
        ledger.len()
    );
    daemon.terminate(WAIT).await;
}
