//! The FACEIO payload: the fields of a webhook body the relay reads (routing matches on
//! them, templates show them). The body itself is kept byte for byte beside them.

use serde::Deserialize;

/// The FACEIO payload fields the relay reads. Everything else in the body (a linked
/// `payload` object on some plans, future fields) is kept in the original bytes and
/// forwarded untouched.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Payload {
    /// `ENROLL`, `AUTH`, `DELETION`, or any future event name.
    pub event_name: String,
    /// The user's unique Facial ID.
    pub facial_id: String,
    /// Public ID of the FACEIO application that sent it.
    pub app_id: String,
    /// Public IP of the browser that ran fio.js.
    pub client_ip: String,
    /// Filled on enrollment only.
    #[serde(default)]
    pub details: Option<Details>,
}

/// `details`: present on `ENROLL`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct Details {
    /// Operation date, `YYYY-MM-DD` UTC.
    #[serde(default)]
    pub timestamp: Option<String>,
    /// `male` or `female`.
    #[serde(default)]
    pub gender: Option<String>,
    /// Age approximation; FACEIO has sent it both as a number and as a string.
    #[serde(default)]
    pub age: Option<Age>,
}

/// An age that arrived as a number or a string.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Age {
    Number(f64),
    Text(String),
}

impl Age {
    /// The age as a number, when it is one (`"31"` counts).
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Self::Number(n) => Some(*n),
            Self::Text(s) => s.trim().parse().ok(),
        }
    }
}

impl Payload {
    /// `details.age` as a number, if present and numeric.
    pub fn age(&self) -> Option<f64> {
        self.details.as_ref()?.age.as_ref()?.as_f64()
    }

    /// `details.gender`, if present.
    pub fn gender(&self) -> Option<&str> {
        self.details.as_ref()?.gender.as_deref()
    }
}
