//! Slack messages through the real relay to a fake Slack: sent for every event kind,
//! and safe whatever the payload holds.

mod common;

use common::*;
use serde_json::{Value, json};

/// What an attacker can put in any field FACEIO forwards: a channel ping, a disguised
/// link, an ampersand, a backtick that would close a code span and a line break.
const HOSTILE: &str = "<!channel> <https://evil.example|click> & co `x`\nforged line";

/// The Slack escapes a value must arrive in (see `template::mrkdwn`).
const ESCAPED: &str =
    "&lt;!channel&gt; &lt;https://evil.example|click&gt; &amp; co ˋxˋ forged line";

/// An application whose ID is hostile too (FACEIO puts the app ID in every payload).
const HOSTILE_APP: &str = "fioa-<!channel>&`";
const HOSTILE_TOKEN: &str = "tok-hostile-app-000";

fn hostile_event() -> Value {
    json!({
        "eventName": format!("ENROLL{HOSTILE}"),
        "facialId": HOSTILE,
        "appId": HOSTILE_APP,
        "clientIp": HOSTILE,
        "details": {"timestamp": HOSTILE, "gender": HOSTILE, "age": HOSTILE},
        "payload": {"note": HOSTILE},
    })
}

/// Every mrkdwn string Slack will parse in a message: `text` and the `text` of every
/// `mrkdwn` object in `blocks`.
fn mrkdwn_strings(message: &Value) -> Vec<String> {
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                if m.get("type") == Some(&json!("mrkdwn"))
                    && let Some(Value::String(t)) = m.get("text")
                {
                    out.push(t.clone());
                }
                m.values().for_each(|v| walk(v, out));
            }
            Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = vec![
        message["text"]
            .as_str()
            .expect("text is always sent")
            .to_string(),
    ];
    walk(&message["blocks"], &mut out);
    out
}

/// No value reached Slack with its control characters: no `<`, `>` or bare `&` from a
/// value, no backtick or line break from a value.
fn assert_no_raw_hostile(message: &Value) {
    for s in mrkdwn_strings(message) {
        for raw in [
            "<!channel>",
            "<https://evil",
            "& co",
            "`x`",
            "\nforged",
            "<!channel>&`",
        ] {
            assert!(!s.contains(raw), "{raw:?} arrived unescaped in {s:?}");
        }
    }
}

