//! `type: nats`: publish each event to a NATS subject, by default through JetStream.
//!
//! # Delivered means acknowledged
//! With `jetstream: true` (the default) an attempt succeeds only when the stream that
//! stores the subject answers the publish with its ack. Every message carries the event
//! ID in `Nats-Msg-Id`, so JetStream drops a second copy within the stream's duplicate
//! window: a retry after a lost ack does not store the event twice. With `jetstream:
//! false` (core NATS, no persistence) success means only that the message was written
//! to the connection's socket (`flush`): the server does not confirm core publishes, so
//! a message written just before the connection drops is lost without an error. Core
//! NATS delivery is at most once from that point; use JetStream where every event
//! must arrive.
//!
//! # Failures
//! No stream for the subject (the publish had no responder and JetStream confirms it has
//! no such stream; while JetStream is still recovering after a restart, that is
//! retried), an invalid rendered subject, a message over the server's `max_payload` and
//! an authorization violation are permanent: no retry can change them. A timeout, a lost
//! connection or any other error is retried.
//!
//! # Connection
//! One client per destination, opened by the first attempt (never at start: a server
//! that is down must not keep the relay from starting) and shared by all concurrent
//! attempts. Once open, the client reconnects by itself with backoff; an attempt made
//! while it is away times out and is retried. Error texts never hold the URL, the token
//! or the credentials: they are built here, and the client's texts are redacted. The
//! client never sees the URL's `user:password@` (it logs its server's address at debug
//! level): they reach it as options, and a URL's lone user (`nats://TOKEN@host`) as the
//! token.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::context::{GetStreamByNameErrorKind, PublishErrorKind};
use async_nats::{ConnectErrorKind, HeaderMap};
use async_trait::async_trait;
use tokio::sync::OnceCell;

use super::queue;
use super::web::Redactor;
use super::{DeliveryError, Destination, KindConfig, PreflightError, SetupError};
use crate::config::raw::destination_keys;
use crate::config::{DestinationConfig, KindContext, Secret};
use crate::store::Delivery;
use crate::template::{self, TextTemplate};

destination_keys! {
    /// A destination with `type: nats`, as written.
    RawNats {
        /// `nats://` or `tls://` server URL (may carry `user:password@`: a secret).
        pub url: String,
        /// The subject, a template over the event (`faceio.{{eventName}}`).
        pub subject: String,
        /// Publish through JetStream and wait for the stream's ack (default `true`).
        pub jetstream: Option<bool>,
        /// A NATS credentials file (JWT and NKey seed), relative to the config file.
        pub creds_file: Option<String>,
        /// An authentication token (a secret).
        pub token: Option<String>,
    }
}

/// Header JetStream deduplicates on.
pub const MSG_ID_HEADER: &str = "Nats-Msg-Id";
/// Header carrying the relay's event ID for every consumer (core NATS too).
pub const EVENT_ID_HEADER: &str = "Faceio-Relay-Event-Id";

/// `type: nats`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct NatsConfig {
    /// Server URL (checked: `nats://` or `tls://` with a host).
    pub url: Secret,
    /// Subject template (checked to compile and to render valid subjects for the samples).
    pub subject: String,
    /// Wait for the JetStream ack (`jetstream`, default true).
    pub jetstream: bool,
    /// Credentials file, resolved against the config directory.
    pub creds_file: Option<PathBuf>,
    /// Authentication token.
    pub token: Option<Secret>,
}

impl KindConfig for NatsConfig {
    const TYPE: &'static str = "nats";
    /// Acks come back in any order on one connection: many publishes may wait at once.
    const DEFAULT_CONCURRENCY: usize = 16;
    type Raw = RawNats;

