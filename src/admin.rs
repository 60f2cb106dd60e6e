//! The admin endpoint (`admin_listen`, default 127.0.0.1:9090, never the webhook port):
//! `/metrics` (Prometheus), `/healthz` (the process answers) and `/readyz` (the store
//! takes durable writes and ingress is accepting; 503 otherwise, for load balancers).
//!
//! # Invariants
//! - **Asking often costs the store nothing more.** `/readyz` and the `/metrics` backlog
//!   gauges come from a store probe at most [`PROBE_MAX_AGE`] old: whatever the request
//!   rate, the store is asked at most once a second for each (concurrent requests wait for
//!   the same probe). On PostgreSQL the probe has a connection of its own.
//! - **The port protects itself** like ingress: its own connection cap, per-source share,
//!   header and idle timeouts (`admin:`), served by [`crate::ingress::serve`].
//! - With `admin.token`, `/metrics` answers 401 without `Authorization: Bearer <token>`
//!   (compared by digest, in constant time); `/healthz` and `/readyz` stay open for load
//!   balancers and say nothing but ready or not.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sha2::Digest;
use subtle::ConstantTimeEq;
use tokio::sync::Mutex;
use tokio::time::Instant;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;

use crate::config::Secret;
use crate::event::now_ms;
use crate::store::{DestinationStats, Store};
use crate::telemetry::metrics::{DestinationLabels, Metrics};

/// How long `/readyz` and `/metrics` wait for the store before saying it is not ready.
const STORE_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The oldest store probe `/readyz` and `/metrics` answer from.
pub const PROBE_MAX_AGE: Duration = Duration::from_secs(1);

/// A store probe's result and when it was taken; one probe runs at a time.
struct Probe<T> {
    last: Mutex<Option<(Instant, T)>>,
}

impl<T: Clone> Probe<T> {
    fn new() -> Self {
        Self {
            last: Mutex::new(None),
        }
    }

    /// The last result if it is fresh enough, else a new one from `ask`. Requests that
    /// arrive while a probe runs wait for it and share its result.
    async fn get<F: Future<Output = T>>(&self, ask: impl FnOnce() -> F) -> T {
        let mut last = self.last.lock().await;
        if let Some((at, value)) = &*last
            && at.elapsed() < PROBE_MAX_AGE
        {
            return value.clone();
        }
        let value = ask().await;
        *last = Some((Instant::now(), value.clone()));
        value
    }
}

/// `/readyz`'s store answer: `None` when the store takes durable writes.
type Readiness = Option<String>;

/// What the admin handlers read.
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub store: Arc<dyn Store>,
    /// True while the ingress accept loop runs.
    pub ingress_up: Arc<AtomicBool>,
    /// The destinations configured now: their backlog gauges are exported at 0 when the
    /// store has nothing for them.
    pub destinations: Arc<dyn Fn() -> Vec<String> + Send + Sync>,
    /// SHA-256 of `admin.token`, when `/metrics` needs it.
    token_digest: Option<[u8; 32]>,
    readiness: Probe<Readiness>,
    /// Unit: the gauges themselves hold the figures.
    gauges: Probe<()>,
}

impl AdminState {
    pub fn new(
        metrics: Arc<Metrics>,
        store: Arc<dyn Store>,
        ingress_up: Arc<AtomicBool>,
        destinations: Arc<dyn Fn() -> Vec<String> + Send + Sync>,
        token: Option<&Secret>,
    ) -> Self {
        Self {
            metrics,
            store,
            ingress_up,
            destinations,
            token_digest: token.map(|t| sha2::Sha256::digest(t.expose().as_bytes()).into()),
            readiness: Probe::new(),
            gauges: Probe::new(),
        }
    }

    /// True when no token is configured or `headers` carry it as a bearer token.
    fn authorized(&self, headers: &HeaderMap) -> bool {
        let Some(want) = &self.token_digest else {
            return true;
        };
        let Some(given) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, token) = v.trim().split_once(' ')?;
                scheme
                    .eq_ignore_ascii_case("bearer")
                    .then_some(token.trim())
            })
        else {
            return false;
        };
        let given: [u8; 32] = sha2::Sha256::digest(given.as_bytes()).into();
        given.ct_eq(want).into()
    }
}

