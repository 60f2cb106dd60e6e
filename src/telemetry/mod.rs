//! Logging setup, metrics and observable events.
//!
//! One line per accepted or rejected event and per delivery outcome, with the event ID,
//! destination, attempt, status and latency as fields. Where the lines go:
//! - under systemd (`JOURNAL_STREAM` names stderr) straight to journald, with every field as a
//!   journal field (`EVENT_ID`, `DESTINATION`, `STATUS`, …), so
//!   `journalctl -u faceio-relay EVENT_ID=…` tells one event's story;
//! - otherwise to stderr, as text (`log_format: text`, colours only on a terminal) or one
//!   JSON object per line (`log_format: json`) for log shippers.
//!
//! Lines for stderr are formatted on the thread that logs and written by one writer
//! thread ([`writer`]), which takes every line waiting and writes them with one `write(2)`
//! (a `write(2)` per line cost 12% of the CPU per event at full load: BENCHMARKS.md), at
//! most once per 20 ms while lines keep coming, so loggers never wake it per line. Nothing
//! is dropped: when 4 MiB of lines wait unwritten (stderr blocked), loggers wait as they
//! would on a blocking `write(2)`. The [`LogGuard`] from [`init`] writes what is left when
//! it is dropped, so `main` holds it to the end (it waits about a second for a stderr that
//! does not take them; lines still pending then are lost); a `kill -9` loses only lines
//! not yet written: at most the last 20 ms' worth.
//!
//! The level comes from `RUST_LOG`, else `log_level:` in the config, else `info`; a
//! reload applies a changed `log_level` (unless `RUST_LOG` is set). Secrets never reach a
//! log line: they live in [`crate::config::Secret`] and error texts are built without URLs;
//! `lapin`, whose trace lines print AMQP frames with the password, says at most `info`.

pub mod events;
pub mod metrics;
pub mod writer;

use std::io::{IsTerminal, Stderr};

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
        if let Err(e) = handle.reload(clamped(filter)) {
            tracing::warn!(error = %e, "cannot change the log level");
        }
    }
}

fn filter(level: Option<&str>) -> EnvFilter {
    let filter = EnvFilter::try_from_default_env()
        .ok()
        .or_else(|| level.and_then(|l| EnvFilter::try_new(l).ok()))
        .unwrap_or_else(|| EnvFilter::new(DEFAULT_LEVEL));
    clamped(filter)
}

/// Crates whose verbose lines may hold a secret, and the most they may say, whatever
/// the level: lapin's trace lines print AMQP frames (`Connection.StartOk` carries the
/// password).
const CLAMPS: [&str; 1] = ["lapin=info"];

fn clamped(filter: EnvFilter) -> EnvFilter {
    CLAMPS.iter().fold(filter, |f, d| {
        f.add_directive(d.parse().expect("a clamp is a valid directive"))
    })
}

/// An error and its causes on one line (`a: b: c`): reqwest and rustls put the useful
/// part (refused, certificate not trusted, ...) in the causes.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Where log lines go, decided once at start: to journald when stderr is the journal
/// stream systemd set up, that is when `JOURNAL_STREAM` (`DEVICE:INODE`) names stderr's
/// own device and inode (systemd.exec(5)). The variable alone is not enough: a shell in a
/// systemd-started session inherits it while its stderr is a terminal.
pub fn under_journald() -> bool {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = stream.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    let Ok(stderr) = std::io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    let Ok(meta) = std::fs::File::from(stderr).metadata() else {
        return false;
    };
    dev.parse() == Ok(meta.dev()) && ino.parse() == Ok(meta.ino())
}

/// Keeps the stderr writer thread; dropping it writes every pending line.
#[must_use = "dropping the guard stops the log writer; hold it until the process ends"]
pub struct LogGuard {
    _writer: Option<writer::WriterGuard>,
}

type StderrWriter = writer::LogWriter<Stderr>;

/// Stderr behind the writer thread, and the guard that flushes it. Without a thread
/// (the system refuses one), lines are written by each logger.
fn stderr_writer() -> (StderrWriter, Option<writer::WriterGuard>) {
    match writer::start(
        "faceio-relay-log",
        writer::Limits::default(),
        std::io::stderr,
        std::io::stderr,
    ) {
        Ok((w, guard)) => (w, Some(guard)),
        Err(e) => {
            eprintln!("cannot start the log writer thread ({e}); writing lines directly");
            (writer::LogWriter::direct(std::io::stderr), None)
        }
    }
}

/// Installs the global subscriber. Safe to call more than once (later calls do nothing,
/// and their guard holds no writer).
pub fn init(format: LogFormat, level: Option<&str>) -> (LogControl, LogGuard) {
    let (filter, handle) = reload::Layer::new(filter(level));
    let mut writer_guard = None;
    let mut stderr = || {
        let (writer, guard) = stderr_writer();
        writer_guard = guard;
        writer
    };
    let output: Box<dyn Layer<Base> + Send + Sync> = if under_journald() {
        match tracing_journald::layer() {
            // No prefix: fields are searchable as EVENT_ID=…, DESTINATION=….
            Ok(journald) => journald
                .with_field_prefix(None)
                .with_syslog_identifier("faceio-relay".into())
                .boxed(),
            Err(_) => text_layer(stderr()),
        }
    } else {
        match format {
            LogFormat::Json => tracing_subscriber::fmt::layer()
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .with_writer(stderr())
                .boxed(),
            LogFormat::Text => text_layer(stderr()),
        }
    };
    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(output)
        .try_init()
        .is_ok();
    let control = LogControl {
        handle: installed.then_some(handle),
    };
    let guard = LogGuard {
        _writer: writer_guard.filter(|_| installed),
    };
    (control, guard)
}

fn text_layer<S>(writer: StderrWriter) -> Box<dyn Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_target(false)
        // Colours only for a person at a terminal; files and pipes get plain text.
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        .boxed()
}
