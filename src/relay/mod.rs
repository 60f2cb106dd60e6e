//! [`Relay`]: the running daemon's parts wired together — start, reload, shutdown.
//!
//! Start opens the store, starts one dispatcher per destination, binds ingress and the
//! admin endpoint; when [`Relay::start`] returns, webhooks are accepted. Reload swaps
//! what can change live and names what needs a restart. Shutdown order is in the crate
//! docs.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::AdminState;
use crate::config::Config;
use crate::delivery::{Applied, Deliveries, Shutdown, Sweep};
use crate::destinations::SetupError;
use crate::ingress::{IngressState, TlsError, TlsHandle};
use crate::store::{Store, StoreError, Wakers};
use crate::telemetry::metrics::Metrics;
use crate::{admin, ingress, store};

mod restart_only;
mod tasks;

use restart_only::{RESTART_ONLY, RequestHorizon, drain_time};
use tasks::{
    announce_and_sweep, announcement_ttl, decide_replays, forward_wakes, housekeeping,
    sweep_removed,
};

/// How long shutdown waits for the admin endpoint's connections to close.
const ADMIN_CLOSE: Duration = Duration::from_secs(1);

/// Why the relay could not start, or could not apply a reloaded config.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The TLS certificate or key cannot be loaded.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// A destination cannot be set up (a file the service may not open or create).
    #[error(transparent)]
    Setup(#[from] SetupError),
    /// The store cannot be opened or does not answer.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A listener cannot be bound (`what` names it: `listen` or `admin_listen`).
    #[error("cannot listen on {addr} ({what}): {source}")]
    Listen {
        addr: SocketAddr,
        what: &'static str,
        source: std::io::Error,
    },
}

impl RelayError {
    /// Whether the cause is in the configuration and starting again cannot change it:
    /// a TLS certificate that cannot be loaded, a destination that cannot be set up.
    /// `run` exits with [`crate::cli::EXIT_CONFIG`] for these, which the systemd unit
    /// does not restart; other start failures (a port in use, an unreachable store) are
    /// retried.
    pub fn is_config(&self) -> bool {
        matches!(self, Self::Tls(_) | Self::Setup(_))
    }
}

/// A running relay: ingress, admin endpoint, dispatchers and store.
pub struct Relay {
    /// The address ingress actually listens on (resolves a configured port 0).
    local_addr: SocketAddr,
    /// The admin endpoint's address, when enabled.
    admin_addr: Option<SocketAddr>,
    /// Cancels ingress.
    stop_ingress: CancellationToken,
    /// False from the start of shutdown (or if ingress ends on its own): `/readyz` says 503.
    ingress_up: Arc<AtomicBool>,
    /// Cancels the admin endpoint (last, so `/readyz` answers 503 during the drain) and
    /// its task.
    admin: Option<(CancellationToken, JoinHandle<()>)>,
    /// The ingress task; finishes once in-flight requests are answered.
    ingress: JoinHandle<()>,
    /// The ingress certificate, when `tls:` is set; reloaded on SIGHUP.
    tls: Option<TlsHandle>,
    /// Soft and hard cancellation for delivery.
    delivery: Shutdown,
    /// Every dispatcher, attempt and housekeeping task.
    tracker: TaskTracker,
    /// The dispatchers, replaced on reload.
    deliveries: Arc<Deliveries>,
    /// Ingress's swappable state.
    ingress_state: Arc<IngressState>,
    /// The config in force (for reload comparisons and late sweeps).
    current: Arc<Mutex<Arc<Config>>>,
    /// Until when requests admitted under an earlier config may still store events
    /// (and their deliveries for destinations a reload removed).
    horizon: Mutex<RequestHorizon>,
    metrics: Arc<Metrics>,
    store: Arc<dyn Store>,
}

