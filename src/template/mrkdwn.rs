//! Slack's mrkdwn escaping of interpolated values.
//!
//! Slack reads `&`, `<` and `>` as control characters in `text` and in mrkdwn text
//! objects (`<!channel>`, `<https://…|label>`, `<@U123>`), so a value must carry them as
//! `&amp;`, `&lt;` and `&gt;`. Two more characters let a value reshape the message
//! around it: a backtick closes (or opens) the code span it is printed in, and a line
//! break starts what looks like a new line of the message. mrkdwn has no escape for
//! either, so a backtick becomes `ˋ` (U+02CB, which looks the same and means nothing to
//! Slack) and a line break a space.

/// Escapes one interpolated value for mrkdwn (see the module doc).
pub fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '`' => out.push('\u{2CB}'),
            '\r' | '\n' | '\u{2028}' | '\u{2029}' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::escape;

    #[test]
    fn control_characters_become_entities() {
        assert_eq!(
            escape("<!channel> <https://evil.example|click> & co"),
            "&lt;!channel&gt; &lt;https://evil.example|click&gt; &amp; co"
        );
        assert_eq!(
            escape("&amp;"),
            "&amp;amp;",
            "an entity in a value stays text"
        );
    }

    #[test]
    fn backticks_and_line_breaks_cannot_reshape_the_message() {
        assert_eq!(escape("a`b\nc\r\nd"), "aˋb c  d");
        assert_eq!(escape("plain text, émoji 🎉"), "plain text, émoji 🎉");
    }
}
