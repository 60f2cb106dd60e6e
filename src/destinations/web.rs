//! What the destinations that speak HTTP (`slack`, `http`) share besides their client
//! (`client.rs`): which redirects stay within the origin, how a status is classified,
//! `Retry-After`, bounded reads of a response, and the [`Redactor`] that keeps URLs,
//! header values and secrets out of error texts even when a server echoes them back
//! escaped.

use std::time::{Duration, SystemTime};

use http::{Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::time::Instant;
use url::Url;

use super::DeliveryError;

/// Whether a redirect from `from` (the configured URL) to `to` may be followed: the same
/// scheme, host and port. So every header (`Authorization` and the other configured
/// headers, the signature headers) goes only where the configuration sends it: a cross-host
/// hop would carry custom headers such as an API key, and an `https` to `http` hop would
/// send everything in clear text.
pub(super) fn same_origin(from: &Url, to: &Url) -> bool {
    from.scheme() == to.scheme()
        && from.host_str() == to.host_str()
        && from.port_or_known_default() == to.port_or_known_default()
}

/// The `Basic` token for the user and password in `url`, percent-decoded as curl and
/// reqwest send them; `None` without either.
pub(super) fn basic_credentials(url: &Url) -> Option<String> {
    use base64::Engine as _;
    if url.username().is_empty() && url.password().is_none() {
        return None;
    }
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
    };
    let pair = format!(
        "{}:{}",
        decode(url.username()),
        decode(url.password().unwrap_or(""))
    );
    Some(base64::engine::general_purpose::STANDARD.encode(pair))
}

/// Status classes shared by HTTP and Slack: 408, 429 and 5xx are worth retrying.
fn status_is_retryable(status: StatusCode) -> bool {
    status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error()
}

/// Parses `Retry-After`: delta-seconds or an HTTP date. A date in the past means "now".
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Strings a destination must never echo into a log line or a dead letter: its URL (and
/// the URL's path and query, which carry credentials for Slack and many APIs), header
/// values and signing secret. Some servers quote the request back in their error body,
/// and not always as sent: PHP's `json_encode` writes `https:\/\/hooks.slack.com\/…`,
/// other encoders `\u002F`, and a URL inside a URL or a form is percent-encoded
/// (`https%3A%2F%2F…`, either hex case). Each secret is matched in all those spellings,
/// even mixed.
#[derive(Default)]
pub(super) struct Redactor {
    patterns: Vec<SecretPattern>,
}

/// A compiled pattern that matches one secret; its `Debug` (none) never shows it.
struct SecretPattern(regex::Regex);

/// Shorter strings are not worth hiding (and would blank out ordinary words).
const MIN_REDACTED_LEN: usize = 6;

impl Redactor {
    /// Hides `secret` if it is long enough to be worth hiding (see [`MIN_REDACTED_LEN`]).
    pub(super) fn add(&mut self, secret: &str) {
        if secret.len() < MIN_REDACTED_LEN {
            return;
        }
        self.add_credential(secret);
    }

    /// Hides `secret` whatever its length: a password or token is a secret even when it
    /// is short (`guest`). Only an empty one is left out.
    pub(super) fn add_credential(&mut self, secret: &str) {
        if secret.is_empty() {
            return;
        }
        // Letters and digits are written as they are by every encoder; any other
        // character may also come escaped.
        let mut pattern = String::new();
        for c in secret.chars() {
            if c.is_ascii_alphanumeric() {
                pattern.push(c);
                continue;
            }
            let plain = regex::escape(c.encode_utf8(&mut [0; 4]));
            if c.is_ascii() {
                let code = c as u32;
                // As is; JSON `\/`-style; JSON `\u00XX`; percent-encoded.
                pattern.push_str(&format!(
                    r"(?:{plain}|\\{plain}|\\u(?i:00{code:02x})|%(?i:{code:02x}))"
                ));
            } else {
                pattern.push_str(&plain);
            }
        }
        // A secret too long for the regex engine's limits is still matched as written.
        let regex = regex::Regex::new(&pattern)
            .or_else(|_| regex::Regex::new(&regex::escape(secret)))
            .expect("an escaped literal is a valid pattern");
        self.patterns.push(SecretPattern(regex));
    }

    pub(super) fn add_url(&mut self, url: &Url) {
        self.add(url.as_str());
        // The user and password as sent (decoded, and as the `Basic` token): for many
        // APIs the user name is the key.
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        };
        self.add(&decode(url.username()));
        if let Some(password) = url.password() {
            self.add_credential(&decode(password));
        }
        if let Some(token) = basic_credentials(url) {
            self.add_credential(&token);
        }
        self.add(url.path());
        if let Some(q) = url.query() {
            self.add(q);
        }
    }

    pub(super) fn apply(&self, text: &str) -> String {
        let mut out = text.to_string();
        for SecretPattern(p) in &self.patterns {
            if let std::borrow::Cow::Owned(replaced) = p.replace_all(&out, "[redacted]") {
                out = replaced;
            }
        }
        out
    }
}

/// Reads enough of a response for an error message, and no more, until `deadline`: a
/// misbehaving server cannot make an attempt buffer an unbounded body or wait for ever.
async fn read_prefix(body: &mut Incoming, max: usize, deadline: Instant) -> Vec<u8> {
    let mut buf = Vec::new();
    let fill = async {
        while buf.len() < max {
            match body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        buf.extend_from_slice(&data);
                    }
                }
                _ => break,
            }
        }
    };
    // At the deadline, what has come so far.
    let _ = tokio::time::timeout_at(deadline, fill).await;
    buf
}

/// Reads (a bounded amount of) a successful response so the connection can be reused.
pub(super) async fn drain(response: Response<Incoming>, deadline: Instant) {
    const MAX_DRAIN: usize = 64 * 1024;
    read_prefix(&mut response.into_body(), MAX_DRAIN, deadline).await;
}

