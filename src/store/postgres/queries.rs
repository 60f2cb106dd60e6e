//! The [`Store`] implementation: the statements behind each operation.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use sqlx::{AssertSqlSafe, Row};
use tokio::sync::broadcast;
use tokio::time::Instant;

use super::PostgresStore;
use super::conn::{CONNECT_TIMEOUT, conn, unavailable};
use super::rows::{dead_letter_row, delivery_row, selection_query};
use super::wakes::{CHANNEL, WAKE_BUFFER, listen};
use super::writers::{PendingInsert, PendingOutcome, give_back, hand_over, millis};
use crate::event::VerifiedEvent;
use crate::event::now_ms;
use crate::store::shared::{DEAD_LETTER_COLUMNS, ORPHANED, PRUNE_CHUNK};
use crate::store::{
    ClaimRequest, DeadLetter, Delivery, DestinationStats, EventRow, Outcome, Ownership,
    REPLAY_RECORD_TTL, REPLAY_REFUSED, ReplayDecisions, ReplayVerdict, Selection, Store,
    StoreError, Wake,
};

/// Announcements (`relay_destinations`) this long expired belong to relays long gone and
/// are deleted.
const ANNOUNCEMENT_RETENTION: Duration = Duration::from_secs(86_400);

/// How far `at_ms` (the caller's clock) is from now on this process's clock: what the
/// statements add to the database's clock.
fn offset_from_now(at_ms: i64) -> i64 {
    at_ms - now_ms()
}

#[async_trait]
impl Store for PostgresStore {
    async fn insert_event(
        &self,
        event: &VerifiedEvent,
        destinations: &[&str],
    ) -> Result<(), StoreError> {
        let (done, written) = tokio::sync::oneshot::channel();
        let pending = PendingInsert {
            row: EventRow::new(event, destinations),
            done,
        };
        hand_over(&self.inserts, pending, written).await
    }

    async fn due(
        &self,
        destination: &str,
        now_ms: i64,
        limit: usize,
    ) -> Result<Vec<Delivery>, StoreError> {
        let mut c = self.conn().await?;
        let r = sqlx::query(
            "SELECT d.id, d.event_id, d.attempts, e.received_at, e.payload
             FROM deliveries d JOIN events e ON e.id = d.event_id
             WHERE d.destination = $1 AND d.state = 'pending'
               AND d.next_attempt_at <= (SELECT faceio_relay_now_ms()) + $2
             ORDER BY d.next_attempt_at -- the index's order: see `claim`
             LIMIT $3",
        )
        .bind(destination)
        .bind(offset_from_now(now_ms))
        .bind(limit as i64)
        .fetch_all(c.get())
        .await;
        let rows = c.finish(r)?;
        rows.iter()
            .map(|r| delivery_row(r, destination))
            .collect::<Result<_, _>>()
            .map_err(unavailable)
    }

