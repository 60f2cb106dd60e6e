//! Observable events: one struct per thing an operator may want to see, with an `emit`
//! that writes the log line and updates the metrics. Business code builds the struct;
//! the wording of logs and the names of metrics live here.

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::metrics::{
    CloseLabels, DestinationLabels, EventLabels, Metrics, OutcomeLabels, ReasonLabels, StatusLabels,
};

/// A webhook was stored durably and answered 200.
pub struct EventAccepted<'a> {
    pub event_id: &'a str,
    pub app_id: &'a str,
    pub event_name: &'a str,
    /// `event_name` as the metric label: bounded (see `ingress::handler::Live`).
    pub event_label: &'a str,
    pub destinations: usize,
    pub latency: Duration,
}

impl EventAccepted<'_> {
    pub fn emit(&self, metrics: &Metrics) {
        tracing::info!(
            event_id = %self.event_id,
            app_id = %self.app_id,
            event_name = %self.event_name,
            destinations = self.destinations,
            latency_ms = format_args!("{:.1}", self.latency.as_secs_f64() * 1000.0),
            "event accepted"
        );
        metrics
            .events_received
            .get_or_create(&EventLabels {
                app_id: self.app_id.to_string(),
                event_name: self.event_label.to_string(),
            })
            .inc();
        metrics
            .ingress_responses
            .get_or_create(&StatusLabels { status: 200 })
            .inc();
        metrics.ack_latency.observe(self.latency.as_secs_f64());
        metrics.totals.accepted.fetch_add(1, Ordering::Relaxed);
    }
}

/// A request was refused. `reason` is a short stable code (also the metric label);
/// `detail` is for the log only and never contains a token.
pub struct EventRejected<'a> {
    pub peer: IpAddr,
    pub status: u16,
    pub reason: &'static str,
    pub detail: &'a str,
}

impl EventRejected<'_> {
    pub fn emit(&self, metrics: &Metrics) {
        if self.status >= 500 {
            tracing::error!(peer = %self.peer, status = self.status, reason = %self.reason,
                detail = %self.detail, "event rejected");
        } else if self.status == 404 || self.status == 405 {
            // Not the webhook at all: scanners and health probes, counted but not worth
            // a warning each.
            tracing::debug!(peer = %self.peer, status = self.status, reason = %self.reason,
                detail = %self.detail, "request rejected");
        } else {
            tracing::warn!(peer = %self.peer, status = self.status, reason = %self.reason,
                detail = %self.detail, "event rejected");
        }
        metrics
            .rejections
            .get_or_create(&ReasonLabels {
                reason: self.reason,
            })
            .inc();
        metrics
            .ingress_responses
            .get_or_create(&StatusLabels {
                status: self.status,
            })
            .inc();
    }
}

/// How one delivery attempt ended.
pub enum AttemptResult<'a> {
    /// Delivered; `end_to_end` is from the event's arrival.
    Delivered { end_to_end: Duration },
    /// Failed, will be tried again after `retry_in`.
    Retry { retry_in: Duration, error: &'a str },
    /// Failed for good (permanent, or out of attempts); in the dead-letter store now.
    Dead { error: &'a str },
}

/// A delivery attempt finished.
pub struct DeliveryAttempted<'a> {
    pub destination: &'a str,
    pub event_id: &'a str,
    pub attempt: u32,
    pub latency: Duration,
    pub result: AttemptResult<'a>,
}

impl DeliveryAttempted<'_> {
    pub fn emit(&self, metrics: &Metrics) {
        let latency_ms = self.latency.as_millis() as u64;
        let (destination, event_id, attempt) = (self.destination, self.event_id, self.attempt);
        let outcome = match &self.result {
            AttemptResult::Delivered { end_to_end } => {
                tracing::info!(
                    destination = %destination,
                    event_id = %event_id,
                    attempt,
                    latency_ms,
                    status = %"delivered",
                    "delivery succeeded"
                );
                metrics
                    .end_to_end
                    .get_or_create(&DestinationLabels {
                        destination: destination.to_string(),
                    })
                    .observe(end_to_end.as_secs_f64());
                metrics.totals.delivered.fetch_add(1, Ordering::Relaxed);
                "delivered"
            }
            AttemptResult::Retry { retry_in, error } => {
                tracing::warn!(
                    destination = %destination,
                    event_id = %event_id,
                    attempt,
                    latency_ms,
                    status = %"retry",
                    retry_in_ms = retry_in.as_millis() as u64,
                    error,
                    "delivery failed; will retry"
                );
                "retry"
            }
            AttemptResult::Dead { error } => {
                tracing::warn!(
                    destination = %destination,
                    event_id = %event_id,
                    attempt,
                    latency_ms,
                    status = %"dead",
                    error,
                    "delivery failed for good; moved to dead letters"
                );
                metrics.totals.dead.fetch_add(1, Ordering::Relaxed);
                "dead"
            }
        };
        metrics
            .deliveries
            .get_or_create(&OutcomeLabels {
                destination: destination.to_string(),
                outcome,
            })
            .inc();
        metrics
            .attempt_duration
            .get_or_create(&DestinationLabels {
                destination: destination.to_string(),
            })
            .observe(self.latency.as_secs_f64());
    }
}

