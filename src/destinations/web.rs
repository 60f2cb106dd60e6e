//! What the destinations that speak HTTP (`slack`, `http`) share: the client's settings
//! (timeouts, pool, redirects only within the configured origin), how a transport error
//! or a status is classified, `Retry-After`, and the [`Redactor`] that keeps URLs,
//! header values and secrets out of error texts even when a server echoes them back
//! escaped.

use std::time::{Duration, SystemTime};

use super::DeliveryError;
use crate::config::DestinationConfig;

/// Redirects followed in a row, when `follow_redirects` is on.
const MAX_REDIRECTS: usize = 5;

/// The HTTP client settings every HTTP-speaking destination shares.
pub(super) fn http_client(
    config: &DestinationConfig,
    follow_redirects: bool,
) -> reqwest::Result<reqwest::Client> {
    let redirects = if follow_redirects {
        // Only 307 and 308 repeat the POST with its body; on 301, 302 and 303 an HTTP
        // client sends a GET without the event, which would then count as delivered. Those
        // are answered as they are (a permanent failure naming the status). And only
        // within the configured URL's origin (see `same_origin`): the request carries
        // the configured headers and the signature, which must not go to another host.
        reqwest::redirect::Policy::custom(|attempt| {
            let status = attempt.status();
            let origin_kept = attempt
                .previous()
                .first()
                .is_some_and(|from| same_origin(from, attempt.url()));
            if (status != reqwest::StatusCode::TEMPORARY_REDIRECT
                && status != reqwest::StatusCode::PERMANENT_REDIRECT)
                || !origin_kept
            {
                attempt.stop()
            } else if attempt.previous().len() > MAX_REDIRECTS {
                attempt.error(format!("more than {MAX_REDIRECTS} redirects"))
            } else {
                attempt.follow()
            }
        })
    } else {
        reqwest::redirect::Policy::none()
    };
    reqwest::Client::builder()
        .timeout(config.timeout)
        .connect_timeout(config.timeout.min(Duration::from_secs(5)))
        .redirect(redirects)
        .user_agent(concat!("faceio-relay/", env!("CARGO_PKG_VERSION")))
        .pool_max_idle_per_host(config.concurrency)
        .build()
}

/// Whether a redirect from `from` (the configured URL) to `to` may be followed: the same
/// scheme, host and port. So every header (`Authorization` and the other configured
/// headers, the signature headers) goes only where the configuration sends it: reqwest
/// would drop `Authorization` on a cross-host hop but keep custom headers such as an API
/// key, and an `https` to `http` hop would send everything in clear text.
fn same_origin(from: &reqwest::Url, to: &reqwest::Url) -> bool {
    from.scheme() == to.scheme()
        && from.host_str() == to.host_str()
        && from.port_or_known_default() == to.port_or_known_default()
}

/// Classifies a transport error. Every reqwest error before a response (connect, timeout,
/// reset) is worth retrying; the URL is stripped so no credential reaches the message.
pub(super) fn transport_error(e: reqwest::Error) -> DeliveryError {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    let detail = crate::telemetry::error_chain(&e.without_url());
    DeliveryError::retryable(format!("{kind}: {detail}"))
}

/// Status classes shared by HTTP and Slack: 408, 429 and 5xx are worth retrying.
fn status_is_retryable(status: reqwest::StatusCode) -> bool {
    status == reqwest::StatusCode::REQUEST_TIMEOUT
        || status == reqwest::StatusCode::TOO_MANY_REQUESTS
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

    pub(super) fn add_url(&mut self, url: &reqwest::Url) {
        self.add(url.as_str());
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

/// Reads enough of a response for an error message, and no more: a misbehaving server
/// cannot make an attempt buffer an unbounded body.
async fn read_prefix(response: &mut reqwest::Response, max: usize) -> Vec<u8> {
    let mut buf = Vec::new();
    while buf.len() < max {
        match response.chunk().await {
            Ok(Some(chunk)) => buf.extend_from_slice(&chunk),
            _ => break,
        }
    }
    buf
}

/// Reads (a bounded amount of) a successful response so the connection can be reused.
pub(super) async fn drain(mut response: reqwest::Response) {
    const MAX_DRAIN: usize = 64 * 1024;
    read_prefix(&mut response, MAX_DRAIN).await;
}

/// A short, printable, redacted excerpt of a failed response's body.
async fn body_excerpt(mut response: reqwest::Response, redactor: &Redactor) -> String {
    const SHOWN: usize = 200;
    // Read more than is shown so a secret straddling the cut is still recognised.
    let bytes = read_prefix(&mut response, 4 * SHOWN).await;
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
    response: reqwest::Response,
    redactor: &Redactor,
) -> DeliveryError {
    let status = response.status();
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, SystemTime::now()));
    let excerpt = body_excerpt(response, redactor).await;
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
            &reqwest::Url::parse("https://hooks.slack.com/services/T0/B0/XYZsecret?key=abc123")
                .unwrap(),
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
        let url = |u: &str| reqwest::Url::parse(u).unwrap();
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
            &reqwest::Url::parse("https://hooks.slack.com/services/T0/B0/XYZsecret?key=abc123")
                .unwrap(),
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
            assert!(
                status_is_retryable(reqwest::StatusCode::from_u16(s).unwrap()),
                "{s}"
            );
        }
        for s in [400, 401, 403, 404, 410, 301] {
            assert!(
                !status_is_retryable(reqwest::StatusCode::from_u16(s).unwrap()),
                "{s}"
            );
        }
    }
}
