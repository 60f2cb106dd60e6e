//! The group writers: inserter tasks that write every waiting event in one statement, and
//! the recorder task that writes every waiting outcome in one statement.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use sqlx::Row;
use sqlx::postgres::PgPool;
use tokio::sync::Mutex;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::conn::{conn, unavailable};
use super::handed::Handed;
use super::wakes::Notices;
use crate::store::{Delivery, EventRow, StoreError};

/// Most events written by one insert statement.
pub const MAX_INSERT_BATCH: usize = 256;

/// Events waiting for an inserter before `insert_event` waits for room (and outcomes
/// waiting for a recorder before `record` does). Four groups' worth: bodies are at most
/// `max_body` each, so this also bounds the memory a slow database can pin.
pub(super) const INSERT_QUEUE: usize = 1024;

/// Most outcomes written by one statement.
const MAX_OUTCOME_BATCH: usize = 256;

/// Longest one group insert may take before its connection is dropped and its events
/// answered with an error (ingress has answered 503 long before).
const INSERT_TIMEOUT: Duration = Duration::from_secs(10);

/// One event waiting to be written, and who waits for it.
pub(super) struct PendingInsert {
    pub(super) row: EventRow,
    pub(super) done: tokio::sync::oneshot::Sender<Result<(), StoreError>>,
}

/// One outcome waiting to be written, and who waits for it.
pub(super) struct PendingOutcome {
    pub(super) id: i64,
    /// The claim the outcome is for (`claim_seq`).
    pub(super) seq: i64,
    /// The new state: `done`, `dead`, or `pending` for a retry.
    pub(super) state: &'static str,
    pub(super) attempts: i32,
    /// A retry's delay from now (ms); the database adds it to its own clock.
    pub(super) delay_ms: i64,
    pub(super) error: Option<String>,
    pub(super) done: tokio::sync::oneshot::Sender<Result<(), StoreError>>,
}

/// Queues `item` for its writer task and waits for the writer's answer.
pub(super) async fn hand_over<T>(
    queue: &tokio::sync::mpsc::Sender<T>,
    item: T,
    answer: tokio::sync::oneshot::Receiver<Result<(), StoreError>>,
) -> Result<(), StoreError> {
    let closed = || unavailable("the store is closing");
    queue.send(item).await.map_err(|_| closed())?;
    answer.await.map_err(|_| closed())?
}

/// A queue several tasks take groups from.
pub(super) type SharedQueue<T> = Arc<Mutex<tokio::sync::mpsc::Receiver<T>>>;

/// Takes every item waiting in `queue` (at least one, at most `max`) into `batch`, one
/// task at a time; `false` when `stop` fired or the store is gone.
async fn next_group<T>(
    queue: &SharedQueue<T>,
    batch: &mut Vec<T>,
    max: usize,
    stop: &CancellationToken,
) -> bool {
    let mut queue = tokio::select! {
        q = queue.lock() => q,
        () = stop.cancelled() => return false,
    };
    tokio::select! {
        n = queue.recv_many(batch, max) => n > 0,
        () = stop.cancelled() => false,
    }
}

/// What an inserter needs besides its queue.
pub(super) struct Inserter {
    pub(super) pool: PgPool,
    /// This process's ID in `deliveries.claimed_by`.
    pub(super) instance: String,
    pub(super) notices: Arc<Notices>,
    pub(super) handed: Arc<Handed>,
    pub(super) give_backs: TaskTracker,
}

