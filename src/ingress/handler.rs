//! The webhook handler: every answer FACEIO (or anyone else) can get.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use axum::Json;
use axum::extract::{Extension, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;
use governor::{DefaultKeyedRateLimiter, RateLimiter};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde_json::json;

use super::client::{ClientAddr, ConnControl, source_key};
use super::server::ConnPolicy;
use crate::config::{Config, IngressConfig, RateLimit};
use crate::event::VerifiedEvent;
use crate::event::verify::{self, Rejection};
use crate::routing::Router;
use crate::store::{Store, Wakers};
use crate::telemetry::events::{EventAccepted, EventRejected};
use crate::telemetry::metrics::Metrics;

/// The parts of ingress a reload replaces, swapped as one so a request sees either the
/// old or the new config, never a mix.
pub struct Live {
    /// Applications (tokens) and ingress limits.
    pub config: Arc<Config>,
    /// Compiled routes: deliveries are decided before the event is stored.
    pub router: Router,
    /// Wakes a destination's dispatcher after its delivery is committed.
    pub wakers: Wakers,
    /// Event names that get their own `event_name` label in `events_received_total`:
    /// FACEIO's documented events and those the routes name. Any other name (payload
    /// text, up to `max_body` long) is counted as `other`, so the metric stays bounded.
    pub metric_event_names: HashSet<String>,
}

/// FACEIO's documented event names.
pub const DOCUMENTED_EVENTS: [&str; 3] = ["ENROLL", "AUTH", "DELETION"];

/// The `event_name` label for unlisted names.
pub const OTHER_EVENT_LABEL: &str = "other";

impl Live {
    fn new(config: Arc<Config>, wakers: Wakers) -> Self {
        let metric_event_names = DOCUMENTED_EVENTS
            .iter()
            .map(|n| n.to_string())
            .chain(
                config
                    .routes
                    .iter()
                    .filter_map(|r| r.matcher.event_name.as_ref())
                    .flatten()
                    .cloned(),
            )
            .collect();
        Self {
            router: Router::new(&config),
            config,
            wakers,
            metric_event_names,
        }
    }

    /// The metric label for an event name.
    fn event_label<'a>(&self, name: &'a str) -> &'a str {
        if self.metric_event_names.contains(name) {
            name
        } else {
            OTHER_EVENT_LABEL
        }
    }
}

/// The failed-authentication budget and the rate it was built from (kept across reloads
/// unless the rate changes, so a reload does not forgive an attacker).
struct AuthBudget {
    rate: RateLimit,
    limiter: DefaultKeyedRateLimiter<IpAddr>,
}

/// What the handler needs, shared by all requests.
pub struct IngressState {
    live: ArcSwap<Live>,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    /// Failed authentications (and requests that are not the webhook) per source IP.
    auth_failures: ArcSwap<AuthBudget>,
    /// The per-connection rules the connection server reads (idle timeout, per-source
    /// cap, trusted proxies), replaced on reload like the rest.
    conn_policy: Arc<ArcSwap<ConnPolicy>>,
}

impl IngressState {
    pub fn new(
        config: Arc<Config>,
        wakers: Wakers,
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let rate = config.ingress.auth_failures;
        Self {
            conn_policy: Arc::new(ArcSwap::from_pointee(ConnPolicy::ingress(&config.ingress))),
            live: ArcSwap::from_pointee(Live::new(config, wakers)),
            store,
            metrics,
            auth_failures: ArcSwap::from_pointee(AuthBudget {
                rate,
                limiter: RateLimiter::keyed(rate.quota()),
            }),
        }
    }

    /// The per-connection rules, for [`super::serve`].
    pub fn conn_policy(&self) -> Arc<ArcSwap<ConnPolicy>> {
        Arc::clone(&self.conn_policy)
    }

    /// Switches to a new config (reload): tokens, routes, limits, destinations.
    pub fn replace(&self, config: Arc<Config>, wakers: Wakers) {
        let rate = config.ingress.auth_failures;
        if self.auth_failures.load().rate != rate {
            self.auth_failures.store(Arc::new(AuthBudget {
                rate,
                limiter: RateLimiter::keyed(rate.quota()),
            }));
        }
        self.conn_policy
            .store(Arc::new(ConnPolicy::ingress(&config.ingress)));
        self.live.store(Arc::new(Live::new(config, wakers)));
    }

    /// Drops failure counters of sources that have been quiet, bounding memory.
    pub fn forget_idle_sources(&self) {
        let budget = self.auth_failures.load();
        budget.limiter.retain_recent();
        budget.limiter.shrink_to_fit();
    }
}

