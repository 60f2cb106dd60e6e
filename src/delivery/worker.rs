//! One destination's dispatcher and the attempts it starts.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, RateLimiter};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::retry::{self, Next};
use super::{InFlight, Shutdown};
use crate::config::{DestinationConfig, RetryPolicy};
use crate::destinations::{DeliveryError, Destination};
use crate::event::now_ms;
use crate::store::{ClaimRequest, Delivery, Outcome, Ownership, Store, StoreError};
use crate::telemetry::events::{AttemptResult, DeliveryAttempted, RateLimitWait};
use crate::telemetry::metrics::Metrics;

/// Most deliveries read ahead from the store per destination.
const MAX_PREFETCH: usize = 256;

/// Attempts per `concurrency` slot that may be started or waiting for their outcome to be
/// committed (at least [`MIN_UNRECORDED`]): an attempt frees its slot before recording, so
/// without this bound a store that records outcomes more slowly than the destination takes
/// deliveries would let waiting attempts, each with its delivery and claim, pile up
/// without limit (the PostgreSQL relay's RSS grew to 205 MB that way).
const UNRECORDED_PER_SLOT: usize = 4;

/// The least bound on attempts waiting for their outcome, so a destination with
/// `concurrency: 1` is not held to a few deliveries per outcome commit.
const MIN_UNRECORDED: usize = 256;

/// Added to the destination's `timeout` to make the lease on a delivery claimed for an
/// attempt (shared stores): covers the time between re-checking the claim and the
/// request starting, and scheduling delays, so a lease does not run out while its
/// attempt can still be under way.
pub const LEASE_MARGIN: Duration = Duration::from_secs(5);

/// How long before its lease runs out (on this process's clock) an attempt must be over:
/// room for scheduling delays and clocks that run at slightly different rates. An attempt
/// whose claim renewal took longer than `LEASE_MARGIN - LEASE_SAFETY` is skipped.
const LEASE_SAFETY: Duration = Duration::from_secs(1);

