//! Reading rows into the store's types, and the dead-letter selection filter.

use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use sqlx::postgres::PgRow;
use sqlx::{AssertSqlSafe, Row};

use crate::store::{DeadLetter, Delivery, Selection};

fn rfc3339(ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_millis(t).to_string()
}

pub(super) const DEAD_LETTER_COLUMNS: &str =
    "d.id, d.event_id, d.destination, d.attempts, d.last_error, d.updated_at, e.event_name";

pub(super) fn dead_letter_row(row: &PgRow) -> Result<DeadLetter, sqlx::Error> {
    Ok(DeadLetter {
        id: row.try_get(0)?,
        event_id: row.try_get(1)?,
        destination: row.try_get(2)?,
        attempts: row.try_get::<i32, _>(3)?.max(0) as u32,
        last_error: row.try_get::<Option<String>, _>(4)?.unwrap_or_default(),
        failed_at: rfc3339(row.try_get(5)?),
        event_name: row.try_get(6)?,
    })
}

/// A delivery from `id, event_id, attempts, received_at, payload[, claim_seq]`.
pub(super) fn delivery_row(row: &PgRow, destination: &str) -> Result<Delivery, sqlx::Error> {
    Ok(Delivery {
        id: row.try_get(0)?,
        event_id: row.try_get(1)?,
        destination: destination.to_string(),
        attempts: row.try_get::<i32, _>(2)?.max(0) as u32,
        received_at_ms: row.try_get(3)?,
        body: Bytes::from(row.try_get::<String, _>(4)?),
        claim: if row.len() > 5 {
            Some(row.try_get(5)?)
        } else {
            None
        },
    })
}

/// A query over the dead letters a [`Selection`] names; `{filter}` in `sql` is replaced
/// by the condition, whose only parameter is `$1`.
pub(super) fn selection_query(
    sql: &str,
    selection: &Selection,
) -> sqlx::query::Query<'static, sqlx::Postgres, sqlx::postgres::PgArguments> {
    let (filter, bind): (&str, Option<Result<String, Vec<i64>>>) = match selection {
        Selection::All => ("state = 'dead'", None),
        Selection::Destination(d) => ("state = 'dead' AND destination = $1", Some(Ok(d.clone()))),
        Selection::Ids(ids) => ("state = 'dead' AND id = ANY($1)", Some(Err(ids.clone()))),
    };
    let q = sqlx::query(AssertSqlSafe(sql.replace("{filter}", filter)));
    match bind {
        None => q,
        Some(Ok(d)) => q.bind(d),
        Some(Err(ids)) => q.bind(ids),
    }
}
