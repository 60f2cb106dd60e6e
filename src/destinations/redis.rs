//! `type: redis`: append each event to a Redis stream (`XADD`).
//!
//! # Delivered means added
//! An attempt succeeds when `XADD` answers with the new entry's ID. The entry's fields are
//! `event_id`, `event_name`, `app_id`, `received_at` (RFC 3339, milliseconds) and
//! `payload` (the FACEIO body byte for byte). With `maxlen`, the stream is trimmed
//! approximately (`MAXLEN ~`). Redis has no deduplication: a retry after a lost reply
//! may add a second entry, which consumers recognise by `event_id`.
//!
//! # Failures
//! Refused credentials (`WRONGPASS`, `NOAUTH`), missing permissions (`NOPERM`) and a key
//! that holds another type (`WRONGTYPE`) are permanent. Timeouts, lost connections and
//! other server answers (`LOADING`, `OOM`, `READONLY`, …) are retried.
//!
//! # Connection
//! One multiplexed connection per destination (the `redis` crate's `ConnectionManager`),
//! made on first use, shared by concurrent attempts, and remade with backoff when it
//! drops. Error texts never hold the URL or its password.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ErrorKind, RedisError};
use tokio::sync::OnceCell;

use super::queue::{self, EventFields};
use super::web::Redactor;
use super::{DeliveryError, Destination, KindConfig, PreflightError, SetupError};
use crate::config::raw::destination_keys;
use crate::config::{DestinationConfig, KindContext, Secret};
use crate::store::Delivery;
use crate::template::{self, TextTemplate};

destination_keys! {
    /// A destination with `type: redis`, as written.
    RawRedis {
        /// `redis://` or `rediss://` URL (may carry `user:password@`: a secret).
        pub url: String,
        /// The stream's key, a template over the event (`faceio-events`).
        pub stream: String,
        /// Trim the stream to about this many entries (`XADD MAXLEN ~`); default: never.
        pub maxlen: Option<u64>,
    }
}

/// `type: redis`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct RedisConfig {
    /// Server URL (checked: `redis://` or `rediss://` with a host).
    pub url: Secret,
    /// Stream key template (checked to compile and to render non-empty keys).
    pub stream: String,
    /// Approximate trimming (`maxlen`, at least 1).
    pub maxlen: Option<u64>,
}

/// Commands in flight on the one connection do not wait for each other.
const DEFAULT_CONCURRENCY: usize = 16;

impl KindConfig for RedisConfig {
    const TYPE: &'static str = "redis";
    const DEFAULT_CONCURRENCY: usize = DEFAULT_CONCURRENCY;
    type Raw = RawRedis;

    fn validate(raw: RawRedis, cx: &mut KindContext<'_>) -> Option<Self> {
        let mut ok = queue::check_url(cx, &raw.url, &["redis", "rediss"]);
        ok &= match TextTemplate::new("stream", &raw.stream) {
            Err(errors) => cx.templates(Some(errors)),
            Ok(t) => template::samples("fioa-sample").iter().all(|(event, ctx)| {
                let empty = t.render(ctx).unwrap_or_default().is_empty();
                if empty {
                    cx.error(
                        &["stream"],
                        format!("renders an empty key for the sample {event} event"),
                    );
                }
                !empty
            }),
        };
        if raw.maxlen == Some(0) {
            cx.error(&["maxlen"], "must be at least 1");
            ok = false;
        }
        ok.then(|| RedisConfig {
            url: Secret::new(raw.url.trim().to_owned()),
            stream: raw.stream,
            maxlen: raw.maxlen,
        })
    }

    fn build(&self, common: &DestinationConfig) -> Result<Arc<dyn Destination>, SetupError> {
        Ok(Arc::new(RedisDestination::new(common, self)?))
    }

    fn summary(&self) -> String {
        match self.maxlen {
            Some(n) => format!("XADD to {}, trimmed to about {n} entries", self.stream),
            None => format!("XADD to {}", self.stream),
        }
    }
}

/// A Redis Streams destination.
pub struct RedisDestination {
    client: redis::Client,
    stream: TextTemplate,
    maxlen: Option<u64>,
    /// Bounds each attempt and each connect.
    timeout: Duration,
    /// Made by the first attempt; reconnects by itself afterwards.
    connection: OnceCell<ConnectionManager>,
    /// The URL and its password: never echoed.
    redactor: Redactor,
}

