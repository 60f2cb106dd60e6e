//! Reading `relay.yaml`: parse into a located tree, interpolate `${VAR}`, deserialize each
//! section and element on its own, validate, and report every problem at once.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use ipnet::IpNet;
use serde::de::DeserializeOwned;

use super::de::{DeError, from_node, one_of};
use super::interp::interpolate;
use super::raw::{
    DESTINATION_TYPES, Dur, OneOrMany, RawAdmin, RawApplication, RawDelivery, RawFile, RawHttp,
    RawIngress, RawMatch, RawRateLimit, RawRetry, RawRoute, RawSlack, RawStore, RawTls,
    STORE_BACKENDS, TOP_LEVEL_KEYS,
};
use super::suggest::did_you_mean;
use super::yaml::{KeyPath, Kind, Loc, Node, Seg, parse};
use super::{
    AdminConfig, AgeRange, Application, Config, DEFAULT_ADMIN_LISTEN, DEFAULT_POOL_SIZE,
    DeliveryConfig, DestinationConfig, DestinationKind, FileConfig, HttpConfig, IngressConfig,
    LogFormat, MAX_POOL_SIZE, MatchConfig, PostgresConfig, RateLimit, RetryPolicy, RouteConfig,
    Secret, SlackConfig, StoreBackend, StoreConfig, TlsConfig,
};

/// One problem in the config file.
///
/// Displays as `relay.yaml:12:5: destinations.crm.url: <message>`; the position is left
/// out when unknown, the key path when there is none (a YAML syntax error).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The config file, as given.
    pub file: PathBuf,
    /// 1-based line; 0 when unknown.
    pub line: u64,
    /// 1-based column; 0 when unknown.
    pub column: u64,
    /// Key path such as `destinations.crm.url` or `routes[1].to[0]`; empty for the file as
    /// a whole.
    pub path: String,
    /// What is wrong. Never contains a string value (it might be a secret).
    pub message: String,
}

/// Something allowed but probably not meant; same shape and display as [`ConfigError`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    pub file: PathBuf,
    pub line: u64,
    pub column: u64,
    pub path: String,
    pub message: String,
}

fn fmt_diag(
    f: &mut fmt::Formatter<'_>,
    file: &Path,
    line: u64,
    column: u64,
    path: &str,
    message: &str,
) -> fmt::Result {
    write!(f, "{}", file.display())?;
    if line > 0 {
        write!(f, ":{line}:{column}")?;
    }
    if !path.is_empty() {
        write!(f, ": {path}")?;
    }
    write!(f, ": {message}")
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt_diag(
            f,
            &self.file,
            self.line,
            self.column,
            &self.path,
            &self.message,
        )
    }
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt_diag(
            f,
            &self.file,
            self.line,
            self.column,
            &self.path,
            &self.message,
        )
    }
}

impl std::error::Error for ConfigError {}

/// Every problem found in the config file, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Reads and validates the config file at `path`, with `${VAR}` taken from the process
/// environment and relative paths resolved against the file's directory.
pub fn load(path: &Path) -> Result<(Config, Vec<Warning>), ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: path.to_path_buf(),
            line: 0,
            column: 0,
            path: String::new(),
            message: format!("cannot read the config file: {e}"),
        }])
    })?;
    load_str(&text, path, &|name| std::env::var(name).ok())
}

