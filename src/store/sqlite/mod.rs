//! The embedded SQLite store (the default backend).
//!
//! # On disk
//! One database file in WAL mode, plus `-wal`/`-shm` beside it and a `.lock` file the
//! daemon holds exclusively. Tables (documented for `sqlite3` users in the README):
//! - `events(id, received_at, app_id, event_name, facial_id, client_ip, payload)`:
//!   one row per accepted webhook; `payload` is the body exactly as FACEIO sent it.
//! - `deliveries(id, event_id, destination, state, attempts, next_attempt_at, last_error,
//!   updated_at)`: one row per (event, destination); `state` is `pending`, `done` or
//!   `dead`. Times are Unix milliseconds.
//! - `replay_requests(delivery_id, batch, requested_at, outcome, destination, decided_at)`:
//!   dead letters `dead-letters replay` asked to send again; the daemon decides each one
//!   (`replayed` or `refused`) by the destinations it runs. Added without a version bump
//!   (`CREATE TABLE IF NOT EXISTS`): older binaries open the file and ignore it.
//!
//! # Group commit
//! All writes go through one writer thread that owns the write connection. It takes every
//! command waiting in its queue, runs them in one transaction (each in its own savepoint,
//! so one bad command fails alone) and commits once. A batch containing an event insert
//! commits with `synchronous=FULL`, which fsyncs the WAL: that one fsync makes every event
//! in the batch durable, so throughput grows with concurrency instead of being capped at
//! one fsync per request. Batches holding only outcomes commit with `synchronous=NORMAL`
//! (no fsync; see the invariants in the parent module).
//!
//! If a commit fails with an I/O error (full disk, failed fsync), the write connection is
//! closed and reopened for the next batch: after a failed fsync the page cache cannot be
//! trusted, and SQLite recovers from the WAL on open.
//!
//! # Layout
//! - `mod.rs`: opening (the daemon lock, the schema) and the reader connections.
//! - `writer.rs`: the writer thread and its group commit.
//! - `queries.rs`: the [`Store`] implementation.
//!
//! [`Store`]: super::Store

mod fresh;
mod queries;
mod writer;

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, Transaction};
use tokio::sync::{mpsc, oneshot};

use self::fresh::Fresh;
use self::writer::{Command, OUTCOME_LINGER, Outcomes, QUEUE_DEPTH, writer_loop};
use super::StoreError;

pub use self::writer::WriterStats;

/// The schema version this build writes (`PRAGMA user_version`).
const SCHEMA_VERSION: i64 = 1;

