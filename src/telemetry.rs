//! Logging setup.
//!
//! One line per accepted or rejected event and per delivery outcome, with the event ID,
//! destination, attempt, status and latency as fields. The level comes from `RUST_LOG`
//! (default `info`). Secrets never reach a log line: they live in
//! [`crate::config::Secret`] and error texts are built without URLs.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber writing to stderr. Safe to call more than once.
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        // Colours only for a person at a terminal; journald and log files get plain text.
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        .try_init();
}
