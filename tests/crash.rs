//! `kill -9`: every event answered 200 reaches its destination after a restart
//! (at-least-once: duplicates are counted and allowed, losses are not).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::ExitStatusExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::proc::*;
use common::*;

/// An HTTP destination behind `gate`, retried quickly and (for these tests) forever.
fn config_through(setup: &Setup, gate: &Gate) -> std::path::PathBuf {
    setup.write_config(&format!(
        "destinations:\n  api:\n    type: http\n    url: {}\n    concurrency: 8\n\
         \x20   retry: {{ max_attempts: 100000, initial_delay: 10ms, max_delay: 50ms }}\n\
         routes:\n  - to: [api]\n",
        gate.url("/ingest")
    ))
}

/// Waits until the receiver has seen every Facial ID in `ledger`; returns how many times
/// each Facial ID arrived (ledger or not).
async fn collect(receiver: &mut Receiver, ledger: &BTreeSet<String>) -> BTreeMap<String, usize> {
    let deadline = Instant::now() + 3 * WAIT;
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    while !ledger.iter().all(|f| seen.contains_key(f)) {
        assert!(
            Instant::now() < deadline,
            "lost events: {:?}",
            ledger
                .iter()
                .filter(|f| !seen.contains_key(*f))
                .collect::<Vec<_>>()
        );
        let r = receiver.next().await;
        let face = r.json()["facialId"].as_str().unwrap().to_string();
        *seen.entry(face).or_default() += 1;
    }
    seen
}

