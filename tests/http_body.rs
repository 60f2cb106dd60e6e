//! `type: http` with `body:`: the API gets the JSON the template describes, types kept,
//! strings intact, signed over the bytes it receives; without `body:` it gets FACEIO's
//! bytes unchanged.

mod common;

use common::*;
use serde_json::json;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// A Facial ID that breaks JSON built by printing: quotes, backslashes, a newline, and
/// something that looks like the end of the string.
const NASTY: &str = "fa\"ce\\1\n\",\"admin\":true,\"x\":\"";

#[tokio::test]
async fn a_body_template_keeps_types_escapes_strings_and_is_signed_as_sent() {
    let mut api = Receiver::ok().await;
    let mut raw = Receiver::ok().await;
    let setup = Setup::new();
    let cfg = format!(
        "destinations:
  crm:
    type: http
    url: {api}
    signing_secret: {SECRET}
    content_type: application/vnd.crm+json
    body:
      type: faceio.{{{{ eventName | lower }}}}
      user:
        id: \"{{{{ facialId }}}}\"
        label: \"{{{{ facialId }}}} from {{{{ clientIp }}}}\"
        age: \"{{{{ details.age }}}}\"
        adult: \"{{{{ details.age >= 18 }}}}\"
      details: \"{{{{ details }}}}\"
      source: faceio
      version: 2
  raw:
    type: http
    url: {raw}
routes:
  - to: [crm, raw]
",
        api = api.url(),
        raw = raw.url()
    );
    let relay = TestRelay::start(setup.config(&cfg)).await;
    let enroll = event("ENROLL", NASTY);
    let (status, answer) = relay.send(&enroll).await;
    assert_eq!(status, 200, "{answer}");

    let got = api.next().await;
    assert_eq!(
        got.header("content-type").as_deref(),
        Some("application/vnd.crm+json")
    );
    let body: serde_json::Value =
        serde_json::from_slice(&got.body).expect("the body is valid JSON");
    assert_eq!(
        body,
        json!({
            "type": "faceio.enroll",
            "user": {
                "id": NASTY,
                "label": format!("{NASTY} from 203.0.113.7"),
                "age": 31,
                "adult": true,
            },
            "details": {"timestamp": "2026-11-27", "gender": "female", "age": 31},
            "source": "faceio",
            "version": 2,
        })
    );
    // The Standard Webhooks project's own verifier accepts the signature over the bytes
    // the API received.
    let webhook = standardwebhooks::Webhook::new(SECRET).unwrap();
    webhook
        .verify(&got.body, &got.headers)
        .expect("the signature verifies over the body as sent");
    assert_eq!(
        got.header("webhook-id").unwrap(),
        answer["id"].as_str().unwrap()
    );

    // Without body:, FACEIO's bytes go out unchanged.
    let got_raw = raw.next().await;
    assert_eq!(got_raw.body, serde_json::to_vec(&enroll).unwrap());
    assert_eq!(
        got_raw.header("content-type").as_deref(),
        Some("application/json")
    );

    // A missing field is null, not an error: AUTH has no details.
    assert_eq!(relay.send(&event("AUTH", "face-2")).await.0, 200);
    let auth: serde_json::Value = serde_json::from_slice(&api.next().await.body).unwrap();
    assert_eq!(auth["user"]["age"], json!(null));
    assert_eq!(auth["details"], json!(null));
    assert_eq!(auth["user"]["id"], "face-2");
    raw.next().await;
    eventually("every delivery done", || count(&setup, "done") == 4).await;
    relay.shutdown().await;
}
