//! Prometheus metrics, served by the admin endpoint at `/metrics`.
//!
//! Counters and histograms are updated where things happen (through the observable
//! events in [`super::events`]); the store-backed gauges (pending deliveries, backlog age,
//! dead letters) are read from the store when `/metrics` is scraped, so they are right
//! after a restart and include work done by the `dead-letters` commands.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// `app_id`, `event_name`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    pub app_id: String,
    pub event_name: String,
}

/// `reason`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

/// `status` (the HTTP status code answered).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    pub status: u16,
}

/// `destination`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DestinationLabels {
    pub destination: String,
}

/// `listener` (`ingress` or `admin`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    pub listener: &'static str,
}

/// `listener`, `reason` (why the relay closed or refused a connection).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CloseLabels {
    pub listener: &'static str,
    pub reason: &'static str,
}

/// `destination`, `outcome` (`delivered`, `retry`, `dead`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub destination: String,
    pub outcome: &'static str,
}

fn histogram_seconds() -> Histogram {
    // 0.5 ms .. ~65 s: an fsync-bound ACK at the low end, a slow retry chain at the top.
    Histogram::new(exponential_buckets(0.0005, 2.0, 18))
}

/// Plain totals since start, for the one-line `STATUS=` (not exported).
#[derive(Debug, Default)]
pub struct Totals {
    pub accepted: AtomicU64,
    pub delivered: AtomicU64,
    pub dead: AtomicU64,
}

/// Every metric the relay exports.
pub struct Metrics {
    registry: Registry,
    pub totals: Totals,
    pub events_received: Family<EventLabels, Counter>,
    pub rejections: Family<ReasonLabels, Counter>,
    pub ingress_responses: Family<StatusLabels, Counter>,
    pub ack_latency: Histogram,
    pub deliveries: Family<OutcomeLabels, Counter>,
    pub attempt_duration: Family<DestinationLabels, Histogram, fn() -> Histogram>,
    pub end_to_end: Family<DestinationLabels, Histogram, fn() -> Histogram>,
    pub rate_limit_waits: Family<DestinationLabels, Counter>,
    pub pending: Family<DestinationLabels, Gauge>,
    pub oldest_pending_age: Family<DestinationLabels, Gauge<f64, AtomicU64>>,
    pub dead_letters: Family<DestinationLabels, Gauge>,
    pub connections_open: Family<ListenerLabels, Gauge>,
    pub connections_closed: Family<CloseLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates a destination's counters at zero, so they are exported from its start:
    /// `increase()` and `rate()` in alert rules then see its first dead letter or wait as
    /// an increase from 0 (a series born at 1 shows no increase), and dashboards show 0
    /// instead of no data.
    pub fn init_destination(&self, name: &str) {
        for outcome in ["delivered", "retry", "dead"] {
            drop(self.deliveries.get_or_create(&OutcomeLabels {
                destination: name.to_string(),
                outcome,
            }));
        }
        drop(self.rate_limit_waits.get_or_create(&DestinationLabels {
            destination: name.to_string(),
        }));
    }

    /// Creates the ingress answers alert rules watch (200, 503) at zero.
    pub fn init_ingress(&self) {
        for status in [200, 503] {
            drop(
                self.ingress_responses
                    .get_or_create(&StatusLabels { status }),
            );
        }
    }

    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("faceio_relay");
        let m = Self {
            events_received: Family::default(),
            rejections: Family::default(),
            ingress_responses: Family::default(),
            ack_latency: histogram_seconds(),
            deliveries: Family::default(),
            attempt_duration: Family::new_with_constructor(histogram_seconds),
            end_to_end: Family::new_with_constructor(histogram_seconds),
            rate_limit_waits: Family::default(),
            pending: Family::default(),
            oldest_pending_age: Family::default(),
            dead_letters: Family::default(),
            connections_open: Family::default(),
            connections_closed: Family::default(),
            totals: Totals::default(),
            registry: Registry::default(),
        };
        registry.register(
            "events_received",
            "Webhooks accepted (stored durably), by application and event name",
            m.events_received.clone(),
        );
        registry.register(
            "ingress_rejections",
            "Webhooks refused, by reason",
            m.rejections.clone(),
        );
        registry.register(
            "ingress_responses",
            "Ingress answers by HTTP status",
            m.ingress_responses.clone(),
        );
        registry.register(
            "ack_latency_seconds",
            "Time from request start to the durable 200",
            m.ack_latency.clone(),
        );
        registry.register(
            "deliveries",
            "Delivery outcomes by destination (delivered, retry, dead; dead includes the pending deliveries of a destination removed by a reload)",
            m.deliveries.clone(),
        );
        registry.register(
            "delivery_attempt_duration_seconds",
            "Duration of one delivery attempt",
            m.attempt_duration.clone(),
        );
        registry.register(
            "end_to_end_latency_seconds",
            "Time from event arrival to successful delivery",
            m.end_to_end.clone(),
        );
        registry.register(
            "rate_limit_waits",
            "Deliveries that waited for their destination's rate limit",
            m.rate_limit_waits.clone(),
        );
        registry.register(
            "pending_deliveries",
            "Deliveries waiting (due or scheduled for retry), by destination",
            m.pending.clone(),
        );
        registry.register(
            "oldest_pending_age_seconds",
            "Age of the oldest pending delivery's event, by destination",
            m.oldest_pending_age.clone(),
        );
        registry.register(
            "dead_letters",
            "Deliveries in the dead-letter store, by destination",
            m.dead_letters.clone(),
        );
        registry.register(
            "connections_open",
            "Connections open now, by listener",
            m.connections_open.clone(),
        );
        registry.register(
            "connections_closed_by_relay",
            "Connections the relay refused or closed, by listener and reason (per_ip_cap, idle, too_many_failures, handshake_timeout, handshake_failed, no_request)",
            m.connections_closed.clone(),
        );
        Self { registry, ..m }
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
