//! The webhook handler: every answer FACEIO (or anyone else) can get.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde_json::json;

use super::verify::{self, Rejection};
use crate::config::{Config, RateLimit};
use crate::delivery::Wakers;
use crate::routing::Router;
use crate::store::Store;

/// What the handler needs, shared by all requests.
pub struct IngressState {
    /// Applications (tokens) and ingress limits.
    config: Arc<Config>,
    /// Compiled routes: deliveries are decided before the event is stored.
    router: Router,
    store: Arc<dyn Store>,
    /// Wakes a destination's dispatcher after its delivery is committed.
    wakers: Wakers,
    /// Failed authentications per source IP.
    auth_failures: DefaultKeyedRateLimiter<IpAddr>,
}

impl IngressState {
    pub fn new(config: Arc<Config>, store: Arc<dyn Store>, wakers: Wakers) -> Self {
        Self {
            router: Router::new(&config),
            auth_failures: keyed_limiter(&config.ingress.auth_failures),
            config,
            store,
            wakers,
        }
    }

    /// Drops failure counters of sources that have been quiet, bounding memory.
    pub fn forget_idle_sources(&self) {
        self.auth_failures.retain_recent();
        self.auth_failures.shrink_to_fit();
    }
}

fn keyed_limiter(rate: &RateLimit) -> DefaultKeyedRateLimiter<IpAddr> {
    let period = Duration::from_secs_f64(1.0 / rate.per_second);
    let burst = NonZeroU32::new(rate.burst.max(1)).unwrap_or(NonZeroU32::MIN);
    let quota = Quota::with_period(period)
        .unwrap_or_else(|| Quota::per_second(NonZeroU32::MAX))
        .allow_burst(burst);
    RateLimiter::keyed(quota)
}

/// The ingress routes: `POST {webhook_path}`; JSON 404 and 405 for everything else.
pub fn router(state: Arc<IngressState>) -> axum::Router {
    let path = state.config.webhook_path.clone();
    axum::Router::new()
        .route(
            &path,
            post(webhook).fallback(|| async {
                error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method_not_allowed",
                    "use POST",
                )
            }),
        )
        .fallback(|| async { error(StatusCode::NOT_FOUND, "not_found", "no such endpoint") })
        .with_state(state)
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (status, Json(json!({ "error": code, "message": message }))).into_response()
}

/// Logs a rejection (the reason, never the token) and builds its answer.
fn reject(peer: IpAddr, status: StatusCode, code: &str, message: &str, reason: &str) -> Response {
    tracing::warn!(peer = %peer, status = status.as_u16(), reason, "event rejected");
    error(status, code, message)
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|mime| {
            let mime = mime.trim();
            mime.eq_ignore_ascii_case("application/json")
                || (mime.len() > 5
                    && mime[..12.min(mime.len())].eq_ignore_ascii_case("application/")
                    && mime.to_ascii_lowercase().ends_with("+json"))
        })
        .unwrap_or(false)
}

async fn webhook(
    State(state): State<Arc<IngressState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
) -> Response {
    let started = Instant::now();
    let ip = peer.ip();
    let limits = &state.config.ingress;
    if !limits.allow_ips.is_empty() && !limits.allow_ips.iter().any(|n| n.contains(&ip)) {
        return reject(
            ip,
            StatusCode::FORBIDDEN,
            "forbidden",
            "source address not allowed",
            "source not in allow_ips",
        );
    }
    let (parts, body) = request.into_parts();

    let auth_header = parts
        .headers
        .get(header::WWW_AUTHENTICATE)
        .map(|v| v.as_bytes());
    let auth = match verify::authenticate(&state.config.applications, auth_header) {
        Ok(auth) => auth,
        Err(why) => return auth_failed(&state, ip, &why),
    };

    if !is_json(&parts.headers) {
        return reject(
            ip,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "Content-Type must be application/json",
            "content type is not JSON",
        );
    }
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.max_body as u64) {
        return too_large(ip, limits.max_body);
    }
    let collected = tokio::time::timeout(
        limits.body_timeout,
        Limited::new(body, limits.max_body).collect(),
    )
    .await;
    let bytes = match collected {
        Ok(Ok(c)) => c.to_bytes(),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => {
            return too_large(ip, limits.max_body);
        }
        Ok(Err(_)) => {
            return reject(
                ip,
                StatusCode::BAD_REQUEST,
                "bad_request",
                "could not read the body",
                "body read failed",
            );
        }
        Err(_) => {
            return reject(
                ip,
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                "body not received in time",
                "body read timed out",
            );
        }
    };

    let event = match verify::verify(auth, bytes) {
        Ok(event) => event,
        Err(Rejection::InvalidPayload(why)) => {
            return reject(ip, StatusCode::BAD_REQUEST, "invalid_payload", &why, &why);
        }
        Err(why) => return auth_failed(&state, ip, &why),
    };

    let targets = state.router.route(event.payload());
    let stored = tokio::time::timeout(
        limits.store_timeout,
        state.store.insert_event(&event, &targets),
    )
    .await;
    let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
    match stored {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::error!(event_id = %event.id(), error = %e, "event not stored; answered 503");
            return unavailable();
        }
        Err(_) => {
            tracing::error!(
                event_id = %event.id(),
                timeout_ms = limits.store_timeout.as_millis() as u64,
                "store did not confirm in time; answered 503"
            );
            return unavailable();
        }
    }
    for t in &targets {
        state.wakers.wake(t);
    }
    let p = event.payload();
    tracing::info!(
        event_id = %event.id(),
        app_id = %p.app_id,
        event_name = %p.event_name,
        destinations = targets.len(),
        latency_ms = format_args!("{latency_ms:.1}"),
        "event accepted"
    );
    (StatusCode::OK, Json(json!({ "id": event.id() }))).into_response()
}

fn too_large(ip: IpAddr, max: usize) -> Response {
    reject(
        ip,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        &format!("body larger than {max} bytes"),
        "body over max_body",
    )
}

fn unavailable() -> Response {
    let mut r = error(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "event not stored; try again",
    );
    r.headers_mut()
        .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    r
}

/// A failed authentication: 401, or 429 once this source has failed too often.
fn auth_failed(state: &IngressState, ip: IpAddr, why: &Rejection) -> Response {
    let reason = why.to_string();
    if state.auth_failures.check_key(&ip).is_err() {
        let mut r = reject(
            ip,
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_requests",
            "too many failed authentications",
            &reason,
        );
        r.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
        return r;
    }
    reject(
        ip,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "authentication failed",
        &reason,
    )
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
