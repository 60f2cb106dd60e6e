//! The Slack message: the configured `text` and `blocks`, or the default message.
//!
//! The payload is `{"text": …}` plus `"blocks": […]` when there are blocks; `text` is
//! always there (Slack shows it in notifications, and requires it next to blocks).
//! Without `text`, the default text is used; without either, the default blocks too.
//!
//! "Always sent": Slack refuses an empty `text` and empty text objects, so a `text`
//! that renders empty is replaced by the default text, a text object that renders
//! empty is left out (and a block left with nothing to show with it), and text objects
//! are cut to Slack's length limits. A configured template that fails on some event
//! (one the samples did not expose, such as arithmetic on a string) sends the default
//! message instead and says why in [`Rendered::fallback`].

use minijinja::Environment;
use minijinja::value::Value;
use serde_json::json;

use super::{
    Leaf, Parent, Step, TemplateError, Tree, check_samples, compile_tree, environment, render_tree,
};

/// The default `text`.
pub const DEFAULT_TEXT: &str = "FACEIO *{{ eventName }}* for Facial ID `{{ facialId }}` \
(app `{{ appId }}`, IP {{ clientIp }})\
{% if details %}{% if details.gender %} · gender {{ details.gender }}{% endif %}\
{% if details.age %} · age ~{{ details.age }}{% endif %}\
{% if details.timestamp %} · {{ details.timestamp }}{% endif %}{% endif %}";

/// The default `blocks`: a header, the fields, and the event's ID and time.
pub fn default_blocks() -> serde_json::Value {
    json!([
        {"type": "header", "text": {"type": "plain_text", "text": "FACEIO {{ eventName }}"}},
        {"type": "section", "fields": [
            {"type": "mrkdwn", "text": "*Event*\n{{ eventName }}"},
            {"type": "mrkdwn", "text": "*Facial ID*\n`{{ facialId }}`"},
            {"type": "mrkdwn", "text": "*App*\n`{{ appId }}`"},
            {"type": "mrkdwn", "text": "*IP*\n{{ clientIp }}"},
            {"type": "mrkdwn", "text": "{% if details %}*Details*\n\
                {% if details.gender %}{{ details.gender }}{% endif %}\
                {% if details.age %} · age ~{{ details.age }}{% endif %}\
                {% if details.timestamp %} · {{ details.timestamp }}{% endif %}{% endif %}"}
        ]},
        {"type": "context", "elements": [
            {"type": "mrkdwn", "text": "event `{{ event_id }}` · received {{ received_at }}"}
        ]}
    ])
}

/// Slack's limits on text object lengths (characters): a header's text, a section's
/// field, and any other text object.
const HEADER_MAX: usize = 150;
const FIELD_MAX: usize = 2000;
const TEXT_MAX: usize = 3000;
/// Slack accepts at most this many blocks in a message.
const MAX_BLOCKS: usize = 50;

/// A compiled Slack message.
pub struct SlackMessage {
    env: Environment<'static>,
    /// The configured `text` and `blocks`; `None` when neither is configured.
    custom: Option<Parts>,
    /// The default message, also the fallback for a configured one that fails.
    default: Parts,
}

struct Parts {
    text: Option<Tree>,
    blocks: Option<Tree>,
}

/// One rendered message.
#[derive(Debug)]
pub struct Rendered {
    /// The JSON to POST to the incoming webhook.
    pub payload: serde_json::Value,
    /// Why the default message was sent instead of the configured one, if it was.
    pub fallback: Option<String>,
}

/// In `blocks`, values are escaped in the `text` of a `mrkdwn` object (where Slack
/// reads mentions and links) and left alone elsewhere (`plain_text`, URLs, IDs).
fn block_leaf(path: &[Step], parent: Parent<'_>) -> Leaf {
    let is_text = matches!(path.last(), Some(Step::Key(k)) if k == "text");
    let in_mrkdwn =
        parent.is_some_and(|p| p.get("type").and_then(|t| t.as_str()) == Some("mrkdwn"));
    if is_text && in_mrkdwn {
        Leaf::Mrkdwn
    } else {
        Leaf::Raw
    }
}

