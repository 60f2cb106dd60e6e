//! The senders: FACEIO-like POSTs in a closed loop (fixed concurrency, fixed count) or an
//! open loop (fixed rate, sent on schedule whatever the answers).
//!
//! Open-loop latency is measured from each request's *scheduled* time, not from when it
//! was actually sent: a server that stalls makes the requests queued behind it late, and
//! measuring from the send would hide exactly that (coordinated omission).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, header};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::clock;
use crate::servers::{Track, facial_id};

pub const APP_ID: &str = "fioa-bench";
pub const TOKEN: &str = "bench-token-5f0c2a9e1d";

/// FACEIO's sender gives up after 6 s; so does this one.
pub const SENDER_TIMEOUT: Duration = Duration::from_secs(6);

/// Most connections the open loop opens (the relay's default cap is 1024).
const OPEN_LOOP_MAX_CONNECTIONS: usize = 1000;

/// Event `seq` of scenario `sid`: a mix of 20% ENROLL (with details), 70% AUTH and 10%
/// DELETION, like a production FACEIO application.
pub fn payload(sid: usize, seq: usize) -> Bytes {
    let face = facial_id(sid, seq);
    let ip = format!("203.0.{}.{}", (seq / 250) % 250, seq % 250 + 1);
    let body = match seq % 10 {
        0 | 1 => format!(
            r#"{{"eventName":"ENROLL","facialId":"{face}","appId":"{APP_ID}","clientIp":"{ip}","details":{{"timestamp":"2026-11-27","gender":"{}","age":{}}}}}"#,
            if seq.is_multiple_of(20) {
                "female"
            } else {
                "male"
            },
            18 + seq % 60
        ),
        9 => format!(
            r#"{{"eventName":"DELETION","facialId":"{face}","appId":"{APP_ID}","clientIp":"{ip}"}}"#
        ),
        _ => format!(
            r#"{{"eventName":"AUTH","facialId":"{face}","appId":"{APP_ID}","clientIp":"{ip}"}}"#
        ),
    };
    Bytes::from(body)
}

/// What one load run measured.
pub struct Outcome {
    /// Answers 200, with their latency in microseconds.
    pub acks: Histogram<u64>,
    /// Everything that was not a 200: `HTTP 503`, `timeout`, `connect: …`.
    pub failures: BTreeMap<String, u64>,
    /// From the first send (or scheduled send) to the last answer.
    pub elapsed: Duration,
}

impl Outcome {
    pub fn ok(&self) -> u64 {
        self.acks.len()
    }
}

fn histogram() -> Histogram<u64> {
    // 1 µs .. 60 s, 3 significant figures.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")
}

type Conn = SendRequest<Full<Bytes>>;

async fn connect(addr: SocketAddr) -> anyhow::Result<Conn> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// Sends one event; the result is the status or why there is none.
async fn send_one(conn: &mut Conn, addr: SocketAddr, body: Bytes) -> Result<u16, String> {
    let req = Request::post("/webhook")
        .header(header::HOST, addr.to_string())
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::WWW_AUTHENTICATE, format!("Bearer {TOKEN}"))
        .body(Full::new(body))
        .map_err(|e| e.to_string())?;
    let exchange = async {
        if conn.ready().await.is_err() {
            // Closed by the server before this request was written: a new connection.
            *conn = connect(addr).await.map_err(|e| format!("reconnect: {e}"))?;
            conn.ready().await.map_err(|e| format!("connection: {e}"))?;
        }
        let resp = conn
            .send_request(req)
            .await
            .map_err(|e| format!("request: {e}"))?;
        let status = resp.status().as_u16();
        resp.into_body()
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?;
        Ok(status)
    };
    match tokio::time::timeout(SENDER_TIMEOUT, exchange).await {
        Ok(r) => r,
        Err(_) => Err("timeout (6 s)".into()),
    }
}

fn record(
    result: Result<u16, String>,
    latency: Duration,
    origin_ns: u64,
    seq: usize,
    track: &Track,
    acks: &mut Histogram<u64>,
    failures: &mut BTreeMap<String, u64>,
) -> bool {
    match result {
        Ok(200) => {
            acks.saturating_record(latency.as_micros().max(1) as u64);
            track.origin_ns[seq].store(origin_ns.max(1), Ordering::Relaxed);
            true
        }
        Ok(status) => {
            *failures.entry(format!("HTTP {status}")).or_default() += 1;
            true
        }
        Err(e) => {
            *failures.entry(e).or_default() += 1;
            false
        }
    }
}