    fn validate(raw: RawNats, cx: &mut KindContext<'_>) -> Option<Self> {
        let mut ok = queue::check_url(cx, &raw.url, &["nats", "tls"]);
        match TextTemplate::new("subject", &raw.subject) {
            Err(errors) => ok &= cx.templates(Some(errors)),
            Ok(t) => {
                for (event, ctx) in template::samples("fioa-sample") {
                    let rendered = t.render(&ctx).unwrap_or_default();
                    if let Err(why) = check_subject(&rendered) {
                        cx.error(
                            &["subject"],
                            format!("renders `{rendered}` for the sample {event} event: {why}"),
                        );
                        ok = false;
                        break;
                    }
                }
            }
        }
        if raw.token.is_some() && raw.creds_file.is_some() {
            cx.error(&["token"], "set either `token` or `creds_file`, not both");
            ok = false;
        }
        if raw.token.as_deref().is_some_and(str::is_empty) {
            cx.error(&["token"], "must not be empty");
            ok = false;
        }
        ok.then(|| NatsConfig {
            url: Secret::new(raw.url.trim().to_owned()),
            subject: raw.subject,
            jetstream: raw.jetstream.unwrap_or(true),
            creds_file: raw.creds_file.map(|p| cx.resolve(&p)),
            token: raw.token.map(Secret::new),
        })
    }

    fn build(&self, common: &DestinationConfig) -> Result<Arc<dyn Destination>, SetupError> {
        Ok(Arc::new(NatsDestination::new(common, self)?))
    }

    fn summary(&self) -> String {
        let mode = if self.jetstream {
            "JetStream (waits for the stream's ack)"
        } else {
            "core NATS (no persistence)"
        };
        let auth = match (&self.token, &self.creds_file) {
            (Some(_), _) => ", token",
            (_, Some(_)) => ", credentials file",
            _ => "",
        };
        format!("subject {}, {mode}{auth}", self.subject)
    }
}

/// Whether `subject` can be published to: not empty, no whitespace, no empty token, no
/// wildcard token (`*`, `>`), which would be a subscription pattern.
fn check_subject(subject: &str) -> Result<(), &'static str> {
    if subject.is_empty() {
        return Err("the subject is empty");
    }
    if subject.chars().any(char::is_whitespace) {
        return Err("a subject must not contain whitespace");
    }
    for token in subject.split('.') {
        match token {
            "" => {
                return Err(
                    "a subject must not have an empty token (`..`, or a leading or trailing `.`)",
                );
            }
            "*" | ">" => {
                return Err(
                    "wildcards (`*`, `>`) subscribe; a message cannot be published to them",
                );
            }
            _ => {}
        }
    }
    Ok(())
}

/// A NATS destination: one shared client, opened by the first attempt.
pub struct NatsDestination {
    /// The URL without `user:password@` (async-nats logs its server's address).
    url: Secret,
    /// The URL's user and password, given to the client as options.
    user_and_password: Option<(String, Secret)>,
    /// `token`, or a URL's lone user (`nats://TOKEN@host`).
    token: Option<Secret>,
    creds_file: Option<PathBuf>,
    jetstream: bool,
    subject: TextTemplate,
    /// Bounds the connect and each publish (the destination's `timeout`).
    timeout: Duration,
    /// The client, once connected. A failed connect leaves it empty for the next attempt.
    client: OnceCell<Connection>,
    /// The URL's password, the token: never echoed.
    redactor: Redactor,
}

impl NatsDestination {
    pub fn new(common: &DestinationConfig, config: &NatsConfig) -> Result<Self, SetupError> {
        let subject = queue::template(common, "subject", &config.subject)?;
        let (url, userinfo) = queue::without_userinfo(&config.url);
        let (mut user_and_password, mut token) = (None, config.token.clone());
        match userinfo {
            Some(queue::UserInfo {
                user,
                password: Some(password),
            }) => user_and_password = Some((user, password)),
            Some(queue::UserInfo { user, .. }) => {
                token = token.or(Some(Secret::new(user)));
            }
            None => {}
        }
        let redactor = queue::redactor(&config.url, &token.iter().collect::<Vec<_>>());
        Ok(Self {
            url,
            user_and_password,
            token,
            creds_file: config.creds_file.clone(),
            jetstream: config.jetstream,
            subject,
            timeout: common.timeout,
            client: OnceCell::new(),
            redactor,
        })
    }

