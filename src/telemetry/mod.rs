//! Logging setup, metrics and observable events.
//!
//! One line per accepted or rejected event and per delivery outcome, with the event ID,
//! destination, attempt, status and latency as fields. Where the lines go:
//! - under systemd (`JOURNAL_STREAM` is set) straight to journald, with every field as a
//!   journal field (`EVENT_ID`, `DESTINATION`, `STATUS`, …), so
//!   `journalctl -u faceio-relay EVENT_ID=…` tells one event's story;
//! - otherwise to stderr, as text (`log_format: text`, colours only on a terminal) or one
//!   JSON object per line (`log_format: json`) for log shippers.
//!
//! The level comes from `RUST_LOG`, else `log_level:` in the config, else `info`; a
//! reload applies a changed `log_level` (unless `RUST_LOG` is set). Secrets never reach a
//! log line: they live in [`crate::config::Secret`] and error texts are built without URLs.

pub mod events;
pub mod metrics;

use std::io::IsTerminal;

use tracing_subscriber::layer::{Layered, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry, reload};

use crate::config::LogFormat;

/// The default filter when neither `RUST_LOG` nor `log_level` says otherwise.
const DEFAULT_LEVEL: &str = "info";

/// The subscriber the output layer sits on: the registry under the reloadable filter.
type Base = Layered<reload::Layer<EnvFilter, Registry>, Registry>;

/// Changes the log filter of the running process.
#[derive(Clone)]
pub struct LogControl {
    handle: Option<reload::Handle<EnvFilter, Registry>>,
}

impl LogControl {
    /// Applies `log_level` from a reloaded config. `RUST_LOG`, when set, keeps priority.
    pub fn set_level(&self, level: Option<&str>) {
        if std::env::var_os("RUST_LOG").is_some() {
            return;
        }
        let Some(handle) = &self.handle else { return };
        let filter = EnvFilter::try_new(level.unwrap_or(DEFAULT_LEVEL))
            .unwrap_or_else(|_| EnvFilter::new(DEFAULT_LEVEL));
        if let Err(e) = handle.reload(filter) {
            tracing::warn!(error = %e, "cannot change the log level");
        }
    }
}

fn filter(level: Option<&str>) -> EnvFilter {
    EnvFilter::try_from_default_env()
        .ok()
        .or_else(|| level.and_then(|l| EnvFilter::try_new(l).ok()))
        .unwrap_or_else(|| EnvFilter::new(DEFAULT_LEVEL))
}

/// Where log lines go, decided once at start.
pub fn under_journald() -> bool {
    std::env::var_os("JOURNAL_STREAM").is_some()
}

/// Installs the global subscriber. Safe to call more than once (later calls do nothing).
pub fn init(format: LogFormat, level: Option<&str>) -> LogControl {
    let (filter, handle) = reload::Layer::new(filter(level));
    let output: Box<dyn Layer<Base> + Send + Sync> = if under_journald() {
        match tracing_journald::layer() {
            // No prefix: fields are searchable as EVENT_ID=…, DESTINATION=….
            Ok(journald) => journald
                .with_field_prefix(None)
                .with_syslog_identifier("faceio-relay".into())
                .boxed(),
            Err(_) => text_layer(),
        }
    } else {
        match format {
            LogFormat::Json => tracing_subscriber::fmt::layer()
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .with_writer(std::io::stderr)
                .boxed(),
            LogFormat::Text => text_layer(),
        }
    };
    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(output)
        .try_init()
        .is_ok();
    LogControl {
        handle: installed.then_some(handle),
    }
}

fn text_layer<S>() -> Box<dyn Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false)
        // Colours only for a person at a terminal; files and pipes get plain text.
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        .boxed()
}
