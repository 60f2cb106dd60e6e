//! Placeholder: replaced by the located YAML tree.