/// Longest a dispatcher or an attempt waits for one store call. A store that hangs (a
/// dead network path to a shared database) then fails the call, which is retried,
/// instead of stalling the destination for good.
pub const STORE_TIMEOUT: Duration = Duration::from_secs(10);

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
    /// Earliest `next_attempt_at` (Unix ms) of a retry recorded since the dispatcher's
    /// last read of the store, `i64::MAX` for none: the in-memory hand-off does not see
    /// a retry fall due, so the dispatcher reads the store then.
    next_retry: AtomicI64,
    /// Set (after its in-process release) by an attempt that ended without recording an
    /// outcome: its delivery is pending and due but in no hand-off queue, so the
    /// dispatcher reads the store next.
    given_back: AtomicBool,
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
    /// `concurrency` permits; an attempt holds one while it delivers.
    slots: Arc<Semaphore>,
    /// An attempt holds one from start until its outcome is committed (see
    /// [`UNRECORDED_PER_SLOT`]).
    unrecorded: Arc<Semaphore>,
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
                next_retry: AtomicI64::new(i64::MAX),
                given_back: AtomicBool::new(false),
            }),
            slots: Arc::new(Semaphore::new(concurrency)),
            unrecorded: Arc::new(Semaphore::new(
                (concurrency * UNRECORDED_PER_SLOT).max(MIN_UNRECORDED),
            )),
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
            // Opened only by the owner (a file another relay owns is never touched).
            if let Err(e) = shared.destination.acquire().await {
                tracing::warn!(destination = %shared.name, error = %format!("{e:#}"),
                    "cannot open this destination; giving it up and asking again every poll interval");
                drop(ownership);
                tokio::select! {
                    () = tokio::time::sleep(self.poll_interval) => continue,
                    () = shared.shutdown.soft.cancelled() => break,
                }
            }
            self.dispatch(&ownership).await;
            if !ownership.is_lost() {
                break;
            }
            // Closed at once: another relay may take it over (and repair the file).
            shared.destination.release().await;
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
        // Rows another relay claimed are left alone for one full lease from here, on this
        // clock: that relay may have owned the destination until now and still be
        // finishing attempts whose lease looks over on the database's clock.
        let owned_at = Instant::now();
        // Claimed deliveries not yet started, each with the moment its claim was asked for.
        let mut queue = Queue::new();
        let mut handoff = HandOff::new();
        // A store other processes write to (PostgreSQL) is read a round trip away, and a
        // claim waits for its commit to be flushed: while the last claim returned all it
        // was asked for, the next one is asked for when half the queue is started, so
        // the attempts need not wait for it (they did: at c=256 the destination sat idle
        // during each claim). A store used by one daemon that hands deliveries over in
        // memory (SQLite) reads only when the queue is empty, as its hand-off needs.
        let read_ahead = shared.store.shared() || !shared.store.hands_off();
        let mut ahead: Option<ReadAhead> = None;
        let mut more_due = false;
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
            // Outcomes not yet committed first: while the store records more slowly than
            // the destination takes deliveries, new attempts wait here, holding nothing.
            let Some(unrecorded) = permit(&self.unrecorded, cancel, ownership).await else {
                break;
            };
            let Some(permit) = permit(&self.slots, cancel, ownership).await else {
                break;
            };
            if queue.is_empty() {
                let filled = match ahead.take() {
                    Some(read) => {
                        let filled = read.join(&mut queue).await;
                        self.take_claimed(&mut queue);
                        filled
                    }
                    None => {
                        let take_over = owned_at.elapsed() >= shared.lease;
                        self.fill(&mut queue, take_over, &mut handoff).await
                    }
                };
                more_due = match filled {
                    Ok(full) => full,
                    Err(e) => {
                        tracing::warn!(destination = %shared.name, error = %e, "cannot read pending deliveries");
                        false
                    }
                };
            }
            if cancel.is_cancelled() || ownership.is_lost() {
                break;
            }
            let Some((delivery, claimed_at)) = queue.pop_front() else {
                drop(permit);
                let wait = self.idle_wait(&handoff).await;
                tokio::select! {
                    () = shared.wake.notified() => {}
                    () = tokio::time::sleep(wait) => {}
                    () = cancel.cancelled() => break,
                    () = ownership.lost() => break,
                }
                continue;
            };
            self.tracker.spawn(attempt(
                Arc::clone(shared),
                delivery,
                claimed_at,
                permit,
                ownership.lost_token(),
                unrecorded,
            ));
            if read_ahead && more_due && ahead.is_none() && queue.len() <= self.prefetch / 2 {
                more_due = false;
                let take_over = owned_at.elapsed() >= shared.lease;
                ahead = Some(ReadAhead::start(self, take_over));
            }
        }
        // A claim under way is waited for: its rows are claimed, and given back below.
        if let Some(read) = ahead.take() {
            let _ = read.join(&mut queue).await;
        }
        // Read-ahead deliveries were never started: give them back in the store first,
        // then here (they stay pending). In this order another dispatcher of this
        // process (a reload) cannot claim them here while the store still has them
        // claimed for this one.
        let unstarted: Vec<Delivery> = queue.into_iter().map(|(d, _)| d).collect();
        unclaim(shared, &unstarted).await;
        // Those a shared store claimed here as they committed, and never handed over, it
        // gives back itself when the ownership is dropped (unless a newer dispatcher of
        // this relay owns the destination by then: a reload; they are its).
        let mut in_flight = shared.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        for d in &unstarted {
            in_flight.release(d.id);
        }
    }

    /// Claims due deliveries not already in flight into `queue`, marking them in flight:
    /// from the in-memory hand-off while it holds everything due, else from the store.
    /// `true` when the store returned as many as were asked for (more may be due).
    async fn fill(
        &self,
        queue: &mut Queue,
        take_over: bool,
        handoff: &mut HandOff,
    ) -> Result<bool, StoreError> {
        let shared = &self.shared;
        if handoff.complete(shared, self.poll_interval)
            && let Some(fresh) = shared.store.take_fresh(&shared.name, self.prefetch)
        {
            // Committed while the last read ran: that read returned it already.
            admit(shared, queue, fresh, &handoff.seen);
            return Ok(false);
        }
        // A full read. From here, retries recorded and deliveries given back are noted
        // afresh; whatever the read cannot see of them then is noted after it.
        // Only the poll interval ran out: what the dispatcher knows of retries holds.
        let given_back = shared.given_back.swap(false, Ordering::SeqCst);
        let retries_known =
            handoff.known && !given_back && shared.next_retry.load(Ordering::SeqCst) > now_ms();
        handoff.known = false;
        if !retries_known {
            shared.next_retry.store(i64::MAX, Ordering::SeqCst);
        }
        handoff.read_at = Instant::now();
        let Claimed { everything, full } =
            claim_rows(shared, self.prefetch, take_over, queue, &mut handoff.seen).await?;
        self.take_claimed(queue);
        if everything && shared.store.hands_off() {
            if !retries_known {
                // Retries scheduled before the read: the hand-off will not show them.
                let now = now_ms();
                let next = tokio::time::timeout(
                    STORE_TIMEOUT,
                    shared.store.next_due_after(&shared.name, now),
                )
                .await
                .unwrap_or_else(|_| Err(timed_out("reading the next retry")))?;
                if let Some(at) = next {
                    shared.next_retry.fetch_min(at, Ordering::SeqCst);
                }
            }
            handoff.known = true;
        }
        Ok(full)
    }

    /// Appends what a shared store claimed for this dispatcher as the deliveries
    /// committed here (a read of the store does not return them while their lease runs),
    /// up to the prefetch, marking them in flight. A delivery already in flight (its
    /// lease ran out while it waited here, and a read claimed it again) is dropped: that
    /// newer claim attempts it.
    fn take_claimed(&self, queue: &mut Queue) {
        let shared = &self.shared;
        let room = self.prefetch.saturating_sub(queue.len());
        if room == 0 {
            return;
        }
        let claimed = shared.store.take_claimed(&shared.name, room);
        if !claimed.is_empty() {
            admit(shared, queue, claimed, &HashSet::new());
        }
    }

    /// How long to sleep when nothing is due: until the next retry, at most one poll.
    /// Attempts under way wake the dispatcher when they finish, so they need no timer.
    /// While the hand-off holds everything due, the store need not be asked.
    async fn idle_wait(&self, handoff: &HandOff) -> Duration {
        let now = now_ms();
        if handoff.known {
            let to_poll = self.poll_interval.saturating_sub(handoff.read_at.elapsed());
            let to_retry = self
                .shared
                .next_retry
                .load(Ordering::SeqCst)
                .saturating_sub(now);
            let to_retry = Duration::from_millis(to_retry.max(1) as u64);
            return to_poll.min(to_retry).max(Duration::from_millis(1));
        }
        let next = tokio::time::timeout(
            STORE_TIMEOUT,
            self.shared.store.next_due_after(&self.shared.name, now),
        )
        .await;
        match next {
            Ok(Ok(Some(at))) => {
                let ms = (at - now).max(1) as u64;
                Duration::from_millis(ms).min(self.poll_interval)
            }
            _ => self.poll_interval,
        }
    }
}

