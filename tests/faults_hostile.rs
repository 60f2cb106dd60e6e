//! Hostile input for the three parsers that take outside text: the FACEIO payload
//! (`verify`), the config (`load_str`) and the Slack template renderer. Random bytes,
//! deep nesting, huge strings, odd Unicode, numbers where strings belong: never a panic,
//! and always a clear answer (a verified event, an `InvalidPayload`/auth rejection, a
//! config error with a position, a rendered text or a permanent delivery error).
//!
//! A corpus of known-nasty inputs runs first; proptest then generates more (set
//! `PROPTEST_CASES` for a longer run). The cargo-fuzz targets in `fuzz/` drive the same
//! entry points; any crash they find is added to the corpus here.

mod common;

use std::path::Path;

use bytes::Bytes;
use proptest::prelude::*;
use serde_json::{Map, Value};

use faceio_relay::config::{Application, Secret, load_str};
use faceio_relay::destinations::{DeliveryError, DestinationKind, SlackDestination};
use faceio_relay::event::verify::{Rejection, authenticate, verify};
use faceio_relay::store::Delivery;

const APP: &str = "fioa-hostile";
const TOKEN: &str = "tok-hostile-0001";

fn apps() -> Vec<Application> {
    vec![Application::new(APP, Secret::new(TOKEN.into()))]
}

/// Checks one body: `verify` answers, and a verified event says what the body says.
fn check_payload(body: &[u8]) {
    let apps = apps();
    let auth = authenticate(&apps, Some(format!("Bearer {TOKEN}").as_bytes())).unwrap();
    match verify(auth, Bytes::copy_from_slice(body)) {
        Ok(event) => {
            assert_eq!(event.body().as_ref(), body, "forwarded byte for byte");
            // What reaches destinations parses as a JSON tree (the Slack template
            // renders over one).
            let v: Value = serde_json::from_slice(body).expect("a verified body is JSON");
            let p = event.payload();
            assert_eq!(v["eventName"].as_str(), Some(p.event_name.as_str()));
            assert_eq!(v["facialId"].as_str(), Some(p.facial_id.as_str()));
            assert_eq!(v["clientIp"].as_str(), Some(p.client_ip.as_str()));
            assert_eq!(p.app_id, APP);
            assert!(!p.event_name.is_empty());
        }
        Err(Rejection::InvalidPayload(why)) => assert!(!why.is_empty()),
        Err(Rejection::AppMismatch { token_app_id, .. }) => assert_eq!(token_app_id, APP),
        Err(other) => panic!("authenticated, then {other:?}"),
    }
}

/// A verified event reaches destinations that parse it (the Slack template renders over
/// a `serde_json::Value`), so `verify` refuses what such a parser refuses (it used to
/// answer 200 and let the delivery be dead-lettered as "stored payload is not JSON").
#[test]
fn verified_payloads_parse_as_json_values() {
    let apps = apps();
    for tail in [
        format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)),
        "1e999999".to_string(),
    ] {
        let body = format!(
            r#"{{"eventName":"AUTH","facialId":"f","appId":"{APP}","clientIp":"1.2.3.4","extra":{tail}}}"#
        );
        let auth = authenticate(&apps, Some(TOKEN.as_bytes())).unwrap();
        if verify(auth, Bytes::from(body.clone())).is_ok() {
            let parsed = serde_json::from_str::<Value>(&body);
            assert!(
                parsed.is_ok(),
                "verified but not parseable: {:?}",
                parsed.err()
            );
        }
    }
}

/// Checks one config text: Ok, or errors that each carry a position and a message.
///
/// On its own thread with the main thread's 8 MiB stack: the YAML parser stops at depth
/// 64 (its budget), which an unoptimised build's frames can take past a test thread's
/// 2 MiB. (The release daemon parses at the budget on 2 MiB too: the SIGHUP reload runs
/// on a blocking-pool thread.)
fn check_config(text: &str) {
    let text = text.to_string();
    std::thread::Builder::new()
        .stack_size(8 << 20)
        .spawn(move || check_config_here(&text))
        .unwrap()
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e));
}

fn check_config_here(text: &str) {
    match load_str(text, Path::new("/nonexistent/hostile.yaml"), &|_| None) {
        Ok(_) => {}
        Err(errors) => {
            assert!(!errors.0.is_empty(), "an Err with no error");
            for e in &errors.0 {
                assert!(!e.message.is_empty(), "{e:?}");
                assert!(e.line >= 1 && e.column >= 1, "no position: {e:?}");
            }
        }
    }
}

