//! `faceio-relay check`'s summary of a loaded config. Never shows URLs, tokens or headers.

use crate::config::{Config, DestinationConfig, MatchConfig, StoreBackend};

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
            let _ = writeln!(s, "  {}", describe_destination(d));
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

/// `name: type, limits, retry; the kind's own detail`.
fn describe_destination(d: &DestinationConfig) -> String {
    let rate = match d.rate_limit {
        Some(r) => format!("rate limit {}/s burst {}", r.per_second, r.burst),
        None => "no rate limit".into(),
    };
    let detail = match d.kind.summary() {
        d if d.is_empty() => d,
        d => format!("; {d}"),
    };
    format!(
        "{}: {}, concurrency {}, timeout {}, {}, retry {} attempts {}..{}{detail}",
        d.name,
        d.kind.type_name(),
        d.concurrency,
        humantime::format_duration(d.timeout),
        rate,
        d.retry.max_attempts,
        humantime::format_duration(d.retry.initial_delay),
        humantime::format_duration(d.retry.max_delay),
    )
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
