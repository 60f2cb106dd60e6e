//! One destination's dispatcher and the attempts it starts.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, RateLimiter};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use super::retry::{self, Next};
use super::{InFlight, Shutdown};
use crate::config::{DestinationConfig, RetryPolicy};
use crate::destinations::{DeliveryError, Destination};
use crate::ingress::verify::now_ms;
use crate::store::{Delivery, Outcome, Ownership, Store};
use crate::telemetry::events::{AttemptResult, DeliveryAttempted, RateLimitWait};
use crate::telemetry::metrics::Metrics;

/// Most deliveries read ahead from the store per destination.
const MAX_PREFETCH: usize = 256;

/// Added to the destination's `timeout` to make the lease on a delivery claimed for an
/// attempt (shared stores): covers the time between re-checking the claim and the
/// request starting, and scheduling delays, so a lease does not run out while its
/// attempt can still be under way.
pub const LEASE_MARGIN: Duration = Duration::from_secs(5);

/// State shared by a dispatcher and its attempts.
struct Shared {
    /// Destination name, for the store and logs.
    name: String,
    destination: Arc<dyn Destination>,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    retry: RetryPolicy,
    /// `None` when the destination has no `rate_limit`.
    limiter: Option<DefaultDirectRateLimiter>,
    /// Delivery IDs handed out whose outcome is not yet committed (shared with any
    /// earlier dispatcher of the same destination, see [`InFlight`]).
    in_flight: InFlight,
    /// Set by a `Retry-After` answer: no new attempt starts before it.
    paused_until: Mutex<Option<Instant>>,
    /// How long a claim on a delivery lasts in a shared store (`timeout` + [`LEASE_MARGIN`]).
    lease: Duration,
    /// Woken by ingress (new delivery) and by finished attempts.
    wake: Arc<Notify>,
    shutdown: Shutdown,
}

impl Shared {
    /// The end of a `Retry-After` pause still in force, if any.
    fn pause(&self) -> Option<Instant> {
        let until = *self.paused_until.lock().unwrap_or_else(|p| p.into_inner());
        until.filter(|u| *u > Instant::now())
    }
}

/// Hands one destination's due deliveries to attempts, within its concurrency.
pub struct Dispatcher {
    shared: Arc<Shared>,
    /// `concurrency` permits; an attempt holds one from start to finish.
    slots: Arc<Semaphore>,
    /// How many deliveries to read ahead.
    prefetch: usize,
    /// Longest idle wait before looking at the store again (catches replays made by
    /// `dead-letters replay` in another process).
    poll_interval: Duration,
    tracker: TaskTracker,
}

