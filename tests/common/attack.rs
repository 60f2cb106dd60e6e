//! Attackers and a FACEIO-like sender for the ingress-protection tests: connections
//! from a chosen loopback address (the whole 127.0.0.0/8 is local), idle HTTP/2
//! connections (raw, or answering PINGs through the `h2` client), HTTP/1 header
//! tricklers, floods of requests for other paths, and a sender at a fixed rate that
//! records every answer and its latency.
#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use faceio_relay::telemetry::error_chain;

use super::{TOKEN, event};

/// Where the attacks come from.
pub const ATTACKER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
/// Where FACEIO's requests come from.
pub const FACEIO: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
/// A third party (a health checker).
pub const MONITOR: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3));

/// The HTTP/2 connection preface and one empty SETTINGS frame.
pub const H2_PREFACE_AND_SETTINGS: &[u8] =
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

/// A TCP connection from `from` to `to`.
pub async fn connect_from(from: IpAddr, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(from, 0)).unwrap();
    socket.connect(to).await.expect("connects")
}

/// A reqwest client whose connections come from `from`.
pub fn client_from(from: IpAddr) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(from)
        .timeout(Duration::from_secs(6))
        .build()
        .unwrap()
}

/// Reads and discards until the peer closes (EOF or reset); false if it is still open
/// after `within`.
pub async fn closed_within<S: AsyncRead + Unpin>(stream: &mut S, within: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

/// An HTTP/2 client connection (SETTINGS acknowledged, PINGs answered) that never opens
/// a stream. The task ends when the server closes the connection.
pub fn h2_idle<S>(io: S) -> JoinHandle<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let Ok((send, conn)) = h2::client::handshake(io).await else {
            return;
        };
        let _ = conn.await;
        drop(send);
    })
}

/// Raw HTTP/2 idlers: preface + SETTINGS, then silence.
pub async fn raw_h2_idlers(n: usize, to: SocketAddr) -> Vec<TcpStream> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = connect_from(ATTACKER, to).await;
        // The relay may already have closed it (over the per-source cap).
        let _ = s.write_all(H2_PREFACE_AND_SETTINGS).await;
        out.push(s);
    }
    out
}

/// HTTP/1 clients that send the first bytes of a request and then nothing more.
pub async fn header_tricklers(n: usize, to: SocketAddr) -> Vec<TcpStream> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = connect_from(ATTACKER, to).await;
        let _ = s.write_all(b"POST /webhook HTTP/1.1\r\nHost: r").await;
        out.push(s);
    }
    out
}

/// Loops of `GET /` on keep-alive connections from the attacker until `stop`; returns
/// how many requests were answered with each status (0 = no answer).
pub fn not_found_flood(
    to: SocketAddr,
    tasks: usize,
    stop: CancellationToken,
) -> JoinHandle<Vec<(u16, usize)>> {
    tokio::spawn(async move {
        let mut handles = Vec::new();
        for _ in 0..tasks {
            let stop = stop.clone();
            handles.push(tokio::spawn(async move {
                let client = client_from(ATTACKER);
                let mut seen = std::collections::BTreeMap::<u16, usize>::new();
                while !stop.is_cancelled() {
                    let status = match client.get(format!("http://{to}/")).send().await {
                        Ok(r) => r.status().as_u16(),
                        Err(_) => 0,
                    };
                    *seen.entry(status).or_default() += 1;
                }
                seen
            }));
        }
        let mut all = std::collections::BTreeMap::<u16, usize>::new();
        for h in handles {
            for (k, v) in h.await.unwrap() {
                *all.entry(k).or_default() += v;
            }
        }
        all.into_iter().collect()
    })
}

/// What a paced sender saw.
#[derive(Debug, Default)]
pub struct SenderReport {
    /// Status of each request (0 = no answer), in send order.
    pub statuses: Vec<u16>,
    /// Latency of each answered request.
    pub latencies: Vec<Duration>,
    /// Why each unanswered request failed (the client's error with its sources, and after
    /// how long), in send order: a failure names its cause (timeout, reset, refused).
    pub failures: Vec<String>,
}

