//! The PostgreSQL store against the real server on 127.0.0.1:5432 (`.ci/run` starts it),
//! beyond the `Store` contract that `tests/store_contract/` checks on both backends:
//! grouped writes, claims between processes, announcements, ownership, wake-ups, and
//! several relays on one database (in-process, and as binaries for kill -9). Every test
//! makes its own database and drops it.

#[path = "../common/mod.rs"]
mod common;

mod announcements;
mod claims;
mod handed;
mod operations;
mod ownership;
mod relays;
mod wakes;
mod writes;

use faceio_relay::config::{PostgresConfig, Secret};

use common::pg::TestDb;

fn pg_config(db: &TestDb) -> PostgresConfig {
    PostgresConfig {
        url: Secret::new(db.url.clone()),
        pool_size: 4,
    }
}
