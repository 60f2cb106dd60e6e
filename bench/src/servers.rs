//! The local servers of a run: the baseline (answers 200 and does nothing else), the
//! forwarder (sends each body on to the sink, then answers 200: the HTTP work any relay
//! that delivers by HTTP must do, and nothing else) and the sink (the relay's HTTP
//! destination: answers 200 and records when each event arrived, matched to its send
//! time by the Facial ID it carries).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::clock;

/// What one scenario sent and what reached the sink, indexed by sequence number.
pub struct Track {
    /// Latency origin (ns on [`clock`]) of each event answered 200; 0 = not answered 200.
    pub origin_ns: Vec<AtomicU64>,
    /// First arrival at the sink (ns on [`clock`]); 0 = not arrived.
    pub arrived_ns: Vec<AtomicU64>,
    /// Distinct events that arrived.
    pub arrivals: AtomicU64,
    /// Arrivals of an event that had already arrived (at-least-once).
    pub duplicates: AtomicU64,
}

impl Track {
    pub fn new(n: usize) -> Self {
        Self {
            origin_ns: (0..n).map(|_| AtomicU64::new(0)).collect(),
            arrived_ns: (0..n).map(|_| AtomicU64::new(0)).collect(),
            arrivals: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
        }
    }
}

/// The Facial ID of event `seq` of scenario `sid`; the sink parses it back.
pub fn facial_id(sid: usize, seq: usize) -> String {
    format!("bench-{sid}-{seq}")
}

fn parse_facial_id(body: &[u8]) -> Option<(usize, usize)> {
    const KEY: &[u8] = b"\"facialId\":\"bench-";
    let at = body.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    let rest = &body[at..];
    let end = rest.iter().position(|&b| b == b'"')?;
    let text = std::str::from_utf8(&rest[..end]).ok()?;
    let (sid, seq) = text.split_once('-')?;
    Some((sid.parse().ok()?, seq.parse().ok()?))
}

/// The sink's state: the scenarios it records for, and whether it answers at all.
pub struct Sink {
    pub addr: SocketAddr,
    tracks: RwLock<Vec<Option<Arc<Track>>>>,
    /// False while the sink is "down": requests are held unanswered until it is up.
    up: watch::Sender<bool>,
    /// Requests that named no known scenario (should stay 0).
    pub strays: AtomicU64,
}

impl Sink {
    pub async fn start() -> anyhow::Result<Arc<Self>> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let (up, _) = watch::channel(true);
        let sink = Arc::new(Self {
            addr: listener.local_addr()?,
            tracks: RwLock::new(Vec::new()),
            up,
            strays: AtomicU64::new(0),
        });
        let me = Arc::clone(&sink);
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let me = Arc::clone(&me);
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let me = Arc::clone(&me);
                        async move { me.handle(req).await }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(sink)
    }

    /// Records scenario `sid` from now on.
    pub fn track(&self, sid: usize, track: Arc<Track>) {
        let mut tracks = self.tracks.write().unwrap();
        if tracks.len() <= sid {
            tracks.resize(sid + 1, None);
        }
        tracks[sid] = Some(track);
    }

    /// Up: answer 200. Down: hold every request unanswered until up again.
    pub fn set_up(&self, up: bool) {
        self.up.send_replace(up);
    }

    async fn handle(&self, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
        let body = read_body(req).await;
        let mut up = self.up.subscribe();
        if !*up.borrow_and_update() {
            // Held until the sink is up; the relay's timeout may give up first.
            let _ = up.wait_for(|u| *u).await;
        }
        let now = clock::now_ns();
        let track = parse_facial_id(&body).and_then(|(sid, seq)| {
            let tracks = self.tracks.read().unwrap();
            tracks.get(sid).cloned().flatten().map(|t| (t, seq))
        });
        match track {
            Some((t, seq)) if seq < t.arrived_ns.len() => {
                if t.arrived_ns[seq]
                    .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
                {
                    t.arrivals.fetch_add(1, Ordering::Relaxed);
                } else {
                    t.duplicates.fetch_add(1, Ordering::Relaxed);
                }
            }
            _ => {
                self.strays.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(Response::new(Full::new(Bytes::from_static(b"ok"))))
    }
}

/// The whole body of `req` (empty if it broke off).
async fn read_body(req: Request<Incoming>) -> Bytes {
    req.into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default()
}

/// The baseline: a bare hyper server that reads the body and answers 200, nothing more.
pub async fn start_baseline() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let service = service_fn(|req: Request<Incoming>| async move {
                    let _ = req.into_body().collect().await;
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                        br#"{"id":"baseline"}"#,
                    ))))
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(addr)
}

