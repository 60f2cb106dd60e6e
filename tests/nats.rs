//! `type: nats` against the local NATS server with JetStream (127.0.0.1:4222; `.ci/run`
//! starts it): every event acknowledged by its stream exactly once, through connection
//! drops; permanent errors dead-lettered at once; `check` asks the server.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream::Stream};
use common::proc::cli;
use common::proxy::Proxy;
use common::queues::*;
use common::*;

const NATS: &str = "127.0.0.1:4222";

/// A JetStream stream of its own for one test, deleted when dropped (also when the test
/// fails): subjects `<prefix>.>`.
struct TestStream {
    js: jetstream::Context,
    name: String,
    prefix: String,
}

impl TestStream {
    async fn create() -> Self {
        let client = async_nats::connect(NATS)
            .await
            .expect("the NATS server on 127.0.0.1:4222 answers (.ci/run starts it)");
        let js = jetstream::new(client);
        let id = uuid::Uuid::now_v7().simple().to_string();
        let name = format!("faceio_test_{id}");
        let prefix = format!("ft{id}");
        js.create_stream(jetstream::stream::Config {
            name: name.clone(),
            subjects: vec![format!("{prefix}.>")],
            ..Default::default()
        })
        .await
        .expect("JetStream is enabled on the local NATS server");
        Self { js, name, prefix }
    }

    async fn stream(&self) -> Stream {
        self.js.get_stream(&self.name).await.unwrap()
    }

    async fn count(&self) -> u64 {
        self.stream().await.info().await.unwrap().state.messages
    }

    /// Every message, in stream order.
    async fn messages(&self) -> Vec<jetstream::message::StreamMessage> {
        let stream = self.stream().await;
        let n = self.count().await;
        let mut out = Vec::new();
        for seq in 1..=n {
            out.push(stream.get_raw_message(seq).await.unwrap());
        }
        out
    }

    async fn wait_for(&self, n: u64, within: Duration) {
        wait_for_count("messages in the stream", n, within, async || {
            self.count().await
        })
        .await
    }
}

/// Deletes the stream, also when the test fails. Drop cannot await: a thread with a
/// runtime of its own does it.
impl Drop for TestStream {
    fn drop(&mut self) {
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async {
                if let Ok(client) = async_nats::connect(NATS).await {
                    let _ = jetstream::new(client).delete_stream(&name).await;
                }
            });
        })
        .join();
    }
}

fn nats_dest(url: &str, subject: &str, extra: &str) -> String {
    format!(
        "destinations:\n  bus:\n    type: nats\n    url: {url}\n    subject: \"{subject}\"\n{extra}\
         routes:\n  - to: [bus]\n"
    )
}

fn header(m: &jetstream::message::StreamMessage, name: &str) -> String {
    m.headers
        .get(name)
        .unwrap_or_else(|| panic!("header {name} missing"))
        .to_string()
}

#[tokio::test]
async fn a_thousand_events_arrive_once_in_order_with_their_ids() {
    let stream = TestStream::create().await;
    let setup = Setup::new();
    let cfg = nats_dest(
        &format!("nats://{NATS}"),
        &format!("{}.{{{{ eventName | lower }}}}", stream.prefix),
        "    concurrency: 1\n",
    );
    let relay = TestRelay::start(setup.config(&cfg)).await;
    let mut sent = Vec::new();
    for i in 0..1000 {
        let e = event(
            if i % 2 == 0 { "AUTH" } else { "ENROLL" },
            &format!("face-{i}"),
        );
        let (status, _) = relay.send(&e).await;
        assert_eq!(status, 200);
        sent.push(e);
    }
    stream.wait_for(1000, Duration::from_secs(60)).await;
    eventually("every delivery done", || count(&setup, "done") == 1000).await;
    let messages = stream.messages().await;
    assert_eq!(messages.len(), 1000, "exactly once");
    let ids: Vec<String> = stored_ids(&setup).into_iter().map(|(id, _)| id).collect();
    for (i, m) in messages.iter().enumerate() {
        let body: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(
            body, sent[i],
            "message {i}: the FACEIO body, in the order received"
        );
        assert_eq!(m.payload, sent[i].to_string().as_bytes(), "byte for byte");
        let name = sent[i]["eventName"].as_str().unwrap().to_lowercase();
        assert_eq!(m.subject.as_str(), format!("{}.{name}", stream.prefix));
        assert_eq!(header(m, "Nats-Msg-Id"), ids[i]);
        assert_eq!(header(m, "Faceio-Relay-Event-Id"), ids[i]);
    }
    relay.shutdown().await;
}

