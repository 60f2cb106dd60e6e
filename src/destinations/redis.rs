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
//! Refused credentials (`WRONGPASS`, `NOAUTH`, any other error answer to `AUTH`), missing
//! permissions (`NOPERM`) and a key that holds another type (`WRONGTYPE`) are permanent,
//! dead-lettered with the server's words. Timeouts, lost connections, a full server
//! (`ERR max number of clients reached`) and other server answers (`LOADING`, `BUSY`,
//! `OOM`, `READONLY`, `TRYAGAIN`, `MASTERDOWN`, `CLUSTERDOWN`, …) are retried.
//!
//! # Connection
//! One multiplexed connection per destination, made on first use and shared by concurrent
//! attempts. The relay sends `AUTH` itself (so a refusal keeps the server's words: the
//! `redis` crate would say only "Password authentication failed"). A failed attempt drops
//! the connection it used, and a failed connect keeps nothing: the next attempt connects
//! anew, so the destination's retry schedule is the only backoff and a server that came
//! back (or a password fixed on the server) serves the next attempt. Error texts never
//! hold the URL or its password.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, ErrorKind, RedisConnectionInfo, RedisError};
use tokio::sync::Mutex;

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

impl KindConfig for RedisConfig {
    const TYPE: &'static str = "redis";
    /// Commands in flight on the one connection do not wait for each other.
    const DEFAULT_CONCURRENCY: usize = 16;
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
    /// `AUTH` and `SELECT`, sent by the relay after connecting.
    login: Login,
    /// The connection and its number (how many were made before it); `None` until the
    /// first attempt and after a failed one.
    connection: Mutex<(u64, Option<MultiplexedConnection>)>,
    /// The URL and its password: never echoed.
    redactor: Redactor,
}

/// What the URL asks for after connecting; the client itself connects without it.
struct Login {
    username: Option<String>,
    password: Option<Secret>,
    db: i64,
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
        let info = client.get_connection_info().clone();
        let settings = info.redis_settings();
        // RESP3's `HELLO` carries the credentials and keeps the server's words: left to
        // the client. RESP2's `AUTH` is sent by the relay.
        let (login, bare) = if settings.protocol().supports_resp3() {
            let login = Login {
                username: None,
                password: None,
                db: 0,
            };
            (login, settings.clone())
        } else {
            let login = Login {
                username: settings
                    .username()
                    .filter(|u| !u.is_empty())
                    .map(str::to_owned),
                password: settings.password().map(|p| Secret::new(p.to_owned())),
                db: settings.db(),
            };
            (
                login,
                RedisConnectionInfo::default().set_skip_set_lib_name(),
            )
        };
        let client = redis::Client::open(info.set_redis_settings(bare))
            .map_err(|e| invalid(format!("invalid url: {}", redactor.apply(&e.to_string()))))?;
        let stream = queue::template(common, "stream", &config.stream)?;
        Ok(Self {
            client,
            stream,
            maxlen: config.maxlen,
            timeout: common.timeout,
            login,
            connection: Mutex::new((0, None)),
            redactor,
        })
    }

    /// The shared connection (a handle: cloning it is cheap and shares the socket) and
    /// its number; connects (one attempt at a time) when there is none.
    async fn connection(&self) -> Result<(u64, MultiplexedConnection), DeliveryError> {
        let mut slot = self.connection.lock().await;
        if let Some(conn) = &slot.1 {
            return Ok((slot.0, conn.clone()));
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout));
        let mut conn = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| self.classify(&e, false))?;
        if let Some(password) = &self.login.password {
            let mut auth = redis::cmd("AUTH");
            if let Some(user) = &self.login.username {
                auth.arg(user);
            }
            auth.arg(password.expose())
                .exec_async(&mut conn)
                .await
                .map_err(|e| self.classify(&e, true))?;
        }
        if self.login.db != 0 {
            redis::cmd("SELECT")
                .arg(self.login.db)
                .exec_async(&mut conn)
                .await
                .map_err(|e| self.classify(&e, true))?;
        }
        slot.0 += 1;
        slot.1 = Some(conn.clone());
        Ok((slot.0, conn))
    }

    /// Drops connection number `n` if it is still the shared one.
    async fn forget(&self, n: u64) {
        let mut slot = self.connection.lock().await;
        if slot.0 == n {
            slot.1 = None;
        }
    }

    /// The `XADD` for one delivery.
    fn command(&self, delivery: &Delivery) -> Result<redis::Cmd, DeliveryError> {
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

    /// See [`classify`].
    fn classify(&self, e: &RedisError, login: bool) -> DeliveryError {
        classify(e, login, &self.redactor.apply(&e.to_string()))
    }
}

/// Server answers that a later attempt may get past, whatever command they answer.
const PASSING: [&str; 7] = [
    "LOADING",
    "BUSY",
    "OOM",
    "READONLY",
    "TRYAGAIN",
    "MASTERDOWN",
    "CLUSTERDOWN",
];

