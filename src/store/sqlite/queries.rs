//! The [`Store`] implementation: reads on the reader connections, writes through the
//! writer thread.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use rusqlite::{OptionalExtension, Transaction, params};
use tokio::sync::{mpsc, oneshot};

use super::SqliteStore;
use super::writer::{Added, Command};
use crate::event::VerifiedEvent;
use crate::event::now_ms;
use crate::store::shared::{
    DEAD_LETTER_COLUMNS, ORPHANED, PRUNE_CHUNK, dead_letter, selection_filter,
};
use crate::store::{
    ClaimRequest, DeadLetter, Delivery, DestinationStats, EventRow, Outcome, REPLAY_RECORD_TTL,
    REPLAY_REFUSED, ReplayDecisions, ReplayVerdict, Selection, Store, StoreError,
};

/// `WHERE` clause and parameters for a dead-letter selection.
fn selection_sql(selection: &Selection) -> (String, Vec<rusqlite::types::Value>) {
    use rusqlite::types::Value;
    let (values, id_in) = match selection {
        Selection::All => (vec![], String::new()),
        Selection::Destination(d) => (vec![Value::Text(d.clone())], String::new()),
        Selection::Ids(ids) => (
            ids.iter().map(|&i| Value::Integer(i)).collect(),
            format!("IN ({})", vec!["?"; ids.len()].join(", ")),
        ),
    };
    (selection_filter(selection, "?", &id_in), values)
}

fn dead_letter_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<DeadLetter> {
    Ok(dead_letter((
        row.get(0)?,
        row.get(1)?,
        row.get(2)?,
        row.get(3)?,
        row.get(4)?,
        row.get(5)?,
        row.get(6)?,
    )))
}