/// Validates config `text` read from `source` (used in messages and to resolve relative
/// paths against `source.parent()`), with `${VAR}` looked up through `env`.
pub fn load_str(
    text: &str,
    source: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(Config, Vec<Warning>), ConfigErrors> {
    let absolute = std::path::absolute(source).unwrap_or_else(|_| source.to_path_buf());
    let base = absolute.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut diag = Diag {
        file: source.to_path_buf(),
        errors: Vec::new(),
        warnings: Vec::new(),
        poisoned: Vec::new(),
    };

    let mut root = match parse(text) {
        Ok(root) => root,
        Err(e) => {
            diag.push_error(e.loc, &KeyPath::root(), e.message);
            return Err(ConfigErrors(diag.errors));
        }
    };

    root.remove_duplicate_keys(&mut KeyPath::root(), &mut |path, at, first| {
        diag.push_error(
            at,
            path,
            format!(
                "duplicate key; the first one is at line {} column {} (only it is used)",
                first.line, first.column
            ),
        );
    });

    root.for_each_str_mut(&mut KeyPath::root(), &mut |node, path| {
        let Kind::Str(text) = &node.kind else { return };
        match interpolate(text, env) {
            Ok(done) => {
                node.interpolated = done.substituted;
                node.kind = Kind::Str(done.value);
            }
            Err(messages) => {
                for m in messages {
                    diag.push_error(node.loc, path, m);
                }
                // Checks of this value would only repeat the problem: skip them.
                diag.poisoned.push(path.clone());
                node.interpolated = true;
                node.kind = Kind::Str(String::new());
            }
        }
    });

    let mut ld = Loader {
        root,
        base,
        diag,
        app_ids: Vec::new(),
    };
    let config = ld.config(absolute);
    let Loader { mut diag, .. } = ld;
    diag.errors.sort_by_key(|e| (e.line == 0, e.line, e.column));
    diag.warnings
        .sort_by_key(|w| (w.line == 0, w.line, w.column));
    if diag.errors.is_empty() {
        Ok((config, diag.warnings))
    } else {
        Err(ConfigErrors(diag.errors))
    }
}

/// Collected errors and warnings.
struct Diag {
    file: PathBuf,
    errors: Vec<ConfigError>,
    warnings: Vec<Warning>,
    /// Values already reported as wrong (failed interpolation, or removed after a
    /// deserialization error): further errors about them or below them are not reported.
    /// Errors about keys (unknown or invalid names) still are.
    poisoned: Vec<KeyPath>,
}

impl Diag {
    fn suppressed(&self, path: &KeyPath) -> bool {
        self.poisoned.iter().any(|p| path.starts_with(p))
    }

    fn push_error(&mut self, loc: Loc, path: &KeyPath, message: impl Into<String>) {
        if !self.suppressed(path) {
            self.push_key_error(loc, path, message);
        }
    }

    /// An error about a key: reported even when its value was wrong too.
    fn push_key_error(&mut self, loc: Loc, path: &KeyPath, message: impl Into<String>) {
        self.errors.push(ConfigError {
            file: self.file.clone(),
            line: loc.line,
            column: loc.column,
            path: path.to_string(),
            message: message.into(),
        });
    }

    fn push_warning(&mut self, loc: Loc, path: &KeyPath, message: impl Into<String>) {
        if self.suppressed(path) {
            return;
        }
        self.warnings.push(Warning {
            file: self.file.clone(),
            line: loc.line,
            column: loc.column,
            path: path.to_string(),
            message: message.into(),
        });
    }
}

/// Validation state: the interpolated tree and what was found so far.
struct Loader {
    root: Node,
    /// Directory relative paths are resolved against.
    base: PathBuf,
    diag: Diag,
    /// `app_id`s that parsed, for the `match.appId` check.
    app_ids: Vec<String>,
}

/// Whether two listen addresses would take the same port: equal ports (0 picks a free
/// one, so never), and the same IP or either the wildcard address (which takes the port
/// on every address).
fn same_socket(a: SocketAddr, b: SocketAddr) -> bool {
    let (ia, ib) = (a.ip().to_canonical(), b.ip().to_canonical());
    a.port() == b.port()
        && a.port() != 0
        && (ia == ib || ia.is_unspecified() || ib.is_unspecified())
}

fn top(key: &str) -> KeyPath {
    KeyPath::root().key(key)
}

const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
const DEFAULT_WEBHOOK_PATH: &str = "/webhook";
const DEFAULT_STORE_PATH: &str = "./data/relay.db";
/// FACEIO aborts a webhook request after this long.
const FACEIO_TIMEOUT: Duration = Duration::from_secs(6);
const KNOWN_EVENTS: &[&str] = &["ENROLL", "AUTH", "DELETION"];
const KNOWN_GENDERS: &[&str] = &["male", "female"];
const MAX_CONCURRENCY: u64 = 1024;

impl Loader {
    // ----- reporting -------------------------------------------------------------------

    /// An error about the value at `path`.
    fn error(&mut self, path: &KeyPath, message: impl Into<String>) {
        let loc = self.root.value_loc(path);
        self.diag.push_error(loc, path, message);
    }

    /// An error about the key that ends `path` (or the nearest thing when it is missing).
    fn key_error(&mut self, path: &KeyPath, message: impl Into<String>) {
        let loc = self.root.key_loc(path);
        self.diag.push_key_error(loc, path, message);
    }

    fn warn(&mut self, path: &KeyPath, message: impl Into<String>) {
        let loc = self.root.value_loc(path);
        self.diag.push_warning(loc, path, message);
    }

    fn key_warn(&mut self, path: &KeyPath, message: impl Into<String>) {
        let loc = self.root.key_loc(path);
        self.diag.push_warning(loc, path, message);
    }

    /// A name or ID for a message, in backquotes, unless it came from `${VAR}`
    /// interpolation (messages never show interpolated values).
    fn shown(&self, path: &KeyPath, value: &str) -> String {
        match self.root.find(path) {
            Some(n) if n.interpolated => "(value from the environment)".into(),
            _ => format!("`{value}`"),
        }
    }

    fn de_error(&mut self, e: DeError, path: &KeyPath) {
        let loc = e.loc.unwrap_or_else(|| self.root.value_loc(path));
        let at = e.path.unwrap_or_else(|| path.clone());
        if e.at_key {
            self.diag.push_key_error(loc, &at, e.message);
        } else {
            self.diag.push_error(loc, &at, e.message);
        }
    }

    // ----- reading -----------------------------------------------------------------------

    /// The node at `path`, unless absent or null.
    fn node(&self, path: &KeyPath) -> Option<&Node> {
        self.root.find(path).filter(|n| !n.is_null())
    }

    /// Deserializes the value at `path`; `None` when absent or null, or when it cannot be
    /// read at all.
    ///
    /// serde stops at the first error, so after each error the entry holding the bad
    /// value is removed (from a copy) and deserialization is tried again: every unknown
    /// key and bad value of a section is reported, and what remains is returned for the
    /// checks that follow. Removed entries are not checked again (they are poisoned).
    fn de<T: DeserializeOwned>(&mut self, path: &KeyPath) -> Option<T> {
        let mut node = self.node(path)?.clone();
        let mut removed: Vec<KeyPath> = Vec::new();
        loop {
            let e = match from_node::<T>(&node, path) {
                Ok(v) => return Some(v),
                Err(e) => e,
            };
            let at = e.path.clone().unwrap_or_else(|| path.clone());
            // A required key whose value was already reported as wrong is not reported
            // again as missing; the mapping that needs it is dropped instead.
            let consequence = e.missing.is_some_and(|f| removed.contains(&at.key(f)));
            if !consequence {
                self.de_error(e, path);
            }
            // The nearest mapping entry below `path` that holds the error.
            let cut = (path.len()..at.len())
                .rev()
                .find(|&n| matches!(at.0[n], Seg::Key(_)))?;
            let entry = KeyPath(at.0[..=cut].to_vec());
            let relative = &entry.0[path.len()..];
            let Some((Seg::Key(key), parent)) = relative.split_last() else {
                return None;
            };
            match node.find_mut(parent).map(|p| &mut p.kind) {
                Some(Kind::Map(entries)) => entries.retain(|en| &en.key != key),
                _ => return None,
            }
            self.diag.poisoned.push(entry.clone());
            removed.push(entry);
        }
    }

    /// The number of elements of the list at `path` (0 when absent or null); an error when
    /// it is something else.
    fn list_len(&mut self, path: &KeyPath) -> usize {
        let (len, found) = match self.node(path) {
            None => (0, None),
            Some(n) => match &n.kind {
                Kind::Seq(items) => (items.len(), None),
                other => (0, Some(other.describe())),
            },
        };
        if let Some(found) = found {
            self.error(path, format!("expected a list, found {found}"));
        }
        len
    }

    /// Resolves a configured path against the config file's directory.
    /// A leading `./` is dropped, so that messages and `check` show `/etc/x/data/relay.db`.
    fn resolve(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            let rest: PathBuf = p
                .components()
                .skip_while(|c| matches!(c, std::path::Component::CurDir))
                .collect();
            self.base.join(rest)
        }
    }

    // ----- the whole file ----------------------------------------------------------------

    fn config(&mut self, source: PathBuf) -> Config {
        match &self.root.kind {
            Kind::Map(_) | Kind::Null => {}
            other => {
                let found = other.describe();
                self.error(
                    &KeyPath::root(),
                    format!("the config must be a mapping of settings, found {found}"),
                );
                return self.empty_config(source);
            }
        }
        let unknown: Vec<String> = self
            .root
            .entries()
            .unwrap_or_default()
            .iter()
            .filter(|e| !TOP_LEVEL_KEYS.contains(&e.key.as_str()))
            .map(|e| e.key.clone())
            .collect();
        for key in unknown {
            let msg = format!("unknown field `{key}`; {}", one_of(&key, TOP_LEVEL_KEYS));
            self.key_error(&top(&key), msg);
        }

        let listen = self.listen();
        let webhook_path = self.webhook_path();
        let ingress = self.ingress();
        let store = self.store();
        let applications = self.applications();
        let destinations = self.destinations();
        let routes = self.routes();
        let delivery = self.delivery();
        let admin_listen = self.admin_listen(listen);
        let log_format = self.log_format();
        let log_level = self.log_level();
        let tls = self.tls();
        let admin = self.admin();
        Config {
            source,
            listen,
            webhook_path,
            ingress,
            store,
            applications,
            destinations,
            routes,
            delivery,
            admin_listen,
            log_format,
            log_level,
            tls,
            admin,
        }
    }

    /// A placeholder returned with errors when nothing could be read.
    fn empty_config(&self, source: PathBuf) -> Config {
        Config {
            source,
            listen: DEFAULT_LISTEN.parse().expect("valid default"),
            webhook_path: DEFAULT_WEBHOOK_PATH.into(),
            ingress: ingress_defaults(),
            store: StoreConfig {
                backend: StoreBackend::Sqlite,
                path: self.resolve(DEFAULT_STORE_PATH),
                retention: Duration::from_secs(7 * 86_400),
            },
            applications: Vec::new(),
            destinations: Vec::new(),
            routes: Vec::new(),
            delivery: delivery_defaults(),
            admin_listen: DEFAULT_ADMIN_LISTEN.parse().ok(),
            log_format: LogFormat::Text,
            log_level: None,
            tls: None,
            admin: AdminConfig::default(),
        }
    }

    fn admin_listen(&mut self, ingress: SocketAddr) -> Option<SocketAddr> {
        let default = DEFAULT_ADMIN_LISTEN.parse().ok();
        let path = top("admin_listen");
        let Some(text) = self.de::<String>(&path) else {
            if let Some(admin) = default.filter(|a| same_socket(*a, ingress)) {
                self.error(
                    &top("listen"),
                    format!(
                        "port {} is also the default `admin_listen` ({admin}): set `admin_listen` to another port, or `off`",
                        admin.port()
                    ),
                );
            }
            return default;
        };
        let text = text.trim();
        if text.eq_ignore_ascii_case("off") {
            return None;
        }
        match text.parse::<SocketAddr>() {
            Ok(addr) if same_socket(addr, ingress) => {
                self.error(
                    &path,
                    "must use another port than `listen`: metrics and health endpoints never share the webhook port",
                );
                default
            }
            Ok(addr) => Some(addr),
            Err(_) => {
                self.error(
                    &path,
                    "expected an IP address and port, such as 127.0.0.1:9090, or `off`",
                );
                default
            }
        }
    }

    fn admin(&mut self) -> AdminConfig {
        let path = top("admin");
        let mut cfg = AdminConfig::default();
        let Some(raw) = self.de::<RawAdmin>(&path) else {
            return cfg;
        };
        if let Some(token) = raw.token {
            let token = token.trim();
            if token.is_empty() {
                self.error(
                    &path.key("token"),
                    "must not be empty (remove `token` to leave /metrics open)",
                );
            } else {
                cfg.token = Some(Secret::new(token.to_owned()));
            }
        }
        if let Some(n) = self.count(&path.key("max_connections"), raw.max_connections) {
            cfg.max_connections = n;
        }
        for (key, value, slot) in [
            (
                "header_timeout",
                raw.header_timeout,
                &mut cfg.header_timeout,
            ),
            ("idle_timeout", raw.idle_timeout, &mut cfg.idle_timeout),
        ] {
            if let Some(d) = self.positive(&path.key(key), value) {
                *slot = d;
            }
        }
        cfg
    }

    fn log_format(&mut self) -> LogFormat {
        let path = top("log_format");
        let Some(text) = self.de::<String>(&path) else {
            return LogFormat::Text;
        };
        match text.trim() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                let msg = format!(
                    "unknown log format `{other}`; {}",
                    one_of(other, &["text", "json"])
                );
                self.error(&path, msg);
                LogFormat::Text
            }
        }
    }

    fn log_level(&mut self) -> Option<String> {
        let path = top("log_level");
        let text = self.de::<String>(&path)?;
        match tracing_subscriber::EnvFilter::builder().parse(text.trim()) {
            Ok(_) => Some(text.trim().to_string()),
            Err(e) => {
                self.error(
                    &path,
                    format!("not a valid log filter ({e}); try `info` or `faceio_relay=debug`"),
                );
                None
            }
        }
    }

    fn tls(&mut self) -> Option<TlsConfig> {
        let path = top("tls");
        let raw: RawTls = self.de(&path)?;
        let mut ok = true;
        for (key, value) in [("cert", &raw.cert), ("key", &raw.key)] {
            if value.trim().is_empty() {
                self.error(&path.key(key), "must not be empty");
                ok = false;
            } else if let Err(e) = std::fs::metadata(self.resolve(value)) {
                self.error(
                    &path.key(key),
                    format!("cannot read {}: {e}", self.resolve(value).display()),
                );
                ok = false;
            }
        }
        ok.then(|| TlsConfig {
            cert: self.resolve(&raw.cert),
            key: self.resolve(&raw.key),
        })
    }

    fn listen(&mut self) -> SocketAddr {
        let default = DEFAULT_LISTEN.parse().expect("valid default");
        let path = top("listen");
        let Some(text) = self.de::<String>(&path) else {
            return default;
        };
        match text.trim().parse() {
            Ok(addr) => addr,
            Err(_) => {
                self.error(
                    &path,
                    "expected an IP address and port, such as 127.0.0.1:8080 or [::]:8080",
                );
                default
            }
        }
    }

    fn webhook_path(&mut self) -> String {
        let path = top("webhook_path");
        let Some(p) = self.de::<String>(&path) else {
            return DEFAULT_WEBHOOK_PATH.into();
        };
        if !p.starts_with('/') {
            self.error(&path, "must start with `/`, such as /webhook");
        } else if p.contains(|c: char| c.is_whitespace() || c == '?' || c == '#') {
            self.error(
                &path,
                "must be a plain URL path (no spaces, `?` or `#`), such as /webhook",
            );
        }
        p
    }

    // ----- ingress / store / delivery ----------------------------------------------------

    fn ingress(&mut self) -> IngressConfig {
        let path = top("ingress");
        let mut cfg = ingress_defaults();
        let raw: RawIngress = self.de(&path).unwrap_or_default();
        if let Some(size) = raw.max_body {
            match usize::try_from(size.0) {
                Ok(0) => self.error(&path.key("max_body"), "must be at least 1 byte"),
                Ok(n) => cfg.max_body = n,
                Err(_) => self.error(&path.key("max_body"), "size is too large"),
            }
        }
        for (key, value, slot) in [
            (
                "header_timeout",
                raw.header_timeout,
                &mut cfg.header_timeout,
            ),
            ("body_timeout", raw.body_timeout, &mut cfg.body_timeout),
        ] {
            if let Some(d) = self.positive(&path.key(key), value) {
                *slot = d;
            }
        }
        if let Some(d) = self.positive(&path.key("store_timeout"), raw.store_timeout) {
            if d >= FACEIO_TIMEOUT {
                self.error(
                    &path.key("store_timeout"),
                    "must be less than 6s: FACEIO gives up on a webhook after 6 seconds",
                );
            } else {
                cfg.store_timeout = d;
            }
        }
        if let Some(n) = self.count(&path.key("max_connections"), raw.max_connections) {
            cfg.max_connections = n;
        }
        if let Some(ips) = raw.allow_ips {
            cfg.allow_ips = self.networks(&path.key("allow_ips"), &ips);
        }
        for (key, value, slot) in [
            ("idle_timeout", raw.idle_timeout, &mut cfg.idle_timeout),
            (
                "handshake_timeout",
                raw.handshake_timeout,
                &mut cfg.handshake_timeout,
            ),
        ] {
            if let Some(d) = self.positive(&path.key(key), value) {
                *slot = d;
            }
        }
        let per_ip = path.key("max_connections_per_ip");
        if let Some(n) = self.count(&per_ip, raw.max_connections_per_ip) {
            cfg.max_connections_per_ip = n;
        }
        if let Some(nets) = raw.trusted_proxies {
            cfg.trusted_proxies = self.networks(&path.key("trusted_proxies"), &nets);
        }
        if let Some(on) = raw.proxy_protocol {
            if on && cfg.trusted_proxies.is_empty() {
                self.error(
                    &path.key("proxy_protocol"),
                    "needs `trusted_proxies`: the PROXY header is read only from the proxies listed there",
                );
            }
            cfg.proxy_protocol = on;
        }
        if let Some(af) = raw.auth_failures {
            let af_path = path.key("auth_failures");
            if let Some(ps) = af.per_second
                && self.check_per_second(&af_path.key("per_second"), ps)
            {
                cfg.auth_failures.per_second = ps;
            }
            if let Some(b) = af.burst
                && self.check_burst(&af_path.key("burst"), b)
            {
                cfg.auth_failures.burst = b;
            }
        }
        cfg
    }

    /// A count that must be at least 1.
    fn count(&mut self, path: &KeyPath, value: Option<u64>) -> Option<usize> {
        match usize::try_from(value?) {
            Ok(0) => {
                self.error(path, "must be at least 1");
                None
            }
            Ok(n) => Some(n),
            Err(_) => {
                self.error(path, "is too large");
                None
            }
        }
    }

    /// A list of addresses (as /32 or /128) and CIDR networks; each bad one is an error.
    fn networks(&mut self, list: &KeyPath, items: &[String]) -> Vec<IpNet> {
        let mut nets = Vec::new();
        for (i, text) in items.iter().enumerate() {
            match parse_net(text) {
                Some(net) => nets.push(net),
                None => self.error(
                    &list.index(i),
                    "not an IP address or CIDR network (such as 10.0.0.0/8 or 192.168.1.7)",
                ),
            }
        }
        nets
    }

    /// A duration that must be > 0.
    fn positive(&mut self, path: &KeyPath, value: Option<Dur>) -> Option<Duration> {
        let d = value?.0;
        if d.is_zero() {
            self.error(path, "must be greater than 0");
            None
        } else {
            Some(d)
        }
    }

    fn check_per_second(&mut self, path: &KeyPath, ps: f64) -> bool {
        if ps.is_finite() && ps > 0.0 {
            true
        } else {
            self.error(
                path,
                "must be a number greater than 0 (0.5 = one every two seconds)",
            );
            false
        }
    }

    fn check_burst(&mut self, path: &KeyPath, burst: u32) -> bool {
        if burst >= 1 {
            true
        } else {
            self.error(path, "must be at least 1");
            false
        }
    }

    fn store(&mut self) -> StoreConfig {
        let path = top("store");
        let raw: RawStore = self.de(&path).unwrap_or_default();
        let retention = raw
            .retention
            .map_or(Duration::from_secs(7 * 86_400), |d| d.0);
        let backend = match raw.backend.as_deref().map(str::trim) {
            None | Some("sqlite") => {
                for (key, given) in [
                    ("url", raw.url.is_some()),
                    ("pool_size", raw.pool_size.is_some()),
                ] {
                    if given {
                        self.key_error(
                            &path.key(key),
                            format!(
                                "`{key}` is a PostgreSQL setting; it needs `backend: postgres`"
                            ),
                        );
                    }
                }
                StoreBackend::Sqlite
            }
            Some("postgres") => match self.postgres(&path, &raw) {
                Some(pg) => StoreBackend::Postgres(pg),
                None => StoreBackend::Sqlite,
            },
            Some(other) => {
                let msg = format!(
                    "unknown store backend {}; {}",
                    self.shown(&path.key("backend"), other),
                    one_of(other, STORE_BACKENDS)
                );
                self.error(&path.key("backend"), msg);
                StoreBackend::Sqlite
            }
        };
        let file = raw.path.unwrap_or_else(|| DEFAULT_STORE_PATH.into());
        if file.trim().is_empty() {
            self.error(&path.key("path"), "must not be empty");
        }
        StoreConfig {
            backend,
            path: self.resolve(&file),
            retention,
        }
    }

    /// `backend: postgres`: `url` required (and a PostgreSQL URL), `path` refused,
    /// `pool_size` in range. The URL is never shown in a message: it may hold a password.
    fn postgres(&mut self, path: &KeyPath, raw: &RawStore) -> Option<PostgresConfig> {
        let mut ok = true;
        if raw.path.is_some() {
            self.key_error(
                &path.key("path"),
                "`path` is the SQLite file; with `backend: postgres` the store is `url`",
            );
            ok = false;
        }
        let pool_size = match raw.pool_size {
            None => DEFAULT_POOL_SIZE,
            Some(n) if (1..=u64::from(MAX_POOL_SIZE)).contains(&n) => n as u32,
            Some(_) => {
                self.error(
                    &path.key("pool_size"),
                    format!("must be between 1 and {MAX_POOL_SIZE}"),
                );
                ok = false;
                DEFAULT_POOL_SIZE
            }
        };
        let url = match raw.url.as_deref().map(str::trim) {
            None => {
                if !self.diag.suppressed(&path.key("url")) {
                    self.error(
                        path,
                        "missing required key `url` for `backend: postgres` \
                         (such as postgres://relay@db.example:5432/relay, usually ${DATABASE_URL})",
                    );
                }
                None
            }
            Some("") => {
                self.error(&path.key("url"), "must not be empty");
                None
            }
            Some(text) => {
                let scheme_ok = reqwest::Url::parse(text)
                    .is_ok_and(|u| matches!(u.scheme(), "postgres" | "postgresql"));
                if scheme_ok && text.parse::<sqlx::postgres::PgConnectOptions>().is_ok() {
                    Some(text.to_owned())
                } else {
                    self.error(
                        &path.key("url"),
                        "not a valid PostgreSQL URL; write postgres://user:password@host:5432/database \
                         (options such as ?sslmode=require may follow)",
                    );
                    None
                }
            }
        };
        let url = url?;
        ok.then(|| PostgresConfig {
            url: Secret::new(url),
            pool_size,
        })
    }

    fn delivery(&mut self) -> DeliveryConfig {
        let path = top("delivery");
        let raw: RawDelivery = self.de(&path).unwrap_or_default();
        let mut cfg = delivery_defaults();
        if let Some(d) = raw.shutdown_grace {
            cfg.shutdown_grace = d.0;
        }
        if let Some(d) = self.positive(&path.key("poll_interval"), raw.poll_interval) {
            cfg.poll_interval = d;
        }
        cfg
    }

    // ----- applications ------------------------------------------------------------------

    fn applications(&mut self) -> Vec<Application> {
        let path = top("applications");
        if self.root.find(&path).is_none() {
            self.key_error(
                &path,
                "missing required key `applications` (the FACEIO applications whose webhooks are accepted)",
            );
            return Vec::new();
        }
        let len = self.list_len(&path);
        if len == 0
            && self
                .node(&path)
                .is_none_or(|n| matches!(n.kind, Kind::Seq(_)))
        {
            self.error(&path, "must list at least one application");
        }
        let mut apps: Vec<Application> = Vec::new();
        // Where each application's token was given, for duplicate-token errors.
        let mut token_at: Vec<KeyPath> = Vec::new();
        let mut seen: HashMap<String, Loc> = HashMap::new();
        for i in 0..len {
            let item = path.index(i);
            let Some(raw) = self.de::<RawApplication>(&item) else {
                continue;
            };
            let id_path = item.key("app_id");
            let app_id = raw.app_id.trim().to_owned();
            if app_id.is_empty() {
                self.error(&id_path, "must not be empty");
            } else if let Some(first) = seen.get(&app_id) {
                let msg = format!(
                    "duplicate app_id {}; it is also at line {}",
                    self.shown(&id_path, &app_id),
                    first.line
                );
                self.error(&id_path, msg);
            } else {
                seen.insert(app_id.clone(), self.root.value_loc(&id_path));
                self.app_ids.push(app_id.clone());
            }
            let token_path = if raw.token_file.is_some() && raw.token.is_none() {
                item.key("token_file")
            } else {
                item.key("token")
            };
            let token = match (raw.token, raw.token_file) {
                (Some(_), Some(_)) => {
                    self.key_error(
                        &item.key("token_file"),
                        "give either `token` or `token_file`, not both",
                    );
                    None
                }
                (None, None) => {
                    if !self.diag.suppressed(&item.key("token"))
                        && !self.diag.suppressed(&item.key("token_file"))
                    {
                        self.error(&item, "missing `token` or `token_file`");
                    }
                    None
                }
                (Some(token), None) => {
                    let token = token.trim().to_owned();
                    if token.is_empty() {
                        self.error(&item.key("token"), "must not be empty");
                    }
                    Some(token)
                }
                (None, Some(file)) => self.token_file(&item.key("token_file"), &file),
            };
            let Some(token) = token.filter(|t| !t.is_empty()) else {
                continue;
            };
            // Two applications with one token: the header names the token's application,
            // so the second one's events would always get 401.
            if let Some(first) = apps.iter().position(|a| a.token.expose() == &token) {
                let line = self.root.value_loc(&token_at[first]).line;
                let msg = format!(
                    "the same token as application {} (line {line}); each application needs \
                     its own token, or the second one's webhooks are refused",
                    self.shown(&path.index(first).key("app_id"), &apps[first].app_id)
                );
                self.error(&token_path, msg);
                continue;
            }
            let app = Application::new(app_id, Secret::new(token));
            if app.uses_demo_token() {
                self.warn(
                    &token_path,
                    format!(
                        "this is the shipped demo token `{demo}` (also used when \
                         FACEIO_TOKEN is set but empty): anyone can post events with it; set \
                         the real token. `run` refuses it unless listen is loopback or \
                         --allow-demo-token is given",
                        demo = super::DEMO_TOKEN
                    ),
                );
            }
            apps.push(app);
            token_at.push(token_path);
        }
        apps
    }

    fn token_file(&mut self, path: &KeyPath, file: &str) -> Option<String> {
        if file.trim().is_empty() {
            self.error(path, "must not be empty");
            return None;
        }
        let resolved = self.resolve(file);
        match std::fs::read_to_string(&resolved) {
            Ok(content) => {
                // Trimmed on both sides, like the header's token.
                let token = content.trim().to_owned();
                if let Ok(meta) = std::fs::metadata(&resolved) {
                    use std::os::unix::fs::PermissionsExt as _;
                    let mode = meta.permissions().mode() & 0o777;
                    if mode & 0o044 != 0 {
                        self.warn(
                            path,
                            format!(
                                "the token file is readable by group or others (mode {mode:04o}); \
                                 make it readable by its owner only (chmod 600)"
                            ),
                        );
                    }
                }
                if token.is_empty() {
                    self.error(path, "the token file is empty");
                    None
                } else {
                    Some(token)
                }
            }
            Err(e) => {
                self.error(path, format!("cannot read the token file: {e}"));
                None
            }
        }
    }

    // ----- destinations ------------------------------------------------------------------

    fn destinations(&mut self) -> Vec<DestinationConfig> {
        let path = top("destinations");
        let entries: Vec<String> = match self.node(&path) {
            None => return Vec::new(),
            Some(n) => match &n.kind {
                Kind::Map(entries) => entries.iter().map(|e| e.key.clone()).collect(),
                other => {
                    let msg = format!(
                        "expected a mapping of destination names to settings, found {}",
                        other.describe()
                    );
                    self.error(&path, msg);
                    return Vec::new();
                }
            },
        };
        let mut out = Vec::new();
        for name in entries {
            let dpath = path.key(&name);
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
            {
                self.key_error(
                    &dpath,
                    "invalid destination name; use letters, digits, `_`, `.` and `-`",
                );
            }
            if let Some(d) = self.destination(&name, &dpath) {
                out.push(d);
            }
        }
        self.same_files(&out);
        out
    }

    /// Two file destinations writing one file would cut each other's lines (each repairs
    /// a tail the other is writing when it opens or reopens): an error at the second,
    /// however the paths are spelled (`..`, symlinked directories).
    fn same_files(&mut self, destinations: &[DestinationConfig]) {
        let mut seen: Vec<(PathBuf, &str)> = Vec::new();
        for d in destinations {
            let DestinationKind::File(f) = &d.kind else {
                continue;
            };
            let key = same_file_key(&f.path);
            match seen.iter().find(|(k, _)| *k == key) {
                Some((_, first)) => {
                    let path = top("destinations").key(&d.name).key("path");
                    let first_line = self
                        .root
                        .value_loc(&top("destinations").key(first).key("path"))
                        .line;
                    let msg = format!(
                        "the same file as destination `{first}` (line {first_line}); two destinations \
                         writing one file would cut each other's lines: use one destination, \
                         or another file"
                    );
                    self.error(&path, msg);
                }
                None => seen.push((key, &d.name)),
            }
        }
    }

    fn destination(&mut self, name: &str, path: &KeyPath) -> Option<DestinationConfig> {
        let node = self.root.find(path)?;
        let type_path = path.key("type");
        let kind = match &node.kind {
            Kind::Map(_) => match node.get("type").map(|e| &e.value) {
                None => Err(format!(
                    "missing required key `type` (one of {})",
                    quoted(DESTINATION_TYPES)
                )),
                Some(v) => match &v.kind {
                    Kind::Str(s) if DESTINATION_TYPES.contains(&s.as_str()) => Ok(s.clone()),
                    Kind::Str(s) => {
                        let msg =
                            format!("unknown destination type; {}", one_of(s, DESTINATION_TYPES));
                        self.error(&type_path, msg);
                        return None;
                    }
                    other => {
                        let msg = format!("expected a string, found {}", other.describe());
                        self.error(&type_path, msg);
                        return None;
                    }
                },
            },
            other => Err(format!(
                "expected a mapping with the destination's settings, found {}",
                other.describe()
            )),
        };
        let kind = match kind {
            Ok(k) => k,
            Err(msg) => {
                self.error(path, msg);
                return None;
            }
        };
        match kind.as_str() {
            "slack" => {
                let raw: RawSlack = self.de(path)?;
                let common = self.common(
                    path,
                    raw.timeout,
                    raw.concurrency,
                    raw.retry,
                    raw.rate_limit,
                    4,
                );
                let url_path = path.key("webhook_url");
                let url_ok = self.check_url(&url_path, &raw.webhook_url, true);
                let blocks = raw
                    .blocks
                    .and_then(|_| self.node(&path.key("blocks")))
                    .map(node_to_json);
                let templates_ok = self.check_templates(
                    path,
                    crate::template::SlackMessage::new(raw.text.as_deref(), blocks.as_ref()).err(),
                );
                let common = common?;
                (url_ok && templates_ok).then(|| {
                    common.build(
                        name,
                        DestinationKind::Slack(SlackConfig {
                            webhook_url: Secret::new(raw.webhook_url.trim().to_owned()),
                            text: raw.text,
                            blocks,
                        }),
                    )
                })
            }
            "http" => {
                let raw: RawHttp = self.de(path)?;
                let common = self.common(
                    path,
                    raw.timeout,
                    raw.concurrency,
                    raw.retry,
                    raw.rate_limit,
                    4,
                );
                let mut ok = self.check_url(&path.key("url"), &raw.url, true);
                let mut headers = Vec::new();
                for (hname, value) in raw.headers.unwrap_or_default() {
                    let hpath = path.key("headers").key(&hname);
                    if hyper::header::HeaderName::from_bytes(hname.as_bytes()).is_err() {
                        self.key_error(&hpath, "invalid header name");
                        ok = false;
                    }
                    if hyper::header::HeaderValue::from_str(&value).is_err() {
                        self.error(
                            &hpath,
                            "invalid header value (only visible ASCII, spaces and tabs are allowed)",
                        );
                        ok = false;
                    }
                    headers.push((hname, Secret::new(value)));
                }
                let body = raw
                    .body
                    .and_then(|_| self.node(&path.key("body")))
                    .map(node_to_json);
                if let Some(b) = &body {
                    ok &= self.check_templates(path, crate::template::JsonBody::new(b).err());
                }
                let content_type = raw
                    .content_type
                    .map(|t| t.trim().to_owned())
                    .unwrap_or_else(|| DEFAULT_CONTENT_TYPE.to_owned());
                if !content_type.contains('/')
                    || hyper::header::HeaderValue::from_str(&content_type).is_err()
                {
                    self.error(
                        &path.key("content_type"),
                        "expected a media type such as `application/json`",
                    );
                    ok = false;
                }
                let signing_secret = match raw.signing_secret {
                    None => None,
                    Some(s) => {
                        ok &= self.check_signing_secret(&path.key("signing_secret"), &s);
                        Some(Secret::new(s))
                    }
                };
                let common = common?;
                ok.then(|| {
                    common.build(
                        name,
                        DestinationKind::Http(HttpConfig {
                            url: Secret::new(raw.url.trim().to_owned()),
                            headers,
                            signing_secret,
                            follow_redirects: raw.follow_redirects.unwrap_or(false),
                            body,
                            content_type,
                        }),
                    )
                })
            }
            _ => {
                let raw: RawFile = self.de(path)?;
                let common = self.common(
                    path,
                    raw.timeout,
                    raw.concurrency,
                    raw.retry,
                    raw.rate_limit,
                    // Lines from concurrent attempts share one fsync (group commit).
                    16,
                );
                if raw.path.trim().is_empty() {
                    self.error(&path.key("path"), "must not be empty");
                    return None;
                }
                let file = self.resolve(&raw.path);
                Some(common?.build(name, DestinationKind::File(FileConfig { path: file })))
            }
        }
    }

    /// The settings every destination type has.
    fn common(
        &mut self,
        path: &KeyPath,
        timeout: Option<Dur>,
        concurrency: Option<u64>,
        retry: Option<RawRetry>,
        rate_limit: Option<RawRateLimit>,
        default_concurrency: usize,
    ) -> Option<Common> {
        let mut ok = true;
        let timeout = match timeout {
            None => Duration::from_secs(10),
            Some(_) => match self.positive(&path.key("timeout"), timeout) {
                Some(d) => d,
                None => {
                    ok = false;
                    Duration::ZERO
                }
            },
        };
        let concurrency = match concurrency {
            None => default_concurrency,
            Some(n) if (1..=MAX_CONCURRENCY).contains(&n) => n as usize,
            Some(_) => {
                self.error(
                    &path.key("concurrency"),
                    format!("must be between 1 and {MAX_CONCURRENCY}"),
                );
                ok = false;
                0
            }
        };
        let mut policy = RetryPolicy::default();
        if let Some(r) = retry {
            let rpath = path.key("retry");
            if let Some(n) = r.max_attempts {
                if n == 0 {
                    self.error(&rpath.key("max_attempts"), "must be at least 1");
                    ok = false;
                } else {
                    policy.max_attempts = n;
                }
            }
            match self.positive(&rpath.key("initial_delay"), r.initial_delay) {
                Some(d) => policy.initial_delay = d,
                None => ok &= r.initial_delay.is_none(),
            }
            if let Some(d) = r.max_delay {
                policy.max_delay = d.0;
            }
            if ok
                && policy.initial_delay > policy.max_delay
                && !self.diag.suppressed(&rpath.key("initial_delay"))
                && !self.diag.suppressed(&rpath.key("max_delay"))
            {
                let at = if r.initial_delay.is_some() {
                    rpath.key("initial_delay")
                } else {
                    rpath.key("max_delay")
                };
                self.error(&at, "initial_delay must not be greater than max_delay");
                ok = false;
            }
        }
        let rate_limit = match rate_limit {
            None => None,
            Some(rl) => {
                let rl_path = path.key("rate_limit");
                let burst = rl.burst.unwrap_or(1);
                ok &= self.check_per_second(&rl_path.key("per_second"), rl.per_second);
                ok &= self.check_burst(&rl_path.key("burst"), burst);
                Some(RateLimit {
                    per_second: rl.per_second,
                    burst,
                })
            }
        };
        ok.then_some(Common {
            timeout,
            concurrency,
            retry: policy,
            rate_limit,
        })
    }

    /// An http(s) URL; with `warn_cleartext` (Slack and HTTP destinations), a warning
    /// when it would travel in clear text to another machine. Messages never show the URL.
    fn check_url(&mut self, path: &KeyPath, text: &str, warn_cleartext: bool) -> bool {
        let url = match reqwest::Url::parse(text.trim()) {
            Ok(url) => url,
            Err(e) => {
                self.error(path, format!("not a valid URL: {e}"));
                return false;
            }
        };
        if !matches!(url.scheme(), "http" | "https") {
            self.error(path, "must be an http:// or https:// URL");
            return false;
        }
        if url.host_str().is_none_or(str::is_empty) {
            self.error(path, "the URL has no host");
            return false;
        }
        if warn_cleartext && url.scheme() == "http" && !is_loopback(&url) {
            self.warn(
                path,
                "plain http to a host that is not loopback: the URL (often a credential), the headers and every event would cross the network unencrypted; use https",
            );
        }
        true
    }

    /// Reports template errors (from [`crate::template`]) at the position of the value
    /// each names, relative to the destination at `path`; true when there are none.
    fn check_templates(
        &mut self,
        path: &KeyPath,
        errors: Option<Vec<crate::template::TemplateError>>,
    ) -> bool {
        let Some(errors) = errors else { return true };
        for e in errors {
            let mut at = path.clone();
            for step in &e.at {
                at = match step {
                    crate::template::Step::Key(k) => at.key(k),
                    crate::template::Step::Index(i) => at.index(*i),
                };
            }
            self.error(&at, e.message);
        }
        false
    }

    fn check_signing_secret(&mut self, path: &KeyPath, secret: &str) -> bool {
        if secret.is_empty() {
            self.error(path, "must not be empty");
            return false;
        }
        if let Some(b64) = secret.strip_prefix("whsec_") {
            let decoded = base64::engine::general_purpose::STANDARD.decode(b64);
            match decoded {
                Ok(bytes) if !bytes.is_empty() => {}
                Ok(_) => {
                    self.error(path, "the part after `whsec_` is empty");
                    return false;
                }
                Err(_) => {
                    self.error(path, "the part after `whsec_` must be valid base64");
                    return false;
                }
            }
        }
        true
    }

    // ----- routes ------------------------------------------------------------------------

    fn routes(&mut self) -> Vec<RouteConfig> {
        let path = top("routes");
        // Every name under `destinations:`, even those with errors, so that a broken
        // destination does not also make every route naming it an error.
        let names: Vec<String> = self
            .node(&top("destinations"))
            .and_then(Node::entries)
            .unwrap_or_default()
            .iter()
            .map(|e| e.key.clone())
            .collect();
        let len = self.list_len(&path);
        if len == 0
            && self
                .node(&path)
                .is_none_or(|n| matches!(n.kind, Kind::Seq(_)))
        {
            self.key_warn(&path, "no routes: events are stored but sent nowhere");
        }
        self.unused_destinations(&names, len);

        let mut out = Vec::new();
        let mut seen_names: HashMap<String, u64> = HashMap::new();
        for i in 0..len {
            let rpath = path.index(i);
            let Some(raw) = self.de::<RawRoute>(&rpath) else {
                continue;
            };
            let mut ok = true;
            let name = match raw.name {
                Some(n) if n.trim().is_empty() => {
                    self.error(&rpath.key("name"), "must not be empty");
                    ok = false;
                    n
                }
                Some(n) => n,
                None => format!("route-{}", i + 1),
            };
            let line = self.root.value_loc(&rpath).line;
            if let Some(first) = seen_names.get(&name) {
                let msg = format!(
                    "duplicate route name {}; the first is at line {first}",
                    self.shown(&rpath.key("name"), &name)
                );
                self.error(&rpath.key("name"), msg);
                ok = false;
            } else {
                seen_names.insert(name.clone(), line);
            }

            let to_path = rpath.key("to");
            let mut to: Vec<String> = Vec::new();
            if raw.to.is_empty() {
                self.error(&to_path, "must name at least one destination");
                ok = false;
            }
            for (idx, dest) in raw.to.items() {
                let dpath = item_path(&to_path, idx);
                if !names.iter().any(|n| n == dest) {
                    let hint = match did_you_mean(dest, names.iter().map(String::as_str)) {
                        Some(s) => format!("did you mean `{s}`?"),
                        None if names.is_empty() => "no destinations are defined".into(),
                        None => format!("defined destinations: {}", quoted(&names)),
                    };
                    let msg = format!("unknown destination {}; {hint}", self.shown(&dpath, dest));
                    self.error(&dpath, msg);
                    ok = false;
                } else if to.iter().any(|t| t == dest) {
                    let msg = format!("destination {} is listed twice", self.shown(&dpath, dest));
                    self.warn(&dpath, msg);
                } else {
                    to.push(dest.to_owned());
                }
            }
            let matcher = match raw.matcher {
                None => MatchConfig::default(),
                Some(m) => match self.matcher(&rpath.key("match"), m) {
                    Some(m) => m,
                    None => {
                        ok = false;
                        MatchConfig::default()
                    }
                },
            };
            if ok {
                out.push(RouteConfig { name, matcher, to });
            }
        }
        out
    }

    /// Warns about destinations that no route names (read from the tree, so that routes
    /// with errors still count).
    fn unused_destinations(&mut self, names: &[String], routes: usize) {
        let mut used: HashSet<String> = HashSet::new();
        for i in 0..routes {
            let to = top("routes").index(i).key("to");
            match self.root.find(&to).map(|n| &n.kind) {
                Some(Kind::Str(s)) => {
                    used.insert(s.clone());
                }
                Some(Kind::Seq(items)) => {
                    used.extend(items.iter().filter_map(|n| n.as_str().map(str::to_owned)));
                }
                _ => {}
            }
        }
        for name in names {
            if !used.contains(name) {
                self.key_warn(
                    &top("destinations").key(name),
                    format!("destination `{name}` is not used by any route"),
                );
            }
        }
    }

    fn matcher(&mut self, path: &KeyPath, raw: RawMatch) -> Option<MatchConfig> {
        let mut ok = true;
        let mut m = MatchConfig::default();
        let ev_path = path.key("eventName");
        m.event_name = self.strings(&ev_path, raw.event_name.as_ref(), &mut ok);
        for (idx, ev) in raw.event_name.iter().flat_map(OneOrMany::items) {
            if !ev.is_empty() && !KNOWN_EVENTS.contains(&ev) {
                let hint = match did_you_mean(ev, KNOWN_EVENTS.iter().copied()) {
                    Some(s) => format!("did you mean `{s}`?"),
                    None => format!("FACEIO sends {}", quoted(KNOWN_EVENTS)),
                };
                let at = item_path(&ev_path, idx);
                let msg = format!("unknown event name {}; {hint}", self.shown(&at, ev));
                self.warn(&at, msg);
            }
        }
        let app_path = path.key("appId");
        m.app_id = self.strings(&app_path, raw.app_id.as_ref(), &mut ok);
        for (idx, id) in raw.app_id.iter().flat_map(OneOrMany::items) {
            if !id.is_empty() && !self.app_ids.is_empty() && !self.app_ids.iter().any(|a| a == id) {
                let at = item_path(&app_path, idx);
                let msg = format!(
                    "{} is not one of the configured applications; this never matches",
                    self.shown(&at, id)
                );
                self.warn(&at, msg);
            }
        }
        m.facial_id = self.strings(&path.key("facialId"), raw.facial_id.as_ref(), &mut ok);
        let gender_path = path.key("details.gender");
        m.gender = self.strings(&gender_path, raw.gender.as_ref(), &mut ok);
        for (idx, g) in raw.gender.iter().flat_map(OneOrMany::items) {
            if !g.is_empty() && !KNOWN_GENDERS.contains(&g) {
                self.warn(
                    &item_path(&gender_path, idx),
                    "FACEIO reports `male` or `female`; this value never matches",
                );
            }
        }
        if let Some(ips) = raw.client_ip {
            let ip_path = path.key("clientIp");
            if ips.is_empty() {
                self.error(&ip_path, "must not be an empty list");
                ok = false;
            }
            let mut nets = Vec::new();
            for (idx, text) in ips.items() {
                match parse_net(text) {
                    Some(net) => nets.push(net),
                    None => {
                        self.error(
                            &item_path(&ip_path, idx),
                            "not an IP address or CIDR network (such as 10.0.0.0/8 or 192.168.1.7)",
                        );
                        ok = false;
                    }
                }
            }
            m.client_ip = Some(nets);
        }
        if let Some(age) = raw.age {
            let age_path = path.key("details.age");
            for (key, v) in [("min", age.min), ("max", age.max)] {
                if v.is_some_and(|v| !v.is_finite()) {
                    self.error(&age_path.key(key), "must be a finite number");
                    ok = false;
                }
            }
            match (age.min, age.max) {
                (None, None) => {
                    if !self.diag.suppressed(&age_path.key("min"))
                        && !self.diag.suppressed(&age_path.key("max"))
                    {
                        self.error(&age_path, "give `min`, `max` or both");
                    }
                    ok = false;
                }
                (Some(min), Some(max)) if min > max => {
                    self.error(&age_path.key("min"), "min must not be greater than max");
                    ok = false;
                }
                _ => {}
            }
            m.age = Some(AgeRange {
                min: age.min,
                max: age.max,
            });
        }
        ok.then_some(m)
    }

    /// A `match:` list of strings: not empty, no empty strings.
    fn strings(
        &mut self,
        path: &KeyPath,
        value: Option<&OneOrMany>,
        ok: &mut bool,
    ) -> Option<Vec<String>> {
        let value = value?;
        if value.is_empty() {
            self.error(path, "must not be an empty list");
            *ok = false;
        }
        let mut out = Vec::new();
        for (idx, s) in value.items() {
            if s.is_empty() {
                self.error(&item_path(path, idx), "must not be empty");
                *ok = false;
            }
            out.push(s.to_owned());
        }
        Some(out)
    }
}

