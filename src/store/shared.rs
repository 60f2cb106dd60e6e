//! What both backends share besides the [`Store`](super::Store) contract itself: the
//! shape of a dead-letter row, the condition a [`Selection`] stands for, how prune
//! chunks its deletes, how times are shown, and the reason an orphan is dead-lettered.
//! Written once here so the two backends cannot drift apart; each keeps only its own
//! SQL dialect and driver types.

use std::time::{Duration, UNIX_EPOCH};

use super::{DeadLetter, Selection};

/// Rows deleted per prune chunk (one short write each, so other writes keep flowing).
pub(crate) const PRUNE_CHUNK: i64 = 5000;

/// The columns of a dead-letter listing, in the order [`dead_letter`] takes them
/// (`d` is `deliveries`, `e` its event).
pub(crate) const DEAD_LETTER_COLUMNS: &str =
    "d.id, d.event_id, d.destination, d.attempts, d.last_error, d.updated_at, e.event_name";

/// The text around the destination's name in an orphan's `last_error`, kept in two parts
/// (bound as parameters) so the stores can build it in SQL for many rows at once.
pub const ORPHANED: (&str, &str) = ("destination ", " is no longer in the config");

/// The `last_error` of a pending delivery dead-lettered because its destination is no
/// longer configured.
pub fn orphaned_reason(destination: &str) -> String {
    format!("{}{destination}{}", ORPHANED.0, ORPHANED.1)
}

/// Unix ms as RFC 3339 with milliseconds (UTC), as dead letters show their times.
pub(crate) fn rfc3339(ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_millis(t).to_string()
}

/// A dead letter from the values of [`DEAD_LETTER_COLUMNS`], as either driver reads them.
pub(crate) fn dead_letter(
    (id, event_id, destination, attempts, last_error, updated_at, event_name): (
        i64,
        String,
        String,
        i64,
        Option<String>,
        i64,
        String,
    ),
) -> DeadLetter {
    DeadLetter {
        id,
        event_id,
        destination,
        attempts: u32::try_from(attempts.max(0)).unwrap_or(u32::MAX),
        last_error: last_error.unwrap_or_default(),
        failed_at: rfc3339(updated_at),
        event_name,
    }
}

/// The condition on `deliveries` that keeps the dead letters `selection` names. The
/// selection's one parameter (a destination, or the list of IDs) is written the
/// backend's way: `param` for a destination (`?`, `$1`), `id_in` for the test of `id`
/// against the list (`IN (?, ?)`, `= ANY($1)`).
pub(crate) fn selection_filter(selection: &Selection, param: &str, id_in: &str) -> String {
    const DEAD: &str = "state = 'dead'";
    match selection {
        Selection::All => DEAD.to_string(),
        Selection::Destination(_) => format!("{DEAD} AND destination = {param}"),
        Selection::Ids(_) => format!("{DEAD} AND id {id_in}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_letter_times_are_rfc3339_in_utc_with_milliseconds() {
        assert_eq!(rfc3339(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(rfc3339(-5), "1970-01-01T00:00:00.000Z", "never panics");
    }
}
