//! The writer thread: every write, in groups, one transaction (and at most one fsync) per
//! group, each command in its own savepoint.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use rusqlite::{Connection, Transaction, params};
use tokio::sync::{mpsc, oneshot};

use super::fresh::Fresh;
use super::open_connection;
use crate::event::now_ms;
use crate::store::{Delivery, EventRow, Outcome, StoreError};

/// Most commands in one transaction; bounds the latency of a single commit.
const MAX_BATCH: usize = 2048;

/// Commands waiting for the writer; ingress waits (up to its `store_timeout`) when full.
pub(super) const QUEUE_DEPTH: usize = 8192;

/// Longest an outcome waits for company before it commits by itself. Outcomes are not
/// synced and only their attempts' claims wait for them, so at low rates each rides in
/// the next event's commit instead of costing a commit (WAL frames, a switch of
/// `synchronous`) and a wake-up of this thread of its own. A command that needs a sync
/// (an insert) ends the wait at once, so no answer waits for it.
pub(super) const OUTCOME_LINGER: Duration = Duration::from_millis(20);

/// Outcomes waiting that end the linger at once.
pub(super) const OUTCOME_BATCH: usize = 64;

/// Outcomes waiting for the writer, kept beside its queue so that recording one does
/// not wake it while it is bound to look at them anyway.
///
/// The invariant: while `watched` is set, the writer's next wait ends by a deadline at
/// most [`OUTCOME_LINGER`] away, after which it commits the list. Outside that, adding
/// to the list nudges it through its queue. After each commit that handed deliveries
/// over (their outcomes are on the way), the writer watches; after a commit without, it
/// stops watching and then looks at the list again, so an outcome added meanwhile is
/// either seen there or nudges it.
#[derive(Default)]
pub(super) struct Outcomes {
    list: Mutex<OutcomeList>,
    pub(super) watched: AtomicBool,
}

#[derive(Default)]
struct OutcomeList {
    records: Vec<Command>,
    /// The writer has ended: nothing added now would be committed.
    closed: bool,
}

/// What [`Outcomes::add`] asks of the caller.
pub(super) enum Added {
    /// The writer takes it by its deadline.
    Watched,
    /// The writer may be asleep: send it a [`Command::Nudge`].
    Nudge,
    /// The writer has ended: nothing will commit it.
    Closed,
}

impl Outcomes {
    fn lock(&self) -> std::sync::MutexGuard<'_, OutcomeList> {
        self.list.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a [`Command::Record`] for the writer.
    pub(super) fn add(&self, record: Command) -> Added {
        let mut list = self.lock();
        if list.closed {
            return Added::Closed;
        }
        list.records.push(record);
        // Enough to be worth a commit of their own: the writer need not wait (a drain
        // with no events coming in would otherwise commit outcomes once per linger).
        let enough = list.records.len() == OUTCOME_BATCH;
        drop(list);
        if self.watched.load(Ordering::SeqCst) && !enough {
            Added::Watched
        } else {
            Added::Nudge
        }
    }

    /// Outcomes waiting.
    pub(super) fn len(&self) -> usize {
        self.lock().records.len()
    }

    fn take(&self, into: &mut Vec<Command>) {
        into.append(&mut self.lock().records);
    }

    fn close(&self) -> Vec<Command> {
        let mut list = self.lock();
        list.closed = true;
        std::mem::take(&mut list.records)
    }
}

