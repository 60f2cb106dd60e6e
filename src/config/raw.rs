//! The `relay.yaml` schema as serde structs, section by section, exactly as written in the
//! file (strings not yet parsed, defaults not yet applied). Every struct rejects unknown
//! keys. The loader deserializes each section and each element separately (see `load/`)
//! and then validates them into the typed [`super::Config`].
//!
//! The top level (`listen`, `webhook_path`, `ingress`, `store`, `applications`,
//! `destinations`, `routes`, `delivery`) is taken apart by the loader itself, so that one
//! bad section does not hide the others.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer, SeqAccess, Visitor};

/// The top-level keys, in the order they are documented.
pub const TOP_LEVEL_KEYS: &[&str] = &[
    "listen",
    "webhook_path",
    "ingress",
    "store",
    "applications",
    "destinations",
    "routes",
    "delivery",
    "admin_listen",
    "log_format",
    "log_level",
    "tls",
    "admin",
];

/// `tls:` — terminate HTTPS in the daemon.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    /// PEM certificate chain (leaf first).
    pub cert: String,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: String,
}

/// `ingress:` — limits and protections of the webhook endpoint.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIngress {
    /// Largest accepted request body: bytes, or a size with a unit `B`, `KB`, `KiB`, `MB`,
    /// `MiB` (default `64KiB`).
    pub max_body: Option<Size>,
    /// Time allowed for the request headers (default `5s`).
    pub header_timeout: Option<Dur>,
    /// Time allowed for the body once the headers are in (default `5s`).
    pub body_timeout: Option<Dur>,
    /// Longest the store may take to make an event durable before the answer is 503
    /// (default `3s`; must be under `6s`, when FACEIO gives up).
    pub store_timeout: Option<Dur>,
    /// Concurrent connections (default `1024`, at least 1).
    pub max_connections: Option<u64>,
    /// Source addresses or CIDR networks allowed to post (default: everyone).
    pub allow_ips: Option<Vec<String>>,
    /// Failed authentications (and requests for other paths or methods) tolerated per
    /// source IP before 429 (default `{ per_second: 1, burst: 10 }`).
    pub auth_failures: Option<RawAuthFailures>,
    /// A connection with no request in progress is closed after this long (default `10s`).
    pub idle_timeout: Option<Dur>,
    /// Time allowed for a new connection's TLS handshake and PROXY header (default `5s`).
    pub handshake_timeout: Option<Dur>,
    /// Concurrent connections from one client address (default `64`, at least 1).
    pub max_connections_per_ip: Option<u64>,
    /// Peers (addresses or CIDR networks) whose `X-Forwarded-For` (and, with
    /// `proxy_protocol`, PROXY header) name the client (default: none).
    pub trusted_proxies: Option<Vec<String>>,
    /// Connections from `trusted_proxies` begin with a PROXY protocol v1 or v2 header
    /// (default `false`).
    pub proxy_protocol: Option<bool>,
}

/// `admin:` — protections of the admin endpoint (`admin_listen`).
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    /// When set, `/metrics` requires `Authorization: Bearer <token>` (a secret).
    pub token: Option<String>,
    /// Concurrent admin connections (default `64`, at least 1).
    pub max_connections: Option<u64>,
    /// Time allowed for request headers (default `5s`).
    pub header_timeout: Option<Dur>,
    /// An admin connection with no request in progress is closed after this long
    /// (default `10s`).
    pub idle_timeout: Option<Dur>,
}

/// `ingress.auth_failures` — a token bucket per source IP; both keys optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuthFailures {
    /// Sustained failures per second (default 1; may be fractional; > 0).
    pub per_second: Option<f64>,
    /// Bucket size (default 10; >= 1).
    pub burst: Option<u32>,
}

/// `store:` — the durable event store.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    /// `sqlite` (default: an embedded database, one relay) or `postgres` (a shared
    /// database, several relays).
    pub backend: Option<String>,
    /// SQLite database file, relative to the config file's directory
    /// (default `./data/relay.db`). SQLite only.
    pub path: Option<String>,
    /// PostgreSQL connection URL, usually `${DATABASE_URL}`; required with `backend:
    /// postgres` (a secret: it may carry a password).
    pub url: Option<String>,
    /// PostgreSQL connections per relay, 1 to 256 (default 8).
    pub pool_size: Option<u64>,
    /// How long delivered events are kept (default `7d`).
    pub retention: Option<Dur>,
}

/// One element of `applications:`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawApplication {
    /// FACEIO application public ID; non-empty and unique.
    pub app_id: String,
    /// The webhook token, usually `${FACEIO_TOKEN}`. Exactly one of `token`, `token_file`.
    pub token: Option<String>,
    /// A file holding the token (trailing whitespace trimmed), relative to the config
    /// file's directory; e.g. `${CREDENTIALS_DIRECTORY}/faceio-token` under systemd.
    pub token_file: Option<String>,
}

/// `retry:` of a destination.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetry {
    /// Attempts before dead-lettering, counting the first (default 20, >= 1).
    pub max_attempts: Option<u32>,
    /// Base of the exponential backoff (default `1s`, > 0, <= `max_delay`).
    pub initial_delay: Option<Dur>,
    /// Cap of the backoff (default `10m`).
    pub max_delay: Option<Dur>,
}