/// `path[n]` for a list element, `path` for a single value.
fn item_path(path: &KeyPath, idx: Option<usize>) -> KeyPath {
    idx.map_or_else(|| path.clone(), |n| path.index(n))
}

struct Common {
    timeout: Duration,
    concurrency: usize,
    retry: RetryPolicy,
    rate_limit: Option<RateLimit>,
}

impl Common {
    fn build(self, name: &str, kind: DestinationKind) -> DestinationConfig {
        DestinationConfig {
            name: name.to_owned(),
            kind,
            concurrency: self.concurrency,
            timeout: self.timeout,
            retry: self.retry,
            rate_limit: self.rate_limit,
        }
    }
}

/// `content_type` of an HTTP destination when not set.
const DEFAULT_CONTENT_TYPE: &str = "application/json";

/// A located YAML value as JSON (for `blocks:` and `body:`). Integers too large for JSON
/// numbers become floats.
fn node_to_json(node: &Node) -> serde_json::Value {
    use serde_json::Value;
    match &node.kind {
        Kind::Null => Value::Null,
        Kind::Bool(b) => Value::Bool(*b),
        Kind::Int(i) => i64::try_from(*i)
            .map(Value::from)
            .or_else(|_| u64::try_from(*i).map(Value::from))
            .unwrap_or_else(|_| Value::from(*i as f64)),
        Kind::Float(f) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
        Kind::Str(s) => Value::String(s.clone()),
        Kind::Seq(items) => Value::Array(items.iter().map(node_to_json).collect()),
        Kind::Map(entries) => Value::Object(
            entries
                .iter()
                .map(|e| (e.key.clone(), node_to_json(&e.value)))
                .collect(),
        ),
    }
}

