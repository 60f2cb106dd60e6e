//! Advisory-lock ownership: the dedicated connection that holds this relay's destination
//! locks, its check, and taking over from a previous lock session that hung.

use std::sync::Arc;
use std::time::Duration;

use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use super::conn::{CONNECT_TIMEOUT, unavailable};
use crate::store::{Ownership, StoreError};

/// How often the lock connection is checked. A lock lost with its connection is noticed
/// within this; the leases cover the time until then.
pub const LOCK_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// The lock connection and what depends on it.
pub(super) struct Locks {
    options: PgConnectOptions,
    state: Mutex<LockState>,
    /// Stops the check task.
    stop: CancellationToken,
}

struct LockState {
    /// `None` until the first [`Store::own`](crate::store::Store::own) and after a failure.
    conn: Option<PgConnection>,
    /// The session of the latest lock connection: its backend PID and start (µs since
    /// the epoch, so a reused PID is not mistaken for it). Kept after a failure: the next
    /// lock connection ends that session if PostgreSQL still has it.
    session: Option<(i32, i64)>,
    /// Cancelled when `conn` fails: every ownership granted on it is lost.
    lost: CancellationToken,
    /// Bumped on every new connection, so a release meant for a dead one is dropped.
    generation: u64,
    /// Whether the check task runs.
    checking: bool,
}

impl Locks {
    /// No lock connection yet: it is opened by the first [`Locks::try_own`].
    pub(super) fn new(options: PgConnectOptions, stop: CancellationToken) -> Self {
        Locks {
            options,
            state: Mutex::new(LockState {
                conn: None,
                session: None,
                lost: CancellationToken::new(),
                generation: 0,
                checking: false,
            }),
            stop,
        }
    }

    /// Tries to take `destination`'s lock on the lock connection (opening it if needed).
    pub(super) async fn try_own(
        self: &Arc<Self>,
        destination: &str,
    ) -> Result<Option<Ownership>, StoreError> {
        let mut state = self.state.lock().await;
        if state.conn.is_none() {
            let conn = self.reconnect(&mut state).await?;
            state.conn = Some(conn);
            state.lost = CancellationToken::new();
            state.generation += 1;
            if !state.checking {
                state.checking = true;
                tokio::spawn(Arc::clone(self).check());
            }
        }
        let conn = state.conn.as_mut().expect("connected above");
        let query = sqlx::query_scalar::<_, bool>(
            "SELECT pg_try_advisory_lock(faceio_relay_destination_key($1))",
        )
        .bind(destination)
        .fetch_one(conn);
        let owned = match tokio::time::timeout(CONNECT_TIMEOUT, query).await {
            Ok(Ok(owned)) => owned,
            Ok(Err(e)) => {
                state.fail();
                return Err(unavailable(e));
            }
            Err(_) => {
                state.fail();
                return Err(unavailable("taking a destination lock timed out"));
            }
        };
        if !owned {
            return Ok(None);
        }
        let locks = Arc::clone(self);
        let generation = state.generation;
        let destination = destination.to_string();
        Ok(Some(Ownership::new(state.lost.clone(), move || {
            // Drop cannot wait: unlock in the background. (Locks stack per session, so
            // this unlock cannot undo a newer `own` of the same destination.)
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move { locks.release(&destination, generation).await });
            }
        })))
    }

    /// Opens a new lock connection, ends the previous lock session if PostgreSQL still
    /// has it, and remembers the new one.
    async fn reconnect(&self, state: &mut LockState) -> Result<PgConnection, StoreError> {
        let setup = async {
            let mut conn = PgConnection::connect_with(&self.options).await?;
            if let Some((pid, started)) = state.session {
                // Only that session: the PID with the same start time, still ours.
                let ended: Option<bool> = sqlx::query_scalar(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                     WHERE pid = $1 AND application_name = 'faceio-relay'
                       AND (extract(epoch FROM backend_start) * 1000000)::bigint = $2",
                )
                .bind(pid)
                .bind(started)
                .fetch_optional(&mut conn)
                .await?;
                if ended == Some(true) {
                    tracing::warn!(
                        pid,
                        "ended this relay's previous PostgreSQL session for destination locks, \
                         which no longer answered; its locks are free again"
                    );
                }
            }
            let session: (i32, i64) = sqlx::query_as(
                "SELECT pid, (extract(epoch FROM backend_start) * 1000000)::bigint
                 FROM pg_stat_activity WHERE pid = pg_backend_pid()",
            )
            .fetch_one(&mut conn)
            .await?;
            Ok::<_, sqlx::Error>((conn, session))
        };
        let (conn, session) = tokio::time::timeout(CONNECT_TIMEOUT, setup)
            .await
            .map_err(|_| unavailable("connecting for destination locks timed out"))?
            .map_err(unavailable)?;
        state.session = Some(session);
        Ok(conn)
    }

    async fn release(&self, destination: &str, generation: u64) {
        let mut state = self.state.lock().await;
        if state.generation != generation {
            return; // that connection is gone, and its locks with it
        }
        let Some(conn) = state.conn.as_mut() else {
            return;
        };
        let query = sqlx::query("SELECT pg_advisory_unlock(faceio_relay_destination_key($1))")
            .bind(destination)
            .execute(conn);
        if !matches!(
            tokio::time::timeout(CONNECT_TIMEOUT, query).await,
            Ok(Ok(_))
        ) {
            state.fail();
        }
    }

    /// Checks the lock connection every [`LOCK_CHECK_INTERVAL`] until the store stops.
    async fn check(self: Arc<Self>) {
        loop {
            tokio::select! {
                () = tokio::time::sleep(LOCK_CHECK_INTERVAL) => {}
                () = self.stop.cancelled() => break,
            }
            let mut state = self.state.lock().await;
            let Some(conn) = state.conn.as_mut() else {
                continue;
            };
            if !matches!(
                tokio::time::timeout(CONNECT_TIMEOUT, conn.ping()).await,
                Ok(Ok(()))
            ) {
                tracing::warn!(
                    "the PostgreSQL connection holding this relay's destination locks failed; \
                     its destinations stop here until it owns them again"
                );
                state.fail();
            }
        }
        // The store is gone: closing the connection gives every destination back.
        self.give_back().await;
    }

    /// Closes the lock connection, which gives every destination back, and reports every
    /// ownership granted on it lost.
    pub(super) async fn give_back(&self) {
        let mut state = self.state.lock().await;
        if let Some(conn) = state.conn.take() {
            let _ = tokio::time::timeout(CONNECT_TIMEOUT, conn.close()).await;
        }
        state.lost.cancel();
    }
}

impl LockState {
    /// The lock connection failed: its locks are (or will soon be) gone.
    fn fail(&mut self) {
        self.conn = None;
        self.lost.cancel();
    }
}
