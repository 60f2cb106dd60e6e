//! A YAML document as a tree whose every node, and every mapping key, knows its line and
//! column.
//!
//! serde stops at the first error, so the loader does not deserialize `relay.yaml` into its
//! structs in one go. It parses the text once into this tree (with serde-saphyr, wrapping
//! every child in [`serde_saphyr::Spanned`] to learn where it is), then deserializes each
//! section from the tree on its own (see `de.rs`) and looks positions up here for the
//! errors found later by validation.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::Spanned;

/// A 1-based line and column; `0:0` when unknown.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Loc {
    pub line: u64,
    pub column: u64,
}

impl Loc {
    pub const UNKNOWN: Loc = Loc { line: 0, column: 0 };

    pub fn new(line: u64, column: u64) -> Self {
        Self { line, column }
    }

    fn from_saphyr(loc: serde_saphyr::Location) -> Self {
        Self::new(loc.line(), loc.column())
    }

    pub fn is_known(self) -> bool {
        self.line > 0
    }
}

impl fmt::Display for Loc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// One node of the document.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// Where the node starts (for an alias: where the alias is used).
    pub loc: Loc,
    pub kind: Kind,
    /// The string was rewritten by `${VAR}` interpolation: its text may be a secret, and a
    /// number or boolean wanted there may be parsed from it.
    pub interpolated: bool,
}

/// What a node holds.
#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    /// Entries in document order. Keys are scalars turned into text.
    Map(Vec<Entry>),
}

/// One `key: value` pair of a mapping.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub key: String,
    pub key_loc: Loc,
    pub value: Node,
}

impl Kind {
    /// A short name of the node type, for messages ("found a list").
    pub fn describe(&self) -> &'static str {
        match self {
            Kind::Null => "null",
            Kind::Bool(_) => "a boolean",
            Kind::Int(_) => "an integer",
            Kind::Float(_) => "a floating-point number",
            Kind::Str(_) => "a string",
            Kind::Seq(_) => "a list",
            Kind::Map(_) => "a mapping",
        }
    }
}

impl Node {
    pub fn new(loc: Loc, kind: Kind) -> Self {
        Self {
            loc,
            kind,
            interpolated: false,
        }
    }

    /// The entries if this is a mapping.
    pub fn entries(&self) -> Option<&[Entry]> {
        match &self.kind {
            Kind::Map(entries) => Some(entries),
            _ => None,
        }
    }

    /// The value of `key` if this is a mapping that has it.
    pub fn get(&self, key: &str) -> Option<&Entry> {
        self.entries()?.iter().find(|e| e.key == key)
    }