/// An inserter: takes every event waiting (up to [`MAX_INSERT_BATCH`]) and writes them in
/// one statement, until `stop` (events still queued then are answered with an error: the
/// relay is closing the store, ingress no longer answers 200). Deliveries for the
/// destinations this relay dispatches are claimed in that statement and handed to their
/// dispatcher before the events are answered (see `handed`); the others' destinations
/// are notified.
pub(super) async fn insert_events(
    inserter: Inserter,
    queue: SharedQueue<PendingInsert>,
    stop: CancellationToken,
) {
    let Inserter {
        pool,
        instance,
        notices,
        handed,
        give_backs,
    } = inserter;
    let claim = Claim {
        instance: &instance,
        handed: &handed,
        notices: &notices,
        give_backs: &give_backs,
    };
    let mut batch = Vec::with_capacity(MAX_INSERT_BATCH);
    // One inserter gathers at a time; the others write meanwhile.
    while next_group(&queue, &mut batch, MAX_INSERT_BATCH, &stop).await {
        // Ingress gave up on these (`store_timeout`) and answered 503: not stored.
        batch.retain(|p| !p.done.is_closed());
        if batch.is_empty() {
            continue;
        }
        let mut claimed = Vec::new();
        let written: Vec<Result<(), StoreError>> = match write_group(&pool, &batch, &claim).await {
            Ok(c) => {
                claimed = c;
                batch.iter().map(|_| Ok(())).collect()
            }
            // PostgreSQL refused the statement (not the connection): find the event it
            // refused by writing them one by one.
            Err(Refused::Statement(_)) if batch.len() > 1 => {
                let mut each = Vec::with_capacity(batch.len());
                let mut unreachable = None;
                for one in &batch {
                    // Once the database stops answering, the rest fail without a try.
                    if let Some(e) = &unreachable {
                        each.push(Err(StoreError::Unavailable(reason(e))));
                        continue;
                    }
                    match write_group(&pool, std::slice::from_ref(one), &claim).await {
                        Ok(c) => {
                            claimed.extend(c);
                            each.push(Ok(()));
                        }
                        Err(Refused::Statement(e)) => each.push(Err(e)),
                        Err(Refused::Unreachable(e)) => {
                            each.push(Err(StoreError::Unavailable(reason(&e))));
                            unreachable = Some(e);
                        }
                    }
                }
                each
            }
            // The database is unreachable or slow: every event of the group fails alike.
            Err(e) => {
                let e = reason(&e.into_error());
                batch
                    .iter()
                    .map(|_| Err(StoreError::Unavailable(e.clone())))
                    .collect()
            }
        };
        // Handed over before the answers, so the dispatchers ingress wakes find them.
        let handed_to: HashSet<String> =
            claimed.iter().map(|(d, _)| d.destination.clone()).collect();
        let orphans = handed.push(claimed);
        let mut committed: HashSet<String> = HashSet::new();
        for (pending, result) in batch.drain(..).zip(written) {
            if result.is_ok() {
                committed.extend(
                    pending
                        .row
                        .destinations
                        .iter()
                        .filter(|d| !handed_to.contains(*d))
                        .cloned(),
                );
            }
            // The caller may have given up waiting (its answer was a 503); the event is
            // stored all the same, and delivered: at least once.
            let _ = pending.done.send(result);
        }
        // Claimed for a dispatcher that stopped meanwhile: given back, and the
        // destination's next owner told.
        if let Err(e) = give_back(&pool, &instance, &orphans, &handed, &notices).await {
            tracing::warn!(error = %e, "cannot give back the claims of deliveries whose dispatcher stopped; they wait for their lease");
        }
        // Committed: now tell the other relays (in the background, see `send_notices`).
        notices.notify(committed);
    }
}

/// The text of a store error without its "store unavailable: " prefix, to build another
/// `Unavailable` from it.
fn reason(e: &StoreError) -> String {
    match e {
        StoreError::Unavailable(m) => m.clone(),
        other => other.to_string(),
    }
}

/// Why a group of events was not written.
enum Refused {
    /// PostgreSQL ran the statement and refused it (a constraint, a value): another
    /// group without the offending event can succeed.
    Statement(StoreError),
    /// No connection, a broken one, or no answer in time: any statement would fail.
    Unreachable(StoreError),
}

impl Refused {
    fn into_error(self) -> StoreError {
        match self {
            Refused::Statement(e) | Refused::Unreachable(e) => e,
        }
    }
}