type AdminFn = Box<dyn FnOnce(&Transaction<'_>) -> rusqlite::Result<u64> + Send>;

/// Work for the writer thread.
pub(super) enum Command {
    Insert {
        event: EventRow,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    Record {
        delivery_id: i64,
        outcome: Outcome,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    Admin {
        run: AdminFn,
        reply: oneshot::Sender<Result<u64, StoreError>>,
    },
    /// Outcomes were added to [`Outcomes`] while the writer did not watch it.
    Nudge,
}

impl Command {
    fn needs_sync(&self) -> bool {
        matches!(self, Command::Insert { .. } | Command::Admin { .. })
    }
}

/// Counters kept by the writer thread.
#[derive(Debug, Default)]
pub struct WriterStats {
    /// Transactions committed.
    pub commits: AtomicU64,
    /// Commands carried by those transactions.
    pub commands: AtomicU64,
    /// Commands taken off the queue (committed or not).
    pub taken: AtomicU64,
}

/// The writer thread: drain the queue, one transaction per batch, reply after commit.
/// Outcomes ([`Outcomes`]) wait for the next batch that needs a sync, at most `linger`.
pub(super) fn writer_loop(
    path: PathBuf,
    mut conn: Option<Connection>,
    mut rx: mpsc::Receiver<Command>,
    stats: &WriterStats,
    fresh: Option<&Fresh>,
    outcomes: &Outcomes,
    linger: Duration,
) {
    // However the loop ends (a panic too), no recorder waits for a commit that cannot come.
    let _close = CloseOnExit(outcomes);
    let mut synchronous_full = true;
    // A timer for the outcomes' deadline; without one, outcomes commit at once.
    let timer = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .ok();
    // When the outcomes must be committed by; `None`: the writer sleeps until nudged.
    let mut deadline: Option<tokio::time::Instant> = None;
    let mut closed = false;
    while !closed {
        // Ok(Some(cmd)): a command; Ok(None): the deadline passed; Err: the queue closed.
        let first: Result<Option<Command>, ()> = match (&timer, deadline) {
            (Some(timer), Some(at)) => {
                // Built inside the timer's runtime: a timeout needs one to register with.
                match timer.block_on(async { tokio::time::timeout_at(at, rx.recv()).await }) {
                    Ok(Some(cmd)) => Ok(Some(cmd)),
                    Ok(None) => Err(()),
                    Err(_elapsed) => Ok(None),
                }
            }
            _ => rx.blocking_recv().map(Some).ok_or(()),
        };
        let mut batch = Vec::new();
        match first {
            Ok(Some(cmd)) => {
                batch.push(cmd);
                drain(&mut rx, &mut batch);
            }
            Ok(None) => {}
            Err(()) => closed = true,
        }
        let due = closed
            || timer.is_none()
            || deadline.is_some_and(|at| tokio::time::Instant::now() >= at)
            || outcomes.len() >= OUTCOME_BATCH;
        if !due && !batch.iter().any(Command::needs_sync) {
            // Only nudges: watch the outcomes until the deadline, without more wake-ups.
            deadline.get_or_insert_with(|| tokio::time::Instant::now() + linger);
            outcomes.watched.store(true, Ordering::SeqCst);
            continue;
        }
        if closed {
            batch.extend(outcomes.close());
        } else {
            outcomes.take(&mut batch);
        }
        batch.retain(|c| !matches!(c, Command::Nudge));
        let hands_over = batch.iter().any(|c| matches!(c, Command::Insert { .. }));
        if !batch.is_empty() {
            stats.taken.fetch_add(batch.len() as u64, Ordering::Relaxed);
            commit(&path, &mut conn, &mut synchronous_full, batch, stats, fresh);
        }
        // Deliveries were handed over: their outcomes are on the way, and wait for the
        // next event's commit (or the deadline) without waking this thread. Otherwise
        // the flag falls first, then the list is looked at: one added before it fell
        // came without a nudge, and is watched too.
        let watch = timer.is_some()
            && (hands_over || {
                outcomes.watched.store(false, Ordering::SeqCst);
                outcomes.len() > 0
            });
        deadline = watch.then(|| tokio::time::Instant::now() + linger);
        outcomes.watched.store(watch, Ordering::SeqCst);
    }
}

/// Fails the outcomes still listed when the writer ends.
struct CloseOnExit<'a>(&'a Outcomes);

impl Drop for CloseOnExit<'_> {
    fn drop(&mut self) {
        fail_all(self.0.close(), "the store writer stopped");
    }
}

/// Commits one batch, (re)opening the database as needed.
fn commit(
    path: &Path,
    conn: &mut Option<Connection>,
    synchronous_full: &mut bool,
    batch: Vec<Command>,
    stats: &WriterStats,
    fresh: Option<&Fresh>,
) {
    if conn.is_none() {
        match open_connection(path) {
            Ok(c) => {
                *conn = Some(c);
                *synchronous_full = true;
                tracing::info!(path = %path.display(), "store reopened");
            }
            Err(e) => return fail_all(batch, &e.to_string()),
        }
    }
    let Some(c) = conn.as_mut() else { return };
    let want_full = batch.iter().any(Command::needs_sync);
    if want_full != *synchronous_full {
        let mode = if want_full { "FULL" } else { "NORMAL" };
        if let Err(e) = c.pragma_update(None, "synchronous", mode) {
            fail_all(batch, &e.to_string());
            *conn = None;
            return;
        }
        *synchronous_full = want_full;
    }
    if let Err(e) = run_batch(c, batch, stats, fresh) {
        tracing::error!(error = %e, "store commit failed; reopening the database");
        *conn = None;
    }
}

/// Adds the commands already waiting to `batch`, up to [`MAX_BATCH`].
fn drain(rx: &mut mpsc::Receiver<Command>, batch: &mut Vec<Command>) {
    while batch.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(cmd) => batch.push(cmd),
            Err(_) => break,
        }
    }
}