/// Permanent: refused credentials or permissions (any error answer to `AUTH`/`SELECT`
/// when `login`, but for [`PASSING`] ones and a full server), a key of another type.
/// The rest (I/O, timeouts, a server loading, busy or out of memory) may pass. `text` is
/// the error, redacted.
fn classify(e: &RedisError, login: bool, text: &str) -> DeliveryError {
    let code = e.code();
    let passing = code.is_some_and(|c| PASSING.contains(&c));
    if text.contains("max number of clients reached") || passing {
        return DeliveryError::retryable(format!("Redis: {text}"));
    }
    let refused = matches!(e.kind(), ErrorKind::AuthenticationFailed)
        || matches!(code, Some("WRONGPASS" | "NOAUTH" | "NOPERM"))
        || (login && code.is_some());
    if refused {
        DeliveryError::permanent(format!("the Redis server refused: {text}"))
    } else if code == Some("WRONGTYPE") {
        DeliveryError::permanent(format!("the stream key holds another type: {text}"))
    } else {
        DeliveryError::retryable(format!("Redis: {text}"))
    }
}

#[async_trait]
impl Destination for RedisDestination {
    fn kind(&self) -> &'static str {
        "redis"
    }

    async fn deliver(&self, delivery: &Delivery) -> Result<(), DeliveryError> {
        let cmd = self.command(delivery)?;
        let mut used = None;
        let result = queue::within(self.timeout, "Redis", async {
            let (n, mut conn) = self.connection().await?;
            used = Some(n);
            cmd.query_async::<String>(&mut conn)
                .await
                .map(drop)
                .map_err(|e| self.classify(&e, false))
        })
        .await;
        // Whatever went wrong (a dead socket, a hung server, a failover), the next
        // attempt starts on a new connection.
        if let (Err(_), Some(n)) = (&result, used) {
            self.forget(n).await;
        }
        result
    }

    /// Connects (credentials), and checks that each sample event's key is a stream or
    /// free.
    async fn preflight(&self) -> Result<(), PreflightError> {
        let (_, mut conn) = self.connection().await.map_err(queue::preflight_error)?;
        for (event, ctx) in template::samples("fioa-sample") {
            let Ok(key) = self.stream.render(&ctx) else {
                continue;
            };
            let kind: String = redis::cmd("TYPE")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .map_err(|e| queue::preflight_error(self.classify(&e, false)))?;
            if kind != "none" && kind != "stream" {
                return Err(PreflightError::Problem(format!(
                    "key `{key}` (the sample {event} event's stream) holds a {kind}, not a stream"
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The error a Redis server's answer `-{line}` becomes.
    fn answer(line: &str) -> RedisError {
        match redis::parse_redis_value(format!("-{line}\r\n").as_bytes()) {
            Ok(value) => value.extract_error().expect_err("an error answer"),
            Err(e) => e,
        }
    }

    fn permanent(line: &str, login: bool) -> bool {
        let e = answer(line);
        let verdict = classify(&e, login, &e.to_string());
        matches!(verdict, DeliveryError::Permanent { .. })
    }

    #[test]
    fn a_server_that_may_recover_is_retried_even_when_answering_auth() {
        for line in [
            "LOADING Redis is loading the dataset in memory",
            "BUSY Redis is busy running a script",
            "READONLY You can't write against a read only replica.",
            "TRYAGAIN Multiple keys request during rehashing of slot",
            "MASTERDOWN Link with MASTER is down",
            "CLUSTERDOWN The cluster is down",
            "OOM command not allowed when used memory > 'maxmemory'.",
            "ERR max number of clients reached",
        ] {
            assert!(!permanent(line, false), "{line}");
            assert!(!permanent(line, true), "{line} (answering AUTH)");
        }
    }

    #[test]
    fn refusals_and_a_key_of_another_type_are_permanent_with_the_servers_words() {
        for line in [
            "WRONGPASS invalid username-password pair or user is disabled.",
            "NOAUTH Authentication required.",
            "NOPERM User u has no permissions to run the 'xadd' command",
            "WRONGTYPE Operation against a key holding the wrong kind of value",
        ] {
            assert!(permanent(line, false), "{line}");
        }
        // Any other error answer to AUTH is a refusal; to XADD it may pass.
        let other = "ERR AUTH <password> called without any password configured";
        assert!(permanent(other, true));
        assert!(!permanent(other, false));
        let e = answer("WRONGPASS invalid username-password pair or user is disabled.");
        let DeliveryError::Permanent { reason } = classify(&e, true, &e.to_string()) else {
            panic!("a refused password was retried");
        };
        assert!(
            reason.contains("invalid username-password pair"),
            "{reason}"
        );
        let e = RedisError::from((
            ErrorKind::AuthenticationFailed,
            "Password authentication failed",
        ));
        assert!(matches!(
            classify(&e, false, "x"),
            DeliveryError::Permanent { .. }
        ));
    }
}
