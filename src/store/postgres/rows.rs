//! Reading rows into the store's types, and the dead-letter selection filter.

use bytes::Bytes;
use sqlx::postgres::PgRow;
use sqlx::{AssertSqlSafe, Row};

use crate::store::shared::{dead_letter, selection_filter};
use crate::store::{DeadLetter, Delivery, Selection};

pub(super) fn dead_letter_row(row: &PgRow) -> Result<DeadLetter, sqlx::Error> {
    Ok(dead_letter((
        row.try_get(0)?,
        row.try_get(1)?,
        row.try_get(2)?,
        row.try_get::<i32, _>(3)?.into(),
        row.try_get(4)?,
        row.try_get(5)?,
        row.try_get(6)?,
    )))
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
    let bind: Option<Result<String, Vec<i64>>> = match selection {
        Selection::All => None,
        Selection::Destination(d) => Some(Ok(d.clone())),
        Selection::Ids(ids) => Some(Err(ids.clone())),
    };
    let filter = selection_filter(selection, "$1", "= ANY($1)");
    let q = sqlx::query(AssertSqlSafe(sql.replace("{filter}", &filter)));
    match bind {
        None => q,
        Some(Ok(d)) => q.bind(d),
        Some(Err(ids)) => q.bind(ids),
    }
}
