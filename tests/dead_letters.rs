//! Dead letters: what ends up there, and the `dead-letters` commands run against the
//! store of a running daemon. (`each_delivery_is_attempted_once_under_load` checks that
//! no delivery is sent twice; the other tests count attempts the way the relay numbers
//! them: the `attempts` column and the `X-Faceio-Relay-Attempt` header.)

mod common;

use std::time::{Duration, Instant};

use common::proc::*;
use common::*;

/// Several poll intervals (200 ms): long enough for a wrongly pending delivery to be
/// attempted again.
const QUIET: Duration = Duration::from_millis(600);

/// How soon a running daemon must pick up a replay (poll interval 200 ms).
const REPLAY_WITHIN: Duration = Duration::from_secs(2);

fn slack(name: &str, url: &str) -> String {
    format!("  {name}:\n    type: slack\n    webhook_url: {url}\n")
}

fn http(name: &str, url: &str, extra: &str) -> String {
    format!("  {name}:\n    type: http\n    url: {url}\n{extra}")
}

/// Everything the receiver gets until it has been quiet for [`QUIET`].
async fn drain(r: &mut Receiver) -> Vec<Received> {
    let mut got = vec![];
    while let Some(x) = r.next_within(QUIET).await {
        got.push(x);
    }
    got
}

/// The `X-Faceio-Relay-Attempt` number of each request, in arrival order.
fn attempt_numbers(requests: &[Received]) -> Vec<u32> {
    requests
        .iter()
        .map(|r| r.header("x-faceio-relay-attempt").unwrap().parse().unwrap())
        .collect()
}

/// The Facial ID in a Slack message made by the default template.
fn slack_face(r: &Received) -> String {
    let text = r.json()["text"].as_str().unwrap().to_string();
    text.split('`')
        .nth(1)
        .expect("default template")
        .to_string()
}