fn attempted(setup: &Setup) -> i64 {
    setup
        .db()
        .query_row(
            "SELECT COUNT(*) FROM deliveries WHERE attempts > 0",
            [],
            |r| r.get(0),
        )
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_with_the_destination_down_loses_nothing() {
    let mut receiver = Receiver::ok().await;
    let gate = Gate::start(receiver.addr, GateMode::Refuse).await;
    let setup = Setup::new();
    let config = config_through(&setup, &gate);
    let daemon = Relayd::start(&config).await;

    let client = reqwest::Client::new();
    let mut ledger = BTreeSet::new();
    for i in 0..50 {
        let face = format!("crash-{i}");
        let (status, answer) =
            send(&client, &daemon.url(), Some(TOKEN), &event("AUTH", &face)).await;
        assert_eq!(status, 200, "{answer}");
        ledger.insert(face);
    }
    // The daemon is busy failing and retrying when it dies.
    eventually("failed attempts recorded", || attempted(&setup) >= 10).await;
    let exited = daemon.kill9().await;
    assert_eq!(exited.status.signal(), Some(9), "killed, not exited");
    assert!(
        receiver.next_within(Duration::ZERO).await.is_none(),
        "nothing got through the closed gate"
    );

    gate.set(GateMode::Open);
    let daemon = Relayd::start(&config).await;
    let seen = collect(&mut receiver, &ledger).await;
    let duplicates: usize = seen.values().map(|n| n - 1).sum();
    println!(
        "kill -9 with destination down: {} events, 0 lost, {duplicates} duplicates",
        ledger.len()
    );
    assert_eq!(seen.len(), ledger.len(), "only ledger events: {seen:?}");
    eventually("every delivery done", || {
        count(&setup, "done") == 50 && count(&setup, "pending") == 0
    })
    .await;
    assert_eq!(count(&setup, "dead"), 0);
    daemon.terminate(WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill9_in_the_middle_of_a_stream_keeps_every_acknowledged_event() {
    let mut receiver = Receiver::ok().await;
    let gate = Gate::start(receiver.addr, GateMode::Refuse).await;
    let setup = Setup::new();
    let config = config_through(&setup, &gate);
    let daemon = Relayd::start(&config).await;

    // Four senders post continuously; a Facial ID enters the ledger only with its 200.
    let ledger = Arc::new(Mutex::new(BTreeSet::new()));
    let unexpected = Arc::new(Mutex::new(Vec::new()));
    let mut senders = vec![];
    for s in 0..4 {
        let (ledger, unexpected) = (ledger.clone(), unexpected.clone());
        let url = daemon.url();
        senders.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            for i in 0.. {
                let face = format!("stream-{s}-{i}");
                let sent = client
                    .post(&url)
                    .header("WWW-Authenticate", format!("Bearer {TOKEN}"))
                    .json(&event("AUTH", &face))
                    .send()
                    .await;
                match sent {
                    Ok(r) if r.status() == 200 => {
                        ledger.lock().unwrap().insert(face);
                    }
                    Ok(r) => unexpected.lock().unwrap().push(r.status().as_u16()),
                    // The daemon is gone: this sender saw the kill.
                    Err(_) => return true,
                }
            }
            unreachable!()
        }));
    }
    eventually("a stream is under way", || {
        ledger.lock().unwrap().len() >= 60
    })
    .await;
    let exited = daemon.kill9().await;
    assert_eq!(exited.status.signal(), Some(9));
    let acknowledged = ledger.lock().unwrap().clone();

    let mut saw_kill = 0;
    for s in senders {
        saw_kill += tokio::time::timeout(WAIT, s)
            .await
            .expect("sender stops")
            .unwrap() as usize;
    }
    assert_eq!(saw_kill, 4, "every sender was still sending at the kill");
    assert!(
        unexpected.lock().unwrap().is_empty(),
        "{:?}",
        unexpected.lock().unwrap()
    );
    // Answers that arrived between the snapshot and the kill also count.
    let ledger = ledger.lock().unwrap().clone();
    assert!(ledger.len() >= acknowledged.len());

    gate.set(GateMode::Open);
    let daemon = Relayd::start(&config).await;
    let seen = collect(&mut receiver, &ledger).await;
    let duplicates: usize = seen.values().map(|n| n - 1).sum();
    let stored_unanswered = seen.keys().filter(|f| !ledger.contains(*f)).count();
    println!(
        "kill -9 mid-stream: {} acknowledged, 0 lost, {duplicates} duplicates, \
         {stored_unanswered} stored but unanswered",
        ledger.len()
    );
    // Only acknowledged events and those stored just before the kill (at most one per
    // sender in flight) arrive.
    assert!(stored_unanswered <= 4, "{stored_unanswered}");
    eventually("nothing left pending", || count(&setup, "pending") == 0).await;
    daemon.terminate(WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill9_while_writing_the_file_destination_leaves_whole_lines() {
    let setup = Setup::new();
    let config = setup.write_config(
        "destinations:\n  audit:\n    type: file\n    path: events.jsonl\nroutes:\n  - to: [audit]\n",
    );
    let daemon = Relayd::start(&config).await;
    let ledger = Arc::new(Mutex::new(BTreeSet::new()));
    let mut senders = vec![];
    for s in 0..4 {
        let ledger = ledger.clone();
        let url = daemon.url();
        senders.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            for i in 0.. {
                let face = format!("file-{s}-{i}");
                let sent = client
                    .post(&url)
                    .header("WWW-Authenticate", format!("Bearer {TOKEN}"))
                    .json(&event("AUTH", &face))
                    .send()
                    .await;
                match sent {
                    Ok(r) if r.status() == 200 => {
                        ledger.lock().unwrap().insert(face);
                    }
                    Ok(r) => panic!("unexpected {}", r.status()),
                    Err(_) => return,
                }
            }
        }));
    }
    // Killed while events are still being accepted and appended.
    eventually("the file is being written", || {
        std::fs::read_to_string(setup.path("events.jsonl")).is_ok_and(|t| t.lines().count() >= 40)
    })
    .await;
    daemon.kill9().await;
    for s in senders {
        tokio::time::timeout(WAIT, s)
            .await
            .expect("sender stops")
            .unwrap();
    }
    let ledger = ledger.lock().unwrap().clone();

    let daemon = Relayd::start(&config).await;
    let faces_in_file = || -> Option<BTreeMap<String, usize>> {
        let text = std::fs::read_to_string(setup.path("events.jsonl")).ok()?;
        let mut faces = BTreeMap::new();
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("torn or invalid line {line:?}: {e}"));
            let face = v["event"]["facialId"].as_str().unwrap().to_string();
            *faces.entry(face).or_insert(0) += 1;
        }
        Some(faces)
    };
    eventually("every acknowledged event is in the file", || {
        faces_in_file().is_some_and(|f| ledger.iter().all(|l| f.contains_key(l)))
    })
    .await;
    eventually("nothing left pending", || count(&setup, "pending") == 0).await;
    let faces = faces_in_file().unwrap();
    let duplicates: usize = faces.values().map(|n| n - 1).sum();
    println!(
        "kill -9 while writing the file: {} acknowledged, 0 lost, {duplicates} duplicate lines",
        ledger.len()
    );
    assert!(
        std::fs::read_to_string(setup.path("events.jsonl"))
            .unwrap()
            .ends_with('\n')
    );
    daemon.terminate(WAIT).await;
}
