//! The schema migrations, shipped in the binary, and applying them on start.

use std::borrow::Cow;

use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::postgres::PgPool;

use super::conn::{CONNECT_TIMEOUT, open_err};
use crate::store::StoreError;

/// The schema migrations, shipped in the binary. Additive only (see
/// `migrations/postgres/0002_*.sql`): relays of older versions run on the newer schema.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "initial",
        include_str!("../../../migrations/postgres/0001_initial.sql"),
    ),
    (
        2,
        "claim tokens and announcements",
        include_str!("../../../migrations/postgres/0002_claim_tokens_and_announcements.sql"),
    ),
    (
        3,
        "replay requests",
        include_str!("../../../migrations/postgres/0003_replay_requests.sql"),
    ),
];

/// Where sqlx records applied migrations (named after us, not `_sqlx_migrations`).
const MIGRATIONS_TABLE: &str = "faceio_relay_migrations";

/// Applies the migrations under sqlx's migration lock.
pub(super) async fn apply(pool: &PgPool) -> Result<(), StoreError> {
    let mut migrator = Migrator::with_migrations(
        MIGRATIONS
            .iter()
            .map(|&(version, name, sql)| {
                Migration::new(
                    version,
                    Cow::Borrowed(name),
                    MigrationType::Simple,
                    sqlx::SqlStr::from_static(sql),
                    false,
                )
            })
            .collect(),
    );
    migrator.dangerous_set_table_name(MIGRATIONS_TABLE);
    // A newer relay may have applied versions this one does not know. They only add
    // (see the migrations), so this one works on them: leave them alone.
    migrator.set_ignore_missing(true);
    tokio::time::timeout(CONNECT_TIMEOUT * 6, migrator.run(pool))
        .await
        .map_err(|_| open_err("the schema migration did not finish in time"))?
        .map_err(open_err)?;
    Ok(())
}
