//! A Slack `text` template (first part of the input, up to a NUL byte) rendered over a
//! payload (the rest): a template the config accepts renders any payload (a template
//! failing on one event sends the default message), or fails with a permanent delivery
//! error (a stored payload that is not JSON); never a panic.
#![no_main]

use std::path::Path;

use bytes::Bytes;
use faceio_relay::config::load_str;
use faceio_relay::destinations::{DeliveryError, DestinationKind, SlackDestination};
use faceio_relay::store::Delivery;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    let Ok(template) = std::str::from_utf8(&data[..split]) else {
        return;
    };
    let body = data.get(split + 1..).unwrap_or_default();
    let yaml = format!(
        "applications:\n  - app_id: a\n    token: t\n\
         destinations:\n  slack:\n    type: slack\n    webhook_url: https://hooks.example.test/x\n\
         \x20   text: {}\nroutes:\n  - to: [slack]\n",
        serde_json_string(template)
    );
    let Ok((config, _)) = load_str(&yaml, Path::new("/nonexistent/relay.yaml"), &|_| None) else {
        return;
    };
    let d = &config.destinations[0];
    let DestinationKind::Slack(slack) = &d.kind else {
        return;
    };
    let dest = SlackDestination::new(d, slack).expect("a loaded config builds");
    let delivery = Delivery {
        id: 1,
        event_id: "ev".into(),
        destination: "slack".into(),
        attempts: 0,
        received_at_ms: 0,
        body: Bytes::copy_from_slice(body),
        claim: None,
    };
    match dest.render(&delivery) {
        Ok(_) | Err(DeliveryError::Permanent { .. }) => {}
        Err(e) => panic!("a render failure is permanent: {e:?}"),
    }
});

/// A YAML double-quoted scalar holding `s` (JSON string syntax is valid YAML).
fn serde_json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
