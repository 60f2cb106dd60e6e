//! Delivery: workers that take pending deliveries from the store to their destinations.
//!
//! # Invariants
//! - **Claimed by at most one worker.** Each destination has one dispatcher; it keeps the
//!   IDs it has handed out in an in-flight set until their outcome is *committed*, and
//!   skips those IDs when it reads the store, so a delivery is never attempted twice at
//!   once. (The store holds one daemon at a time, so there is no other process to race.)
//! - **Every attempt ends in an outcome or stays pending.** Done, retry-at or dead is
//!   recorded after the attempt; if the process dies first, the row is still `pending`
//!   and is attempted again after restart (at-least-once).
//! - **A slow destination only slows itself.** Dispatchers, concurrency limits, rate
//!   limits and `Retry-After` pauses are per destination.
//! - **Rate-limited is not failed.** A delivery waiting for its rate limit holds a
//!   concurrency slot and waits; it is neither dropped nor counted as an attempt.
//!
//! Shutdown: on the soft cancel, dispatchers stop handing out work and deliveries waiting
//! for a rate limit give up their turn (still pending). Attempts already under way get the
//! `shutdown_grace` period; the hard cancel then abandons them (still pending, resumed on
//! the next start).

pub mod retry;
mod worker;

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::destinations;
use crate::store::Store;

pub use worker::Dispatcher;

/// Handle to the running dispatchers: ingress uses it to wake a destination's dispatcher
/// as soon as a new delivery for it is committed.
#[derive(Clone, Default)]
pub struct Wakers {
    by_destination: Arc<HashMap<String, Arc<Notify>>>,
}

impl Wakers {
    /// Wakes `destination`'s dispatcher (a no-op for unknown names).
    pub fn wake(&self, destination: &str) {
        if let Some(n) = self.by_destination.get(destination) {
            n.notify_one();
        }
    }
}

/// The cancellation pair every delivery task watches.
#[derive(Clone)]
pub struct Shutdown {
    /// Stop starting new work.
    pub soft: CancellationToken,
    /// Abandon work under way (after the grace period).
    pub hard: CancellationToken,
}

/// Builds every configured destination and starts one dispatcher per destination on
/// `tracker`. Fails (before starting anything) if a destination cannot be built.
pub fn start(
    config: &Config,
    store: Arc<dyn Store>,
    tracker: &TaskTracker,
    shutdown: Shutdown,
) -> anyhow::Result<Wakers> {
    let mut dispatchers = Vec::with_capacity(config.destinations.len());
    let mut wakers = HashMap::new();
    for dest_config in &config.destinations {
        let destination = destinations::build(dest_config)?;
        let dispatcher = Dispatcher::new(
            dest_config,
            destination,
            Arc::clone(&store),
            config.delivery.poll_interval,
            shutdown.clone(),
            tracker.clone(),
        );
        wakers.insert(dest_config.name.clone(), dispatcher.waker());
        dispatchers.push(dispatcher);
    }
    for dispatcher in dispatchers {
        tracker.spawn(dispatcher.run());
    }
    Ok(Wakers {
        by_destination: Arc::new(wakers),
    })
}
