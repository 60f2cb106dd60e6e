//! Running as a systemd service: the `sd_notify` protocol and signals.
//!
//! - `READY=1` once the store is open and both listeners are bound (systemd's
//!   `Type=notify` waits for it before starting dependents);
//! - `STATUS=` every few seconds with live figures (`systemctl status` shows it);
//! - `WATCHDOG=1` at half of `WATCHDOG_USEC` when the unit sets `WatchdogSec=`;
//! - SIGHUP: `RELOADING=1`, re-read and validate the config, apply it (or keep the old one
//!   and log every error), `READY=1`. Files are reopened and the certificate read again
//!   on every SIGHUP, whatever the config's fate (logrotate sends one after rotating);
//! - SIGTERM / SIGINT: `STOPPING=1`, then the graceful shutdown of [`Relay::shutdown`].
//!
//! Without `NOTIFY_SOCKET` (not under systemd) the notifications are no-ops.

use std::path::Path;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use crate::Relay;
use crate::config::{self, Config};
use crate::telemetry::LogControl;

/// How often `STATUS=` is refreshed.
const STATUS_INTERVAL: Duration = Duration::from_secs(5);

fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

/// Runs the daemon until SIGTERM or SIGINT, reloading on SIGHUP.
/// `allow_demo_token` is `run --allow-demo-token`: without it a reload that brings the
/// shipped demo token while `listen` is not loopback is refused like an invalid config.
pub async fn run(
    config_path: &Path,
    config: Config,
    logs: LogControl,
    allow_demo_token: bool,
) -> anyhow::Result<()> {
    let mut hangup = signal(SignalKind::hangup())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;

    let relay = Relay::start(config).await?;
    notify(&[
        NotifyState::Ready,
        NotifyState::Status("accepting webhooks"),
    ]);

    let stop = CancellationToken::new();
    if let Some(period) = sd_notify::watchdog_enabled() {
        tokio::spawn(watchdog(period / 2, stop.clone()));
    }
    let status = tokio::spawn(status_updates(relay.status_source(), stop.clone()));

    loop {
        tokio::select! {
            _ = hangup.recv() => reload(&relay, config_path, &logs, allow_demo_token).await,
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
    }
    notify(&[NotifyState::Stopping, NotifyState::Status("shutting down")]);
    stop.cancel();
    let _ = status.await;
    relay.shutdown().await;
    Ok(())
}

async fn reload(relay: &Relay, path: &Path, logs: &LogControl, allow_demo_token: bool) {
    let mut states = vec![NotifyState::Reloading];
    if let Ok(now) = NotifyState::monotonic_usec_now() {
        states.push(now);
    }
    notify(&states);
    tracing::info!(config = %path.display(), "SIGHUP: reloading the configuration");
    // Reading files (and token files) blocks: keep it off the runtime's threads.
    let loaded = {
        let path = path.to_path_buf();
        tokio::task::spawn_blocking(move || config::load(&path)).await
    };
    let Ok(loaded) = loaded else {
        relay.reopen().await;
        tracing::error!(
            "config reload task failed; still running on the previous one (files reopened)"
        );
        notify(&[NotifyState::Ready]);
        return;
    };
    let refusal = match &loaded {
        Ok((config, _)) if !allow_demo_token => config.demo_token_refusal(relay.local_addr()),
        _ => None,
    };
    match loaded {
        Ok(_) if let Some(why) = refusal => {
            relay.reopen().await;
            tracing::error!(
                "config: {why}; still running on the previous configuration (files reopened)"
            );
        }
        Ok((config, warnings)) => {
            for w in &warnings {
                tracing::warn!("config: {w}");
            }
            let level = config.log_level.clone();
            match relay.reload(config).await {
                Ok(summary) => {
                    logs.set_level(level.as_deref());
                    tracing::info!(%summary, "configuration reloaded");
                }
                Err(e) => {
                    relay.reopen().await;
                    tracing::error!(error = %format!("{e:#}"),
                        "reload failed; still running on the previous configuration (files reopened)");
                }
            }
        }
        Err(errors) => {
            for e in &errors.0 {
                tracing::error!("config: {e}");
            }
            // Logged after the reopen: once this line is out, the files are reopened.
            relay.reopen().await;
            tracing::error!(
                errors = errors.0.len(),
                "the new configuration is invalid; still running on the previous one (files reopened)"
            );
        }
    }
    notify(&[NotifyState::Ready]);
}

async fn watchdog(period: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(period);
    loop {
        tokio::select! {
            _ = tick.tick() => notify(&[NotifyState::Watchdog]),
            () = stop.cancelled() => return,
        }
    }
}

async fn status_updates(source: crate::StatusSource, stop: CancellationToken) {
    let mut tick = tokio::time::interval(STATUS_INTERVAL);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let line = source.line().await;
                notify(&[NotifyState::Status(&line)]);
            }
            () = stop.cancelled() => return,
        }
    }
}
