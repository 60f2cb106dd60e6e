//! `type: redis` against the local Redis (127.0.0.1:6379; `.ci/run` starts it): every
//! event added to its stream once with its fields, through killed connections; refused
//! credentials dead-lettered at once without the password; `check` asks the server.
//! Each test works as a Redis user of its own (ACL), so killing "its" connections
//! (`CLIENT KILL USER`) touches no other test.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use common::proc::cli;
use common::queues::*;
use common::*;
use redis::AsyncCommands;
use redis::aio::MultiplexedConnection;

const REDIS: &str = "redis://127.0.0.1:6379/0";

/// A Redis user and stream key of the test's own; dropping it removes both.
struct TestUser {
    admin: MultiplexedConnection,
    user: String,
    password: String,
    key: String,
}

type Entry = HashMap<String, redis::Value>;

impl TestUser {
    async fn create() -> Self {
        let admin = redis::Client::open(REDIS)
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .expect("Redis on 127.0.0.1:6379 answers (.ci/run starts it)");
        let id = uuid::Uuid::now_v7().simple().to_string();
        let user = format!("faceio-test-{id}");
        let password = format!("pw-{id}");
        let key = format!("faceio-test-stream-{id}");
        let _: () = redis::cmd("ACL")
            .arg("SETUSER")
            .arg(&user)
            .arg("on")
            .arg(format!(">{password}"))
            .arg("~faceio-test-*")
            .arg("+@all")
            .query_async(&mut admin.clone())
            .await
            .unwrap();
        Self {
            admin,
            user,
            password,
            key,
        }
    }

    fn url(&self) -> String {
        format!("redis://{}:{}@127.0.0.1:6379/0", self.user, self.password)
    }

    /// Closes every connection the relay has as this user.
    async fn kill_connections(&self) -> i64 {
        redis::cmd("CLIENT")
            .arg("KILL")
            .arg("USER")
            .arg(&self.user)
            .query_async(&mut self.admin.clone())
            .await
            .unwrap()
    }

    async fn len(&self) -> usize {
        self.admin.clone().xlen(&self.key).await.unwrap()
    }

    async fn entries(&self) -> Vec<Entry> {
        let reply: redis::streams::StreamRangeReply =
            self.admin.clone().xrange_all(&self.key).await.unwrap();
        reply.ids.into_iter().map(|e| e.map).collect()
    }

    async fn wait_for(&self, n: usize, within: Duration) {
        wait_for_count("entries in the stream", n, within, async || {
            self.len().await
        })
        .await
    }
}

/// Removes the user and the key, also when the test fails (Drop cannot await: a
/// blocking connection of its own).
impl Drop for TestUser {
    fn drop(&mut self) {
        let Ok(mut admin) = redis::Client::open(REDIS).and_then(|c| c.get_connection()) else {
            return;
        };
        let _: Result<(), _> = redis::cmd("DEL").arg(&self.key).query(&mut admin);
        let _: Result<(), _> = redis::cmd("ACL")
            .arg("DELUSER")
            .arg(&self.user)
            .query(&mut admin);
    }
}

fn field(entry: &Entry, name: &str) -> String {
    match entry.get(name) {
        Some(redis::Value::BulkString(b)) => String::from_utf8(b.clone()).unwrap(),
        other => panic!("field {name}: {other:?}"),
    }
}

fn redis_dest(url: &str, stream: &str, extra: &str) -> String {
    format!(
        "destinations:\n  stream:\n    type: redis\n    url: {url}\n    stream: \"{stream}\"\n{extra}\
         routes:\n  - to: [stream]\n"
    )
}

