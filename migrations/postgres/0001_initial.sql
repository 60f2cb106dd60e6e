-- faceio-relay's PostgreSQL schema, version 1. Shipped inside the binary and applied on
-- start under sqlx's migration lock (pg_advisory_lock), so relays starting together apply
-- it once. Times are Unix milliseconds, like the SQLite store's.

-- One row per accepted webhook; `payload` is the body exactly as FACEIO sent it.
CREATE TABLE events (
    id          TEXT PRIMARY KEY,
    received_at BIGINT NOT NULL,
    app_id      TEXT NOT NULL,
    event_name  TEXT NOT NULL,
    facial_id   TEXT NOT NULL,
    client_ip   TEXT NOT NULL,
    payload     TEXT NOT NULL
);

-- One row per (event, destination). `claimed_by` is the relay process that claimed the row
-- for an attempt and `lease_until` (database clock) when that claim runs out; both are
-- NULL when nobody holds it.
CREATE TABLE deliveries (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id        TEXT NOT NULL,
    destination     TEXT NOT NULL,
    state           TEXT NOT NULL CHECK (state IN ('pending', 'done', 'dead')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    last_error      TEXT,
    updated_at      BIGINT NOT NULL,
    claimed_by      TEXT,
    lease_until     BIGINT
);

CREATE INDEX deliveries_due ON deliveries (destination, next_attempt_at) WHERE state = 'pending';
CREATE INDEX deliveries_dead ON deliveries (updated_at) WHERE state = 'dead';
CREATE INDEX deliveries_event ON deliveries (event_id);
CREATE INDEX deliveries_done ON deliveries (updated_at) WHERE state = 'done';
CREATE INDEX events_received ON events (received_at);

CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

-- The database's clock in Unix ms: leases are compared on one clock, whatever the relays'
-- clocks say.
CREATE FUNCTION faceio_relay_now_ms() RETURNS BIGINT
    LANGUAGE sql VOLATILE
    AS $$ SELECT (extract(epoch FROM clock_timestamp()) * 1000)::BIGINT $$;

-- The advisory-lock key of a destination: the relay holding this session lock is the one
-- that dispatches the destination.
CREATE FUNCTION faceio_relay_destination_key(destination TEXT) RETURNS BIGINT
    LANGUAGE sql IMMUTABLE
    AS $$ SELECT hashtext('faceio-relay:dest:' || destination)::BIGINT $$;