impl Dispatcher {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: &DestinationConfig,
        destination: Arc<dyn Destination>,
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
        in_flight: InFlight,
        poll_interval: Duration,
        shutdown: Shutdown,
        tracker: TaskTracker,
    ) -> Self {
        let concurrency = config.concurrency.max(1);
        Self {
            shared: Arc::new(Shared {
                name: config.name.clone(),
                destination,
                store,
                metrics,
                retry: config.retry,
                limiter: config
                    .rate_limit
                    .as_ref()
                    .map(|r| RateLimiter::direct(r.quota())),
                in_flight,
                paused_until: Mutex::new(None),
                lease: config.timeout + LEASE_MARGIN,
                wake: Arc::new(Notify::new()),
                shutdown,
            }),
            slots: Arc::new(Semaphore::new(concurrency)),
            prefetch: (concurrency * 2).clamp(16, MAX_PREFETCH),
            poll_interval,
            tracker,
        }
    }

    /// The notifier that makes this dispatcher look at the store now.
    pub fn waker(&self) -> Arc<Notify> {
        Arc::clone(&self.shared.wake)
    }

    /// Runs until the soft cancel: waits to own the destination, dispatches while it does,
    /// and waits again if the ownership is lost.
    pub async fn run(self) {
        let shared = &self.shared;
        while let Some(ownership) = self.acquire().await {
            self.dispatch(&ownership).await;
            if !ownership.is_lost() {
                break;
            }
            tracing::warn!(destination = %shared.name,
                "lost ownership of this destination (store connection failed); asking again");
        }
    }

    /// Waits until this process owns the destination (at once with a store used by one
    /// daemon); `None` on the soft cancel.
    async fn acquire(&self) -> Option<Ownership> {
        let shared = &self.shared;
        let cancel = &shared.shutdown.soft;
        let mut waited = false;
        // What was last said, so a long wait logs once, not every poll.
        let mut said = String::new();
        loop {
            match shared.store.own(&shared.name).await {
                Ok(Some(ownership)) => {
                    if waited {
                        tracing::info!(destination = %shared.name,
                            "this relay now dispatches this destination");
                    }
                    return Some(ownership);
                }
                Ok(None) => {
                    if said != "standing by" {
                        said = "standing by".into();
                        tracing::info!(destination = %shared.name,
                            "another relay dispatches this destination; standing by");
                    }
                }
                Err(e) => {
                    let e = e.to_string();
                    if said != e {
                        tracing::warn!(destination = %shared.name, error = %e,
                            "cannot ask for ownership of this destination; asking again every poll interval");
                        said = e;
                    }
                }
            }
            waited = true;
            tokio::select! {
                () = tokio::time::sleep(self.poll_interval) => {}
                () = cancel.cancelled() => return None,
            }
        }
    }

    /// Dispatches until the soft cancel or the loss of `ownership`.
    async fn dispatch(&self, ownership: &Ownership) {
        let shared = &self.shared;
        let cancel = &shared.shutdown.soft;
        let mut queue: VecDeque<Delivery> = VecDeque::new();
        loop {
            if ownership.is_lost() {
                break;
            }
            if let Some(until) = shared.pause() {
                tokio::select! {
                    () = tokio::time::sleep_until(until) => {}
                    () = cancel.cancelled() => break,
                    () = ownership.lost() => break,
                }
                continue;
            }
            let permit = tokio::select! {
                p = Arc::clone(&self.slots).acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
                () = cancel.cancelled() => break,
                () = ownership.lost() => break,
            };
            if queue.is_empty() {
                match self.fill(&mut queue).await {
                    Ok(()) => {}
                    Err(e) => {
                        tracing::warn!(destination = %shared.name, error = %e, "cannot read pending deliveries");
                    }
                }
            }
            if cancel.is_cancelled() || ownership.is_lost() {
                break;
            }
            let Some(delivery) = queue.pop_front() else {
                drop(permit);
                let wait = self.idle_wait().await;
                tokio::select! {
                    () = shared.wake.notified() => {}
                    () = tokio::time::sleep(wait) => {}
                    () = cancel.cancelled() => break,
                    () = ownership.lost() => break,
                }
                continue;
            };
            self.tracker
                .spawn(attempt(Arc::clone(shared), delivery, permit));
        }
        // Read-ahead deliveries were never started: release them (they stay pending).
        let ids: Vec<i64> = queue.iter().map(|d| d.id).collect();
        {
            let mut in_flight = shared.in_flight.lock().unwrap_or_else(|p| p.into_inner());
            for id in &ids {
                in_flight.release(*id);
            }
        }
        self.unclaim(&ids).await;
    }

    /// Gives the store's claims on never-attempted deliveries back, so another process
    /// need not wait for their lease (a no-op for a store used by one daemon).
    async fn unclaim(&self, ids: &[i64]) {
        if ids.is_empty() {
            return;
        }
        if let Err(e) = self.shared.store.unclaim(ids).await {
            tracing::warn!(destination = %self.shared.name, error = %e,
                "cannot give back unattempted deliveries; they wait for their lease");
        }
    }

    /// Claims due deliveries not already in flight into `queue`, marking them in flight.
    async fn fill(&self, queue: &mut VecDeque<Delivery>) -> Result<(), crate::store::StoreError> {
        let shared = &self.shared;
        let (skip, read) = {
            let mut claims = shared.in_flight.lock().unwrap_or_else(|p| p.into_inner());
            (claims.len(), claims.read_started())
        };
        let due = shared
            .store
            .claim(&shared.name, now_ms(), self.prefetch, skip, shared.lease)
            .await;
        let mut surplus = Vec::new();
        {
            let mut claims = shared.in_flight.lock().unwrap_or_else(|p| p.into_inner());
            let due = match due {
                Ok(due) => due,
                Err(e) => {
                    claims.read_finished();
                    return Err(e);
                }
            };
            for d in due {
                if queue.len() < self.prefetch && claims.claim(d.id, read) {
                    queue.push_back(d);
                } else if !claims.contains(d.id) {
                    // Claimed in the store but not taken here: give it back at once.
                    surplus.push(d.id);
                }
            }
            claims.read_finished();
        }
        self.unclaim(&surplus).await;
        Ok(())
    }

    /// How long to sleep when nothing is due: until the next retry, at most one poll.
    /// Attempts under way wake the dispatcher when they finish, so they need no timer.
    async fn idle_wait(&self) -> Duration {
        let now = now_ms();
        match self
            .shared
            .store
            .next_due_after(&self.shared.name, now)
            .await
        {
            Ok(Some(at)) => {
                let ms = (at - now).max(1) as u64;
                Duration::from_millis(ms).min(self.poll_interval)
            }
            _ => self.poll_interval,
        }
    }
}

/// Releases a claim when dropped, so an attempt that ends any way at all (including a
/// panic in a destination) never leaves its delivery claimed until restart.
struct Claim {
    shared: Arc<Shared>,
    id: i64,
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.shared
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .release(self.id);
        self.shared.wake.notify_one();
    }
}