    pub fn as_str(&self) -> Option<&str> {
        match &self.kind {
            Kind::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(self.kind, Kind::Null)
    }

    /// The node at `path` below this one.
    pub fn find(&self, path: &[Seg]) -> Option<&Node> {
        let mut node = self;
        for seg in path {
            node = match (seg, &node.kind) {
                (Seg::Key(k), Kind::Map(entries)) => &entries.iter().find(|e| &e.key == k)?.value,
                (Seg::Index(i), Kind::Seq(items)) => items.get(*i)?,
                _ => return None,
            };
        }
        Some(node)
    }

    /// The node at `path` below this one, mutably.
    pub fn find_mut(&mut self, path: &[Seg]) -> Option<&mut Node> {
        let mut node = self;
        for seg in path {
            node = match (seg, &mut node.kind) {
                (Seg::Key(k), Kind::Map(entries)) => {
                    &mut entries.iter_mut().find(|e| &e.key == k)?.value
                }
                (Seg::Index(i), Kind::Seq(items)) => items.get_mut(*i)?,
                _ => return None,
            };
        }
        Some(node)
    }

    /// Where the value at `path` starts; the nearest existing ancestor's position when the
    /// path does not exist (a missing key).
    pub fn value_loc(&self, path: &[Seg]) -> Loc {
        let mut node = self;
        for seg in path {
            match (seg, &node.kind) {
                (Seg::Key(k), Kind::Map(entries)) => match entries.iter().find(|e| &e.key == k) {
                    Some(e) => node = &e.value,
                    None => break,
                },
                (Seg::Index(i), Kind::Seq(items)) => match items.get(*i) {
                    Some(n) => node = n,
                    None => break,
                },
                _ => break,
            }
        }
        node.loc
    }

    /// Where the key that ends `path` is written; falls back to [`Node::value_loc`].
    pub fn key_loc(&self, path: &[Seg]) -> Loc {
        if let Some((Seg::Key(k), parent)) = path.split_last()
            && let Some(e) = self.find(parent).and_then(|p| p.get(k))
        {
            return e.key_loc;
        }
        self.value_loc(path)
    }

    /// Applies `f` to every string value (not to keys), with its path.
    pub fn for_each_str_mut(&mut self, path: &mut KeyPath, f: &mut dyn FnMut(&mut Node, &KeyPath)) {
        match &mut self.kind {
            Kind::Str(_) => f(self, path),
            Kind::Seq(items) => {
                for (i, item) in items.iter_mut().enumerate() {
                    path.0.push(Seg::Index(i));
                    item.for_each_str_mut(path, f);
                    path.0.pop();
                }
            }
            Kind::Map(entries) => {
                for e in entries.iter_mut() {
                    path.0.push(Seg::Key(e.key.clone()));
                    e.value.for_each_str_mut(path, f);
                    path.0.pop();
                }
            }
            _ => {}
        }
    }

    /// Removes repeated keys from every mapping (keeping the first), calling `dup` with the
    /// repeated key's path, its position and the first one's position.
    pub fn remove_duplicate_keys(
        &mut self,
        path: &mut KeyPath,
        dup: &mut dyn FnMut(&KeyPath, Loc, Loc),
    ) {
        match &mut self.kind {
            Kind::Seq(items) => {
                for (i, item) in items.iter_mut().enumerate() {
                    path.0.push(Seg::Index(i));
                    item.remove_duplicate_keys(path, dup);
                    path.0.pop();
                }
            }
            Kind::Map(entries) => {
                let mut kept: Vec<Entry> = Vec::with_capacity(entries.len());
                for e in std::mem::take(entries) {
                    if let Some(first) = kept.iter().find(|k| k.key == e.key) {
                        path.0.push(Seg::Key(e.key.clone()));
                        dup(path, e.key_loc, first.key_loc);
                        path.0.pop();
                    } else {
                        kept.push(e);
                    }
                }
                for e in kept.iter_mut() {
                    path.0.push(Seg::Key(e.key.clone()));
                    e.value.remove_duplicate_keys(path, dup);
                    path.0.pop();
                }
                *entries = kept;
            }
            _ => {}
        }
    }
}

/// One step of a [`KeyPath`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seg {
    Key(String),
    Index(usize),
}

/// Where a value is in the document, shown as `destinations.crm.url` or `routes[1].to[0]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyPath(pub Vec<Seg>);

impl KeyPath {
    pub fn root() -> Self {
        Self(Vec::new())
    }

    /// This path with `key` appended.
    pub fn key(&self, key: &str) -> Self {
        let mut p = self.clone();
        p.0.push(Seg::Key(key.to_owned()));
        p
    }

    /// This path with `[index]` appended.
    pub fn index(&self, index: usize) -> Self {
        let mut p = self.clone();
        p.0.push(Seg::Index(index));
        p
    }

    /// Whether `self` is `other` or lies below it.
    pub fn starts_with(&self, other: &KeyPath) -> bool {
        self.0.starts_with(&other.0)
    }
}

