//! Delivery: workers that take pending deliveries from the store to their destinations.
//!
//! # Invariants
//! - **Claimed by at most one worker.** Each destination has one dispatcher; it keeps the
//!   IDs it has handed out in an in-flight set until their outcome is *committed*, and
//!   skips those IDs when it reads the store, so a delivery is never attempted twice at
//!   once.
//! - **One dispatcher per destination, cluster-wide.** A dispatcher dispatches only while
//!   it owns its destination ([`crate::store::Store::own`]): at once with SQLite (one
//!   daemon per store), one relay at a time with a shared PostgreSQL store. So the
//!   in-flight set, the rate limit and `Retry-After` pauses below hold for every relay
//!   sharing the store. Rows are also claimed in the store under a lease of the
//!   destination's `timeout` plus a margin, re-checked just before each attempt, so a
//!   change of owner never makes two live relays attempt one delivery.
//! - **Every attempt ends in an outcome or stays pending.** Done, retry-at or dead is
//!   recorded after the attempt; if the process dies first, the row is still `pending`
//!   and is attempted again after restart (at-least-once).
//! - **A slow destination only slows itself.** Dispatchers, concurrency limits, rate
//!   limits and `Retry-After` pauses are per destination.
//! - **Rate-limited is not failed.** A delivery waiting for its rate limit holds a
//!   concurrency slot and waits; it is neither dropped nor counted as an attempt.
//! - **The store is read when memory may not hold everything due.** With a store that
//!   hands committed deliveries over in memory ([`Store::take_fresh`]: SQLite, and
//!   PostgreSQL for the deliveries this relay accepts for a destination it owns,
//!   claimed as they are inserted), the dispatcher takes new deliveries from there after
//!   a read of the store that saw everything due; it reads the store again when a retry
//!   it recorded falls due, an attempt ends without an outcome, the store stops the
//!   hand-off (a full queue, replays, an orphan sweep, another relay's insert) or
//!   `poll_interval` has passed since the last read. A shared store's claimed deliveries
//!   are taken after every read too ([`Store::take_claimed`]: a read does not return
//!   them while their lease runs).
//!
//! Shutdown: on the soft cancel, dispatchers stop handing out work and deliveries waiting
//! for a rate limit give up their turn (still pending). Attempts already under way get the
//! `shutdown_grace` period; the hard cancel then abandons them (still pending, resumed on
//! the next start).

mod claims;
pub mod retry;
mod worker;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, DestinationConfig};
use crate::destinations::{self, Destination, SetupError};
use crate::store::{Store, StoreError, Wakers};
use crate::telemetry::events::{OrphansDeadLettered, ReplayDecided};
use crate::telemetry::metrics::Metrics;

pub use worker::Dispatcher;

pub use claims::Claims;

/// Delivery IDs handed out and not yet recorded, per destination name. Kept across
/// reloads: a destination whose settings change gets a new dispatcher, and the old one's
/// attempts may still be running; sharing the claims keeps the new dispatcher off them.
pub type InFlight = Arc<Mutex<Claims>>;

/// The cancellation pair every delivery task watches.
#[derive(Clone)]
pub struct Shutdown {
    /// Stop starting new work.
    pub soft: CancellationToken,
    /// Abandon work under way (after the grace period).
    pub hard: CancellationToken,
}

/// One destination's running dispatcher.
struct Running {
    /// What it was built from; an equal config on reload keeps it running.
    config: DestinationConfig,
    poll_interval: Duration,
    destination: Arc<dyn Destination>,
    /// Stops this dispatcher alone (a child of the global soft cancel).
    stop: CancellationToken,
    wake: Arc<Notify>,
}

/// What a reload did to the destinations.
#[derive(Debug, Default, PartialEq)]
pub struct Applied {
    pub started: Vec<String>,
    pub restarted: Vec<String>,
    pub stopped: Vec<String>,
    /// Pending deliveries of stopped destinations moved to the dead-letter store.
    pub dead_lettered: u64,
}

/// How long a sweep of removed destinations may wait for the store.
const SWEEP_TIMEOUT: Duration = Duration::from_secs(30);

/// What one sweep of removed destinations did.
#[derive(Debug, Default, PartialEq)]
pub struct Sweep {
    /// Pending deliveries moved to the dead-letter store.
    pub moved: u64,
    /// Removed destinations skipped because attempts of theirs are still under way.
    pub waiting: Vec<String>,
}

