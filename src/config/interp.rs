//! `${VAR}` interpolation of string values.
//!
//! - `${VAR}`: the variable's value; an unset variable is an error.
//! - `${VAR:-default}`: the default when `VAR` is unset or empty (the default is taken
//!   literally up to the first `}`).
//! - `$${`: a literal `${`. Any other `$` is literal.
//!
//! Names are `[A-Za-z_][A-Za-z0-9_]*`. Error messages name variables, never values.

/// The result of interpolating one string.
#[derive(Debug, PartialEq)]
pub struct Interpolated {
    pub value: String,
    /// A variable (or its default) was substituted: the value may be a secret.
    pub substituted: bool,
}

/// Interpolates `text`. All problems in the string are returned together.
pub fn interpolate(
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Interpolated, Vec<String>> {
    let mut out = String::with_capacity(text.len());
    let mut errors = Vec::new();
    let mut substituted = false;
    let mut rest = text;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i..];
        if let Some(tail) = after.strip_prefix("$${") {
            out.push_str("${");
            rest = tail;
        } else if let Some(tail) = after.strip_prefix("${") {
            let Some(end) = tail.find('}') else {
                errors.push("unterminated `${` (write `$${` for a literal `${`)".to_owned());
                rest = "";
                break;
            };
            let inner = &tail[..end];
            rest = &tail[end + 1..];
            let (name, default) = match inner.split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (inner, None),
            };
            if !valid_name(name) {
                errors.push(format!(
                    "invalid variable name in `${{{}}}`: use letters, digits and `_`, not starting with a digit (write `$${{` for a literal `${{`)",
                    truncate(name)
                ));
                continue;
            }
            substituted = true;
            match (env(name), default) {
                (Some(v), Some(d)) if v.is_empty() => out.push_str(d),
                (Some(v), _) => out.push_str(&v),
                (None, Some(d)) => out.push_str(d),
                (None, None) => errors.push(format!(
                    "environment variable `{name}` is not set (use `${{{name}:-default}}` for a default)"
                )),
            }
        } else {
            out.push('$');
            rest = &after[1..];
        }
    }
    out.push_str(rest);
    if errors.is_empty() {
        Ok(Interpolated {
            value: out,
            substituted,
        })
    } else {
        Err(errors)
    }
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

/// A bad name is shown, but not at any length.
fn truncate(name: &str) -> String {
    if name.chars().count() > 40 {
        let short: String = name.chars().take(40).collect();
        format!("{short}…")
    } else {
        name.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "TOKEN" => Some("s3cret".into()),
            "EMPTY" => Some(String::new()),
            "DIR" => Some("/run/creds".into()),
            _ => None,
        }
    }

    fn ok(text: &str) -> (String, bool) {
        let r = interpolate(text, &env).unwrap();
        (r.value, r.substituted)
    }

    fn err(text: &str) -> Vec<String> {
        interpolate(text, &env).unwrap_err()
    }

    #[test]
    fn plain_text_is_unchanged() {
        assert_eq!(ok("hello"), ("hello".into(), false));
        assert_eq!(ok("costs $5 or $"), ("costs $5 or $".into(), false));
        assert_eq!(ok(""), ("".into(), false));
    }

    #[test]
    fn variables_are_replaced() {
        assert_eq!(ok("${TOKEN}"), ("s3cret".into(), true));
        assert_eq!(ok("Bearer ${TOKEN}!"), ("Bearer s3cret!".into(), true));
        assert_eq!(ok("${DIR}/token"), ("/run/creds/token".into(), true));
        assert_eq!(ok("${TOKEN}${TOKEN}"), ("s3crets3cret".into(), true));
        assert_eq!(ok("${EMPTY}"), ("".into(), true));
    }

    #[test]
    fn defaults_apply_when_unset_or_empty() {
        assert_eq!(ok("${NOPE:-fallback}"), ("fallback".into(), true));
        assert_eq!(ok("${EMPTY:-fallback}"), ("fallback".into(), true));
        assert_eq!(ok("${TOKEN:-fallback}"), ("s3cret".into(), true));
        assert_eq!(ok("${NOPE:-}"), ("".into(), true));
        assert_eq!(ok("${NOPE:-a:-b}"), ("a:-b".into(), true));
    }

    #[test]
    fn double_dollar_escapes() {
        assert_eq!(ok("$${TOKEN}"), ("${TOKEN}".into(), false));
        assert_eq!(ok("a $${X} b ${TOKEN}"), ("a ${X} b s3cret".into(), true));
        assert_eq!(ok("$$"), ("$$".into(), false));
    }

    #[test]
    fn unset_variables_are_errors_naming_the_variable() {
        assert_eq!(
            err("${NOPE}"),
            vec!["environment variable `NOPE` is not set (use `${NOPE:-default}` for a default)"]
        );
        let both = err("${A}-${TOKEN}-${B}");
        assert_eq!(both.len(), 2);
        assert!(
            both[0].contains("`A`") && both[1].contains("`B`"),
            "{both:?}"
        );
        assert!(!both.iter().any(|e| e.contains("s3cret")));
    }

    #[test]
    fn malformed_references_are_errors() {
        assert!(err("${TOKEN")[0].starts_with("unterminated"));
        assert!(err("${}")[0].starts_with("invalid variable name"));
        assert!(err("${1X}")[0].starts_with("invalid variable name"));
        assert!(err("${A B}")[0].starts_with("invalid variable name"));
    }
}
