//! `type: slack`: a message to a Slack incoming webhook.
//!
//! The message (`text`, and `blocks` when configured or by default) is built by
//! [`crate::template::SlackMessage`]: printed values are escaped for mrkdwn, missing
//! fields are empty, and a configured template that fails on an event sends the default
//! message (with a warning) rather than losing the notification.
//!
//! Slack's answers: `200 ok` is success; `429` carries `Retry-After`; `400
//! invalid_payload`, `403 action_prohibited`, `404 channel_not_found` and `410
//! channel_is_archived` are permanent (no retry can fix them); 5xx are retried.

use std::sync::Arc;

use async_trait::async_trait;

use super::client::HttpClient;
use super::web::Redactor;
use super::{DeliveryError, Destination, KindConfig, SetupError};
use crate::config::raw::destination_keys;
use crate::config::{DestinationConfig, KindContext, Secret};
use crate::store::Delivery;
use crate::telemetry::events::SlackTemplateFallback;
use crate::template::{self, SlackMessage};

destination_keys! {
    /// A destination with `type: slack`, as written.
    RawSlack {
        /// The incoming-webhook URL (its path is the credential), usually
        /// `${SLACK_WEBHOOK_URL}`; http(s), and https unless the host is loopback.
        pub webhook_url: String,
        /// minijinja template of the message text, e.g.
        /// `"New {{eventName}} for {{facialId}} from {{clientIp}}"` (default: built in).
        /// Printed values are escaped for mrkdwn. With `blocks`, the notification text.
        pub text: Option<String>,
        /// Block Kit blocks (any YAML list of blocks), templates in every string value
        /// (read from the located tree, for positions).
        pub blocks: Option<serde::de::IgnoredAny>,
    }
}

/// `type: slack`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct SlackConfig {
    /// Incoming-webhook URL; its path is the credential.
    pub webhook_url: Secret,
    /// minijinja template for `text` (already checked to compile and render the
    /// samples); `None` = the default text.
    pub text: Option<String>,
    /// Block Kit `blocks` with templates in their strings (already checked); `None` =
    /// none when `text` is set, the default blocks when neither is.
    pub blocks: Option<serde_json::Value>,
}

impl KindConfig for SlackConfig {
    const TYPE: &'static str = "slack";
    type Raw = RawSlack;

    fn validate(raw: RawSlack, cx: &mut KindContext<'_>) -> Option<Self> {
        let url_ok = cx.http_url(&["webhook_url"], &raw.webhook_url, true);
        let blocks = raw.blocks.and_then(|_| cx.json(&["blocks"]));
        let templates_ok =
            cx.templates(SlackMessage::new(raw.text.as_deref(), blocks.as_ref()).err());
        (url_ok && templates_ok).then(|| SlackConfig {
            webhook_url: Secret::new(raw.webhook_url.trim().to_owned()),
            text: raw.text,
            blocks,
        })
    }

    fn build(&self, common: &DestinationConfig) -> Result<Arc<dyn Destination>, SetupError> {
        Ok(Arc::new(SlackDestination::new(common, self)?))
    }

    /// The message posted for each sample event.
    fn preview(&self, name: &str, app_id: &str) -> Option<String> {
        use std::fmt::Write as _;
        let mut out = String::new();
        // The loader rendered these already; an error here would be a bug, said plainly.
        let message = match SlackMessage::new(self.text.as_deref(), self.blocks.as_ref()) {
            Ok(m) => m,
            Err(errors) => return Some(format!("slack {name}: cannot render: {errors:?}")),
        };
        let _ = writeln!(out, "slack {name}: the message for each sample event:");
        for (event, ctx) in template::samples(app_id) {
            match message.render(&ctx) {
                Ok(rendered) => {
                    let json = serde_json::to_string_pretty(&rendered.payload)
                        .unwrap_or_else(|e| format!("(not printable: {e})"));
                    let _ = writeln!(out, "  {event}:");
                    for line in json.lines() {
                        let _ = writeln!(out, "    {line}");
                    }
                    if let Some(why) = rendered.fallback {
                        let _ = writeln!(out, "    ({why})");
                    }
                }
                Err(e) => {
                    let _ = writeln!(out, "  {event}: cannot render: {e}");
                }
            }
        }
        Some(out)
    }

    fn summary(&self) -> String {
        match (&self.text, &self.blocks) {
            (None, None) => "default message".into(),
            (Some(_), None) => "text template".into(),
            (None, Some(_)) => "blocks template, default text".into(),
            (Some(_), Some(_)) => "text and blocks templates".into(),
        }
    }
}

/// A Slack incoming-webhook destination.
pub struct SlackDestination {
    name: String,
    /// Holds the webhook URL (never shown: the client has no `Debug`).
    client: HttpClient,
    /// The compiled message templates.
    message: SlackMessage,
    /// The webhook URL must not be echoed into errors.
    redactor: Redactor,
}

impl SlackDestination {
    pub fn new(common: &DestinationConfig, config: &SlackConfig) -> Result<Self, SetupError> {
        let invalid = |reason: String| SetupError::Invalid {
            destination: common.name.clone(),
            reason,
        };
        let url = url::Url::parse(config.webhook_url.expose())
            .map_err(|e| invalid(format!("invalid webhook_url: {e}")))?;
        let message = SlackMessage::new(config.text.as_deref(), config.blocks.as_ref()).map_err(
            |errors| {
                let list: Vec<String> = errors.iter().map(|e| e.message.clone()).collect();
                invalid(list.join("; "))
            },
        )?;
        let mut redactor = Redactor::default();
        redactor.add_url(&url);
        let mut json = http::HeaderMap::new();
        json.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        Ok(Self {
            name: common.name.clone(),
            redactor,
            client: HttpClient::new(common, &url, false, json)?,
            message,
        })
    }

    /// The JSON payload posted to Slack for a delivery.
    pub fn render(&self, delivery: &Delivery) -> Result<serde_json::Value, DeliveryError> {
        let ctx = template::context(&delivery.body, &delivery.event_id, delivery.received_at_ms)
            .map_err(DeliveryError::permanent)?;
        let rendered = self
            .message
            .render(&ctx)
            .map_err(DeliveryError::permanent)?;
        if let Some(reason) = &rendered.fallback {
            SlackTemplateFallback {
                event_id: &delivery.event_id,
                destination: &self.name,
                reason,
            }
            .emit();
        }
        Ok(rendered.payload)
    }
}

#[async_trait]
impl Destination for SlackDestination {
    fn kind(&self) -> &'static str {
        "slack"
    }

    async fn deliver(&self, delivery: &Delivery) -> Result<(), DeliveryError> {
        let payload = self.render(delivery)?;
        let body =
            serde_json::to_vec(&payload).map_err(|e| DeliveryError::permanent(e.to_string()))?;
        // Slack's documented 4xx answers are permanent; only 408/429/5xx are retried.
        self.client
            .post(
                http::HeaderMap::new(),
                bytes::Bytes::from(body),
                &self.redactor,
            )
            .await
    }
}
