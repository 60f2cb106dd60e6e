//! The relay's background loops: shared-store wakes passed to the dispatchers, the
//! announcement of this relay's destinations and the orphan sweep, replay decisions,
//! the sweep after a reload removed destinations, and housekeeping (prune, forget).
//! Each ends when its cancellation token is cancelled.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::delivery::Deliveries;
use crate::ingress::IngressState;
use crate::store::{Store, Wake};

/// How often done deliveries past the retention period are pruned.
const PRUNE_INTERVAL: Duration = Duration::from_secs(3600);

/// How often quiet sources' failed-authentication counters are dropped.
const FORGET_INTERVAL: Duration = Duration::from_secs(60);

/// Shortest life of an announcement of this relay's destinations (shared stores; renewed
/// every `poll_interval`): a relay silent this long (dead, or cut off from the database)
/// no longer protects its destinations from the other relays' orphan sweeps. Generous,
/// so a relay that restarts keeps its destinations' deliveries.
const ANNOUNCEMENT_TTL: Duration = Duration::from_secs(60);

/// An announcement lasts at least this many `poll_interval`s.
const ANNOUNCEMENT_POLLS: u32 = 10;

/// Shared stores sweep orphaned deliveries every this many announcements: with several
/// relays they can appear at any time (the only relay that had a destination died).
const SWEEP_EVERY: u32 = 30;
/// Rounds of the sweep after a reload between two warnings that removed destinations
/// still have attempts under way.
const STILL_WAITING_EVERY: u32 = 60;
/// How long an announcement made under `config` lasts.
pub(super) fn announcement_ttl(config: &Config) -> Duration {
    (config.delivery.poll_interval * ANNOUNCEMENT_POLLS).max(ANNOUNCEMENT_TTL)
}

/// Passes the store's new-delivery notices to the dispatchers running now.
pub(super) async fn forward_wakes(
    mut wakes: tokio::sync::broadcast::Receiver<Wake>,
    deliveries: Arc<Deliveries>,
    stop: CancellationToken,
) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        let wake = tokio::select! {
            w = wakes.recv() => w,
            () = stop.cancelled() => return,
        };
        match wake {
            Ok(wake) => deliveries.wakers().notice(&wake),
            Err(RecvError::Lagged(_)) => deliveries.wakers().all(),
            Err(RecvError::Closed) => return,
        }
    }
}

/// Shared stores: announces this relay's destinations every `poll_interval` (so the
/// other relays' orphan sweeps leave them alone) and sweeps orphans every
/// [`SWEEP_EVERY`] announcements.
pub(super) async fn announce_and_sweep(
    deliveries: Arc<Deliveries>,
    current: Arc<Mutex<Arc<Config>>>,
    stop: CancellationToken,
) {
    let config_now = || Arc::clone(&current.lock().unwrap_or_else(|p| p.into_inner()));
    let mut rounds: u32 = 0;
    loop {
        tokio::select! {
            () = tokio::time::sleep(config_now().delivery.poll_interval) => {}
            () = stop.cancelled() => return,
        }
        let config = config_now();
        if let Err(e) = deliveries.announce(announcement_ttl(&config)).await {
            tracing::warn!(error = %e, "cannot announce this relay's destinations to the other relays");
        }
        rounds = rounds.wrapping_add(1);
        if rounds.is_multiple_of(SWEEP_EVERY)
            && let Err(e) = deliveries.dead_letter_orphans(&config).await
        {
            tracing::warn!(error = %e, "cannot sweep deliveries of destinations no relay has");
        }
    }
}

/// Decides the replay requests of `dead-letters replay` every poll interval (the
/// command waits for the verdict).
pub(super) async fn decide_replays(
    deliveries: Arc<Deliveries>,
    current: Arc<Mutex<Arc<Config>>>,
    stop: CancellationToken,
) {
    // What was last said, so a store that stays down logs once.
    let mut said = String::new();
    loop {
        let poll = current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .delivery
            .poll_interval;
        tokio::select! {
            () = tokio::time::sleep(poll) => {}
            () = stop.cancelled() => return,
        }
        match deliveries.decide_replays().await {
            Ok(()) => said.clear(),
            Err(e) => {
                let e = e.to_string();
                if e != said {
                    tracing::warn!(error = %e, "cannot decide replay requests; trying again every poll interval");
                    said = e;
                }
            }
        }
    }
}

/// Sweeps the destinations a reload removed, after `first` and then every poll interval
/// until none of them has attempts under way.
pub(super) async fn sweep_removed(
    deliveries: Arc<Deliveries>,
    current: Arc<Mutex<Arc<Config>>>,
    first: Duration,
    stop: CancellationToken,
) {
    let mut wait = first;
    let mut rounds: u32 = 0;
    loop {
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = stop.cancelled() => return,
        }
        // The config in force now: a later reload may have brought one back.
        let config = Arc::clone(&current.lock().unwrap_or_else(|p| p.into_inner()));
        rounds = rounds.wrapping_add(1);
        match deliveries.dead_letter_orphans(&config).await {
            Ok(sweep) if sweep.waiting.is_empty() => return,
            Ok(sweep) if rounds.is_multiple_of(STILL_WAITING_EVERY) => {
                tracing::warn!(destinations = %sweep.waiting.join(", "),
                    "removed destinations still have attempts under way; their pending deliveries wait for them");
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e,
                "cannot sweep deliveries of removed destinations; trying again"),
        }
        wait = config.delivery.poll_interval;
    }
}

/// Periodic upkeep: prune old delivered events; forget idle auth-failure counters.
pub(super) async fn housekeeping(
    store: Arc<dyn Store>,
    ingress: Arc<IngressState>,
    retention: Duration,
    stop: CancellationToken,
) {
    let mut prune = tokio::time::interval(PRUNE_INTERVAL);
    let mut forget = tokio::time::interval(FORGET_INTERVAL);
    loop {
        tokio::select! {
            _ = prune.tick() => {}
            _ = forget.tick() => {
                ingress.forget_idle_sources();
                continue;
            }
            () = stop.cancelled() => return,
        }
        let cutoff = crate::event::now_ms() - retention.as_millis() as i64;
        match store.prune(cutoff).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(rows = n, "pruned delivered events past retention"),
            Err(e) => tracing::warn!(error = %e, "prune failed"),
        }
    }
}
