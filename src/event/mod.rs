//! The event: what FACEIO sent, once it is known to be genuine.
//!
//! Every later stage depends on this module and on nothing upstream of it: ingress turns
//! a request into a [`VerifiedEvent`] through [`verify`], routing reads its [`Payload`],
//! the store writes it, delivery and the admin endpoint read the relay's clock
//! ([`now_ms`]).
//!
//! # Invariants
//! - **Only a verified event exists.** [`VerifiedEvent`]'s fields and constructor are
//!   private to [`verify`], which makes one only after the token named an application
//!   ([`verify::authenticate`]) and the body parsed as a payload of that application.
//! - **The body is kept as sent.** [`VerifiedEvent::body`] is the exact bytes FACEIO
//!   posted; [`Payload`] is a parsed view of the fields the relay reads, never re-encoded.

mod payload;
pub mod verify;

use std::time::{SystemTime, UNIX_EPOCH};

pub use payload::{Age, Details, Payload};
pub use verify::VerifiedEvent;

/// Wall-clock Unix milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
