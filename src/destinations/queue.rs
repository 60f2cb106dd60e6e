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

/// A redactor for a URL, the password inside it (as written and decoded) and other
/// credentials (tokens), each hidden however short.
pub(super) fn redactor(url: &Secret, others: &[&Secret]) -> Redactor {
    let mut redactor = Redactor::default();
    redactor.add(url.expose());
    if let Ok(url) = reqwest::Url::parse(url.expose())
        && let Some(password) = url.password()
    {
        redactor.add_credential(password);
        redactor.add_credential(&percent_decoded(password));
    }
    for secret in others {
        redactor.add_credential(secret.expose());
    }
    redactor
}

/// The user and password a URL carried (`user:password@`), decoded.
pub(super) struct UserInfo {
    /// Empty when the URL has none.
    pub user: String,
    /// `None` when the URL has only a user (for NATS: a token).
    pub password: Option<Secret>,
}

/// `url` without its `user:password@`, and what that held: a client given the bare URL
/// has no secret to log (async-nats logs its server's address at debug level) and
/// takes the credentials through its options.
pub(super) fn without_userinfo(url: &Secret) -> (Secret, Option<UserInfo>) {
    let Ok(mut parsed) = reqwest::Url::parse(url.expose()) else {
        return (url.clone(), None);
    };
    if parsed.username().is_empty() && parsed.password().is_none() {
        return (url.clone(), None);
    }
    let info = UserInfo {
        user: percent_decoded(parsed.username()),
        password: parsed.password().map(|p| Secret::new(percent_decoded(p))),
    };
    // Neither fails on a URL with a host (checked at load).
    let _ = parsed.set_username("");
    let _ = parsed.set_password(None);
    (Secret::new(parsed.to_string()), Some(info))
}

/// `text` with its `%XX` escapes decoded, as a URL's user and password are written.
fn percent_decoded(text: &str) -> String {
    percent_encoding::percent_decode_str(text)
        .decode_utf8_lossy()
        .into_owned()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_password_and_its_decoded_form_are_redacted() {
        let url = Secret::new("amqp://guest:gu%2Fst@127.0.0.1:5672/%2f".to_owned());
        let token = Secret::new("tok".to_owned());
        let r = redactor(&url, &[&token]);
        let text = r.apply("refused gu/st, gu%2Fst and tok for guest");
        assert_eq!(
            text,
            "refused [redacted], [redacted] and [redacted] for guest"
        );
    }

    #[test]
    fn the_userinfo_leaves_the_url_decoded() {
        let url = Secret::new("nats://relay:p%40ss@127.0.0.1:4222".to_owned());
        let (bare, info) = without_userinfo(&url);
        assert_eq!(bare.expose(), "nats://127.0.0.1:4222");
        let info = info.expect("the URL had credentials");
        assert_eq!(info.user, "relay");
        assert_eq!(info.password.expect("a password").expose(), "p@ss");
        let token = Secret::new("nats://s3cr3t@host".to_owned());
        let (bare, info) = without_userinfo(&token);
        assert_eq!(bare.expose(), "nats://host");
        assert!(info.is_some_and(|i| i.user == "s3cr3t" && i.password.is_none()));
        let plain = Secret::new("nats://host:4222".to_owned());
        assert!(without_userinfo(&plain).1.is_none());
        assert_eq!(percent_decoded("a%zz%4"), "a%zz%4");
    }
}
