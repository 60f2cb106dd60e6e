//! faceio-relay (work in progress skeleton).
pub mod config;