impl std::ops::Deref for KeyPath {
    type Target = [Seg];
    fn deref(&self) -> &[Seg] {
        &self.0
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Seg::Key(k) if i == 0 => f.write_str(k)?,
                Seg::Key(k) => write!(f, ".{k}")?,
                Seg::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// The document could not be parsed as YAML.
#[derive(Debug, Clone, PartialEq)]
pub struct SyntaxError {
    pub loc: Loc,
    pub message: String,
}

/// Parses `text` into a located tree. An empty document (nothing but comments or blank
/// lines) is a null root node at 1:1.
pub fn parse(text: &str) -> Result<Node, SyntaxError> {
    if !has_content(text) {
        return Ok(Node::new(Loc::new(1, 1), Kind::Null));
    }
    let options = serde_saphyr::options! {
        // Repeated keys are reported by the loader with both positions, among the other
        // errors, instead of stopping the parse.
        duplicate_keys: serde_saphyr::DuplicateKeyPolicy::PassThrough,
        // YAML 1.2 booleans only: `y`, `n`, `yes`, `no`, `on`, `off` stay strings (a key
        // `y:` or a value `no` is not silently a boolean).
        strict_booleans: true,
    };
    match serde_saphyr::from_str_with_options::<Spanned<Located>>(text, options) {
        Ok(root) => Ok(located(root)),
        Err(err) => {
            let inner = err.without_snippet();
            let loc = inner
                .location()
                .map(Loc::from_saphyr)
                .unwrap_or(Loc::UNKNOWN);
            Err(SyntaxError {
                loc,
                message: plain_message(inner, loc),
            })
        }
    }
}

/// Whether the text holds anything but blank lines and comments.
fn has_content(text: &str) -> bool {
    text.lines().any(|l| {
        let t = l.trim();
        !t.is_empty() && !t.starts_with('#')
    })
}

/// serde-saphyr's message without its own "at line X column Y" suffix (the loader prints
/// the position in front).
fn plain_message(err: &serde_saphyr::Error, loc: Loc) -> String {
    if matches!(err, serde_saphyr::Error::MultipleDocuments { .. }) {
        return "the config must be a single YAML document; another one starts after a `---` line"
            .into();
    }
    let text = err.to_string();
    let first = text.lines().next().unwrap_or("").trim();
    let msg = match first.rfind(" at line ") {
        Some(i) if loc.is_known() => &first[..i],
        _ => first,
    };
    format!("invalid YAML: {msg}")
}

/// A node's content, deserialized from serde-saphyr; children come wrapped in `Spanned`.
struct Located(Kind);

fn located(s: Spanned<Located>) -> Node {
    Node::new(Loc::from_saphyr(s.referenced), s.value.0)
}

impl<'de> Deserialize<'de> for Located {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(KindVisitor).map(Located)
    }
}

struct KindVisitor;

impl<'de> Visitor<'de> for KindVisitor {
    type Value = Kind;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_unit<E>(self) -> Result<Kind, E> {
        Ok(Kind::Null)
    }
    fn visit_none<E>(self) -> Result<Kind, E> {
        Ok(Kind::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Kind, D::Error> {
        d.deserialize_any(self)
    }
    fn visit_bool<E>(self, v: bool) -> Result<Kind, E> {
        Ok(Kind::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Kind, E> {
        Ok(Kind::Int(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Kind, E> {
        Ok(Kind::Int(v.into()))
    }
    fn visit_i128<E>(self, v: i128) -> Result<Kind, E> {
        Ok(Kind::Int(v))
    }
    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Kind, E> {
        i128::try_from(v)
            .map(Kind::Int)
            .map_err(|_| E::custom("integer too large"))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Kind, E> {
        Ok(Kind::Float(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Kind, E> {
        Ok(Kind::Str(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Kind, E> {
        Ok(Kind::Str(v))
    }
    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Kind, E> {
        String::from_utf8(v.to_vec())
            .map(Kind::Str)
            .map_err(|_| E::custom("binary values are not supported"))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Kind, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Spanned<Located>>()? {
            items.push(located(item));
        }
        Ok(Kind::Seq(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Kind, A::Error> {
        let mut entries = Vec::new();
        while let Some(key) = map.next_key::<Spanned<KeyText>>()? {
            let value = map.next_value::<Spanned<Located>>()?;
            entries.push(Entry {
                key: key.value.0,
                key_loc: Loc::from_saphyr(key.referenced),
                value: located(value),
            });
        }
        Ok(Kind::Map(entries))
    }
}

/// A mapping key: any scalar, as text.
struct KeyText(String);

impl<'de> Deserialize<'de> for KeyText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = KeyText;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a scalar key")
            }
            fn visit_unit<E>(self) -> Result<KeyText, E> {
                Ok(KeyText("null".into()))
            }
            fn visit_none<E>(self) -> Result<KeyText, E> {
                Ok(KeyText("null".into()))
            }
            fn visit_bool<E>(self, v: bool) -> Result<KeyText, E> {
                Ok(KeyText(v.to_string()))
            }
            fn visit_i64<E>(self, v: i64) -> Result<KeyText, E> {
                Ok(KeyText(v.to_string()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<KeyText, E> {
                Ok(KeyText(v.to_string()))
            }
            fn visit_i128<E>(self, v: i128) -> Result<KeyText, E> {
                Ok(KeyText(v.to_string()))
            }
            fn visit_u128<E>(self, v: u128) -> Result<KeyText, E> {
                Ok(KeyText(v.to_string()))
            }
            fn visit_f64<E>(self, v: f64) -> Result<KeyText, E> {
                Ok(KeyText(v.to_string()))
            }
            fn visit_str<E>(self, v: &str) -> Result<KeyText, E> {
                Ok(KeyText(v.to_owned()))
            }
            fn visit_string<E>(self, v: String) -> Result<KeyText, E> {
                Ok(KeyText(v))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<KeyText, A::Error> {
                Err(de::Error::custom(
                    "a list cannot be a mapping key (only scalar keys are supported)",
                ))
            }
            fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<KeyText, A::Error> {
                Err(de::Error::custom(
                    "a mapping cannot be a mapping key (only scalar keys are supported)",
                ))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Node {
        parse(text).unwrap()
    }

    #[test]
    fn positions_of_keys_and_values() {
        let text = "listen: 127.0.0.1:8080\ndestinations:\n  crm:\n    type: http\n    retry: { max_attempts: 3 }\nroutes:\n  - to: [a, b]\n";
        let root = p(text);
        assert_eq!(root.loc, Loc::new(1, 1));
        let path = KeyPath::root().key("listen");
        assert_eq!(root.key_loc(&path), Loc::new(1, 1));
        assert_eq!(root.value_loc(&path), Loc::new(1, 9));
        let ty = KeyPath::root().key("destinations").key("crm").key("type");
        assert_eq!(root.key_loc(&ty), Loc::new(4, 5));
        assert_eq!(root.value_loc(&ty), Loc::new(4, 11));
        assert_eq!(root.find(&ty).unwrap().as_str(), Some("http"));
        let max = KeyPath::root()
            .key("destinations")
            .key("crm")
            .key("retry")
            .key("max_attempts");
        assert_eq!(root.key_loc(&max), Loc::new(5, 14));
        assert_eq!(root.find(&max).unwrap().kind, Kind::Int(3));
        let to1 = KeyPath::root().key("routes").index(0).key("to").index(1);
        assert_eq!(root.value_loc(&to1), Loc::new(7, 13));
        assert_eq!(to1.to_string(), "routes[0].to[1]");
        let item = KeyPath::root().key("routes").index(0);
        assert_eq!(root.value_loc(&item), Loc::new(7, 5));
    }

    #[test]
    fn missing_paths_fall_back_to_the_nearest_ancestor() {
        let root = p("store:\n  path: x\n");
        let missing = KeyPath::root().key("store").key("retention");
        assert_eq!(root.find(&missing), None);
        assert_eq!(root.value_loc(&missing), Loc::new(2, 3));
        assert_eq!(root.key_loc(&missing), Loc::new(2, 3));
    }

    #[test]
    fn scalar_types() {
        let root = p("a: 1\nb: 1.5\nc: true\nd: ~\ne: '12'\nf: 5s\n-1: x\n");
        let kinds: Vec<_> = root
            .entries()
            .unwrap()
            .iter()
            .map(|e| (e.key.as_str(), e.value.kind.clone()))
            .collect();
        assert_eq!(
            kinds,
            vec![
                ("a", Kind::Int(1)),
                ("b", Kind::Float(1.5)),
                ("c", Kind::Bool(true)),
                ("d", Kind::Null),
                ("e", Kind::Str("12".into())),
                ("f", Kind::Str("5s".into())),
                ("-1", Kind::Str("x".into())),
            ]
        );
    }

    #[test]
    fn only_yaml_1_2_booleans() {
        let root = p("y: on\nn: no\nt: true\nf: False\n");
        let kinds: Vec<_> = root
            .entries()
            .unwrap()
            .iter()
            .map(|e| (e.key.as_str(), e.value.kind.clone()))
            .collect();
        assert_eq!(
            kinds,
            vec![
                ("y", Kind::Str("on".into())),
                ("n", Kind::Str("no".into())),
                ("t", Kind::Bool(true)),
                ("f", Kind::Bool(false)),
            ]
        );
    }

    #[test]
    fn merge_keys_are_expanded() {
        let root = p("d: &d {x: 1, z: 3}\nb:\n  <<: *d\n  y: 2\n  z: 4\n");
        let b = &root.get("b").unwrap().value;
        let mut keys: Vec<(&str, Kind)> = b
            .entries()
            .unwrap()
            .iter()
            .map(|e| (e.key.as_str(), e.value.kind.clone()))
            .collect();
        keys.sort_by_key(|k| k.0);
        assert_eq!(
            keys,
            vec![
                ("x", Kind::Int(1)),
                ("y", Kind::Int(2)),
                ("z", Kind::Int(4))
            ]
        );
    }

    #[test]
    fn empty_document_is_null() {
        assert_eq!(p("# nothing\n\n").kind, Kind::Null);
        assert_eq!(p("").kind, Kind::Null);
    }

    #[test]
    fn syntax_error_has_a_position() {
        let err = parse("a: 1\nb: [1, 2\nc: 3\n").unwrap_err();
        assert!(err.loc.is_known(), "{err:?}");
        assert!(err.message.starts_with("invalid YAML: "), "{err:?}");
        let err = parse("a:\n  b: 1\n c: 2\n").unwrap_err();
        assert_eq!(err.loc.line, 3, "{err:?}");
    }

    #[test]
    fn one_document_only() {
        let err = parse("a: 1\n---\nb: 2\n").unwrap_err();
        assert!(err.message.contains("single YAML document"), "{err:?}");
        assert_eq!(err.loc.line, 3, "{err:?}");
        assert_eq!(p("---\na: 1\n").get("a").unwrap().value.kind, Kind::Int(1));
    }

    #[test]
    fn duplicate_keys_are_kept_then_removed_with_both_positions() {
        let mut root = p("a: 1\nb:\n  c: 1\n  c: 2\na: 3\n");
        let mut seen = Vec::new();
        root.remove_duplicate_keys(&mut KeyPath::root(), &mut |path, at, first| {
            seen.push((path.to_string(), at, first))
        });
        assert_eq!(
            seen,
            vec![
                ("a".to_string(), Loc::new(5, 1), Loc::new(1, 1)),
                ("b.c".to_string(), Loc::new(4, 3), Loc::new(3, 3)),
            ]
        );
        assert_eq!(root.entries().unwrap().len(), 2);
        assert_eq!(root.get("a").unwrap().value.kind, Kind::Int(1));
    }

    #[test]
    fn aliases_are_expanded() {
        let root = p("base: &r { max_attempts: 3 }\nother: *r\n");
        let other = root.get("other").unwrap();
        assert_eq!(
            other.value.get("max_attempts").unwrap().value.kind,
            Kind::Int(3)
        );
        assert_eq!(other.value.loc, Loc::new(2, 8));
    }
}
