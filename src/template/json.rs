//! The `body:` of an HTTP destination: a YAML value whose string leaves are templates,
//! sent as JSON.
//!
//! A leaf is rendered to a string and encoded by `serde_json`, so quotes, backslashes
//! and control characters in a value stay inside their JSON string. A leaf that is
//! exactly one expression (`"{{ details.age }}"`) keeps the value's type: a number stays
//! a number, an object an object, and a missing field is `null`. Mapping keys and
//! non-string leaves are sent as written.

use minijinja::Environment;
use minijinja::value::Value;

use super::{Leaf, Step, TemplateError, Tree, compile_checked, render_tree};

/// A compiled `body:`.
pub struct JsonBody {
    env: Environment<'static>,
    tree: Tree,
}

impl JsonBody {
    /// Compiles every leaf of `body` and renders it against the sample events.
    pub fn new(body: &serde_json::Value) -> Result<Self, Vec<TemplateError>> {
        let (env, tree) = compile_checked(body, vec![Step::Key("body".into())], Leaf::Typed)?;
        Ok(Self { env, tree })
    }

    /// The request body for one event (`ctx` from [`super::context`]).
    pub fn render(&self, ctx: &serde_json::Value) -> Result<Vec<u8>, String> {
        let value =
            render_tree(&self.env, &self.tree, &Value::from_serialize(ctx)).map_err(|e| {
                let mut s = format!("body template failed: {}", e.kind());
                if let Some(d) = e.detail() {
                    s.push_str(": ");
                    s.push_str(d);
                }
                s
            })?;
        serde_json::to_vec(&value).map_err(|e| format!("body is not JSON: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn render(body: serde_json::Value, payload: serde_json::Value) -> serde_json::Value {
        let ctx = super::super::context(payload.to_string().as_bytes(), "ev-1", 0).unwrap();
        let bytes = JsonBody::new(&body).unwrap().render(&ctx).unwrap();
        serde_json::from_slice(&bytes).expect("the body is JSON")
    }

    #[test]
    fn one_expression_keeps_its_type_and_text_stays_a_string() {
        let out = render(
            json!({"age": "{{ details.age }}", "who": "{{ facialId }} ({{ details.age }})",
                   "details": "{{ details }}", "gender": "{{ details.gender }}", "n": 3, "ok": true,
                   "list": ["{{ eventName | lower }}", null]}),
            json!({"eventName": "ENROLL", "facialId": "f\"1\\", "details": {"age": 31}}),
        );
        assert_eq!(
            out,
            json!({"age": 31, "who": "f\"1\\ (31)", "details": {"age": 31}, "gender": null,
                   "n": 3, "ok": true, "list": ["enroll", null]})
        );
    }

    #[test]
    fn values_are_not_mrkdwn_escaped_in_bodies() {
        let out = render(
            json!({"t": "id={{ facialId }}"}),
            json!({"facialId": "<a & b>"}),
        );
        assert_eq!(out["t"], "id=<a & b>");
    }

    #[test]
    fn a_bad_leaf_is_an_error_at_its_path() {
        let errors = JsonBody::new(&json!({"user": {"age": "{{ details.age | nope }}"}}))
            .err()
            .unwrap();
        assert_eq!(
            errors[0].at,
            vec![
                Step::Key("body".into()),
                Step::Key("user".into()),
                Step::Key("age".into())
            ]
        );
        assert!(errors[0].message.contains("unknown filter"), "{errors:?}");
    }
}
