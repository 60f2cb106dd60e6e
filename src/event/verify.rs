//! Turning a request's token and body into a [`VerifiedEvent`].
//!
//! This is the only place a `VerifiedEvent` can be made: its fields are private and its
//! constructor is private to this module, so an event that skipped the token check or the
//! payload check cannot reach the store (the store only takes `&VerifiedEvent`). Ingress
//! calls [`authenticate`] and [`verify`]; it never builds an event itself.
//!
//! Order matters and is fixed here: the token is checked first (before the body is parsed),
//! in constant time against every configured application, and names the application; the
//! payload is then parsed and its `appId` must be that application.

use bytes::Bytes;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{Payload, now_ms};
use crate::config::Application;

/// Why a request was not turned into an event. The HTTP answer for each is decided in
/// `ingress::server`; the variants carry what the log needs and never a token.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum Rejection {
    #[error("no WWW-Authenticate header")]
    MissingToken,
    #[error("token matches no configured application")]
    UnknownToken,
    #[error(
        "payload appId {payload_app_id:?} is not the application the token belongs to ({token_app_id})"
    )]
    AppMismatch {
        token_app_id: String,
        payload_app_id: String,
    },
    #[error("invalid payload: {0}")]
    InvalidPayload(String),
}

/// The application a valid token names. Step one of verification.
#[derive(Debug, Clone, Copy)]
pub struct Authenticated<'a> {
    app: &'a Application,
}

impl<'a> Authenticated<'a> {
    /// The authenticated application's ID.
    pub fn app_id(&self) -> &'a str {
        &self.app.app_id
    }
}

/// Extracts the token from a `WWW-Authenticate` value: `Bearer <token>` with the scheme in
/// any case, or a bare token.
pub fn token_from_header(value: &[u8]) -> Option<&[u8]> {
    let value = value.trim_ascii();
    if value.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    let token = match value.split_first_chunk::<7>() {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case(b"bearer ") => rest.trim_ascii(),
        _ => value,
    };
    (!token.is_empty()).then_some(token)
}

/// Finds the application whose token equals `token`. Every configured token is compared,
/// each in constant time, so timing says nothing about which one (or how much) matched.
/// The SHA-256 digests are compared rather than the tokens, so the comparison does not
/// end early on a length mismatch and timing does not reveal a token's length either.
pub fn authenticate<'a>(
    applications: &'a [Application],
    header: Option<&[u8]>,
) -> Result<Authenticated<'a>, Rejection> {
    let token = header
        .and_then(token_from_header)
        .ok_or(Rejection::MissingToken)?;
    let presented = Sha256::digest(token);
    let mut found = None;
    for app in applications {
        let equal: bool = app.token_digest().ct_eq(presented.as_slice()).into();
        if equal && found.is_none() {
            found = Some(app);
        }
    }
    found
        .map(|app| Authenticated { app })
        .ok_or(Rejection::UnknownToken)
}

/// An event that passed authentication and payload checks. Only [`verify`] makes one.
#[derive(Debug, Clone)]
pub struct VerifiedEvent {
    id: String,
    received_at_ms: i64,
    payload: Payload,
    body: Bytes,
}

impl VerifiedEvent {
    /// The relay's ID for this event (UUIDv7: sortable by arrival).
    pub fn id(&self) -> &str {
        &self.id
    }
    /// Arrival time, Unix milliseconds.
    pub fn received_at_ms(&self) -> i64 {
        self.received_at_ms
    }
    /// The fields routing reads.
    pub fn payload(&self) -> &Payload {
        &self.payload
    }
    /// The body exactly as FACEIO sent it.
    pub fn body(&self) -> &Bytes {
        &self.body
    }
}

/// Step two: parse the body and check it belongs to the authenticated application.
pub fn verify(auth: Authenticated<'_>, body: Bytes) -> Result<VerifiedEvent, Rejection> {
    // The whole body is parsed, not just the fields the relay reads: serde skips unknown
    // keys without checking their UTF-8, depth or numbers, and whatever is accepted here
    // is stored and later parsed again by the destinations. serde_json's recursion limit
    // (128) turns absurd nesting into a 400.
    let value: serde_json::Value =
        serde_json::from_slice(&body).map_err(|e| Rejection::InvalidPayload(e.to_string()))?;
    // serde would also accept a struct written as a JSON array; FACEIO sends objects.
    if !value.is_object() {
        return Err(Rejection::InvalidPayload(
            "body is not a JSON object".into(),
        ));
    }
    // PostgreSQL text cannot hold U+0000, and no FACEIO field has one: refusing it here
    // keeps an event from being answered 503 forever by the shared store.
    if contains_nul(&value) {
        return Err(Rejection::InvalidPayload(
            "a string contains the character U+0000".into(),
        ));
    }
    let payload =
        Payload::deserialize(&value).map_err(|e| Rejection::InvalidPayload(e.to_string()))?;
    if payload.event_name.is_empty() {
        return Err(Rejection::InvalidPayload("eventName is empty".into()));
    }
    if payload.app_id != auth.app_id() {
        return Err(Rejection::AppMismatch {
            token_app_id: auth.app_id().to_string(),
            payload_app_id: payload.app_id,
        });
    }
    Ok(VerifiedEvent {
        id: uuid::Uuid::now_v7().to_string(),
        received_at_ms: now_ms(),
        payload,
        body,
    })
}

