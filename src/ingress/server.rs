//! The accept loop and the life of one connection: every way a client could hold a
//! connection slot without sending webhooks is bounded here.
//!
//! `axum::serve` installs no timers, so connections are served with hyper-util directly.
//! The same loop serves the webhook port and the admin port, each with its own limits.
//!
//! # What bounds a connection (and which attack each answers)
//! - **`max_connections`** (a semaphore taken before `accept`): the process never holds
//!   more sockets than that; excess connections wait in the kernel's backlog.
//! - **`max_connections_per_ip`**: one source cannot take more than its share of those
//!   slots (idle-socket floods, HTTP/1 keep-alive with a request every few seconds). A
//!   connection over the cap is closed at once, unread. The source is the client address
//!   (see [`super::client`]); a trusted proxy's own connections are not counted unless a
//!   PROXY header names the client.
//! - **`handshake_timeout`**: the TLS handshake and the PROXY header must complete in time
//!   (a half-open handshake cannot hold a slot).
//! - **`header_timeout`**: a plain connection must send its first byte in time (hyper's
//!   HTTP/1-or-2 detection has no timer), and HTTP/1 request headers must arrive in time
//!   (slowloris), also between keep-alive requests.
//! - **`idle_timeout`**: a connection with no request in progress is closed, on both
//!   protocols (an HTTP/2 connection that never opens a stream, or answers every PING and
//!   idles, is not bounded by anything else). A request "in progress" is one whose handler
//!   runs; a stream the peer resets ends it.
//! - **HTTP/2 settings** ([`H2_MAX_STREAMS`], [`H2_MAX_HEADER_LIST`],
//!   [`H2_MAX_PENDING_RESETS`], [`H2_MAX_LOCAL_RESETS`]): concurrent streams per
//!   connection, header memory per request, and the reset floods known as Rapid Reset
//!   (CVE-2023-44487) and MadeYouReset (CVE-2025-8671).
//!
//! # Shutdown
//! On `shutdown` the loop stops accepting; every connection is asked to finish
//! gracefully (HTTP/1: close after the response under way; HTTP/2: GOAWAY) and requests
//! under way finish, each with its durable 200 or a 503. After `drain` what remains is
//! closed.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use ipnet::IpNet;
use proxy_header::ParseConfig;
use proxy_header::io::ProxiedStream;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use super::client::{ClientAddr, ConnControl, PerSource, forwarded_client, trusted};
use crate::config::{AdminConfig, IngressConfig};
use crate::telemetry::events::ConnectionClosed;
use crate::telemetry::metrics::{ListenerLabels, Metrics};

/// Concurrent requests (streams) on one HTTP/2 connection.
pub const H2_MAX_STREAMS: u32 = 32;

/// Largest decoded header list of one HTTP/2 request (hyper's default is 16 MiB; a
/// webhook's headers are well under 1 KiB).
pub const H2_MAX_HEADER_LIST: u32 = 16 * 1024;

/// Streams the peer may open and reset before the server accepts them (Rapid Reset).
pub const H2_MAX_PENDING_RESETS: usize = 20;

/// Streams the server may reset because of the peer's errors before it closes the
/// connection (MadeYouReset).
pub const H2_MAX_LOCAL_RESETS: usize = 64;

/// HTTP/2 keep-alive ping interval while a request is under way (a peer that stops
/// answering is dropped after the header timeout).
const H2_KEEP_ALIVE: Duration = Duration::from_secs(20);

/// Pause after a failed accept (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// How long a connection closed for idleness may take to say goodbye (HTTP/2 GOAWAY and
/// its PING) before it is dropped.
const IDLE_CLOSE_GRACE: Duration = Duration::from_secs(1);

/// The settings fixed when the listener starts (they size the accept loop and the
/// protocol builder).
#[derive(Debug, Clone)]
pub struct ListenerLimits {
    /// `ingress` or `admin`, for logs and metrics.
    pub name: &'static str,
    /// Connections open at once.
    pub max_connections: usize,
    /// Time for the first byte and for HTTP/1 request headers.
    pub header_timeout: Duration,
}

/// The per-connection rules, read when a connection (or, for forwarding headers, a
/// request) starts, so a reload applies to new connections at once.
#[derive(Debug, Clone)]
pub struct ConnPolicy {
    /// A connection with no request in progress is closed after this.
    pub idle_timeout: Duration,
    /// Time for the TLS handshake and the PROXY header.
    pub handshake_timeout: Duration,
    /// Connections at once from one client address.
    pub max_per_ip: usize,
    /// Peers whose PROXY header and `X-Forwarded-For` name the client.
    pub trusted_proxies: Vec<IpNet>,
    /// Connections from trusted proxies start with a PROXY header.
    pub proxy_protocol: bool,
}

impl ListenerLimits {
    pub fn ingress(cfg: &IngressConfig) -> Self {
        Self {
            name: "ingress",
            max_connections: cfg.max_connections,
            header_timeout: cfg.header_timeout,
        }
    }

    pub fn admin(cfg: &AdminConfig) -> Self {
        Self {
            name: "admin",
            max_connections: cfg.max_connections,
            header_timeout: cfg.header_timeout,
        }
    }
}