#[tokio::test]
async fn connections_cut_while_200_events_a_second_flow_lose_and_duplicate_nothing() {
    let stream = TestStream::create().await;
    let proxy = Proxy::start(NATS.parse().unwrap()).await;
    let setup = Setup::new();
    let cfg = nats_dest(
        &format!("nats://{}", proxy.addr),
        &format!("{}.events", stream.prefix),
        "    timeout: 1s\n    retry: { max_attempts: 100, initial_delay: 50ms, max_delay: 500ms }\n",
    );
    let relay = Arc::new(TestRelay::start(setup.config(&format!("{FLOW_INGRESS}{cfg}"))).await);
    let total = 600;
    // Each cut waits until the relay is connected (a message is in), so it cuts a live
    // connection.
    let cuts = flow_with_interruptions(Arc::clone(&relay), total, &[200, 400], async || {
        stream.wait_for(1, WAIT).await;
        proxy.cut() as i64
    })
    .await;
    assert!(cuts >= 2, "the proxy cut {cuts} live connections");
    stream.wait_for(total as u64, Duration::from_secs(60)).await;
    eventually("every delivery done", || {
        count(&setup, "done") == total as i64
    })
    .await;
    assert_eq!(count(&setup, "dead"), 0);
    let messages = stream.messages().await;
    let ids: HashSet<String> = messages.iter().map(|m| header(m, "Nats-Msg-Id")).collect();
    assert_eq!(messages.len(), total, "no duplicate in the stream");
    assert_eq!(ids.len(), total, "every event once");
    let retried = retried(&setup);
    eprintln!("{retried} deliveries needed more than one attempt");
    Arc::into_inner(relay).unwrap().shutdown().await;
}

#[tokio::test]
async fn a_subject_no_stream_stores_is_dead_lettered_at_once_with_the_reason() {
    let setup = Setup::new();
    let subject = format!("nostream{}.x", uuid::Uuid::now_v7().simple());
    let cfg = nats_dest(
        &format!("nats://{NATS}"),
        &subject,
        "    retry: { max_attempts: 10, initial_delay: 10ms }\n",
    );
    let relay = TestRelay::start(setup.config(&cfg)).await;
    relay.send(&event("AUTH", "face-x")).await;
    eventually("dead-lettered", || count(&setup, "dead") == 1).await;
    let (attempts, error) = the_dead_letter(&setup);
    assert_eq!(attempts, 1, "not retried");
    assert!(
        error.contains("no JetStream stream stores subject"),
        "{error}"
    );
    assert!(error.contains(&subject), "{error}");
    relay.shutdown().await;
}

/// A NATS server of the test's own on a free port, which the test may restart.
struct PrivateServer {
    child: std::process::Child,
    port: u16,
    args: Vec<String>,
}

impl PrivateServer {
    async fn start(args: &[&str]) -> Self {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let port = free_port();
        let child = Self::spawn(port, &args).await;
        Self { child, port, args }
    }

