//! LISTEN/NOTIFY: the notifications sent after inserts commit, and the listening
//! connection that passes them on to this relay's dispatchers.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use tokio::sync::{Notify, broadcast};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::conn::{CONNECT_TIMEOUT, conn};
use super::handed::Handed;
use crate::store::Wake;

/// The NOTIFY channel for new deliveries; the payload is the destination name.
pub(super) const CHANNEL: &str = "faceio_relay_new";

/// First pause before listening again after the listening connection failed; doubled
/// (up to [`MAX_LISTEN_BACKOFF`]) until a connection lives [`LISTEN_STABLE`].
const LISTEN_BACKOFF: Duration = Duration::from_millis(100);

/// Longest pause between attempts to re-listen after the listening connection failed.
const MAX_LISTEN_BACKOFF: Duration = Duration::from_secs(10);

/// A listening connection that lived this long was healthy: the next failure starts the
/// backoff over. One that dies sooner (ended right after connecting, say) keeps it
/// growing, so a relay does not reconnect in a tight loop.
const LISTEN_STABLE: Duration = Duration::from_secs(5);

/// How often the idle listening connection is checked with a round trip: nothing else
/// would notice a connection that hangs without failing.
const LISTEN_CHECK_INTERVAL: Duration = Duration::from_secs(10);

/// Least time between two "look at every destination" wake-ups (each costs every
/// dispatcher a store read).
const WAKE_ALL_INTERVAL: Duration = Duration::from_secs(1);

/// Notifications buffered for dispatchers that are slow to read them (a lagging reader
/// wakes every dispatcher instead).
pub(super) const WAKE_BUFFER: usize = 1024;

/// Pause after sending notifications: inserts committed meanwhile share the next
/// statement, one notification per destination. Short next to the milliseconds a
/// wake-up may take.
const NOTIFY_COALESCE: Duration = Duration::from_millis(2);

/// Destinations waiting for their notification, and the task's wake-up.
#[derive(Default)]
pub(super) struct Notices {
    pending: std::sync::Mutex<HashSet<String>>,
    ready: Notify,
}

impl Notices {
    /// Queues a notification for each of `destinations` (coalesced with those waiting).
    pub(super) fn notify(&self, destinations: impl IntoIterator<Item = String>) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let before = pending.len();
        pending.extend(destinations);
        if pending.len() > before {
            self.ready.notify_one();
        }
    }
}

/// Sends the notifications for committed deliveries until `stop`: one statement for
/// every destination that got deliveries since the last one, then a short pause so a
/// burst of inserts shares the next. Each is its own transaction, committed without
/// waiting for the WAL flush (a notification needs no durability), so no insert waits
/// for the cluster-wide lock NOTIFY takes at commit. A failure costs the other relays a
/// poll, nothing more.
pub(super) async fn send_notices(pool: PgPool, notices: Arc<Notices>, stop: CancellationToken) {
    loop {
        tokio::select! {
            () = notices.ready.notified() => {}
            () = stop.cancelled() => return,
        }
        let destinations: Vec<String> = notices
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .collect();
        if destinations.is_empty() {
            continue;
        }
        let sent = tokio::time::timeout(CONNECT_TIMEOUT, async {
            let mut c = conn(&pool).await?;
            let r = sqlx::query(
                "SELECT set_config('synchronous_commit', 'off', true), pg_notify($1, dest)
                 FROM unnest($2::text[]) AS dest",
            )
            .bind(CHANNEL)
            .bind(&destinations)
            .execute(c.get())
            .await;
            c.finish(r)
        })
        .await;
        match sent {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::debug!(error = %e,
                "cannot notify the other relays of new deliveries; they find them at their next poll"),
            Err(_) => tracing::debug!(
                "notifying the other relays of new deliveries timed out; they find them at their next poll"
            ),
        }
        tokio::select! {
            () = tokio::time::sleep(NOTIFY_COALESCE) => {}
            () = stop.cancelled() => return,
        }
    }
}