/// `rate_limit:` of a destination: a token bucket.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    /// Sustained requests per second; may be fractional (`0.5` = one every two seconds);
    /// > 0.
    pub per_second: f64,
    /// Bucket size (default 1, >= 1).
    pub burst: Option<u32>,
}

/// The store backends, as written in `backend:`.
pub const STORE_BACKENDS: &[&str] = &["sqlite", "postgres"];

/// The keys every destination kind shares, taken out of the kind's raw struct by the
/// loader (which validates them the same way for every kind).
pub struct CommonKeys {
    pub timeout: Option<Dur>,
    pub concurrency: Option<u64>,
    pub retry: Option<RawRetry>,
    pub rate_limit: Option<RawRateLimit>,
}

/// A destination kind's raw settings, as declared with [`destination_keys!`].
pub trait RawDestination: serde::de::DeserializeOwned {
    /// Moves the shared keys out.
    fn take_common(&mut self) -> CommonKeys;
}

/// Declares a destination kind's raw struct: its own keys plus the ones every kind
/// shares (`type`, `timeout`, `concurrency`, `retry`, `rate_limit`). Unknown keys are
/// rejected. Used in each kind's file under `destinations/`.
macro_rules! destination_keys {
    ($(#[$meta:meta])* $name:ident { $($body:tt)* }) => {
        $(#[$meta])*
        #[derive(::serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            /// The kind (read by the loader to pick this struct).
            #[serde(rename = "type")]
            pub _type: ::serde::de::IgnoredAny,
            /// Per-request timeout (default `10s`, > 0).
            pub timeout: Option<$crate::config::raw::Dur>,
            /// Deliveries in flight at once, 1 to 1024 (default 4; `file`: 16, one sync each batch; `nats`, `redis`, `amqp`: 16, one connection).
            pub concurrency: Option<u64>,
            /// Retry schedule (defaults: 20 attempts, `1s` initial delay, `10m` cap).
            pub retry: Option<$crate::config::raw::RawRetry>,
            /// Optional rate limit.
            pub rate_limit: Option<$crate::config::raw::RawRateLimit>,
            $($body)*
        }

        impl $crate::config::raw::RawDestination for $name {
            fn take_common(&mut self) -> $crate::config::raw::CommonKeys {
                $crate::config::raw::CommonKeys {
                    timeout: self.timeout.take(),
                    concurrency: self.concurrency.take(),
                    retry: self.retry.take(),
                    rate_limit: self.rate_limit.take(),
                }
            }
        }
    };
}
pub(crate) use destination_keys;

/// One element of `routes:`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    /// Route name for logs and `check` (default `route-N`, 1-based); unique.
    pub name: Option<String>,
    /// Conditions that must all hold; none = every event.
    #[serde(rename = "match")]
    pub matcher: Option<RawMatch>,
    /// Destination names; a list (or one name), non-empty.
    pub to: OneOrMany,
}

/// `match:` of a route. Every key is optional; a list means "any of".
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMatch {
    /// `ENROLL`, `AUTH`, `DELETION` (others are warned about but allowed).
    #[serde(rename = "eventName")]
    pub event_name: Option<OneOrMany>,
    /// FACEIO application ID.
    #[serde(rename = "appId")]
    pub app_id: Option<OneOrMany>,
    /// Facial ID of the user.
    #[serde(rename = "facialId")]
    pub facial_id: Option<OneOrMany>,
    /// Address or CIDR network of the end user.
    #[serde(rename = "clientIp")]
    pub client_ip: Option<OneOrMany>,
    /// `male` or `female` (others are warned about).
    #[serde(rename = "details.gender")]
    pub gender: Option<OneOrMany>,
    /// `{ min, max }`, inclusive, at least one.
    #[serde(rename = "details.age")]
    pub age: Option<RawAge>,
}

/// `details.age:` of a `match:`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAge {
    /// Lowest matching age, inclusive.
    pub min: Option<f64>,
    /// Highest matching age, inclusive.
    pub max: Option<f64>,
}

/// `delivery:` — worker-wide settings.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDelivery {
    /// How long in-flight deliveries may run after SIGTERM (default `10s`).
    pub shutdown_grace: Option<Dur>,
    /// How often idle workers look for work written by other processes (default `1s`,
    /// > 0).
    pub poll_interval: Option<Dur>,
}

/// A string or a list of strings.
#[derive(Debug, Clone, PartialEq)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    /// The values with their list index (`None` for a single string).
    pub fn items(&self) -> Vec<(Option<usize>, &str)> {
        match self {
            Self::One(s) => vec![(None, s.as_str())],
            Self::Many(v) => v
                .iter()
                .enumerate()
                .map(|(i, s)| (Some(i), s.as_str()))
                .collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        matches!(self, Self::Many(v) if v.is_empty())
    }
}

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OneOrMany;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string or a list of strings")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<OneOrMany, E> {
                Ok(OneOrMany::One(v.to_owned()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<OneOrMany, A::Error> {
                let mut items = Vec::new();
                while let Some(s) = seq.next_element::<String>()? {
                    items.push(s);
                }
                Ok(OneOrMany::Many(items))
            }
        }
        d.deserialize_any(V)
    }
}

