//! One destination's dispatcher and the attempts it starts.

use std::collections::{HashSet, VecDeque};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use super::Shutdown;
use super::retry::{self, Next};
use crate::config::{DestinationConfig, RateLimit, RetryPolicy};
use crate::destinations::{DeliveryError, Destination};
use crate::ingress::verify::now_ms;
use crate::store::{Delivery, Outcome, Store};

/// Most deliveries read ahead from the store per destination.
const MAX_PREFETCH: usize = 256;

/// State shared by a dispatcher and its attempts.
struct Shared {
    /// Destination name, for the store and logs.
    name: String,
    destination: Arc<dyn Destination>,
    store: Arc<dyn Store>,
    retry: RetryPolicy,
    /// `None` when the destination has no `rate_limit`.
    limiter: Option<DefaultDirectRateLimiter>,
    /// Delivery IDs handed out whose outcome is not yet committed.
    in_flight: Mutex<HashSet<i64>>,
    /// Set by a `Retry-After` answer: no new attempt starts before it.
    paused_until: Mutex<Option<Instant>>,
    /// Woken by ingress (new delivery) and by finished attempts.
    wake: Arc<Notify>,
    shutdown: Shutdown,
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

fn limiter(rate: &RateLimit) -> DefaultDirectRateLimiter {
    let period = Duration::from_secs_f64(1.0 / rate.per_second);
    let burst = NonZeroU32::new(rate.burst.max(1)).unwrap_or(NonZeroU32::MIN);
    let quota = Quota::with_period(period)
        .unwrap_or_else(|| Quota::per_second(NonZeroU32::MAX))
        .allow_burst(burst);
    RateLimiter::direct(quota)
}

impl Dispatcher {
    pub fn new(
        config: &DestinationConfig,
        destination: Arc<dyn Destination>,
        store: Arc<dyn Store>,
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
                retry: config.retry,
                limiter: config.rate_limit.as_ref().map(limiter),
                in_flight: Mutex::new(HashSet::new()),
                paused_until: Mutex::new(None),
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

    /// Runs until the soft cancel.
    pub async fn run(self) {
        let shared = &self.shared;
        let cancel = &shared.shutdown.soft;
        let mut queue: VecDeque<Delivery> = VecDeque::new();
        loop {
            let paused = *shared
                .paused_until
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if let Some(until) = paused.filter(|u| *u > Instant::now()) {
                tokio::select! {
                    () = tokio::time::sleep_until(until) => {}
                    () = cancel.cancelled() => break,
                }
                continue;
            }
            let permit = tokio::select! {
                p = Arc::clone(&self.slots).acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
                () = cancel.cancelled() => break,
            };
            if queue.is_empty() {
                match self.fill(&mut queue).await {
                    Ok(()) => {}
                    Err(e) => {
                        tracing::warn!(destination = %shared.name, error = %e, "cannot read pending deliveries");
                    }
                }
            }
            let Some(delivery) = queue.pop_front() else {
                drop(permit);
                let wait = self.idle_wait().await;
                tokio::select! {
                    () = shared.wake.notified() => {}
                    () = tokio::time::sleep(wait) => {}
                    () = cancel.cancelled() => break,
                }
                continue;
            };
            self.tracker
                .spawn(attempt(Arc::clone(shared), delivery, permit));
        }
        // Read-ahead deliveries were never started: release them (they stay pending).
        let mut in_flight = shared.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        for d in queue {
            in_flight.remove(&d.id);
        }
    }

    /// Reads due deliveries not already in flight into `queue`, marking them in flight.
    async fn fill(&self, queue: &mut VecDeque<Delivery>) -> Result<(), crate::store::StoreError> {
        let shared = &self.shared;
        let skip = shared
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len();
        let due = shared
            .store
            .due(&shared.name, now_ms(), self.prefetch + skip)
            .await?;
        let mut in_flight = shared.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        for d in due {
            if queue.len() >= self.prefetch {
                break;
            }
            if in_flight.insert(d.id) {
                queue.push_back(d);
            }
        }
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

/// One attempt: wait for the rate limit, deliver, record the outcome.
async fn attempt(shared: Arc<Shared>, delivery: Delivery, permit: OwnedSemaphorePermit) {
    let release = |shared: &Shared, id: i64| {
        shared
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        shared.wake.notify_one();
    };
    if let Some(limiter) = shared.limiter.as_ref().filter(|l| l.check().is_err()) {
        tracing::debug!(destination = %shared.name, event_id = %delivery.event_id, "waiting for rate limit");
        tokio::select! {
            () = limiter.until_ready() => {}
            () = shared.shutdown.soft.cancelled() => {
                release(&shared, delivery.id);
                return;
            }
        }
    }
    let started = std::time::Instant::now();
    let result = tokio::select! {
        r = shared.destination.deliver(&delivery) => r,
        () = shared.shutdown.hard.cancelled() => {
            tracing::warn!(destination = %shared.name, event_id = %delivery.event_id,
                "delivery abandoned at shutdown; it stays pending and resumes on restart");
            release(&shared, delivery.id);
            return;
        }
    };
    drop(permit);
    let latency_ms = started.elapsed().as_millis() as u64;
    let attempts = delivery.attempts + 1;
    let outcome = decide(&shared, &delivery, attempts, result, latency_ms);
    if let Err(e) = shared.store.record(delivery.id, outcome).await {
        // The row is still pending: it will be delivered again (at-least-once). Wait a
        // little before releasing it so a store outage does not turn into a resend loop.
        tracing::error!(destination = %shared.name, event_id = %delivery.event_id, error = %e,
            "cannot record delivery outcome");
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            () = shared.shutdown.soft.cancelled() => {}
        }
    }
    release(&shared, delivery.id);
}

/// Turns an attempt's result into the outcome to record, logging it.
fn decide(
    shared: &Shared,
    delivery: &Delivery,
    attempts: u32,
    result: Result<(), DeliveryError>,
    latency_ms: u64,
) -> Outcome {
    let name = &shared.name;
    let event_id = &delivery.event_id;
    match result {
        Ok(()) => {
            tracing::info!(destination = %name, event_id = %event_id, attempt = attempts, latency_ms,
                status = "delivered", "delivery succeeded");
            Outcome::Done { attempts }
        }
        Err(DeliveryError::Permanent { reason }) => {
            tracing::warn!(destination = %name, event_id = %event_id, attempt = attempts, latency_ms,
                status = "dead", error = %reason, "delivery failed permanently; moved to dead letters");
            Outcome::Dead {
                attempts,
                error: reason,
            }
        }
        Err(DeliveryError::Retryable {
            reason,
            retry_after,
        }) => {
            if let Some(after) = retry_after {
                let until = Instant::now() + after.min(retry::MAX_RETRY_AFTER);
                *shared
                    .paused_until
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = Some(until);
            }
            match retry::next(&shared.retry, attempts, retry_after, &mut rand::rng()) {
                Next::RetryAfter(delay) => {
                    tracing::warn!(destination = %name, event_id = %event_id, attempt = attempts, latency_ms,
                        status = "retry", retry_in_ms = delay.as_millis() as u64, error = %reason,
                        "delivery failed; will retry");
                    Outcome::Retry {
                        attempts,
                        next_attempt_at_ms: now_ms() + delay.as_millis() as i64,
                        error: reason,
                    }
                }
                Next::GiveUp => {
                    tracing::warn!(destination = %name, event_id = %event_id, attempt = attempts, latency_ms,
                        status = "dead", error = %reason, "delivery failed after its last attempt; moved to dead letters");
                    Outcome::Dead {
                        attempts,
                        error: format!("gave up after {attempts} attempts: {reason}"),
                    }
                }
            }
        }
    }
}