    async fn spawn(port: u16, args: &[String]) -> std::process::Child {
        let child = std::process::Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nats-server is installed (it serves 127.0.0.1:4222)");
        let deadline = Instant::now() + WAIT;
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "nats-server did not listen");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        child
    }

    /// Stops the server at once (SIGKILL: no goodbye to its clients).
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again on the same port with other arguments.
    async fn start_with(&mut self, args: &[&str]) {
        self.args = args.iter().map(|a| a.to_string()).collect();
        self.start_again().await;
    }

    /// Starts it again on the same port with the same arguments (and store).
    async fn start_again(&mut self) {
        self.child = Self::spawn(self.port, &self.args).await;
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn a_server_down_for_half_a_second_twice_while_200_events_a_second_flow_lose_and_duplicate_nothing()
 {
    let store = tempfile::tempdir().unwrap();
    let mut server = PrivateServer::start(&["-js", "-sd", store.path().to_str().unwrap()]).await;
    let url = format!("nats://127.0.0.1:{}", server.port);
    let js = jetstream::new(async_nats::connect(url.as_str()).await.unwrap());
    js.create_stream(jetstream::stream::Config {
        name: "RESTARTS".into(),
        subjects: vec!["restarts.>".into()],
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    })
    .await
    .unwrap();
    let setup = Setup::new();
    let cfg = nats_dest(
        &url,
        "restarts.{{ eventName | lower }}",
        "    timeout: 1s\n    retry: { max_attempts: 100, initial_delay: 50ms, max_delay: 500ms }\n",
    );
    let relay = Arc::new(TestRelay::start(setup.config(&format!("{FLOW_INGRESS}{cfg}"))).await);
    let total = 600;
    // Down for 100 events (half a second) twice, while the flow goes on.
    let mut down = false;
    let restarts = flow_with_interruptions(
        Arc::clone(&relay),
        total,
        &[200, 300, 400, 500],
        async || {
            down = !down;
            if down {
                server.kill();
                0
            } else {
                server.start_again().await;
                1
            }
        },
    )
    .await;
    assert_eq!(restarts, 2);
    eventually("every delivery done", || {
        count(&setup, "done") == total as i64
    })
    .await;
    assert_eq!(count(&setup, "dead"), 0, "nothing dead-lettered");
    let mut stream = js.get_stream("RESTARTS").await.unwrap();
    let stored = stream.info().await.unwrap().state.messages;
    let mut ids = HashSet::new();
    for seq in 1..=stored {
        let m = stream.get_raw_message(seq).await.unwrap();
        ids.insert(header(&m, "Nats-Msg-Id"));
    }
    assert_eq!(ids.len(), total, "every event is in the stream");
    assert_eq!(stored, total as u64, "and none twice (Nats-Msg-Id)");
    eprintln!("{} deliveries retried", retried(&setup));
    Arc::into_inner(relay).unwrap().shutdown().await;
}

#[tokio::test]
async fn a_wrong_password_is_dead_lettered_at_once_without_showing_it() {
    let server = PrivateServer::start(&["--user", "relay", "--pass", "right-password"]).await;
    let setup = Setup::new();
    let cfg = nats_dest(
        &format!("nats://relay:Wr0ng-s3cret@127.0.0.1:{}", server.port),
        "faceio.x",
        "    jetstream: false\n    retry: { max_attempts: 10, initial_delay: 10ms }\n",
    );
    let relay = TestRelay::start(setup.config(&cfg)).await;
    relay.send(&event("AUTH", "face-p")).await;
    eventually("dead-lettered", || count(&setup, "dead") == 1).await;
    let (attempts, error) = the_dead_letter(&setup);
    assert_eq!(attempts, 1, "not retried");
    assert!(error.contains("refused the credentials"), "{error}");
    assert!(!error.contains("Wr0ng-s3cret"), "{error}");
    relay.shutdown().await;
}

#[tokio::test]
async fn the_urls_password_logs_in_and_never_reaches_the_debug_log() {
    let server = PrivateServer::start(&["--user", "relay", "--pass", "Right-pw7"]).await;
    let setup = Setup::new();
    let cfg = nats_dest(
        &format!("nats://relay:Right-pw7@127.0.0.1:{}", server.port),
        "faceio.x",
        "    jetstream: false\n    retry: { max_attempts: 10, initial_delay: 10ms }\n",
    );
    let daemon = Daemon::start_with_env(&setup.write_config(&cfg), &[("RUST_LOG", "debug")]);
    daemon.accept("AUTH", "face-l").await;
    eventually("delivered with the URL's credentials", || {
        count(&setup, "done") == 1
    })
    .await;
    let log = daemon.log_text();
    // async-nats's debug line that names the server it connects to.
    assert!(log.contains("attempting connection"), "{log}");
    assert!(!log.contains("Right-pw7"), "{log}");
}

#[tokio::test]
async fn a_core_message_over_max_payload_is_dead_lettered_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("nats.conf");
    std::fs::write(&conf, "max_payload: 64\n").unwrap();
    let server = PrivateServer::start(&["-c", conf.to_str().unwrap()]).await;
    let setup = Setup::new();
    let cfg = nats_dest(
        &format!("nats://127.0.0.1:{}", server.port),
        "faceio.x",
        "    jetstream: false\n    retry: { max_attempts: 10, initial_delay: 10ms }\n",
    );
    let relay = TestRelay::start(setup.config(&cfg)).await;
    relay.send(&event("AUTH", "face-big")).await;
    eventually("dead-lettered", || count(&setup, "dead") == 1).await;
    let (attempts, error) = the_dead_letter(&setup);
    assert_eq!(attempts, 1, "not retried");
    assert!(error.contains("Payload size limit of 64"), "{error}");
    relay.shutdown().await;
}