/// The recorder: writes every outcome waiting (up to [`MAX_OUTCOME_BATCH`]) with one
/// statement, committed without waiting for the WAL flush (see the module docs). A
/// failed group fails every outcome in it; their attempts retry them.
pub(super) async fn record_outcomes(
    pool: PgPool,
    instance: String,
    queue: SharedQueue<PendingOutcome>,
    stop: CancellationToken,
) {
    let mut batch = Vec::with_capacity(MAX_OUTCOME_BATCH);
    while next_group(&queue, &mut batch, MAX_OUTCOME_BATCH, &stop).await {
        let written =
            tokio::time::timeout(INSERT_TIMEOUT, write_outcomes(&pool, &instance, &batch))
                .await
                .unwrap_or_else(|_| Err(unavailable("recording outcomes timed out")));
        match written {
            Ok(applied) => {
                for pending in batch.drain(..) {
                    if !applied.contains(&pending.id) {
                        tracing::debug!(
                            delivery = pending.id,
                            "outcome dropped: the delivery was claimed again or is no longer pending"
                        );
                    }
                    let _ = pending.done.send(Ok(()));
                }
            }
            Err(e) => {
                let e = reason(&e);
                for pending in batch.drain(..) {
                    let _ = pending.done.send(Err(StoreError::Unavailable(e.clone())));
                }
            }
        }
    }
}

/// Writes a group of outcomes in one statement; returns the IDs it applied to (an
/// outcome whose claim is no longer on its row applies to nothing).
async fn write_outcomes(
    pool: &PgPool,
    instance: &str,
    outcomes: &[PendingOutcome],
) -> Result<HashSet<i64>, StoreError> {
    let ids: Vec<i64> = outcomes.iter().map(|o| o.id).collect();
    let seqs: Vec<i64> = outcomes.iter().map(|o| o.seq).collect();
    let states: Vec<&str> = outcomes.iter().map(|o| o.state).collect();
    let attempts: Vec<i32> = outcomes.iter().map(|o| o.attempts).collect();
    let delays: Vec<i64> = outcomes.iter().map(|o| o.delay_ms).collect();
    // PostgreSQL text cannot hold U+0000 (it would refuse the whole group, again at every
    // retry); a destination's error text may carry one.
    let errors: Vec<Option<Cow<'_, str>>> = outcomes
        .iter()
        .map(|o| {
            o.error.as_deref().map(|e| match e.contains('\0') {
                true => Cow::Owned(e.replace('\0', "\u{FFFD}")),
                false => Cow::Borrowed(e),
            })
        })
        .collect();
    let mut c = conn(pool).await?;
    // Committed without waiting for the WAL flush, as outcomes are in SQLite: the
    // statement's own transaction turns `synchronous_commit` off for itself.
    //
    // Written so that its only way to the rows is the primary key (`id = ANY($2)`), with
    // no join for the planner to order: each row finds its outcome by its position in
    // `$2`. The form before (`FROM unnest(...) AS u WHERE d.id = u.id AND d.state =
    // 'pending' AND d.claimed_by = $1 ...`) let the planner, on a table without
    // statistics (a fresh database: autoanalyze comes a minute later) or with statistics
    // taken before a backlog, estimate one row for "pending and claimed by this relay",
    // scan every pending row through `deliveries_due` and rescan the 256 outcomes for each
    // of them: 1.3 s per group of 256 with 15,000 rows claimed (EXPLAIN ANALYZE), so
    // outcomes fell behind, which left more rows claimed, which made the next group
    // slower. For the same reason the state is tested with `NOT IN ('done', 'dead')`
    // (the same rows by the table's CHECK constraint): `state = 'pending'` would match
    // the partial index `deliveries_due` and offer that scan again.
    let r = sqlx::query_scalar::<_, i64>(
        "UPDATE deliveries AS d SET
             state = ($4::text[])[array_position($2::bigint[], d.id)],
             attempts = ($5::int[])[array_position($2::bigint[], d.id)],
             next_attempt_at = CASE WHEN ($4::text[])[array_position($2::bigint[], d.id)] = 'pending'
                                    THEN faceio_relay_now_ms()
                                         + ($6::bigint[])[array_position($2::bigint[], d.id)]
                                    ELSE d.next_attempt_at END,
             last_error = ($7::text[])[array_position($2::bigint[], d.id)],
             updated_at = faceio_relay_now_ms(), claimed_by = NULL, lease_until = NULL
         FROM (SELECT set_config('synchronous_commit', 'off', true)) AS async_commit
         WHERE d.id = ANY($2::bigint[]) AND d.state NOT IN ('done', 'dead')
           AND d.claimed_by = $1
           AND d.claim_seq = ($3::bigint[])[array_position($2::bigint[], d.id)]
         RETURNING d.id",
    )
    .bind(instance)
    .bind(&ids)
    .bind(&seqs)
    .bind(&states)
    .bind(&attempts)
    .bind(&delays)
    .bind(&errors)
    .fetch_all(c.get())
    .await;
    Ok(c.finish(r)?.into_iter().collect())
}