fn compile_parts(
    env: &mut Environment<'static>,
    prefix: Option<&str>,
    text: Option<&str>,
    blocks: Option<&serde_json::Value>,
    errors: &mut Vec<TemplateError>,
) -> Parts {
    let start = |key: &str| -> Vec<Step> {
        prefix
            .map(|p| Step::Key(p.to_string()))
            .into_iter()
            .chain([Step::Key(key.to_string())])
            .collect()
    };
    let text = text.map(|t| {
        let value = serde_json::Value::String(t.to_string());
        compile_tree(
            env,
            &value,
            &mut start("text"),
            None,
            &|_, _| Leaf::Mrkdwn,
            errors,
        )
    });
    let blocks =
        blocks.map(|b| compile_tree(env, b, &mut start("blocks"), None, &block_leaf, errors));
    Parts { text, blocks }
}

/// `blocks` must be a list of 1 to 50 mappings, each with a `type`.
fn check_block_shape(blocks: &serde_json::Value, errors: &mut Vec<TemplateError>) {
    let at = |i: Option<usize>| {
        let mut p = vec![Step::Key("blocks".into())];
        p.extend(i.map(Step::Index));
        p
    };
    let Some(items) = blocks.as_array() else {
        errors.push(TemplateError {
            at: at(None),
            message: "expected a list of Block Kit blocks".into(),
        });
        return;
    };
    if items.is_empty() || items.len() > MAX_BLOCKS {
        errors.push(TemplateError {
            at: at(None),
            message: format!(
                "Slack takes 1 to {MAX_BLOCKS} blocks, found {}",
                items.len()
            ),
        });
    }
    for (i, block) in items.iter().enumerate() {
        if !block.get("type").is_some_and(serde_json::Value::is_string) {
            errors.push(TemplateError {
                at: at(Some(i)),
                message: "a block is a mapping with a `type` (e.g. `section`)".into(),
            });
        }
    }
}

impl SlackMessage {
    /// Compiles the configured `text` and `blocks` (either may be absent) and renders
    /// them against the sample events; every problem is returned.
    pub fn new(
        text: Option<&str>,
        blocks: Option<&serde_json::Value>,
    ) -> Result<Self, Vec<TemplateError>> {
        let mut env = environment();
        let mut errors = Vec::new();
        let default = compile_parts(
            &mut env,
            Some("default"),
            Some(DEFAULT_TEXT),
            Some(&default_blocks()),
            &mut errors,
        );
        assert!(
            errors.is_empty(),
            "the default message compiles: {errors:?}"
        );
        if let Some(b) = blocks {
            check_block_shape(b, &mut errors);
        }
        let custom = (text.is_some() || blocks.is_some())
            .then(|| compile_parts(&mut env, None, text, blocks, &mut errors));
        if let Some(parts) = &custom {
            for (key, tree) in [("text", &parts.text), ("blocks", &parts.blocks)] {
                if let Some(tree) = tree {
                    check_samples(&env, tree, &mut vec![Step::Key(key.into())], &mut errors);
                }
            }
        }
        if errors.is_empty() {
            Ok(Self {
                env,
                custom,
                default,
            })
        } else {
            Err(errors)
        }
    }