/// Renders `body` with the Slack destination of a config whose `text` is `template`
/// (the default template when `None`); a template the config refuses is skipped.
fn check_render(template: Option<&str>, body: &[u8]) {
    let text = match template {
        Some(t) => format!("    text: {}\n", serde_json::to_string(t).unwrap()),
        None => String::new(),
    };
    let yaml = format!(
        "applications:\n  - app_id: {APP}\n    token: {TOKEN}\n\
         destinations:\n  slack:\n    type: slack\n    webhook_url: https://hooks.example.test/services/x\n{text}\
         routes:\n  - to: [slack]\n"
    );
    let Ok((config, _)) = load_str(&yaml, Path::new("/nonexistent/relay.yaml"), &|_| None) else {
        assert!(template.is_some(), "the default template always loads");
        return;
    };
    let d = &config.destinations[0];
    let DestinationKind::Slack(slack) = &d.kind else {
        unreachable!()
    };
    let dest = SlackDestination::new(d, slack).expect("a loaded config builds");
    let delivery = Delivery {
        id: 1,
        event_id: "ev".into(),
        destination: "slack".into(),
        attempts: 0,
        received_at_ms: 1_795_000_000_000,
        body: Bytes::copy_from_slice(body),
        claim: None,
    };
    match dest.render(&delivery) {
        Ok(message) => assert!(
            message.to_string().len() < 64 * body.len().max(1024),
            "render blew up"
        ),
        Err(DeliveryError::Permanent { reason }) => assert!(!reason.is_empty()),
        Err(e) => panic!("a render failure is permanent: {e:?}"),
    }
}

fn payload_with(fields: &[(&str, Value)]) -> Vec<u8> {
    let mut m = Map::new();
    m.insert("eventName".into(), "AUTH".into());
    m.insert("facialId".into(), "f1".into());
    m.insert("appId".into(), APP.into());
    m.insert("clientIp".into(), "203.0.113.7".into());
    for (k, v) in fields {
        m.insert((*k).into(), v.clone());
    }
    serde_json::to_vec(&Value::Object(m)).unwrap()
}

