//! Connection hygiene: the session settings every connection gets, the time limits, and
//! [`Conn`], which closes a connection whose statement did not end instead of returning it
//! to the pool.

use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnection, PgPool};
use sqlx::{Executor, Postgres};

use crate::store::StoreError;

/// Set on every session at connect. The TCP keepalives make PostgreSQL end the session
/// of a relay whose machine vanished within about 20 s (10 s idle, then 3 probes 3 s
/// apart; 15 s for data left unacknowledged) instead of the server default of hours,
/// which would keep that relay's destination locks, and so its destinations, stuck.
/// (`tcp_user_timeout` needs PostgreSQL 12 or later.) Notices (such as "relation …
/// already exists, skipping" from a migration check) would land in the operator's
/// terminal at INFO: keep only warnings.
///
/// Every statement is planned for its own parameters (`plan_cache_mode`): a prepared
/// statement's generic plan is made once per connection from the statistics of that
/// moment, and on a fresh database (no rows yet, no autoanalyze for up to a minute) that
/// plan scans whole tables. In the benchmark the outcome group update, planned on an
/// empty table, then took over 10 s per group at 60,000 rows and stalled delivery.
/// Planning each statement costs well under a millisecond; the statements that run
/// often carry whole groups.
pub(super) const SESSION_OPTIONS: [(&str, &str); 6] = [
    ("client_min_messages", "warning"),
    ("plan_cache_mode", "force_custom_plan"),
    ("tcp_keepalives_idle", "10"),
    ("tcp_keepalives_interval", "3"),
    ("tcp_keepalives_count", "3"),
    ("tcp_user_timeout", "15000"),
];

/// Longest wait for a pooled connection; past it the caller gets `Unavailable` (ingress:
/// 503), well inside ingress's own `store_timeout`.
pub(super) const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);

/// Longest wait to open a connection or run a statement of our own (lock connection,
/// listener, notifications).
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

pub(super) fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// What [`StoreError::Open`] names: never the URL (it may hold a password).
const WHAT: &str = "the PostgreSQL database (store.url)";

pub(super) fn open_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Open {
        path: WHAT.into(),
        reason: e.to_string(),
    }
}

/// Sets `synchronous_commit` for the session, so commits on `conn` wait for the WAL
/// flush whatever the database or server default says, now or after a configuration
/// reload (a session-level setting outlives both). The `remote_*` levels are kept: they
/// wait for more.
pub(super) async fn set_synchronous_commit(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    conn.execute(
        "SELECT set_config('synchronous_commit',
             CASE WHEN current_setting('synchronous_commit') IN ('remote_write', 'remote_apply')
                  THEN current_setting('synchronous_commit') ELSE 'on' END,
             false)",
    )
    .await?;
    Ok(())
}

/// A pooled connection for one statement. Unless [`Conn::finish`] saw the statement
/// end, dropping it closes the connection instead of returning it to the pool (where
/// sqlx would check it with a round trip that has no time limit): a caller that gave up
/// waiting on a hung connection gets its pool slot back.
pub(super) struct Conn {
    conn: PoolConnection<Postgres>,
    finished: bool,
}

impl Conn {
    pub(super) fn get(&mut self) -> &mut PgConnection {
        &mut self.conn
    }

    /// Marks the statement as ended and maps its error.
    pub(super) fn finish<T>(&mut self, result: Result<T, sqlx::Error>) -> Result<T, StoreError> {
        self.finished = true;
        result.map_err(unavailable)
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if !self.finished {
            self.conn.close_on_drop();
        }
    }
}

pub(super) async fn conn(pool: &PgPool) -> Result<Conn, StoreError> {
    let conn = pool.acquire().await.map_err(unavailable)?;
    Ok(Conn {
        conn,
        finished: false,
    })
}
