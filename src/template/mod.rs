//! Templates over events: the Slack message (`text`, `blocks`), the HTTP `body`, and the
//! one-line names of the queue kinds (NATS subject, Redis stream, AMQP routing key).
//!
//! Every template is [minijinja](https://docs.rs/minijinja) over the FACEIO payload as
//! received, plus `event_id` and `received_at`. The invariants, which the config loader
//! and the destinations rely on:
//!
//! - **Missing fields are empty, never an error.** Undefined values are chainable:
//!   `{{ details.gender }}` on an AUTH event (FACEIO sends `details` only on enrollment)
//!   prints nothing, `{% if details %}` is false and `default()` applies. `none` (a JSON
//!   `null`) also prints nothing.
//! - **Slack values are escaped, the template's own text is not.** Every value a Slack
//!   template prints in `text` or in a mrkdwn text object goes through
//!   [`mrkdwn::escape`] (minijinja's auto-escape with our formatter, so no call site can
//!   forget it); literal template text is sent as written, so `<!here>` in the template
//!   still pings. `| mrkdwn_raw` is the one opt-out (minijinja's `safe` is removed so
//!   Jinja habits from HTML do not opt out by accident).
//! - **A template the config accepts has rendered.** [`SlackMessage::new`] and
//!   [`JsonBody::new`] compile every template and render it against a sample of each
//!   documented event ([`samples`]); an unknown filter or a syntax error is a config
//!   error with the template's line and column, not a dead letter per event.
//! - **JSON bodies are built, not printed.** A body leaf renders to a string that
//!   `serde_json` encodes, so no value can break out of its string; a leaf that is one
//!   expression keeps its type.

mod json;
pub mod mrkdwn;
mod slack;
mod text;

use std::fmt::Write as _;
use std::time::{Duration, UNIX_EPOCH};

use minijinja::value::Value;
use minijinja::{AutoEscape, Environment, State, UndefinedBehavior};

pub use json::JsonBody;
pub use slack::{DEFAULT_TEXT, Rendered, SlackMessage, default_blocks};
pub use text::TextTemplate;

/// One step of the path to a template inside a destination's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Key(String),
    Index(usize),
}

/// A template that does not compile or does not render; found when the config is
/// loaded. `at` is relative to the destination (`text`, `blocks[0].text.text`,
/// `body.user.age`), so the loader can point at the line and column of the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct TemplateError {
    pub at: Vec<Step>,
    pub message: String,
}

/// The auto-escape mode of templates whose values go out as they are.
const RAW_SUFFIX: &str = "#raw";
/// minijinja's name for our custom auto-escape mode.
const MRKDWN: &str = "mrkdwn";

/// The environment every template lives in: chainable undefined, mrkdwn escaping for
/// every template whose name does not end in [`RAW_SUFFIX`], and the `mrkdwn_raw`
/// opt-out.
fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Chainable);
    env.set_auto_escape_callback(|name| {
        if name.ends_with(RAW_SUFFIX) {
            AutoEscape::None
        } else {
            AutoEscape::Custom(MRKDWN)
        }
    });
    env.set_formatter(format_value);
    env.remove_filter("safe");
    env.add_filter("mrkdwn_raw", |value: Value| {
        Value::from_safe_string(printable(&value))
    });
    env
}

/// The text of a printed value: undefined and `none` print nothing.
fn printable(value: &Value) -> String {
    if value.is_undefined() || value.is_none() {
        String::new()
    } else {
        value.to_string()
    }
}

/// Writes one printed value, escaped for mrkdwn unless the template is raw or the value
/// was passed through `mrkdwn_raw`. The template's name decides, not the state's
/// auto-escape flag, so `{% autoescape false %}` is not a second, undocumented opt-out.
fn format_value(
    out: &mut minijinja::Output,
    state: &State,
    value: &Value,
) -> Result<(), minijinja::Error> {
    let text = printable(value);
    let escaped = if state.name().ends_with(RAW_SUFFIX) || value.is_safe() {
        text
    } else {
        mrkdwn::escape(&text)
    };
    out.write_str(&escaped)
        .map_err(|_| minijinja::Error::new(minijinja::ErrorKind::WriteFailure, "write failed"))
}

