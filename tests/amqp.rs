//! `type: amqp` against the local RabbitMQ (127.0.0.1:5672, guest/guest; `.ci/run`
//! starts it): every event confirmed into its queue once with its properties, through
//! cut connections; a missing exchange, an unroutable key and a wrong password
//! dead-lettered at once; `check` asks the broker.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use common::proc::cli;
use common::proxy::Proxy;
use common::queues::*;
use common::*;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};

const AMQP: &str = "127.0.0.1:5672";

fn url(at: &str) -> String {
    vhost_url(at, "%2f")
}

fn vhost_url(at: &str, vhost: &str) -> String {
    format!("amqp://guest:guest@{at}/{vhost}")
}

/// An exchange and a queue bound to it (`#`) of the test's own; `cleanup` deletes both.
struct TestQueue {
    channel: Channel,
    _connection: Connection,
    exchange: String,
    queue: String,
}

impl TestQueue {
    async fn create(bind: bool) -> Self {
        Self::create_in(&url(AMQP), bind).await
    }

    /// In the vhost `url` names.
    async fn create_in(url: &str, bind: bool) -> Self {
        let connection = Connection::connect(url, ConnectionProperties::default())
            .await
            .expect("RabbitMQ on 127.0.0.1:5672 answers (.ci/run starts it)");
        let channel = connection.create_channel().await.unwrap();
        let id = uuid::Uuid::now_v7().simple().to_string();
        let exchange = format!("faceio-test-{id}");
        let queue = format!("faceio-test-{id}");
        channel
            .exchange_declare(
                exchange.as_str().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        if bind {
            channel
                .queue_bind(
                    queue.as_str().into(),
                    exchange.as_str().into(),
                    "#".into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .unwrap();
        }
        Self {
            channel,
            _connection: connection,
            exchange,
            queue,
        }
    }

    /// A new connection to the same exchange and queue (after the broker closed ours).
    async fn reopen(url: &str, old: &TestQueue) -> Self {
        let connection = Connection::connect(url, ConnectionProperties::default())
            .await
            .unwrap();
        let channel = connection.create_channel().await.unwrap();
        Self {
            channel,
            _connection: connection,
            exchange: old.exchange.clone(),
            queue: old.queue.clone(),
        }
    }

    async fn len(&self) -> u32 {
        self.channel
            .queue_declare(
                self.queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap()
            .message_count()
    }

    async fn wait_for(&self, n: u32, within: Duration) {
        wait_for_count("messages in the queue", n, within, async || {
            self.len().await
        })
        .await
    }

    /// Takes every message, in queue order.
    async fn take_all(&self) -> Vec<lapin::message::Delivery> {
        let mut out = Vec::new();
        while let Some(m) = self
            .channel
            .basic_get(self.queue.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            out.push(m.delivery);
        }
        out
    }

    async fn cleanup(self) {
        let _ = self
            .channel
            .queue_delete(self.queue.as_str().into(), QueueDeleteOptions::default())
            .await;
        let _ = self
            .channel
            .exchange_delete(
                self.exchange.as_str().into(),
                ExchangeDeleteOptions::default(),
            )
            .await;
    }
}

fn amqp_dest(url: &str, exchange: &str, extra: &str) -> String {
    format!(
        "destinations:\n  amqp:\n    type: amqp\n    url: {url}\n    exchange: {exchange}\n    \
         routing_key: \"faceio.{{{{ eventName | lower }}}}\"\n{extra}routes:\n  - to: [amqp]\n"
    )
}

fn header(m: &lapin::message::Delivery, name: &str) -> String {
    let headers = m.properties.headers().as_ref().expect("headers");
    match headers.inner().get(name) {
        Some(AMQPValue::LongString(s)) => s.to_string(),
        other => panic!("header {name}: {other:?}"),
    }
}

#[tokio::test]
async fn a_thousand_events_are_confirmed_once_in_order_with_their_properties() {
    let q = TestQueue::create(true).await;
    let setup = Setup::new();
    let cfg = amqp_dest(&url(AMQP), &q.exchange, "    concurrency: 1\n");
    let relay = TestRelay::start(setup.config(&cfg)).await;
    let sent = send_in_order(&relay, 1000).await;
    q.wait_for(1000, Duration::from_secs(60)).await;
    eventually("every delivery done", || count(&setup, "done") == 1000).await;
    let messages = q.take_all().await;
    assert_eq!(messages.len(), 1000, "exactly once");
    let events = stored_ids(&setup);
    for (i, m) in messages.iter().enumerate() {
        assert_eq!(
            m.data,
            sent[i].to_string().as_bytes(),
            "message {i}: byte for byte, in order"
        );
        let name = sent[i]["eventName"].as_str().unwrap();
        assert_eq!(
            m.routing_key.as_str(),
            format!("faceio.{}", name.to_lowercase())
        );
        let p = &m.properties;
        assert_eq!(p.message_id().as_ref().unwrap().as_str(), events[i].0);
        assert_eq!(
            p.content_type().as_ref().unwrap().as_str(),
            "application/json"
        );
        assert_eq!(*p.delivery_mode(), Some(2), "persistent");
        assert_eq!(header(m, "event_id"), events[i].0);
        assert_eq!(header(m, "event_name"), name);
        assert_eq!(header(m, "app_id"), APP);
    }
    relay.shutdown().await;
    q.cleanup().await;
}

#[tokio::test]
async fn connections_cut_while_200_events_a_second_flow_lose_nothing() {
    let q = TestQueue::create(true).await;
    let proxy = Proxy::start(AMQP.parse().unwrap()).await;
    let setup = Setup::new();
    let cfg = amqp_dest(
        &url(&proxy.addr.to_string()),
        &q.exchange,
        "    timeout: 1s\n    retry: { max_attempts: 100, initial_delay: 50ms, max_delay: 500ms }\n",
    );
    let relay = Arc::new(TestRelay::start(setup.config(&format!("{FLOW_INGRESS}{cfg}"))).await);
    let total = 600;
    // Each cut waits until the relay is connected (a message is in).
    let cuts = flow_with_interruptions(Arc::clone(&relay), total, &[200, 400], async || {
        q.wait_for(1, WAIT).await;
        proxy.cut() as i64
    })
    .await;
    assert!(cuts >= 2, "the proxy cut {cuts} live connections");
    eventually("every delivery done", || {
        count(&setup, "done") == total as i64
    })
    .await;
    assert_eq!(count(&setup, "dead"), 0);
    let messages = q.take_all().await;
    let ids: HashSet<String> = messages
        .iter()
        .map(|m| m.properties.message_id().as_ref().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), total, "every event is in the queue");
    // A second copy only where a confirm was lost (and the delivery tried again).
    let retried = retried(&setup);
    let duplicates = messages.len() - ids.len();
    assert!(
        duplicates as i64 <= retried,
        "{duplicates} duplicates, {retried} retried"
    );
    eprintln!("{retried} deliveries retried, {duplicates} duplicates");
    Arc::into_inner(relay).unwrap().shutdown().await;
    q.cleanup().await;
}

async fn dead_letter_of(url: &str, exchange: &str) -> (i64, String) {
    let setup = Setup::new();
    let cfg = amqp_dest(
        url,
        exchange,
        "    retry: { max_attempts: 10, initial_delay: 10ms }\n",
    );
    let relay = TestRelay::start(setup.config(&cfg)).await;
    relay.send(&event("AUTH", "face-x")).await;
    eventually("dead-lettered", || count(&setup, "dead") == 1).await;
    relay.shutdown().await;
    let dead = the_dead_letter(&setup);
    eprintln!("dead letter: {dead:?}");
    dead
}

#[tokio::test]
async fn a_missing_exchange_is_dead_lettered_at_once() {
    let exchange = format!("faceio-test-missing-{}", uuid::Uuid::now_v7().simple());
    let (attempts, error) = dead_letter_of(&url(AMQP), &exchange).await;
    assert_eq!(attempts, 1, "not retried");
    assert!(
        error.contains(&format!("NOT_FOUND - no exchange '{exchange}'")),
        "{error}"
    );
}

#[tokio::test]
async fn an_unroutable_message_is_dead_lettered_at_once() {
    let q = TestQueue::create(false).await;
    let (attempts, error) = dead_letter_of(&url(AMQP), &q.exchange).await;
    assert_eq!(attempts, 1, "not retried");
    assert!(
        error.contains("routes key `faceio.auth` to no queue"),
        "{error}"
    );
    q.cleanup().await;
}

#[tokio::test]
async fn a_wrong_password_is_dead_lettered_at_once_without_showing_it() {
    let q = TestQueue::create(true).await;
    let wrong = format!("amqp://guest:Wr0ng-s3cret@{AMQP}/%2f");
    let (attempts, error) = dead_letter_of(&wrong, &q.exchange).await;
    assert_eq!(attempts, 1, "not retried");
    assert!(error.contains("the broker refused"), "{error}");
    assert!(!error.contains("Wr0ng-s3cret"), "{error}");
    q.cleanup().await;
}

#[tokio::test]
async fn check_reports_a_missing_exchange_and_only_warns_about_an_unreachable_broker() {
    let q = TestQueue::create(true).await;
    let setup = Setup::new();
    let out = cli(
        &setup.write_config(&amqp_dest(&url(AMQP), &q.exchange, "")),
        &["check"],
    )
    .await;
    assert!(out.ok(), "{}", out.all());
    assert!(out.stdout.contains("publisher confirms"), "{}", out.all());

    let missing = format!("faceio-test-missing-{}", uuid::Uuid::now_v7().simple());
    let out = cli(
        &setup.write_config(&amqp_dest(&url(AMQP), &missing, "")),
        &["check"],
    )
    .await;
    assert!(!out.ok(), "check passed a missing exchange:\n{}", out.all());
    assert!(
        out.stderr.contains(&format!(
            "error: destination amqp: exchange `{missing}` does not exist"
        )),
        "{}",
        out.all()
    );

    let down = format!("amqp://guest:Hidden-pw9@127.0.0.1:{}/%2f", free_port());
    let out = cli(&setup.write_config(&amqp_dest(&down, "x", "")), &["check"]).await;
    assert!(
        out.ok(),
        "an unreachable broker is not an error:\n{}",
        out.all()
    );
    assert!(
        out.stderr
            .contains("warning: destination amqp: server not checked"),
        "{}",
        out.all()
    );
    assert!(!out.all().contains("Hidden-pw9"), "{}", out.all());
    q.cleanup().await;
}

/// `rabbitmqctl` (the broker's admin tool, run as root in CI), failing the test on error.
fn rabbitmqctl(args: &[&str]) -> String {
    let out = std::process::Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl is installed with the broker");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A vhost of the test's own (guest may use it), so the broker can close "its"
/// connections without touching other tests'.
struct TestVhost(String);

impl TestVhost {
    fn create() -> Self {
        let name = format!("faceio-test-{}", uuid::Uuid::now_v7().simple());
        rabbitmqctl(&["add_vhost", &name]);
        rabbitmqctl(&["set_permissions", "-p", &name, "guest", ".*", ".*", ".*"]);
        Self(name)
    }
}

/// `rabbitmqctl close_all_connections` for one vhost.
fn close_all_connections(vhost: &str) {
    rabbitmqctl(&[
        "close_all_connections",
        "--vhost",
        vhost,
        "--limit",
        "100",
        "faceio-relay test",
    ]);
}

impl Drop for TestVhost {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["delete_vhost", &self.0])
            .output();
    }
}

#[tokio::test]
async fn the_broker_closing_every_connection_while_events_flow_loses_nothing() {
    let vhost = TestVhost::create();
    let vurl = vhost_url(AMQP, &vhost.0);
    let q = TestQueue::create_in(&vurl, true).await;
    let setup = Setup::new();
    let cfg = amqp_dest(
        &vurl,
        &q.exchange,
        "    timeout: 1s\n    retry: { max_attempts: 100, initial_delay: 50ms, max_delay: 500ms }\n",
    );
    let relay = Arc::new(TestRelay::start(setup.config(&format!("{FLOW_INGRESS}{cfg}"))).await);
    let total = 600;
    let closed = flow_with_interruptions(Arc::clone(&relay), total, &[200, 400], async || {
        // The relay is connected once a message is in (read through a connection of
        // its own: the broker closes the test's connections in the vhost too).
        TestQueue::reopen(&vurl, &q).await.wait_for(1, WAIT).await;
        // rabbitmqctl blocks (it starts an Erlang VM): off the runtime's threads.
        let name = vhost.0.clone();
        tokio::task::spawn_blocking(move || close_all_connections(&name))
            .await
            .unwrap();
        1
    })
    .await;
    assert_eq!(closed, 2);
    eventually("every delivery done", || {
        count(&setup, "done") == total as i64
    })
    .await;
    assert_eq!(count(&setup, "dead"), 0);
    // The test's own reader was closed too: read through a new connection.
    let reader = TestQueue::reopen(&vurl, &q).await;
    let messages = reader.take_all().await;
    let ids: HashSet<String> = messages
        .iter()
        .map(|m| m.properties.message_id().as_ref().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), total, "every event is in the queue");
    let retried = retried(&setup);
    let duplicates = messages.len() - ids.len();
    assert!(
        duplicates as i64 <= retried,
        "{duplicates} duplicates, {retried} retried"
    );
    eprintln!("{retried} deliveries retried, {duplicates} duplicates");
    Arc::into_inner(relay).unwrap().shutdown().await;
}
