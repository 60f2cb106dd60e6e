//! Routing and fan-out through the real relay: each destination kind gets what it should.

mod common;

use common::*;
use std::time::Duration;

#[tokio::test]
async fn routes_fan_out_once_per_destination_to_every_kind() {
    let mut slack = Receiver::ok().await;
    let mut api = Receiver::ok().await;
    let setup = Setup::new();
    let cfg = format!(
        "destinations:
  team-slack:
    type: slack
    webhook_url: {slack}
  crm:
    type: http
    url: {api}
    headers: {{ Authorization: \"Bearer crm-secret\", X-Team: faces }}
  audit:
    type: file
    path: out/events.jsonl
routes:
  - name: enrollments
    match: {{ eventName: ENROLL }}
    to: [team-slack, crm]
  - name: women-over-25
    match: {{ details.gender: female, details.age: {{ min: 25 }} }}
    to: [crm]
  - name: everything
    to: [audit]
",
        slack = slack.url(),
        api = api.url()
    );
    let relay = TestRelay::start(setup.config(&cfg)).await;

    let enroll = event("ENROLL", "face-e");
    let (status, answer) = relay.send(&enroll).await;
    assert_eq!(status, 200);
    let id = answer["id"].as_str().unwrap().to_string();

    // Slack: a readable default message naming the event, face, app and IP.
    let msg = slack.next().await.json();
    let text = msg["text"].as_str().unwrap();
    for part in ["ENROLL", "face-e", APP, "203.0.113.7", "female"] {
        assert!(text.contains(part), "{part} not in {text}");
    }

    // HTTP: the original bytes, JSON content type, configured headers, event id header.
    let got = api.next().await;
    assert_eq!(got.body, enroll.to_string().as_bytes());
    assert_eq!(got.header("content-type").unwrap(), "application/json");
    assert_eq!(got.header("authorization").unwrap(), "Bearer crm-secret");
    assert_eq!(got.header("x-team").unwrap(), "faces");
    assert_eq!(got.header("x-faceio-relay-event-id").unwrap(), id);
    // crm is named by two matching routes but gets the event once.
    assert!(api.next_within(Duration::from_millis(300)).await.is_none());

    // AUTH goes only to the audit file.
    let (status, _) = relay.send(&event("AUTH", "face-a")).await;
    assert_eq!(status, 200);
    let path = setup.path("out/events.jsonl");
    eventually("both events in the file", || {
        std::fs::read_to_string(&path)
            .map(|t| t.lines().count() == 2)
            .unwrap_or(false)
    })
    .await;
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["id"], id.as_str());
    assert_eq!(lines[0]["event"], enroll);
    assert_eq!(lines[1]["event"]["eventName"], "AUTH");
    assert!(
        slack
            .next_within(Duration::from_millis(300))
            .await
            .is_none(),
        "AUTH is not for Slack"
    );
    assert!(
        api.next_within(Duration::from_millis(10)).await.is_none(),
        "AUTH is not for the CRM"
    );
    relay.shutdown().await;
}

#[tokio::test]
async fn slack_text_template_and_signed_http() {
    let mut slack = Receiver::ok().await;
    let mut api = Receiver::ok().await;
    let setup = Setup::new();
    let cfg = format!(
        "destinations:
  s:
    type: slack
    webhook_url: {slack}
    text: \"New {{{{eventName}}}} for {{{{facialId}}}} from {{{{clientIp}}}}\"
  h:
    type: http
    url: {api}
    signing_secret: whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw
routes:
  - to: [s, h]
",
        slack = slack.url(),
        api = api.url()
    );
    let relay = TestRelay::start(setup.config(&cfg)).await;
    let (_, answer) = relay.send(&event("DELETION", "face-d")).await;
    let id = answer["id"].as_str().unwrap();
    assert_eq!(
        slack.next().await.json()["text"],
        "New DELETION for face-d from 203.0.113.7"
    );

    let got = api.next().await;
    assert_eq!(got.header("webhook-id").unwrap(), id);
    let ts = got.header("webhook-timestamp").unwrap();
    let sig = got.header("webhook-signature").unwrap();
    // Verify as a receiver would, with the spec's construction.
    use base64::Engine;
    use hmac::{Hmac, Mac};
    let key = base64::engine::general_purpose::STANDARD
        .decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
        .unwrap();
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{id}.{ts}.").as_bytes());
    mac.update(&got.body);
    let expected = format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    );
    assert_eq!(sig, expected);
    relay.shutdown().await;
}

#[tokio::test]
async fn unmatched_events_are_stored_but_sent_nowhere() {
    let mut api = Receiver::ok().await;
    let setup = Setup::new();
    let cfg = format!(
        "destinations:\n  h:\n    type: http\n    url: {}\nroutes:\n  - match: {{ eventName: ENROLL, clientIp: 10.0.0.0/8 }}\n    to: [h]\n",
        api.url()
    );
    let relay = TestRelay::start(setup.config(&cfg)).await;
    assert_eq!(relay.send(&event("ENROLL", "outside")).await.0, 200);
    assert!(api.next_within(Duration::from_millis(300)).await.is_none());
    assert_eq!(stored_events(&setup), 1);
    assert_eq!(count(&setup, "pending") + count(&setup, "done"), 0);
    relay.shutdown().await;
}