/// A short, printable, redacted excerpt of a failed response's body.
async fn body_excerpt(mut body: Incoming, redactor: &Redactor, deadline: Instant) -> String {
    const SHOWN: usize = 200;
    // Read more than is shown so a secret straddling the cut is still recognised.
    let bytes = read_prefix(&mut body, 4 * SHOWN, deadline).await;
    let text = redactor.apply(&String::from_utf8_lossy(&bytes));
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(SHOWN)
        .collect::<String>()
        .trim()
        .to_string()
}

/// Turns a non-success response into an error: retryable by status, with `Retry-After`.
pub(super) async fn status_error(
    response: Response<Incoming>,
    redactor: &Redactor,
    deadline: Instant,
) -> DeliveryError {
    let status = response.status();
    let retry_after = response
        .headers()
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, SystemTime::now()));
    let excerpt = body_excerpt(response.into_body(), redactor, deadline).await;
    let reason = if excerpt.is_empty() {
        format!("HTTP {status}")
    } else {
        format!("HTTP {status}: {excerpt}")
    };
    if status_is_retryable(status) {
        DeliveryError::Retryable {
            reason,
            retry_after,
        }
    } else {
        DeliveryError::Permanent { reason }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let now = httpdate::parse_http_date("Fri, 27 Nov 2026 08:00:00 GMT").unwrap();
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after("Fri, 27 Nov 2026 08:00:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after("Fri, 27 Nov 2026 07:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn redaction_hides_urls_paths_queries_and_headers() {
        let mut r = Redactor::default();
        r.add_url(
            &Url::parse("https://hooks.slack.com/services/T0/B0/XYZsecret?key=abc123").unwrap(),
        );
        r.add("Bearer sk-live-42");
        r.add("abc");
        let echoed = "bad request to https://hooks.slack.com/services/T0/B0/XYZsecret?key=abc123 \
                      path /services/T0/B0/XYZsecret query key=abc123 auth Bearer sk-live-42 abc";
        let out = r.apply(echoed);
        for s in ["XYZsecret", "abc123", "sk-live-42"] {
            assert!(!out.contains(s), "{s} in {out}");
        }
        assert!(out.ends_with("abc"), "short strings are left alone: {out}");
    }

    #[test]
    fn redirects_stay_on_the_configured_origin() {
        let url = |u: &str| Url::parse(u).unwrap();
        let from = url("https://api.example.com/hook?key=1");
        for ok in [
            "https://api.example.com/moved",
            "https://api.example.com:443/v2/hook",
            "https://API.example.com/moved",
        ] {
            assert!(same_origin(&from, &url(ok)), "{ok}");
        }
        for refused in [
            "http://api.example.com/hook",
            "https://evil.example.net/hook",
            "https://api.example.com.evil.net/hook",
            "https://api.example.com:8443/hook",
            "https://sub.api.example.com/hook",
        ] {
            assert!(!same_origin(&from, &url(refused)), "{refused}");
        }
    }

    fn slack_redactor() -> Redactor {
        let mut r = Redactor::default();
        r.add_url(
            &Url::parse("https://hooks.slack.com/services/T0/B0/XYZsecret?key=abc123").unwrap(),
        );
        r.add("Bearer sk-live-42");
        r
    }

    #[test]
    fn redaction_catches_the_json_escaped_forms() {
        let r = slack_redactor();
        for echoed in [
            // PHP's json_encode
            r#"{"error":"bad url https:\/\/hooks.slack.com\/services\/T0\/B0\/XYZsecret?key=abc123"}"#,
            // \u escapes, either case
            r#"{"url":"https:\u002f\u002Fhooks.slack.com\u002Fservices\u002FT0\u002FB0\u002FXYZsecret"}"#,
            // only the path, escaped
            r#"{"path":"\/services\/T0\/B0\/XYZsecret"}"#,
            r#"{"auth":"Bearer\u0020sk-live-42"}"#,
        ] {
            let out = r.apply(echoed);
            for s in ["XYZsecret", "sk-live-42"] {
                assert!(!out.contains(s), "{s} in {out}");
            }
            assert!(out.contains("[redacted]"), "{out}");
        }
    }

    #[test]
    fn redaction_catches_the_percent_encoded_forms() {
        let r = slack_redactor();
        for echoed in [
            "url=https%3A%2F%2Fhooks.slack.com%2Fservices%2FT0%2FB0%2FXYZsecret%3Fkey%3Dabc123",
            "url=https%3a%2f%2fhooks.slack.com%2fservices%2fT0%2fB0%2fXYZsecret",
            "next=%2Fservices%2FT0%2FB0%2FXYZsecret&q=key%3Dabc123",
            // mixed: the scheme as is, the rest encoded
            "https://hooks.slack.com%2Fservices%2FT0/B0%2FXYZsecret",
            "auth=Bearer%20sk-live-42",
        ] {
            let out = r.apply(echoed);
            for s in ["XYZsecret", "abc123", "sk-live-42"] {
                assert!(!out.contains(s), "{s} in {out}");
            }
        }
        // Text that only looks alike stays.
        assert_eq!(
            r.apply("services T0 B0 XYZsecrets"),
            "services T0 B0 XYZsecrets"
        );
    }

    #[test]
    fn retryable_statuses() {
        for s in [408, 429, 500, 502, 503] {
            assert!(status_is_retryable(StatusCode::from_u16(s).unwrap()), "{s}");
        }
        for s in [400, 401, 403, 404, 410, 301] {
            assert!(
                !status_is_retryable(StatusCode::from_u16(s).unwrap()),
                "{s}"
            );
        }
    }
}