/// How an inserter claims deliveries as it inserts them.
struct Claim<'a> {
    instance: &'a str,
    handed: &'a Arc<Handed>,
    notices: &'a Arc<Notices>,
    /// Background give-backs (waited for when the store closes).
    give_backs: &'a TaskTracker,
}

/// Writes `events` and their deliveries, due now on the database's clock, in one
/// statement (its own transaction). The deliveries [`Handed::leases`] names a lease for
/// are claimed for this process in the same statement; they are returned, each with the
/// moment the statement was sent, to be handed over once the events are answered.
async fn write_group(
    pool: &PgPool,
    events: &[PendingInsert],
    claim: &Claim<'_>,
) -> Result<Vec<(Delivery, Instant)>, Refused> {
    let rows = || events.iter().map(|e| &e.row);
    let col = |f: fn(&EventRow) -> &str| -> Vec<&str> { rows().map(f).collect() };
    let received: Vec<i64> = rows().map(|e| e.received_at).collect();
    let payloads = rows()
        .map(|e| std::str::from_utf8(&e.body))
        .collect::<Result<Vec<&str>, _>>()
        .map_err(|e| Refused::Statement(unavailable(e)))?;
    let (mut event_ids, mut destinations) = (Vec::new(), Vec::new());
    for e in rows() {
        for d in &e.destinations {
            event_ids.push(e.id.as_str());
            destinations.push(d.as_str());
        }
    }
    let leases = claim.handed.leases(&destinations);
    let lease_ms: Vec<Option<i64>> = leases.iter().map(|l| l.map(millis)).collect();
    let claiming = || {
        destinations
            .iter()
            .zip(&leases)
            .filter(|(_, l)| l.is_some())
            .map(|(d, _)| *d)
    };
    let asked = Instant::now();
    let write = async {
        let mut c = conn(pool).await.map_err(Refused::Unreachable)?;
        // A claimed delivery gets what a claim statement would give it: this process's
        // ID, a lease from the database's clock and the first `claim_seq`.
        let r = sqlx::query(
            "WITH e AS (
                 INSERT INTO events (id, received_at, app_id, event_name, facial_id, client_ip, payload)
                 SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[],
                                      $5::text[], $6::text[], $7::text[])
             ), d AS (
                 INSERT INTO deliveries (event_id, destination, state, attempts, next_attempt_at,
                                         updated_at, claimed_by, lease_until, claim_seq)
                 SELECT ev, dest, 'pending', 0, clock.now, clock.now,
                        CASE WHEN lease IS NULL THEN NULL ELSE $10 END, clock.now + lease,
                        CASE WHEN lease IS NULL THEN 0 ELSE 1 END
                 FROM unnest($8::text[], $9::text[], $11::bigint[]) WITH ORDINALITY AS d(ev, dest, lease, n),
                      (SELECT faceio_relay_now_ms() AS now) AS clock
                 ORDER BY d.n
                 RETURNING id, event_id, destination, claim_seq
             )
             SELECT id, event_id, destination, claim_seq FROM d WHERE claim_seq > 0",
        )
        .bind(col(|e| &e.id))
        .bind(&received)
        .bind(col(|e| &e.app_id))
        .bind(col(|e| &e.event_name))
        .bind(col(|e| &e.facial_id))
        .bind(col(|e| &e.client_ip))
        .bind(&payloads)
        .bind(&event_ids)
        .bind(&destinations)
        .bind(claim.instance)
        .bind(&lease_ms)
        .fetch_all(c.get())
        .await;
        // Refused for its data (class 22) or a constraint (class 23): another group
        // without the offending event can succeed. Anything else (shutdown, a timeout,
        // serialization, resources) would fail every statement alike.
        let refused_statement = matches!(&r, Err(sqlx::Error::Database(db))
            if db.code().is_some_and(|c| c.starts_with("22") || c.starts_with("23")));
        match c.finish(r) {
            Ok(rows) => Ok(rows),
            Err(e) if refused_statement => Err(Refused::Statement(e)),
            Err(e) => Err(Refused::Unreachable(e)),
        }
    };
    let returned = tokio::time::timeout(INSERT_TIMEOUT, write)
        .await
        .unwrap_or_else(|_| {
            Err(Refused::Unreachable(unavailable(
                "writing events timed out",
            )))
        })
        .and_then(|returned| {
            handed_deliveries(events, &returned, asked)
                .map_err(|e| Refused::Unreachable(unavailable(e)))
        });
    match &returned {
        Err(Refused::Unreachable(_)) if claiming().next().is_some() => {
            claim.handed.abandon(claiming());
            // The statement may still commit (a timeout, a connection lost after the
            // commit): its claims would keep the deliveries from every read for a lease.
            // Exactly the rows it claimed: a row inserted unclaimed may be claimed by a
            // read meanwhile (also `claim_seq` 1), and that claim is an attempt's.
            let (claimed_events, claimed_destinations) = event_ids
                .iter()
                .zip(&destinations)
                .zip(&leases)
                .filter(|(_, l)| l.is_some())
                .map(|((e, d), _)| (e.to_string(), d.to_string()))
                .unzip();
            claim.give_backs.spawn(give_back_inserted(
                GiveBack {
                    pool: pool.clone(),
                    instance: claim.instance.to_string(),
                    event_ids: claimed_events,
                    destinations: claimed_destinations,
                    lease: leases.iter().flatten().max().copied().unwrap_or_default(),
                    handed: Arc::clone(claim.handed),
                    notices: Arc::clone(claim.notices),
                    closing: claim.give_backs.clone(),
                },
                // If it committed, its unclaimed rows were never notified either.
                destinations.iter().map(|d| d.to_string()).collect(),
            ));
        }
        // Refused: rolled back, nothing claimed.
        Err(_) => claim.handed.abandon(claiming()),
        Ok(_) => {}
    }
    returned
}

