//! Configuration: `relay.yaml` parsed, checked and turned into typed values.
//!
//! Loading is two steps. [`load`] reads the YAML into a tree that keeps the line and column
//! of every node, deserializes each section into structs that reject unknown keys, and then
//! validates what spans fields (routes naming destinations, duplicate app IDs, `${VAR}`
//! references, URLs, CIDRs). Every problem found is collected, so `faceio-relay check`
//! shows them all at once, each with `file:line:column`, the key path and, for a mistyped
//! key, the nearest valid name.
//!
//! The rest of the daemon only sees the typed [`Config`] below: durations are
//! [`Duration`]s, addresses are parsed, relative paths are already resolved against the
//! config file's directory and secrets are wrapped in [`Secret`].

mod de;
mod interp;
mod load;
pub(crate) mod raw;
mod secret;
mod suggest;
mod yaml;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;

pub use load::{ConfigError, ConfigErrors, KindContext, Warning, load, load_str};
pub use secret::Secret;

/// Where the daemon looks for its config when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/faceio-relay/relay.yaml";

/// `listen` when not set.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// `webhook_path` when not set.
pub const DEFAULT_WEBHOOK_PATH: &str = "/webhook";

/// The whole, validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this was read from (absolute), for messages and relative paths.
    pub source: PathBuf,
    /// Ingress listen address (`listen`, default `127.0.0.1:8080`).
    pub listen: SocketAddr,
    /// The path FACEIO posts to (`webhook_path`, default `/webhook`).
    pub webhook_path: String,
    /// Ingress limits and protections (`ingress:` section).
    pub ingress: IngressConfig,
    /// Durable store (`store:` section).
    pub store: StoreConfig,
    /// FACEIO applications whose webhooks are accepted. Never empty.
    pub applications: Vec<Application>,
    /// Destinations by name, in file order.
    pub destinations: Vec<DestinationConfig>,
    /// Routes in file order; every matching route applies.
    pub routes: Vec<RouteConfig>,
    /// Delivery-wide settings (`delivery:` section).
    pub delivery: DeliveryConfig,
    /// Admin endpoints (`/metrics`, `/healthz`, `/readyz`) address (`admin_listen`,
    /// default `127.0.0.1:9090`; `off` disables them). Never the ingress address.
    pub admin_listen: Option<SocketAddr>,
    /// Log line format when not under journald (`log_format`, default `text`).
    pub log_format: LogFormat,
    /// Log filter (`log_level`, e.g. `info` or `faceio_relay=debug`); `RUST_LOG` wins.
    pub log_level: Option<String>,
    /// HTTPS on the ingress (`tls: { cert, key }`); `None` = plain HTTP.
    pub tls: Option<TlsConfig>,
    /// Protections of the admin endpoint (`admin:` section).
    pub admin: AdminConfig,
}

/// `admin:` — the admin endpoint's own limits and optional token.
#[derive(Debug, Clone, PartialEq)]
pub struct AdminConfig {
    /// When set, `/metrics` needs `Authorization: Bearer <token>` (`token`; `/healthz`
    /// and `/readyz` stay open for load balancers).
    pub token: Option<Secret>,
    /// Concurrent admin connections (`max_connections`, default 64).
    pub max_connections: usize,
    /// Time allowed to send request headers (`header_timeout`, default 5s).
    pub header_timeout: Duration,
    /// A connection with no request in progress is closed after this (`idle_timeout`,
    /// default 10s).
    pub idle_timeout: Duration,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            token: None,
            max_connections: 64,
            header_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(10),
        }
    }
}

/// Default admin address.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9090";

/// `log_format`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// `tls:` — certificate and key files (resolved paths; read again on SIGHUP).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// `ingress:` — how the HTTP side protects itself.
#[derive(Debug, Clone)]
pub struct IngressConfig {
    /// Largest accepted body (`max_body`, default 64 KiB); larger gets 413 unread.
    pub max_body: usize,
    /// Time allowed to send the request headers (`header_timeout`, default 5s).
    pub header_timeout: Duration,
    /// Time allowed to send the body once headers are in (`body_timeout`, default 5s).
    pub body_timeout: Duration,
    /// Longest the store may take to make an event durable before we answer 503
    /// (`store_timeout`, default 3s, well inside FACEIO's 6 s).
    pub store_timeout: Duration,
    /// Concurrent connections (`max_connections`, default 1024); more wait in the backlog.
    pub max_connections: usize,
    /// Source addresses allowed to post (`allow_ips`); empty means everyone.
    pub allow_ips: Vec<IpNet>,
    /// Failed authentications (and requests that are not the webhook: 404, 405) tolerated
    /// per client address before it gets 429 (`auth_failures`, default
    /// `{ per_second: 1, burst: 10 }`).
    pub auth_failures: RateLimit,
    /// A connection with no request in progress is closed after this long
    /// (`idle_timeout`, default 10s): idle sockets cannot hold connection slots.
    pub idle_timeout: Duration,
    /// Time allowed for a new connection's TLS handshake and PROXY header
    /// (`handshake_timeout`, default 5s).
    pub handshake_timeout: Duration,
    /// Concurrent connections from one client address (`max_connections_per_ip`, default
    /// 64; IPv6 clients are counted per /64). A trusted proxy's own connections are not
    /// counted (it carries many clients) unless `proxy_protocol` names the client.
    pub max_connections_per_ip: usize,
    /// Peers whose forwarding headers name the client (`trusted_proxies`, default none).
    pub trusted_proxies: Vec<IpNet>,
    /// Connections from trusted proxies start with a PROXY v1/v2 header
    /// (`proxy_protocol`, default false).
    pub proxy_protocol: bool,
}

