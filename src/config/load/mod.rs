//! Reading `relay.yaml`: parse into a located tree, interpolate `${VAR}`, deserialize each
//! section and element on its own, validate, and report every problem at once.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::de::DeserializeOwned;

use super::de::{from_node, one_of};
use super::interp::interpolate;
use super::raw::TOP_LEVEL_KEYS;
use super::yaml::{KeyPath, Kind, Node, Seg, parse};
use super::{
    AdminConfig, Config, DEFAULT_ADMIN_LISTEN, DEFAULT_LISTEN, DEFAULT_RETENTION,
    DEFAULT_STORE_PATH, DEFAULT_WEBHOOK_PATH, DeliveryConfig, IngressConfig, LogFormat,
    StoreBackend, StoreConfig,
};

mod destinations;
mod diagnostics;
mod routes;
mod sections;
mod summary;

pub use destinations::KindContext;
use diagnostics::Diag;
pub use diagnostics::{ConfigError, ConfigErrors, Warning};

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

/// FACEIO aborts a webhook request after this long.
const FACEIO_TIMEOUT: Duration = Duration::from_secs(6);

impl Loader {
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
            ingress: IngressConfig::defaults(),
            store: StoreConfig {
                backend: StoreBackend::Sqlite,
                path: self.resolve(DEFAULT_STORE_PATH),
                retention: DEFAULT_RETENTION,
            },
            applications: Vec::new(),
            destinations: Vec::new(),
            routes: Vec::new(),
            delivery: DeliveryConfig::default(),
            admin_listen: DEFAULT_ADMIN_LISTEN.parse().ok(),
            log_format: LogFormat::Text,
            log_level: None,
            tls: None,
            admin: AdminConfig::default(),
        }
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

fn quoted<S: AsRef<str>>(names: &[S]) -> String {
    names
        .iter()
        .map(|n| format!("`{}`", n.as_ref()))
        .collect::<Vec<_>>()
        .join(", ")
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