/// Longest pause between tries to record an outcome while the store refuses writes.
const MAX_RECORD_BACKOFF: Duration = Duration::from_secs(30);

/// One attempt: wait for the rate limit and any `Retry-After` pause, deliver, record.
async fn attempt(shared: Arc<Shared>, delivery: Delivery, permit: OwnedSemaphorePermit) {
    let _claim = Claim {
        shared: Arc::clone(&shared),
        id: delivery.id,
    };
    if let Some(limiter) = shared.limiter.as_ref().filter(|l| l.check().is_err()) {
        RateLimitWait {
            destination: &shared.name,
            event_id: &delivery.event_id,
        }
        .emit(&shared.metrics);
        tokio::select! {
            () = limiter.until_ready() => {}
            () = shared.shutdown.soft.cancelled() => return,
        }
    }
    // A `Retry-After` may have arrived while this attempt waited for its turn, and
    // another may extend it while this one sleeps: wait until no pause is in force.
    while let Some(until) = shared.pause() {
        tokio::select! {
            () = tokio::time::sleep_until(until) => {}
            () = shared.shutdown.soft.cancelled() => return,
        }
    }
    // A shared store's claim may have run out while this delivery waited (another relay
    // then owns the destination and may have taken the row): check and extend it.
    match shared.store.renew(delivery.id, shared.lease).await {
        Ok(true) => {}
        Ok(false) => {
            tracing::info!(destination = %shared.name, event_id = %delivery.event_id,
                "delivery claimed by another relay or no longer pending; not attempted here");
            return;
        }
        Err(e) => {
            tracing::warn!(destination = %shared.name, event_id = %delivery.event_id, error = %e,
                "cannot confirm the claim on a delivery; it stays pending and is tried later");
            return;
        }
    }
    let started = std::time::Instant::now();
    let result = tokio::select! {
        r = shared.destination.deliver(&delivery) => r,
        () = shared.shutdown.hard.cancelled() => {
            tracing::warn!(destination = %shared.name, event_id = %delivery.event_id,
                "delivery abandoned at shutdown; it stays pending and resumes on restart");
            return;
        }
    };
    let attempts = delivery.attempts + 1;
    // Decided (and any pause set) before the slot is freed, so the next attempt sees it.
    let outcome = decide(&shared, &delivery, attempts, result, started.elapsed());
    drop(permit);
    // Keep the claim until the outcome is committed: releasing it earlier would resend
    // the delivery while the store is down, ignoring its backoff.
    let mut backoff = Duration::from_millis(100);
    while let Err(e) = shared.store.record(delivery.id, outcome.clone()).await {
        tracing::error!(destination = %shared.name, event_id = %delivery.event_id, error = %e,
            retry_in_ms = backoff.as_millis() as u64, "cannot record delivery outcome; retrying");
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            // Not recorded: the row stays pending and is attempted again after restart.
            () = shared.shutdown.hard.cancelled() => return,
        }
        backoff = (backoff * 2).min(MAX_RECORD_BACKOFF);
    }
}

/// Turns an attempt's result into the outcome to record, and reports it.
fn decide(
    shared: &Shared,
    delivery: &Delivery,
    attempts: u32,
    result: Result<(), DeliveryError>,
    latency: Duration,
) -> Outcome {
    let mut retry_in = Duration::ZERO;
    let outcome = match result {
        Ok(()) => Outcome::Done { attempts },
        Err(DeliveryError::Permanent { reason }) => Outcome::Dead {
            attempts,
            error: reason,
        },
        Err(DeliveryError::Retryable {
            reason,
            retry_after,
        }) => {
            if let Some(after) = retry_after {
                // The destination asked for a pause: no attempt of any delivery before it.
                let until = Instant::now() + after.min(retry::MAX_RETRY_AFTER);
                *shared
                    .paused_until
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = Some(until);
            }
            match retry::next(&shared.retry, attempts, retry_after, &mut rand::rng()) {
                Next::RetryAfter(delay) => {
                    retry_in = delay;
                    Outcome::Retry {
                        attempts,
                        next_attempt_at_ms: now_ms() + delay.as_millis() as i64,
                        error: reason,
                    }
                }
                Next::GiveUp => Outcome::Dead {
                    attempts,
                    error: format!("gave up after {attempts} attempts: {reason}"),
                },
            }
        }
    };
    let result = match &outcome {
        Outcome::Done { .. } => AttemptResult::Delivered {
            end_to_end: Duration::from_millis((now_ms() - delivery.received_at_ms).max(0) as u64),
        },
        Outcome::Retry { error, .. } => AttemptResult::Retry { retry_in, error },
        Outcome::Dead { error, .. } => AttemptResult::Dead { error },
    };
    DeliveryAttempted {
        destination: &shared.name,
        event_id: &delivery.event_id,
        attempt: attempts,
        latency,
        result,
    }
    .emit(&shared.metrics);
    outcome
}