/// All dispatchers, replaced destination by destination on reload.
pub struct Deliveries {
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    tracker: TaskTracker,
    shutdown: Shutdown,
    running: Mutex<HashMap<String, Running>>,
    in_flight: Mutex<HashMap<String, InFlight>>,
    /// The wakers of the running dispatchers, for wake-ups that come from the store.
    wakers: Mutex<Wakers>,
    /// Held while announcing, so an announcement that read an older set of destinations
    /// can never land after one that read a newer set.
    announcing: tokio::sync::Mutex<()>,
    /// Held by a sweep from reading which destinations run until its store call ends,
    /// and by [`Deliveries::apply`] while it swaps dispatchers: a destination brought
    /// back by a reload is either running before the sweep looks, or swept before its
    /// new dispatcher starts, never both.
    sweeping: tokio::sync::Mutex<()>,
}

impl Deliveries {
    pub fn new(
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
        tracker: TaskTracker,
        shutdown: Shutdown,
    ) -> Self {
        Self {
            store,
            metrics,
            tracker,
            shutdown,
            running: Mutex::new(HashMap::new()),
            in_flight: Mutex::new(HashMap::new()),
            wakers: Mutex::new(Wakers::default()),
            announcing: tokio::sync::Mutex::new(()),
            sweeping: tokio::sync::Mutex::new(()),
        }
    }

    /// Tells the other processes sharing the store that this one has the destinations
    /// its dispatchers run now, for `alive_for` ([`Store::announce`]; a no-op for a store
    /// used by one daemon). Call it after [`Deliveries::apply`] and before ingress routes
    /// to a new destination, and periodically.
    pub async fn announce(&self, alive_for: Duration) -> Result<(), StoreError> {
        let _one_at_a_time = self.announcing.lock().await;
        let names = self.running_names();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        self.store.announce(&names, alive_for).await
    }

