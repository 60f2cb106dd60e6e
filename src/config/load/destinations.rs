//! `destinations:`: the settings every kind shares, and each kind's own (`slack`, `http`,
//! `file`) validated into a [`DestinationConfig`].

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;

use super::{Loader, quoted, same_file_key, top};
use crate::config::de::one_of;
use crate::config::raw::{
    DESTINATION_TYPES, Dur, RawFile, RawHttp, RawRateLimit, RawRetry, RawSlack,
};
use crate::config::yaml::{KeyPath, Kind, Node};
use crate::config::{
    DestinationConfig, DestinationKind, FileConfig, HttpConfig, RateLimit, RetryPolicy, Secret,
    SlackConfig,
};

const MAX_CONCURRENCY: u64 = 1024;

impl Loader {
    // ----- destinations ------------------------------------------------------------------

    pub(super) fn destinations(&mut self) -> Vec<DestinationConfig> {
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