impl IngressConfig {
    /// Defaults of every `ingress:` key (the documented values above).
    pub fn defaults() -> Self {
        Self {
            max_body: 64 * 1024,
            header_timeout: Duration::from_secs(5),
            body_timeout: Duration::from_secs(5),
            store_timeout: Duration::from_secs(3),
            max_connections: 1024,
            allow_ips: Vec::new(),
            auth_failures: RateLimit {
                per_second: 1.0,
                burst: 10,
            },
            idle_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(5),
            max_connections_per_ip: 64,
            trusted_proxies: Vec::new(),
            proxy_protocol: false,
        }
    }
}

/// `store.path` when not set (relative to the config file's directory).
pub const DEFAULT_STORE_PATH: &str = "./data/relay.db";
/// `store.retention` when not set: 7 days.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 86_400);

/// `store:` — where events and deliveries live.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Which backend (`backend`, default `sqlite`), with its settings.
    pub backend: StoreBackend,
    /// SQLite database file (`path`, default `./data/relay.db`), resolved. Read only by
    /// the SQLite backend (`path` is an error with `backend: postgres`).
    pub path: PathBuf,
    /// How long delivered events are kept for inspection (`retention`, default 7d).
    pub retention: Duration,
}

/// `store.backend`.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum StoreBackend {
    /// The embedded SQLite database at [`StoreConfig::path`]: one relay per database.
    #[default]
    Sqlite,
    /// A shared PostgreSQL database: several relays act as one.
    Postgres(PostgresConfig),
}

impl StoreBackend {
    /// `sqlite` or `postgres`, as written in `backend:`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite",
            Self::Postgres(_) => "postgres",
        }
    }
}

/// `backend: postgres` settings.
#[derive(Debug, Clone, PartialEq)]
pub struct PostgresConfig {
    /// `postgres://user:password@host:port/database?sslmode=…` (`url`, required). It
    /// usually carries a password, so it is a secret: never logged, never in `check`.
    pub url: Secret,
    /// Connections for ingress and dispatchers (`pool_size`, 1 to 256,
    /// default 8). Each relay also keeps up to three more: one holding its destination
    /// locks, one listening for new deliveries and one for the admin endpoint's reads.
    pub pool_size: u32,
}

/// Default `store.pool_size`.
pub const DEFAULT_POOL_SIZE: u32 = 8;
/// Largest `store.pool_size`.
pub const MAX_POOL_SIZE: u32 = 256;

/// One FACEIO application.
#[derive(Clone)]
pub struct Application {
    /// FACEIO application public ID (`app_id`).
    pub app_id: String,
    /// The application's webhook token (`token` or `token_file`).
    pub token: Secret,
    /// SHA-256 of the token, computed once: ingress compares digests (see
    /// [`crate::event::verify::authenticate`]).
    token_digest: [u8; 32],
}

/// The token the shipped `relay.yaml` falls back to (`${FACEIO_TOKEN:-demo-token-change-me}`,
/// which also applies when the variable is set but empty). It is public: `check` and `run`
/// warn about it, and `run` refuses it on a non-loopback `listen` unless told otherwise.
pub const DEMO_TOKEN: &str = "demo-token-change-me";

impl Config {
    /// The applications that use [`DEMO_TOKEN`].
    pub fn demo_token_apps(&self) -> Vec<&str> {
        self.applications
            .iter()
            .filter(|a| a.uses_demo_token())
            .map(|a| a.app_id.as_str())
            .collect()
    }

    /// Why `run` must refuse this config unless `--allow-demo-token`: an application
    /// uses the public demo token while the webhook is reachable from other machines:
    /// `listen` (the address in force) is not loopback, or `ingress.trusted_proxies` says a
    /// reverse proxy forwards the internet to a loopback `listen`.
    pub fn demo_token_refusal(&self, listen: SocketAddr) -> Option<String> {
        let apps = self.demo_token_apps();
        let exposed = if !listen.ip().to_canonical().is_loopback() {
            format!("listen is {listen}, reachable from other machines")
        } else if !self.ingress.trusted_proxies.is_empty() {
            format!("listen is {listen} behind the reverse proxies in ingress.trusted_proxies")
        } else {
            return None;
        };
        (!apps.is_empty()).then(|| {
            format!(
                "application(s) {} use the public demo token `{DEMO_TOKEN}` while {exposed}: \
                 anyone could post events. Set FACEIO_TOKEN to the real token (or use \
                 token_file), or pass --allow-demo-token to run anyway",
                apps.join(", ")
            )
        })
    }
}