/// Claimed deliveries not yet started, each with the moment its claim was asked for.
type Queue = VecDeque<(Delivery, Instant)>;

/// A claim asked for ahead, while the dispatcher goes on starting attempts.
struct ReadAhead(tokio::task::JoinHandle<(Queue, Result<Claimed, StoreError>)>);

impl ReadAhead {
    fn start(dispatcher: &Dispatcher, take_over: bool) -> Self {
        let shared = Arc::clone(&dispatcher.shared);
        let prefetch = dispatcher.prefetch;
        Self(dispatcher.tracker.spawn(async move {
            let mut rows = VecDeque::new();
            let claimed =
                claim_rows(&shared, prefetch, take_over, &mut rows, &mut HashSet::new()).await;
            (rows, claimed)
        }))
    }

    /// Waits for the claim and appends its rows to `queue`; `true` when it returned as
    /// many as were asked for.
    async fn join(self, queue: &mut Queue) -> Result<bool, StoreError> {
        match self.0.await {
            Ok((rows, claimed)) => {
                queue.extend(rows);
                claimed.map(|c| c.full)
            }
            Err(e) => Err(StoreError::Unavailable(format!("claiming deliveries: {e}"))),
        }
    }
}

/// Appends deliveries handed over in memory to `queue`, marking them in flight, except
/// those in `seen` (the last read returned them) or already in flight.
fn admit(
    shared: &Shared,
    queue: &mut Queue,
    handed: Vec<(Delivery, Instant)>,
    seen: &HashSet<i64>,
) {
    let mut claims = shared.in_flight.lock().unwrap_or_else(|p| p.into_inner());
    let read = claims.read_started();
    for (d, asked) in handed {
        if !seen.contains(&d.id) && claims.claim(d.id, read) {
            queue.push_back((d, asked));
        }
    }
    claims.read_finished();
}