/// The ingress routes: `POST {webhook_path}`; JSON 404 and 405 for everything else.
/// (The path is fixed at start; changing it needs a restart.)
pub fn router(state: Arc<IngressState>) -> axum::Router {
    let path = state.live.load().config.webhook_path.clone();
    axum::Router::new()
        .route(&path, post(webhook).fallback(method_not_allowed))
        .fallback(not_found)
        .with_state(state)
}

/// Any method but POST on the webhook path (logged and counted like every refusal, and
/// charged to the source's failed-request budget).
async fn method_not_allowed(
    State(state): State<Arc<IngressState>>,
    Extension(ClientAddr(ip)): Extension<ClientAddr>,
    Extension(conn): Extension<ConnControl>,
) -> Response {
    let refusal = Refusal {
        status: StatusCode::METHOD_NOT_ALLOWED,
        code: "method_not_allowed",
        message: "use POST",
        detail: "not a POST",
    };
    charged(&state, ip, &conn, refusal, "not a POST")
}

/// Any other path (the path is not logged: a mistyped URL may carry a secret). Charged
/// to the source's failed-request budget: a source that polls other paths to keep its
/// connections busy is soon answered 429 and disconnected.
async fn not_found(
    State(state): State<Arc<IngressState>>,
    Extension(ClientAddr(ip)): Extension<ClientAddr>,
    Extension(conn): Extension<ConnControl>,
) -> Response {
    let refusal = Refusal {
        status: StatusCode::NOT_FOUND,
        code: "not_found",
        message: "no such endpoint",
        detail: "not the webhook path",
    };
    charged(&state, ip, &conn, refusal, "not the webhook path")
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (status, Json(json!({ "error": code, "message": message }))).into_response()
}

/// One refusal: its answer, and what the log and metrics say about it.
struct Refusal<'a> {
    status: StatusCode,
    /// Stable code: the answer's `error` and the metric's `reason`.
    code: &'static str,
    /// For the client.
    message: &'a str,
    /// For the log only (never a token).
    detail: &'a str,
}

impl Refusal<'_> {
    fn answer(self, state: &IngressState, peer: IpAddr) -> Response {
        EventRejected {
            peer,
            status: self.status.as_u16(),
            reason: self.code,
            detail: self.detail,
        }
        .emit(&state.metrics);
        let mut r = error(self.status, self.code, self.message);
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            r.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        r
    }
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|mime| {
            let mime = mime.trim().to_ascii_lowercase();
            mime == "application/json"
                || (mime.starts_with("application/") && mime.ends_with("+json"))
        })
        .unwrap_or(false)
}

async fn webhook(
    State(state): State<Arc<IngressState>>,
    Extension(ClientAddr(ip)): Extension<ClientAddr>,
    Extension(conn): Extension<ConnControl>,
    request: Request,
) -> Response {
    let started = Instant::now();
    let live = state.live.load_full();
    let limits = &live.config.ingress;
    if !limits.allow_ips.is_empty() && !limits.allow_ips.iter().any(|n| n.contains(&ip)) {
        return Refusal {
            status: StatusCode::FORBIDDEN,
            code: "forbidden",
            message: "source address not allowed",
            detail: "source not in allow_ips",
        }
        .answer(&state, ip);
    }
    let (parts, body) = request.into_parts();

    let auth_header = parts
        .headers
        .get(header::WWW_AUTHENTICATE)
        .map(|v| v.as_bytes());
    let auth = match verify::authenticate(&live.config.applications, auth_header) {
        Ok(auth) => auth,
        Err(why) => return auth_failed(&state, ip, &conn, &why),
    };

    if !is_json(&parts.headers) {
        return Refusal {
            status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
            code: "unsupported_media_type",
            message: "Content-Type must be application/json",
            detail: "content type is not JSON",
        }
        .answer(&state, ip);
    }
    let bytes = match read_body(&parts.headers, body, limits).await {
        Ok(bytes) => bytes,
        Err(refusal) => return refusal.answer(&state, ip),
    };

    let event = match verify::verify(auth, bytes) {
        Ok(event) => event,
        Err(Rejection::InvalidPayload(why)) => {
            return Refusal {
                status: StatusCode::BAD_REQUEST,
                code: "invalid_payload",
                message: &why,
                detail: &why,
            }
            .answer(&state, ip);
        }
        Err(why) => return auth_failed(&state, ip, &conn, &why),
    };

    let targets = live.router.route(event.payload());
    let failure = store_event(&state, &event, &targets, limits).await;
    if let Some(why) = failure {
        let detail = format!("event {} not stored: {why}", event.id());
        return Refusal {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "unavailable",
            message: "event not stored; try again",
            detail: &detail,
        }
        .answer(&state, ip);
    }
    for t in &targets {
        live.wakers.destination(t);
    }
    let p = event.payload();
    EventAccepted {
        event_id: event.id(),
        app_id: &p.app_id,
        event_name: &p.event_name,
        event_label: live.event_label(&p.event_name),
        destinations: targets.len(),
        latency: started.elapsed(),
    }
    .emit(&state.metrics);
    (StatusCode::OK, Json(json!({ "id": event.id() }))).into_response()
}

