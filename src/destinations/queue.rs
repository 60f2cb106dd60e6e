//! What the queue kinds (`nats`, `redis`, `amqp`) share: their URL check, the redaction
//! of their URL and password, the bound on one attempt, and the fields consumers
//! deduplicate and filter on.

use std::future::Future;
use std::time::{Duration, UNIX_EPOCH};

use super::web::Redactor;
use super::{DeliveryError, PreflightError, SetupError};
use crate::config::{DestinationConfig, KindContext, Secret};
use crate::store::Delivery;
use crate::template::TextTemplate;

/// `url`: one of `schemes`, with a host. Messages never show the URL.
pub(super) fn check_url(cx: &mut KindContext<'_>, text: &str, schemes: &[&str]) -> bool {
    match reqwest::Url::parse(text.trim()) {
        Err(e) => cx.error(&["url"], format!("not a valid URL: {e}")),
        Ok(u) if !schemes.contains(&u.scheme()) => {
            let list: Vec<String> = schemes.iter().map(|s| format!("{s}://")).collect();
            let article = if list[0].starts_with('a') { "an" } else { "a" };
            cx.error(
                &["url"],
                format!("must be {article} {} URL", list.join(" or ")),
            )
        }
        Ok(u) if u.host_str().is_none_or(str::is_empty) => {
            cx.error(&["url"], "the URL has no host")
        }
        Ok(_) => return true,
    }
    false
}

/// A redactor for a URL (and the password inside it) and other secrets.
pub(super) fn redactor(url: &Secret, others: &[&Secret]) -> Redactor {
    let mut redactor = Redactor::default();
    redactor.add(url.expose());
    if let Ok(url) = reqwest::Url::parse(url.expose())
        && let Some(password) = url.password()
    {
        redactor.add(password);
    }
    for secret in others {
        redactor.add(secret.expose());
    }
    redactor
}

/// One attempt, bounded by the destination's `timeout`: running out is retryable (the
/// server may yet have taken the message: consumers deduplicate on the event ID).
pub(super) async fn within(
    timeout: Duration,
    server: &str,
    attempt: impl Future<Output = Result<(), DeliveryError>>,
) -> Result<(), DeliveryError> {
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or_else(|_| {
            Err(DeliveryError::retryable(format!(
                "timed out waiting for the {server} server"
            )))
        })
}

/// What a message says about its event besides the body: the event ID, the payload's
/// `eventName` and `appId` (empty when missing) and when the relay received it (RFC 3339,
/// milliseconds).
pub(super) struct EventFields {
    pub event_id: String,
    pub event_name: String,
    pub app_id: String,
    pub received_at: String,
}

impl EventFields {
    /// From the delivery and the template context built from its body.
    pub(super) fn new(delivery: &Delivery, ctx: &serde_json::Value) -> Self {
        let field = |k: &str| ctx[k].as_str().unwrap_or_default().to_owned();
        let at = UNIX_EPOCH + Duration::from_millis(delivery.received_at_ms.max(0) as u64);
        Self {
            event_id: delivery.event_id.clone(),
            event_name: field("eventName"),
            app_id: field("appId"),
            received_at: humantime::format_rfc3339_millis(at).to_string(),
        }
    }
}

/// The one-line template of `key` (validated at load: an error here is a bug, said
/// plainly).
pub(super) fn template(
    common: &DestinationConfig,
    key: &str,
    source: &str,
) -> Result<TextTemplate, SetupError> {
    TextTemplate::new(key, source).map_err(|errors| SetupError::Invalid {
        destination: common.name.clone(),
        reason: errors
            .iter()
            .map(|e| e.message.clone())
            .collect::<Vec<_>>()
            .join("; "),
    })
}

/// For `check`: what would fail every delivery is a problem; what a retry could get
/// past means the server was not reached.
pub(super) fn preflight_error(e: DeliveryError) -> PreflightError {
    match e {
        DeliveryError::Permanent { reason } => PreflightError::Problem(reason),
        DeliveryError::Retryable { reason, .. } => PreflightError::Unreachable(reason),
    }
}