/// Inputs that broke, or could break, a parser. Fuzz crashes land here.
#[test]
fn corpus() {
    let deep_arrays = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let deep_objects = format!("{}1{}", "{\"a\":".repeat(10_000), "}".repeat(10_000));
    let huge = "\u{1F600}\u{202E}\u{0}\u{FFFF}".repeat(16 << 10);
    let payloads: Vec<Vec<u8>> = vec![
        vec![],
        b" ".to_vec(),
        b"{".to_vec(),
        b"{}".to_vec(),
        b"[]".to_vec(),
        b"null".to_vec(),
        b"\xEF\xBB\xBF{}".to_vec(),
        b"{\"eventName\":\"\xff\"}".to_vec(),
        deep_arrays.clone().into_bytes(),
        deep_objects.clone().into_bytes(),
        payload_with(&[("eventName", 123.into())]),
        payload_with(&[("eventName", "".into())]),
        payload_with(&[("facialId", Value::Null)]),
        payload_with(&[("appId", "fioa-other".into())]),
        payload_with(&[("clientIp", serde_json::json!(["1.2.3.4"]))]),
        payload_with(&[("details", serde_json::json!({"age": "NaN", "gender": 7}))]),
        payload_with(&[("details", serde_json::json!({"age": 1e308}))]),
        payload_with(&[("details", serde_json::json!([1, 2, 3]))]),
        payload_with(&[("facialId", huge.clone().into())]),
        payload_with(&[("eventName", "\u{0}\u{202E}ENROLL".into())]),
        format!(
            r#"{{"eventName":"AUTH","facialId":"f","appId":"{APP}","clientIp":"1","eventName":"X"}}"#
        )
        .into_bytes(),
        format!(r#"{{"eventName":"AUTH","facialId":"f","appId":"{APP}","clientIp":"1","n":1e999999}}"#)
            .into_bytes(),
    ];
    for p in &payloads {
        check_payload(p);
    }

    let configs = [
        String::new(),
        "\0".into(),
        ":".into(),
        "- - - -".into(),
        "applications: [".into(),
        "&a [*a]".into(),
        "a: &a\n  b: *a\nc: *a\n".into(),
        // A "billion laughs" of aliases.
        "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n\
         c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n\
         e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: [*e, *e, *e, *e, *e, *e, *e, *e, *e]\n"
            .into(),
        format!("listen: {}", "9".repeat(10_000)),
        format!("applications:\n{}", "  - ".repeat(5000)),
        "listen: ${".into(),
        "listen: ${A:-${B:-${C}}}".into(),
        "ingress: { max_body: 99999999999999999999999TiB }".into(),
        "store: { retention: 18446744073709551616d }".into(),
        "destinations: { x: { type: http, url: \"http://[::1\" } }".into(),
        "routes: [{ match: { details.age: { min: .nan, max: -.inf } }, to: [] }]".into(),
        "\u{FEFF}applications: []".into(),
        huge.clone(),
    ];
    for c in &configs {
        check_config(c);
    }

    let templates = [
        "{{ details.age * 2 }}",
        "{% for k in details %}{{ k }}{% endfor %}",
        "{{ facialId | upper }}{{ nothing.deeper.still }}",
        "{{ eventName[0:1000000] }}",
        "{% if details.age > 18 %}adult{% endif %}",
        "{{ received_at }} {{ event_id }}",
    ];
    let bodies = [
        payload_with(&[]),
        payload_with(&[("details", serde_json::json!({"age": "31", "gender": [1]}))]),
        payload_with(&[("details", Value::Null)]),
        payload_with(&[("facialId", huge.into())]),
        b"[1,2]".to_vec(),
        b"not json".to_vec(),
        deep_arrays.into_bytes(),
    ];
    for b in &bodies {
        check_render(None, b);
        for t in templates {
            check_render(Some(t), b);
        }
    }
}

/// Every string Slack parses as mrkdwn in a message: `text` and the `text` of each
/// `mrkdwn` object in `blocks`.
fn mrkdwn_strings(message: &Value) -> Vec<&str> {
    fn walk<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
        match v {
            Value::Object(m) => {
                if m.get("type").and_then(Value::as_str) == Some("mrkdwn")
                    && let Some(t) = m.get("text").and_then(Value::as_str)
                {
                    out.push(t);
                }
                m.values().for_each(|v| walk(v, out));
            }
            Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = vec![message["text"].as_str().expect("text is always sent")];
    walk(&message["blocks"], &mut out);
    out
}

/// Slack templates whose own text has no `<`, `>` or `&`: any of those characters in a
/// message came from a value. They print every field FACEIO sends, whole objects
/// included, in `text` and in blocks.
const PROPERTY_TEXT: &str = "{{ eventName }} {{ facialId }} {{ appId }} {{ clientIp }} \
{{ details }} {{ details.gender }} {{ details.age }} {{ details.timestamp }} {{ payload }} \
{{ details.gender | upper }} {{ facialId[0:3] }} {{ nothing.at.all }}";
const PROPERTY_BLOCKS: &str = "[{ type: section, text: { type: mrkdwn, text: \"{{ facialId }} {{ details }}\" }, \
fields: [{ type: mrkdwn, text: \"`{{ clientIp }}`\" }, { type: mrkdwn, text: \"{{ payload }}\" }] }, \
{ type: context, elements: [{ type: mrkdwn, text: \"{{ eventName }} {{ appId }}\" }] }]";

/// The Slack destinations for the property: the default message, and a custom text
/// with blocks.
fn property_destinations() -> Vec<SlackDestination> {
    let yaml = format!(
        "applications:\n  - app_id: {APP}\n    token: {TOKEN}\n\
         destinations:\n  default:\n    type: slack\n    webhook_url: https://hooks.example.test/services/x\n\
         \x20 custom:\n    type: slack\n    webhook_url: https://hooks.example.test/services/y\n\
         \x20   text: {}\n    blocks: {PROPERTY_BLOCKS}\n\
         routes:\n  - to: [default, custom]\n",
        serde_json::to_string(PROPERTY_TEXT).unwrap()
    );
    let (config, _) = load_str(&yaml, Path::new("/nonexistent/relay.yaml"), &|_| None)
        .unwrap_or_else(|e| panic!("the property's config loads:\n{e}"));
    config
        .destinations
        .iter()
        .map(|d| {
            let DestinationKind::Slack(slack) = &d.kind else {
                unreachable!()
            };
            SlackDestination::new(d, slack).unwrap()
        })
        .collect()
}

/// Renders `body` with every property destination: it never fails, and every `&` in a
/// mrkdwn string starts an entity and no `<` or `>` is left (the templates have none).
fn check_escaped(destinations: &[SlackDestination], body: &[u8]) {
    let delivery = Delivery {
        id: 1,
        event_id: "ev".into(),
        destination: "slack".into(),
        attempts: 0,
        received_at_ms: 1_795_000_000_000,
        body: Bytes::copy_from_slice(body),
        claim: None,
    };
    for dest in destinations {
        let message = dest
            .render(&delivery)
            .unwrap_or_else(|e| panic!("render failed: {e}"));
        for s in mrkdwn_strings(&message) {
            assert!(!s.contains(['<', '>']), "unescaped < or > in {s:?}");
            for (i, _) in s.match_indices('&') {
                assert!(
                    ["&amp;", "&lt;", "&gt;"]
                        .iter()
                        .any(|e| s[i..].starts_with(e)),
                    "bare & in {s:?}"
                );
            }
        }
    }
}

/// A JSON object payload as FACEIO would store it, any shape, with `<`, `>` and `&`
/// likely in its strings.
fn any_object() -> impl Strategy<Value = Vec<u8>> {
    let hostile = prop_oneof![
        "[<>&`a-z \n]{0,20}",
        Just("<!channel> <https://evil.example|x> &amp; `".to_string()),
    ];
    (
        prop::collection::btree_map(
            prop_oneof![
                Just("eventName".to_string()),
                Just("facialId".to_string()),
                Just("appId".to_string()),
                Just("clientIp".to_string()),
                Just("details".to_string()),
                Just("payload".to_string()),
                "[a-z]{1,6}",
            ],
            prop_oneof![json_value(), hostile.clone().prop_map(Value::from)],
            0..8,
        ),
        prop::collection::btree_map("[a-z]{1,6}", hostile.prop_map(Value::from), 0..4),
    )
        .prop_map(|(fields, details)| {
            let mut m: Map<String, Value> = fields.into_iter().collect();
            if !details.is_empty() && !m.contains_key("details") {
                m.insert(
                    "details".into(),
                    Value::Object(details.into_iter().collect()),
                );
            }
            serde_json::to_vec(&Value::Object(m)).unwrap()
        })
}

/// Odd strings: control characters, bidi overrides, emoji, lone surrogates as escapes.
fn odd_string() -> impl Strategy<Value = String> {
    prop_oneof![
        ".{0,40}",
        "[\u{0}-\u{1F}\u{202A}-\u{202E}\u{FEFF}\u{1F600}-\u{1F64F}a-zA-Z0-9 ]{0,40}",
        Just("\\ud800".to_string()),
        (1usize..20_000).prop_map(|n| "é".repeat(n)),
    ]
}

/// Any JSON value, a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        odd_string().prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::from),
            prop::collection::btree_map(odd_string(), inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A FACEIO-shaped object whose fields may be missing, of the wrong type or odd.
fn faceio_like() -> impl Strategy<Value = Vec<u8>> {
    let field = |good: &'static str| {
        prop_oneof![
            3 => Just(Some(Value::from(good))),
            1 => Just(None),
            1 => json_value().prop_map(Some),
            1 => odd_string().prop_map(|s| Some(Value::from(s))),
        ]
    };
    (
        field("ENROLL"),
        field("face-1"),
        field(APP),
        field("203.0.113.7"),
        prop::option::of(json_value()),
        prop::collection::btree_map("[a-z]{1,8}", json_value(), 0..4),
    )
        .prop_map(|(event, face, app, ip, details, extra)| {
            let mut m = Map::new();
            for (k, v) in [
                ("eventName", event),
                ("facialId", face),
                ("appId", app),
                ("clientIp", ip),
                ("details", details),
            ] {
                if let Some(v) = v {
                    m.insert(k.into(), v);
                }
            }
            m.extend(extra);
            serde_json::to_vec(&Value::Object(m)).unwrap()
        })
}

/// YAML-ish text: keys the config knows, values of every kind, odd indentation.
fn yaml_like() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        Just("listen"),
        Just("admin_listen"),
        Just("webhook_path"),
        Just("ingress"),
        Just("max_body"),
        Just("store"),
        Just("path"),
        Just("applications"),
        Just("app_id"),
        Just("token"),
        Just("token_file"),
        Just("destinations"),
        Just("type"),
        Just("url"),
        Just("retry"),
        Just("max_attempts"),
        Just("routes"),
        Just("match"),
        Just("to"),
        Just("details.age"),
        Just("text"),
    ];
    let value = prop_oneof![
        Just("".to_string()),
        Just("http".to_string()),
        Just("slack".to_string()),
        Just("127.0.0.1:0".to_string()),
        Just("[a, b]".to_string()),
        Just("{ min: 1, max: 0 }".to_string()),
        Just("${X:-y}".to_string()),
        Just("\"{{ x }\"".to_string()),
        Just("10ms".to_string()),
        Just("-1".to_string()),
        Just("&a 1".to_string()),
        Just("*a".to_string()),
        "[ -~]{0,12}",
    ];
    prop::collection::vec((0usize..4, key, value, any::<bool>()), 0..24).prop_map(|lines| {
        lines
            .into_iter()
            .map(|(indent, k, v, dash)| {
                format!(
                    "{}{}{k}: {v}\n",
                    "  ".repeat(indent),
                    if dash { "- " } else { "" }
                )
            })
            .collect()
    })
}

