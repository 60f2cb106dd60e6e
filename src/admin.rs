//! The admin endpoint (`admin_listen`, default 127.0.0.1:9090, never the webhook port):
//! `/metrics` (Prometheus), `/healthz` (the process answers) and `/readyz` (the store
//! takes durable writes and ingress is accepting; 503 otherwise, for load balancers).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;

use crate::ingress::verify::now_ms;
use crate::store::{DestinationStats, Store};
use crate::telemetry::metrics::{DestinationLabels, Metrics};

/// How long `/readyz` and `/metrics` wait for the store before saying it is not ready.
const STORE_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// What the admin handlers read.
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub store: Arc<dyn Store>,
    /// True while the ingress accept loop runs.
    pub ingress_up: Arc<AtomicBool>,
    /// The destinations configured now: their backlog gauges are exported at 0 when the
    /// store has nothing for them.
    pub destinations: Arc<dyn Fn() -> Vec<String> + Send + Sync>,
}

pub fn router(state: Arc<AdminState>) -> axum::Router {
    axum::Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

async fn metrics(State(state): State<Arc<AdminState>>) -> Response {
    refresh_store_gauges(&state).await;
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
    match tokio::time::timeout(STORE_PROBE_TIMEOUT, state.store.ping()).await {
        Ok(Ok(())) => (StatusCode::OK, Json(json!({ "ready": true }))).into_response(),
        Ok(Err(e)) => not_ready(&format!("store not writable: {e}")),
        Err(_) => not_ready("store did not answer in time"),
    }
}

fn not_ready(reason: &str) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({ "ready": false, "reason": reason })),
    )
        .into_response()
}
