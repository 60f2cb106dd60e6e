//! Store-level helpers for tests that call a `Store` directly (the contract in
//! `tests/store_contract/`, the PostgreSQL tests): verified events without a server, and
//! the claims and outcomes a dispatcher would make.
#![allow(dead_code)]

use std::time::Duration;

use bytes::Bytes;
use faceio_relay::config::{Application, Secret};
use faceio_relay::event::VerifiedEvent;
use faceio_relay::event::now_ms;
use faceio_relay::event::verify::{authenticate, verify};
use faceio_relay::store::{ClaimRequest, Delivery, Outcome, Store};

use crate::common::{APP, TOKEN};

/// A lease no test outlives.
pub const LONG: Duration = Duration::from_secs(60);

/// A FACEIO event named `name`, verified as ingress would.
pub fn verified(name: &str) -> VerifiedEvent {
    let apps = vec![Application::new(APP, Secret::new(TOKEN.into()))];
    let auth = authenticate(&apps, Some(TOKEN.as_bytes())).unwrap();
    let body =
        format!(r#"{{"eventName":"{name}","facialId":"f","appId":"{APP}","clientIp":"1.2.3.4"}}"#);
    verify(auth, Bytes::from(body)).unwrap()
}

/// A claim of up to 10 due deliveries of `destination`, nothing in flight, taking over
/// from other processes allowed.
pub fn request(destination: &str, lease: Duration) -> ClaimRequest<'_> {
    ClaimRequest {
        destination,
        now_ms: now_ms(),
        want: 10,
        in_flight: &[],
        lease,
        take_over: true,
    }
}

/// Claims the first due delivery of `destination` and records it dead with `error`.
pub async fn claim_and_dead_letter(store: &impl Store, destination: &str, error: &str) -> Delivery {
    let d = store
        .claim(request(destination, LONG))
        .await
        .unwrap()
        .remove(0);
    store
        .record(
            &d,
            Outcome::Dead {
                attempts: 1,
                error: error.into(),
            },
        )
        .await
        .unwrap();
    d
}
