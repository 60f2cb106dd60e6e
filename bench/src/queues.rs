//! `loadgen --queues N`: the queue destinations' row (`nats`, `redis`, `amqp`). For each
//! kind in turn: a relay on a fresh SQLite store with one destination of that kind
//! (concurrency 64, as the HTTP rows) on the machine's own server, every event routed to
//! it; N events sent closed loop at concurrency 64; then the time until the server holds
//! all N (JetStream's message count, `XLEN`, the bound queue's depth), and the relay's
//! CPU over that time. The stream, key, exchange and queue are made for the run and
//! removed after it.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{Value, json};

use crate::load::{self, APP_ID, TOKEN};
use crate::relay::{self, DESTINATION_CONCURRENCY, RelayProc};
use crate::servers::Track;

const NATS: &str = "nats://127.0.0.1:4222";
const REDIS: &str = "redis://127.0.0.1:6379/0";
const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// How long the server may take to hold every event after the last answer.
const DRAIN_LIMIT: Duration = Duration::from_secs(120);

/// One kind's server side: made before the run, counted during it, removed after.
enum Server {
    Nats {
        js: async_nats::jetstream::Context,
        stream: String,
    },
    Redis {
        conn: redis::aio::MultiplexedConnection,
        key: String,
    },
    Amqp {
        channel: lapin::Channel,
        _connection: lapin::Connection,
        exchange: String,
        queue: String,
    },
}

impl Server {
    async fn open(kind: &str, tag: &str) -> anyhow::Result<Self> {
        Ok(match kind {
            "nats" => {
                let client = async_nats::connect(NATS)
                    .await
                    .context("NATS on 127.0.0.1:4222")?;
                let js = async_nats::jetstream::new(client);
                let stream = format!("loadgen_{tag}");
                js.create_stream(async_nats::jetstream::stream::Config {
                    name: stream.clone(),
                    subjects: vec![format!("loadgen{tag}.>")],
                    ..Default::default()
                })
                .await
                .context("JetStream on 127.0.0.1:4222")?;
                Server::Nats { js, stream }
            }
            "redis" => {
                let client = redis::Client::open(REDIS)?;
                let conn = client
                    .get_multiplexed_async_connection()
                    .await
                    .context("Redis on 127.0.0.1:6379")?;
                Server::Redis {
                    conn,
                    key: format!("loadgen-{tag}"),
                }
            }
            _ => {
                use lapin::options::{
                    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
                };
                use lapin::types::FieldTable;
                let connection =
                    lapin::Connection::connect(AMQP, lapin::ConnectionProperties::default())
                        .await
                        .context("RabbitMQ on 127.0.0.1:5672")?;
                let channel = connection.create_channel().await?;
                let (exchange, queue) = (format!("loadgen-{tag}"), format!("loadgen-{tag}"));
                channel
                    .exchange_declare(
                        exchange.as_str().into(),
                        lapin::ExchangeKind::Topic,
                        ExchangeDeclareOptions::default(),
                        FieldTable::default(),
                    )
                    .await?;
                channel
                    .queue_declare(
                        queue.as_str().into(),
                        QueueDeclareOptions::default(),
                        FieldTable::default(),
                    )
                    .await?;
                channel
                    .queue_bind(
                        queue.as_str().into(),
                        exchange.as_str().into(),
                        "#".into(),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await?;
                Server::Amqp {
                    channel,
                    _connection: connection,
                    exchange,
                    queue,
                }
            }
        })
    }

    /// The destination's settings after `type:`.
    fn settings(&self) -> String {
        match self {
            Server::Nats { stream, .. } => {
                let prefix = stream.replace("loadgen_", "loadgen");
                format!("    url: {NATS}\n    subject: \"{prefix}.{{{{eventName}}}}\"\n")
            }
            Server::Redis { key, .. } => format!("    url: {REDIS}\n    stream: {key}\n"),
            Server::Amqp { exchange, .. } => format!(
                "    url: {AMQP}\n    exchange: {exchange}\n    routing_key: \"{{{{eventName}}}}\"\n"
            ),
        }
    }

    async fn count(&mut self) -> anyhow::Result<u64> {
        Ok(match self {
            Server::Nats { js, stream } => {
                js.get_stream(stream.as_str())
                    .await?
                    .info()
                    .await?
                    .state
                    .messages
            }
            Server::Redis { conn, key } => redis::cmd("XLEN").arg(&*key).query_async(conn).await?,
            Server::Amqp { channel, queue, .. } => {
                let options = lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                };
                let q = channel
                    .queue_declare(queue.as_str().into(), options, Default::default())
                    .await?;
                u64::from(q.message_count())
            }
        })
    }