fn ingress_defaults() -> IngressConfig {
    IngressConfig::defaults()
}

fn delivery_defaults() -> DeliveryConfig {
    DeliveryConfig {
        shutdown_grace: Duration::from_secs(10),
        poll_interval: Duration::from_secs(1),
    }
}

/// What identifies a file for [`Loader::same_files`]: the path with `.` and `..` removed,
/// then made canonical (symlinks resolved) as far as it exists: the whole file, or its
/// directory.
fn same_file_key(path: &Path) -> PathBuf {
    let mut lexical = PathBuf::new();
    for c in path.components() {
        match c {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                lexical.pop();
            }
            other => lexical.push(other),
        }
    }
    if let Ok(p) = std::fs::canonicalize(&lexical) {
        return p;
    }
    if let (Some(dir), Some(name)) = (lexical.parent(), lexical.file_name())
        && let Ok(dir) = std::fs::canonicalize(dir)
    {
        return dir.join(name);
    }
    lexical
}

/// An address (as a /32 or /128 network) or a CIDR network.
fn parse_net(text: &str) -> Option<IpNet> {
    let t = text.trim();
    t.parse::<IpNet>()
        .ok()
        .or_else(|| t.parse::<IpAddr>().ok().map(IpNet::from))
}

fn is_loopback(url: &reqwest::Url) -> bool {
    let Some(host) = url.host_str() else {
        return false;
    };
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    match bare.parse::<IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => {
            let h = bare.to_ascii_lowercase();
            h == "localhost" || h.ends_with(".localhost")
        }
    }
}