#[async_trait]
impl Store for SqliteStore {
    async fn insert_event(
        &self,
        event: &VerifiedEvent,
        destinations: &[&str],
    ) -> Result<(), StoreError> {
        let (reply, rx) = oneshot::channel();
        let cmd = Command::Insert {
            event: EventRow::new(event, destinations),
            reply,
        };
        self.writer
            .send(cmd)
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    async fn due(
        &self,
        destination: &str,
        now_ms: i64,
        limit: usize,
    ) -> Result<Vec<Delivery>, StoreError> {
        let destination = destination.to_string();
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT d.id, d.event_id, d.attempts, e.received_at, e.payload
                 FROM deliveries d JOIN events e ON e.id = d.event_id
                 WHERE d.destination = ?1 AND d.state = 'pending' AND d.next_attempt_at <= ?2
                 ORDER BY d.next_attempt_at, d.id
                 LIMIT 100000",
            )?;
            // A bound `LIMIT ?` makes SQLite re-plan the statement on every call; rows come
            // in index order and are stepped lazily, so taking `limit` of them reads no more.
            let rows = stmt.query_map(params![destination, now_ms], |row| {
                Ok(Delivery {
                    id: row.get(0)?,
                    event_id: row.get(1)?,
                    destination: destination.clone(),
                    attempts: row.get(2)?,
                    received_at_ms: row.get(3)?,
                    body: Bytes::from(row.get::<_, String>(4)?),
                    claim: None,
                })
            })?;
            rows.take(limit).collect()
        })
        .await
    }

    async fn claim(&self, request: ClaimRequest<'_>) -> Result<Vec<Delivery>, StoreError> {
        // The hand-off queue starts empty just before the read (see `fresh`): whatever
        // commits from here on is in the read, in the queue, or in both.
        if let Some(fresh) = &self.fresh {
            fresh.track(request.destination);
        }
        let limit = request.want + request.in_flight.len();
        self.due(request.destination, request.now_ms, limit).await
    }

    fn hands_off(&self) -> bool {
        self.fresh.is_some()
    }

    fn take_fresh(
        &self,
        destination: &str,
        max: usize,
    ) -> Option<Vec<(Delivery, tokio::time::Instant)>> {
        self.fresh.as_ref()?.take(destination, max)
    }

    async fn next_due_after(
        &self,
        destination: &str,
        after_ms: i64,
    ) -> Result<Option<i64>, StoreError> {
        let destination = destination.to_string();
        self.read(move |conn| {
            conn.prepare_cached(
                "SELECT MIN(next_attempt_at) FROM deliveries
                 WHERE destination = ?1 AND state = 'pending' AND next_attempt_at > ?2",
            )?
            .query_row(params![destination, after_ms], |r| r.get(0))
        })
        .await
    }

    async fn record(&self, delivery: &Delivery, outcome: Outcome) -> Result<(), StoreError> {
        let (reply, rx) = oneshot::channel();
        let record = Command::Record {
            delivery_id: delivery.id,
            outcome,
            reply,
        };
        match self.outcomes.add(record) {
            Added::Watched => {}
            // A full queue holds inserts, whose commit takes the outcomes along.
            Added::Nudge => match self.writer.try_send(Command::Nudge) {
                Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => {}
                Err(mpsc::error::TrySendError::Closed(_)) => return Err(StoreError::Closed),
            },
            Added::Closed => return Err(StoreError::Closed),
        }
        rx.await.map_err(|_| StoreError::Closed)?
    }

    async fn dead_letters(
        &self,
        destination: Option<&str>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        let destination = destination.map(str::to_string);
        self.read_slow(move |conn| {
            let sql = format!(
                "SELECT {DEAD_LETTER_COLUMNS} FROM deliveries d JOIN events e ON e.id = d.event_id
                 WHERE d.state = 'dead' AND (?1 IS NULL OR d.destination = ?1)
                 ORDER BY d.updated_at DESC, d.id DESC LIMIT ?2"
            );
            let mut stmt = conn.prepare(&sql)?;
            let rows = stmt.query_map(params![destination, limit as i64], dead_letter_row)?;
            rows.collect()
        })
        .await
    }

    async fn dead_letter(&self, id: i64) -> Result<Option<(DeadLetter, Bytes)>, StoreError> {
        self.read_slow(move |conn| {
            let sql = format!(
                "SELECT {DEAD_LETTER_COLUMNS}, e.payload FROM deliveries d
                 JOIN events e ON e.id = d.event_id WHERE d.state = 'dead' AND d.id = ?1"
            );
            conn.query_row(&sql, params![id], |row| {
                Ok((dead_letter_row(row)?, Bytes::from(row.get::<_, String>(7)?)))
            })
            .optional()
        })
        .await
    }

    async fn request_replay(&self, selection: &Selection, batch: &str) -> Result<u64, StoreError> {
        let (filter, mut values) = selection_sql(selection);
        values.insert(0, rusqlite::types::Value::Text(batch.to_string()));
        self.admin(move |tx| {
            let now = now_ms();
            // A request already decided but not yet collected is asked again; one still
            // undecided stays with the batch that asked first.
            let sql = format!(
                "INSERT INTO replay_requests (delivery_id, batch, requested_at)
                 SELECT id, ?, {now} FROM deliveries WHERE {filter} AND true
                 ON CONFLICT (delivery_id) DO UPDATE SET batch = excluded.batch,
                     requested_at = excluded.requested_at, outcome = NULL,
                     destination = NULL, decided_at = NULL
                 WHERE replay_requests.outcome IS NOT NULL"
            );
            tx.execute(&sql, rusqlite::params_from_iter(values))
                .map(|n| n as u64)
        })
        .await
    }

    async fn replay_verdict(&self, batch: &str) -> Result<ReplayVerdict, StoreError> {
        let batch = batch.to_string();
        self.read_slow(move |conn| {
            let mut verdict = ReplayVerdict::default();
            let mut q = conn.prepare(
                "SELECT outcome, coalesce(destination, ''), count(*) FROM replay_requests
                 WHERE batch = ?1 GROUP BY 1, 2 ORDER BY 2",
            )?;
            let rows = q.query_map([&batch], |r| {
                Ok((
                    r.get::<_, Option<String>>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)? as u64,
                ))
            })?;
            for row in rows {
                verdict.add(row?);
            }
            Ok(verdict)
        })
        .await
    }

    async fn forget_replay(&self, batch: &str) -> Result<(), StoreError> {
        let batch = batch.to_string();
        self.admin(move |tx| {
            tx.execute(
                "DELETE FROM replay_requests WHERE batch = ?1 AND outcome IS NOT NULL",
                [&batch],
            )
            .map(|n| n as u64)
        })
        .await
        .map(|_| ())
    }

    async fn decide_replays(&self, running: &[&str]) -> Result<ReplayDecisions, StoreError> {
        // Polled every poll interval: look on the read connection first, so an idle
        // relay never queues a (synced) write for it.
        let any = self
            .read(|conn| {
                conn.query_row(
                    "SELECT EXISTS (SELECT 1 FROM replay_requests WHERE outcome IS NULL)",
                    [],
                    |r| r.get::<_, bool>(0),
                )
            })
            .await?;
        if !any {
            return Ok(ReplayDecisions::default());
        }
        let running: Vec<rusqlite::types::Value> = running
            .iter()
            .map(|k| rusqlite::types::Value::Text(k.to_string()))
            .collect();
        let decided = Arc::new(Mutex::new(ReplayDecisions::default()));
        let found = Arc::clone(&decided);
        self.admin(move |tx| {
            *found.lock().unwrap_or_else(|p| p.into_inner()) =
                decide_replays_in(tx, &running, now_ms())?;
            Ok(0)
        })
        .await?;
        let decided = std::mem::take(&mut *decided.lock().unwrap_or_else(|p| p.into_inner()));
        // Pending again without a fresh insert: those dispatchers read the store.
        if let Some(fresh) = &self.fresh {
            for (destination, _) in &decided.replayed {
                fresh.untrack(destination);
            }
        }
        Ok(decided)
    }

    async fn purge(&self, selection: &Selection) -> Result<u64, StoreError> {
        let (filter, values) = selection_sql(selection);
        self.admin(move |tx| {
            tx.execute(
                &format!("DELETE FROM deliveries WHERE {filter}"),
                rusqlite::params_from_iter(values),
            )
            .map(|n| n as u64)
        })
        .await
    }

    async fn dead_letter_orphans(&self, known: &[&str]) -> Result<Vec<(String, u64)>, StoreError> {
        let known: Vec<rusqlite::types::Value> = known
            .iter()
            .map(|k| rusqlite::types::Value::Text(k.to_string()))
            .collect();
        // The counts are read in the same transaction as the update, so they are exact.
        let counts = Arc::new(Mutex::new(Vec::new()));
        let found = Arc::clone(&counts);
        self.admin(move |tx| {
            let marks = vec!["?"; known.len()].join(", ");
            let not_in = if known.is_empty() {
                String::new()
            } else {
                format!("AND destination NOT IN ({marks})")
            };
            let per_destination = tx
                .prepare(&format!(
                    "SELECT destination, count(*) FROM deliveries
                     WHERE state = 'pending' {not_in} GROUP BY destination"
                ))?
                .query_map(rusqlite::params_from_iter(&known), |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let now = now_ms();
            let reason = [ORPHANED.0, ORPHANED.1].map(|t| rusqlite::types::Value::Text(t.into()));
            let n = tx.execute(
                &format!(
                    "UPDATE deliveries SET state = 'dead', updated_at = {now},
                     last_error = ? || destination || ?
                     WHERE state = 'pending' {not_in}"
                ),
                rusqlite::params_from_iter(reason.iter().chain(&known)),
            )?;
            *found.lock().unwrap_or_else(|p| p.into_inner()) = per_destination;
            Ok(n as u64)
        })
        .await?;
        let swept = std::mem::take(&mut *counts.lock().unwrap_or_else(|p| p.into_inner()));
        // Their queued deliveries are dead letters now: never hand them over.
        if let Some(fresh) = &self.fresh {
            for (destination, _) in &swept {
                fresh.untrack(destination);
            }
        }
        Ok(swept)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.admin(|tx| {
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('heartbeat', ?1)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                params![now_ms().to_string()],
            )
            .map(|n| n as u64)
        })
        .await
        .map(|_| ())
    }

    async fn destination_stats(&self) -> Result<Vec<DestinationStats>, StoreError> {
        self.read_slow(|conn| {
            let mut by_name: std::collections::BTreeMap<String, DestinationStats> =
                std::collections::BTreeMap::new();
            // Both scans ride the partial indexes; the oldest pending delivery is the one
            // with the smallest id, whose event is then looked up once.
            let mut pending = conn.prepare_cached(
                "SELECT destination, COUNT(*), MIN(id) FROM deliveries
                 WHERE state = 'pending' GROUP BY destination",
            )?;
            let rows = pending.query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
            })?;
            let mut oldest_ids = Vec::new();
            for row in rows {
                let (name, count, oldest) = row?;
                oldest_ids.push((name.clone(), oldest));
                by_name.entry(name.clone()).or_insert_with(|| DestinationStats {
                    destination: name,
                    ..Default::default()
                }).pending = count as u64;
            }
            let mut received = conn.prepare_cached(
                "SELECT e.received_at FROM deliveries d JOIN events e ON e.id = d.event_id
                 WHERE d.id = ?1",
            )?;
            for (name, id) in oldest_ids {
                let at: Option<i64> = received.query_row(params![id], |r| r.get(0)).optional()?;
                if let Some(s) = by_name.get_mut(&name) {
                    s.oldest_pending_ms = at;
                }
            }
            let mut dead = conn.prepare_cached(
                "SELECT destination, COUNT(*) FROM deliveries WHERE state = 'dead' GROUP BY destination",
            )?;
            let rows = dead.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
            for row in rows {
                let (name, count) = row?;
                by_name.entry(name.clone()).or_insert_with(|| DestinationStats {
                    destination: name,
                    ..Default::default()
                }).dead = count as u64;
            }
            Ok(by_name.into_values().collect())
        })
        .await
    }

    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn prune(&self, cutoff_ms: i64) -> Result<u64, StoreError> {
        // In chunks, each its own short write, so accepts keep flowing between them (a
        // week of history in one transaction would hold the writer for seconds).
        let mut total = 0;
        loop {
            let n = self
                .admin(move |tx| {
                    let deliveries = tx.execute(
                        "DELETE FROM deliveries WHERE id IN (
                             SELECT id FROM deliveries WHERE state = 'done' AND updated_at < ?1
                             LIMIT ?2)",
                        params![cutoff_ms, PRUNE_CHUNK],
                    )?;
                    let events = tx.execute(
                        "DELETE FROM events WHERE id IN (
                             SELECT id FROM events WHERE received_at < ?1
                             AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_id = events.id)
                             LIMIT ?2)",
                        params![cutoff_ms, PRUNE_CHUNK],
                    )?;
                    Ok((deliveries + events) as u64)
                })
                .await?;
            total += n;
            if n == 0 {
                return Ok(total);
            }
        }
    }
}