impl RedisDestination {
    pub fn new(common: &DestinationConfig, config: &RedisConfig) -> Result<Self, SetupError> {
        let invalid = |reason: String| SetupError::Invalid {
            destination: common.name.clone(),
            reason,
        };
        let redactor = queue::redactor(&config.url, &[]);
        let client = redis::Client::open(config.url.expose().as_str())
            .map_err(|e| invalid(format!("invalid url: {}", redactor.apply(&e.to_string()))))?;
        let stream = queue::template(common, "stream", &config.stream)?;
        Ok(Self {
            client,
            stream,
            maxlen: config.maxlen,
            timeout: common.timeout,
            connection: OnceCell::new(),
            redactor,
        })
    }

    /// The shared connection (a handle: cloning it is cheap and shares the socket).
    async fn connection(&self) -> Result<ConnectionManager, DeliveryError> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_max_delay(Duration::from_secs(2))
            .set_number_of_retries(3);
        self.connection
            .get_or_try_init(|| ConnectionManager::new_with_config(self.client.clone(), config))
            .await
            .cloned()
            .map_err(|e| self.classify(&e))
    }

    /// The `XADD` for one delivery.
    pub fn command(&self, delivery: &Delivery) -> Result<redis::Cmd, DeliveryError> {
        let ctx = template::context(&delivery.body, &delivery.event_id, delivery.received_at_ms)
            .map_err(DeliveryError::permanent)?;
        let key = self.stream.render(&ctx).map_err(DeliveryError::permanent)?;
        if key.is_empty() {
            return Err(DeliveryError::permanent("the stream key rendered empty"));
        }
        let fields = EventFields::new(delivery, &ctx);
        let mut cmd = redis::cmd("XADD");
        cmd.arg(key);
        if let Some(n) = self.maxlen {
            cmd.arg("MAXLEN").arg("~").arg(n);
        }
        cmd.arg("*")
            .arg("event_id")
            .arg(fields.event_id)
            .arg("event_name")
            .arg(fields.event_name)
            .arg("app_id")
            .arg(fields.app_id)
            .arg("received_at")
            .arg(fields.received_at)
            .arg("payload")
            .arg(delivery.body.as_ref());
        Ok(cmd)
    }

    /// Permanent: refused credentials or permissions, a key of another type. The rest
    /// (I/O, timeouts, a server loading or out of memory) may pass.
    fn classify(&self, e: &RedisError) -> DeliveryError {
        let text = self.redactor.apply(&e.to_string());
        let refused = matches!(e.kind(), ErrorKind::AuthenticationFailed)
            || matches!(e.code(), Some("WRONGPASS" | "NOAUTH" | "NOPERM"));
        if refused {
            DeliveryError::permanent(format!("the Redis server refused: {text}"))
        } else if e.code() == Some("WRONGTYPE") {
            DeliveryError::permanent(format!("the stream key holds another type: {text}"))
        } else {
            DeliveryError::retryable(format!("Redis: {text}"))
        }
    }
}

#[async_trait]
impl Destination for RedisDestination {
    fn kind(&self) -> &'static str {
        "redis"
    }

    async fn deliver(&self, delivery: &Delivery) -> Result<(), DeliveryError> {
        let cmd = self.command(delivery)?;
        queue::within(self.timeout, "Redis", async {
            let mut conn = self.connection().await?;
            cmd.query_async::<String>(&mut conn)
                .await
                .map(drop)
                .map_err(|e| self.classify(&e))
        })
        .await
    }

    /// Connects (credentials), and checks that each sample event's key is a stream or
    /// free.
    async fn preflight(&self) -> Result<(), PreflightError> {
        let mut conn = self.connection().await.map_err(queue::preflight_error)?;
        for (event, ctx) in template::samples("fioa-sample") {
            let Ok(key) = self.stream.render(&ctx) else {
                continue;
            };
            let kind: String = redis::cmd("TYPE")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .map_err(|e| queue::preflight_error(self.classify(&e)))?;
            if kind != "none" && kind != "stream" {
                return Err(PreflightError::Problem(format!(
                    "key `{key}` (the sample {event} event's stream) holds a {kind}, not a stream"
                )));
            }
        }
        Ok(())
    }
}
