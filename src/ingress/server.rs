//! The accept loop: connection cap, header read timeout, graceful drain.
//!
//! `axum::serve` installs no header-read timer, so connections are served here with
//! hyper-util directly: every connection gets a header read timeout, the number of open
//! connections is capped by a semaphore (excess connections wait in the kernel's accept
//! backlog), and on shutdown the loop stops accepting while requests under way finish.
//!
//! A plain connection must send its first byte within `header_timeout` too: hyper's
//! HTTP/1-or-2 detection has no timer of its own.
//!
//! With `tls:` the TLS handshake runs inside the connection's own task, under the same
//! `header_timeout` as the request headers: a client that opens a connection and never
//! finishes the handshake cannot hold a connection slot for longer than that.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::config::IngressConfig;

/// Concurrent requests on one HTTP/2 connection.
const H2_MAX_STREAMS: u32 = 32;

/// HTTP/2 keep-alive ping interval (a peer that stops answering is dropped).
const H2_KEEP_ALIVE: Duration = Duration::from_secs(20);

/// Pause after a failed accept (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// Serves `app` on `listener` until `shutdown`, then waits up to `drain` for requests
/// under way to finish. With `tls`, every connection is a TLS handshake first.
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    limits: &IngressConfig,
    shutdown: CancellationToken,
    drain: Duration,
    tls: Option<TlsAcceptor>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        // Bounds what one HTTP/2 connection can hold at once, and drops dead peers.
        .max_concurrent_streams(H2_MAX_STREAMS)
        .keep_alive_interval(Some(H2_KEEP_ALIVE))
        .keep_alive_timeout(limits.header_timeout);
    let builder = Arc::new(builder);

    loop {
        let permit = tokio::select! {
            p = Arc::clone(&slots).acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            () = shutdown.cancelled() => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let builder = Arc::clone(&builder);
        // Taken here, before shutdown can start, so a connection still in its TLS
        // handshake is waited for (up to the handshake timeout) and then drained.
        let watcher = graceful.watcher();
        let tls = tls.clone();
        let handshake_timeout = limits.header_timeout;
        tokio::spawn(async move {
            match tls {
                None => {
                    // The HTTP/1-or-2 detection reads without a timer of its own: a client
                    // that connects and sends nothing must not hold a connection slot.
                    let mut first = [0u8; 1];
                    match tokio::time::timeout(handshake_timeout, stream.peek(&mut first)).await {
                        Ok(Ok(n)) if n > 0 => {
                            serve_connection(&builder, TokioIo::new(stream), app, watcher, peer)
                                .await
                        }
                        _ => tracing::debug!(peer = %peer, "connection sent nothing in time"),
                    }
                }
                Some(tls) => {
                    match tokio::time::timeout(handshake_timeout, tls.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            serve_connection(&builder, TokioIo::new(stream), app, watcher, peer)
                                .await
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(peer = %peer, error = %e, "TLS handshake failed")
                        }
                        Err(_) => tracing::debug!(peer = %peer, "TLS handshake timed out"),
                    }
                }
            }
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("some ingress connections did not finish in time and were closed");
    }
}

/// Serves one connection (plain TCP or TLS) to its end, under graceful shutdown.
async fn serve_connection<I>(
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    app: axum::Router,
    watcher: Watcher,
    peer: SocketAddr,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let service = app.map_request(move |req: hyper::Request<hyper::body::Incoming>| {
        let mut req = req.map(axum::body::Body::new);
        req.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
        req
    });
    let conn = builder
        .serve_connection(io, TowerToHyperService::new(service))
        .into_owned();
    if let Err(e) = watcher.watch(conn).await {
        tracing::debug!(peer = %peer, error = %e, "connection ended with an error");
    }
}