/// Template text from minijinja's pieces, balanced or not.
fn template_like() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("{{ eventName }}"),
        Just("{{ details.age }}"),
        Just("{{ details.gender | upper }}"),
        Just("{{ facialId[0:3] }}"),
        Just("{% if details %}"),
        Just("{% endif %}"),
        Just("{% for x in details %}{{ x }}"),
        Just("{% endfor %}"),
        Just("{{ "),
        Just(" }}"),
        Just("{# c #}"),
        Just("{{ nothing.at.all }}"),
        Just("{{ clientIp ~ appId }}"),
        Just("text "),
    ];
    prop::collection::vec(piece, 0..10).prop_map(|p| p.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn verify_answers_any_bytes(body in prop::collection::vec(any::<u8>(), 0..512)) {
        check_payload(&body);
    }

    #[test]
    fn verify_answers_any_object_with_start_brace(tail in prop::collection::vec(any::<u8>(), 0..512)) {
        let mut body = b"{".to_vec();
        body.extend(tail);
        check_payload(&body);
    }

    #[test]
    fn verify_answers_faceio_shaped_objects(body in faceio_like()) {
        check_payload(&body);
    }

    #[test]
    fn verify_answers_any_json(value in json_value()) {
        check_payload(&serde_json::to_vec(&value).unwrap());
    }

    #[test]
    fn config_loads_or_errors_with_positions(text in yaml_like()) {
        check_config(&text);
    }

    #[test]
    fn config_answers_any_text(text in ".{0,300}") {
        check_config(&text);
    }

    #[test]
    fn a_mutated_valid_config_loads_or_errors_with_positions(
        cut in 0usize..4000, len in 0usize..40, insert in "[ -~\n]{0,12}",
    ) {
        let full = include_str!("config/valid/full.yaml");
        let at = full.floor_char_boundary(cut.min(full.len()));
        let end = full.floor_char_boundary((at + len).min(full.len()));
        let mutated = format!("{}{insert}{}", &full[..at], &full[end..]);
        check_config(&mutated);
    }

    #[test]
    fn the_default_template_renders_any_payload(body in faceio_like()) {
        check_render(None, &body);
    }

    #[test]
    fn slack_messages_render_any_payload_and_escape_every_value(body in any_object()) {
        thread_local! {
            static DESTINATIONS: Vec<SlackDestination> = property_destinations();
        }
        DESTINATIONS.with(|d| check_escaped(d, &body));
    }

    #[test]
    fn slack_messages_render_any_json_value(value in json_value()) {
        thread_local! {
            static DESTINATIONS: Vec<SlackDestination> = property_destinations();
        }
        DESTINATIONS.with(|d| check_escaped(d, &serde_json::to_vec(&value).unwrap()));
    }

    #[test]
    fn templates_render_any_json_or_fail_permanently(template in template_like(), value in json_value()) {
        check_render(Some(&template), &serde_json::to_vec(&value).unwrap());
    }
}