#[tokio::test]
async fn a_thousand_events_are_added_once_in_order_with_their_fields() {
    let user = TestUser::create().await;
    let setup = Setup::new();
    let cfg = redis_dest(&user.url(), &user.key, "    concurrency: 1\n");
    let relay = TestRelay::start(setup.config(&cfg)).await;
    let mut sent = Vec::new();
    for i in 0..1000 {
        let e = event(
            if i % 2 == 0 { "AUTH" } else { "ENROLL" },
            &format!("face-{i}"),
        );
        assert_eq!(relay.send(&e).await.0, 200);
        sent.push(e);
    }
    user.wait_for(1000, Duration::from_secs(60)).await;
    eventually("every delivery done", || count(&setup, "done") == 1000).await;
    let entries = user.entries().await;
    assert_eq!(entries.len(), 1000, "exactly once");
    let events = stored_ids(&setup);
    for (i, entry) in entries.iter().enumerate() {
        assert_eq!(
            field(entry, "payload"),
            sent[i].to_string(),
            "entry {i}: the FACEIO body byte for byte, in the order received"
        );
        assert_eq!(field(entry, "event_id"), events[i].0);
        assert_eq!(
            field(entry, "event_name"),
            sent[i]["eventName"].as_str().unwrap()
        );
        assert_eq!(field(entry, "app_id"), APP);
        let at = humantime::parse_rfc3339(&field(entry, "received_at")).unwrap();
        let ms = at
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        assert_eq!(ms, events[i].1, "received_at");
    }
    relay.shutdown().await;
}

#[tokio::test]
async fn killed_connections_while_200_events_a_second_flow_lose_nothing() {
    let user = TestUser::create().await;
    let setup = Setup::new();
    let cfg = redis_dest(
        &user.url(),
        &user.key,
        "    timeout: 1s\n    retry: { max_attempts: 100, initial_delay: 50ms, max_delay: 500ms }\n",
    );
    let relay = Arc::new(TestRelay::start(setup.config(&format!("{FLOW_INGRESS}{cfg}"))).await);
    let total = 600;
    // The relay is connected once an entry is in: each kill does close one.
    let killed = flow_with_interruptions(Arc::clone(&relay), total, &[200, 400], async || {
        user.wait_for(1, WAIT).await;
        user.kill_connections().await
    })
    .await;
    assert!(killed >= 2, "CLIENT KILL closed {killed} connections");
    eventually("every delivery done", || {
        count(&setup, "done") == total as i64
    })
    .await;
    assert_eq!(count(&setup, "dead"), 0);
    let entries = user.entries().await;
    let ids: HashSet<String> = entries.iter().map(|e| field(e, "event_id")).collect();
    assert_eq!(ids.len(), total, "every event is in the stream");
    // A second entry only where an attempt's reply was lost (and it was tried again).
    let retried = retried(&setup);
    let duplicates = entries.len() - ids.len();
    assert!(
        duplicates as i64 <= retried,
        "{duplicates} duplicates, {retried} retried"
    );
    eprintln!("{retried} deliveries retried, {duplicates} duplicate entries");
    Arc::into_inner(relay).unwrap().shutdown().await;
}

#[tokio::test]
async fn a_wrong_password_is_dead_lettered_at_once_without_showing_it() {
    let user = TestUser::create().await;
    let setup = Setup::new();
    let url = format!("redis://{}:Wr0ng-s3cret@127.0.0.1:6379/0", user.user);
    // A short timeout: the refusal is the server's first answer, not a connect retried
    // until the attempt runs out.
    let cfg = redis_dest(
        &url,
        &user.key,
        "    timeout: 1s\n    retry: { max_attempts: 10, initial_delay: 10ms }\n",
    );
    let relay = TestRelay::start(setup.config(&cfg)).await;
    relay.send(&event("AUTH", "face-p")).await;
    eventually("dead-lettered", || count(&setup, "dead") == 1).await;
    let (attempts, error) = the_dead_letter(&setup);
    assert_eq!(attempts, 1, "not retried");
    assert!(error.contains("the Redis server refused"), "{error}");
    assert!(
        error.contains("invalid username-password pair"),
        "the server's words: {error}"
    );
    assert!(!error.contains("Wr0ng-s3cret"), "{error}");
    relay.shutdown().await;
}