#[tokio::test]
async fn core_nats_delivers_to_subscribers_when_jetstream_is_off() {
    let client = async_nats::connect(NATS).await.unwrap();
    let subject = format!("core{}.x", uuid::Uuid::now_v7().simple());
    let mut sub = client.subscribe(subject.clone()).await.unwrap();
    client.flush().await.unwrap();
    let setup = Setup::new();
    let cfg = nats_dest(
        &format!("nats://{NATS}"),
        &subject,
        "    jetstream: false\n",
    );
    let relay = TestRelay::start(setup.config(&cfg)).await;
    let e = event("ENROLL", "face-c");
    relay.send(&e).await;
    let m = tokio::time::timeout(WAIT, futures_next(&mut sub))
        .await
        .unwrap();
    assert_eq!(m.payload, e.to_string().as_bytes());
    let id = m
        .headers
        .unwrap()
        .get("Faceio-Relay-Event-Id")
        .unwrap()
        .to_string();
    eventually("done", || count(&setup, "done") == 1).await;
    let stored: String = setup
        .db()
        .query_row("SELECT id FROM events", [], |r| r.get(0))
        .unwrap();
    assert_eq!(id, stored);
    relay.shutdown().await;
}

async fn futures_next(sub: &mut async_nats::Subscriber) -> async_nats::Message {
    use futures_util::StreamExt;
    sub.next().await.expect("subscription open")
}

#[tokio::test]
async fn check_only_warns_when_jetstream_does_not_answer_the_lookup() {
    // A server without JetStream: the stream lookup has no responder, as when JetStream
    // is still starting or the user may not ask it; deliveries would retry.
    let server = PrivateServer::start(&[]).await;
    let setup = Setup::new();
    let cfg = nats_dest(
        &format!("nats://127.0.0.1:{}", server.port),
        "x.{{eventName}}",
        "",
    );
    let out = cli(&setup.write_config(&cfg), &["check"]).await;
    assert!(
        out.ok(),
        "a lookup not answered is not an error:\n{}",
        out.all()
    );
    assert!(
        out.stderr
            .contains("warning: destination bus: server not checked"),
        "{}",
        out.all()
    );
    assert!(
        out.stderr.contains("cannot look up the stream"),
        "{}",
        out.all()
    );
}

