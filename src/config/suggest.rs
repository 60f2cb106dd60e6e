//! "did you mean `x`?" for mistyped keys, types and destination names.

/// Lowercased, without `_`, `-` and `.`: `event_name`, `EventName` and `eventName` compare
/// equal.
fn normalize(s: &str) -> String {
    s.chars()
        .filter(|c| !matches!(c, '_' | '-' | '.'))
        .flat_map(char::to_lowercase)
        .collect()
}

/// How similar two names are, 0 to 1 (Jaro-Winkler on the normalized forms).
fn similarity(a: &str, b: &str) -> f64 {
    strsim::jaro_winkler(&normalize(a), &normalize(b))
}

/// Below this similarity a name is not suggested.
const THRESHOLD: f64 = 0.8;

/// The candidate `given` was most likely meant to be, if any is close enough.
///
/// Preference: same name up to case and separators; then a dotted candidate whose last
/// part is `given` (`gender` for `details.gender`); then the most similar one.
pub fn did_you_mean<'a>(
    given: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let given_n = normalize(given);
    if given_n.is_empty() {
        return None;
    }
    let candidates: Vec<&str> = candidates.into_iter().filter(|c| *c != given).collect();
    if let Some(c) = candidates.iter().find(|c| normalize(c) == given_n) {
        return Some(c);
    }
    if let Some(c) = candidates.iter().find(|c| {
        c.rsplit_once('.')
            .is_some_and(|(_, last)| normalize(last) == given_n)
    }) {
        return Some(c);
    }
    candidates
        .into_iter()
        .map(|c| (similarity(given, c), c))
        .filter(|(score, _)| *score >= THRESHOLD)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::did_you_mean;

    const RETRY: &[&str] = &["max_attempts", "initial_delay", "max_delay"];
    const DEST: &[&str] = &[
        "type",
        "timeout",
        "concurrency",
        "retry",
        "rate_limit",
        "url",
        "headers",
        "signing_secret",
        "follow_redirects",
    ];
    const MATCH: &[&str] = &[
        "eventName",
        "appId",
        "facialId",
        "clientIp",
        "details.gender",
        "details.age",
    ];

    fn dym(given: &str, known: &[&'static str]) -> Option<&'static str> {
        did_you_mean(given, known.iter().copied())
    }

    #[test]
    fn suggests_close_names() {
        assert_eq!(dym("max_attemps", RETRY), Some("max_attempts"));
        assert_eq!(dym("max_dealy", RETRY), Some("max_delay"));
        assert_eq!(dym("initial", RETRY), Some("initial_delay"));
        assert_eq!(dym("concurency", DEST), Some("concurrency"));
        assert_eq!(dym("typ", DEST), Some("type"));
        assert_eq!(dym("retires", DEST), Some("retry"));
        assert_eq!(dym("header", DEST), Some("headers"));
        assert_eq!(dym("slakc", &["slack", "http", "file"]), Some("slack"));
        assert_eq!(dym("htp", &["slack", "http", "file"]), Some("http"));
    }

    #[test]
    fn case_and_separators_do_not_count() {
        assert_eq!(dym("event_name", MATCH), Some("eventName"));
        assert_eq!(dym("client-ip", MATCH), Some("clientIp"));
        assert_eq!(dym("Max_Attempts", RETRY), Some("max_attempts"));
    }

    #[test]
    fn dotted_keys_are_found_by_their_last_part() {
        assert_eq!(dym("gender", MATCH), Some("details.gender"));
        assert_eq!(dym("age", MATCH), Some("details.age"));
    }

    #[test]
    fn unrelated_names_get_no_suggestion() {
        assert_eq!(dym("colour", RETRY), None);
        assert_eq!(dym("password", DEST), None);
        assert_eq!(dym("", DEST), None);
        assert_eq!(dym("zzz", &["slack", "http", "file"]), None);
    }
}