/// What [`give_back_inserted`] gives back, and where.
struct GiveBack {
    pool: PgPool,
    instance: String,
    /// The claimed deliveries, as `(event_ids[i], destinations[i])`.
    event_ids: Vec<String>,
    destinations: Vec<String>,
    lease: Duration,
    handed: Arc<Handed>,
    notices: Arc<Notices>,
    /// Closed when the store closes: one last try, then stop.
    closing: TaskTracker,
}

/// Gives back the claims an insert whose outcome is unknown may have made (`claim_seq`
/// 1, this process's, exactly the claimed pairs), trying every second until it finds
/// them, their lease is over or the store closes; then the group's destinations
/// (`notify`) are read by their dispatchers.
async fn give_back_inserted(give_back: GiveBack, notify: HashSet<String>) {
    let GiveBack {
        pool,
        instance,
        event_ids,
        destinations,
        lease,
        handed,
        notices,
        closing,
    } = give_back;
    let until = Instant::now() + lease;
    while Instant::now() < until {
        let given = async {
            let mut c = conn(&pool).await?;
            let r = sqlx::query(
                "UPDATE deliveries d SET claimed_by = NULL, lease_until = NULL
                 FROM unnest($1::text[], $2::text[]) AS g(ev, dest)
                 WHERE d.event_id = g.ev AND d.destination = g.dest
                   AND d.claimed_by = $3 AND d.claim_seq = 1 AND d.state = 'pending'",
            )
            .bind(&event_ids)
            .bind(&destinations)
            .bind(&instance)
            .execute(c.get())
            .await;
            Ok::<_, StoreError>(c.finish(r)?.rows_affected())
        };
        let found = matches!(tokio::time::timeout(INSERT_TIMEOUT, given).await, Ok(Ok(n)) if n > 0);
        if found || closing.is_closed() {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    reread(&handed, &notices, notify);
}

/// The claimed deliveries an insert returned, as the dispatcher attempts them. An
/// event's body is copied once, out of the request's buffer (a queue of deliveries must
/// not keep whole connection buffers alive).
fn handed_deliveries(
    events: &[PendingInsert],
    returned: &[sqlx::postgres::PgRow],
    asked: Instant,
) -> Result<Vec<(Delivery, Instant)>, sqlx::Error> {
    if returned.is_empty() {
        return Ok(Vec::new()); // nothing claimed: the usual case where another relay owns
    }
    let by_id: HashMap<&str, &EventRow> =
        events.iter().map(|e| (e.row.id.as_str(), &e.row)).collect();
    let mut bodies: HashMap<&str, Bytes> = HashMap::new();
    let mut claimed = Vec::with_capacity(returned.len());
    for r in returned {
        let event_id: String = r.try_get("event_id")?;
        let Some(event) = by_id.get(event_id.as_str()) else {
            continue;
        };
        let body = bodies
            .entry(event.id.as_str())
            .or_insert_with(|| Bytes::copy_from_slice(&event.body))
            .clone();
        let delivery = Delivery {
            id: r.try_get("id")?,
            destination: r.try_get("destination")?,
            attempts: 0,
            received_at_ms: event.received_at,
            body,
            claim: Some(r.try_get("claim_seq")?),
            event_id,
        };
        claimed.push((delivery, asked));
    }
    Ok(claimed)
}

/// Gives back this process's claims on `deliveries` (each still carrying the claim its
/// `claim` names), so they are due to whoever dispatches their destination.
async fn unclaim_rows(
    pool: &PgPool,
    instance: &str,
    deliveries: &[Delivery],
) -> Result<(), StoreError> {
    let (ids, seqs): (Vec<i64>, Vec<i64>) = deliveries
        .iter()
        .filter_map(|d| d.claim.map(|seq| (d.id, seq)))
        .unzip();
    if ids.is_empty() {
        return Ok(());
    }
    let mut c = conn(pool).await?;
    // Found through the primary key only, each row's claim by its position in `$1`:
    // no join for the planner to order (see `write_outcomes`, whose join form took
    // seconds per group on a table without statistics).
    let r = sqlx::query(
        "UPDATE deliveries d SET claimed_by = NULL, lease_until = NULL
         WHERE d.id = ANY($1::bigint[]) AND d.claimed_by = $3
           AND d.claim_seq = ($2::bigint[])[array_position($1::bigint[], d.id)]",
    )
    .bind(&ids)
    .bind(&seqs)
    .bind(instance)
    .execute(c.get())
    .await;
    c.finish(r)?;
    Ok(())
}

/// Gives back this process's claims on `deliveries` ([`unclaim_rows`]); once given back,
/// their destinations are read again ([`reread`]): due without an insert, they would
/// otherwise wait for a poll.
pub(super) async fn give_back(
    pool: &PgPool,
    instance: &str,
    deliveries: &[Delivery],
    handed: &Handed,
    notices: &Notices,
) -> Result<(), StoreError> {
    if deliveries.is_empty() {
        return Ok(());
    }
    unclaim_rows(pool, instance, deliveries).await?;
    let destinations = deliveries.iter().map(|d| d.destination.clone()).collect();
    reread(handed, notices, destinations);
    Ok(())
}

/// Has the dispatchers of `destinations` read the store: this relay's (the hand-off no
/// longer holds everything) and, by a notification, whichever relay owns each.
fn reread(handed: &Handed, notices: &Notices, destinations: HashSet<String>) {
    for d in &destinations {
        handed.untrack(d);
    }
    notices.notify(destinations);
}

/// A duration in whole milliseconds, as the statements take it.
pub(super) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}