/// Reads the body within `ingress.max_body` (a declared length over it is refused before
/// reading) and `ingress.body_timeout`.
async fn read_body(
    headers: &HeaderMap,
    body: axum::body::Body,
    limits: &IngressConfig,
) -> Result<Bytes, Refusal<'static>> {
    let too_large = Refusal {
        status: StatusCode::PAYLOAD_TOO_LARGE,
        code: "payload_too_large",
        message: "body larger than ingress.max_body",
        detail: "body over max_body",
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.max_body as u64) {
        return Err(too_large);
    }
    let collected = tokio::time::timeout(
        limits.body_timeout,
        Limited::new(body, limits.max_body).collect(),
    )
    .await;
    match collected {
        Ok(Ok(c)) => Ok(c.to_bytes()),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => Err(too_large),
        Ok(Err(_)) => Err(Refusal {
            status: StatusCode::BAD_REQUEST,
            code: "bad_request",
            message: "could not read the body",
            detail: "body read failed",
        }),
        Err(_) => Err(Refusal {
            status: StatusCode::REQUEST_TIMEOUT,
            code: "request_timeout",
            message: "body not received in time",
            detail: "body read timed out",
        }),
    }
}

/// Stores the event and its deliveries (durable when `Ok`) within
/// `ingress.store_timeout`; why not, otherwise.
async fn store_event(
    state: &IngressState,
    event: &VerifiedEvent,
    targets: &[&str],
    limits: &IngressConfig,
) -> Option<String> {
    let stored = tokio::time::timeout(
        limits.store_timeout,
        state.store.insert_event(event, targets),
    )
    .await;
    match stored {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e.to_string()),
        Err(_) => Some(format!(
            "store did not confirm within store_timeout ({})",
            humantime::format_duration(limits.store_timeout)
        )),
    }
}

/// A failed authentication: 401, or 429 once this source has failed too often.
fn auth_failed(state: &IngressState, ip: IpAddr, conn: &ConnControl, why: &Rejection) -> Response {
    let detail = why.to_string();
    let refusal = Refusal {
        status: StatusCode::UNAUTHORIZED,
        code: "unauthorized",
        message: "authentication failed",
        detail: &detail,
    };
    charged(state, ip, conn, refusal, &detail)
}

/// A refusal charged to the source's failed-request budget: answered as `refusal` while
/// the budget lasts, then 429 and the connection closed (HTTP/1: `Connection: close`;
/// HTTP/2: GOAWAY, through `conn`).
fn charged(
    state: &IngressState,
    ip: IpAddr,
    conn: &ConnControl,
    refusal: Refusal<'_>,
    detail: &str,
) -> Response {
    if state
        .auth_failures
        .load()
        .limiter
        .check_key(&source_key(ip))
        .is_ok()
    {
        return refusal.answer(state, ip);
    }
    let message = if refusal.status == StatusCode::UNAUTHORIZED {
        "too many failed authentications"
    } else {
        "too many failed requests"
    };
    let mut r = Refusal {
        status: StatusCode::TOO_MANY_REQUESTS,
        code: "too_many_requests",
        message,
        detail,
    }
    .answer(state, ip);
    r.headers_mut().insert(
        header::CONNECTION,
        header::HeaderValue::from_static("close"),
    );
    conn.close();
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(ct: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, ct.parse().unwrap());
        h
    }

    #[test]
    fn json_content_types() {
        assert!(is_json(&headers("application/json")));
        assert!(is_json(&headers("Application/JSON; charset=utf-8")));
        assert!(is_json(&headers("application/vnd.faceio+json")));
        assert!(!is_json(&headers("text/plain")));
        assert!(!is_json(&headers("application/x-www-form-urlencoded")));
        assert!(!is_json(&HeaderMap::new()));
    }
}