/// What one claim from the store returned.
struct Claimed {
    /// The read saw every due delivery not in flight, and none was left over.
    everything: bool,
    /// The store returned as many rows as were asked for: more may be due.
    full: bool,
}

/// A permit of `semaphore`, or `None` at the soft cancel, at the loss of `ownership`,
/// or if the semaphore is closed.
async fn permit(
    semaphore: &Arc<Semaphore>,
    cancel: &CancellationToken,
    ownership: &Ownership,
) -> Option<OwnedSemaphorePermit> {
    // Cancel and loss first: a dispatcher told to stop never reads the store again (a
    // reload's new dispatcher may own the destination already).
    tokio::select! {
        biased;
        () = cancel.cancelled() => None,
        () = ownership.lost() => None,
        p = Arc::clone(semaphore).acquire_owned() => p.ok(),
    }
}

/// Claims up to `prefetch` due deliveries not in flight from the store into `queue`,
/// marking them in flight; `seen` gets the IDs the read returned.
async fn claim_rows(
    shared: &Shared,
    prefetch: usize,
    take_over: bool,
    queue: &mut Queue,
    seen: &mut HashSet<i64>,
) -> Result<Claimed, StoreError> {
    // Before the claim is asked for: its lease is stamped later, so on this clock it
    // lasts at least until `asked + lease`.
    let asked = Instant::now();
    let (in_flight, read) = {
        let mut claims = shared.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        (claims.ids(), claims.read_started())
    };
    let due = tokio::time::timeout(
        STORE_TIMEOUT,
        shared.store.claim(ClaimRequest {
            destination: &shared.name,
            now_ms: now_ms(),
            want: prefetch,
            in_flight: &in_flight,
            lease: shared.lease,
            take_over,
        }),
    )
    .await
    .unwrap_or_else(|_| Err(timed_out("claiming deliveries")));
    let mut surplus = Vec::new();
    let (exhausted, full);
    {
        let mut claims = shared.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        let due = match due {
            Ok(due) => due,
            Err(e) => {
                claims.read_finished();
                return Err(e);
            }
        };
        // Fewer rows than asked for: the read saw every due delivery.
        // A store used by one daemon returns the in-flight rows too (the caller skips
        // them); a shared store leaves them out in its query.
        let asked_for = if shared.store.shared() {
            prefetch
        } else {
            prefetch + in_flight.len()
        };
        exhausted = due.len() < asked_for;
        full = due.len() >= prefetch;
        *seen = due.iter().map(|d| d.id).collect();
        for d in due {
            if queue.len() < prefetch && claims.claim(d.id, read) {
                queue.push_back((d, asked));
            } else {
                // Claimed in the store but not taken here: give that claim back at
                // once (its token names this claim only, never an attempt's).
                surplus.push(d);
            }
        }
        claims.read_finished();
    }
    // Rows left over for want of room are due and held nowhere else.
    let everything = exhausted && surplus.is_empty();
    unclaim(shared, &surplus).await;
    Ok(Claimed { everything, full })
}

/// What a dispatcher knows about the in-memory hand-off ([`Store::take_fresh`]).
struct HandOff {
    /// The last read of the store saw every due delivery not in flight, with nothing
    /// left over: from then on, new ones are handed over in memory.
    known: bool,
    /// When that read was asked for.
    read_at: Instant,
    /// The IDs it returned (a delivery committed while it ran may also be handed over).
    seen: HashSet<i64>,
}

impl HandOff {
    fn new() -> Self {
        Self {
            known: false,
            read_at: Instant::now(),
            seen: HashSet::new(),
        }
    }

    /// Whether the hand-off holds every due delivery not in flight: the last read saw
    /// everything, no delivery was given back since, no retry has fallen due, and the
    /// read is younger than one poll interval (the store is read at least that often).
    fn complete(&self, shared: &Shared, poll_interval: Duration) -> bool {
        self.known
            && !shared.given_back.load(Ordering::SeqCst)
            && shared.next_retry.load(Ordering::SeqCst) > now_ms()
            && self.read_at.elapsed() < poll_interval
    }
}

