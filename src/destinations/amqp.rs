//! `type: amqp`: publish each event to a RabbitMQ (AMQP 0-9-1) exchange.
//!
//! # Delivered means confirmed
//! The channel is in confirm mode: an attempt succeeds when the broker acks the publish.
//! Messages are published `mandatory`, persistent (`delivery_mode: 2`), with
//! `message_id` (the event ID, for consumers to deduplicate on), `content_type:
//! application/json`, `timestamp`, and headers `event_id`, `event_name`, `app_id` and
//! `received_at`;
//! the body is the FACEIO body byte for byte.
//!
//! # Failures
//! A missing exchange (`NOT_FOUND`), refused credentials or permissions
//! (`ACCESS_REFUSED`; `NOT_ALLOWED` when the vhost does not exist or the user may not
//! use it) and a message the exchange routes to no queue (returned, as it was
//! `mandatory`) are permanent, with the broker's words. A nack, a timeout, a lost
//! connection and the other `NOT_ALLOWED` refusals (the vhost is down, a connection
//! limit is reached) are retried.
//!
//! # Connection
//! One connection and one confirm-mode channel per destination, opened by the first
//! attempt and shared by concurrent attempts. A broker error closes the channel (and a
//! dropped connection both); the next attempt opens new ones, so the retry schedule is
//! the reconnect backoff. Error texts never hold the URL or its password.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ErrorKind};
use tokio::sync::Mutex;

use super::queue::{self, EventFields};
use super::web::Redactor;
use super::{DeliveryError, Destination, KindConfig, PreflightError, SetupError};
use crate::config::raw::destination_keys;
use crate::config::{DestinationConfig, KindContext, Secret};
use crate::store::Delivery;
use crate::template::{self, TextTemplate};

destination_keys! {
    /// A destination with `type: amqp`, as written.
    RawAmqp {
        /// `amqp://` or `amqps://` URL with credentials and vhost (a secret).
        pub url: String,
        /// The exchange; it must exist (the operator declares it).
        pub exchange: String,
        /// The routing key, a template over the event (`{{eventName}}`).
        pub routing_key: String,
    }
}

/// `type: amqp`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct AmqpConfig {
    /// Broker URL (checked: `amqp://` or `amqps://` with a host).
    pub url: Secret,
    /// Exchange name (not empty: the default exchange routes by queue name, which
    /// `routing_key` then names).
    pub exchange: String,
    /// Routing key template (checked to compile and render the samples).
    pub routing_key: String,
}

impl KindConfig for AmqpConfig {
    const TYPE: &'static str = "amqp";
    /// Confirms for many publishes come back together on one channel.
    const DEFAULT_CONCURRENCY: usize = 16;
    type Raw = RawAmqp;

    fn validate(raw: RawAmqp, cx: &mut KindContext<'_>) -> Option<Self> {
        let mut ok = queue::check_url(cx, &raw.url, &["amqp", "amqps"]);
        if raw.exchange.trim().is_empty() {
            cx.error(&["exchange"], "must not be empty");
            ok = false;
        }
        if let Err(errors) = TextTemplate::new("routing_key", &raw.routing_key) {
            ok &= cx.templates(Some(errors));
        }
        ok.then(|| AmqpConfig {
            url: Secret::new(raw.url.trim().to_owned()),
            exchange: raw.exchange,
            routing_key: raw.routing_key,
        })
    }

    fn build(&self, common: &DestinationConfig) -> Result<Arc<dyn Destination>, SetupError> {
        Ok(Arc::new(AmqpDestination::new(common, self)?))
    }

    fn summary(&self) -> String {
        format!(
            "exchange {}, routing key {}, publisher confirms",
            self.exchange, self.routing_key
        )
    }
}

/// The open connection and its confirm-mode channel.
struct Link {
    /// Kept so the connection lives as long as its channel is used.
    _connection: Connection,
    channel: Channel,
}

/// A RabbitMQ destination.
pub struct AmqpDestination {
    url: Secret,
    exchange: String,
    routing_key: TextTemplate,
    /// Bounds each attempt (the connect and the confirm).
    timeout: Duration,
    /// The link in use, if open; replaced when its channel has closed.
    link: Mutex<Option<Arc<Link>>>,
    /// The URL and its password: never echoed.
    redactor: Redactor,
}

impl AmqpDestination {
    pub fn new(common: &DestinationConfig, config: &AmqpConfig) -> Result<Self, SetupError> {
        let routing_key = queue::template(common, "routing_key", &config.routing_key)?;
        Ok(Self {
            redactor: queue::redactor(&config.url, &[]),
            url: config.url.clone(),
            exchange: config.exchange.clone(),
            routing_key,
            timeout: common.timeout,
            link: Mutex::new(None),
        })
    }