/// `concurrency` senders, each on its own keep-alive connection, send events
/// `0..count` of scenario `sid` as fast as answers come back.
///
/// The connections are opened one after the other before the clock starts: this
/// measures requests, not a burst of `concurrency` simultaneous connects (which
/// overflows a listen backlog of 128 and costs a 1 s SYN retransmit; BENCHMARKS.md).
pub async fn closed_loop(
    addr: SocketAddr,
    sid: usize,
    count: usize,
    concurrency: usize,
    track: Arc<Track>,
) -> Outcome {
    let next = Arc::new(AtomicUsize::new(0));
    let mut conns = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        conns.push(connect(addr).await.ok());
    }
    let started = Instant::now();
    let mut workers = Vec::new();
    for conn in conns {
        let (next, track) = (Arc::clone(&next), Arc::clone(&track));
        workers.push(tokio::spawn(async move {
            let mut acks = histogram();
            let mut failures = BTreeMap::new();
            let mut conn: Option<Conn> = conn;
            loop {
                let seq = next.fetch_add(1, Ordering::Relaxed);
                if seq >= count {
                    break;
                }
                let body = payload(sid, seq);
                let origin = clock::now_ns();
                let t0 = Instant::now();
                let result = match conn.as_mut() {
                    Some(c) => send_one(c, addr, body).await,
                    None => match connect(addr).await {
                        Ok(mut c) => {
                            let r = send_one(&mut c, addr, body).await;
                            conn = Some(c);
                            r
                        }
                        Err(e) => Err(format!("connect: {e}")),
                    },
                };
                if !record(
                    result,
                    t0.elapsed(),
                    origin,
                    seq,
                    &track,
                    &mut acks,
                    &mut failures,
                ) {
                    conn = None;
                }
            }
            (acks, failures)
        }));
    }
    let mut out = Outcome {
        acks: histogram(),
        failures: BTreeMap::new(),
        elapsed: Duration::ZERO,
    };
    for w in workers {
        let (acks, failures) = w.await.expect("sender task");
        out.acks.add(&acks).expect("same bounds");
        for (k, v) in failures {
            *out.failures.entry(k).or_default() += v;
        }
    }
    out.elapsed = started.elapsed();
    out
}

/// Sends events `0..count` of scenario `sid` at `rate` per second on schedule, whatever
/// the answers: a late answer does not delay the next send.
pub async fn open_loop(
    addr: SocketAddr,
    sid: usize,
    count: usize,
    rate: f64,
    track: Arc<Track>,
) -> Outcome {
    let pool: Arc<Mutex<Vec<Conn>>> = Arc::new(Mutex::new(Vec::new()));
    let slots = Arc::new(Semaphore::new(OPEN_LOOP_MAX_CONNECTIONS));
    let acks = Arc::new(Mutex::new(histogram()));
    let failures = Arc::new(Mutex::new(BTreeMap::new()));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(count);
    for seq in 0..count {
        let scheduled = start + Duration::from_secs_f64(seq as f64 / rate);
        tokio::time::sleep_until(scheduled).await;
        let origin = clock::at(scheduled.into_std());
        let (pool, slots, acks, failures, track) = (
            Arc::clone(&pool),
            Arc::clone(&slots),
            Arc::clone(&acks),
            Arc::clone(&failures),
            Arc::clone(&track),
        );
        tasks.push(tokio::spawn(async move {
            let _slot = slots.acquire_owned().await.expect("semaphore open");
            let body = payload(sid, seq);
            // A pooled connection the server has closed meanwhile (the relay closes
            // keep-alive connections idle past its header timeout) is not used: like any
            // HTTP client, open a new one; the request was never sent on it.
            let pooled = {
                let mut pool = pool.lock().unwrap();
                std::iter::from_fn(|| pool.pop()).find(|c: &Conn| !c.is_closed())
            };
            let mut conn = match pooled {
                Some(c) => Some(c),
                None => connect(addr).await.ok(),
            };
            let result = match conn.as_mut() {
                Some(c) => send_one(c, addr, body).await,
                None => Err("connect failed".into()),
            };
            let latency = scheduled.elapsed();
            let mut local_failures = BTreeMap::new();
            let keep = record(
                result,
                latency,
                origin,
                seq,
                &track,
                &mut acks.lock().unwrap(),
                &mut local_failures,
            );
            for (k, v) in local_failures {
                *failures.lock().unwrap().entry(k).or_default() += v;
            }
            if keep && let Some(c) = conn {
                pool.lock().unwrap().push(c);
            }
        }));
    }
    for t in tasks {
        t.await.expect("sender task");
    }
    let elapsed = start.elapsed();
    let acks = std::mem::replace(&mut *acks.lock().unwrap(), histogram());
    let failures = std::mem::take(&mut *failures.lock().unwrap());
    Outcome {
        acks,
        failures,
        elapsed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_json_with_the_documented_mix() {
        let mut names = BTreeMap::new();
        for seq in 0..100 {
            let v: serde_json::Value = serde_json::from_slice(&payload(1, seq)).unwrap();
            assert_eq!(v["appId"], APP_ID);
            assert_eq!(v["facialId"], facial_id(1, seq));
            *names
                .entry(v["eventName"].as_str().unwrap().to_string())
                .or_insert(0) += 1;
        }
        assert_eq!(names["ENROLL"], 20);
        assert_eq!(names["AUTH"], 70);
        assert_eq!(names["DELETION"], 10);
    }
}