impl SenderReport {
    pub fn non_200(&self) -> usize {
        self.statuses.iter().filter(|&&s| s != 200).count()
    }

    /// Prints the figures under `label` and asserts what FACEIO must see under attack:
    /// only 200s, with a p99 below `p99_bound`.
    pub fn assert_unharmed(&self, label: &str, p99_bound: Duration) {
        println!(
            "{label}: {} requests, {} not 200, p99 {:?}",
            self.statuses.len(),
            self.non_200(),
            self.p99()
        );
        assert_eq!(
            self.non_200(),
            0,
            "{label}: {} of {} not answered 200 ({})",
            self.non_200(),
            self.statuses.len(),
            self.why()
        );
        assert!(self.p99() < p99_bound, "{label}: p99 {:?}", self.p99());
    }

    /// The statuses other than 200 with their counts, and the first few failures' causes.
    pub fn why(&self) -> String {
        let mut counts = std::collections::BTreeMap::<u16, usize>::new();
        for &s in self.statuses.iter().filter(|&&s| s != 200) {
            *counts.entry(s).or_default() += 1;
        }
        format!(
            "statuses {counts:?} (0 = no answer); first failures: {:?}",
            &self.failures[..self.failures.len().min(5)]
        )
    }

    /// The 99th-percentile latency.
    pub fn p99(&self) -> Duration {
        let mut l = self.latencies.clone();
        l.sort();
        l.get((l.len() * 99 / 100).min(l.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    }
}

/// Posts authenticated events with `client` to `url` at `per_second` for `duration`
/// (open loop: each request on its own task, as FACEIO's independent webhooks).
pub async fn paced_sender(
    client: reqwest::Client,
    url: String,
    per_second: u32,
    duration: Duration,
) -> SenderReport {
    let client = Arc::new(client);
    let mut tick = tokio::time::interval(Duration::from_secs(1) / per_second);
    let started = Instant::now();
    let mut tasks = Vec::new();
    let mut i = 0u64;
    while started.elapsed() < duration {
        tick.tick().await;
        i += 1;
        let client = Arc::clone(&client);
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let sent = client
                .post(&url)
                .header("WWW-Authenticate", format!("Bearer {TOKEN}"))
                .json(&event("AUTH", &format!("paced-{i}")))
                .send()
                .await;
            match sent {
                Ok(r) => (r.status().as_u16(), Ok(t.elapsed())),
                Err(e) => (
                    0,
                    Err(format!("after {:?}: {}", t.elapsed(), error_chain(&e))),
                ),
            }
        }));
    }
    let mut report = SenderReport::default();
    for t in tasks {
        let (status, outcome) = t.await.unwrap();
        report.statuses.push(status);
        match outcome {
            Ok(latency) => report.latencies.push(latency),
            Err(why) => report.failures.push(why),
        }
    }
    report
}

/// Waits (bounded) until the relay's open ingress connections satisfy `want`.
pub async fn open_ingress_connections_until(
    admin: SocketAddr,
    what: &str,
    want: impl Fn(f64) -> bool,
) {
    let series = "faceio_relay_connections_open{listener=\"ingress\"}";
    let deadline = Instant::now() + super::WAIT;
    loop {
        let open = super::metric(&super::metrics_text(admin).await, series).unwrap_or(0.0);
        if want(open) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for: {what} ({open} open)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How many attacking connections are still open at `deadline`: `sockets` the relay has
/// not closed, and client tasks (such as [`h2_idle`]) that have not ended.
pub async fn still_open_at<S: AsyncRead + Unpin>(
    deadline: Instant,
    sockets: &mut [S],
    tasks: Vec<JoinHandle<()>>,
) -> usize {
    // Every wait gets at least a moment, so a socket closed just in time is seen.
    let left = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(10))
    };
    let mut open = 0;
    for s in sockets.iter_mut() {
        if !closed_within(s, left()).await {
            open += 1;
        }
    }
    for t in tasks {
        if tokio::time::timeout(left(), t).await.is_err() {
            open += 1;
        }
    }
    open
}