async fn send_as_hostile_app(relay: &TestRelay) {
    let (status, answer) = send(
        &relay.client,
        &relay.url,
        Some(HOSTILE_TOKEN),
        &hostile_event(),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
}

/// The template the README showed: AUTH and DELETION (no `details`) were dead-lettered
/// at the first attempt with "undefined value"; now every event is posted.
#[tokio::test]
async fn the_readme_template_posts_auth_and_deletion_too() {
    let mut slack = Receiver::ok().await;
    let setup = Setup::new();
    let cfg = format!(
        "destinations:\n  s:\n    type: slack\n    webhook_url: {}\n    text: \"{{{{eventName}}}} {{{{details.gender}}}}\"\nroutes:\n  - to: [s]\n",
        slack.url()
    );
    let relay = TestRelay::start(setup.config(&cfg)).await;
    for (name, expected) in [
        ("ENROLL", "ENROLL female"),
        ("AUTH", "AUTH "),
        ("DELETION", "DELETION "),
    ] {
        assert_eq!(relay.send(&event(name, "face-1")).await.0, 200);
        assert_eq!(slack.next().await.json()["text"], expected);
    }
    eventually("every delivery done", || count(&setup, "done") == 3).await;
    assert_eq!(count(&setup, "dead"), 0);
    relay.shutdown().await;
}

#[tokio::test]
async fn the_default_message_escapes_every_field_in_text_and_blocks() {
    let mut slack = Receiver::ok().await;
    let setup = Setup::new();
    let path = setup.write_config_with_apps(
        &[(HOSTILE_APP, HOSTILE_TOKEN)],
        &format!(
            "destinations:\n  s:\n    type: slack\n    webhook_url: {}\nroutes:\n  - to: [s]\n",
            slack.url()
        ),
    );
    let (config, _) = faceio_relay::config::load(&path).unwrap();
    let relay = TestRelay::start(config).await;
    send_as_hostile_app(&relay).await;
    let message = slack.next().await.json();
    assert_no_raw_hostile(&message);
    let text = message["text"].as_str().unwrap();
    assert!(
        text.contains(&format!("`{ESCAPED}`")),
        "the Facial ID keeps its code span: {text}"
    );
    let blocks = message["blocks"].to_string();
    for label in ["*Facial ID*", "*App*", "*IP*", "*Details*"] {
        assert!(blocks.contains(label), "{label} missing from {blocks}");
    }
    assert_eq!(
        message["blocks"][1]["fields"][3]["text"],
        format!("*IP*\n{ESCAPED}")
    );
    relay.shutdown().await;
}

#[tokio::test]
async fn custom_text_and_blocks_escape_values_but_not_the_template() {
    let mut slack = Receiver::ok().await;
    let setup = Setup::new();
    // Every payload field, in text, in a mrkdwn section, in mrkdwn fields and context,
    // and once raw through the opt-out filter.
    let every = "{{ eventName }}|{{ facialId }}|{{ appId }}|{{ clientIp }}|{{ details.gender }}|{{ details.age }}|{{ details.timestamp }}|{{ payload.note }}";
    let path = setup.write_config_with_apps(
        &[(HOSTILE_APP, HOSTILE_TOKEN)],
        &format!(
            "destinations:
  s:
    type: slack
    webhook_url: {url}
    text: \"<!here> {every}\"
    blocks:
      - type: header
        text: {{ type: plain_text, text: \"{{{{ facialId }}}}\" }}
      - type: section
        text: {{ type: mrkdwn, text: \"<https://console.faceio.net|FACEIO> {every}\" }}
        fields:
          - {{ type: mrkdwn, text: \"`{{{{ facialId }}}}`\" }}
          - {{ type: mrkdwn, text: \"{{{{ payload.note }}}}\" }}
      - type: context
        elements:
          - {{ type: mrkdwn, text: \"{{{{ appId }}}}\" }}
      - type: section
        text: {{ type: mrkdwn, text: \"raw: {{{{ facialId | mrkdwn_raw }}}}\" }}
routes:
  - to: [s]
",
            url = slack.url()
        ),
    );
    let (config, _) = faceio_relay::config::load(&path).unwrap();
    let relay = TestRelay::start(config).await;
    send_as_hostile_app(&relay).await;
    let message = slack.next().await.json();
    let app = "fioa-&lt;!channel&gt;&amp;ˋ";
    let all = format!(
        "ENROLL{ESCAPED}|{ESCAPED}|{app}|{ESCAPED}|{ESCAPED}|{ESCAPED}|{ESCAPED}|{ESCAPED}"
    );
    assert_eq!(
        message["text"],
        format!("<!here> {all}"),
        "literal <!here> as written"
    );
    let blocks = &message["blocks"];
    assert_eq!(
        blocks[0]["text"]["text"], HOSTILE,
        "plain_text is not parsed by Slack: left alone"
    );
    assert_eq!(
        blocks[1]["text"]["text"],
        format!("<https://console.faceio.net|FACEIO> {all}")
    );
    assert_eq!(blocks[1]["fields"][0]["text"], format!("`{ESCAPED}`"));
    assert_eq!(blocks[1]["fields"][1]["text"], ESCAPED);
    assert_eq!(blocks[2]["elements"][0]["text"], app);
    assert_eq!(
        blocks[3]["text"]["text"],
        format!("raw: {HOSTILE}"),
        "the opt-out passes raw text"
    );
    // Everything but the opted-out block is safe.
    let mut safe = message.clone();
    safe["blocks"].as_array_mut().unwrap().pop();
    assert_no_raw_hostile(&safe);
    relay.shutdown().await;
}

/// A template that passes the samples but fails on an unusual event (arithmetic on an
/// age sent as text) still gets a message to the channel: the default one.
#[tokio::test]
async fn a_template_failing_on_one_event_sends_the_default_message() {
    let mut slack = Receiver::ok().await;
    let setup = Setup::new();
    let cfg = format!(
        "destinations:\n  s:\n    type: slack\n    webhook_url: {}\n    text: \"{{% if details %}}next year {{{{ details.age + 1 }}}}{{% endif %}}\"\nroutes:\n  - to: [s]\n",
        slack.url()
    );
    let relay = TestRelay::start(setup.config(&cfg)).await;
    assert_eq!(relay.send(&event("ENROLL", "face-1")).await.0, 200);
    assert_eq!(slack.next().await.json()["text"], "next year 32");
    let mut odd = event("ENROLL", "face-2");
    odd["details"]["age"] = json!("thirty");
    assert_eq!(relay.send(&odd).await.0, 200);
    let message = slack.next().await.json();
    let text = message["text"].as_str().unwrap();
    assert!(
        text.starts_with("FACEIO *ENROLL* for Facial ID `face-2`"),
        "{text}"
    );
    assert!(message["blocks"].is_array(), "{message}");
    eventually("both deliveries done", || count(&setup, "done") == 2).await;
    assert_eq!(count(&setup, "dead"), 0);
    relay.shutdown().await;
}