    /// The destinations whose dispatchers run now.
    fn running_names(&self) -> Vec<String> {
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    /// The wakers of the dispatchers running now.
    pub fn wakers(&self) -> Wakers {
        self.wakers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Makes the running dispatchers match `config`: unchanged destinations keep running
    /// (file destinations reopen their files, for log rotation), changed ones are
    /// rebuilt, new ones start, removed ones stop (their pending deliveries are for
    /// [`Deliveries::dead_letter_orphans`]). Every destination is built before anything
    /// changes, so an error leaves the old set running.
    pub async fn apply(&self, config: &Config) -> Result<(Wakers, Applied), SetupError> {
        let poll = config.delivery.poll_interval;
        let mut keep = Vec::new();
        let mut build = Vec::new();
        {
            let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
            for d in &config.destinations {
                match running.get(&d.name) {
                    Some(r) if r.config == *d && r.poll_interval == poll => {
                        keep.push(Arc::clone(&r.destination));
                    }
                    _ => build.push((d.clone(), destinations::build(d)?)),
                }
            }
        }
        // A store used by one daemon: this process owns every destination, so files are
        // opened now and a bad path fails the start or the reload before anything
        // changes. With a shared store each dispatcher opens its file once it owns it.
        if !self.store.shared() {
            for (_, destination) in &build {
                destination.acquire().await?;
            }
        }
        for destination in keep {
            if let Err(e) = destination.reopen().await {
                tracing::warn!(error = %e, "cannot reopen a file destination");
            }
        }

        let mut applied = Applied::default();
        let _sweeping = self.sweeping.lock().await;
        let wakers = self.swap(config, build, &mut applied);
        Ok((wakers, applied))
    }

    /// Reopens the files of every running destination (log rotation). A SIGHUP whose
    /// config is refused still does this: logrotate sends it whatever the file says.
    pub async fn reopen(&self) {
        let running: Vec<Arc<dyn Destination>> = self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|r| Arc::clone(&r.destination))
            .collect();
        for destination in running {
            if let Err(e) = destination.reopen().await {
                tracing::warn!(error = %e, "cannot reopen a file destination");
            }
        }
    }

    /// Stops removed and changed dispatchers and starts the `build`t ones.
    fn swap(
        &self,
        config: &Config,
        build: Vec<(DestinationConfig, Arc<dyn Destination>)>,
        applied: &mut Applied,
    ) -> Wakers {
        let poll = config.delivery.poll_interval;
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let wanted: HashSet<&str> = config
            .destinations
            .iter()
            .map(|d| d.name.as_str())
            .collect();
        let removed: Vec<String> = running
            .keys()
            .filter(|name| !wanted.contains(name.as_str()))
            .cloned()
            .collect();
        for name in removed {
            if let Some(r) = running.remove(&name) {
                r.stop.cancel();
            }
            applied.stopped.push(name);
        }
        for (dest_config, destination) in build {
            let name = dest_config.name.clone();
            match running.remove(&name) {
                Some(old) => {
                    old.stop.cancel();
                    applied.restarted.push(name.clone());
                }
                None => applied.started.push(name.clone()),
            }
            let in_flight = Arc::clone(
                self.in_flight
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(name.clone())
                    .or_default(),
            );
            self.metrics.init_destination(&name);
            let stop = self.shutdown.soft.child_token();
            let dispatcher = Dispatcher::new(
                &dest_config,
                Arc::clone(&destination),
                Arc::clone(&self.store),
                Arc::clone(&self.metrics),
                in_flight,
                poll,
                Shutdown {
                    soft: stop.clone(),
                    hard: self.shutdown.hard.clone(),
                },
                self.tracker.clone(),
            );
            let wake = dispatcher.waker();
            self.tracker.spawn(dispatcher.run());
            running.insert(
                name,
                Running {
                    config: dest_config,
                    poll_interval: poll,
                    destination,
                    stop,
                    wake,
                },
            );
        }
        let wakers = Wakers::new(
            running
                .iter()
                .map(|(name, r)| (name.clone(), Arc::clone(&r.wake))),
        );
        *self.wakers.lock().unwrap_or_else(|p| p.into_inner()) = wakers.clone();
        wakers
    }

    /// Decides the replay requests `dead-letters replay` recorded: dead letters of a
    /// destination this process runs now (or, in a shared store, another live relay
    /// announced) are queued again and their dispatchers woken; the others stay dead
    /// letters with the reason. Under the sweep lock, like the sweep: a destination a
    /// reload removes is either running when its requests are decided (and its new
    /// pending deliveries are then swept by that reload) or refused, never left pending
    /// without a dispatcher.
    pub async fn decide_replays(&self) -> Result<(), StoreError> {
        let _sweeping = self.sweeping.lock().await;
        let running = self.running_names();
        let running: Vec<&str> = running.iter().map(String::as_str).collect();
        let decided = tokio::time::timeout(SWEEP_TIMEOUT, self.store.decide_replays(&running))
            .await
            .unwrap_or_else(|_| {
                Err(StoreError::Unavailable(
                    "deciding replay requests timed out".into(),
                ))
            })?;
        let wakers = self.wakers();
        for (destination, count) in &decided.replayed {
            ReplayDecided {
                destination,
                count: *count,
                replayed: true,
            }
            .emit();
            wakers.destination(destination);
        }
        for (destination, count) in &decided.refused {
            ReplayDecided {
                destination,
                count: *count,
                replayed: false,
            }
            .emit();
        }
        Ok(())
    }

    /// Moves pending deliveries for destinations not in `config` to the dead letters.
    /// Call it once ingress uses `config` (so no new delivery for a removed destination
    /// can be written after it), and again after requests that started before have ended.
    ///
    /// A removed destination with attempts still under way is left alone (and named in
    /// [`Sweep::waiting`]): its attempts finish and record their outcome, so a delivery
    /// that arrives is never also a dead letter. Sweep again once they have ended.
    pub async fn dead_letter_orphans(&self, config: &Config) -> Result<Sweep, StoreError> {
        let _sweeping = self.sweeping.lock().await;
        // The running dispatchers count as known too: `config` may be older than a
        // reload that just brought a destination back.
        let running = self.running_names();
        let mut known: Vec<&str> = config
            .destinations
            .iter()
            .map(|d| d.name.as_str())
            .chain(running.iter().map(String::as_str))
            .collect();
        let waiting: Vec<String> = self
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(name, claims)| {
                !known.contains(&name.as_str())
                    && !claims.lock().unwrap_or_else(|p| p.into_inner()).is_empty()
            })
            .map(|(name, _)| name.clone())
            .collect();
        known.extend(waiting.iter().map(String::as_str));
        let swept = tokio::time::timeout(SWEEP_TIMEOUT, self.store.dead_letter_orphans(&known))
            .await
            .unwrap_or_else(|_| {
                Err(StoreError::Unavailable(
                    "the sweep of removed destinations timed out".into(),
                ))
            })?;
        let mut moved = 0;
        for (destination, count) in swept {
            OrphansDeadLettered {
                destination: &destination,
                count,
            }
            .emit(&self.metrics);
            moved += count;
        }
        Ok(Sweep { moved, waiting })
    }
}
