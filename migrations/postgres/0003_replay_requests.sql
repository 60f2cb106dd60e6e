-- faceio-relay's PostgreSQL schema, version 3 (additive, like every migration).
--
-- Dead letters `dead-letters replay` asked to send again. The command only records the
-- request; a running relay decides it by the destinations the relays actually run (its
-- own dispatchers, and the other relays' live announcements in `relay_destinations`):
-- `replayed` (the delivery is pending again) or `refused` (still a dead letter, with the
-- reason in `last_error`); `gone` when it was no longer a dead letter. The command reads
-- the outcome of its `batch` and deletes it; relays delete uncollected ones after an
-- hour. Relays of older versions ignore the table (a command then reports that no relay
-- decided).
CREATE TABLE replay_requests (
    delivery_id  BIGINT PRIMARY KEY,
    batch        TEXT NOT NULL,
    requested_at BIGINT NOT NULL,
    outcome      TEXT CHECK (outcome IN ('replayed', 'refused', 'gone')),
    destination  TEXT,
    decided_at   BIGINT
);
CREATE INDEX replay_requests_batch ON replay_requests (batch);
CREATE INDEX replay_requests_undecided ON replay_requests (delivery_id) WHERE outcome IS NULL;
