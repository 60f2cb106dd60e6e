//! `type: slack`: a message to a Slack incoming webhook.
//!
//! The message text comes from the destination's `text` template (minijinja, with the
//! FACEIO payload's fields plus `event_id` and `received_at` in scope) or from a default
//! that names the event, Facial ID, application, client IP and enrollment details.
//!
//! Slack's answers: `200 ok` is success; `429` carries `Retry-After`; `400
//! invalid_payload`, `403 action_prohibited`, `404 channel_not_found` and `410
//! channel_is_archived` are permanent (no retry can fix them); 5xx are retried.

use std::time::{Duration, UNIX_EPOCH};

use async_trait::async_trait;
use minijinja::Environment;
use serde_json::Value;

use super::{
    DeliveryError, Destination, Redactor, drain, http_client, status_error, transport_error,
};
use crate::config::{DestinationConfig, Secret, SlackConfig};
use crate::store::Delivery;

/// Used when a Slack destination sets no `text`.
pub const DEFAULT_TEMPLATE: &str = "FACEIO *{{ eventName }}* for Facial ID `{{ facialId }}` \
(app `{{ appId }}`, IP {{ clientIp }})\
{% if details %}{% if details.gender %} · gender {{ details.gender }}{% endif %}\
{% if details.age %} · age ~{{ details.age }}{% endif %}\
{% if details.timestamp %} · {{ details.timestamp }}{% endif %}{% endif %}";

/// A Slack incoming-webhook destination.
pub struct SlackDestination {
    client: reqwest::Client,
    url: Secret<reqwest::Url>,
    /// Holds the compiled template named `text`.
    templates: Environment<'static>,
    /// The webhook URL must not be echoed into errors.
    redactor: Redactor,
}

impl SlackDestination {
    pub fn new(common: &DestinationConfig, config: &SlackConfig) -> anyhow::Result<Self> {
        let url = reqwest::Url::parse(config.webhook_url.expose()).map_err(|e| {
            anyhow::anyhow!("destination {}: invalid webhook_url: {e}", common.name)
        })?;
        let source = config
            .text
            .clone()
            .unwrap_or_else(|| DEFAULT_TEMPLATE.to_string());
        let mut templates = Environment::new();
        templates
            .add_template_owned("text", source)
            .map_err(|e| anyhow::anyhow!("destination {}: text template: {e}", common.name))?;
        let mut redactor = Redactor::default();
        redactor.add_url(&url);
        Ok(Self {
            redactor,
            client: http_client(common, false)?,
            url: Secret::new(url),
            templates,
        })
    }

    /// Renders the message text for a delivery.
    pub fn render(&self, delivery: &Delivery) -> Result<String, DeliveryError> {
        render(&self.templates, delivery)
    }
}

fn render(templates: &Environment<'_>, delivery: &Delivery) -> Result<String, DeliveryError> {
    let mut context: Value = serde_json::from_slice(&delivery.body)
        .map_err(|e| DeliveryError::permanent(format!("stored payload is not JSON: {e}")))?;
    if let Value::Object(map) = &mut context {
        map.insert("event_id".into(), Value::String(delivery.event_id.clone()));
        let at = UNIX_EPOCH + Duration::from_millis(delivery.received_at_ms.max(0) as u64);
        map.insert(
            "received_at".into(),
            Value::String(humantime::format_rfc3339_seconds(at).to_string()),
        );
    }
    templates
        .get_template("text")
        .and_then(|t| t.render(&context))
        .map_err(|e| DeliveryError::permanent(format!("text template failed: {e}")))
}

#[async_trait]
impl Destination for SlackDestination {
    fn kind(&self) -> &'static str {
        "slack"
    }

    async fn deliver(&self, delivery: &Delivery) -> Result<(), DeliveryError> {
        let text = self.render(delivery)?;
        let response = self
            .client
            .post(self.url.expose().clone())
            .json(&serde_json::json!({ "text": text }))
            .send()
            .await
            .map_err(transport_error)?;
        if response.status().is_success() {
            drain(response).await;
            return Ok(());
        }
        // Slack's documented 4xx answers are permanent; status_error retries only 408/429/5xx.
        Err(status_error(response, &self.redactor).await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn delivery(body: &str) -> Delivery {
        Delivery {
            id: 1,
            event_id: "ev-1".into(),
            destination: "slack".into(),
            attempts: 0,
            received_at_ms: 0,
            body: Bytes::from(body.to_string()),
            claim: None,
        }
    }

    fn env(src: &str) -> Environment<'static> {
        let mut e = Environment::new();
        e.add_template_owned("text", src.to_string()).unwrap();
        e
    }

    #[test]
    fn default_text_names_event_face_app_ip_and_details() {
        let text = render(
            &env(DEFAULT_TEMPLATE),
            &delivery(r#"{"eventName":"ENROLL","facialId":"f-9","appId":"fioa1","clientIp":"1.2.3.4","details":{"timestamp":"2026-11-27","gender":"female","age":31}}"#),
        )
        .unwrap();
        for part in [
            "ENROLL",
            "f-9",
            "fioa1",
            "1.2.3.4",
            "female",
            "31",
            "2026-11-27",
        ] {
            assert!(text.contains(part), "{part} missing from {text}");
        }
        let auth = render(
            &env(DEFAULT_TEMPLATE),
            &delivery(
                r#"{"eventName":"AUTH","facialId":"f-9","appId":"fioa1","clientIp":"1.2.3.4"}"#,
            ),
        )
        .unwrap();
        assert!(!auth.contains("gender"), "{auth}");
    }

    #[test]
    fn custom_template_sees_payload_and_event_id() {
        let text = render(
            &env("{{eventName}}/{{facialId}}/{{event_id}}"),
            &delivery(r#"{"eventName":"AUTH","facialId":"f-9","appId":"a","clientIp":"1.2.3.4"}"#),
        )
        .unwrap();
        assert_eq!(text, "AUTH/f-9/ev-1");
    }
}
