//! `type: http`: POST the event to an internal API.
//!
//! The body is the original FACEIO body byte for byte, or with `body:` the JSON built
//! by [`crate::template::JsonBody`]; it goes with `Content-Type` (`content_type`,
//! default `application/json`), the configured headers, `X-Faceio-Relay-Event-Id` and `X-Faceio-Relay-Attempt`. With a
//! `signing_secret`, the request is signed per the Standard Webhooks spec: `webhook-id`
//! (the event ID, stable across retries so receivers can deduplicate),
//! `webhook-timestamp` (Unix seconds) and `webhook-signature`
//! (`v1,` + base64 HMAC-SHA256 of `{id}.{timestamp}.{body}`, over the body as sent).

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, Mac};
use http::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use sha2::Sha256;

use super::client::HttpClient;
use super::web::Redactor;
use super::{DeliveryError, Destination, KindConfig, SetupError};
use crate::config::raw::destination_keys;
use crate::config::{DestinationConfig, KindContext, Secret};
use crate::store::Delivery;
use crate::template::{self, JsonBody};

destination_keys! {
    /// A destination with `type: http`, as written.
    RawHttp {
        /// Target http(s) URL (may carry credentials: treated as a secret).
        pub url: String,
        /// Extra request headers; names must be valid header names, values are secrets.
        pub headers: Option<indexmap::IndexMap<String, String>>,
        /// Standard Webhooks signing secret: `whsec_<base64>` or a raw secret.
        pub signing_secret: Option<String>,
        /// Follow redirects (default `false`).
        pub follow_redirects: Option<bool>,
        /// The request body as a YAML value with templates in its string leaves, sent as
        /// JSON (default: the FACEIO body byte for byte). Read from the located tree.
        pub body: Option<serde::de::IgnoredAny>,
        /// `Content-Type` of the request (default `application/json`).
        pub content_type: Option<String>,
    }
}

/// `content_type` when not set.
const DEFAULT_CONTENT_TYPE: &str = "application/json";

/// `type: http`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpConfig {
    /// Target URL (already checked to parse as http/https).
    pub url: Secret,
    /// Extra headers (names validated; values secret).
    pub headers: Vec<(String, Secret)>,
    /// Standard Webhooks signing secret (`whsec_<base64>` or raw).
    pub signing_secret: Option<Secret>,
    /// Follow redirects (`follow_redirects`, default false).
    pub follow_redirects: bool,
    /// `body:` template tree (already checked); `None` = the FACEIO body byte for byte.
    pub body: Option<serde_json::Value>,
    /// `Content-Type` (`content_type`, default `application/json`; a valid header value).
    pub content_type: String,
}

impl KindConfig for HttpConfig {
    const TYPE: &'static str = "http";
    type Raw = RawHttp;

    fn validate(raw: RawHttp, cx: &mut KindContext<'_>) -> Option<Self> {
        let mut ok = cx.http_url(&["url"], &raw.url, true);
        let mut headers = Vec::new();
        for (name, value) in raw.headers.unwrap_or_default() {
            if HeaderName::from_bytes(name.as_bytes()).is_err() {
                cx.key_error(&["headers", &name], "invalid header name");
                ok = false;
            }
            if HeaderValue::from_str(&value).is_err() {
                cx.error(
                    &["headers", &name],
                    "invalid header value (only visible ASCII, spaces and tabs are allowed)",
                );
                ok = false;
            }
            headers.push((name, Secret::new(value)));
        }
        let body = raw.body.and_then(|_| cx.json(&["body"]));
        if let Some(b) = &body {
            ok &= cx.templates(JsonBody::new(b).err());
        }
        let content_type = raw
            .content_type
            .map(|t| t.trim().to_owned())
            .unwrap_or_else(|| DEFAULT_CONTENT_TYPE.to_owned());
        if !content_type.contains('/') || HeaderValue::from_str(&content_type).is_err() {
            cx.error(
                &["content_type"],
                "expected a media type such as `application/json`",
            );
            ok = false;
        }
        let signing_secret = raw.signing_secret.map(|s| {
            ok &= check_signing_secret(cx, &s);
            Secret::new(s)
        });
        ok.then(|| HttpConfig {
            url: Secret::new(raw.url.trim().to_owned()),
            headers,
            signing_secret,
            follow_redirects: raw.follow_redirects.unwrap_or(false),
            body,
            content_type,
        })
    }

    fn build(&self, common: &DestinationConfig) -> Result<Arc<dyn Destination>, SetupError> {
        Ok(Arc::new(HttpDestination::new(common, self)?))
    }

    fn summary(&self) -> String {
        let mut parts = vec![if self.body.is_some() {
            format!("body template as {}", self.content_type)
        } else {
            "FACEIO body as sent".to_string()
        }];
        if !self.headers.is_empty() {
            parts.push(format!("{} headers", self.headers.len()));
        }
        if self.signing_secret.is_some() {
            parts.push("signed (Standard Webhooks)".into());
        }
        if self.follow_redirects {
            parts.push("follows same-origin redirects".into());
        }
        parts.join(", ")
    }
}

/// `signing_secret`: not empty; after `whsec_`, non-empty base64.
fn check_signing_secret(cx: &mut KindContext<'_>, secret: &str) -> bool {
    let at = &["signing_secret"];
    if secret.is_empty() {
        cx.error(at, "must not be empty");
        return false;
    }
    if let Some(b64) = secret.strip_prefix("whsec_") {
        match BASE64.decode(b64) {
            Ok(bytes) if !bytes.is_empty() => {}
            Ok(_) => {
                cx.error(at, "the part after `whsec_` is empty");
                return false;
            }
            Err(_) => {
                cx.error(at, "the part after `whsec_` must be valid base64");
                return false;
            }
        }
    }
    true
}