    async fn claim(&self, request: ClaimRequest<'_>) -> Result<Vec<Delivery>, StoreError> {
        // Due on the database's clock. Rows under someone's live lease are not returned;
        // rows whose lease ran out are, if they are this process's or `take_over` says
        // another's may be taken; rows this process has under way never are (their lease
        // may have run out while they waited for the rate limit); rows another claim is
        // locking right now are skipped. Each claim gets a new `claim_seq`.
        // Before the read: from here on the hand-off (see `handed`) holds what commits here.
        self.handed
            .track(request.destination, request.lease, request.want);
        let mut c = self.conn().await?;
        let r = sqlx::query(
            "WITH picked AS (
                 SELECT id FROM deliveries
                 WHERE destination = $1 AND state = 'pending'
                   AND next_attempt_at <= (SELECT faceio_relay_now_ms()) + $2
                   AND (lease_until IS NULL
                        OR (lease_until < (SELECT faceio_relay_now_ms())
                            AND ($6 OR claimed_by = $4)))
                   AND id <> ALL($7)
                 -- Exactly the order of `deliveries_due` (destination, next_attempt_at):
                 -- the scan stops after `$3` rows. With `, id` added PostgreSQL read and
                 -- sorted every due row at each claim, which made a claim's cost grow
                 -- with the backlog (27,000 rows read per claim of 128 in the benchmark).
                 -- Equal times come in the index's order (roughly insertion order).
                 ORDER BY next_attempt_at
                 LIMIT $3
                 FOR UPDATE SKIP LOCKED
             ), claimed AS (
                 UPDATE deliveries d SET claimed_by = $4, lease_until = faceio_relay_now_ms() + $5,
                     claim_seq = d.claim_seq + 1
                 FROM picked WHERE d.id = picked.id
                 RETURNING d.id, d.event_id, d.attempts, d.next_attempt_at, d.claim_seq
             )
             SELECT c.id, c.event_id, c.attempts, e.received_at, e.payload, c.claim_seq
             FROM claimed c JOIN events e ON e.id = c.event_id
             ORDER BY c.next_attempt_at, c.id",
        )
        .bind(request.destination)
        .bind(offset_from_now(request.now_ms))
        .bind(request.want as i64)
        .bind(&self.instance)
        .bind(millis(request.lease))
        .bind(request.take_over)
        .bind(request.in_flight)
        .fetch_all(c.get())
        .await;
        let rows = c.finish(r)?;
        rows.iter()
            .map(|r| delivery_row(r, request.destination))
            .collect::<Result<_, _>>()
            .map_err(unavailable)
    }

    async fn renew(&self, delivery: &Delivery, lease: Duration) -> Result<bool, StoreError> {
        let Some(seq) = delivery.claim else {
            return Ok(false); // never claimed here
        };
        let mut c = self.conn().await?;
        let r = sqlx::query(
            "UPDATE deliveries SET lease_until = faceio_relay_now_ms() + $4
             WHERE id = $1 AND state = 'pending' AND claimed_by = $2 AND claim_seq = $3",
        )
        .bind(delivery.id)
        .bind(&self.instance)
        .bind(seq)
        .bind(millis(lease))
        .execute(c.get())
        .await;
        Ok(c.finish(r)?.rows_affected() == 1)
    }

    async fn unclaim(&self, deliveries: &[Delivery]) -> Result<(), StoreError> {
        // Due again without an insert: whichever dispatcher has the destination (another
        // of this relay's after a reload, or another relay's) reads the store.
        give_back(
            &self.pool,
            &self.instance,
            deliveries,
            &self.handed,
            &self.notices,
        )
        .await
    }

    fn hands_off(&self) -> bool {
        // Once this relay listens: another relay's insert is heard of (the listener
        // clears the hand-off's completeness before passing its notification on), and
        // while the listening connection is down `take_fresh` says "read the store".
        self.wakes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    fn take_fresh(&self, destination: &str, max: usize) -> Option<Vec<(Delivery, Instant)>> {
        self.handed.take(destination, max)
    }

    fn take_claimed(&self, destination: &str, max: usize) -> Vec<(Delivery, Instant)> {
        self.handed.take_claimed(destination, max)
    }

    async fn next_due_after(
        &self,
        destination: &str,
        after_ms: i64,
    ) -> Result<Option<i64>, StoreError> {
        // Asked and answered on the caller's clock, compared on the database's: the answer
        // is the database's "in how long", added to the caller's now.
        let now = now_ms();
        let mut c = self.conn().await?;
        let r = sqlx::query_scalar::<_, Option<i64>>(
            "SELECT MIN(next_attempt_at) - (SELECT faceio_relay_now_ms()) FROM deliveries
             WHERE destination = $1 AND state = 'pending'
               AND next_attempt_at > (SELECT faceio_relay_now_ms()) + $2",
        )
        .bind(destination)
        .bind(after_ms - now)
        .fetch_one(c.get())
        .await;
        Ok(c.finish(r)?.map(|in_ms| now + in_ms))
    }

    async fn record(&self, delivery: &Delivery, outcome: Outcome) -> Result<(), StoreError> {
        // Applies only while the row still carries this claim: a relay whose lease ran out
        // and whose row was claimed again (here or elsewhere) cannot overwrite that
        // claim's result, not even after it was recorded. `state = 'pending'` guards
        // against an operator's purge, as in SQLite. Written in groups, as events are.
        let Some(seq) = delivery.claim else {
            tracing::debug!(
                delivery = delivery.id,
                "outcome of an unclaimed delivery dropped"
            );
            return Ok(());
        };
        let (state, attempts, delay_ms, error) = match outcome {
            Outcome::Done { attempts } => ("done", attempts, 0, None),
            // The retry's delay is added by the database, to its own clock.
            Outcome::Retry {
                attempts,
                next_attempt_at_ms,
                error,
            } => (
                "pending",
                attempts,
                offset_from_now(next_attempt_at_ms),
                Some(error),
            ),
            Outcome::Dead { attempts, error } => ("dead", attempts, 0, Some(error)),
        };
        let (done, recorded) = tokio::sync::oneshot::channel();
        let pending = PendingOutcome {
            id: delivery.id,
            seq,
            state,
            attempts: attempts as i32,
            delay_ms,
            error,
            done,
        };
        hand_over(&self.outcomes, pending, recorded).await
    }

    async fn dead_letters(
        &self,
        destination: Option<&str>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        let mut c = self.conn().await?;
        let r = sqlx::query(AssertSqlSafe(format!(
            "SELECT {DEAD_LETTER_COLUMNS} FROM deliveries d JOIN events e ON e.id = d.event_id
             WHERE d.state = 'dead' AND ($1::text IS NULL OR d.destination = $1)
             ORDER BY d.updated_at DESC, d.id DESC LIMIT $2"
        )))
        .bind(destination)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(c.get())
        .await;
        let rows = c.finish(r)?;
        rows.iter()
            .map(dead_letter_row)
            .collect::<Result<_, _>>()
            .map_err(unavailable)
    }

    async fn dead_letter(&self, id: i64) -> Result<Option<(DeadLetter, Bytes)>, StoreError> {
        let mut c = self.conn().await?;
        let r = sqlx::query(AssertSqlSafe(format!(
            "SELECT {DEAD_LETTER_COLUMNS}, e.payload FROM deliveries d
             JOIN events e ON e.id = d.event_id WHERE d.state = 'dead' AND d.id = $1"
        )))
        .bind(id)
        .fetch_optional(c.get())
        .await;
        let row = c.finish(r)?;
        row.map(|r| {
            Ok::<_, sqlx::Error>((
                dead_letter_row(&r)?,
                Bytes::from(r.try_get::<String, _>(7)?),
            ))
        })
        .transpose()
        .map_err(unavailable)
    }

    async fn request_replay(&self, selection: &Selection, batch: &str) -> Result<u64, StoreError> {
        let mut c = self.conn().await?;
        let r = sqlx::query_scalar::<_, bool>("SELECT to_regclass('replay_requests') IS NOT NULL")
            .fetch_one(c.get())
            .await;
        if !c.finish(r)? {
            return Err(StoreError::Unavailable(
                "the relays on this database are older than this command: replay needs \
                 schema version 3, which a relay of this version applies when it starts"
                    .into(),
            ));
        }
        // The selection binds $1 when it has a parameter; the batch comes after it.
        let batch_param = if matches!(selection, Selection::All) {
            "$1"
        } else {
            "$2"
        };
        let sql = format!(
            "INSERT INTO replay_requests (delivery_id, batch, requested_at)
             SELECT id, {batch_param}, faceio_relay_now_ms() FROM deliveries WHERE {{filter}}
             ON CONFLICT (delivery_id) DO UPDATE SET batch = excluded.batch,
                 requested_at = excluded.requested_at, outcome = NULL,
                 destination = NULL, decided_at = NULL
             WHERE replay_requests.outcome IS NOT NULL"
        );
        let q = selection_query(&sql, selection).bind(batch.to_string());
        let mut c = self.conn().await?;
        let r = q.execute(c.get()).await;
        Ok(c.finish(r)?.rows_affected())
    }

    async fn replay_verdict(&self, batch: &str) -> Result<ReplayVerdict, StoreError> {
        let mut c = self.conn().await?;
        let r = sqlx::query(
            "SELECT outcome, coalesce(destination, ''), count(*) FROM replay_requests
             WHERE batch = $1 GROUP BY 1, 2 ORDER BY 2",
        )
        .bind(batch)
        .fetch_all(c.get())
        .await;
        let mut verdict = ReplayVerdict::default();
        for row in c.finish(r)? {
            verdict.add((
                row.get::<Option<String>, _>(0),
                row.get::<String, _>(1),
                row.get::<i64, _>(2) as u64,
            ));
        }
        Ok(verdict)
    }

    async fn forget_replay(&self, batch: &str) -> Result<(), StoreError> {
        let mut c = self.conn().await?;
        let r = sqlx::query("DELETE FROM replay_requests WHERE batch = $1 AND outcome IS NOT NULL")
            .bind(batch)
            .execute(c.get())
            .await;
        c.finish(r)?;
        Ok(())
    }

    async fn decide_replays(&self, running: &[&str]) -> Result<ReplayDecisions, StoreError> {
        // A destination is run when this relay's dispatchers run it or another relay's
        // announcement of it is live (this relay's own announcement may still name one a
        // reload just removed). Requests another relay is deciding now are skipped.
        let running: Vec<String> = running.iter().map(|k| k.to_string()).collect();
        let mut c = self.conn().await?;
        let r = sqlx::query(
            "WITH req AS (
                 SELECT r.delivery_id, d.destination, d.state FROM replay_requests r
                 LEFT JOIN deliveries d ON d.id = r.delivery_id
                 WHERE r.outcome IS NULL
                 FOR UPDATE OF r SKIP LOCKED
             ), verdict AS (
                 SELECT delivery_id, destination,
                     CASE WHEN state IS DISTINCT FROM 'dead' THEN 'gone'
                          WHEN destination = ANY($1) OR EXISTS (
                              SELECT 1 FROM relay_destinations a
                              WHERE a.destination = req.destination AND a.instance <> $2
                                AND a.alive_until > faceio_relay_now_ms()) THEN 'replayed'
                          ELSE 'refused' END AS outcome
                 FROM req
             ), replayed AS (
                 UPDATE deliveries d SET state = 'pending', attempts = 0,
                     next_attempt_at = faceio_relay_now_ms(), updated_at = faceio_relay_now_ms(),
                     claimed_by = NULL, lease_until = NULL
                 FROM verdict v
                 WHERE d.id = v.delivery_id AND v.outcome = 'replayed' AND d.state = 'dead'
                 RETURNING d.id
             ), refused AS (
                 UPDATE deliveries d SET last_error = $3 || d.destination || $4,
                     updated_at = faceio_relay_now_ms()
                 FROM verdict v
                 WHERE d.id = v.delivery_id AND v.outcome = 'refused' AND d.state = 'dead'
                 RETURNING d.id
             ), marked AS (
                 UPDATE replay_requests r SET outcome = v.outcome, destination = v.destination,
                     decided_at = faceio_relay_now_ms()
                 FROM verdict v WHERE r.delivery_id = v.delivery_id
             ), forgotten AS (
                 DELETE FROM replay_requests
                 WHERE outcome IS NOT NULL AND decided_at < faceio_relay_now_ms() - $5
             )
             SELECT outcome, destination, count(*) FROM verdict
             WHERE outcome <> 'gone' GROUP BY 1, 2 ORDER BY 2",
        )
        .bind(&running)
        .bind(&self.instance)
        .bind(REPLAY_REFUSED.0)
        .bind(REPLAY_REFUSED.1)
        .bind(millis(REPLAY_RECORD_TTL))
        .fetch_all(c.get())
        .await;
        let mut decided = ReplayDecisions::default();
        for row in c.finish(r)? {
            let group = (row.get::<String, _>(1), row.get::<i64, _>(2) as u64);
            if row.get::<String, _>(0) == "replayed" {
                decided.replayed.push(group);
            } else {
                decided.refused.push(group);
            }
        }
        if !decided.replayed.is_empty() {
            // Pending again without an insert: a dispatcher here reads the store.
            for (destination, _) in &decided.replayed {
                self.handed.untrack(destination);
            }
            // Wake the relays that own them (as a new delivery does); a failure costs a poll.
            let names: Vec<&str> = decided.replayed.iter().map(|(d, _)| d.as_str()).collect();
            let mut c = self.conn().await?;
            let r = sqlx::query("SELECT pg_notify($1, dest) FROM unnest($2::text[]) AS dest")
                .bind(CHANNEL)
                .bind(&names)
                .execute(c.get())
                .await;
            if let Err(e) = c.finish(r) {
                tracing::debug!(error = %e, "cannot notify the other relays of replayed deliveries");
            }
        }
        Ok(decided)
    }

    async fn purge(&self, selection: &Selection) -> Result<u64, StoreError> {
        let q = selection_query("DELETE FROM deliveries WHERE {filter}", selection);
        let mut c = self.conn().await?;
        let r = q.execute(c.get()).await;
        Ok(c.finish(r)?.rows_affected())
    }

    async fn dead_letter_orphans(&self, known: &[&str]) -> Result<Vec<(String, u64)>, StoreError> {
        // Another relay may run a config with a destination this one lacks (a rolling
        // config change): its deliveries are not orphans while a relay other than this
        // one has announced it and the announcement has not expired, or while some
        // session holds its advisory lock (a relay of version 1, which does not
        // announce). The destinations with pending deliveries are found by skipping
        // through the index, one probe per destination, so the sweep stays cheap with a
        // large backlog.
        let known: Vec<String> = known.iter().map(|k| k.to_string()).collect();
        let mut c = self.conn().await?;
        let r = sqlx::query(
            "WITH RECURSIVE pending AS (
                 (SELECT destination FROM deliveries WHERE state = 'pending'
                  ORDER BY destination LIMIT 1)
                 UNION ALL
                 SELECT (SELECT d.destination FROM deliveries d
                         WHERE d.state = 'pending' AND d.destination > p.destination
                         ORDER BY d.destination LIMIT 1)
                 FROM pending p WHERE p.destination IS NOT NULL
             ), owned AS (
                 SELECT (classid::bigint << 32) | objid::bigint AS key FROM pg_locks
                 WHERE locktype = 'advisory' AND objsubid = 1 AND granted
                   AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
             ), orphans AS (
                 SELECT p.destination FROM pending p
                 WHERE p.destination IS NOT NULL AND p.destination <> ALL($1)
                   AND NOT EXISTS (
                       SELECT 1 FROM relay_destinations r
                       WHERE r.destination = p.destination AND r.instance <> $2
                         AND r.alive_until > faceio_relay_now_ms())
                   AND faceio_relay_destination_key(p.destination) NOT IN (SELECT key FROM owned)
             ), moved AS (
                 UPDATE deliveries SET state = 'dead', updated_at = faceio_relay_now_ms(),
                     claimed_by = NULL, lease_until = NULL,
                     last_error = $3 || destination || $4
                 WHERE state = 'pending' AND destination IN (SELECT destination FROM orphans)
                 RETURNING destination
             )
             SELECT destination, count(*) FROM moved GROUP BY destination",
        )
        .bind(&known)
        .bind(&self.instance)
        .bind(ORPHANED.0)
        .bind(ORPHANED.1)
        .fetch_all(c.get())
        .await;
        Ok(c.finish(r)?
            .iter()
            .map(|row| (row.get::<String, _>(0), row.get::<i64, _>(1) as u64))
            .collect())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        // The admin connection is used rarely: after an outage it may be a dead one, which
        // fails one statement and is closed. One more try on a fresh connection tells a
        // dead connection from a dead server.
        match self.ping_once().await {
            Err(_) => self.ping_once().await,
            ok => ok,
        }
    }

    async fn destination_stats(&self) -> Result<Vec<DestinationStats>, StoreError> {
        // Both scans ride the partial indexes; the oldest pending delivery is the one with
        // the smallest id, whose event is then looked up once.
        let mut c = conn(&self.admin).await?;
        let r = sqlx::query(
            "WITH p AS (
                 SELECT destination, COUNT(*) AS n, MIN(id) AS oldest FROM deliveries
                 WHERE state = 'pending' GROUP BY destination
             ), d AS (
                 SELECT destination, COUNT(*) AS n FROM deliveries
                 WHERE state = 'dead' GROUP BY destination
             )
             SELECT COALESCE(p.destination, d.destination), COALESCE(p.n, 0), e.received_at,
                    COALESCE(d.n, 0)
             FROM p FULL JOIN d ON d.destination = p.destination
             LEFT JOIN deliveries od ON od.id = p.oldest
             LEFT JOIN events e ON e.id = od.event_id
             ORDER BY 1",
        )
        .fetch_all(c.get())
        .await;
        let rows = c.finish(r)?;
        rows.iter()
            .map(|r| {
                Ok(DestinationStats {
                    destination: r.try_get(0)?,
                    pending: r.try_get::<i64, _>(1)?.max(0) as u64,
                    oldest_pending_ms: r.try_get(2)?,
                    dead: r.try_get::<i64, _>(3)?.max(0) as u64,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(unavailable)
    }

    async fn prune(&self, cutoff_ms: i64) -> Result<u64, StoreError> {
        // In chunks, each its own short statement, so no transaction holds many row locks
        // or delays the other relays' writes for long.
        let mut total = 0;
        loop {
            let mut c = self.conn().await?;
            let r = sqlx::query(
                "DELETE FROM deliveries WHERE id IN (
                     SELECT id FROM deliveries WHERE state = 'done' AND updated_at < $1 LIMIT $2)",
            )
            .bind(cutoff_ms)
            .bind(PRUNE_CHUNK)
            .execute(c.get())
            .await;
            let deliveries = c.finish(r)?.rows_affected();
            let mut c = self.conn().await?;
            let r = sqlx::query(
                "DELETE FROM events WHERE id IN (
                     SELECT id FROM events WHERE received_at < $1
                     AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_id = events.id)
                     LIMIT $2)",
            )
            .bind(cutoff_ms)
            .bind(PRUNE_CHUNK)
            .execute(c.get())
            .await;
            let events = c.finish(r)?.rows_affected();
            total += deliveries + events;
            if deliveries + events == 0 {
                return Ok(total);
            }
        }
    }

    fn backend(&self) -> &'static str {
        "postgres"
    }

    fn shared(&self) -> bool {
        true
    }

    async fn announce(&self, destinations: &[&str], alive_for: Duration) -> Result<(), StoreError> {
        // This relay's rows are replaced (the destinations it no longer has go); rows of
        // relays gone long ago are deleted by whoever gets to them first.
        let destinations: Vec<String> = destinations.iter().map(|d| d.to_string()).collect();
        let mut c = self.conn().await?;
        let r = sqlx::query(
            "WITH gone AS (
                 DELETE FROM relay_destinations WHERE instance = $1 AND destination <> ALL($2)
             ), stale AS (
                 DELETE FROM relay_destinations WHERE (destination, instance) IN (
                     SELECT destination, instance FROM relay_destinations
                     WHERE instance <> $1 AND alive_until < faceio_relay_now_ms() - $4
                     FOR UPDATE SKIP LOCKED)
             )
             INSERT INTO relay_destinations (destination, instance, alive_until)
             SELECT DISTINCT dest, $1, faceio_relay_now_ms() + $3 FROM unnest($2::text[]) AS dest
             ON CONFLICT (destination, instance) DO UPDATE SET alive_until = excluded.alive_until",
        )
        .bind(&self.instance)
        .bind(&destinations)
        .bind(millis(alive_for))
        .bind(millis(ANNOUNCEMENT_RETENTION))
        .execute(c.get())
        .await;
        c.finish(r)?;
        Ok(())
    }

    async fn own(&self, destination: &str) -> Result<Option<Ownership>, StoreError> {
        let Some(ownership) = self.locks.try_own(destination).await? else {
            return Ok(None);
        };
        // While it lasts, deliveries inserted here are claimed and handed over (see
        // `handed`); when it ends, those not taken are given back and the destination's
        // next owner (here or at another relay) is told.
        let id = self.handed.own(destination);
        let handed = Arc::clone(&self.handed);
        let (pool, instance) = (self.pool.clone(), self.instance.clone());
        let notices = Arc::clone(&self.notices);
        let give_backs = self.give_backs.clone();
        let destination = destination.to_string();
        Ok(Some(ownership.on_release(move || {
            let waiting = handed.disown(&destination, id);
            if waiting.is_empty() {
                return;
            }
            let Ok(rt) = tokio::runtime::Handle::try_current() else {
                return; // the process is ending: the claims run out with their lease
            };
            give_backs.spawn_on(
                async move {
                    let given = give_back(&pool, &instance, &waiting, &handed, &notices).await;
                    if let Err(e) = given {
                        tracing::warn!(destination = %destination, error = %e,
                            "cannot give back deliveries claimed for this relay's dispatcher; they wait for their lease");
                    }
                },
                &rt,
            );
        })))
    }

    fn subscribe(&self) -> Option<broadcast::Receiver<Wake>> {
        let mut wakes = self.wakes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = wakes.as_ref() {
            return Some(tx.subscribe());
        }
        let (tx, rx) = broadcast::channel(WAKE_BUFFER);
        tokio::spawn(listen(
            self.options.clone(),
            Arc::clone(&self.handed),
            tx.clone(),
            self.stop.child_token(),
        ));
        *wakes = Some(tx);
        Some(rx)
    }

    async fn close(&self) {
        // Claims being given back (the dispatchers have stopped) go first, on the pool.
        self.give_backs.close();
        let _ = tokio::time::timeout(CONNECT_TIMEOUT, self.give_backs.wait()).await;
        self.stop.cancel();
        // Give the destinations back now rather than when the process exits.
        self.locks.give_back().await;
        let _ = tokio::time::timeout(CONNECT_TIMEOUT, self.pool.close()).await;
    }
}
