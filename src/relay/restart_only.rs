//! What a reload cannot change and how long the old config's requests live on: the one
//! table of restart-only settings, and the horizon a sweep of removed destinations
//! waits past.

use std::time::Duration;

use tokio::time::Instant;

use crate::config::{Config, IngressConfig};

/// A setting that changes only on restart: a reload names it in a warning when the new
/// config differs, and keeps the running value so the config in force describes the
/// process.
pub(super) struct RestartOnly {
    /// How the warning names it.
    pub(super) name: &'static str,
    /// Whether `new` (first) asks for another value than `old` (second).
    pub(super) differs: fn(&Config, &Config) -> bool,
    /// Puts `old`'s (second) value back into `new` (first).
    pub(super) keep: fn(&mut Config, &Config),
}

/// One entry of [`RESTART_ONLY`]: the warning's name and the field's path in [`Config`].
macro_rules! restart_only {
    ($name:literal, $($field:ident).+) => {
        RestartOnly {
            name: $name,
            differs: |new, old| new.$($field).+ != old.$($field).+,
            // `Clone::clone` rather than `.clone()`: some fields are `Copy`.
            keep: |new, old| new.$($field).+ = Clone::clone(&old.$($field).+),
        }
    };
}

/// Every restart-only setting, in the order the reload warning lists them.
pub(super) const RESTART_ONLY: &[RestartOnly] = &[
    restart_only!("listen", listen),
    restart_only!("admin_listen", admin_listen),
    restart_only!("admin", admin),
    restart_only!("webhook_path", webhook_path),
    restart_only!("store.path", store.path),
    restart_only!("store.backend/url/pool_size", store.backend),
    restart_only!("store.retention", store.retention),
    restart_only!("ingress.max_connections", ingress.max_connections),
    restart_only!("ingress.header_timeout", ingress.header_timeout),
    restart_only!("log_format", log_format),
    restart_only!("tls", tls),
];

/// How long requests admitted before a reload can still be storing events: each one
/// has at most its config's `body_timeout` and `store_timeout` once its handler starts
/// (it reads the routes then). A sweep of removed destinations waits past this, or a
/// request under the old routes could store a delivery for a removed destination after
/// the sweep, with no dispatcher to take it (until the next start sweeps it).
#[derive(Debug, Default)]
pub(super) struct RequestHorizon {
    /// The latest moment a request admitted under a replaced config may still store
    /// (with [`SWEEP_MARGIN`]).
    until: Option<Instant>,
}

/// Slack added to a request's limits (before a sweep, and to ingress's drain at
/// shutdown): scheduling, the answer's write.
const SWEEP_MARGIN: Duration = Duration::from_secs(1);

/// How long a request admitted under `limits` may still be reading its body and storing
/// its event once its handler starts, with [`SWEEP_MARGIN`]: ingress waits this long for
/// the requests under way at shutdown, and a sweep after a reload waits past it.
pub(super) fn drain_time(limits: &IngressConfig) -> Duration {
    limits.body_timeout + limits.store_timeout + SWEEP_MARGIN
}

impl RequestHorizon {
    /// Records that `old` limits were replaced by `new` at `now`; returns how long from
    /// `now` until every request admitted so far has stored or given up: the larger of
    /// the old and new limits, and of any earlier config's still in reach.
    pub(super) fn replaced(
        &mut self,
        old: &IngressConfig,
        new: &IngressConfig,
        now: Instant,
    ) -> Duration {
        let old_until = now + drain_time(old);
        let until = self.until.map_or(old_until, |u| u.max(old_until));
        self.until = Some(until);
        // Requests admitted from now on use `new`; one admitted just before the swap
        // used `old`.
        (until - now).max(drain_time(new))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(body: u64, store: u64) -> IngressConfig {
        let (config, _) = crate::config::load_str(
            &format!(
                "ingress: {{ body_timeout: {body}s, store_timeout: {store}s }}\n\
                 applications: [{{ app_id: a, token: t0123456789 }}]\n"
            ),
            std::path::Path::new("/tmp/relay.yaml"),
            &|_| None,
        )
        .unwrap();
        config.ingress
    }

    #[test]
    fn a_sweep_after_lowered_limits_waits_for_the_old_ones() {
        let now = Instant::now();
        let mut h = RequestHorizon::default();
        // 10 s + 3 s under the old config, 1 s + 1 s under the new one.
        let wait = h.replaced(&limits(10, 3), &limits(1, 1), now);
        assert_eq!(wait, Duration::from_secs(13) + SWEEP_MARGIN);
        // Raised limits: the new ones are the longer wait.
        let mut h = RequestHorizon::default();
        let wait = h.replaced(&limits(1, 1), &limits(4, 2), now);
        assert_eq!(wait, Duration::from_secs(6) + SWEEP_MARGIN);
    }

    #[test]
    fn reloads_in_a_row_remember_an_older_configs_limits() {
        let now = Instant::now();
        let mut h = RequestHorizon::default();
        h.replaced(&limits(30, 3), &limits(1, 1), now);
        // Two seconds later the low limits are replaced (removing a destination): a
        // request admitted under the first config may still be reading its body.
        let later = now + Duration::from_secs(2);
        let wait = h.replaced(&limits(1, 1), &limits(1, 1), later);
        assert_eq!(wait, Duration::from_secs(31) + SWEEP_MARGIN);
        // Long after, only the limits of the configs that could still have requests count.
        let much_later = now + Duration::from_secs(100);
        let wait = h.replaced(&limits(1, 1), &limits(1, 1), much_later);
        assert_eq!(wait, Duration::from_secs(2) + SWEEP_MARGIN);
    }
}