    async fn remove(self) {
        match self {
            Server::Nats { js, stream } => {
                let _ = js.delete_stream(stream.as_str()).await;
            }
            Server::Redis { mut conn, key } => {
                let _: redis::RedisResult<u64> =
                    redis::cmd("DEL").arg(&key).query_async(&mut conn).await;
            }
            Server::Amqp {
                channel,
                exchange,
                queue,
                ..
            } => {
                let _ = channel
                    .queue_delete(queue.as_str().into(), Default::default())
                    .await;
                let _ = channel
                    .exchange_delete(exchange.as_str().into(), Default::default())
                    .await;
            }
        }
    }
}

fn config(dir: &Path, kind: &str, server: &Server) -> anyhow::Result<std::path::PathBuf> {
    let yaml = format!(
        "# Written by loadgen --queues (BENCHMARKS.md).\n\
         listen: 127.0.0.1:0\n\
         admin_listen: off\n\
         ingress:\n  max_connections_per_ip: 1024\n\
         store:\n  path: {}\n\
         applications:\n  - app_id: {APP_ID}\n    token: {TOKEN}\n\
         destinations:\n  queue:\n    type: {kind}\n    concurrency: {DESTINATION_CONCURRENCY}\n{}\
         routes:\n  - to: [queue]\n",
        dir.join("relay.db").display(),
        server.settings()
    );
    let path = dir.join("relay.yaml");
    std::fs::write(&path, yaml)?;
    Ok(path)
}

/// One kind's row.
async fn row(bin: &Path, kind: &str, n: usize, sid: usize) -> anyhow::Result<Value> {
    let tag = format!("{}-{kind}", std::process::id());
    let mut server = Server::open(kind, &tag.replace('-', "_")).await?;
    let dir = tempfile::Builder::new()
        .prefix("loadgen-queues-")
        .tempdir_in(std::env::temp_dir())?;
    let (relay, _) = RelayProc::start(bin, &config(dir.path(), kind, &server)?)?;
    let pid = relay.pid();
    let (cpu0, t0) = (relay::cpu_time(pid), Instant::now());
    let outcome = load::closed_loop(
        relay.addr,
        sid,
        n,
        DESTINATION_CONCURRENCY,
        Arc::new(Track::new(n)),
    )
    .await;
    let answered = outcome.ok();
    let held = loop {
        let held = server.count().await?;
        if held >= answered || t0.elapsed() > DRAIN_LIMIT {
            break held;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let elapsed = t0.elapsed();
    let cpu = relay::cpu_time(pid) - cpu0;
    relay.stop()?;
    server.remove().await;
    let per_s = held as f64 / elapsed.as_secs_f64();
    let cpu_us = cpu.as_secs_f64() * 1e6 / held.max(1) as f64;
    println!(
        "| {kind} | {answered} | {held} | {:.0} | {per_s:.0} | {cpu_us:.0} |",
        answered as f64 / outcome.elapsed.as_secs_f64()
    );
    Ok(json!({
        "kind": kind,
        "sent": n,
        "answered_200": answered,
        "held_by_server": held,
        "ingest_req_per_s": (answered as f64 / outcome.elapsed.as_secs_f64()).round(),
        "delivered_per_s": per_s.round(),
        "relay_cpu_us_per_event": cpu_us.round(),
        "seconds": (elapsed.as_secs_f64() * 1000.0).round() / 1000.0,
    }))
}

/// `loadgen --queues N`: one row per queue kind, printed and written as JSON next to
/// `out` (`queues-latest.json`).
pub async fn run(bin: &Path, n: usize, out: &Path) -> anyhow::Result<()> {
    println!("queue destinations: {n} events each, closed loop at c={DESTINATION_CONCURRENCY}");
    println!(
        "| kind | answered 200 | held by the server | ingest req/s | delivered/s | relay CPU µs per event |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    let mut rows = Vec::new();
    for (i, kind) in ["nats", "redis", "amqp"].into_iter().enumerate() {
        rows.push(row(bin, kind, n, 900 + i).await?);
    }
    let report = json!({
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "concurrency": DESTINATION_CONCURRENCY,
        "rows": rows,
    });
    let path = out.with_file_name("queues-latest.json");
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&path, serde_json::to_string_pretty(&report)? + "\n")?;
    println!("wrote {}", path.display());
    Ok(())
}