    /// The subject for one delivery; a subject that cannot be published to is permanent.
    fn subject_for(&self, delivery: &Delivery) -> Result<String, DeliveryError> {
        let ctx = template::context(&delivery.body, &delivery.event_id, delivery.received_at_ms)
            .map_err(DeliveryError::permanent)?;
        let subject = self
            .subject
            .render(&ctx)
            .map_err(DeliveryError::permanent)?;
        check_subject(&subject)
            .map_err(|why| DeliveryError::permanent(format!("subject `{subject}`: {why}")))?;
        Ok(subject)
    }

    /// The shared client, connecting first if no attempt has yet.
    async fn client(&self) -> Result<&Connection, ConnectFailure> {
        self.client.get_or_try_init(|| self.connect()).await
    }

    async fn connect(&self) -> Result<Connection, ConnectFailure> {
        let mut options = async_nats::ConnectOptions::new()
            .name(concat!("faceio-relay/", env!("CARGO_PKG_VERSION")))
            .connection_timeout(self.timeout)
            .request_timeout(Some(self.timeout))
            // Once connected, keep reconnecting (with the client's backoff) for as long
            // as the destination lives.
            .max_reconnects(None);
        if let Some((user, password)) = &self.user_and_password {
            options = options.user_and_password(user.clone(), password.expose().clone());
        }
        if let Some(token) = &self.token {
            options = options.token(token.expose().clone());
        }
        if let Some(path) = &self.creds_file {
            options = options.credentials_file(path).await.map_err(|e| {
                ConnectFailure::Permanent(format!(
                    "cannot read creds_file {}: {}",
                    path.display(),
                    e.kind()
                ))
            })?;
        }
        match tokio::time::timeout(self.timeout, options.connect(self.url.expose().as_str())).await
        {
            Err(_) => Err(ConnectFailure::Unreachable(
                "connecting to the NATS server timed out".into(),
            )),
            Ok(Ok(client)) => {
                // One context per client: each runs its own task that collects acks.
                let mut jetstream = async_nats::jetstream::new(client.clone());
                jetstream.set_timeout(self.timeout);
                Ok(Connection { client, jetstream })
            }
            Ok(Err(e)) => {
                let text = self.redactor.apply(&e.to_string());
                Err(match e.kind() {
                    ConnectErrorKind::AuthorizationViolation | ConnectErrorKind::Authentication => {
                        ConnectFailure::Permanent(format!(
                            "the NATS server refused the credentials: {text}"
                        ))
                    }
                    _ => ConnectFailure::Unreachable(format!(
                        "cannot connect to the NATS server: {text}"
                    )),
                })
            }
        }
    }

    async fn publish(&self, subject: String, delivery: &Delivery) -> Result<(), DeliveryError> {
        let Connection { client, jetstream } =
            self.client().await.map_err(ConnectFailure::into_delivery)?;
        let mut headers = HeaderMap::new();
        headers.insert(MSG_ID_HEADER, delivery.event_id.as_str());
        headers.insert(EVENT_ID_HEADER, delivery.event_id.as_str());
        let payload = delivery.body.clone();
        if !self.jetstream {
            client
                .publish_with_headers(subject.clone(), headers, payload)
                .await
                .map_err(|e| match e.kind() {
                    async_nats::PublishErrorKind::MaxPayloadExceeded => {
                        DeliveryError::permanent(format!(
                            "subject `{subject}`: {}",
                            self.redactor.apply(&e.to_string())
                        ))
                    }
                    _ => self.retryable("publish failed", &e),
                })?;
            return client
                .flush()
                .await
                .map_err(|e| self.retryable("the server did not confirm", &e));
        }
        let published = match jetstream
            .publish_with_headers(subject.clone(), headers, payload)
            .await
        {
            Ok(ack) => ack.await.map(drop),
            Err(e) => Err(e),
        };
        match published {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == PublishErrorKind::StreamNotFound => {
                Err(self.no_responders(jetstream, &subject).await)
            }
            Err(e) => Err(self.publish_error(&subject, e)),
        }
    }