/// Why [`listen_until_lost`] returned.
enum Ended {
    Stopped,
    Lost(String),
}

/// Listens for new deliveries and passes them on until `stop`; after a lost connection,
/// wakes every dispatcher (notifications may have been missed), at most once per
/// [`WAKE_ALL_INTERVAL`].
pub(super) async fn listen(
    options: PgConnectOptions,
    handed: Arc<Handed>,
    tx: broadcast::Sender<Wake>,
    stop: CancellationToken,
) {
    let mut backoff = LISTEN_BACKOFF;
    let mut last_wake_all: Option<Instant> = None;
    loop {
        // A pool of its own for each connection: the listener keeps that connection for
        // good, and one that hung must not be handed back (sqlx would check it first, with
        // no time limit, and hold the only slot meanwhile).
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(CONNECT_TIMEOUT)
            .connect_lazy_with(options.clone());
        let listener = async {
            let mut l = PgListener::connect_with(&pool).await?;
            // The listener reconnects by itself otherwise, without any pause; we want
            // every reconnection to go through the backoff below.
            l.eager_reconnect(false);
            l.listen(CHANNEL).await?;
            Ok::<_, sqlx::Error>(l)
        };
        let connected = tokio::select! {
            l = tokio::time::timeout(CONNECT_TIMEOUT, listener) => l,
            () = stop.cancelled() => return,
        };
        let lost = match connected {
            Ok(Ok(mut listener)) => {
                let since = Instant::now();
                // Anything committed while we were not listening.
                if let Some(last) = last_wake_all {
                    tokio::select! {
                        () = tokio::time::sleep_until(last + WAKE_ALL_INTERVAL) => {}
                        () = stop.cancelled() => return,
                    }
                }
                last_wake_all = Some(Instant::now());
                handed.set_listening(true);
                let _ = tx.send(Wake::All);
                let ended = listen_until_lost(&mut listener, &handed, &tx, &stop).await;
                // Whatever is committed from here is not heard of until the next listen.
                handed.set_listening(false);
                if since.elapsed() >= LISTEN_STABLE {
                    backoff = LISTEN_BACKOFF;
                }
                match ended {
                    Ended::Stopped => return,
                    Ended::Lost(why) => why,
                }
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => "connecting timed out".to_string(),
        };
        tracing::warn!(error = %lost, retry_in_ms = backoff.as_millis() as u64,
            "not listening for new deliveries; dispatchers poll meanwhile");
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = stop.cancelled() => return,
        }
        backoff = (backoff * 2).min(MAX_LISTEN_BACKOFF);
    }
}

/// Passes notifications on until the connection fails (or stops answering a check) or
/// `stop`.
async fn listen_until_lost(
    listener: &mut PgListener,
    handed: &Handed,
    tx: &broadcast::Sender<Wake>,
    stop: &CancellationToken,
) -> Ended {
    let mut check = tokio::time::interval_at(
        Instant::now() + LISTEN_CHECK_INTERVAL,
        LISTEN_CHECK_INTERVAL,
    );
    loop {
        // `try_recv` is cancel-safe: a check (or the stop) never loses a notification.
        tokio::select! {
            n = listener.try_recv() => match n {
                Ok(Some(n)) => {
                    // The hand-off first: the dispatcher this wakes must read the store.
                    handed.untrack(n.payload());
                    let _ = tx.send(Wake::Destination(n.payload().to_string()));
                }
                Ok(None) => return Ended::Lost("the connection was closed".into()),
                Err(e) => return Ended::Lost(e.to_string()),
            },
            _ = check.tick() => {
                let ping = sqlx::query("SELECT 1").execute(&mut *listener);
                match tokio::time::timeout(CONNECT_TIMEOUT, ping).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Ended::Lost(e.to_string()),
                    Err(_) => return Ended::Lost("the connection stopped answering".into()),
                }
            }
            () = stop.cancelled() => return Ended::Stopped,
        }
    }
}