impl Application {
    /// Whether the token is the shipped [`DEMO_TOKEN`].
    pub fn uses_demo_token(&self) -> bool {
        self.token.expose() == DEMO_TOKEN
    }

    pub fn new(app_id: impl Into<String>, token: Secret) -> Self {
        use sha2::Digest;
        let token_digest = sha2::Sha256::digest(token.expose().as_bytes()).into();
        Self {
            app_id: app_id.into(),
            token,
            token_digest,
        }
    }

    /// SHA-256 of the token.
    pub fn token_digest(&self) -> &[u8; 32] {
        &self.token_digest
    }
}

/// Shows the ID and a masked token (never the token's digest either).
impl std::fmt::Debug for Application {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Application")
            .field("app_id", &self.app_id)
            .field("token", &self.token)
            .finish_non_exhaustive()
    }
}

/// One destination, common settings plus its kind.
#[derive(Debug, Clone, PartialEq)]
pub struct DestinationConfig {
    /// The key under `destinations:`.
    pub name: String,
    /// What it is and its kind-specific settings (each kind's module under
    /// `destinations/` defines its own).
    pub kind: crate::destinations::DestinationKind,
    /// Deliveries in flight at once (`concurrency`, default 4; file: 16).
    pub concurrency: usize,
    /// Per-request timeout (`timeout`, default [`Self::DEFAULT_TIMEOUT`]).
    pub timeout: Duration,
    /// Retry schedule (`retry:`).
    pub retry: RetryPolicy,
    /// Optional rate limit (`rate_limit: { per_second, burst }`).
    pub rate_limit: Option<RateLimit>,
}

impl DestinationConfig {
    /// `timeout` when not set.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
}

/// `retry: { max_attempts, initial_delay, max_delay }`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Attempts before dead-lettering, counting the first (default 20).
    pub max_attempts: u32,
    /// Base of the exponential backoff (default 1s).
    pub initial_delay: Duration,
    /// Cap of the backoff (default 10m).
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 20,
            initial_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(600),
        }
    }
}

/// `{ per_second, burst }`: a token bucket.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Sustained rate; may be fractional (0.5 = one every two seconds). > 0.
    pub per_second: f64,
    /// Bucket size (default [`Self::DEFAULT_BURST`]). >= 1.
    pub burst: u32,
}

impl RateLimit {
    /// `burst` when not set.
    pub const DEFAULT_BURST: u32 = 1;

    /// The governor quota for this bucket: one cell every `1/per_second`, `burst` cells.
    pub fn quota(&self) -> governor::Quota {
        // A rate too small to express (or not finite) becomes one cell a year.
        let period = Duration::try_from_secs_f64(1.0 / self.per_second)
            .unwrap_or(Duration::from_secs(365 * 86_400));
        let burst =
            std::num::NonZeroU32::new(self.burst.max(1)).unwrap_or(std::num::NonZeroU32::MIN);
        governor::Quota::with_period(period)
            .unwrap_or_else(|| governor::Quota::per_second(std::num::NonZeroU32::MAX))
            .allow_burst(burst)
    }
}

/// One route: a condition and the destinations it sends to.
#[derive(Debug, Clone)]
pub struct RouteConfig {
    /// `name` (default `route-N`, 1-based).
    pub name: String,
    /// `match:`; all given keys must hold. Empty = every event.
    pub matcher: MatchConfig,
    /// Destination names (all exist in `Config::destinations`).
    pub to: Vec<String>,
}

/// `match:` keys. `None` = not constrained. Lists mean "any of".
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MatchConfig {
    pub event_name: Option<Vec<String>>,
    pub app_id: Option<Vec<String>>,
    pub facial_id: Option<Vec<String>>,
    /// Addresses are stored as /32 or /128 networks.
    pub client_ip: Option<Vec<IpNet>>,
    /// `details.gender`.
    pub gender: Option<Vec<String>>,
    /// `details.age: { min, max }`, inclusive.
    pub age: Option<AgeRange>,
}

/// Inclusive age bounds; at least one is set.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct AgeRange {
    pub min: Option<f64>,
    pub max: Option<f64>,
}

/// `delivery:` — worker-wide settings.
#[derive(Debug, Clone)]
pub struct DeliveryConfig {
    /// How long in-flight deliveries may run after SIGTERM (`shutdown_grace`, default 10s).
    pub shutdown_grace: Duration,
    /// How often idle workers look for work written by other processes, such as
    /// `dead-letters replay` (`poll_interval`, default 1s).
    pub poll_interval: Duration,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            shutdown_grace: Duration::from_secs(10),
            poll_interval: Duration::from_secs(1),
        }
    }
}