/// The context templates see: the payload's fields plus `event_id` and `received_at`
/// (RFC 3339, seconds). A payload that is not a JSON object (ingress never stores one)
/// gives only those two.
pub fn context(
    body: &[u8],
    event_id: &str,
    received_at_ms: i64,
) -> Result<serde_json::Value, String> {
    let parsed: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("stored payload is not JSON: {e}"))?;
    let mut map = match parsed {
        serde_json::Value::Object(map) => map,
        _ => serde_json::Map::new(),
    };
    map.insert("event_id".into(), event_id.into());
    let at = UNIX_EPOCH + Duration::from_millis(received_at_ms.max(0) as u64);
    map.insert(
        "received_at".into(),
        humantime::format_rfc3339_seconds(at).to_string().into(),
    );
    Ok(serde_json::Value::Object(map))
}

/// The documented events as FACEIO sends them: ENROLL with `details`, AUTH and
/// DELETION without. Templates are rendered against these at load, and `check` shows
/// the results.
pub fn samples(app_id: &str) -> Vec<(&'static str, serde_json::Value)> {
    let event = |name: &'static str, details: bool| {
        let mut payload = serde_json::json!({
            "eventName": name,
            "facialId": "5b1a8c7e2f3d4e6a9b0c1d2e3f4a5b6c7d8e9f0a1b2c3d4e5f6a7b8c9d0e1f2a",
            "appId": app_id,
            "clientIp": "203.0.113.7",
        });
        if details {
            payload["details"] =
                serde_json::json!({"timestamp": "2026-11-27", "gender": "female", "age": 31});
        }
        let body = serde_json::to_vec(&payload).expect("a JSON value serializes");
        let ctx = context(
            &body,
            "0199c0de-5a3e-7000-8000-00000000a11e",
            1_795_766_400_000,
        )
        .expect("the sample is JSON");
        (name, ctx)
    };
    vec![
        event("ENROLL", true),
        event("AUTH", false),
        event("DELETION", false),
    ]
}

/// A template tree: a YAML/JSON value whose string leaves are templates.
#[derive(Debug)]
enum Tree {
    /// A number, boolean or null, sent as written.
    Value(serde_json::Value),
    /// A string leaf: the name of its template in the environment.
    Template(String),
    /// A string leaf that is exactly one `{{ expression }}`: its value keeps its type.
    Expr(String),
    Seq(Vec<Tree>),
    Map(Vec<(String, Tree)>),
}

/// How a string leaf is compiled, decided from its place in the tree.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Leaf {
    /// A template whose printed values are escaped for mrkdwn.
    Mrkdwn,
    /// A template whose printed values go out as they are.
    Raw,
    /// Raw, and a leaf that is one expression keeps its type (JSON bodies).
    Typed,
}

/// The mapping a leaf sits in, if any.
type Parent<'a> = Option<&'a serde_json::Map<String, serde_json::Value>>;