/// The HTTP client a forwarder sends with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ForwardClient {
    /// hyper-util's client (hyper's own): the ceiling.
    Hyper,
    /// reqwest (on the same hyper-util client), as the relay's HTTP destinations used it
    /// until they moved to hyper-util's client (BENCHMARKS.md, issue 14, third round):
    /// the difference between the two rows is what reqwest costs per event.
    Reqwest,
}

impl ForwardClient {
    pub fn name(self) -> &'static str {
        match self {
            ForwardClient::Hyper => "hyper",
            ForwardClient::Reqwest => "reqwest",
        }
    }

    pub fn parse(s: &str) -> anyhow::Result<Self> {
        match s {
            "hyper" => Ok(ForwardClient::Hyper),
            "reqwest" => Ok(ForwardClient::Reqwest),
            other => anyhow::bail!("unknown forwarder client {other:?}"),
        }
    }
}

/// One forwarder's way of sending a body on to the sink; the status to answer with.
/// Built once per forwarder and cloned per connection: the size difference does not matter.
#[derive(Clone)]
#[allow(clippy::large_enum_variant)]
enum Sender {
    Hyper(
        hyper_util::client::legacy::Client<
            hyper_util::client::legacy::connect::HttpConnector,
            Full<Bytes>,
        >,
        hyper::Uri,
    ),
    Reqwest(reqwest::Client, reqwest::Url),
}

impl Sender {
    async fn send(&self, body: Bytes) -> u16 {
        match self {
            Sender::Hyper(client, uri) => {
                let forward = Request::post(uri.clone())
                    .header("content-type", "application/json")
                    .body(Full::new(body))
                    .expect("request");
                match client.request(forward).await {
                    Ok(r) => {
                        let ok = r.status().is_success();
                        let _ = r.into_body().collect().await;
                        if ok { 200 } else { 502 }
                    }
                    Err(_) => 502,
                }
            }
            Sender::Reqwest(client, url) => {
                let sent = client
                    .post(url.clone())
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await;
                match sent {
                    Ok(r) => {
                        let ok = r.status().is_success();
                        let _ = r.bytes().await;
                        if ok { 200 } else { 502 }
                    }
                    Err(_) => 502,
                }
            }
        }
    }
}

/// The forwarder: a bare hyper server that POSTs each body to the sink (at most
/// `concurrency` at once, over kept-alive connections, like the relay's destination) and
/// answers 200 once the sink did. No parsing, no store, no log line: the ceiling of any
/// relay on this machine that delivers each event with one HTTP request.
pub async fn start_forwarder(
    sink: SocketAddr,
    concurrency: usize,
    client: ForwardClient,
) -> anyhow::Result<SocketAddr> {
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;

    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let sender = match client {
        ForwardClient::Hyper => Sender::Hyper(
            Client::builder(TokioExecutor::new()).build_http(),
            format!("http://{sink}/sink").parse()?,
        ),
        ForwardClient::Reqwest => Sender::Reqwest(
            // As the relay's HTTP destination built it before it moved to hyper-util.
            reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(10))
                .connect_timeout(std::time::Duration::from_secs(5))
                .redirect(reqwest::redirect::Policy::none())
                .pool_max_idle_per_host(concurrency)
                .build()?,
            format!("http://{sink}/sink").parse()?,
        ),
    };
    let slots = Arc::new(tokio::sync::Semaphore::new(concurrency));
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let (sender, slots) = (sender.clone(), Arc::clone(&slots));
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let (sender, slots) = (sender.clone(), Arc::clone(&slots));
                    async move {
                        let body = read_body(req).await;
                        let _slot = slots.acquire().await;
                        let status = sender.send(body).await;
                        let mut answer =
                            Response::new(Full::new(Bytes::from_static(br#"{"id":"forwarded"}"#)));
                        *answer.status_mut() = hyper::StatusCode::from_u16(status).expect("status");
                        Ok::<_, Infallible>(answer)
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn facial_ids_round_trip() {
        let body = format!(
            r#"{{"eventName":"AUTH","facialId":"{}","appId":"a"}}"#,
            facial_id(3, 12345)
        );
        assert_eq!(parse_facial_id(body.as_bytes()), Some((3, 12345)));
        assert_eq!(parse_facial_id(br#"{"facialId":"other"}"#), None);
    }
}
