//! [`Secret`]: a value that must never reach a log line, an error message or `Debug` output.
//!
//! FACEIO tokens, Slack webhook URLs (the path *is* the credential), HTTP destination URLs
//! (they often carry API keys in the query), header values and signing secrets are all held
//! in a `Secret`. The only way to read one is [`Secret::expose`], which makes every use
//! greppable.

use std::fmt;

/// A value whose `Debug` prints `Secret(***)` and which has no `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret<T = String>(T);

impl<T> Secret<T> {
    /// Wraps a value that must not be shown.
    pub fn new(value: T) -> Self {
        Self(value)
    }

    /// Reads the value. Call sites must not log what they read.
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl From<String> for Secret<String> {
    fn from(value: String) -> Self {
        Self(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_masks_the_value() {
        let s = Secret::new("xoxb-very-secret".to_string());
        let shown = format!("{s:?} {:?}", vec![s.clone()]);
        assert!(!shown.contains("xoxb"), "{shown}");
        assert_eq!(s.expose(), "xoxb-very-secret");
    }
}