    /// The open channel, opening a connection and a channel if the last ones closed.
    async fn channel(&self) -> Result<Channel, DeliveryError> {
        let mut link = self.link.lock().await;
        if let Some(l) = link.as_ref()
            && l.channel.status().connected()
        {
            return Ok(l.channel.clone());
        }
        *link = None;
        let connection = Connection::connect(self.url.expose(), ConnectionProperties::default())
            .await
            .map_err(|e| self.classify(&e))?;
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| self.classify(&e))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| self.classify(&e))?;
        *link = Some(Arc::new(Link {
            _connection: connection,
            channel: channel.clone(),
        }));
        Ok(channel)
    }

    /// Permanent: what the broker refuses by name (missing exchange, credentials,
    /// permissions). The rest (I/O, a closed channel or connection) may pass.
    fn classify(&self, e: &lapin::Error) -> DeliveryError {
        let text = self.redactor.apply(&e.to_string());
        let permanent = match e.kind() {
            ErrorKind::ProtocolError(amqp) => match amqp.kind() {
                AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND | AMQPSoftError::ACCESSREFUSED) => true,
                AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED) => {
                    not_allowed_is_permanent(amqp.get_message().as_str())
                }
                _ => false,
            },
            ErrorKind::AuthProviderError(_) => true,
            _ => false,
        };
        if permanent {
            DeliveryError::permanent(format!("the broker refused: {text}"))
        } else {
            DeliveryError::retryable(format!("AMQP: {text}"))
        }
    }

    /// The routing key and properties for one delivery.
    fn message(&self, delivery: &Delivery) -> Result<(String, BasicProperties), DeliveryError> {
        let ctx = template::context(&delivery.body, &delivery.event_id, delivery.received_at_ms)
            .map_err(DeliveryError::permanent)?;
        let key = self
            .routing_key
            .render(&ctx)
            .map_err(DeliveryError::permanent)?;
        if key.len() > 255 {
            return Err(DeliveryError::permanent(
                "the routing key is longer than 255 bytes",
            ));
        }
        let fields = EventFields::new(delivery, &ctx);
        let mut headers = FieldTable::default();
        for (name, value) in [
            ("event_id", &fields.event_id),
            ("event_name", &fields.event_name),
            ("app_id", &fields.app_id),
            ("received_at", &fields.received_at),
        ] {
            headers.insert(
                name.into(),
                AMQPValue::LongString(LongString::from(value.as_str())),
            );
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let properties = BasicProperties::default()
            .with_message_id(ShortString::from(delivery.event_id.as_str()))
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_timestamp(now)
            .with_headers(headers);
        Ok((key, properties))
    }

    async fn publish(&self, delivery: &Delivery) -> Result<(), DeliveryError> {
        let (key, properties) = self.message(delivery)?;
        let channel = self.channel().await?;
        let confirm = channel
            .basic_publish(
                self.exchange.as_str().into(),
                key.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &delivery.body,
                properties,
            )
            .await
            .map_err(|e| self.classify(&e))?
            .await
            .map_err(|e| self.classify(&e))?;
        match confirm {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(returned)) => Err(DeliveryError::permanent(format!(
                "exchange `{}` routes key `{key}` to no queue (returned: {} {})",
                self.exchange, returned.reply_code, returned.reply_text
            ))),
            Confirmation::Nack(_) => Err(DeliveryError::retryable(
                "the broker could not take the message (nack)",
            )),
            Confirmation::NotRequested => Err(DeliveryError::retryable(
                "the channel was not in confirm mode",
            )),
        }
    }
}

/// Whether RabbitMQ's `NOT_ALLOWED` (530) says something no retry changes: the vhost
/// does not exist, or the user may not use it. The same code also says the vhost is down
/// or a connection limit is reached (the limit's text also reads "access ... refused"),
/// which pass: retried.
fn not_allowed_is_permanent(text: &str) -> bool {
    let text = text.to_ascii_lowercase();
    let passing = text.contains("limit") || text.contains("is down");
    !passing && (text.contains("not found") || text.contains("refused"))
}

#[async_trait]
impl Destination for AmqpDestination {
    fn kind(&self) -> &'static str {
        "amqp"
    }

    async fn deliver(&self, delivery: &Delivery) -> Result<(), DeliveryError> {
        queue::within(self.timeout, "AMQP", self.publish(delivery)).await
    }

    /// Connects (credentials, vhost) and checks the exchange exists (a passive declare,
    /// which changes nothing).
    async fn preflight(&self) -> Result<(), PreflightError> {
        let channel = self.channel().await.map_err(queue::preflight_error)?;
        channel
            .exchange_declare(
                self.exchange.as_str().into(),
                lapin::ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    passive: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| match queue::preflight_error(self.classify(&e)) {
                PreflightError::Problem(why) => PreflightError::Problem(format!(
                    "exchange `{}` does not exist or is not allowed ({why}); declare it first",
                    self.exchange
                )),
                other => other,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::not_allowed_is_permanent;

    #[test]
    fn not_allowed_is_permanent_only_for_a_missing_or_forbidden_vhost() {
        for text in [
            "NOT_ALLOWED - vhost /nowhere not found",
            "NOT_ALLOWED - access to vhost '/' refused for user 'relay'",
        ] {
            assert!(not_allowed_is_permanent(text), "{text}");
        }
        for text in [
            "NOT_ALLOWED - vhost / is down",
            "NOT_ALLOWED - access to vhost '/' refused for user 'relay': \
             vhost connection limit (10) is reached",
            "NOT_ALLOWED - access to vhost '/' refused for user 'relay': \
             user connection limit (5) is reached",
            "NOT_ALLOWED - something new",
        ] {
            assert!(!not_allowed_is_permanent(text), "{text}");
        }
    }
}