/// Per-command results, sent once the batch's fate is known.
enum Pending {
    Unit(oneshot::Sender<Result<(), StoreError>>, Result<(), String>),
    Count(
        oneshot::Sender<Result<u64, StoreError>>,
        Result<u64, String>,
    ),
}

fn run_batch(
    conn: &mut Connection,
    batch: Vec<Command>,
    stats: &WriterStats,
    fresh: Option<&Fresh>,
) -> Result<(), String> {
    let size = batch.len() as u64;
    let mut results = Vec::with_capacity(batch.len());
    // The deliveries this batch inserts, for the hand-off once they are committed.
    let mut inserted = Vec::new();
    let tx = match conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => {
            let msg = e.to_string();
            fail_all(batch, &msg);
            return Err(msg);
        }
    };
    let now = now_ms();
    let mut lost = false;
    for cmd in batch {
        if lost {
            // The transaction is gone: fail what is left without running it.
            match cmd {
                Command::Insert { reply, .. } | Command::Record { reply, .. } => {
                    results.push(Pending::Unit(reply, Err("transaction aborted".into())));
                }
                Command::Admin { reply, .. } => {
                    results.push(Pending::Count(reply, Err("transaction aborted".into())));
                }
                Command::Nudge => {}
            }
            continue;
        }
        match cmd {
            // Ingress gave up waiting (`store_timeout`) and answered 503: the event is not
            // stored, so that 503 means "not stored" and no delivery appears after the
            // time a reload's sweep allows for requests under way.
            Command::Insert { reply, .. } if reply.is_closed() => {}
            Command::Insert { event, reply } => {
                let r = in_savepoint(&tx, |sp| insert(sp, &event, now));
                let r = r.map(|ids| {
                    if fresh.is_some() {
                        inserted.extend(deliveries(&event, &ids));
                    }
                });
                results.push(Pending::Unit(reply, r));
            }
            Command::Record {
                delivery_id,
                outcome,
                reply,
            } => {
                let r = in_savepoint(&tx, |sp| record(sp, delivery_id, &outcome, now).map(|_| ()));
                results.push(Pending::Unit(reply, r));
            }
            Command::Admin { run, reply } => {
                let r = in_savepoint(&tx, run);
                results.push(Pending::Count(reply, r));
            }
            Command::Nudge => {}
        }
        lost = transaction_lost(&tx);
    }
    let committed = if lost {
        Err("SQLite rolled the transaction back".to_string())
    } else {
        tx.commit().map_err(|e| e.to_string())
    };
    // Counted before anyone hears of the commit, so a caller that has its answer sees it
    // in the figures.
    if committed.is_ok() {
        stats.commits.fetch_add(1, Ordering::Relaxed);
        stats.commands.fetch_add(size, Ordering::Relaxed);
        // Handed over before the inserters hear of the commit: the dispatcher they wake
        // finds the deliveries in memory.
        if let Some(fresh) = fresh {
            fresh.push(inserted);
        }
    }
    for p in results {
        match p {
            Pending::Unit(reply, r) => {
                let r = committed.clone().and(r).map_err(StoreError::Unavailable);
                let _ = reply.send(r);
            }
            Pending::Count(reply, r) => {
                let r = committed.clone().and(r).map_err(StoreError::Unavailable);
                let _ = reply.send(r);
            }
        }
    }
    committed
}