impl ConnPolicy {
    pub fn ingress(cfg: &IngressConfig) -> Self {
        Self {
            idle_timeout: cfg.idle_timeout,
            handshake_timeout: cfg.handshake_timeout,
            max_per_ip: cfg.max_connections_per_ip,
            trusted_proxies: cfg.trusted_proxies.clone(),
            proxy_protocol: cfg.proxy_protocol,
        }
    }

    /// The admin port: no proxies; one source may hold up to half of the admin slots, so
    /// a monitoring system and a load balancer always find one free.
    pub fn admin(cfg: &AdminConfig) -> Self {
        Self {
            idle_timeout: cfg.idle_timeout,
            handshake_timeout: cfg.header_timeout,
            max_per_ip: (cfg.max_connections / 2).max(1),
            trusted_proxies: Vec::new(),
            proxy_protocol: false,
        }
    }
}

/// What every connection of one listener shares.
struct Shared {
    limits: ListenerLimits,
    policy: Arc<ArcSwap<ConnPolicy>>,
    builder: auto::Builder<TokioExecutor>,
    app: axum::Router,
    tls: Option<TlsAcceptor>,
    per_source: Arc<PerSource>,
    metrics: Arc<Metrics>,
    /// Asks connections to finish (graceful).
    shutdown: CancellationToken,
    /// Closes what is left after the drain.
    abort: CancellationToken,
}

/// Serves `app` on `listener` until `shutdown`, then waits up to `drain` for requests
/// under way to finish. With `tls`, every connection is a TLS handshake first.
#[allow(clippy::too_many_arguments)]
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    limits: ListenerLimits,
    policy: Arc<ArcSwap<ConnPolicy>>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    drain: Duration,
    tls: Option<TlsAcceptor>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(H2_MAX_STREAMS)
        .max_header_list_size(H2_MAX_HEADER_LIST)
        .max_pending_accept_reset_streams(H2_MAX_PENDING_RESETS)
        .max_local_error_reset_streams(H2_MAX_LOCAL_RESETS)
        .keep_alive_interval(Some(H2_KEEP_ALIVE))
        .keep_alive_timeout(limits.header_timeout);
    // Exported at 0 from the start.
    drop(metrics.connections_open.get_or_create(&ListenerLabels {
        listener: limits.name,
    }));
    let shared = Arc::new(Shared {
        limits,
        policy,
        builder,
        app,
        tls,
        per_source: Arc::new(PerSource::default()),
        metrics,
        shutdown: shutdown.clone(),
        abort: CancellationToken::new(),
    });
    let tracker = TaskTracker::new();

    loop {
        let permit = tokio::select! {
            p = Arc::clone(&slots).acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            () = shutdown.cancelled() => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(listener = shared.limits.name, error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let shared = Arc::clone(&shared);
        tracker.spawn(async move {
            let open = shared
                .metrics
                .connections_open
                .get_or_create(&ListenerLabels {
                    listener: shared.limits.name,
                })
                .clone();
            open.inc();
            connection(&shared, stream, peer).await;
            open.dec();
            drop(permit);
        });
    }
    drop(listener);
    tracker.close();
    if tokio::time::timeout(drain, tracker.wait()).await.is_err() {
        tracing::warn!(
            listener = shared.limits.name,
            "some connections did not finish in time and were closed"
        );
        shared.abort.cancel();
        tracker.wait().await;
    }
}

/// One connection from accept to close.
async fn connection(shared: &Shared, stream: TcpStream, peer: SocketAddr) {
    let policy = shared.policy.load_full();
    let peer_ip = peer.ip().to_canonical();
    let closed = |client: IpAddr, reason: &'static str| {
        ConnectionClosed {
            listener: shared.limits.name,
            peer: client,
            reason,
        }
        .emit(&shared.metrics)
    };
    let from_proxy = trusted(peer_ip, &policy.trusted_proxies);
    // The source is counted before anything is read: a connection that sends nothing
    // must not hold one of `max_connections` without counting against its source.
    // A proxy's own connections carry many clients and are not counted against one;
    // with `proxy_protocol` its PROXY header names the client, who is.
    let take = |client: IpAddr| PerSource::take(&shared.per_source, client, policy.max_per_ip);

    let (stream, conn_client, _slot) = if from_proxy && policy.proxy_protocol {
        let read = tokio::time::timeout(
            policy.handshake_timeout,
            ProxiedStream::create_from_tokio(stream, ParseConfig::default()),
        );
        let stream = match read.await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::debug!(peer = %peer_ip, error = %e, "no valid PROXY header");
                return closed(peer_ip, "handshake_failed");
            }
            Err(_) => return closed(peer_ip, "handshake_timeout"),
        };
        // A LOCAL header (the proxy's own health check) names no client.
        let client = stream
            .proxy_header()
            .proxied_address()
            .map_or(peer_ip, |a| a.source.ip().to_canonical());
        let Some(slot) = take(client) else {
            return closed(client, "per_ip_cap");
        };
        (stream, client, Some(slot))
    } else {
        let slot = if from_proxy {
            None
        } else {
            match take(peer_ip) {
                Some(slot) => Some(slot),
                None => return closed(peer_ip, "per_ip_cap"),
            }
        };
        // hyper's HTTP/1-or-2 detection reads without a timer of its own: a client that
        // connects and sends nothing must not hold a connection slot.
        let mut first = [0u8; 1];
        let sent = tokio::time::timeout(shared.limits.header_timeout, stream.peek(&mut first));
        if !matches!(sent.await, Ok(Ok(n)) if n > 0) {
            return closed(peer_ip, "no_request");
        }
        (ProxiedStream::unproxied(stream), peer_ip, slot)
    };

    match &shared.tls {
        None => serve_http(shared, TokioIo::new(stream), peer, conn_client, &policy).await,
        Some(tls) => match tokio::time::timeout(policy.handshake_timeout, tls.accept(stream)).await
        {
            Ok(Ok(stream)) => {
                serve_http(shared, TokioIo::new(stream), peer, conn_client, &policy).await
            }
            Ok(Err(e)) => {
                tracing::debug!(peer = %conn_client, error = %e, "TLS handshake failed");
                closed(conn_client, "handshake_failed")
            }
            Err(_) => closed(conn_client, "handshake_timeout"),
        },
    }
}