/// Decides how a leaf compiles from its path and the mapping it sits in.
type LeafKind<'a> = &'a dyn Fn(&[Step], Parent<'_>) -> Leaf;

/// `text`, `blocks[0].text.text`: the path as a user reads it in the config.
fn display_path(path: &[Step]) -> String {
    let mut s = String::new();
    for step in path {
        match step {
            Step::Key(k) if s.is_empty() => s.push_str(k),
            Step::Key(k) => {
                let _ = write!(s, ".{k}");
            }
            Step::Index(i) => {
                let _ = write!(s, "[{i}]");
            }
        }
    }
    s
}

/// Compiles every string leaf of `value` into `env`; `leaf` decides each leaf's kind
/// from its path and its parent mapping. Every error is collected.
fn compile_tree(
    env: &mut Environment<'static>,
    value: &serde_json::Value,
    path: &mut Vec<Step>,
    parent: Parent<'_>,
    leaf: LeafKind<'_>,
    errors: &mut Vec<TemplateError>,
) -> Tree {
    match value {
        serde_json::Value::String(source) => {
            let kind = leaf(path, parent);
            if kind == Leaf::Typed
                && let Some(expr) = single_expression(source)
            {
                return match env.compile_expression(expr) {
                    Ok(_) => Tree::Expr(expr.to_string()),
                    Err(e) => {
                        errors.push(TemplateError {
                            at: path.clone(),
                            message: describe(&e, source),
                        });
                        Tree::Value(serde_json::Value::Null)
                    }
                };
            }
            let mut name = display_path(path);
            if kind != Leaf::Mrkdwn {
                name.push_str(RAW_SUFFIX);
            }
            match env.add_template_owned(name.clone(), source.clone()) {
                Ok(()) => Tree::Template(name),
                Err(e) => {
                    errors.push(TemplateError {
                        at: path.clone(),
                        message: describe(&e, source),
                    });
                    Tree::Value(serde_json::Value::Null)
                }
            }
        }
        serde_json::Value::Array(items) => Tree::Seq(
            items
                .iter()
                .enumerate()
                .map(|(i, item)| {
                    path.push(Step::Index(i));
                    let t = compile_tree(env, item, path, None, leaf, errors);
                    path.pop();
                    t
                })
                .collect(),
        ),
        serde_json::Value::Object(map) => Tree::Map(
            map.iter()
                .map(|(k, v)| {
                    path.push(Step::Key(k.clone()));
                    let t = compile_tree(env, v, path, Some(map), leaf, errors);
                    path.pop();
                    (k.clone(), t)
                })
                .collect(),
        ),
        other => Tree::Value(other.clone()),
    }
}

/// The expression of a leaf written as exactly one `{{ … }}` (whitespace control and
/// surrounding spaces allowed), if it is one.
fn single_expression(source: &str) -> Option<&str> {
    let inner = source.trim().strip_prefix("{{")?.strip_suffix("}}")?;
    let inner = inner.strip_prefix('-').unwrap_or(inner);
    let inner = inner.strip_suffix('-').unwrap_or(inner);
    let nested = ["{{", "}}", "{%", "%}", "{#", "#}"];
    (!nested.iter().any(|m| inner.contains(m))).then_some(inner)
}

/// Renders a compiled tree over `ctx`. The error names the leaf that failed.
fn render_tree(
    env: &Environment<'static>,
    tree: &Tree,
    ctx: &Value,
) -> Result<serde_json::Value, minijinja::Error> {
    Ok(match tree {
        Tree::Value(v) => v.clone(),
        Tree::Template(name) => serde_json::Value::String(env.get_template(name)?.render(ctx)?),
        Tree::Expr(expr) => {
            let value = env.compile_expression(expr)?.eval(ctx)?;
            if value.is_undefined() {
                serde_json::Value::Null
            } else {
                serde_json::to_value(&value).map_err(|e| {
                    minijinja::Error::new(
                        minijinja::ErrorKind::BadSerialization,
                        format!("the value cannot be written as JSON: {e}"),
                    )
                })?
            }
        }
        Tree::Seq(items) => serde_json::Value::Array(
            items
                .iter()
                .map(|t| render_tree(env, t, ctx))
                .collect::<Result<_, _>>()?,
        ),
        Tree::Map(entries) => serde_json::Value::Object(
            entries
                .iter()
                .map(|(k, t)| Ok((k.clone(), render_tree(env, t, ctx)?)))
                .collect::<Result<_, minijinja::Error>>()?,
        ),
    })
}

/// Compiles `value` (the settings at `path`) with every leaf of kind `leaf` and renders it
/// against the sample events: the environment and tree, or every error.
fn compile_checked(
    value: &serde_json::Value,
    mut path: Vec<Step>,
    leaf: Leaf,
) -> Result<(Environment<'static>, Tree), Vec<TemplateError>> {
    let mut env = environment();
    let mut errors = Vec::new();
    let tree = compile_tree(&mut env, value, &mut path, None, &|_, _| leaf, &mut errors);
    check_samples(&env, &tree, &mut path, &mut errors);
    if errors.is_empty() {
        Ok((env, tree))
    } else {
        Err(errors)
    }
}

/// Renders `tree` against every sample event, so a template that cannot render is
/// found at load. Errors name the leaf (from the error's template name) and the event.
fn check_samples(
    env: &Environment<'static>,
    tree: &Tree,
    path: &mut Vec<Step>,
    errors: &mut Vec<TemplateError>,
) {
    let samples: Vec<(&str, Value)> = samples("fioa-sample")
        .into_iter()
        .map(|(event, ctx)| (event, Value::from_serialize(&ctx)))
        .collect();
    check_leaves(env, tree, path, &samples, errors);
}

fn check_leaves(
    env: &Environment<'static>,
    tree: &Tree,
    path: &mut Vec<Step>,
    samples: &[(&str, Value)],
    errors: &mut Vec<TemplateError>,
) {
    match tree {
        Tree::Value(_) => {}
        Tree::Template(_) | Tree::Expr(_) => {
            for (event, ctx) in samples {
                if let Err(e) = render_tree(env, tree, ctx) {
                    let source = match tree {
                        Tree::Template(name) => env
                            .get_template(name)
                            .map(|t| t.source().to_string())
                            .unwrap_or_default(),
                        Tree::Expr(expr) => expr.clone(),
                        _ => String::new(),
                    };
                    errors.push(TemplateError {
                        at: path.clone(),
                        message: format!(
                            "{} (rendering the sample {event} event)",
                            describe(&e, &source)
                        ),
                    });
                    // One error per template is enough.
                    break;
                }
            }
        }
        Tree::Seq(items) => {
            for (i, t) in items.iter().enumerate() {
                path.push(Step::Index(i));
                check_leaves(env, t, path, samples, errors);
                path.pop();
            }
        }
        Tree::Map(entries) => {
            for (k, t) in entries {
                path.push(Step::Key(k.clone()));
                check_leaves(env, t, path, samples, errors);
                path.pop();
            }
        }
    }
}

/// `unknown filter: filter mrkdwn_rwa is unknown (template line 1, column 14)`.
fn describe(e: &minijinja::Error, source: &str) -> String {
    let mut msg = format!("invalid template: {}", e.kind());
    if let Some(detail) = e.detail() {
        let _ = write!(msg, ": {detail}");
    }
    match (e.range(), e.line()) {
        (Some(range), _) if range.start <= source.len() => {
            let before = &source[..source.floor_char_boundary(range.start)];
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
            let _ = write!(msg, " (template line {line}, column {column})");
        }
        (_, Some(line)) => {
            let _ = write!(msg, " (template line {line})");
        }
        _ => {}
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn autoescape_blocks_do_not_opt_out() {
        let mut env = environment();
        env.add_template(
            "t",
            "{% autoescape false %}{{ v }}{% endautoescape %}|{{ v | e }}",
        )
        .unwrap();
        let out = env
            .get_template("t")
            .unwrap()
            .render(minijinja::context! { v => "<!channel>" });
        assert_eq!(out.unwrap(), "&lt;!channel&gt;|&lt;!channel&gt;");
    }

    #[test]
    fn one_expression_leaves_are_recognised() {
        assert_eq!(
            single_expression("{{ details.age }}"),
            Some(" details.age ")
        );
        assert_eq!(single_expression(" {{- age -}} "), Some(" age "));
        assert_eq!(single_expression("age {{ age }}"), None);
        assert_eq!(single_expression("{{ a }} and {{ b }}"), None);
        assert_eq!(single_expression("{% if a %}{{ a }}{% endif %}"), None);
    }

    #[test]
    fn errors_name_the_line_and_column_inside_the_template() {
        let mut env = environment();
        env.add_template("t", "first\nsecond {{ x | nope }}")
            .unwrap();
        let e = env.get_template("t").unwrap().render(()).unwrap_err();
        let msg = describe(&e, "first\nsecond {{ x | nope }}");
        assert!(msg.contains("unknown filter"), "{msg}");
        assert!(msg.contains("template line 2, column"), "{msg}");
    }

    #[test]
    fn the_context_adds_event_id_and_received_at() {
        let ctx = context(br#"{"eventName":"AUTH"}"#, "ev-1", 0).unwrap();
        assert_eq!(ctx["event_id"], "ev-1");
        assert_eq!(ctx["received_at"], "1970-01-01T00:00:00Z");
        assert_eq!(ctx["eventName"], "AUTH");
    }
}
