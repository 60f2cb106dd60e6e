//! The top-level sections other than `destinations:` and `routes:`: `admin_listen`,
//! `admin`, `log_format`, `log_level`, `tls`, `listen`, `webhook_path`, `ingress`, `store`,
//! `delivery` and `applications`, each validated into its typed value.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use ipnet::IpNet;

use super::{FACEIO_TIMEOUT, Loader, parse_net, same_socket, top};
use crate::config::de::one_of;
use crate::config::raw::{
    Dur, RawAdmin, RawApplication, RawDelivery, RawIngress, RawStore, RawTls, STORE_BACKENDS,
};
use crate::config::yaml::{KeyPath, Kind, Loc};
use crate::config::{
    AdminConfig, Application, DEFAULT_ADMIN_LISTEN, DEFAULT_LISTEN, DEFAULT_POOL_SIZE,
    DEFAULT_RETENTION, DEFAULT_STORE_PATH, DEFAULT_WEBHOOK_PATH, DeliveryConfig, IngressConfig,
    LogFormat, MAX_POOL_SIZE, PostgresConfig, Secret, StoreBackend, StoreConfig, TlsConfig,
};

impl Loader {
    pub(super) fn admin_listen(&mut self, ingress: SocketAddr) -> Option<SocketAddr> {
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

    pub(super) fn admin(&mut self) -> AdminConfig {
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

    pub(super) fn log_format(&mut self) -> LogFormat {
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

    pub(super) fn log_level(&mut self) -> Option<String> {
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

    pub(super) fn tls(&mut self) -> Option<TlsConfig> {
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

    pub(super) fn listen(&mut self) -> SocketAddr {
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

    pub(super) fn webhook_path(&mut self) -> String {
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

    pub(super) fn ingress(&mut self) -> IngressConfig {
        let path = top("ingress");
        let mut cfg = IngressConfig::defaults();
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
    pub(super) fn positive(&mut self, path: &KeyPath, value: Option<Dur>) -> Option<Duration> {
        let d = value?.0;
        if d.is_zero() {
            self.error(path, "must be greater than 0");
            None
        } else {
            Some(d)
        }
    }

    pub(super) fn check_per_second(&mut self, path: &KeyPath, ps: f64) -> bool {
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

    pub(super) fn check_burst(&mut self, path: &KeyPath, burst: u32) -> bool {
        if burst >= 1 {
            true
        } else {
            self.error(path, "must be at least 1");
            false
        }
    }

    pub(super) fn store(&mut self) -> StoreConfig {
        let path = top("store");
        let raw: RawStore = self.de(&path).unwrap_or_default();
        let retention = raw.retention.map_or(DEFAULT_RETENTION, |d| d.0);
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

    pub(super) fn delivery(&mut self) -> DeliveryConfig {
        let path = top("delivery");
        let raw: RawDelivery = self.de(&path).unwrap_or_default();
        let mut cfg = DeliveryConfig::default();
        if let Some(d) = raw.shutdown_grace {
            cfg.shutdown_grace = d.0;
        }
        if let Some(d) = self.positive(&path.key("poll_interval"), raw.poll_interval) {
            cfg.poll_interval = d;
        }
        cfg
    }

    // ----- applications ------------------------------------------------------------------

    pub(super) fn applications(&mut self) -> Vec<Application> {
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
            let token = self.app_token(&item, raw.token, raw.token_file);
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
                        demo = crate::config::DEMO_TOKEN
                    ),
                );
            }
            apps.push(app);
            token_at.push(token_path);
        }
        apps
    }

    /// An application's token, from `token` or `token_file` (exactly one of them).
    fn app_token(
        &mut self,
        item: &KeyPath,
        token: Option<String>,
        token_file: Option<String>,
    ) -> Option<String> {
        match (token, token_file) {
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
                    self.error(item, "missing `token` or `token_file`");
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
        }
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
}
