//! Ingress: the HTTP endpoint FACEIO posts to.
//!
//! # Invariants
//! - **200 means durable.** A 200 `{"id": …}` is sent only after the store has committed
//!   and synced the event with its deliveries. If the store errors or takes longer than
//!   `store_timeout`, the answer is 503; the sender never gets a 200 for an event that
//!   could be lost.
//! - **Unverified data never reaches the store.** The store takes a
//!   [`VerifiedEvent`](crate::event::VerifiedEvent), which only
//!   [`event::verify::verify`](crate::event::verify::verify) makes, after
//!   [`event::verify::authenticate`](crate::event::verify::authenticate); ingress calls
//!   them, it does not build events.
//! - **The token is checked before the body is read**, so an unauthenticated client
//!   cannot make the relay read or parse anything.
//! - **No answer leaks why authentication failed**; the log says why, without the token.
//!
//! Protections: a header read timeout and a body read timeout (slow clients cannot pin
//! connections), a cap on concurrent connections, an optional `allow_ips` list, a body
//! size limit enforced before reading, and a per-source-IP budget of failed
//! authentications (past it, 429) so a flood of bad tokens cannot crowd out FACEIO.
//!
//! With `tls:`, [`tls`] terminates HTTPS in the daemon (ALPN h2 and http/1.1) and reloads
//! renewed certificates in place through a [`TlsHandle`].

pub mod client;
mod handler;
mod server;
pub mod tls;

pub use handler::{IngressState, router};
pub use server::{ConnPolicy, ListenerLimits, serve};
pub use tls::{TlsError, TlsHandle};
