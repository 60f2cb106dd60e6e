//! The [`Store`](faceio_relay::store::Store) contract, written once (`rules.rs`) and run
//! against both backends (`backends.rs`): SQLite in a temporary directory, PostgreSQL in a
//! scratch database on the server on 127.0.0.1:5432 (`.ci/run` starts it). Each rule runs
//! on a fresh store, as `sqlite::<rule>` and `postgres::<rule>`.
//!
//! Where the backends differ by design, the rule says so through what the backend
//! declares ([`Backend::CLOCK_SLACK_MS`], [`Backend::second`]) or what the store reports
//! (claim tokens, [`Store::shared`](faceio_relay::store::Store::shared)), never by naming
//! the backend. What only one backend has (advisory locks, LISTEN/NOTIFY, migrations,
//! group commit, the daemon lock) is tested in `tests/postgres/` and in the SQLite
//! store's unit tests.

#[path = "../common/mod.rs"]
mod common;

mod backends;
mod rules;

pub(crate) use backends::Backend;

/// One `#[tokio::test]` per rule and backend.
macro_rules! contract {
    ($($rule:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $rule() {
                    crate::rules::$rule::<crate::backends::Sqlite>().await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $rule() {
                    crate::rules::$rule::<crate::backends::Postgres>().await;
                }
            )*
        }
    };
}

contract!(
    an_inserted_event_is_due_for_each_destination,
    outcomes_move_a_delivery_through_retry_and_done,
    dead_letters_are_listed_shown_replayed_and_purged,
    a_replay_of_a_destination_no_relay_runs_is_refused,
    an_outcome_applies_only_to_the_claim_it_names,
    deliveries_of_a_removed_destination_become_dead_letters,
    prune_deletes_done_deliveries_and_fully_delivered_events,
    claims_come_oldest_due_first,
    a_claim_passes_over_what_this_process_has_in_flight,
    no_two_processes_claim_the_same_delivery,
    a_lease_that_runs_out_frees_the_delivery,
);
