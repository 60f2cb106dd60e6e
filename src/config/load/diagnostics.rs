//! What loading reports: [`ConfigError`] and [`Warning`] (file, line, column, key path,
//! message), the collector that gathers every one of them, and the [`Loader`]'s reporting
//! methods. A value already reported as wrong is not reported again.

use std::fmt;
use std::path::{Path, PathBuf};

use super::Loader;
use crate::config::de::DeError;
use crate::config::yaml::{KeyPath, Loc};

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
/// Collected errors and warnings.
pub(super) struct Diag {
    pub(super) file: PathBuf,
    pub(super) errors: Vec<ConfigError>,
    pub(super) warnings: Vec<Warning>,
    /// Values already reported as wrong (failed interpolation, or removed after a
    /// deserialization error): further errors about them or below them are not reported.
    /// Errors about keys (unknown or invalid names) still are.
    pub(super) poisoned: Vec<KeyPath>,
}

impl Diag {
    pub(super) fn suppressed(&self, path: &KeyPath) -> bool {
        self.poisoned.iter().any(|p| path.starts_with(p))
    }

    pub(super) fn push_error(&mut self, loc: Loc, path: &KeyPath, message: impl Into<String>) {
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

impl Loader {
    // ----- reporting -------------------------------------------------------------------

    /// An error about the value at `path`.
    pub(super) fn error(&mut self, path: &KeyPath, message: impl Into<String>) {
        let loc = self.root.value_loc(path);
        self.diag.push_error(loc, path, message);
    }

    /// An error about the key that ends `path` (or the nearest thing when it is missing).
    pub(super) fn key_error(&mut self, path: &KeyPath, message: impl Into<String>) {
        let loc = self.root.key_loc(path);
        self.diag.push_key_error(loc, path, message);
    }

    pub(super) fn warn(&mut self, path: &KeyPath, message: impl Into<String>) {
        let loc = self.root.value_loc(path);
        self.diag.push_warning(loc, path, message);
    }

    pub(super) fn key_warn(&mut self, path: &KeyPath, message: impl Into<String>) {
        let loc = self.root.key_loc(path);
        self.diag.push_warning(loc, path, message);
    }

    /// A name or ID for a message, in backquotes, unless it came from `${VAR}`
    /// interpolation (messages never show interpolated values).
    pub(super) fn shown(&self, path: &KeyPath, value: &str) -> String {
        match self.root.find(path) {
            Some(n) if n.interpolated => "(value from the environment)".into(),
            _ => format!("`{value}`"),
        }
    }

    pub(super) fn de_error(&mut self, e: DeError, path: &KeyPath) {
        let loc = e.loc.unwrap_or_else(|| self.root.value_loc(path));
        let at = e.path.unwrap_or_else(|| path.clone());
        if e.at_key {
            self.diag.push_key_error(loc, &at, e.message);
        } else {
            self.diag.push_error(loc, &at, e.message);
        }
    }
}