/// The error a store call that did not answer within [`STORE_TIMEOUT`] counts as.
fn timed_out(what: &str) -> StoreError {
    StoreError::Unavailable(format!(
        "{what}: the store did not answer within {}s",
        STORE_TIMEOUT.as_secs()
    ))
}

/// Gives the store's claims on deliveries that will not be attempted now back, so
/// another process need not wait for their lease (a no-op for a store used by one
/// daemon). Call it before releasing them in process.
async fn unclaim(shared: &Shared, deliveries: &[Delivery]) {
    if deliveries.is_empty() {
        return;
    }
    let done = tokio::time::timeout(STORE_TIMEOUT, shared.store.unclaim(deliveries))
        .await
        .unwrap_or_else(|_| Err(timed_out("giving back claims")));
    if let Err(e) = done {
        tracing::warn!(destination = %shared.name, error = %e,
            "cannot give back unattempted deliveries; they wait for their lease");
    }
}

/// Releases a claim when dropped, so an attempt that ends any way at all (including a
/// panic in a destination) never leaves its delivery claimed until restart.
struct Claim {
    shared: Arc<Shared>,
    id: i64,
    /// Its outcome is committed; otherwise the delivery is still pending when released.
    recorded: bool,
    /// The committed outcome is a retry (the delivery stays pending, due later).
    retry: bool,
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.shared
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .release(self.id);
        if !self.recorded {
            // After the release: a read that starts from here on may claim it.
            self.shared.given_back.store(true, Ordering::SeqCst);
        }
        // The dispatcher has new work only when the delivery is still pending: given
        // back now, or a retry whose time it must sleep to. A delivery done or dead
        // leaves it nothing to do (its freed slot wakes it through the semaphore), and
        // waking it for nothing cost a task switch per event at low rates.
        if !self.recorded || self.retry {
            self.shared.wake.notify_one();
        }
    }
}

/// Longest pause between tries to record an outcome while the store refuses writes.
const MAX_RECORD_BACKOFF: Duration = Duration::from_secs(30);

/// Why an attempt waiting for its turn stopped waiting.
enum Waited {
    Ready,
    /// The soft cancel (shutdown, or this dispatcher stopped on reload).
    Cancelled,
    /// The destination's ownership was lost: another relay may dispatch it now.
    Lost,
}

/// Waits for the rate limit and until no `Retry-After` pause is in force.
async fn wait_turn(shared: &Shared, delivery: &Delivery, lost: &CancellationToken) -> Waited {
    let cancel = &shared.shutdown.soft;
    // A dispatcher stopped (shutdown, or its destination removed or changed by a reload)
    // starts nothing more, even for a row claimed just before: a sweep of a removed
    // destination that found its claims empty relies on it.
    if cancel.is_cancelled() {
        return Waited::Cancelled;
    }
    if let Some(limiter) = shared.limiter.as_ref().filter(|l| l.check().is_err()) {
        RateLimitWait {
            destination: &shared.name,
            event_id: &delivery.event_id,
        }
        .emit(&shared.metrics);
        tokio::select! {
            () = limiter.until_ready() => {}
            () = cancel.cancelled() => return Waited::Cancelled,
            () = lost.cancelled() => return Waited::Lost,
        }
    }
    // A `Retry-After` may have arrived while this attempt waited for its turn, and
    // another may extend it while this one sleeps: wait until no pause is in force.
    while let Some(until) = shared.pause() {
        tokio::select! {
            () = tokio::time::sleep_until(until) => {}
            () = cancel.cancelled() => return Waited::Cancelled,
            () = lost.cancelled() => return Waited::Lost,
        }
    }
    Waited::Ready
}

