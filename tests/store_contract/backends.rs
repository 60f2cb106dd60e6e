//! The two backends the contract runs on, and what each declares about itself.

use std::path::PathBuf;

use faceio_relay::config::{PostgresConfig, Secret};
use faceio_relay::store::postgres::PostgresStore;
use faceio_relay::store::sqlite::SqliteStore;
use faceio_relay::store::{Store, StoreError};

use crate::common::pg::TestDb;

/// A backend under test: how to get a fresh store, and what the contract may expect of it.
pub(crate) trait Backend: Sized {
    type Store: Store;

    /// How far a time the store hands back (`next_due_after`) may be from the one recorded,
    /// and how far its own timestamps (`updated_at`) may run ahead of this process's
    /// clock. SQLite keeps the caller's times exactly; PostgreSQL compares every time on
    /// the database's clock and re-expresses the answer on the caller's, off by the round
    /// trips (and it rounds to the nearest ms where this process truncates).
    const CLOCK_SLACK_MS: i64;

    /// A fresh, empty store, and what keeps it alive (a temporary directory, a scratch
    /// database).
    async fn open() -> (Self, Self::Store);

    /// The same store opened for a second relay process: a shared backend's second store,
    /// or the error with which a backend used by one daemon refuses it.
    async fn second(&self) -> Result<Self::Store, StoreError>;

    /// Deliveries in `state`, counted in the tables rather than through the store.
    async fn count(&self, state: &str) -> i64;
}

/// The embedded store, in a temporary directory.
pub(crate) struct Sqlite {
    dir: tempfile::TempDir,
}

impl Sqlite {
    fn path(&self) -> PathBuf {
        self.dir.path().join("db/relay.db")
    }
}

impl Backend for Sqlite {
    type Store = SqliteStore;
    const CLOCK_SLACK_MS: i64 = 0;

    async fn open() -> (Self, SqliteStore) {
        let backend = Sqlite {
            dir: tempfile::tempdir().unwrap(),
        };
        let store = SqliteStore::open(&backend.path()).unwrap();
        (backend, store)
    }

    async fn second(&self) -> Result<SqliteStore, StoreError> {
        SqliteStore::open(&self.path())
    }

    async fn count(&self, state: &str) -> i64 {
        rusqlite::Connection::open(self.path())
            .unwrap()
            .query_row(
                "SELECT COUNT(*) FROM deliveries WHERE state = ?1",
                [state],
                |r| r.get(0),
            )
            .unwrap()
    }
}

/// The shared store, in a scratch database dropped at the end.
pub(crate) struct Postgres {
    db: TestDb,
}

impl Postgres {
    fn config(&self) -> PostgresConfig {
        PostgresConfig {
            url: Secret::new(self.db.url.clone()),
            pool_size: 4,
        }
    }
}

impl Backend for Postgres {
    type Store = PostgresStore;
    const CLOCK_SLACK_MS: i64 = 1000;

    async fn open() -> (Self, PostgresStore) {
        let backend = Postgres {
            db: TestDb::create().await,
        };
        let store = PostgresStore::open(&backend.config()).await.unwrap();
        (backend, store)
    }

    async fn second(&self) -> Result<PostgresStore, StoreError> {
        PostgresStore::open(&self.config()).await
    }

    async fn count(&self, state: &str) -> i64 {
        self.db.count(state).await
    }
}