/// Header carrying the relay's event ID on every request.
pub const EVENT_ID_HEADER: &str = "x-faceio-relay-event-id";
/// Header carrying the attempt number (1 for the first).
pub const ATTEMPT_HEADER: &str = "x-faceio-relay-attempt";

/// A Standard Webhooks signer.
struct Signer {
    key: Secret<Vec<u8>>,
}

impl Signer {
    /// `whsec_<base64>` secrets are decoded (the spec's format); anything else is used raw.
    fn new(secret: &Secret) -> Result<Self, SetupError> {
        let s = secret.expose();
        let key = match s.strip_prefix("whsec_") {
            Some(b64) => BASE64.decode(b64).map_err(|_| SetupError::SigningSecret)?,
            None => s.as_bytes().to_vec(),
        };
        Ok(Self {
            key: Secret::new(key),
        })
    }

    fn sign(&self, id: &str, timestamp: u64, body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(self.key.expose())
            .expect("HMAC accepts keys of any length");
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("v1,{}", BASE64.encode(mac.finalize().into_bytes()))
    }
}

/// An HTTP API destination.
pub struct HttpDestination {
    /// Holds the URL (never shown: the client has no `Debug`).
    client: HttpClient,
    signer: Option<Signer>,
    /// `body:`; `None` sends the FACEIO body as received.
    body: Option<JsonBody>,
    /// What must not be echoed into errors.
    redactor: Redactor,
}

impl HttpDestination {
    pub fn new(common: &DestinationConfig, config: &HttpConfig) -> Result<Self, SetupError> {
        let invalid = |reason: String| SetupError::Invalid {
            destination: common.name.clone(),
            reason,
        };
        let url = url::Url::parse(config.url.expose())
            .map_err(|e| invalid(format!("invalid url: {e}")))?;
        let mut headers = HeaderMap::new();
        let content_type = HeaderValue::from_str(&config.content_type)
            .map_err(|_| invalid("invalid content_type".into()))?;
        headers.insert(CONTENT_TYPE, content_type);
        for (name, value) in &config.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| invalid(format!("invalid header name {name}")))?;
            let mut value = HeaderValue::from_str(value.expose())
                .map_err(|_| invalid(format!("invalid value for header {name}")))?;
            value.set_sensitive(true);
            headers.insert(name, value);
        }
        let signer = config
            .signing_secret
            .as_ref()
            .map(Signer::new)
            .transpose()?;
        let body = config
            .body
            .as_ref()
            .map(|b| {
                JsonBody::new(b).map_err(|errors| {
                    let list: Vec<String> = errors.iter().map(|e| e.message.clone()).collect();
                    invalid(list.join("; "))
                })
            })
            .transpose()?;
        let mut redactor = Redactor::default();
        redactor.add_url(&url);
        for (_, value) in &config.headers {
            redactor.add(value.expose());
        }
        if let Some(secret) = &config.signing_secret {
            redactor.add(secret.expose());
        }
        Ok(Self {
            client: HttpClient::new(common, &url, config.follow_redirects, headers)?,
            signer,
            body,
            redactor,
        })
    }
}

impl HttpDestination {
    /// The bytes to send: the FACEIO body as received, or the rendered `body:`. A body
    /// that fails on this event (a case the samples did not show) is a permanent failure:
    /// every retry would build the same request.
    pub fn body_for(&self, delivery: &Delivery) -> Result<bytes::Bytes, DeliveryError> {
        let Some(body) = &self.body else {
            return Ok(delivery.body.clone());
        };
        let ctx = template::context(&delivery.body, &delivery.event_id, delivery.received_at_ms)
            .map_err(DeliveryError::permanent)?;
        body.render(&ctx)
            .map(bytes::Bytes::from)
            .map_err(DeliveryError::permanent)
    }
}

#[async_trait]
impl Destination for HttpDestination {
    fn kind(&self) -> &'static str {
        "http"
    }

    async fn deliver(&self, delivery: &Delivery) -> Result<(), DeliveryError> {
        let body = self.body_for(delivery)?;
        let mut headers = HeaderMap::new();
        let event_id = HeaderValue::from_str(&delivery.event_id)
            .map_err(|_| DeliveryError::permanent("the event ID is not a valid header value"))?;
        headers.insert(EVENT_ID_HEADER, event_id.clone());
        headers.insert(ATTEMPT_HEADER, HeaderValue::from(delivery.attempts + 1));
        if let Some(signer) = &self.signer {
            let ts = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let signature = signer.sign(&delivery.event_id, ts, &body);
            headers.insert("webhook-id", event_id);
            headers.insert("webhook-timestamp", HeaderValue::from(ts));
            headers.insert(
                "webhook-signature",
                HeaderValue::from_str(&signature).expect("base64 is a valid header value"),
            );
        }
        self.client.post(headers, body, &self.redactor).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_the_standard_webhooks_reference() {
        // The example from the Standard Webhooks spec's reference implementations.
        let signer = Signer::new(&Secret::new(
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".to_string(),
        ))
        .unwrap();
        let sig = signer.sign(
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn a_bad_whsec_secret_is_refused_without_echoing_it() {
        let err = Signer::new(&Secret::new("whsec_!!not base64!!".to_string()))
            .err()
            .unwrap();
        assert!(!err.to_string().contains("not base64!!"));
    }
}
