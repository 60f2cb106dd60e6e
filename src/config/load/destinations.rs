//! `destinations:`: the settings every kind shares, validated here the same way for
//! every kind, and each kind's own keys, validated by the kind's module under
//! `destinations/` through a [`KindContext`] (the registry
//! [`crate::destinations::DestinationKind`] says which module reads which `type:`).

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::{Loader, quoted, same_file_key, top};
use crate::config::de::one_of;
use crate::config::raw::{CommonKeys, RawDestination, RawRetry};
use crate::config::yaml::{KeyPath, Kind, Node};
use crate::config::{DestinationConfig, RateLimit, RetryPolicy};
use crate::destinations::{DestinationKind, KindConfig};

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
        // (what identifies the file, destination, its key naming the file)
        let mut seen: Vec<(PathBuf, &str, &str)> = Vec::new();
        for d in destinations {
            let Some((file_key, file)) = d.kind.exclusive_file() else {
                continue;
            };
            let key = same_file_key(file);
            match seen.iter().find(|(k, _, _)| *k == key) {
                Some((_, first, first_key)) => {
                    let path = top("destinations").key(&d.name).key(file_key);
                    let first_line = self
                        .root
                        .value_loc(&top("destinations").key(first).key(first_key))
                        .line;
                    let msg = format!(
                        "the same file as destination `{first}` (line {first_line}); two destinations \
                         writing one file would cut each other's lines: use one destination, \
                         or another file"
                    );
                    self.error(&path, msg);
                }
                None => seen.push((key, &d.name, file_key)),
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
                    quoted(DestinationKind::TYPES)
                )),
                Some(v) => match &v.kind {
                    Kind::Str(s) if DestinationKind::TYPES.contains(&s.as_str()) => Ok(s.clone()),
                    Kind::Str(s) => {
                        let msg = format!(
                            "unknown destination type; {}",
                            one_of(s, DestinationKind::TYPES)
                        );
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
        let mut cx = KindContext {
            loader: self,
            path: path.clone(),
            common: None,
        };
        let settings = DestinationKind::load(&kind, &mut cx);
        let common = cx.common?;
        Some(common.build(name, settings?))
    }

    /// The settings every destination type has.
    fn common(
        &mut self,
        path: &KeyPath,
        keys: CommonKeys,
        default_concurrency: usize,
    ) -> Option<Common> {
        let CommonKeys {
            timeout,
            concurrency,
            retry,
            rate_limit,
        } = keys;
        let mut ok = true;
        let timeout = match timeout {
            None => DestinationConfig::DEFAULT_TIMEOUT,
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
        let policy = match retry {
            None => RetryPolicy::default(),
            Some(r) => self.retry_policy(&path.key("retry"), r).unwrap_or_else(|| {
                ok = false;
                RetryPolicy::default()
            }),
        };
        let rate_limit = match rate_limit {
            None => None,
            Some(rl) => {
                let rl_path = path.key("rate_limit");
                let burst = rl.burst.unwrap_or(RateLimit::DEFAULT_BURST);
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

    /// `retry:`, its values checked and the defaults filled in.
    fn retry_policy(&mut self, rpath: &KeyPath, r: RawRetry) -> Option<RetryPolicy> {
        let mut ok = true;
        let mut policy = RetryPolicy::default();
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
        ok.then_some(policy)
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
}

/// What a destination kind's module sees while it validates its own keys (see
/// [`KindConfig::validate`]): the place of the destination in the file, and the
/// loader's reporting, so its errors carry line, column and key path like every other.
/// Keys are given relative to the destination (`&["headers", name]`).
pub struct KindContext<'a> {
    loader: &'a mut Loader,
    /// `destinations.<name>`.
    path: KeyPath,
    /// The shared keys, once read and valid.
    common: Option<Common>,
}

impl KindContext<'_> {
    /// Reads the kind's raw struct (reporting every unknown key and bad value) and the
    /// shared keys, then lets the kind validate its own.
    pub(crate) fn load<K: KindConfig>(&mut self) -> Option<K> {
        let mut raw: K::Raw = self.loader.de(&self.path)?;
        let keys = raw.take_common();
        self.common = self.loader.common(&self.path, keys, K::DEFAULT_CONCURRENCY);
        K::validate(raw, self)
    }

    fn at(&self, keys: &[&str]) -> KeyPath {
        keys.iter().fold(self.path.clone(), |p, k| p.key(k))
    }

    /// An error about the value at `keys`.
    pub fn error(&mut self, keys: &[&str], message: impl Into<String>) {
        let at = self.at(keys);
        self.loader.error(&at, message);
    }

    /// An error about the key that ends `keys` (a bad header name, say).
    pub fn key_error(&mut self, keys: &[&str], message: impl Into<String>) {
        let at = self.at(keys);
        self.loader.key_error(&at, message);
    }

    /// A warning about the value at `keys`.
    pub fn warn(&mut self, keys: &[&str], message: impl Into<String>) {
        let at = self.at(keys);
        self.loader.warn(&at, message);
    }

    /// Checks an http(s) URL (see [`Loader::check_url`]); true when usable.
    pub fn http_url(&mut self, keys: &[&str], text: &str, warn_cleartext: bool) -> bool {
        let at = self.at(keys);
        self.loader.check_url(&at, text, warn_cleartext)
    }

    /// Reports template errors at the values they name; true when there are none.
    pub fn templates(&mut self, errors: Option<Vec<crate::template::TemplateError>>) -> bool {
        let at = self.path.clone();
        self.loader.check_templates(&at, errors)
    }

    /// The located YAML value at `keys` as JSON (for template trees such as `blocks:`);
    /// `None` when absent or null.
    pub fn json(&self, keys: &[&str]) -> Option<serde_json::Value> {
        self.loader.node(&self.at(keys)).map(node_to_json)
    }

    /// A configured path resolved against the config file's directory.
    pub fn resolve(&self, path: &str) -> PathBuf {
        self.loader.resolve(path)
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
