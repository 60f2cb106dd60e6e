//! The operator's view of a relay on PostgreSQL: the config fixture, the database going
//! down and coming back, `check`, `dead-letters` and metrics.

use std::time::{Duration, Instant};

use faceio_relay::config::StoreBackend;

use crate::common::pg::{self, TestDb, Tracker, within};
use crate::common::proc::{cli, dead_letters_json};
use crate::common::{Receiver, Reply, TestRelay, event};
use crate::relays::http_destination;

#[test]
fn the_postgres_fixture_is_typed_as_written() {
    let file =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/config/valid/postgres.yaml");
    let text = std::fs::read_to_string(&file).unwrap();
    let env = |name: &str| match name {
        "FACEIO_TOKEN" => Some("tok".to_string()),
        "CRM_TOKEN" => Some("pg-password-77".to_string()),
        _ => None,
    };
    let (config, warnings) = faceio_relay::config::load_str(&text, &file, &env).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    let StoreBackend::Postgres(pg) = &config.store.backend else {
        panic!("{:?}", config.store.backend)
    };
    assert_eq!(pg.pool_size, 16);
    assert!(
        pg.url
            .expose()
            .contains(":pg-password-77@db.internal:5432/relay")
    );
    assert_eq!(config.store.retention, Duration::from_secs(3 * 86_400));
    let shown = format!("{config:?}\n{}", config.summary());
    assert!(shown.contains("store postgres"), "{shown}");
    assert!(!shown.contains("pg-password-77"), "{shown}");
    assert!(!shown.contains("db.internal"), "{shown}");
}

#[tokio::test]
async fn postgres_down_means_503_never_200_and_recovery_delivers() {
    let db = TestDb::create().await;
    let dir = tempfile::tempdir().unwrap();
    let tracker = Tracker::start(Duration::ZERO).await;
    let config = pg::write_config(
        dir.path(),
        &db,
        "200ms",
        &http_destination(&tracker.url(), ""),
    );
    let (cfg, _) = faceio_relay::config::load(&config).unwrap();
    let relay = TestRelay::start(cfg).await;
    let admin = format!("http://{}/readyz", relay.relay.admin_addr().unwrap());
    assert_eq!(
        reqwest::get(&admin).await.unwrap().status(),
        200,
        "ready while PostgreSQL answers"
    );

    db.cut_off().await;
    for i in 0..3 {
        let (status, body) = relay.send(&event("AUTH", &format!("down{i}"))).await;
        assert_eq!(status, 503, "{body}");
    }
    // `/readyz` answers from a probe at most a second old.
    within(Duration::from_secs(10), "/readyz says 503", || async {
        reqwest::get(&admin).await.unwrap().status() == 503
    })
    .await;

    db.restore().await;
    // Like FACEIO, retry until accepted: the pool reconnects.
    let deadline = Instant::now() + Duration::from_secs(20);
    let id = loop {
        let (status, body) = relay.send(&event("AUTH", "back")).await;
        assert!(status == 200 || status == 503, "{status} {body}");
        if status == 200 {
            break body["id"].as_str().unwrap().to_string();
        }
        assert!(Instant::now() < deadline, "never accepted again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // The dispatcher lost its destination lock with the connection and takes it again.
    within(Duration::from_secs(20), "the delivery", || async {
        tracker.per_event().contains_key(&id)
    })
    .await;
    assert_eq!(
        tracker.per_event().len(),
        1,
        "nothing answered 503 was delivered"
    );
    // Ready again once a probe (at most a second old) sees PostgreSQL answer.
    within(
        Duration::from_secs(10),
        "/readyz says 200 again",
        || async { reqwest::get(&admin).await.unwrap().status() == 200 },
    )
    .await;
    relay.shutdown().await;
}

#[tokio::test]
async fn check_dead_letters_and_metrics_work_against_postgres() {
    let db = TestDb::create().await;
    let dir = tempfile::tempdir().unwrap();
    let mut receiver = Receiver::start(Reply::status(404).body("no_such_hook")).await;
    let body = format!(
        "destinations:\n  api:\n    type: http\n    url: {}\n  spare:\n    type: http\n    url: {}\n\
         routes:\n  - to: [api, spare]\n",
        receiver.url(),
        receiver.url()
    );
    let config = pg::write_config(dir.path(), &db, "200ms", &body);
    // A password in the URL (trust auth ignores it) must never be shown.
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("postgres://postgres@", "postgres://postgres:pw-s3cret-42@");
    std::fs::write(&config, text).unwrap();

    let out = cli(&config, &["check"]).await;
    assert!(out.ok(), "{}", out.all());
    assert!(out.stdout.contains("store postgres"), "{}", out.stdout);
    assert!(!out.all().contains("pw-s3cret-42"), "{}", out.all());
    assert!(!out.all().contains(&db.name), "{}", out.all());

    let (cfg, _) = faceio_relay::config::load(&config).unwrap();
    assert!(matches!(cfg.store.backend, StoreBackend::Postgres(_)));
    let relay = TestRelay::start(cfg).await;
    let (status, _) = relay.send(&event("ENROLL", "dl")).await;
    assert_eq!(status, 200);
    receiver.next().await;
    receiver.next().await;
    within(Duration::from_secs(10), "two dead letters", || async {
        db.count("dead").await == 2
    })
    .await;

    let table = cli(&config, &["dead-letters", "list"]).await;
    assert!(table.ok(), "{}", table.all());
    assert!(
        !table.stderr.contains("already exists"),
        "PostgreSQL notices reach the terminal: {}",
        table.stderr
    );
    let listed = dead_letters_json(&config).await;
    assert_eq!(listed.len(), 2);
    assert_eq!(
        listed[0]["last_error"].as_str().map(|e| e.contains("404")),
        Some(true)
    );
    let id = listed.iter().find(|d| d["destination"] == "api").unwrap()["id"]
        .as_i64()
        .unwrap();
    let shown = cli(
        &config,
        &["dead-letters", "show", &id.to_string(), "--json"],
    )
    .await;
    assert!(shown.ok(), "{}", shown.all());
    assert!(
        shown.stdout.contains("\"dl\""),
        "payload shown: {}",
        shown.stdout
    );

    let metrics = format!("http://{}/metrics", relay.relay.admin_addr().unwrap());
    let text = reqwest::get(&metrics).await.unwrap().text().await.unwrap();
    assert!(
        text.contains("faceio_relay_dead_letters{destination=\"api\"} 1"),
        "{text}"
    );
    let ready = format!("http://{}/readyz", relay.relay.admin_addr().unwrap());
    assert_eq!(reqwest::get(&ready).await.unwrap().status(), 200);

    receiver.set_default(Reply::status(200).body("ok"));
    let replayed = cli(&config, &["dead-letters", "replay", &id.to_string()]).await;
    assert!(replayed.ok(), "{}", replayed.all());
    assert!(
        replayed.stdout.contains("replayed 1"),
        "{}",
        replayed.stdout
    );
    receiver.next().await;
    within(Duration::from_secs(10), "the replay delivered", || async {
        db.count("done").await == 1
    })
    .await;
    let purged = cli(&config, &["dead-letters", "purge", "--all"]).await;
    assert!(purged.stdout.contains("purged 1"), "{}", purged.all());
    assert!(dead_letters_json(&config).await.is_empty());
    for out in [&out, &shown, &replayed, &purged] {
        assert!(!out.all().contains("pw-s3cret-42"));
    }
    relay.shutdown().await;
}