impl Relay {
    /// Opens the store, starts the dispatchers, binds the listeners. When this returns
    /// `Ok`, the relay accepts webhooks.
    pub async fn start(config: Config) -> Result<Self, RelayError> {
        let config = Arc::new(config);
        // Certificate problems are reported before anything else is started.
        let tls = config.tls.as_ref().map(TlsHandle::load).transpose()?;
        let store = store::open(&config.store).await?;
        let metrics = Arc::new(Metrics::new());
        metrics.init_ingress();
        let Dispatch {
            tracker,
            delivery,
            deliveries,
            wakers,
        } = start_delivery(&config, &store, &metrics).await?;

        let (listener, admin_listener) = bind_listeners(&config).await?;
        let local_addr = listener
            .local_addr()
            .map_err(listen_error(config.listen, "listen"))?;
        let admin_addr = match (&admin_listener, config.admin_listen) {
            (Some(l), Some(addr)) => {
                Some(l.local_addr().map_err(listen_error(addr, "admin_listen"))?)
            }
            _ => None,
        };

        let ingress_state = Arc::new(IngressState::new(
            Arc::clone(&config),
            wakers,
            Arc::clone(&store),
            Arc::clone(&metrics),
        ));
        let current = Arc::new(Mutex::new(Arc::clone(&config)));
        spawn_upkeep(
            &tracker,
            &store,
            &ingress_state,
            &deliveries,
            &current,
            &delivery,
        );
        let stop_ingress = CancellationToken::new();
        let ingress_up = Arc::new(AtomicBool::new(true));
        let admin = admin_listener.map(|listener| {
            start_admin(listener, &config, &metrics, &store, &ingress_up, &current)
        });
        let ingress = spawn_ingress(
            listener,
            &config,
            &ingress_state,
            &metrics,
            tls.as_ref(),
            &ingress_up,
            &stop_ingress,
        );
        tracing::info!(
            addr = %local_addr,
            admin = %admin_addr.map_or("off".to_string(), |a| a.to_string()),
            path = %config.webhook_path,
            store = %store::describe(&config.store),
            destinations = config.destinations.len(),
            routes = config.routes.len(),
            "faceio-relay ready"
        );
        Ok(Self {
            local_addr,
            admin_addr,
            stop_ingress,
            ingress_up,
            admin,
            ingress,
            tls,
            delivery,
            tracker,
            deliveries,
            ingress_state,
            current,
            horizon: Mutex::new(RequestHorizon::default()),
            metrics,
            store,
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

    /// The admin endpoint's address, if enabled.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// Applies a new, validated config: tokens, routes, ingress limits and destinations
    /// change at once; settings that need a restart (listen addresses, store path,
    /// retention, connection cap, header timeout, log format, TLS paths, `admin:`) are kept and named in a
    /// warning. On error nothing changes.
    pub async fn reload(&self, new: Config) -> Result<String, RelayError> {
        let old = Arc::clone(&self.current.lock().unwrap_or_else(|p| p.into_inner()));
        let kept: Vec<&str> = RESTART_ONLY
            .iter()
            .filter(|setting| (setting.differs)(&new, &old))
            .map(|setting| setting.name)
            .collect();
        if !kept.is_empty() {
            tracing::warn!(settings = %kept.join(", "),
                "these settings change only on restart; the running values are kept");
        }
        let mut new = new;
        // Keep what cannot change live, so the config in force describes the process.
        for setting in RESTART_ONLY {
            (setting.keep)(&mut new, &old);
        }
        let new = Arc::new(new);

        self.reload_certificate().await;
        let (wakers, mut applied) = self.deliveries.apply(&new).await?;
        // New destinations are announced before ingress routes to them (see `start`).
        if let Err(e) = self.deliveries.announce(announcement_ttl(&new)).await {
            tracing::warn!(error = %e,
                "cannot announce this relay's destinations to the other relays; retried every poll interval");
        }
        self.ingress_state.replace(Arc::clone(&new), wakers);
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Arc::clone(&new);
        // The new config is in force from here: sweep the removed destinations now, and
        // again later (a failed sweep does not fail the reload): requests that read the
        // old routes may still be storing deliveries for them, and those with attempts
        // under way are swept only once the attempts have recorded their outcome (a
        // delivery that arrived must not become a dead letter).
        let sweep = match self.deliveries.dead_letter_orphans(&new).await {
            Ok(sweep) => sweep,
            Err(e) => {
                tracing::warn!(error = %e,
                    "cannot sweep deliveries of removed destinations now; trying again shortly");
                Sweep::default()
            }
        };
        applied.dead_lettered = sweep.moved;
        for name in &sweep.waiting {
            tracing::info!(destination = %name,
                "removed destination still has attempts under way; its pending deliveries move to dead letters once they end");
        }
        // Requests under way keep the limits they started with: the old config's, or
        // an older one's (reloads in a row), which may be longer than the new ones.
        let first = self
            .horizon
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replaced(&old.ingress, &new.ingress, Instant::now());
        if !applied.stopped.is_empty() {
            self.tracker.spawn(sweep_removed(
                Arc::clone(&self.deliveries),
                Arc::clone(&self.current),
                first,
                self.delivery.soft.clone(),
            ));
        }
        Ok(describe(&applied))
    }

    /// What every SIGHUP does even when the new config is refused (invalid, or failed
    /// to apply): file destinations reopen their files (logrotate's `reload` must not
    /// leave the relay writing into the rotated file) and the TLS certificate is read
    /// again (a renewal must not wait for a valid config). A valid reload does both
    /// itself.
    pub async fn reopen(&self) {
        self.reload_certificate().await;
        self.deliveries.reopen().await;
    }

    /// Renewed certificates (same paths) are picked up without dropping connections; a
    /// bad one is reported and the old one keeps serving.
    async fn reload_certificate(&self) {
        if let Some(tls) = &self.tls {
            let tls = tls.clone();
            match tokio::task::spawn_blocking(move || tls.reload()).await {
                Ok(Ok(())) => tracing::info!("TLS certificate reloaded"),
                Ok(Err(e)) => tracing::error!(error = %e,
                    "TLS certificate not reloaded; the previous one keeps serving"),
                Err(e) => tracing::error!(error = %e, "TLS reload task failed"),
            }
        }
    }

    /// Where `STATUS=` lines come from.
    pub fn status_source(&self) -> StatusSource {
        StatusSource {
            metrics: Arc::clone(&self.metrics),
            store: Arc::clone(&self.store),
        }
    }

    /// Graceful shutdown; see the crate docs for the order.
    pub async fn shutdown(self) {
        tracing::info!("shutting down: no longer accepting webhooks");
        self.ingress_up.store(false, Ordering::Release);
        self.stop_ingress.cancel();
        if let Err(e) = self.ingress.await {
            tracing::error!(error = %e, "ingress task failed");
        }
        self.delivery.soft.cancel();
        self.tracker.close();
        let grace = self
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .delivery
            .shutdown_grace;
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                grace_ms = grace.as_millis() as u64,
                "deliveries still under way after the grace period; abandoning them (they stay pending)"
            );
            self.delivery.hard.cancel();
            self.tracker.wait().await;
        }
        if let Some((stop, mut task)) = self.admin {
            stop.cancel();
            // Idle scrapers are closed at once; one stuck mid-request is not waited for.
            if tokio::time::timeout(ADMIN_CLOSE, &mut task).await.is_err() {
                task.abort();
            }
        }
        self.store.close().await;
        tracing::info!("shutdown complete");
    }
}

/// The delivery side, running: [`start_delivery`]'s result.
struct Dispatch {
    tracker: TaskTracker,
    delivery: Shutdown,
    deliveries: Arc<Deliveries>,
    wakers: Wakers,
}

/// Starts one dispatcher per destination (building them, and opening their files: these
/// errors are the configuration's), announces them, sweeps orphans, decides the replays
/// asked for while no relay ran, and passes a shared store's wakes on.
async fn start_delivery(
    config: &Arc<Config>,
    store: &Arc<dyn Store>,
    metrics: &Arc<Metrics>,
) -> Result<Dispatch, RelayError> {
    let tracker = TaskTracker::new();
    let delivery = Shutdown {
        soft: CancellationToken::new(),
        hard: CancellationToken::new(),
    };
    let deliveries = Arc::new(Deliveries::new(
        Arc::clone(store),
        Arc::clone(metrics),
        tracker.clone(),
        delivery.clone(),
    ));
    let (wakers, _) = deliveries.apply(config).await?;
    // Before any sweep here and any event accepted for them: the other relays must
    // know this one has these destinations.
    deliveries.announce(announcement_ttl(config)).await?;
    deliveries.dead_letter_orphans(config).await?;
    // Replays asked for while no relay ran are decided now, then every poll interval.
    if let Err(e) = deliveries.decide_replays().await {
        tracing::warn!(error = %e, "cannot decide replay requests now; trying again every poll interval");
    }
    // A shared store tells every relay about deliveries accepted by any of them.
    if let Some(wakes) = store.subscribe() {
        tracker.spawn(forward_wakes(
            wakes,
            Arc::clone(&deliveries),
            delivery.soft.clone(),
        ));
    }
    Ok(Dispatch {
        tracker,
        delivery,
        deliveries,
        wakers,
    })
}

/// The periodic tasks: housekeeping, replay decisions and, on a shared store, the
/// announcements and orphan sweeps.
fn spawn_upkeep(
    tracker: &TaskTracker,
    store: &Arc<dyn Store>,
    ingress_state: &Arc<IngressState>,
    deliveries: &Arc<Deliveries>,
    current: &Arc<Mutex<Arc<Config>>>,
    delivery: &Shutdown,
) {
    let retention = current
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .store
        .retention;
    tracker.spawn(housekeeping(
        Arc::clone(store),
        Arc::clone(ingress_state),
        retention,
        delivery.soft.clone(),
    ));
    tracker.spawn(decide_replays(
        Arc::clone(deliveries),
        Arc::clone(current),
        delivery.soft.clone(),
    ));
    if store.shared() {
        tracker.spawn(announce_and_sweep(
            Arc::clone(deliveries),
            Arc::clone(current),
            delivery.soft.clone(),
        ));
    }
}

/// Serves webhooks on `listener` until `stop`; `ingress_up` turns false when it ends.
fn spawn_ingress(
    listener: TcpListener,
    config: &Config,
    ingress_state: &Arc<IngressState>,
    metrics: &Arc<Metrics>,
    tls: Option<&TlsHandle>,
    ingress_up: &Arc<AtomicBool>,
    stop: &CancellationToken,
) -> JoinHandle<()> {
    let app = ingress::router(Arc::clone(ingress_state));
    let limits = ingress::ListenerLimits::ingress(&config.ingress);
    let drain = drain_time(&config.ingress);
    let stop = stop.clone();
    let acceptor = tls.map(TlsHandle::acceptor);
    let ingress_up = Arc::clone(ingress_up);
    let policy = ingress_state.conn_policy();
    let metrics = Arc::clone(metrics);
    tokio::spawn(async move {
        ingress::serve(
            listener, app, limits, policy, metrics, stop, drain, acceptor,
        )
        .await;
        ingress_up.store(false, Ordering::Release);
    })
}

/// Builds the admin endpoint (`/metrics`, `/healthz`, `/readyz`) and serves it on
/// `listener` with the `admin:` limits, until the returned token is cancelled. `/readyz`
/// follows `ingress_up`; the destinations it reports are those of the config in force.
fn start_admin(
    listener: TcpListener,
    config: &Config,
    metrics: &Arc<Metrics>,
    store: &Arc<dyn Store>,
    ingress_up: &Arc<AtomicBool>,
    current: &Arc<Mutex<Arc<Config>>>,
) -> (CancellationToken, JoinHandle<()>) {
    let destinations: Arc<dyn Fn() -> Vec<String> + Send + Sync> = {
        let current = Arc::clone(current);
        Arc::new(move || {
            current
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .destinations
                .iter()
                .map(|d| d.name.clone())
                .collect()
        })
    };
    let app = admin::router(Arc::new(AdminState::new(
        Arc::clone(metrics),
        Arc::clone(store),
        Arc::clone(ingress_up),
        destinations,
        config.admin.token.as_ref(),
    )));
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let stop = stop.clone();
        let limits = ingress::ListenerLimits::admin(&config.admin);
        let policy = Arc::new(ArcSwap::from_pointee(ingress::ConnPolicy::admin(
            &config.admin,
        )));
        let metrics = Arc::clone(metrics);
        async move {
            ingress::serve(
                listener,
                app,
                limits,
                policy,
                metrics,
                stop,
                ADMIN_CLOSE,
                None,
            )
            .await;
        }
    });
    (stop, task)
}