/// A duration such as `500ms`, `5s`, `10m`, `24h` or `7d` (humantime syntax).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dur(pub Duration);

/// Parses a humantime duration; the message never repeats the text.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    if t.is_empty() {
        return Err("empty duration; write a number and a unit, such as 5s".into());
    }
    if t.parse::<f64>().is_ok() {
        return Err("a duration needs a unit, such as 500ms, 5s, 10m, 24h or 7d".into());
    }
    humantime::parse_duration(t).map_err(|e| match e {
        humantime::DurationError::UnknownUnit { .. } => {
            "unknown duration unit; use ms, s, m, h or d (e.g. 500ms, 5s, 10m, 24h, 7d)".into()
        }
        humantime::DurationError::NumberOverflow => "duration is too large".into(),
        _ => {
            "invalid duration; write a number and a unit, such as 500ms, 5s, 10m, 24h or 7d".into()
        }
    })
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Dur;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration such as 500ms, 5s, 10m, 24h or 7d")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Dur, E> {
                parse_duration(v).map(Dur).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Dur, E> {
                Err(E::custom(
                    "a duration needs a unit, such as 500ms, 5s, 10m, 24h or 7d",
                ))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Dur, E> {
                self.visit_u64(v.unsigned_abs())
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Dur, E> {
                self.visit_u64(0)
            }
        }
        d.deserialize_any(V)
    }
}

/// A size in bytes: an integer, or a number with a unit `B`, `KB` (1000), `KiB` (1024),
/// `MB`, `MiB`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Size(pub u64);

/// Parses a size; the message never repeats the text.
pub fn parse_size(text: &str) -> Result<u64, String> {
    const HELP: &str = "write bytes or a number with a unit B, KB, KiB, MB or MiB, such as 64KiB";
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    if digits == 0 {
        return Err(format!("invalid size; {HELP}"));
    }
    let number: u64 = t[..digits]
        .parse()
        .map_err(|_| "size is too large".to_string())?;
    let factor: u64 = match t[digits..].trim_start() {
        "" | "B" => 1,
        "KB" | "kB" => 1000,
        "KiB" => 1024,
        "MB" => 1000 * 1000,
        "MiB" => 1024 * 1024,
        _ => return Err(format!("invalid size unit; {HELP}")),
    };
    number
        .checked_mul(factor)
        .ok_or_else(|| "size is too large".to_string())
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size such as 65536 or 64KiB")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Size, E> {
                parse_size(v).map(Size).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Size, E> {
                Ok(Size(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Size, E> {
                u64::try_from(v)
                    .map(Size)
                    .map_err(|_| E::custom("a size cannot be negative"))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let ok = |s: &str| parse_duration(s).unwrap();
        assert_eq!(ok("500ms"), Duration::from_millis(500));
        assert_eq!(ok("5s"), Duration::from_secs(5));
        assert_eq!(ok(" 10m "), Duration::from_secs(600));
        assert_eq!(ok("24h"), Duration::from_secs(86_400));
        assert_eq!(ok("7d"), Duration::from_secs(7 * 86_400));
        assert_eq!(ok("1h 30m"), Duration::from_secs(5400));
        assert_eq!(ok("0s"), Duration::ZERO);
    }

    #[test]
    fn bad_durations_have_clear_messages() {
        let err = |s: &str| parse_duration(s).unwrap_err();
        assert!(err("5").contains("needs a unit"), "{}", err("5"));
        assert!(err("1.5").contains("needs a unit"));
        assert!(
            err("5x").starts_with("unknown duration unit"),
            "{}",
            err("5x")
        );
        assert!(
            err("fast").starts_with("invalid duration"),
            "{}",
            err("fast")
        );
        assert!(err("").starts_with("empty duration"));
        assert!(err("99999999999999999999999d").contains("too large"));
        // The text itself is never echoed (it may come from the environment).
        assert!(!err("5secret").contains("secret"));
    }

    #[test]
    fn sizes() {
        let ok = |s: &str| parse_size(s).unwrap();
        assert_eq!(ok("100"), 100);
        assert_eq!(ok("100B"), 100);
        assert_eq!(ok("64KiB"), 65_536);
        assert_eq!(ok("64 KiB"), 65_536);
        assert_eq!(ok("2KB"), 2_000);
        assert_eq!(ok("2kB"), 2_000);
        assert_eq!(ok("1MB"), 1_000_000);
        assert_eq!(ok("3MiB"), 3 * 1_048_576);
    }

    #[test]
    fn bad_sizes() {
        let err = |s: &str| parse_size(s).unwrap_err();
        assert!(err("64GiB").starts_with("invalid size unit"));
        assert!(err("KiB").starts_with("invalid size;"));
        assert!(err("-1").starts_with("invalid size;"));
        assert!(err("1.5MiB").starts_with("invalid size unit"));
        assert!(err("99999999999999999999").contains("too large"));
        assert!(err("18446744073709551615MiB").contains("too large"));
    }
}
