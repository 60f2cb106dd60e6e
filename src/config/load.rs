//! TEMPORARY stand-in until the loader lands from the config branch.
use std::path::{Path, PathBuf};

use super::Config;

#[derive(Debug)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: u64,
    pub column: u64,
    pub path: String,
    pub message: String,
}
#[derive(Debug)]
pub struct ConfigErrors(pub Vec<ConfigError>);
impl std::fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} errors", self.0.len())
    }
}
impl std::error::Error for ConfigErrors {}
pub type Warning = ConfigError;
impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.message)
    }
}
pub fn load(_path: &Path) -> Result<(Config, Vec<Warning>), ConfigErrors> {
    Err(ConfigErrors(vec![]))
}
pub fn load_str(
    _text: &str,
    _source: &Path,
    _env: &dyn Fn(&str) -> Option<String>,
) -> Result<(Config, Vec<Warning>), ConfigErrors> {
    Err(ConfigErrors(vec![]))
}
impl Config {
    pub fn summary(&self) -> String {
        String::new()
    }
}
