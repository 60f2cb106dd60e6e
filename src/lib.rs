//! faceio-relay: verify FACEIO webhooks, store them durably, fan them out by rules.
//!
//! # Layout
//! The life of one event, top to bottom:
//! - [`event`]: the event itself. [`event::verify`] checks the `WWW-Authenticate` token
//!   (constant time) and the payload; the result is an [`event::VerifiedEvent`], the only
//!   thing the store accepts. Every stage below imports the event from here.
//! - [`ingress`]: the HTTP endpoint. Checks the token before reading the body, the
//!   content type and the size, then hands token and body to [`event::verify`].
//! - [`routing`]: compiled `routes:`; decides which destinations get the event.
//! - [`store`]: writes the event and one pending delivery per destination in one
//!   transaction, synced to disk (group commit) before ingress answers 200. SQLite by
//!   default; a shared PostgreSQL database lets several relays act as one.
//! - [`delivery`]: one dispatcher per destination takes due deliveries, applies the
//!   destination's concurrency and rate limit, and records done / retry-at / dead.
//! - [`destinations`]: one file per kind (`slack`, `http`, `file`) behind one trait;
//!   each attempt is classified as success, retryable or permanent. A kind's file also
//!   holds its settings and their validation; [`config`] reaches them through the one
//!   registry, [`destinations::DestinationKind`] (the way Vector's config builds its
//!   sinks), and through nothing else. Slack messages and
//!   HTTP bodies are built by [`template`] (mrkdwn escaping, missing fields empty).
//!
//! Around them: [`config`] (relay.yaml into typed values, every error at once),
//! [`cli`] (the `run`, `check`, `simulate` and `dead-letters` commands), [`Relay`]
//! (the parts wired together: start, reload, shutdown), [`service`] (systemd notify,
//! signals), [`admin`] (`/metrics`, `/healthz`, `/readyz`) and [`telemetry`] (logs,
//! metrics, observable events).
//!
//! # Shutdown
//! [`Relay::shutdown`] stops in this order: `/readyz` turns 503 (load balancers stop
//! sending) while ingress stops accepting and finishes the requests under way (each
//! still gets its durable 200 or a 503); dispatchers stop starting attempts; attempts
//! under way get `delivery.shutdown_grace`, then are abandoned (still pending, resumed on
//! the next start); the admin endpoint closes; the store's writer drains its queue.
//! Nothing pending is lost at any step.

pub mod admin;
pub mod cli;
pub mod config;
pub mod delivery;
pub mod destinations;
pub mod event;
pub mod ingress;
mod relay;
pub mod routing;
pub mod service;
pub mod store;
pub mod telemetry;
pub mod template;

pub use relay::{Relay, RelayError, StatusSource, run};
