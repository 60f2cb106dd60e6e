//! Destinations: where deliveries go. One trait, one file per kind.
//!
//! # A kind lives in one file
//! Each kind's module owns everything about it: its raw settings (declared with
//! [`crate::config::raw::destination_keys!`], so unknown keys are refused), their
//! validation into its typed config ([`KindConfig::validate`], reporting through the
//! loader with line and column), its part of `check`'s summary, and its delivery (the
//! [`Destination`] its config builds). Adding a kind is one new file and one line in
//! the registry below ([`DestinationKind`]); the loader, `check`, reload and the
//! dispatchers need nothing else. The keys every kind shares (`concurrency`,
//! `timeout`, `retry`, `rate_limit`) are validated once, by the loader.
//!
//! A destination makes exactly one attempt per call and classifies the result as success,
//! a retryable failure (with the server's `Retry-After`, if it gave one) or a permanent
//! failure. Scheduling, rate limits and the dead-letter decision belong to `delivery`;
//! a destination never sleeps or loops.
//!
//! Error texts go to logs and to the dead-letter store, so they never contain a URL, a
//! header value or a token: the HTTP client's errors (hyper's) name no URL, and response
//! bodies quoted in errors pass through the destination's redactor.

mod amqp;
mod client;
mod file;
mod http;
mod nats;
mod queue;
mod redis;
mod slack;
mod web;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

pub use amqp::{AmqpConfig, AmqpDestination};
pub use file::{FileConfig, FileDestination};
pub use http::{HttpConfig, HttpDestination};
pub use nats::{NatsConfig, NatsDestination};
pub use redis::{RedisConfig, RedisDestination};
pub use slack::{SlackConfig, SlackDestination};
pub use web::parse_retry_after;

use crate::config::raw::RawDestination;
use crate::config::{DestinationConfig, KindContext};
use crate::store::Delivery;

/// Why an attempt failed, and whether trying again can help.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DeliveryError {
    /// Try again later (connect error, timeout, 408, 429, 5xx).
    #[error("{reason}")]
    Retryable {
        reason: String,
        /// The server's `Retry-After`, honoured by the scheduler.
        retry_after: Option<Duration>,
    },
    /// Trying again cannot help (other 4xx, invalid payload for the destination).
    #[error("{reason}")]
    Permanent { reason: String },
}

impl DeliveryError {
    pub fn retryable(reason: impl Into<String>) -> Self {
        Self::Retryable {
            reason: reason.into(),
            retry_after: None,
        }
    }

    pub fn permanent(reason: impl Into<String>) -> Self {
        Self::Permanent {
            reason: reason.into(),
        }
    }

    /// Whether the scheduler should try again (budget permitting).
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Retryable { .. })
    }
}

/// Why a destination could not be built from its config, or made ready to deliver (its
/// file opened). Start and reload report it before anything changes; a dispatcher whose
/// file cannot be opened asks again every poll interval. Like [`DeliveryError`], the
/// texts never hold a URL, a header value or a secret.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// A setting the HTTP library or the template engine refuses (config validation
    /// catches these first; this is the last line).
    #[error("destination {destination}: {reason}")]
    Invalid { destination: String, reason: String },
    /// `signing_secret` starts with `whsec_` but the rest is not base64.
    #[error("signing_secret: whsec_ value is not valid base64")]
    SigningSecret,
    /// A file destination's file or directory could not be created, opened, read or
    /// synced. `error` is not a `source`: its text is already in the message.
    #[error("{action} {}: {error}", .path.display())]
    File {
        /// `cannot create`, `cannot open`, `cannot read`, `cannot sync directory`.
        action: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    /// Any other I/O while opening or repairing a file (its writer thread not started).
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The blocking task that opens a file did not finish (it panicked or was cancelled).
    #[error("opening {} failed: {error}", .path.display())]
    OpenTask {
        path: PathBuf,
        error: tokio::task::JoinError,
    },
}

/// What `check` learned from a destination's server before start ([`Destination::preflight`]).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PreflightError {
    /// The server answered and the destination cannot work as configured (no stream or
    /// exchange for it, credentials refused): an error.
    #[error("{0}")]
    Problem(String),
    /// The server did not answer: a warning (it may be up by the time the relay runs;
    /// deliveries retry meanwhile).
    #[error("{0}")]
    Unreachable(String),
}

/// One kind of destination.
#[async_trait]
pub trait Destination: Send + Sync {
    /// The kind's `type:` name.
    fn kind(&self) -> &'static str;

    /// One attempt to deliver `delivery`.
    async fn deliver(&self, delivery: &Delivery) -> Result<(), DeliveryError>;

    /// Called on SIGHUP-style reopen requests; only file destinations care.
    async fn reopen(&self) -> Result<(), DeliveryError> {
        Ok(())
    }

    /// Called once this process owns the destination, before its first attempt (and
    /// again after ownership comes back). File destinations open (and repair) their file
    /// here, so a relay that does not own one never opens it. Idempotent.
    async fn acquire(&self) -> Result<(), SetupError> {
        Ok(())
    }