/// Sets the test user's password on the server (existing connections stay logged in).
async fn set_password(user: &TestUser, password: &str) {
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(&user.user)
        .arg("resetpass")
        .arg(format!(">{password}"))
        .query_async(&mut user.admin.clone())
        .await
        .unwrap();
}

#[tokio::test]
async fn a_password_fixed_on_the_server_serves_the_next_event_without_a_restart() {
    let user = TestUser::create().await;
    let setup = Setup::new();
    let cfg = redis_dest(
        &user.url(),
        &user.key,
        "    timeout: 1s\n    retry: { max_attempts: 10, initial_delay: 10ms }\n",
    );
    let relay = TestRelay::start(setup.config(&cfg)).await;
    relay.send(&event("AUTH", "face-1")).await;
    user.wait_for(1, Duration::from_secs(10)).await;

    // The password changes and the relay's connection drops: its reconnect is refused.
    set_password(&user, "Other-pw7").await;
    assert!(user.kill_connections().await >= 1);
    relay.send(&event("AUTH", "face-2")).await;
    eventually("dead-lettered", || count(&setup, "dead") == 1).await;
    let (_, error) = the_dead_letter(&setup);
    assert!(error.contains("the Redis server refused"), "{error}");

    // Fixed on the server: the next event goes through on a new connection.
    set_password(&user, &user.password).await;
    relay.send(&event("AUTH", "face-3")).await;
    eventually("the third event delivered", || count(&setup, "done") == 2).await;
    assert_eq!(user.len().await, 2);
    assert_eq!(count(&setup, "dead"), 1);
    relay.shutdown().await;
}

#[tokio::test]
async fn a_key_of_another_type_is_dead_lettered_at_once() {
    let user = TestUser::create().await;
    let _: () = user
        .admin
        .clone()
        .set(&user.key, "not a stream")
        .await
        .unwrap();
    let setup = Setup::new();
    let cfg = redis_dest(
        &user.url(),
        &user.key,
        "    retry: { max_attempts: 10, initial_delay: 10ms }\n",
    );
    let relay = TestRelay::start(setup.config(&cfg)).await;
    relay.send(&event("AUTH", "face-t")).await;
    eventually("dead-lettered", || count(&setup, "dead") == 1).await;
    let (attempts, error) = the_dead_letter(&setup);
    assert_eq!(attempts, 1, "not retried");
    assert!(error.contains("WRONGTYPE"), "{error}");
    relay.shutdown().await;
}

#[tokio::test]
async fn check_reports_refused_credentials_and_only_warns_about_an_unreachable_server() {
    let user = TestUser::create().await;
    let setup = Setup::new();
    let out = cli(
        &setup.write_config(&redis_dest(&user.url(), &user.key, "")),
        &["check"],
    )
    .await;
    assert!(out.ok(), "{}", out.all());
    assert!(
        out.stdout.contains("XADD to faceio-test-stream-"),
        "{}",
        out.all()
    );

    let wrong = format!("redis://{}:Wr0ng-s3cret@127.0.0.1:6379/0", user.user);
    let out = cli(
        &setup.write_config(&redis_dest(&wrong, &user.key, "")),
        &["check"],
    )
    .await;
    assert!(
        !out.ok(),
        "check passed refused credentials:\n{}",
        out.all()
    );
    assert!(
        out.stderr
            .contains("error: destination stream: the Redis server refused"),
        "{}",
        out.all()
    );
    assert!(!out.all().contains("Wr0ng-s3cret"), "{}", out.all());

    let down = format!("redis://u:Hidden-pw9@127.0.0.1:{}/0", free_port());
    let out = cli(&setup.write_config(&redis_dest(&down, "k", "")), &["check"]).await;
    assert!(
        out.ok(),
        "an unreachable server is not an error:\n{}",
        out.all()
    );
    assert!(
        out.stderr
            .contains("warning: destination stream: server not checked"),
        "{}",
        out.all()
    );
    assert!(!out.all().contains("Hidden-pw9"), "{}", out.all());
}