fn quoted<S: AsRef<str>>(names: &[S]) -> String {
    names
        .iter()
        .map(|n| format!("`{}`", n.as_ref()))
        .collect::<Vec<_>>()
        .join(", ")
}

// ----- summary -------------------------------------------------------------------------

impl Config {
    /// A short description for `faceio-relay check`: addresses, paths, application IDs,
    /// destinations (type and limits) and routes. Never shows URLs, tokens or headers.
    pub fn summary(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let _ = writeln!(
            s,
            "listen {} ({scheme}, webhook path {})",
            self.listen, self.webhook_path
        );
        let i = &self.ingress;
        let clients = if i.trusted_proxies.is_empty() {
            "the TCP peer".to_string()
        } else {
            let nets: Vec<String> = i.trusted_proxies.iter().map(|n| n.to_string()).collect();
            let via = if i.proxy_protocol {
                "PROXY header, then X-Forwarded-For"
            } else {
                "X-Forwarded-For"
            };
            format!("named by trusted proxies {} ({via})", nets.join(", "))
        };
        let _ = writeln!(
            s,
            "clients: {clients}; {} connections each, closed after {} idle",
            i.max_connections_per_ip,
            humantime::format_duration(i.idle_timeout)
        );
        match self.admin_listen {
            Some(a) if self.admin.token.is_some() => {
                let _ = writeln!(
                    s,
                    "admin {a} (/metrics with admin.token, /healthz, /readyz)"
                );
            }
            Some(a) => {
                let _ = writeln!(s, "admin {a} (/metrics, /healthz, /readyz)");
            }
            None => {
                let _ = writeln!(s, "admin off");
            }
        }
        match &self.store.backend {
            StoreBackend::Sqlite => {
                let _ = writeln!(
                    s,
                    "store sqlite {} (retention {})",
                    self.store.path.display(),
                    humantime::format_duration(self.store.retention)
                );
            }
            // The URL may carry a password: only the backend and pool are shown.
            StoreBackend::Postgres(pg) => {
                let _ = writeln!(
                    s,
                    "store postgres (url from the config, pool {}, retention {})",
                    pg.pool_size,
                    humantime::format_duration(self.store.retention)
                );
            }
        }
        let ids: Vec<&str> = self
            .applications
            .iter()
            .map(|a| a.app_id.as_str())
            .collect();
        let _ = writeln!(s, "applications ({}): {}", ids.len(), ids.join(", "));
        let _ = writeln!(s, "destinations ({}):", self.destinations.len());
        for d in &self.destinations {
            let rate = match d.rate_limit {
                Some(r) => format!("rate limit {}/s burst {}", r.per_second, r.burst),
                None => "no rate limit".into(),
            };
            let _ = writeln!(
                s,
                "  {}: {}, concurrency {}, timeout {}, {}, retry {} attempts {}..{}",
                d.name,
                d.kind.type_name(),
                d.concurrency,
                humantime::format_duration(d.timeout),
                rate,
                d.retry.max_attempts,
                humantime::format_duration(d.retry.initial_delay),
                humantime::format_duration(d.retry.max_delay),
            );
        }
        let _ = writeln!(s, "routes ({}):", self.routes.len());
        for r in &self.routes {
            let _ = writeln!(
                s,
                "  {}: {} -> {}",
                r.name,
                describe_match(&r.matcher),
                r.to.join(", ")
            );
        }
        s
    }
}

