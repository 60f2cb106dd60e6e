//! The FACEIO payload parser: any body, authenticated, is verified or refused; a
//! verified one is forwarded byte for byte and says what its JSON says.
#![no_main]

use bytes::Bytes;
use faceio_relay::config::{Application, Secret};
use faceio_relay::event::verify::{Rejection, authenticate, verify};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let apps = vec![Application::new(
        "fioa-fuzz",
        Secret::new("tok-fuzz".into()),
    )];
    let auth = authenticate(&apps, Some(b"Bearer tok-fuzz")).expect("the token matches");
    match verify(auth, Bytes::copy_from_slice(data)) {
        Ok(event) => {
            assert_eq!(event.body().as_ref(), data);
            assert_eq!(event.payload().app_id, "fioa-fuzz");
            assert!(!event.payload().event_name.is_empty());
        }
        Err(Rejection::InvalidPayload(why)) => assert!(!why.is_empty()),
        Err(Rejection::AppMismatch { .. }) => {}
        Err(other) => panic!("authenticated, then {other:?}"),
    }
});
