-- faceio-relay's PostgreSQL schema, version 2.
--
-- Migrations only ever add (tables, columns with a default, functions), never rename or
-- drop: a relay of an older version keeps working on a newer schema, and relays start
-- with sqlx's `ignore_missing`, so one that does not know a newer version still starts.
-- That is what lets relays be upgraded one at a time.

-- Bumped by every claim. `renew`, `unclaim` and `record` name the claim they act for, so
-- the late statement of a stale attempt (or of a dispatcher that stopped) never touches a
-- newer claim of the same row. Relays of version 1 do not bump it; their statements still
-- check `claimed_by`.
ALTER TABLE deliveries ADD COLUMN claim_seq BIGINT NOT NULL DEFAULT 0;

-- The destinations each running relay has configured (`instance` is the relay process's
-- ID, as in `deliveries.claimed_by`), announced periodically with an expiry on the
-- database's clock. The orphan sweep leaves a destination alone while another relay's
-- announcement of it has not expired.
CREATE TABLE relay_destinations (
    destination TEXT NOT NULL,
    instance    TEXT NOT NULL,
    alive_until BIGINT NOT NULL,
    PRIMARY KEY (destination, instance)
);
