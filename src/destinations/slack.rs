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

use async_trait::async_trait;

use super::{
    DeliveryError, Destination, Redactor, SetupError, drain, http_client, status_error,
    transport_error,
};
use crate::config::{DestinationConfig, Secret, SlackConfig};
use crate::store::Delivery;
use crate::telemetry::events::SlackTemplateFallback;
use crate::template::{self, SlackMessage};

/// A Slack incoming-webhook destination.
pub struct SlackDestination {
    name: String,
    client: reqwest::Client,
    url: Secret<reqwest::Url>,
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
        let url = reqwest::Url::parse(config.webhook_url.expose())
            .map_err(|e| invalid(format!("invalid webhook_url: {e}")))?;
        let message = SlackMessage::new(config.text.as_deref(), config.blocks.as_ref()).map_err(
            |errors| {
                let list: Vec<String> = errors.iter().map(|e| e.message.clone()).collect();
                invalid(list.join("; "))
            },
        )?;
        let mut redactor = Redactor::default();
        redactor.add_url(&url);
        Ok(Self {
            name: common.name.clone(),
            redactor,
            client: http_client(common, false)?,
            url: Secret::new(url),
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
        let response = self
            .client
            .post(self.url.expose().clone())
            .json(&payload)
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
