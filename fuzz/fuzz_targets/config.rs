//! The config loader: any text loads, or fails with errors that each have a position.
#![no_main]

use std::path::Path;

use faceio_relay::config::load_str;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(errors) = load_str(text, Path::new("/nonexistent/fuzz.yaml"), &|_| None) {
        assert!(!errors.0.is_empty());
        for e in &errors.0 {
            assert!(e.line >= 1 && e.column >= 1, "no position: {e:?}");
        }
    }
});