/// Whether any key or string in `value` contains U+0000.
fn contains_nul(value: &serde_json::Value) -> bool {
    use serde_json::Value;
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(contains_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || contains_nul(v)),
        Value::Null | Value::Bool(_) | Value::Number(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    fn apps() -> Vec<Application> {
        vec![
            Application::new("fioa1", Secret::new("tok-one".into())),
            Application::new("fioa2", Secret::new("tok-two".into())),
        ]
    }

    #[test]
    fn bearer_scheme_in_any_case_and_bare_tokens_are_accepted() {
        assert_eq!(token_from_header(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(token_from_header(b"bEaReR   abc "), Some(&b"abc"[..]));
        assert_eq!(token_from_header(b"abc"), Some(&b"abc"[..]));
        assert_eq!(token_from_header(b"Bearer "), None);
        assert_eq!(token_from_header(b""), None);
    }

    #[test]
    fn the_token_names_the_application() {
        let apps = apps();
        let auth = authenticate(&apps, Some(b"Bearer tok-two")).unwrap();
        assert_eq!(auth.app_id(), "fioa2");
        assert_eq!(
            authenticate(&apps, Some(b"Bearer tok-thr")).unwrap_err(),
            Rejection::UnknownToken
        );
        assert_eq!(
            authenticate(&apps, None).unwrap_err(),
            Rejection::MissingToken
        );
    }

    #[test]
    fn payload_app_id_must_match_the_token() {
        let apps = apps();
        let auth = authenticate(&apps, Some(b"tok-one")).unwrap();
        let body = br#"{"eventName":"AUTH","facialId":"f","appId":"fioa2","clientIp":"1.2.3.4"}"#;
        let err = verify(auth, Bytes::from_static(body)).unwrap_err();
        assert!(matches!(err, Rejection::AppMismatch { .. }));
        assert!(!err.to_string().contains("tok-"));
    }

    #[test]
    fn deep_nesting_under_an_unread_key_is_invalid() {
        let apps = apps();
        let auth = authenticate(&apps, Some(b"tok-one")).unwrap();
        let deep = "[".repeat(10_000) + &"]".repeat(10_000);
        let body = format!(
            r#"{{"eventName":"AUTH","facialId":"f","appId":"fioa1","clientIp":"1.2.3.4","x":{deep}}}"#
        );
        let err = verify(auth, Bytes::from(body)).unwrap_err();
        assert!(matches!(err, Rejection::InvalidPayload(_)), "{err:?}");
    }

    #[test]
    fn enrollment_details_and_unknown_fields_are_kept() {
        let apps = apps();
        let auth = authenticate(&apps, Some(b"tok-one")).unwrap();
        let body = Bytes::from_static(
            br#"{"eventName":"ENROLL","facialId":"f1","appId":"fioa1","clientIp":"1.2.3.4","details":{"timestamp":"2026-11-27","gender":"female","age":"31"},"payload":{"plan":"x"}}"#,
        );
        let ev = verify(auth, body.clone()).unwrap();
        assert_eq!(ev.payload().age(), Some(31.0));
        assert_eq!(ev.payload().gender(), Some("female"));
        assert_eq!(ev.body(), &body, "original bytes are forwarded unchanged");
    }

    #[test]
    fn missing_fields_and_wrong_types_are_invalid() {
        let apps = apps();
        let auth = authenticate(&apps, Some(b"tok-one")).unwrap();
        for body in [
            &br#"{"eventName":"AUTH","appId":"fioa1","clientIp":"1.2.3.4"}"#[..],
            br#"{"eventName":5,"facialId":"f","appId":"fioa1","clientIp":"1.2.3.4"}"#,
            br#"[1,2]"#,
            br#"["AUTH","f","fioa1","1.2.3.4"]"#,
            b"{\"eventName\":\"AUTH\",\"facialId\":\"f\",\"appId\":\"fioa1\",\"clientIp\":\"1.2.3.4\",\"x\":\"\xff\"}",
            br#"{"eventName":"","facialId":"f","appId":"fioa1","clientIp":"1.2.3.4"}"#,
            // Values the relay never reads are checked too: destinations parse them.
            br#"{"eventName":"AUTH","facialId":"f","appId":"fioa1","clientIp":"1.2.3.4","n":1e999999}"#,
            br#"{"eventName":"AUTH","facialId":"a\u0000b","appId":"fioa1","clientIp":"1.2.3.4"}"#,
            br#"{"eventName":"AUTH","facialId":"f","appId":"fioa1","clientIp":"1.2.3.4","x":{"k\u0000":1}}"#,
        ] {
            let err = verify(auth, Bytes::copy_from_slice(body)).unwrap_err();
            assert!(matches!(err, Rejection::InvalidPayload(_)), "{err:?}");
        }
    }
}
