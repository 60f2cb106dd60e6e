//! Placeholder: replaced by the config loader.