#[tokio::test]
async fn check_reports_a_missing_stream_and_only_warns_about_an_unreachable_server() {
    let stream = TestStream::create().await;
    let setup = Setup::new();
    let good = nats_dest(
        &format!("nats://{NATS}"),
        &format!("{}.{{{{eventName}}}}", stream.prefix),
        "",
    );
    let out = cli(&setup.write_config(&good), &["check"]).await;
    assert!(out.ok(), "{}", out.all());
    assert!(out.stdout.contains("JetStream"), "{}", out.all());

    let missing = nats_dest(&format!("nats://{NATS}"), "nostream.{{eventName}}", "");
    let out = cli(&setup.write_config(&missing), &["check"]).await;
    assert!(
        !out.ok(),
        "check passed a subject no stream stores:\n{}",
        out.all()
    );
    assert!(
        out.stderr
            .contains("destination bus: no JetStream stream stores subject `nostream."),
        "{}",
        out.all()
    );

    let down = nats_dest(
        &format!("nats://user:Hidden-pw9@127.0.0.1:{}", free_port()),
        "x.{{eventName}}",
        "",
    );
    let out = cli(&setup.write_config(&down), &["check"]).await;
    assert!(
        out.ok(),
        "an unreachable server is not an error:\n{}",
        out.all()
    );
    assert!(
        out.stderr
            .contains("warning: destination bus: server not checked"),
        "{}",
        out.all()
    );
    assert!(!out.all().contains("Hidden-pw9"), "{}", out.all());
}

#[tokio::test]
async fn a_second_attempt_of_one_event_is_not_stored_twice() {
    // What a retry after a lost ack does: publish the same event again. JetStream drops
    // it by its `Nats-Msg-Id`.
    let stream = TestStream::create().await;
    let setup = Setup::new();
    let config = setup.config(&nats_dest(
        &format!("nats://{NATS}"),
        &format!("{}.x", stream.prefix),
        "",
    ));
    let bus = faceio_relay::destinations::build(&config.destinations[0]).unwrap();
    let delivery = faceio_relay::store::Delivery {
        id: 1,
        event_id: "0199c0de-5a3e-7000-8000-000000000001".into(),
        destination: "bus".into(),
        attempts: 0,
        received_at_ms: 0,
        body: event("AUTH", "face-d").to_string().into(),
        claim: None,
    };
    bus.deliver(&delivery).await.unwrap();
    let again = faceio_relay::store::Delivery {
        attempts: 1,
        ..delivery
    };
    bus.deliver(&again).await.unwrap();
    assert_eq!(stream.count().await, 1);
}

#[tokio::test]
async fn jetstream_not_answering_yet_is_retried_not_dead_lettered() {
    // A publish nobody answers is permanent only when JetStream says the stream does
    // not exist; a server without JetStream (yet) cannot say, so it is retried. The
    // stream exists in the store the server gets back later.
    let store = tempfile::tempdir().unwrap();
    let with_jetstream = ["-js", "-sd", store.path().to_str().unwrap()];
    let mut server = PrivateServer::start(&with_jetstream).await;
    let url = format!("nats://127.0.0.1:{}", server.port);
    let stream_config = jetstream::stream::Config {
        name: "LATER".into(),
        subjects: vec!["later.>".into()],
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    };
    jetstream::new(async_nats::connect(url.as_str()).await.unwrap())
        .create_stream(stream_config)
        .await
        .unwrap();
    server.kill();
    server.start_with(&[]).await;

    let setup = Setup::new();
    let cfg = nats_dest(
        &url,
        "later.x",
        "    retry: { max_attempts: 1000, initial_delay: 20ms, max_delay: 100ms }\n",
    );
    let relay = TestRelay::start(setup.config(&cfg)).await;
    relay.send(&event("AUTH", "face-l")).await;
    let last_error = || -> (i64, String) {
        setup
            .db()
            .query_row(
                "SELECT attempts, COALESCE(last_error, '') FROM deliveries",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap()
    };
    eventually("two failed attempts", || last_error().0 >= 2).await;
    assert_eq!(count(&setup, "dead"), 0);
    assert!(
        last_error().1.contains("JetStream is not answering"),
        "{:?}",
        last_error()
    );

    server.kill();
    server.start_with(&with_jetstream).await;
    let deadline = Instant::now() + WAIT;
    while count(&setup, "done") != 1 {
        assert!(
            Instant::now() < deadline,
            "not delivered: {:?}",
            last_error()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let js = jetstream::new(async_nats::connect(url.as_str()).await.unwrap());
    let mut stream = js.get_stream("LATER").await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 1);
    relay.shutdown().await;
}