/// One attempt: wait for the rate limit and any `Retry-After` pause, renew the claim
/// unless it is fresh, deliver within the claim's lease, record. Every way out before the
/// delivery gives the claim back (store first, then in process).
async fn attempt(
    shared: Arc<Shared>,
    delivery: Delivery,
    claimed_at: Instant,
    permit: OwnedSemaphorePermit,
    lost: CancellationToken,
    // Held until the attempt ends: after its outcome is committed, or it gave up.
    _unrecorded: OwnedSemaphorePermit,
) {
    let claim = Claim {
        shared: Arc::clone(&shared),
        id: delivery.id,
        recorded: false,
        retry: false,
    };
    let give_back = || unclaim(&shared, std::slice::from_ref(&delivery));
    match wait_turn(&shared, &delivery, &lost).await {
        Waited::Ready => {}
        Waited::Cancelled => return give_back().await,
        Waited::Lost => {
            tracing::info!(destination = %shared.name, event_id = %delivery.event_id,
                "ownership of the destination lost; delivery left to its next owner");
            return give_back().await;
        }
    }
    // After losing ownership, nothing more is sent from here (the next owner's limiter
    // and pauses take over); the check is repeated once the renewal is back.
    if lost.is_cancelled() {
        return give_back().await;
    }
    // A shared store's claim may have run out while this delivery waited (another relay
    // then owns the destination and may have taken the row): check and extend it. The
    // lease was stamped on the database's clock at some point after `sent`; on this
    // clock it therefore lasts at least until `sent + lease`. A claim asked for within
    // the margin needs no renewal: its own lease covers the attempt by the same argument,
    // with `sent` = when it was asked for (no one else can take a row under a live lease).
    // That saves a round trip and a synced commit per delivery while a destination keeps
    // up; deliveries that waited (a rate limit, a pause) are renewed.
    if claimed_at.elapsed() <= FRESH_CLAIM {
        return deliver_and_record(shared, claim, delivery, claimed_at, permit, lost).await;
    }
    let sent = Instant::now();
    let renewed = tokio::time::timeout(STORE_TIMEOUT, shared.store.renew(&delivery, shared.lease))
        .await
        .unwrap_or_else(|_| Err(timed_out("renewing a claim")));
    match renewed {
        Ok(true) => {}
        Ok(false) => {
            tracing::info!(destination = %shared.name, event_id = %delivery.event_id,
                "delivery claimed by another relay or no longer pending; not attempted here");
            return;
        }
        Err(e) => {
            tracing::warn!(destination = %shared.name, event_id = %delivery.event_id, error = %e,
                "cannot confirm the claim on a delivery; it stays pending and is tried later");
            return give_back().await;
        }
    }
    deliver_and_record(shared, claim, delivery, sent, permit, lost).await;
}

/// A claim asked for this recently is not renewed before its attempt: the attempt still
/// starts within [`LEASE_MARGIN`] - [`LEASE_SAFETY`] of it, as after a renewal.
const FRESH_CLAIM: Duration = Duration::from_secs(1);