/// Decides every undecided replay request in one transaction: requests for rows no
/// longer dead are `gone`; those of a destination in `running` move their row back to
/// pending (`replayed`); the rest are `refused`, the reason written on the dead letter.
/// Old decisions are forgotten after [`REPLAY_RECORD_TTL`].
fn decide_replays_in(
    tx: &Transaction<'_>,
    running: &[rusqlite::types::Value],
    now: i64,
) -> rusqlite::Result<ReplayDecisions> {
    let undecided = "SELECT delivery_id FROM replay_requests WHERE outcome IS NULL";
    // Requests for rows that are no longer dead letters (purged, or replayed by
    // a request of another batch) have nothing to decide.
    tx.execute(
        &format!(
            "UPDATE replay_requests SET outcome = 'gone', decided_at = {now}
             WHERE outcome IS NULL AND NOT EXISTS (SELECT 1 FROM deliveries d
                 WHERE d.id = replay_requests.delivery_id AND d.state = 'dead')"
        ),
        [],
    )?;
    tx.execute(
        "UPDATE replay_requests SET destination = (SELECT d.destination
             FROM deliveries d WHERE d.id = replay_requests.delivery_id)
         WHERE outcome IS NULL",
        [],
    )?;
    let marks = vec!["?"; running.len()].join(", ");
    let known = format!("destination IN ({marks})");
    let counts = |tx: &Transaction<'_>, filter: &str, params: &[rusqlite::types::Value]| {
        tx.prepare(&format!(
            "SELECT destination, count(*) FROM replay_requests
             WHERE outcome IS NULL AND {filter} GROUP BY destination"
        ))?
        .query_map(rusqlite::params_from_iter(params), |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()
    };
    let replayed = counts(tx, &known, running)?;
    tx.execute(
        &format!(
            "UPDATE deliveries SET state = 'pending', attempts = 0,
             next_attempt_at = {now}, updated_at = {now}
             WHERE state = 'dead' AND {known} AND id IN ({undecided})"
        ),
        rusqlite::params_from_iter(running),
    )?;
    tx.execute(
        &format!(
            "UPDATE replay_requests SET outcome = 'replayed', decided_at = {now}
             WHERE outcome IS NULL AND {known}"
        ),
        rusqlite::params_from_iter(running),
    )?;
    let refused = counts(tx, "true", &[])?;
    tx.execute(
        &format!(
            "UPDATE deliveries SET last_error = ?1 || destination || ?2,
             updated_at = {now} WHERE state = 'dead' AND id IN ({undecided})"
        ),
        params![REPLAY_REFUSED.0, REPLAY_REFUSED.1],
    )?;
    tx.execute(
        &format!(
            "UPDATE replay_requests SET outcome = 'refused', decided_at = {now}
             WHERE outcome IS NULL"
        ),
        [],
    )?;
    let forgotten = now - REPLAY_RECORD_TTL.as_millis() as i64;
    tx.execute(
        "DELETE FROM replay_requests WHERE outcome IS NOT NULL AND decided_at < ?1",
        [forgotten],
    )?;
    Ok(ReplayDecisions { replayed, refused })
}
