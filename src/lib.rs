//! faceio-relay: verify FACEIO webhooks, store them durably, fan them out by rules.
//!
//! # Layout
//! The life of one event, top to bottom:
//! - [`ingress`]: the HTTP endpoint. Checks the `WWW-Authenticate` token (constant time,
//!   before reading the body), the content type, the size, the payload; the result is a
//!   [`ingress::VerifiedEvent`], the only thing the store accepts.
//! - [`routing`]: compiled `routes:`; decides which destinations get the event.
//! - [`store`]: writes the event and one pending delivery per destination in one
//!   transaction, synced to disk (group commit) before ingress answers 200.
//! - [`delivery`]: one dispatcher per destination takes due deliveries, applies the
//!   destination's concurrency and rate limit, and records done / retry-at / dead.
//! - [`destinations`]: one file per kind (`slack`, `http`, `file`) behind one trait;
//!   each attempt is classified as success, retryable or permanent.
//!
//! Around them: [`config`] (relay.yaml into typed values, every error at once),
//! [`cli`] (the `run`, `check`, `simulate` and `dead-letters` commands) and
//! [`telemetry`] (logging).
//!
//! # Shutdown
//! [`Relay::shutdown`] stops in this order: ingress stops accepting and finishes the
//! requests under way (each still gets its durable 200 or a 503); dispatchers stop
//! starting attempts; attempts under way get `delivery.shutdown_grace`, then are
//! abandoned (still pending, resumed on the next start); the store's writer drains its
//! queue. Nothing pending is lost at any step.

pub mod cli;
pub mod config;
pub mod delivery;
pub mod destinations;
pub mod ingress;
pub mod routing;
pub mod store;
pub mod telemetry;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::delivery::Shutdown;
use crate::ingress::{IngressState, TlsHandle};
use crate::store::Store;
use crate::store::sqlite::SqliteStore;

/// How often done deliveries past the retention period are pruned.
const PRUNE_INTERVAL: Duration = Duration::from_secs(3600);

/// A running relay: ingress, dispatchers and store.
pub struct Relay {
    /// The address ingress actually listens on (resolves a configured port 0).
    local_addr: SocketAddr,
    /// Cancels ingress.
    stop_ingress: CancellationToken,
    /// The ingress task; finishes once in-flight requests are answered.
    ingress: JoinHandle<()>,
    /// The ingress certificate, when `tls:` is set; reloaded on SIGHUP.
    tls: Option<TlsHandle>,
    /// Soft and hard cancellation for delivery.
    delivery: Shutdown,
    /// Every dispatcher, attempt and housekeeping task.
    tracker: TaskTracker,
    grace: Duration,
}

impl Relay {
    /// Opens the store, starts the dispatchers, binds the listener. When this returns
    /// `Ok`, the relay accepts webhooks.
    pub async fn start(config: Config) -> anyhow::Result<Self> {
        let config = Arc::new(config);
        // Certificate problems are reported before anything else is started.
        let tls = config.tls.as_ref().map(TlsHandle::load).transpose()?;
        let path = config.store.path.clone();
        let store: Arc<dyn Store> = Arc::new(
            tokio::task::spawn_blocking(move || SqliteStore::open(&path))
                .await
                .context("store open task failed")??,
        );

        let known: Vec<&str> = config
            .destinations
            .iter()
            .map(|d| d.name.as_str())
            .collect();
        let orphans = store.dead_letter_orphans(&known).await?;
        if orphans > 0 {
            tracing::warn!(
                count = orphans,
                "pending deliveries for destinations no longer in the config were moved to dead letters"
            );
        }

        let tracker = TaskTracker::new();
        let delivery = Shutdown {
            soft: CancellationToken::new(),
            hard: CancellationToken::new(),
        };
        let wakers = delivery::start(&config, Arc::clone(&store), &tracker, delivery.clone())?;

        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let local_addr = listener.local_addr()?;

        let state = Arc::new(IngressState::new(
            Arc::clone(&config),
            Arc::clone(&store),
            wakers,
        ));
        tracker.spawn(housekeeping(
            Arc::clone(&store),
            Arc::clone(&state),
            config.store.retention,
            delivery.soft.clone(),
        ));
        let app = ingress::router(state);
        let stop_ingress = CancellationToken::new();
        let limits = config.ingress.clone();
        let drain = limits.body_timeout + limits.store_timeout + Duration::from_secs(1);
        let ingress = tokio::spawn({
            let stop = stop_ingress.clone();
            let acceptor = tls.as_ref().map(TlsHandle::acceptor);
            async move { ingress::serve(listener, app, &limits, stop, drain, acceptor).await }
        });
        tracing::info!(
            addr = %local_addr,
            path = %config.webhook_path,
            store = %config.store.path.display(),
            destinations = config.destinations.len(),
            routes = config.routes.len(),
            "faceio-relay ready"
        );
        Ok(Self {
            local_addr,
            stop_ingress,
            ingress,
            tls,
            delivery,
            tracker,
            grace: config.delivery.shutdown_grace,
        })
    }

    /// The address ingress listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The ingress TLS setup, when `tls:` is configured: call
    /// [`TlsHandle::reload`] to pick up renewed certificate files.
    pub fn tls_handle(&self) -> Option<TlsHandle> {
        self.tls.clone()
    }

    /// Graceful shutdown; see the crate docs for the order.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        tracing::info!("shutting down: no longer accepting webhooks");
        self.stop_ingress.cancel();
        if let Err(e) = self.ingress.await {
            tracing::error!(error = %e, "ingress task failed");
        }
        self.delivery.soft.cancel();
        self.tracker.close();
        if tokio::time::timeout(self.grace, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                grace_ms = self.grace.as_millis() as u64,
                "deliveries still under way after the grace period; abandoning them (they stay pending)"
            );
            self.delivery.hard.cancel();
            self.tracker.wait().await;
        }
        tracing::info!("shutdown complete");
        Ok(())
    }
}

/// Runs the relay until `shutdown` completes, then stops it gracefully.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let relay = Relay::start(config).await?;
    shutdown.await;
    relay.shutdown().await
}

/// Periodic upkeep: prune old delivered events; forget idle auth-failure counters.
async fn housekeeping(
    store: Arc<dyn Store>,
    ingress: Arc<IngressState>,
    retention: Duration,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(PRUNE_INTERVAL);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        ingress.forget_idle_sources();
        let cutoff = ingress::verify::now_ms() - retention.as_millis() as i64;
        match store.prune(cutoff).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(rows = n, "pruned delivered events past retention"),
            Err(e) => tracing::warn!(error = %e, "prune failed"),
        }
    }
}