/// `(id, destination, attempts, last_error)` of every dead delivery.
fn dead_rows(setup: &Setup) -> Vec<(i64, String, i64, String)> {
    let db = setup.db();
    let mut stmt = db
        .prepare(
            "SELECT id, destination, attempts, last_error FROM deliveries
             WHERE state = 'dead' ORDER BY id",
        )
        .unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

async fn post(url: &str, e: &serde_json::Value) -> serde_json::Value {
    let (status, answer) = send(&reqwest::Client::new(), url, Some(TOKEN), e).await;
    assert_eq!(status, 200, "{answer}");
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_slack_error_is_dead_lettered_listed_shown_and_replayed() {
    let mut hook = Receiver::start(Reply::status(404).body("channel_not_found")).await;
    let setup = Setup::new();
    let config = setup.write_config(&format!(
        "destinations:\n{}routes:\n  - to: [chat]\n",
        slack("chat", &hook.url())
    ));
    let daemon = Relayd::start(&config).await;
    let answer = post(&daemon.url(), &event("ENROLL", "face-dl")).await;
    let event_id = answer["id"].as_str().unwrap().to_string();

    hook.next().await;
    eventually("the delivery is dead", || count(&setup, "dead") == 1).await;
    assert!(
        drain(&mut hook).await.is_empty(),
        "a permanent error is not retried"
    );
    let rows = dead_rows(&setup);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].2, 1, "exactly one attempt");
    assert!(rows[0].3.contains("404"), "{rows:?}");
    assert!(rows[0].3.contains("channel_not_found"), "{rows:?}");

    // list --json: one object per line with the documented fields.
    let list = dead_letters_json(&config).await;
    assert_eq!(list.len(), 1, "{list:?}");
    let dl = &list[0];
    for key in [
        "id",
        "event_id",
        "destination",
        "attempts",
        "last_error",
        "failed_at",
    ] {
        assert!(dl.get(key).is_some(), "no {key} in {dl}");
    }
    assert_eq!(dl["event_id"], event_id.as_str());
    assert_eq!(dl["destination"], "chat");
    assert_eq!(dl["attempts"], 1);
    assert!(
        dl["last_error"]
            .as_str()
            .unwrap()
            .contains("channel_not_found")
    );
    assert!(
        humantime::parse_rfc3339(dl["failed_at"].as_str().unwrap()).is_ok(),
        "failed_at is RFC 3339: {dl}"
    );
    let id = dl["id"].as_i64().unwrap();

    // show: the payload, as text and as JSON.
    let out = cli(&config, &["dead-letters", "show", &id.to_string()]).await;
    assert!(out.ok(), "{}", out.all());
    for part in [
        "face-dl",
        "ENROLL",
        "channel_not_found",
        &event_id,
        "female",
    ] {
        assert!(
            out.stdout.contains(part),
            "show lacks {part}:\n{}",
            out.stdout
        );
    }
    let out = cli(
        &config,
        &["dead-letters", "show", &id.to_string(), "--json"],
    )
    .await;
    assert!(out.ok(), "{}", out.all());
    let shown: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap();
    assert_eq!(shown["payload"], event("ENROLL", "face-dl"));
    assert_eq!(shown["id"], id);

    let out = cli(&config, &["dead-letters", "show", "999999"]).await;
    assert!(!out.ok(), "show of an unknown id must fail");
    assert!(
        out.stderr.contains("no dead letter with id 999999"),
        "{}",
        out.all()
    );

    // Slack is fixed; replay while the daemon runs: it delivers within its poll interval.
    hook.set_default(Reply::status(200).body("ok"));
    let replayed_at = Instant::now();
    let out = cli(&config, &["dead-letters", "replay", &id.to_string()]).await;
    assert!(out.ok(), "{}", out.all());
    assert!(out.stdout.contains("replayed 1"), "{}", out.stdout);
    let got = hook.next().await;
    let took = got.at.duration_since(replayed_at);
    assert!(took < REPLAY_WITHIN, "replay delivered after {took:?}");
    assert_eq!(slack_face(&got), "face-dl");
    eventually("the replayed delivery is done", || {
        count(&setup, "done") == 1
    })
    .await;
    assert_eq!(count(&setup, "dead"), 0);
    assert!(dead_letters_json(&config).await.is_empty());
    let out = cli(&config, &["dead-letters", "list"]).await;
    assert!(out.stdout.contains("no dead letters"), "{}", out.stdout);
    daemon.terminate(WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_400_is_permanent_and_500_gives_up_after_max_attempts() {
    let mut bad = Receiver::start(Reply::status(400).body("unknown field: facialId")).await;
    let mut down = Receiver::start(Reply::status(500).body("upstream broken")).await;
    let setup = Setup::new();
    let retry = "    retry: { max_attempts: 3, initial_delay: 10ms, max_delay: 20ms }\n";
    let config = setup.write_config(&format!(
        "destinations:\n{}{}routes:\n  - to: [bad, down]\n",
        http("bad", &bad.url(), retry),
        http("down", &down.url(), retry),
    ));
    let daemon = Relayd::start(&config).await;
    post(&daemon.url(), &event("AUTH", "face-x")).await;

    eventually("both deliveries dead", || count(&setup, "dead") == 2).await;
    let to_down = drain(&mut down).await;
    let to_bad = drain(&mut bad).await;
    assert_eq!(
        attempt_numbers(&to_down),
        [1, 2, 3],
        "exactly three requests to 500"
    );
    assert_eq!(attempt_numbers(&to_bad), [1], "exactly one request to 400");

    let list = dead_letters_json(&config).await;
    let by = |d: &str| list.iter().find(|l| l["destination"] == d).unwrap().clone();
    assert_eq!(by("bad")["attempts"], 1);
    let bad_err = by("bad")["last_error"].as_str().unwrap().to_string();
    assert!(
        bad_err.contains("400") && bad_err.contains("unknown field"),
        "{bad_err}"
    );
    assert_eq!(by("down")["attempts"], 3);
    let down_err = by("down")["last_error"].as_str().unwrap().to_string();
    assert!(down_err.contains("gave up after 3 attempts"), "{down_err}");
    assert!(down_err.contains("500"), "{down_err}");

    // --destination filters the listing.
    let out = cli(
        &config,
        &["dead-letters", "list", "--json", "--destination", "bad"],
    )
    .await;
    assert_eq!(out.stdout.lines().count(), 1, "{}", out.stdout);
    assert!(out.stdout.contains("\"bad\""), "{}", out.stdout);
    daemon.terminate(WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_by_destination_then_all() {
    let mut a = Receiver::start(Reply::status(404).body("channel_not_found")).await;
    let mut b = Receiver::start(Reply::status(400)).await;
    let setup = Setup::new();
    let config = setup.write_config(&format!(
        "destinations:\n{}{}routes:\n  - to: [a, b]\n",
        slack("a", &a.url()),
        http("b", &b.url(), "")
    ));
    let daemon = Relayd::start(&config).await;
    for face in ["f1", "f2"] {
        post(&daemon.url(), &event("AUTH", face)).await;
    }
    eventually("four dead letters", || count(&setup, "dead") == 4).await;
    assert_eq!(drain(&mut a).await.len(), 2);
    assert_eq!(drain(&mut b).await.len(), 2);

    a.set_default(Reply::status(200).body("ok"));
    b.set_default(Reply::status(200));
    let out = cli(&config, &["dead-letters", "replay", "--destination", "a"]).await;
    assert!(out.stdout.contains("replayed 2"), "{}", out.all());
    let mut faces = vec![slack_face(&a.next().await), slack_face(&a.next().await)];
    faces.sort();
    assert_eq!(faces, ["f1", "f2"]);
    eventually("a's two deliveries done", || count(&setup, "done") == 2).await;
    assert!(b.next_within(QUIET).await.is_none(), "b was not replayed");
    let left = dead_letters_json(&config).await;
    assert_eq!(left.len(), 2);
    assert!(left.iter().all(|l| l["destination"] == "b"), "{left:?}");

    let out = cli(&config, &["dead-letters", "replay", "--all"]).await;
    assert!(out.stdout.contains("replayed 2"), "{}", out.all());
    eventually("everything done", || count(&setup, "done") == 4).await;
    let mut faces: Vec<String> = drain(&mut b)
        .await
        .iter()
        .map(|r| r.json()["facialId"].as_str().unwrap().to_string())
        .collect();
    faces.sort();
    assert_eq!(faces, ["f1", "f2"], "each replayed once");
    assert!(dead_letters_json(&config).await.is_empty());
    assert!(
        drain(&mut a).await.is_empty(),
        "a is not sent anything again"
    );
    daemon.terminate(WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_deletes_dead_letters_for_good() {
    let mut hook = Receiver::start(Reply::status(410).body("channel_is_archived")).await;
    let setup = Setup::new();
    let config = setup.write_config(&format!(
        "destinations:\n{}routes:\n  - to: [chat]\n",
        slack("chat", &hook.url())
    ));
    let daemon = Relayd::start(&config).await;
    for face in ["p1", "p2", "p3"] {
        post(&daemon.url(), &event("AUTH", face)).await;
    }
    eventually("three dead letters", || count(&setup, "dead") == 3).await;
    assert_eq!(drain(&mut hook).await.len(), 3);
    let ids: Vec<i64> = dead_rows(&setup).iter().map(|r| r.0).collect();

    let out = cli(&config, &["dead-letters", "purge", &ids[0].to_string()]).await;
    assert!(out.stdout.contains("purged 1"), "{}", out.all());
    let left: Vec<i64> = dead_letters_json(&config)
        .await
        .iter()
        .map(|l| l["id"].as_i64().unwrap())
        .collect();
    assert_eq!(left.len(), 2);
    assert!(!left.contains(&ids[0]), "{left:?}");

    let out = cli(&config, &["dead-letters", "purge", "--all"]).await;
    assert!(out.ok(), "{}", out.all());
    assert!(out.stdout.contains("purged 2"), "{}", out.all());
    assert!(dead_letters_json(&config).await.is_empty());
    let out = cli(&config, &["dead-letters", "list"]).await;
    assert!(out.stdout.contains("no dead letters"), "{}", out.stdout);
    assert_eq!(count(&setup, "dead") + count(&setup, "pending"), 0);

    // Purged means gone: replaying finds nothing and nothing is sent.
    hook.set_default(Reply::status(200).body("ok"));
    let out = cli(&config, &["dead-letters", "replay", "--all"]).await;
    assert!(out.stdout.contains("replayed 0"), "{}", out.all());
    assert!(hook.next_within(QUIET).await.is_none());
    daemon.terminate(WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_leaves_dead_letters_of_removed_destinations_alone() {
    // crm is down, then removed from the config: its pending delivery becomes a dead
    // letter at the next start. A replay cannot deliver it (no dispatcher): it must not be
    // queued where nothing will ever pick it up, and must not be reported as replayed.
    let mut chat = Receiver::start(Reply::status(404).body("channel_not_found")).await;
    let closed = Gate::start(chat.addr, GateMode::Refuse).await;
    let setup = Setup::new();
    let with_crm = format!(
        "destinations:\n{}{}routes:\n  - to: [chat, crm]\n",
        slack("chat", &chat.url()),
        http(
            "crm",
            &closed.url("/crm"),
            "    retry: { max_attempts: 1000, initial_delay: 10ms, max_delay: 50ms }\n"
        )
    );
    let config = setup.write_config(&with_crm);
    let daemon = Relayd::start(&config).await;
    post(&daemon.url(), &event("AUTH", "orphan")).await;
    eventually("chat dead, crm retrying", || {
        count(&setup, "dead") == 1 && closed.accepted() >= 1
    })
    .await;
    daemon.terminate(WAIT).await;
    drain(&mut chat).await;

    let config = setup.write_config(&format!(
        "destinations:\n{}routes:\n  - to: [chat]\n",
        slack("chat", &chat.url())
    ));
    let daemon = Relayd::start(&config).await;
    let list = dead_letters_json(&config).await;
    assert_eq!(list.len(), 2, "{list:?}");
    let orphan = list.iter().find(|l| l["destination"] == "crm").unwrap();
    assert!(
        orphan["last_error"]
            .as_str()
            .unwrap()
            .contains("no longer in the config"),
        "{orphan}"
    );
    let orphan_id = orphan["id"].as_i64().unwrap();
    let crm_state = || -> String {
        setup
            .db()
            .query_row(
                "SELECT state FROM deliveries WHERE id = ?1",
                [orphan_id],
                |r| r.get(0),
            )
            .unwrap()
    };

    let out = cli(&config, &["dead-letters", "replay", "--destination", "crm"]).await;
    assert!(
        !out.ok(),
        "replaying an unknown destination must fail:\n{}",
        out.all()
    );
    assert!(out.stderr.contains("crm"), "{}", out.all());
    let out = cli(&config, &["dead-letters", "replay", &orphan_id.to_string()]).await;
    assert!(!out.ok(), "{}", out.all());
    assert!(out.stderr.contains("crm"), "{}", out.all());
    assert_eq!(crm_state(), "dead");

    // --all replays what can be delivered and says what it left.
    chat.set_default(Reply::status(200).body("ok"));
    let out = cli(&config, &["dead-letters", "replay", "--all"]).await;
    assert!(out.ok(), "{}", out.all());
    assert!(out.stdout.contains("replayed 1 "), "{}", out.all());
    assert!(out.stderr.contains("crm"), "{}", out.all());
    assert_eq!(slack_face(&chat.next().await), "orphan");
    eventually("chat delivered", || count(&setup, "done") == 1).await;
    assert_eq!(crm_state(), "dead");

    let out = cli(&config, &["dead-letters", "purge", "--destination", "crm"]).await;
    assert!(out.stdout.contains("purged 1"), "{}", out.all());
    assert!(dead_letters_json(&config).await.is_empty());
    daemon.terminate(WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_follows_the_running_relay_not_the_file() {
    // crm answers 400 (a permanent failure) so its delivery is a dead letter at once.
    let mut crm = Receiver::start(Reply::status(400)).await;
    let setup = Setup::new();
    let with_crm = format!(
        "destinations:\n{}  audit:\n    type: file\n    path: e.jsonl\nroutes:\n  - to: [audit, crm]\n",
        http("crm", &crm.url(), "")
    );
    let without_crm =
        "destinations:\n  audit:\n    type: file\n    path: e.jsonl\nroutes:\n  - to: [audit]\n";
    let config = setup.write_config(&with_crm);
    let daemon = Relayd::start(&config).await;
    post(&daemon.url(), &event("AUTH", "dl")).await;
    crm.next().await;
    eventually("crm's delivery is a dead letter", || {
        count(&setup, "dead") == 1
    })
    .await;
    daemon.terminate(WAIT).await;

    // The relay now runs without crm; relay.yaml gets crm back, not yet reloaded.
    let config = setup.write_config(without_crm);
    let daemon = Relayd::start(&config).await;
    setup.write_config(&with_crm);
    crm.set_default(Reply::status(200));
    let id = dead_rows(&setup)[0].0;
    let out = cli(&config, &["dead-letters", "replay", "--destination", "crm"]).await;
    assert!(!out.ok(), "a refused replay must fail:\n{}", out.all());
    assert!(
        out.stderr.contains("refused 1") && out.stderr.contains("crm"),
        "{}",
        out.all()
    );
    assert!(out.stdout.contains("replayed 0"), "{}", out.all());
    // Still a dead letter (not pending with no dispatcher), with the reason.
    let rows = dead_rows(&setup);
    assert_eq!((rows.len(), rows[0].0), (1, id), "{rows:?}");
    assert!(rows[0].3.contains("replay refused"), "{rows:?}");
    assert_eq!(count(&setup, "pending"), 0);
    assert!(crm.next_within(QUIET).await.is_none());
    let out = cli(&config, &["dead-letters", "replay", &id.to_string()]).await;
    assert!(!out.ok(), "{}", out.all());
    assert!(out.stderr.contains("refused 1"), "{}", out.all());

    // Reloaded, the relay runs crm: the same replay is queued and delivered, even with
    // crm gone from the file again (the relay decides, not the file).
    daemon.signal("HUP");
    daemon.wait_log("configuration reloaded").await;
    setup.write_config(without_crm);
    let out = cli(&config, &["dead-letters", "replay", "--destination", "crm"]).await;
    assert!(out.ok(), "{}", out.all());
    assert!(out.stdout.contains("replayed 1 "), "{}", out.all());
    assert_eq!(crm.next().await.json()["facialId"], "dl");
    eventually("crm's replay done", || count(&setup, "done") == 2).await;

    // No relay running: the request waits for one, the command says so, and the next
    // start decides it.
    crm.set_default(Reply::status(400));
    post(&daemon.url(), &event("AUTH", "while-stopped")).await;
    eventually("a new dead letter", || count(&setup, "dead") == 1).await;
    daemon.terminate(WAIT).await;
    drain(&mut crm).await;
    crm.set_default(Reply::status(200));
    let out = cli(&config, &["dead-letters", "replay", "--all"]).await;
    assert!(out.ok(), "{}", out.all());
    assert!(out.stdout.contains("replayed 0"), "{}", out.all());
    assert!(
        out.stderr.contains("no running relay decided"),
        "{}",
        out.all()
    );
    assert_eq!(count(&setup, "dead"), 1, "still a dead letter meanwhile");
    setup.write_config(&with_crm);
    let daemon = Relayd::start(&config).await;
    assert_eq!(crm.next().await.json()["facialId"], "while-stopped");
    eventually("replayed at start", || count(&setup, "done") == 4).await;
    daemon.terminate(WAIT).await;
}

/// Sends `n` events at once (each must get its 200).
async fn send_burst(url: &str, prefix: &str, n: usize) {
    let client = reqwest::Client::new();
    let sends = (0..n).map(|i| {
        let client = client.clone();
        let e = event("AUTH", &format!("{prefix}{i}"));
        async move { send(&client, url, Some(TOKEN), &e).await.0 }
    });
    let statuses = futures_util::future::join_all(sends).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_delivery_is_attempted_once_under_load() {
    // Bursts of events to a destination that answers at once: a delivery that is done
    // (or dead) must not be sent again. (Before main's "claims with release epochs" fix,
    // 51-55 requests arrived per 50 events: a read racing a release re-queued deliveries.)
    for (reply, state) in [
        (Reply::status(200).body("ok"), "done"),
        (Reply::status(404).body("channel_not_found"), "dead"),
    ] {
        let mut hook = Receiver::start(reply).await;
        let setup = Setup::new();
        // Bursts of 50 new connections from one address, while the previous burst's are
        // still closing: the per-source cap (64, tests/ingress_limits.rs) is not what this
        // test is about.
        let config = setup.write_config(&format!(
            "ingress:\n  max_connections_per_ip: 1000\ndestinations:\n{}routes:\n  - to: [chat]\n",
            slack("chat", &hook.url())
        ));
        let daemon = Relayd::start(&config).await;
        let n = 50;
        for round in 0..3 {
            send_burst(&daemon.url(), &format!("r{round}-"), n).await;
        }
        eventually("every delivery has its outcome", || {
            count(&setup, state) == 3 * n as i64
        })
        .await;
        let mut per_face = std::collections::BTreeMap::<String, usize>::new();
        for r in drain(&mut hook).await {
            *per_face.entry(slack_face(&r)).or_default() += 1;
        }
        let twice: Vec<_> = per_face.iter().filter(|(_, c)| **c > 1).collect();
        assert_eq!(per_face.len(), 3 * n, "every event was sent");
        assert!(twice.is_empty(), "{state}: sent more than once: {twice:?}");
        daemon.terminate(WAIT).await;
    }
}