fn describe(applied: &Applied) -> String {
    let list = |v: &[String]| {
        if v.is_empty() {
            "none".to_string()
        } else {
            v.join(", ")
        }
    };
    format!(
        "destinations started: {}; restarted: {}; stopped: {}; pending deliveries of stopped destinations dead-lettered: {}",
        list(&applied.started),
        list(&applied.restarted),
        list(&applied.stopped),
        applied.dead_lettered
    )
}

/// Binds ingress, and the admin endpoint when enabled.
async fn bind_listeners(config: &Config) -> Result<(TcpListener, Option<TcpListener>), RelayError> {
    let listener = bind_ingress(config.listen, config.ingress.max_connections)
        .map_err(listen_error(config.listen, "listen"))?;
    let admin = match config.admin_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(listen_error(addr, "admin_listen"))?,
        ),
        None => None,
    };
    Ok((listener, admin))
}

fn listen_error(addr: SocketAddr, what: &'static str) -> impl Fn(std::io::Error) -> RelayError {
    move |source| RelayError::Listen { addr, what, source }
}

/// Binds ingress with an accept backlog as deep as the connection cap (the kernel caps it
/// at `net.core.somaxconn`): `TcpListener::bind` uses 128, and a burst of new
/// connections beyond that waits a whole SYN retransmit (1 s), a sixth of FACEIO's
/// patience.
fn bind_ingress(addr: SocketAddr, max_connections: usize) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(u32::try_from(max_connections).unwrap_or(u32::MAX).max(128))
}

/// Builds the one-line status systemd shows.
#[derive(Clone)]
pub struct StatusSource {
    metrics: Arc<Metrics>,
    store: Arc<dyn Store>,
}

impl StatusSource {
    pub async fn line(&self) -> String {
        let t = &self.metrics.totals;
        let mut line = format!(
            "{} accepted, {} delivered, {} dead-lettered since start",
            t.accepted.load(Ordering::Relaxed),
            t.delivered.load(Ordering::Relaxed),
            t.dead.load(Ordering::Relaxed),
        );
        if let Ok(stats) = self.store.destination_stats().await {
            let pending: u64 = stats.iter().map(|s| s.pending).sum();
            let dead: u64 = stats.iter().map(|s| s.dead).sum();
            line.push_str(&format!("; {pending} pending, {dead} in dead letters"));
        }
        line
    }
}

/// Runs the relay until `shutdown` completes, then stops it gracefully.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), RelayError> {
    let relay = Relay::start(config).await?;
    shutdown.await;
    relay.shutdown().await;
    Ok(())
}