/// The attempt proper, under a claim whose lease lasts at least until `sent + lease` on
/// this clock: deliver (cut off before the lease ends), decide, record.
async fn deliver_and_record(
    shared: Arc<Shared>,
    mut claim: Claim,
    delivery: Delivery,
    sent: Instant,
    permit: OwnedSemaphorePermit,
    lost: CancellationToken,
) {
    let give_back = || unclaim(&shared, std::slice::from_ref(&delivery));
    if lost.is_cancelled() {
        return give_back().await;
    }
    // The request may take the destination's `timeout` (the lease less LEASE_MARGIN): if
    // the renewal's round trip ate the margin, the request could outlive the lease, and
    // another relay could send the same delivery meanwhile. Skip it instead.
    if sent.elapsed() > LEASE_MARGIN - LEASE_SAFETY {
        tracing::warn!(destination = %shared.name, event_id = %delivery.event_id,
            renew_ms = sent.elapsed().as_millis() as u64,
            "renewing the claim took too long to attempt the delivery within it; tried again later");
        return give_back().await;
    }
    // Not needed while the destination keeps its own `timeout`; a bound that holds
    // whatever the destination does.
    let lease_end = sent + shared.lease - LEASE_SAFETY;
    let started = std::time::Instant::now();
    let result = tokio::select! {
        r = tokio::time::timeout_at(lease_end, shared.destination.deliver(&delivery)) => {
            r.unwrap_or_else(|_| Err(DeliveryError::Retryable {
                reason: "attempt cut off at the end of its claim's lease".into(),
                retry_after: None,
            }))
        }
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
    loop {
        let recorded = tokio::time::timeout(
            STORE_TIMEOUT,
            shared.store.record(&delivery, outcome.clone()),
        )
        .await
        .unwrap_or_else(|_| Err(timed_out("recording an outcome")));
        let Err(e) = recorded else {
            claim.recorded = true;
            if let Outcome::Retry {
                next_attempt_at_ms, ..
            } = outcome
            {
                claim.retry = true;
                // Committed: a read of the store from here on sees it.
                shared
                    .next_retry
                    .fetch_min(next_attempt_at_ms, Ordering::SeqCst);
            }
            break;
        };
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

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};
    use std::path::PathBuf;

    use async_trait::async_trait;
    use bytes::Bytes;
    use tokio::sync::watch;

    use super::*;
    use crate::delivery::Claims;
    use crate::destinations::{DestinationKind, FileConfig};
    use crate::event::VerifiedEvent;
    use crate::store::{DeadLetter, DestinationStats, ReplayDecisions, ReplayVerdict, Selection};

    /// A store whose `record` does not complete until `gate` is closed: outcomes are
    /// recorded more slowly than the destination takes deliveries.
    struct SlowRecords {
        pending: Mutex<BTreeMap<i64, Delivery>>,
        gate: Semaphore,
        outcomes: Mutex<HashMap<i64, Vec<Outcome>>>,
        recorded: watch::Sender<usize>,
    }

    #[async_trait]
    impl Store for SlowRecords {
        async fn insert_event(&self, _: &VerifiedEvent, _: &[&str]) -> Result<(), StoreError> {
            unreachable!("the test inserts no event")
        }
        async fn due(&self, _: &str, _: i64, limit: usize) -> Result<Vec<Delivery>, StoreError> {
            let pending = self.pending.lock().unwrap();
            Ok(pending.values().take(limit).cloned().collect())
        }
        async fn next_due_after(&self, _: &str, _: i64) -> Result<Option<i64>, StoreError> {
            Ok(None)
        }
        async fn record(&self, delivery: &Delivery, outcome: Outcome) -> Result<(), StoreError> {
            // Blocks until the gate is closed (the test releases every record at once).
            let _ = self.gate.acquire().await;
            if matches!(outcome, Outcome::Done { .. } | Outcome::Dead { .. }) {
                self.pending.lock().unwrap().remove(&delivery.id);
            }
            self.outcomes
                .lock()
                .unwrap()
                .entry(delivery.id)
                .or_default()
                .push(outcome);
            self.recorded.send_modify(|n| *n += 1);
            Ok(())
        }
        async fn dead_letters(
            &self,
            _: Option<&str>,
            _: usize,
        ) -> Result<Vec<DeadLetter>, StoreError> {
            unreachable!()
        }
        async fn dead_letter(&self, _: i64) -> Result<Option<(DeadLetter, Bytes)>, StoreError> {
            unreachable!()
        }
        async fn request_replay(&self, _: &Selection, _: &str) -> Result<u64, StoreError> {
            unreachable!()
        }
        async fn replay_verdict(&self, _: &str) -> Result<ReplayVerdict, StoreError> {
            unreachable!()
        }
        async fn forget_replay(&self, _: &str) -> Result<(), StoreError> {
            unreachable!()
        }
        async fn decide_replays(&self, _: &[&str]) -> Result<ReplayDecisions, StoreError> {
            unreachable!()
        }
        async fn purge(&self, _: &Selection) -> Result<u64, StoreError> {
            unreachable!()
        }
        async fn dead_letter_orphans(&self, _: &[&str]) -> Result<Vec<(String, u64)>, StoreError> {
            unreachable!()
        }
        async fn ping(&self) -> Result<(), StoreError> {
            Ok(())
        }
        async fn destination_stats(&self) -> Result<Vec<DestinationStats>, StoreError> {
            unreachable!()
        }
        async fn prune(&self, _: i64) -> Result<u64, StoreError> {
            unreachable!()
        }
        fn backend(&self) -> &'static str {
            "slow-records"
        }
    }

    /// A destination that takes every delivery at once.
    struct TakesAll {
        delivered: Mutex<Vec<i64>>,
        count: watch::Sender<usize>,
    }

    #[async_trait]
    impl Destination for TakesAll {
        fn kind(&self) -> &'static str {
            "file"
        }
        async fn deliver(&self, delivery: &Delivery) -> Result<(), DeliveryError> {
            self.delivered.lock().unwrap().push(delivery.id);
            self.count.send_modify(|n| *n += 1);
            Ok(())
        }
    }

    /// While the store records no outcome, the dispatcher starts no more than its bound
    /// of attempts (each holds its delivery in memory), however many deliveries are due;
    /// once outcomes are recorded again, every delivery is delivered and recorded.
    #[tokio::test(start_paused = true)]
    async fn attempts_waiting_for_their_outcome_are_bounded() {
        const CONCURRENCY: usize = 80;
        const DUE: i64 = 1000;
        let bound = (CONCURRENCY * UNRECORDED_PER_SLOT).max(MIN_UNRECORDED);
        assert!(
            (DUE as usize) > bound + MAX_PREFETCH,
            "enough due to exceed the bound"
        );

        let pending = (1..=DUE)
            .map(|id| {
                let d = Delivery {
                    id,
                    event_id: format!("evt-{id}"),
                    destination: "d".into(),
                    attempts: 0,
                    received_at_ms: now_ms(),
                    body: Bytes::from_static(b"{}"),
                    claim: None,
                };
                (id, d)
            })
            .collect();
        let store = Arc::new(SlowRecords {
            pending: Mutex::new(pending),
            gate: Semaphore::new(0),
            outcomes: Mutex::new(HashMap::new()),
            recorded: watch::Sender::new(0),
        });
        let destination = Arc::new(TakesAll {
            delivered: Mutex::new(Vec::new()),
            count: watch::Sender::new(0),
        });
        let config = DestinationConfig {
            name: "d".into(),
            kind: DestinationKind::File(FileConfig {
                path: PathBuf::from("unused.jsonl"),
            }),
            concurrency: CONCURRENCY,
            timeout: DestinationConfig::DEFAULT_TIMEOUT,
            retry: RetryPolicy::default(),
            rate_limit: None,
        };
        let shutdown = Shutdown {
            soft: CancellationToken::new(),
            hard: CancellationToken::new(),
        };
        let tracker = TaskTracker::new();
        let dispatcher = Dispatcher::new(
            &config,
            Arc::clone(&destination) as Arc<dyn Destination>,
            Arc::clone(&store) as Arc<dyn Store>,
            Arc::new(Metrics::new()),
            Arc::new(Mutex::new(Claims::default())),
            Duration::from_secs(1),
            shutdown.clone(),
            tracker.clone(),
        );
        tracker.spawn(dispatcher.run());

        // The destination takes deliveries until the bound is reached...
        let mut delivered = destination.count.subscribe();
        tokio::time::timeout(
            Duration::from_secs(3600),
            delivered.wait_for(|n| *n >= bound),
        )
        .await
        .expect("the dispatcher starts attempts up to its bound")
        .unwrap();
        // ...and no further, however long the dispatcher and its attempts run. The clock
        // is paused: it moves on only once every task waits, so this is not a bet on
        // timing; and well past STORE_TIMEOUT, so the attempts also retry their records.
        tokio::time::sleep(STORE_TIMEOUT * 3).await;
        assert_eq!(*store.recorded.borrow(), 0, "no outcome committed yet");
        assert_eq!(
            *destination.count.borrow(),
            bound,
            "attempts started while no outcome is committed stop at the bound"
        );

        // Outcomes are recorded again: every delivery is delivered and recorded.
        store.gate.close();
        let mut recorded = store.recorded.subscribe();
        tokio::time::timeout(
            Duration::from_secs(3600),
            recorded.wait_for(|n| *n >= DUE as usize),
        )
        .await
        .expect("every delivery is recorded once records complete")
        .unwrap();
        shutdown.soft.cancel();
        tracker.close();
        tracker.wait().await;

        assert!(
            store.pending.lock().unwrap().is_empty(),
            "none left pending"
        );
        let outcomes = store.outcomes.lock().unwrap();
        for id in 1..=DUE {
            assert_eq!(
                outcomes.get(&id).map(Vec::as_slice),
                Some(&[Outcome::Done { attempts: 1 }][..]),
                "delivery {id} recorded done once"
            );
        }
        let mut delivered = destination.delivered.lock().unwrap().clone();
        delivered.sort_unstable();
        assert_eq!(
            delivered,
            (1..=DUE).collect::<Vec<_>>(),
            "each delivered once"
        );
    }
}