/// A configured Slack template failed on one event (a case the sample events did not
/// show, such as arithmetic on a string): the default message went instead.
pub struct SlackTemplateFallback<'a> {
    pub event_id: &'a str,
    pub destination: &'a str,
    /// The template error: kind, detail and template name; never a value.
    pub reason: &'a str,
}

impl SlackTemplateFallback<'_> {
    pub fn emit(&self) {
        tracing::warn!(
            event_id = %self.event_id,
            destination = %self.destination,
            reason = %self.reason,
            "slack template failed; sending the default message"
        );
    }
}

/// A delivery waits for its destination's rate limit (not a failure).
pub struct RateLimitWait<'a> {
    pub destination: &'a str,
    pub event_id: &'a str,
}

impl RateLimitWait<'_> {
    pub fn emit(&self, metrics: &Metrics) {
        tracing::debug!(
            destination = self.destination,
            event_id = self.event_id,
            "waiting for rate limit"
        );
        metrics
            .rate_limit_waits
            .get_or_create(&DestinationLabels {
                destination: self.destination.to_string(),
            })
            .inc();
    }
}

/// Pending deliveries of a destination no longer in the config were moved to the dead
/// letters (counted as `dead` outcomes, so the dead-letter alert sees them).
pub struct OrphansDeadLettered<'a> {
    pub destination: &'a str,
    pub count: u64,
}

impl OrphansDeadLettered<'_> {
    pub fn emit(&self, metrics: &Metrics) {
        tracing::warn!(
            destination = %self.destination,
            count = self.count,
            status = %"dead",
            "pending deliveries of a destination no longer in the config were moved to dead letters"
        );
        metrics
            .deliveries
            .get_or_create(&OutcomeLabels {
                destination: self.destination.to_string(),
                outcome: "dead",
            })
            .inc_by(self.count);
        metrics.totals.dead.fetch_add(self.count, Ordering::Relaxed);
    }
}

/// The relay refused or closed a connection to protect its slots (not a request: no
/// answer was sent). Logged at debug: an attack makes many.
pub struct ConnectionClosed {
    /// `ingress` or `admin`.
    pub listener: &'static str,
    /// The client address (after a PROXY header), or the TCP peer.
    pub peer: IpAddr,
    /// `per_ip_cap`, `idle`, `too_many_failures`, `handshake_timeout`, `handshake_failed`,
    /// `no_request`.
    pub reason: &'static str,
}

impl ConnectionClosed {
    pub fn emit(&self, metrics: &Metrics) {
        tracing::debug!(listener = %self.listener, peer = %self.peer, reason = %self.reason,
            "connection closed by the relay");
        metrics
            .connections_closed
            .get_or_create(&CloseLabels {
                listener: self.listener,
                reason: self.reason,
            })
            .inc();
    }
}

/// A relay decided the `dead-letters replay` requests of one destination: queued again
/// (it runs the destination) or refused (no running relay does; they stay dead letters).
pub struct ReplayDecided<'a> {
    pub destination: &'a str,
    pub count: u64,
    pub replayed: bool,
}

impl ReplayDecided<'_> {
    pub fn emit(&self) {
        if self.replayed {
            tracing::info!(
                destination = %self.destination,
                count = self.count,
                "dead letters queued again on request (dead-letters replay)"
            );
        } else {
            tracing::warn!(
                destination = %self.destination,
                count = self.count,
                "replay of dead letters refused: no running relay has this destination; they stay dead letters"
            );
        }
    }
}