    /// Renders the message for one event (`ctx` from [`super::context`]). Fails only if
    /// the default message itself cannot render, which the tests rule out.
    pub fn render(&self, ctx: &serde_json::Value) -> Result<Rendered, String> {
        let ctx = Value::from_serialize(ctx);
        let default_text = || -> Result<String, String> {
            let tree = self.default.text.as_ref().expect("the default has text");
            match render_tree(&self.env, tree, &ctx) {
                Ok(serde_json::Value::String(s)) => Ok(s),
                Ok(_) => Err("the default text is not a string".into()),
                Err(e) => Err(format!("the default text failed: {}", short(&e))),
            }
        };
        let default = || -> Result<serde_json::Value, String> {
            let blocks = self
                .default
                .blocks
                .as_ref()
                .expect("the default has blocks");
            let blocks = render_tree(&self.env, blocks, &ctx)
                .map_err(|e| format!("the default blocks failed: {}", short(&e)))?;
            Ok(payload(default_text()?, Some(blocks)))
        };
        let Some(custom) = &self.custom else {
            return Ok(Rendered {
                payload: default()?,
                fallback: None,
            });
        };
        let rendered = (|| -> Result<serde_json::Value, minijinja::Error> {
            let text = match &custom.text {
                Some(tree) => match render_tree(&self.env, tree, &ctx)? {
                    serde_json::Value::String(s) if !s.trim().is_empty() => Some(s),
                    _ => None,
                },
                None => None,
            };
            let blocks = custom
                .blocks
                .as_ref()
                .map(|b| render_tree(&self.env, b, &ctx))
                .transpose()?;
            Ok(json!({"text": text, "blocks": blocks}))
        })();
        match rendered {
            Ok(parts) => {
                let text = match parts["text"].as_str() {
                    Some(s) => s.to_string(),
                    None => default_text()?,
                };
                let blocks = (!parts["blocks"].is_null()).then(|| parts["blocks"].clone());
                Ok(Rendered {
                    payload: payload(text, blocks),
                    fallback: None,
                })
            }
            Err(e) => Ok(Rendered {
                payload: default()?,
                fallback: Some(format!(
                    "the configured template failed ({}); sent the default message",
                    short(&e)
                )),
            }),
        }
    }
}

/// An error's kind, detail and template, without the template source or values.
fn short(e: &minijinja::Error) -> String {
    let mut s = e.kind().to_string();
    if let Some(d) = e.detail() {
        s.push_str(": ");
        s.push_str(d);
    }
    if let Some(name) = e.name() {
        s.push_str(&format!(
            " (in {})",
            name.trim_end_matches(super::RAW_SUFFIX)
        ));
    }
    s
}

/// `{"text": …, "blocks": […]}` with the blocks made acceptable to Slack.
fn payload(text: String, blocks: Option<serde_json::Value>) -> serde_json::Value {
    let mut out = json!({ "text": text });
    if let Some(serde_json::Value::Array(blocks)) = blocks {
        let blocks: Vec<serde_json::Value> = blocks.into_iter().filter_map(tidy_block).collect();
        if !blocks.is_empty() {
            out["blocks"] = serde_json::Value::Array(blocks);
        }
    }
    out
}

/// A mapping with `type: mrkdwn` or `plain_text` and a string `text`.
fn text_of(value: &serde_json::Value) -> Option<&str> {
    let t = value.get("type")?.as_str()?;
    matches!(t, "mrkdwn" | "plain_text")
        .then(|| value.get("text")?.as_str())
        .flatten()
}

fn is_empty_text(value: &serde_json::Value) -> bool {
    text_of(value).is_some_and(|t| t.trim().is_empty())
}

/// Leaves out empty text objects and cuts long ones, within any value.
fn tidy(value: &mut serde_json::Value, max: usize) {
    match value {
        serde_json::Value::Array(items) => {
            items.retain(|v| !is_empty_text(v));
            for v in items {
                tidy(v, max);
            }
        }
        serde_json::Value::Object(map) => {
            if let Some(text) = text_of(&serde_json::Value::Object(map.clone())) {
                let cut = truncate(text, max);
                map.insert("text".into(), cut.into());
                return;
            }
            map.retain(|_, v| !is_empty_text(v));
            for (k, v) in map.iter_mut() {
                let limit = match k.as_str() {
                    "fields" => FIELD_MAX,
                    _ => max,
                };
                tidy(v, limit);
            }
        }
        _ => {}
    }
}

/// One rendered block, tidied; `None` when it has nothing left to show.
fn tidy_block(mut block: serde_json::Value) -> Option<serde_json::Value> {
    let kind = block
        .get("type")
        .and_then(|t| t.as_str())
        .unwrap_or("")
        .to_string();
    let max = if kind == "header" {
        HEADER_MAX
    } else {
        TEXT_MAX
    };
    tidy(&mut block, max);
    // Slack refuses an empty `fields` list: a section whose fields all rendered empty
    // keeps its text only.
    if let Some(map) = block.as_object_mut()
        && map
            .get("fields")
            .and_then(|f| f.as_array())
            .is_some_and(Vec::is_empty)
    {
        map.remove("fields");
    }
    let non_empty = |key: &str| match block.get(key) {
        Some(serde_json::Value::Array(a)) => !a.is_empty(),
        Some(_) => true,
        None => false,
    };
    let keep = match kind.as_str() {
        "header" => non_empty("text"),
        "section" => non_empty("text") || non_empty("fields"),
        "context" => non_empty("elements"),
        _ => true,
    };
    keep.then_some(block)
}

