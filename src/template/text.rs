//! A one-line text template (a NATS subject, a Redis stream key, an AMQP routing key):
//! one string, rendered raw (no mrkdwn escaping) over the event's context.

use minijinja::Environment;
use minijinja::value::Value;

use super::{Leaf, Step, TemplateError, Tree, compile_checked, render_tree};

/// A compiled text template for one key of a destination's settings.
pub struct TextTemplate {
    env: Environment<'static>,
    tree: Tree,
}

impl TextTemplate {
    /// Compiles `source` (the value of `key`) and renders it against the sample events;
    /// errors name `key`.
    pub fn new(key: &str, source: &str) -> Result<Self, Vec<TemplateError>> {
        let value = serde_json::Value::String(source.to_owned());
        let (env, tree) = compile_checked(&value, vec![Step::Key(key.into())], Leaf::Raw)?;
        Ok(Self { env, tree })
    }

    /// The text for one event (`ctx` from [`super::context`]).
    pub fn render(&self, ctx: &serde_json::Value) -> Result<String, String> {
        match render_tree(&self.env, &self.tree, &Value::from_serialize(ctx)) {
            Ok(serde_json::Value::String(s)) => Ok(s),
            Ok(other) => Ok(other.to_string()),
            Err(e) => {
                let mut s = format!("template failed: {}", e.kind());
                if let Some(d) = e.detail() {
                    s.push_str(": ");
                    s.push_str(d);
                }
                Err(s)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_printed_raw_and_missing_ones_empty() {
        let t = TextTemplate::new("subject", "faceio.{{ eventName }}.{{ details.age }}x").unwrap();
        let ctx = super::super::context(br#"{"eventName":"A_B<&>"}"#, "ev", 0).unwrap();
        assert_eq!(t.render(&ctx).unwrap(), "faceio.A_B<&>.x");
    }

    #[test]
    fn a_bad_template_is_an_error_at_its_key() {
        let errors = TextTemplate::new("stream", "{{ eventName | nope }}")
            .err()
            .unwrap();
        assert_eq!(errors[0].at, vec![Step::Key("stream".into())]);
        assert!(errors[0].message.contains("unknown filter"), "{errors:?}");
    }
}