fn describe_match(m: &MatchConfig) -> String {
    let mut parts = Vec::new();
    let mut list = |key: &str, v: &Option<Vec<String>>| {
        if let Some(v) = v {
            parts.push(format!("{key} {}", v.join("|")));
        }
    };
    list("eventName", &m.event_name);
    list("appId", &m.app_id);
    list("facialId", &m.facial_id);
    list("details.gender", &m.gender);
    if let Some(nets) = &m.client_ip {
        let nets: Vec<String> = nets.iter().map(ToString::to_string).collect();
        parts.push(format!("clientIp {}", nets.join("|")));
    }
    if let Some(age) = m.age {
        parts.push(match (age.min, age.max) {
            (Some(a), Some(b)) => format!("details.age {a}..{b}"),
            (Some(a), None) => format!("details.age >= {a}"),
            (None, Some(b)) => format!("details.age <= {b}"),
            (None, None) => "details.age any".into(),
        });
    }
    if parts.is_empty() {
        "every event".into()
    } else {
        parts.join(" and ")
    }
}

#[cfg(test)]
mod tests {
    use super::{same_file_key, same_socket};

    #[test]
    fn one_file_reached_through_a_symlinked_directory_is_the_same_file() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        std::fs::create_dir(&real).unwrap();
        std::os::unix::fs::symlink(&real, dir.path().join("link")).unwrap();
        let a = same_file_key(&real.join("events.jsonl"));
        assert_eq!(a, same_file_key(&dir.path().join("link/events.jsonl")));
        assert_eq!(
            a,
            same_file_key(&dir.path().join("link/./x/../events.jsonl"))
        );
        assert_ne!(a, same_file_key(&real.join("other.jsonl")));
    }

    #[test]
    fn listen_addresses_clash_on_the_same_port_of_one_address_or_a_wildcard() {
        let clash = |a: &str, b: &str| same_socket(a.parse().unwrap(), b.parse().unwrap());
        assert!(clash("127.0.0.1:8080", "127.0.0.1:8080"));
        assert!(clash("0.0.0.0:8080", "127.0.0.1:8080"));
        assert!(
            clash("127.0.0.1:8080", "[::]:8080"),
            "dual-stack [::] takes IPv4 too"
        );
        assert!(clash("[::ffff:127.0.0.1]:8080", "127.0.0.1:8080"));
        assert!(!clash("127.0.0.1:8080", "127.0.0.1:9090"));
        assert!(
            !clash("127.0.0.1:8080", "10.0.0.5:8080"),
            "two addresses, one port each"
        );
        assert!(
            !clash("127.0.0.1:0", "127.0.0.1:0"),
            "port 0 picks a free port"
        );
    }
}