pub fn router(state: Arc<AdminState>) -> axum::Router {
    axum::Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

async fn metrics(State(state): State<Arc<AdminState>>, headers: HeaderMap) -> Response {
    if !state.authorized(&headers) {
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "admin.token required: send Authorization: Bearer <token>\n",
        )
            .into_response();
    }
    state.gauges.get(|| refresh_store_gauges(&state)).await;
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
        .into_response()
}

/// Sets the backlog gauges from the store (they count work from before this process and
/// from the `dead-letters` commands, so they are read, not counted).
async fn refresh_store_gauges(state: &AdminState) {
    let stats =
        match tokio::time::timeout(STORE_PROBE_TIMEOUT, state.store.destination_stats()).await {
            Ok(Ok(stats)) => stats,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot read backlog figures for /metrics");
                return;
            }
            Err(_) => {
                tracing::warn!("backlog figures for /metrics took too long");
                return;
            }
        };
    let m = &state.metrics;
    m.pending.clear();
    m.oldest_pending_age.clear();
    m.dead_letters.clear();
    let now = now_ms();
    let idle = (state.destinations)()
        .into_iter()
        .filter(|name| !stats.iter().any(|s| s.destination == *name))
        .map(|destination| DestinationStats {
            destination,
            ..DestinationStats::default()
        })
        .collect::<Vec<_>>();
    for s in stats.into_iter().chain(idle) {
        let labels = DestinationLabels {
            destination: s.destination,
        };
        m.pending.get_or_create(&labels).set(s.pending as i64);
        m.dead_letters.get_or_create(&labels).set(s.dead as i64);
        let age = s
            .oldest_pending_ms
            .map_or(0.0, |at| (now - at).max(0) as f64 / 1000.0);
        m.oldest_pending_age.get_or_create(&labels).set(age);
    }
}

async fn readyz(State(state): State<Arc<AdminState>>) -> Response {
    if !state.ingress_up.load(Ordering::Acquire) {
        return not_ready("not accepting webhooks: shutting down");
    }
    let store = state
        .readiness
        .get(|| async {
            match tokio::time::timeout(STORE_PROBE_TIMEOUT, state.store.ping()).await {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(format!("store not writable: {e}")),
                Err(_) => Some("store did not answer in time".to_string()),
            }
        })
        .await;
    match store {
        None => (StatusCode::OK, Json(json!({ "ready": true }))).into_response(),
        Some(reason) => not_ready(&reason),
    }
}

fn not_ready(reason: &str) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({ "ready": false, "reason": reason })),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[tokio::test(start_paused = true)]
    async fn a_probe_asks_the_store_at_most_once_a_second_whatever_the_rate() {
        let probe = Arc::new(Probe::<usize>::new());
        let asked = Arc::new(AtomicUsize::new(0));
        let ask = |asked: Arc<AtomicUsize>| async move {
            // A slow store: the requests that arrive meanwhile wait for this probe.
            tokio::time::sleep(Duration::from_millis(300)).await;
            asked.fetch_add(1, Ordering::SeqCst) + 1
        };
        let mut answers = Vec::new();
        for _ in 0..100 {
            let (probe, asked) = (Arc::clone(&probe), Arc::clone(&asked));
            answers.push(tokio::spawn(async move { probe.get(|| ask(asked)).await }));
        }
        for a in answers {
            assert_eq!(a.await.unwrap(), 1, "every request shares the first probe");
        }
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(
            probe.get(|| ask(Arc::clone(&asked))).await,
            1,
            "still fresh"
        );
        tokio::time::advance(PROBE_MAX_AGE).await;
        assert_eq!(
            probe.get(|| ask(Arc::clone(&asked))).await,
            2,
            "a second later"
        );
        assert_eq!(asked.load(Ordering::SeqCst), 2);
    }
}