/// How long a statement waits for another process (the `dead-letters` commands) to release
/// the write lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(2);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS events (
    id          TEXT PRIMARY KEY,
    received_at INTEGER NOT NULL,
    app_id      TEXT NOT NULL,
    event_name  TEXT NOT NULL,
    facial_id   TEXT NOT NULL,
    client_ip   TEXT NOT NULL,
    payload     TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS deliveries (
    id              INTEGER PRIMARY KEY,
    event_id        TEXT NOT NULL,
    destination     TEXT NOT NULL,
    state           TEXT NOT NULL CHECK (state = 'pending' OR state = 'done' OR state = 'dead'),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    last_error      TEXT,
    updated_at      INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS deliveries_due
    ON deliveries (destination, next_attempt_at) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS deliveries_dead
    ON deliveries (updated_at) WHERE state = 'dead';
CREATE INDEX IF NOT EXISTS deliveries_event ON deliveries (event_id);
CREATE INDEX IF NOT EXISTS deliveries_done
    ON deliveries (updated_at) WHERE state = 'done';
CREATE INDEX IF NOT EXISTS events_received ON events (received_at);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS replay_requests (
    delivery_id  INTEGER PRIMARY KEY,
    batch        TEXT NOT NULL,
    requested_at INTEGER NOT NULL,
    outcome      TEXT CHECK (outcome = 'replayed' OR outcome = 'refused' OR outcome = 'gone'),
    destination  TEXT,
    decided_at   INTEGER
);
CREATE INDEX IF NOT EXISTS replay_requests_batch ON replay_requests (batch);
CREATE INDEX IF NOT EXISTS replay_requests_undecided
    ON replay_requests (delivery_id) WHERE outcome IS NULL;
";

/// The CHECK constraints as the first releases wrote them, and the same tests as
/// [`SCHEMA`] writes them now. SQLite evaluates `x IN (a, b, c)` over three or more
/// constants by filling a temporary b-tree, once per statement that checks it: every
/// delivery insert and every outcome update built and dropped one (about 12% of the
/// relay's instructions per event under callgrind; BENCHMARKS.md, "Issue 14, third
/// round"). `=` joined by `OR` accepts exactly the same values (and NULL alike) with a
/// few comparisons.
const CHECK_REWRITES: [(&str, &str, &str); 2] = [
    (
        "deliveries",
        "CHECK (state IN ('pending', 'done', 'dead'))",
        "CHECK (state = 'pending' OR state = 'done' OR state = 'dead')",
    ),
    (
        "replay_requests",
        "CHECK (outcome IN ('replayed', 'refused', 'gone'))",
        "CHECK (outcome = 'replayed' OR outcome = 'refused' OR outcome = 'gone')",
    ),
];

/// SQLite-backed [`Store`](super::Store).
pub struct SqliteStore {
    /// Shared with the writer thread.
    stats: Arc<WriterStats>,
    /// Queue to the writer thread (group commit).
    writer: mpsc::Sender<Command>,
    /// Outcomes for the writer, beside its queue.
    outcomes: Arc<Outcomes>,
    /// Connection for the dispatchers' reads; WAL lets it read while the writer writes.
    reader: Arc<Mutex<Connection>>,
    /// Connection for slower reads (backlog figures, dead-letter listings), so they
    /// never hold up a dispatcher.
    slow_reader: Arc<Mutex<Connection>>,
    /// Deliveries committed here, handed to their dispatchers in memory (daemon only).
    fresh: Option<Arc<Fresh>>,
    /// Held for the daemon's lifetime: an exclusive lock on `<db>.lock`.
    _lock: Option<File>,
}

impl SqliteStore {
    /// Opens (creating if needed) the database for the daemon, taking the exclusive lock.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(|e| open_err(path, e))?;
        }
        // One lock per database, however it is named (symlinks, `..`, relative paths).
        let canonical = match (path.parent(), path.file_name()) {
            (Some(dir), Some(name)) if !dir.as_os_str().is_empty() => fs::canonicalize(dir)
                .map_err(|e| open_err(path, e))?
                .join(name),
            _ => path.to_path_buf(),
        };
        let lock_path = lock_path(&canonical);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| open_err(path, e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(StoreError::Locked {
                    path: path.display().to_string(),
                    lock: lock_path.display().to_string(),
                });
            }
            Err(fs::TryLockError::Error(e)) => return Err(open_err(path, e)),
        }
        Self::start(path, Some(lock), OUTCOME_LINGER)
    }

    /// Opens an existing database for the `dead-letters` commands, without the daemon lock.
    pub fn open_admin(path: &Path) -> Result<Self, StoreError> {
        if !path.exists() {
            return Err(StoreError::Open {
                path: path.display().to_string(),
                reason: "no such file (has the relay run with this config yet?)".into(),
            });
        }
        Self::start(path, None, OUTCOME_LINGER)
    }

    fn start(path: &Path, lock: Option<File>, linger: Duration) -> Result<Self, StoreError> {
        let conn = open_connection(path)?;
        migrate(&conn).map_err(|e| open_err(path, e))?;
        let reader = open_connection(path)?;
        let slow_reader = open_connection(path)?;
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let path_buf = path.to_path_buf();
        let stats = Arc::new(WriterStats::default());
        let writer_stats = Arc::clone(&stats);
        // Only the daemon dispatches; the `dead-letters` commands hand nothing over.
        let fresh = lock.as_ref().map(|_| Arc::new(Fresh::default()));
        let writer_fresh = fresh.clone();
        let outcomes = Arc::new(Outcomes::default());
        let writer_outcomes = Arc::clone(&outcomes);
        std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || {
                writer_loop(
                    path_buf,
                    Some(conn),
                    rx,
                    &writer_stats,
                    writer_fresh.as_deref(),
                    &writer_outcomes,
                    linger,
                )
            })
            .map_err(|e| open_err(path, e))?;
        Ok(Self {
            stats,
            writer: tx,
            outcomes,
            reader: Arc::new(Mutex::new(reader)),
            slow_reader: Arc::new(Mutex::new(slow_reader)),
            fresh,
            _lock: lock,
        })
    }

    /// Writer counters (commits and the commands they carried).
    pub fn stats(&self) -> &WriterStats {
        &self.stats
    }

    /// Commands waiting for the writer (outcomes included).
    pub fn queued(&self) -> usize {
        self.writer.max_capacity() - self.writer.capacity() + self.outcomes.len()
    }

    async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        Self::read_on(Arc::clone(&self.reader), f).await
    }

    async fn read_slow<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        Self::read_on(Arc::clone(&self.slow_reader), f).await
    }

    async fn read_on<T, F>(reader: Arc<Mutex<Connection>>, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        tokio::task::spawn_blocking(move || {
            let conn = reader.lock().unwrap_or_else(|p| p.into_inner());
            f(&conn).map_err(unavailable)
        })
        .await
        .map_err(|_| StoreError::Closed)?
    }

    async fn admin<F>(&self, f: F) -> Result<u64, StoreError>
    where
        F: FnOnce(&Transaction<'_>) -> rusqlite::Result<u64> + Send + 'static,
    {
        let (reply, rx) = oneshot::channel();
        self.writer
            .send(Command::Admin {
                run: Box::new(f),
                reply,
            })
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }
}