fn in_savepoint<T>(
    tx: &Transaction<'_>,
    f: impl FnOnce(&Transaction<'_>) -> rusqlite::Result<T>,
) -> Result<T, String> {
    // Cached statements: `execute_batch` would parse and compile these for every command
    // (measured at ~14% of the relay's CPU under load).
    let run = |sql: &str| tx.prepare_cached(sql).and_then(|mut s| s.execute([]));
    run("SAVEPOINT cmd").map_err(|e| e.to_string())?;
    match f(tx) {
        Ok(v) => run("RELEASE cmd").map(|_| v).map_err(|e| e.to_string()),
        Err(e) => {
            let _ = tx.execute_batch("ROLLBACK TO cmd; RELEASE cmd");
            Err(e.to_string())
        }
    }
}

/// Whether SQLite abandoned the whole transaction (it does on some errors: full disk,
/// I/O error, out of memory). Everything done in the batch so far is gone then, so the
/// batch must fail as a whole rather than go on in autocommit mode.
fn transaction_lost(tx: &Transaction<'_>) -> bool {
    tx.is_autocommit()
}

fn fail_all(batch: Vec<Command>, msg: &str) {
    for cmd in batch {
        match cmd {
            Command::Insert { reply, .. } | Command::Record { reply, .. } => {
                let _ = reply.send(Err(StoreError::Unavailable(msg.to_string())));
            }
            Command::Admin { reply, .. } => {
                let _ = reply.send(Err(StoreError::Unavailable(msg.to_string())));
            }
            Command::Nudge => {}
        }
    }
}

/// The pending deliveries `insert` wrote for `e`, with their row IDs.
fn deliveries(e: &EventRow, ids: &[i64]) -> impl Iterator<Item = Delivery> {
    // A copy of its own: the request's body is a slice of the connection's read buffer,
    // and a hand-off queue thousands long would keep those buffers (8 KiB and more each)
    // alive with it.
    let body = bytes::Bytes::copy_from_slice(&e.body);
    e.destinations
        .iter()
        .zip(ids)
        .map(move |(destination, &id)| Delivery {
            id,
            event_id: e.id.clone(),
            destination: destination.clone(),
            attempts: 0,
            received_at_ms: e.received_at,
            body: body.clone(),
            claim: None,
        })
}

/// Inserts the event and its pending deliveries; returns the deliveries' row IDs.
fn insert(tx: &Transaction<'_>, e: &EventRow, now: i64) -> rusqlite::Result<Vec<i64>> {
    let payload = std::str::from_utf8(&e.body).map_err(rusqlite::Error::Utf8Error)?;
    tx.prepare_cached(
        "INSERT INTO events (id, received_at, app_id, event_name, facial_id, client_ip, payload)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
        e.id,
        e.received_at,
        e.app_id,
        e.event_name,
        e.facial_id,
        e.client_ip,
        payload
    ])?;
    let mut stmt = tx.prepare_cached(
        "INSERT INTO deliveries (event_id, destination, state, attempts, next_attempt_at, updated_at)
         VALUES (?1, ?2, 'pending', 0, ?3, ?3)",
    )?;
    e.destinations
        .iter()
        .map(|dest| stmt.insert(params![e.id, dest, now]))
        .collect()
}

fn record(tx: &Transaction<'_>, id: i64, outcome: &Outcome, now: i64) -> rusqlite::Result<usize> {
    // `state = 'pending'` guards against an operator's purge racing a worker.
    match outcome {
        Outcome::Done { attempts } => tx
            .prepare_cached(
                "UPDATE deliveries SET state = 'done', attempts = ?2, last_error = NULL, updated_at = ?3
                 WHERE id = ?1 AND state = 'pending'",
            )?
            .execute(params![id, attempts, now]),
        Outcome::Retry {
            attempts,
            next_attempt_at_ms,
            error,
        } => tx
            .prepare_cached(
                "UPDATE deliveries SET attempts = ?2, next_attempt_at = ?3, last_error = ?4, updated_at = ?5
                 WHERE id = ?1 AND state = 'pending'",
            )?
            .execute(params![id, attempts, next_attempt_at_ms, error, now]),
        Outcome::Dead { attempts, error } => tx
            .prepare_cached(
                "UPDATE deliveries SET state = 'dead', attempts = ?2, last_error = ?3, updated_at = ?4
                 WHERE id = ?1 AND state = 'pending'",
            )?
            .execute(params![id, attempts, error, now]),
    }
}