    /// "No responders" to a publish means no stream stores the subject, or JetStream is
    /// not answering yet (a server restarting recovers its streams after it accepts
    /// connections). Only JetStream itself saying there is no such stream is permanent.
    async fn no_responders(
        &self,
        jetstream: &async_nats::jetstream::Context,
        subject: &str,
    ) -> DeliveryError {
        match jetstream.stream_by_subject(subject).await {
            Err(e) if e.kind() == GetStreamByNameErrorKind::NotFound => {
                DeliveryError::permanent(format!(
                    "no JetStream stream stores subject `{subject}` (the server had no responder)"
                ))
            }
            Ok(_) => DeliveryError::retryable(format!(
                "no responder for subject `{subject}`, though a stream stores it now"
            )),
            Err(e) => self.retryable("JetStream is not answering", &e),
        }
    }

    fn retryable(&self, what: &str, e: &dyn std::fmt::Display) -> DeliveryError {
        DeliveryError::retryable(format!("{what}: {}", self.redactor.apply(&e.to_string())))
    }

    fn publish_error(
        &self,
        subject: &str,
        e: async_nats::jetstream::context::PublishError,
    ) -> DeliveryError {
        let text = self.redactor.apply(&e.to_string());
        match e.kind() {
            PublishErrorKind::MaxPayloadExceeded => {
                DeliveryError::permanent(format!("subject `{subject}`: {text}"))
            }
            PublishErrorKind::TimedOut => {
                DeliveryError::retryable(format!("no ack from JetStream in time: {text}"))
            }
            _ => DeliveryError::retryable(format!("JetStream publish failed: {text}")),
        }
    }
}

/// The open client and its JetStream context.
struct Connection {
    client: async_nats::Client,
    jetstream: async_nats::jetstream::Context,
}

/// Why the client could not be opened.
#[derive(Debug)]
enum ConnectFailure {
    /// Refused credentials, an unreadable credentials file: no retry helps.
    Permanent(String),
    /// Down, unreachable, timed out: later may work.
    Unreachable(String),
}

impl ConnectFailure {
    fn into_delivery(self) -> DeliveryError {
        match self {
            Self::Permanent(why) => DeliveryError::permanent(why),
            Self::Unreachable(why) => DeliveryError::retryable(why),
        }
    }
}

#[async_trait]
impl Destination for NatsDestination {
    fn kind(&self) -> &'static str {
        "nats"
    }

    async fn deliver(&self, delivery: &Delivery) -> Result<(), DeliveryError> {
        let subject = self.subject_for(delivery)?;
        queue::within(self.timeout, "NATS", self.publish(subject, delivery)).await
    }

    /// Connects, and with JetStream asks for the stream of each sample event's subject.
    async fn preflight(&self) -> Result<(), PreflightError> {
        let Connection { jetstream, .. } = self.client().await.map_err(|e| match e {
            ConnectFailure::Permanent(why) => PreflightError::Problem(why),
            ConnectFailure::Unreachable(why) => PreflightError::Unreachable(why),
        })?;
        if !self.jetstream {
            return Ok(());
        }
        for (event, ctx) in template::samples("fioa-sample") {
            let Ok(subject) = self.subject.render(&ctx) else {
                continue;
            };
            match jetstream.stream_by_subject(subject.as_str()).await {
                Ok(_) => {}
                Err(e) if e.kind() == GetStreamByNameErrorKind::NotFound => {
                    return Err(PreflightError::Problem(format!(
                        "no JetStream stream stores subject `{subject}` (the sample {event} event's); \
                         create one, or set `jetstream: false`"
                    )));
                }
                // No answer in time, no responder, a permissions violation: JetStream was
                // not reached, which deliveries retry. A warning, as for a server down.
                Err(e) if e.kind() == GetStreamByNameErrorKind::Request => {
                    return Err(PreflightError::Unreachable(format!(
                        "cannot look up the stream for subject `{subject}` (is JetStream \
                         enabled, may this user ask it?): {}",
                        self.redactor.apply(&e.to_string())
                    )));
                }
                Err(e) => {
                    return Err(PreflightError::Problem(format!(
                        "cannot look up the stream for subject `{subject}` (is JetStream enabled?): {}",
                        self.redactor.apply(&e.to_string())
                    )));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_that_cannot_be_published_to_are_refused() {
        assert!(check_subject("faceio.AUTH").is_ok());
        for bad in ["", "a b", "a..b", ".a", "a.", "a.*", "a.>", "faceio.\t"] {
            assert!(check_subject(bad).is_err(), "{bad:?} accepted");
        }
    }
}