/// Cuts `text` to `max` characters with an ellipsis, never inside an `&…;` entity.
fn truncate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_string();
    }
    let mut cut: String = text.chars().take(max.saturating_sub(1)).collect();
    if let Some(amp) = cut.rfind('&')
        && !cut[amp..].contains(';')
        && cut.len() - amp < "&amp;".len()
    {
        cut.truncate(amp);
    }
    cut.push('…');
    cut
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(body: &str) -> serde_json::Value {
        super::super::context(body.as_bytes(), "ev-1", 0).unwrap()
    }

    const HOSTILE: &str = "<!channel> <https://evil.example|click> & co `x` \n*boom*";

    #[test]
    fn default_message_names_event_face_app_ip_and_details() {
        let m = SlackMessage::new(None, None).unwrap();
        let r = m.render(&ctx(r#"{"eventName":"ENROLL","facialId":"f-9","appId":"fioa1","clientIp":"1.2.3.4","details":{"timestamp":"2026-11-27","gender":"female","age":31}}"#)).unwrap();
        let text = r.payload["text"].as_str().unwrap();
        for part in [
            "ENROLL",
            "f-9",
            "fioa1",
            "1.2.3.4",
            "female",
            "31",
            "2026-11-27",
        ] {
            assert!(text.contains(part), "{part} missing from {text}");
        }
        let blocks = r.payload["blocks"].to_string();
        for part in [
            "header",
            "FACEIO ENROLL",
            "*Facial ID*",
            "female",
            "ev-1",
            "1970-01-01T00:00:00Z",
        ] {
            assert!(blocks.contains(part), "{part} missing from {blocks}");
        }
        let auth = m
            .render(&ctx(
                r#"{"eventName":"AUTH","facialId":"f-9","appId":"fioa1","clientIp":"1.2.3.4"}"#,
            ))
            .unwrap();
        assert!(
            !auth.payload.to_string().contains("Details"),
            "{}",
            auth.payload
        );
        assert_eq!(
            auth.payload["blocks"][1]["fields"]
                .as_array()
                .unwrap()
                .len(),
            4,
            "the empty details field is left out"
        );
    }

    #[test]
    fn values_are_escaped_and_template_text_is_not() {
        let blocks = json!([
            {"type": "section", "text": {"type": "mrkdwn", "text": "<!here> {{ facialId }}"}},
            {"type": "header", "text": {"type": "plain_text", "text": "{{ facialId }}"}},
        ]);
        let m = SlackMessage::new(
            Some("<!here> {{ facialId }} {{ facialId | mrkdwn_raw }}"),
            Some(&blocks),
        )
        .unwrap();
        let body = serde_json::json!({"facialId": HOSTILE}).to_string();
        let r = m.render(&ctx(&body)).unwrap();
        let escaped = "&lt;!channel&gt; &lt;https://evil.example|click&gt; &amp; co ˋxˋ  *boom*";
        assert_eq!(r.payload["text"], format!("<!here> {escaped} {HOSTILE}"));
        assert_eq!(
            r.payload["blocks"][0]["text"]["text"],
            format!("<!here> {escaped}")
        );
        assert_eq!(
            r.payload["blocks"][1]["text"]["text"], HOSTILE,
            "plain_text is not parsed by Slack"
        );
    }

    #[test]
    fn missing_fields_render_empty() {
        let m = SlackMessage::new(Some("{{eventName}} {{details.gender}}{% if details %}!{% endif %}{{ details.age | default('?') }}"), None).unwrap();
        let r = m
            .render(&ctx(r#"{"eventName":"AUTH","details":null}"#))
            .unwrap();
        assert_eq!(r.payload["text"], "AUTH ?");
        assert!(r.fallback.is_none());
    }

    #[test]
    fn templates_that_cannot_render_are_errors_with_positions() {
        let errors = SlackMessage::new(Some("{{ eventName | mrkdwn_rwa }}"), None)
            .err()
            .unwrap();
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].at, vec![Step::Key("text".into())]);
        assert!(
            errors[0].message.contains("unknown filter"),
            "{}",
            errors[0].message
        );
        assert!(
            errors[0].message.contains("line 1, column"),
            "{}",
            errors[0].message
        );
        let errors = SlackMessage::new(Some("{{ x | safe }}"), None)
            .err()
            .unwrap();
        assert!(errors[0].message.contains("unknown filter"), "{errors:?}");
        let blocks = json!([{"type": "section", "text": {"type": "mrkdwn", "text": "{% if %}"}}]);
        let errors = SlackMessage::new(None, Some(&blocks)).err().unwrap();
        assert_eq!(
            errors[0].at,
            vec![
                Step::Key("blocks".into()),
                Step::Index(0),
                Step::Key("text".into()),
                Step::Key("text".into())
            ]
        );
    }

    #[test]
    fn a_template_failing_on_one_event_falls_back_to_the_default_message() {
        let m = SlackMessage::new(
            Some("{% if details %}{{ details.age + 1 }}{% endif %}"),
            None,
        )
        .unwrap();
        let r = m
            .render(&ctx(
                r#"{"eventName":"ENROLL","facialId":"f","details":{"age":"old"}}"#,
            ))
            .unwrap();
        assert!(
            r.fallback.as_deref().unwrap().contains("invalid operation"),
            "{r:?}"
        );
        assert!(
            r.payload["text"]
                .as_str()
                .unwrap()
                .starts_with("FACEIO *ENROLL*"),
            "{r:?}"
        );
    }

    #[test]
    fn an_empty_text_is_replaced_and_empty_blocks_left_out() {
        let blocks = json!([
            {"type": "section", "text": {"type": "mrkdwn", "text": "{% if details %}{{ details.gender }}{% endif %}"}},
            {"type": "divider"},
            {"type": "section", "text": {"type": "mrkdwn", "text": "kept"},
             "fields": [{"type": "mrkdwn", "text": "{{ details.age }}"}]},
        ]);
        let m = SlackMessage::new(Some("{% if details %}x{% endif %}"), Some(&blocks)).unwrap();
        let r = m
            .render(&ctx(r#"{"eventName":"AUTH","facialId":"f"}"#))
            .unwrap();
        assert!(
            r.payload["text"]
                .as_str()
                .unwrap()
                .starts_with("FACEIO *AUTH*")
        );
        assert_eq!(
            r.payload["blocks"],
            json!([{"type": "divider"}, {"type": "section", "text": {"type": "mrkdwn", "text": "kept"}}])
        );
    }

    #[test]
    fn long_texts_are_cut_to_slacks_limits_outside_entities() {
        let m = SlackMessage::new(None, None).unwrap();
        let body = serde_json::json!({"eventName": "&".repeat(400), "facialId": "f"}).to_string();
        let r = m.render(&ctx(&body)).unwrap();
        let header = r.payload["blocks"][0]["text"]["text"].as_str().unwrap();
        assert!(header.chars().count() <= HEADER_MAX, "{header}");
        let field = r.payload["blocks"][1]["fields"][0]["text"]
            .as_str()
            .unwrap();
        assert!(field.chars().count() <= FIELD_MAX);
        assert!(field.ends_with("&amp;…"), "{}", &field[field.len() - 12..]);
        assert_eq!(truncate("ab&amp;cd", 5), "ab…");
    }

    #[test]
    fn blocks_must_be_a_list_of_typed_mappings() {
        let errors = SlackMessage::new(None, Some(&json!({"type": "section"})))
            .err()
            .unwrap();
        assert!(errors[0].message.contains("list"), "{errors:?}");
        let errors = SlackMessage::new(None, Some(&json!([{"text": "x"}])))
            .err()
            .unwrap();
        assert_eq!(
            errors[0].at,
            vec![Step::Key("blocks".into()), Step::Index(0)]
        );
    }
}