/// Whether a connection has a request in progress, and since when it has been idle.
struct Activity {
    born: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds after `born` when the last request started or ended.
    last_ms: AtomicU64,
}

/// A request in progress; its end (or cancellation) marks the connection active now.
struct InFlight(Arc<Activity>);

impl Activity {
    fn new() -> Self {
        Self {
            born: Instant::now(),
            in_flight: AtomicUsize::new(0),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = self.born.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Release);
    }

    fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.touch();
        InFlight(Arc::clone(self))
    }

    fn busy(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) > 0
    }

    /// Returns once the connection has had no request in progress for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            if self.busy() {
                // The request's own timeouts bound it; look again later.
                tokio::time::sleep(idle).await;
                continue;
            }
            let last = self.born + Duration::from_millis(self.last_ms.load(Ordering::Acquire));
            let deadline = last + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Serves HTTP/1 or HTTP/2 on an established (and, with TLS, decrypted) connection until
/// it ends, goes idle, or shutdown.
async fn serve_http<I>(
    shared: &Shared,
    io: I,
    peer: SocketAddr,
    conn_client: IpAddr,
    policy: &ConnPolicy,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity::new());
    let control = ConnControl::default();
    let service = {
        let app = shared.app.clone();
        let live = Arc::clone(&shared.policy);
        let activity = Arc::clone(&activity);
        let control = control.clone();
        // A second less than the idle timeout, so the client stops first.
        let keep_alive = hyper::header::HeaderValue::from_str(&format!(
            "timeout={}",
            policy.idle_timeout.as_secs().saturating_sub(1).max(1)
        ))
        .expect("digits are a valid header value");
        hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            let in_flight = activity.start();
            let mut req = req.map(axum::body::Body::new);
            let client = forwarded_client(conn_client, req.headers(), &live.load().trusted_proxies);
            req.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
            req.extensions_mut().insert(ClientAddr(client));
            req.extensions_mut().insert(control.clone());
            let http1 = req.version() < hyper::Version::HTTP_2;
            let keep_alive = keep_alive.clone();
            let answer = app.clone().oneshot(req);
            async move {
                let mut response = answer.await;
                drop(in_flight);
                if http1 && let Ok(r) = &mut response {
                    // Tells a client's connection pool to stop reusing the connection
                    // before the relay closes it for idleness, so a request is never sent
                    // into a closing socket (FACEIO does not retry).
                    r.headers_mut()
                        .entry(hyper::header::HeaderName::from_static("keep-alive"))
                        .or_insert(keep_alive);
                }
                response
            }
        })
    };
    let conn = shared.builder.serve_connection(io, service);
    tokio::pin!(conn);
    let idle = policy.idle_timeout;
    let closed_by_relay = tokio::select! {
        ended = conn.as_mut() => {
            if let Err(e) = ended {
                tracing::debug!(peer = %conn_client, error = %e, "connection ended with an error");
            }
            return;
        }
        () = activity.idle_for(idle) => Some("idle"),
        () = control.closing() => Some("too_many_failures"),
        () = shared.shutdown.cancelled() => None,
    };
    if let Some(reason) = closed_by_relay {
        ConnectionClosed {
            listener: shared.limits.name,
            peer: conn_client,
            reason,
        }
        .emit(&shared.metrics);
    }
    let closed_by_relay = closed_by_relay.is_some();
    conn.as_mut().graceful_shutdown();
    loop {
        tokio::select! {
            _ = conn.as_mut() => return,
            () = shared.abort.cancelled() => return,
            () = tokio::time::sleep(IDLE_CLOSE_GRACE), if closed_by_relay => {
                // A request that raced the goodbye is let finish; otherwise the peer had
                // its chance to read the GOAWAY.
                if !activity.busy() {
                    return;
                }
            }
        }
    }
}