    /// Called when this process loses ownership of the destination: file destinations
    /// close their file (the new owner may repair it).
    async fn release(&self) {}

    /// Asks the destination's server, for `check`, whether deliveries can succeed (the
    /// queue kinds: credentials, the stream or exchange). `check` bounds it with a short
    /// timeout. Kinds with nothing to ask answer `Ok`.
    async fn preflight(&self) -> Result<(), PreflightError> {
        Ok(())
    }
}

/// One kind of destination, as its module describes it to the loader and to `check`.
pub trait KindConfig: Sized + std::fmt::Debug + Clone + PartialEq {
    /// The kind's name as written in `type:`.
    const TYPE: &'static str;
    /// `concurrency` when not set.
    const DEFAULT_CONCURRENCY: usize = 4;
    /// The raw settings, as written in the file.
    type Raw: RawDestination;

    /// Validates the kind's own keys into its typed config, reporting every problem
    /// through `cx` (with line and column); `None` when any is wrong.
    fn validate(raw: Self::Raw, cx: &mut KindContext<'_>) -> Option<Self>;

    /// Builds the destination (`common` holds the name and the shared settings). Must not
    /// do I/O that can block: a file is opened later, by [`Destination::acquire`].
    fn build(&self, common: &DestinationConfig) -> Result<Arc<dyn Destination>, SetupError>;

    /// What `check` adds to the destination's line after the shared settings (never a
    /// URL, a header value or a secret); empty for nothing.
    fn summary(&self) -> String {
        String::new()
    }

    /// What `check` shows of the messages this destination would send for the sample
    /// events (`app_id` is the first configured application's), or `None`.
    fn preview(&self, _name: &str, _app_id: &str) -> Option<String> {
        None
    }

    /// A file this destination writes and no other destination may (the key naming it,
    /// and the path): two destinations appending to one file would cut each other's
    /// lines, so the loader refuses the second.
    fn exclusive_file(&self) -> Option<(&'static str, &Path)> {
        None
    }
}

/// The registry: declares [`DestinationKind`], one variant per kind, and dispatches to
/// each kind's [`KindConfig`].
macro_rules! kinds {
    ($($(#[$doc:meta])* $variant:ident($config:ty),)*) => {
        /// Kind-specific destination settings (`type:`), one variant per kind.
        #[derive(Debug, Clone, PartialEq)]
        pub enum DestinationKind {
            $($(#[$doc])* $variant($config),)*
        }

        impl DestinationKind {
            /// Every kind's `type:` name, in the order documented.
            pub const TYPES: &[&str] = &[$(<$config as KindConfig>::TYPE),*];

            /// The kind's name, as written in `type:`.
            pub fn type_name(&self) -> &'static str {
                match self {
                    $(Self::$variant(_) => <$config as KindConfig>::TYPE,)*
                }
            }

            /// Reads and validates the settings of the kind named `type_name` (one of
            /// [`Self::TYPES`]; the loader checked).
            pub(crate) fn load(type_name: &str, cx: &mut KindContext<'_>) -> Option<Self> {
                $(if type_name == <$config as KindConfig>::TYPE {
                    return cx.load::<$config>().map(Self::$variant);
                })*
                None
            }

            /// The kind's part of `check`'s line (see [`KindConfig::summary`]).
            pub fn summary(&self) -> String {
                match self {
                    $(Self::$variant(c) => c.summary(),)*
                }
            }

            /// See [`KindConfig::preview`].
            pub fn preview(&self, name: &str, app_id: &str) -> Option<String> {
                match self {
                    $(Self::$variant(c) => c.preview(name, app_id),)*
                }
            }

            /// See [`KindConfig::exclusive_file`].
            pub fn exclusive_file(&self) -> Option<(&'static str, &Path)> {
                match self {
                    $(Self::$variant(c) => c.exclusive_file(),)*
                }
            }

            fn build(
                &self,
                common: &DestinationConfig,
            ) -> Result<Arc<dyn Destination>, SetupError> {
                match self {
                    $(Self::$variant(c) => c.build(common),)*
                }
            }
        }
    };
}

kinds! {
    /// `type: slack`: a Slack incoming webhook.
    Slack(SlackConfig),
    /// `type: http`: POST to an internal API.
    Http(HttpConfig),
    /// `type: file`: JSON Lines, each line synced.
    File(FileConfig),
    /// `type: nats`: publish to a subject, acknowledged by JetStream.
    Nats(NatsConfig),
    /// `type: redis`: `XADD` to a stream.
    Redis(RedisConfig),
    /// `type: amqp`: publish to a RabbitMQ exchange, with publisher confirms.
    Amqp(AmqpConfig),
}

/// Builds the destination a config describes.
pub fn build(config: &DestinationConfig) -> Result<Arc<dyn Destination>, SetupError> {
    config.kind.build(config)
}