fn lock_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".lock");
    path.with_file_name(name)
}

fn open_err(path: &Path, e: impl std::fmt::Display) -> StoreError {
    StoreError::Open {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

pub(super) fn unavailable(e: rusqlite::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

pub(super) fn open_connection(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path).map_err(|e| open_err(path, e))?;
    conn.busy_timeout(BUSY_TIMEOUT)
        .and_then(|()| conn.pragma_update(None, "journal_mode", "WAL"))
        .and_then(|()| conn.pragma_update(None, "synchronous", "FULL"))
        .map_err(|e| open_err(path, e))?;
    Ok(conn)
}

fn migrate(conn: &Connection) -> Result<(), String> {
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(|e| e.to_string())?;
    if version > SCHEMA_VERSION {
        return Err(format!(
            "schema version {version} was written by a newer faceio-relay (this one knows {SCHEMA_VERSION})"
        ));
    }
    conn.execute_batch(SCHEMA).map_err(|e| e.to_string())?;
    if let Err(e) = rewrite_checks(conn) {
        tracing::warn!(
            error = %e,
            "the store's CHECK constraints were left in their first form (equivalent, \
             slower); the next start tries again"
        );
    }
    conn.pragma_update(None, "user_version", SCHEMA_VERSION)
        .map_err(|e| e.to_string())
}

/// Rewrites a database's CHECK constraints from the first releases' `IN` lists to the
/// equivalent tests in [`CHECK_REWRITES`], in place, by the procedure SQLite documents
/// for removing a CHECK constraint (<https://sqlite.org/lang_altertable.html>, "making
/// other kinds of table schema changes"): in one transaction, edit the table's text in
/// `sqlite_schema` and bump `schema_version`, so every connection re-reads the schema.
/// Putting an equivalent test in its place is as safe as removing it: no stored row can
/// fail it (each passed the old, identical one). No row is touched, so it is instant on
/// any size of database, and `user_version` stays: older binaries open the file as
/// before. A database already rewritten (or created by this build) is only read.
///
/// The edit runs in an immediate transaction (waiting `BUSY_TIMEOUT` for a writer in
/// another process, such as an older daemon still running) and re-reads the text inside
/// it. It is only a speed-up: when it fails, the caller logs it and carries on with the
/// old, equivalent constraints.
fn rewrite_checks(conn: &Connection) -> rusqlite::Result<()> {
    let edits = |conn: &Connection| -> rusqlite::Result<Vec<(&str, String)>> {
        let mut edits = Vec::new();
        for (table, old, new) in CHECK_REWRITES {
            let sql: String = conn.query_row(
                "SELECT sql FROM sqlite_schema WHERE type = 'table' AND name = ?1",
                [table],
                |r| r.get(0),
            )?;
            if sql.contains(old) {
                edits.push((table, sql.replace(old, new)));
            }
        }
        Ok(edits)
    };
    if edits(conn)?.is_empty() {
        return Ok(());
    }
    let tx = Transaction::new_unchecked(conn, rusqlite::TransactionBehavior::Immediate)?;
    let edits = edits(&tx)?;
    if edits.is_empty() {
        return Ok(());
    }
    let version: i64 = tx.pragma_query_value(None, "schema_version", |r| r.get(0))?;
    tx.pragma_update(None, "writable_schema", true)?;
    let edited = (|| {
        for (table, sql) in &edits {
            tx.execute(
                "UPDATE sqlite_schema SET sql = ?1 WHERE type = 'table' AND name = ?2",
                (sql, table),
            )?;
        }
        tx.pragma_update(None, "schema_version", version + 1)
    })();
    // A connection setting, not undone by a rollback: off whatever happened.
    let off = tx.pragma_update(None, "writable_schema", false);
    edited.and(off)?;
    tx.commit()
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use bytes::Bytes;

    use super::*;
    use crate::config::{Application, Secret};
    use crate::event::verify::{authenticate, verify};
    use crate::event::{VerifiedEvent, now_ms};
    use crate::store::{Delivery, Outcome, Store};

    fn app() -> Vec<Application> {
        vec![Application::new("fioa1", Secret::new("t".into()))]
    }

    fn event(name: &str) -> VerifiedEvent {
        let apps = app();
        let auth = authenticate(&apps, Some(b"t")).unwrap();
        let body = format!(
            r#"{{"eventName":"{name}","facialId":"f","appId":"fioa1","clientIp":"1.2.3.4"}}"#
        );
        verify(auth, Bytes::from(body)).unwrap()
    }

    fn open() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("db/relay.db")).unwrap();
        (dir, store)
    }

    /// The tables' text in `sqlite_schema`, by name.
    fn table_sql(conn: &Connection) -> Vec<(String, String)> {
        let mut stmt = conn
            .prepare("SELECT name, sql FROM sqlite_schema WHERE type = 'table' ORDER BY name")
            .unwrap();
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    /// The opcodes SQLite compiles `sql` to.
    fn opcodes(conn: &Connection, sql: &str) -> Vec<String> {
        let mut stmt = conn.prepare(&format!("EXPLAIN {sql}")).unwrap();
        stmt.query_map([], |r| r.get(1))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    /// A database the first releases wrote (CHECK constraints as `IN` lists) is rewritten
    /// in place when opened: its rows stay, its tables read exactly as a new database's,
    /// the constraints still refuse a state that does not exist, and neither a delivery
    /// insert nor an outcome update builds a temporary b-tree any more.
    #[tokio::test]
    async fn the_first_releases_check_constraints_are_rewritten_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        let mut old_schema = SCHEMA.to_string();
        for (_, old, new) in CHECK_REWRITES {
            assert!(old_schema.contains(new), "SCHEMA writes {new}");
            old_schema = old_schema.replace(new, old);
        }
        let insert = "INSERT INTO deliveries (event_id, destination, state, next_attempt_at, \
                      updated_at) VALUES ('e1', 'sink', 'dead', 1, 2)";
        let outcome = "UPDATE deliveries SET state = 'done', updated_at = 3 WHERE id = 1";
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(&old_schema).unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
            conn.execute(insert, []).unwrap();
            // What the rewrite removes: a temporary b-tree per checked statement.
            assert!(opcodes(&conn, insert).contains(&"OpenEphemeral".to_string()));
        }
        drop(SqliteStore::open(&path).unwrap());
        let fresh = dir.path().join("fresh.db");
        drop(SqliteStore::open(&fresh).unwrap());

        let conn = Connection::open(&path).unwrap();
        assert_eq!(
            table_sql(&conn),
            table_sql(&Connection::open(&fresh).unwrap())
        );
        let state: String = conn
            .query_row(
                "SELECT state FROM deliveries WHERE event_id = 'e1'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(state, "dead", "the rows are kept");
        let refused = conn
            .execute(&insert.replace("'dead'", "'lost'"), [])
            .unwrap_err();
        assert!(
            refused.to_string().contains("CHECK constraint failed"),
            "{refused}"
        );
        let integrity: String = conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(integrity, "ok");
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, 1, "older binaries still open the file");
        for sql in [insert, outcome] {
            assert!(
                !opcodes(&conn, sql).contains(&"OpenEphemeral".to_string()),
                "{sql} still builds a temporary b-tree"
            );
        }
    }

    #[tokio::test]
    async fn an_insert_ingress_gave_up_on_is_not_stored() {
        let (dir, store) = open();
        // Another process holds the write lock: the insert waits, and ingress gives up
        // (its `store_timeout`) and answers 503.
        let blocker = Connection::open(dir.path().join("db/relay.db")).unwrap();
        blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
        let gave_up = tokio::time::timeout(
            Duration::from_millis(100),
            store.insert_event(&event("AUTH"), &["a"]),
        )
        .await;
        assert!(gave_up.is_err(), "the insert waited for the lock");
        blocker.execute_batch("ROLLBACK").unwrap();
        // The next one is stored; the one answered 503 is not.
        store.insert_event(&event("AUTH"), &["a"]).await.unwrap();
        assert_eq!(store.due("a", now_ms(), 10).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn concurrent_inserts_share_commits() {
        let (dir, store) = open();
        let store = Arc::new(store);
        // Another process holds the write lock, so the writer stalls on its first batch
        // while the other inserts queue up behind it.
        let blocker = Connection::open(dir.path().join("db/relay.db")).unwrap();
        blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
        let tasks: Vec<_> = (0..200)
            .map(|_| {
                let store = Arc::clone(&store);
                tokio::spawn(async move { store.insert_event(&event("AUTH"), &["a"]).await })
            })
            .collect();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        // Every insert is either queued or in the writer's stalled first batch.
        while store.queued() as u64 + store.stats().taken.load(Ordering::Relaxed) < 200 {
            assert!(std::time::Instant::now() < deadline, "inserts never queued");
            tokio::task::yield_now().await;
        }
        blocker.execute_batch("ROLLBACK").unwrap();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let commits = store.stats().commits.load(Ordering::Relaxed);
        assert_eq!(store.stats().commands.load(Ordering::Relaxed), 200);
        // The stalled first batch, then everything that queued meanwhile in one commit.
        assert!(
            commits <= 2,
            "200 inserts took {commits} commits: no group commit"
        );
        assert_eq!(store.due("a", now_ms(), 1000).await.unwrap().len(), 200);
    }

    #[tokio::test]
    async fn committed_deliveries_are_handed_over_until_the_queue_is_full() {
        use crate::store::ClaimRequest;
        let (_dir, store) = open();
        let store = Arc::new(store);
        let read = |want: usize| ClaimRequest {
            destination: "a",
            now_ms: now_ms(),
            want,
            in_flight: &[],
            lease: Duration::from_secs(1),
            take_over: true,
        };
        assert!(store.hands_off());
        assert!(
            store.take_fresh("a", 10).is_none(),
            "not tracked before a read"
        );
        assert!(store.claim(read(10)).await.unwrap().is_empty());
        let ev = event("AUTH");
        store.insert_event(&ev, &["a", "b"]).await.unwrap();
        let handed: Vec<Delivery> = store
            .take_fresh("a", 10)
            .unwrap()
            .into_iter()
            .map(|(d, _)| d)
            .collect();
        let stored = store.due("a", now_ms(), 10).await.unwrap();
        assert_eq!(handed.len(), 1);
        assert_eq!(
            (
                handed[0].id,
                &handed[0].event_id,
                &handed[0].body,
                handed[0].attempts
            ),
            (stored[0].id, &stored[0].event_id, &stored[0].body, 0)
        );
        assert!(store.take_fresh("a", 10).unwrap().is_empty(), "taken once");
        assert!(store.take_fresh("b", 10).is_none(), "b was never read");

        // Past `MAX_FRESH` the hand-off stops; the store has every delivery.
        let n = fresh::MAX_FRESH + 1;
        let inserts: Vec<_> = (0..n)
            .map(|_| {
                let store = Arc::clone(&store);
                tokio::spawn(async move { store.insert_event(&event("AUTH"), &["a"]).await })
            })
            .collect();
        for t in inserts {
            t.await.unwrap().unwrap();
        }
        assert!(
            store.take_fresh("a", usize::MAX).is_none(),
            "read the store"
        );
        assert_eq!(store.claim(read(2 * n)).await.unwrap().len(), n + 1);
        assert!(
            store.take_fresh("a", 10).unwrap().is_empty(),
            "tracked again"
        );
    }

    #[tokio::test]
    async fn an_outcome_alone_commits_by_itself() {
        let (_dir, store) = open();
        store.insert_event(&event("AUTH"), &["a"]).await.unwrap();
        let d = store.due("a", now_ms(), 10).await.unwrap().remove(0);
        let commits = store.stats().commits.load(Ordering::Relaxed);
        // No insert follows: the outcome is committed at its deadline, on its own.
        store
            .record(&d, Outcome::Done { attempts: 1 })
            .await
            .unwrap();
        assert_eq!(store.stats().commits.load(Ordering::Relaxed), commits + 1);
        assert!(store.due("a", now_ms(), 10).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn an_outcome_wakes_a_writer_that_watches_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            SqliteStore::start(&dir.path().join("relay.db"), None, Duration::from_millis(5))
                .unwrap();
        store.insert_event(&event("AUTH"), &["a"]).await.unwrap();
        store.insert_event(&event("AUTH"), &["a"]).await.unwrap();
        let mut due = store.due("a", now_ms(), 10).await.unwrap();
        let (d1, d2) = (due.remove(0), due.remove(0));
        store
            .record(&d1, Outcome::Done { attempts: 1 })
            .await
            .unwrap();
        // That commit handed nothing over: the writer stops watching and sleeps until
        // woken. Only the nudge of the next outcome can wake it now.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while store
            .outcomes
            .watched
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the writer kept watching"
            );
            tokio::task::yield_now().await;
        }
        tokio::time::timeout(
            Duration::from_secs(30),
            store.record(&d2, Outcome::Done { attempts: 1 }),
        )
        .await
        .expect("the outcome woke the sleeping writer")
        .unwrap();
        assert!(store.due("a", now_ms(), 10).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn enough_outcomes_commit_without_waiting_for_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        // An hour's linger: only the number of outcomes waiting can end it.
        let store = Arc::new(
            SqliteStore::start(
                &dir.path().join("relay.db"),
                None,
                Duration::from_secs(3600),
            )
            .unwrap(),
        );
        for _ in 0..writer::OUTCOME_BATCH {
            store.insert_event(&event("AUTH"), &["a"]).await.unwrap();
        }
        let due = store.due("a", now_ms(), 1000).await.unwrap();
        assert_eq!(due.len(), writer::OUTCOME_BATCH);
        let recorded = due.into_iter().map(|d| {
            let store = Arc::clone(&store);
            tokio::spawn(async move { store.record(&d, Outcome::Done { attempts: 1 }).await })
        });
        for r in recorded.collect::<Vec<_>>() {
            tokio::time::timeout(Duration::from_secs(30), r)
                .await
                .expect("a drain's outcomes do not wait for the linger")
                .unwrap()
                .unwrap();
        }
        assert!(store.due("a", now_ms(), 10).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn an_outcome_rides_in_the_next_events_commit() {
        let dir = tempfile::tempdir().unwrap();
        // An hour's linger: the outcome cannot commit by itself within the test.
        let store = SqliteStore::start(
            &dir.path().join("relay.db"),
            None,
            Duration::from_secs(3600),
        )
        .unwrap();
        let store = Arc::new(store);
        store.insert_event(&event("AUTH"), &["a"]).await.unwrap();
        let d = store.due("a", now_ms(), 10).await.unwrap().remove(0);
        let commits = store.stats().commits.load(Ordering::Relaxed);
        let recording = tokio::spawn({
            let store = Arc::clone(&store);
            async move { store.record(&d, Outcome::Done { attempts: 1 }).await }
        });
        // Waits in the writer's list (counted as queued) until an insert comes.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while store.queued() == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the outcome never queued"
            );
            tokio::task::yield_now().await;
        }
        assert!(!recording.is_finished());
        store.insert_event(&event("ENROLL"), &["a"]).await.unwrap();
        recording.await.unwrap().unwrap();
        assert_eq!(
            store.stats().commits.load(Ordering::Relaxed),
            commits + 1,
            "the outcome and the event share one commit"
        );
        let due = store.due("a", now_ms(), 10).await.unwrap();
        assert_eq!(due.len(), 1, "only the new event's delivery is pending");
    }

    #[tokio::test]
    async fn the_dead_letter_commands_hand_nothing_over() {
        let (dir, _daemon) = open();
        let admin = SqliteStore::open_admin(&dir.path().join("db/relay.db")).unwrap();
        assert!(!admin.hands_off());
    }

    #[tokio::test]
    async fn a_second_daemon_cannot_open_the_same_store() {
        let (dir, _store) = open();
        let err = SqliteStore::open(&dir.path().join("db/relay.db"))
            .err()
            .unwrap();
        assert!(matches!(err, StoreError::Locked { .. }), "{err}");
        // The admin commands can.
        SqliteStore::open_admin(&dir.path().join("db/relay.db")).unwrap();
    }
}
