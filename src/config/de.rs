//! A serde [`Deserializer`] over one [`Node`] of the located tree.
//!
//! The loader deserializes each section and each list or map element separately through
//! this, so one bad value costs only its own element. Every error it produces carries the
//! key path and the position of the offending node (for an unknown key: the key itself).
//! Messages never repeat a string value, which may be a secret.

use std::fmt;

use serde::de::{
    self, DeserializeSeed, Deserializer, EnumAccess, IntoDeserializer, MapAccess, SeqAccess,
    Unexpected, VariantAccess, Visitor,
};

use super::suggest::did_you_mean;
use super::yaml::{Entry, KeyPath, Kind, Loc, Node};

/// A deserialization error located in the document.
#[derive(Debug, Clone, PartialEq)]
pub struct DeError {
    /// Filled in by the innermost node the error passes through.
    pub loc: Option<Loc>,
    pub path: Option<KeyPath>,
    pub message: String,
    /// For a missing required key: its name.
    pub missing: Option<&'static str>,
    /// The error is about the key itself (unknown field), not its value.
    pub at_key: bool,
}

impl DeError {
    fn msg(message: String) -> Self {
        Self {
            loc: None,
            path: None,
            message,
            missing: None,
            at_key: false,
        }
    }

    /// Attaches a position and path unless the error already has them.
    fn at(mut self, loc: Loc, path: &KeyPath) -> Self {
        if self.loc.is_none() {
            self.loc = Some(loc);
            self.path = Some(path.clone());
        }
        self
    }
}

impl fmt::Display for DeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for DeError {}

/// "a string" rather than serde's `string "the secret"`.
fn unexpected(u: &Unexpected) -> String {
    match u {
        Unexpected::Bool(b) => format!("boolean `{b}`"),
        Unexpected::Unsigned(n) => format!("integer `{n}`"),
        Unexpected::Signed(n) => format!("integer `{n}`"),
        Unexpected::Float(n) => format!("number `{n}`"),
        Unexpected::Char(_) | Unexpected::Str(_) => "a string".into(),
        Unexpected::Bytes(_) => "bytes".into(),
        Unexpected::Unit => "null (no value)".into(),
        Unexpected::Option => "an optional value".into(),
        Unexpected::NewtypeStruct => "a value".into(),
        Unexpected::Seq => "a list".into(),
        Unexpected::Map => "a mapping".into(),
        Unexpected::Enum => "an enum".into(),
        Unexpected::UnitVariant
        | Unexpected::NewtypeVariant
        | Unexpected::TupleVariant
        | Unexpected::StructVariant => "an enum variant".into(),
        Unexpected::Other(s) => (*s).to_owned(),
    }
}

/// Turns serde's expectation text ("struct RawRetry", "u32") into words for a config
/// author.
fn expected(exp: &dyn de::Expected) -> String {
    let text = exp.to_string();
    if text.starts_with("struct ") || text.starts_with("a map") {
        return "a mapping".into();
    }
    match text.as_str() {
        "u8" | "u16" | "u32" | "u64" | "u128" | "usize" => "a non-negative integer".into(),
        "i8" | "i16" | "i32" | "i64" | "i128" | "isize" => "an integer".into(),
        "f32" | "f64" => "a number".into(),
        "a sequence" => "a list".into(),
        _ => text,
    }
}

impl de::Error for DeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Self::msg(msg.to_string())
    }

    fn invalid_type(unexp: Unexpected, exp: &dyn de::Expected) -> Self {
        Self::msg(format!(
            "expected {}, found {}",
            expected(exp),
            unexpected(&unexp)
        ))
    }

    fn invalid_value(unexp: Unexpected, exp: &dyn de::Expected) -> Self {
        Self::msg(format!(
            "invalid value {}: expected {}",
            unexpected(&unexp),
            expected(exp)
        ))
    }

    fn invalid_length(len: usize, exp: &dyn de::Expected) -> Self {
        Self::msg(format!("expected {}, found {len} elements", expected(exp)))
    }

    fn unknown_variant(variant: &str, known: &'static [&'static str]) -> Self {
        Self::msg(format!("unknown value; {}", one_of(variant, known)))
    }

    fn unknown_field(field: &str, known: &'static [&'static str]) -> Self {
        Self {
            at_key: true,
            ..Self::msg(format!("unknown field `{field}`; {}", one_of(field, known)))
        }
    }

    fn missing_field(field: &'static str) -> Self {
        Self {
            missing: Some(field),
            ..Self::msg(format!("missing required key `{field}`"))
        }
    }

    fn duplicate_field(field: &'static str) -> Self {
        Self::msg(format!("key `{field}` is given twice"))
    }
}

/// "did you mean `x`?" or the list of valid names.
pub fn one_of(given: &str, known: &[&str]) -> String {
    let prefix = format!("{given}.");
    let dotted: Vec<&str> = known
        .iter()
        .copied()
        .filter(|k| k.starts_with(&prefix))
        .collect();
    if let Some(first) = dotted.first() {
        let names: Vec<String> = dotted.iter().map(|k| format!("`{k}`")).collect();
        return format!(
            "{} are written as one dotted key, such as `{first}: ...`",
            names.join(" and ")
        );
    }
    match did_you_mean(given, known.iter().copied()) {
        Some(s) => format!("did you mean `{s}`?"),
        None if known.is_empty() => "no keys are allowed here".into(),
        None => format!(
            "expected one of {}",
            known
                .iter()
                .map(|k| format!("`{k}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Deserializes `T` from `node`, reporting errors at `path`.
pub fn from_node<'de, T: de::Deserialize<'de>>(
    node: &'de Node,
    path: &KeyPath,
) -> Result<T, DeError> {
    T::deserialize(NodeDe {
        node,
        path: path.clone(),
    })
}

/// The deserializer for one node.
pub struct NodeDe<'de> {
    node: &'de Node,
    path: KeyPath,
}

impl<'de> NodeDe<'de> {
    fn any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match &self.node.kind {
            Kind::Null => visitor.visit_unit(),
            Kind::Bool(b) => visitor.visit_bool(*b),
            Kind::Int(n) => {
                if let Ok(n) = u64::try_from(*n) {
                    visitor.visit_u64(n)
                } else if let Ok(n) = i64::try_from(*n) {
                    visitor.visit_i64(n)
                } else {
                    visitor.visit_i128(*n)
                }
            }
            Kind::Float(x) => visitor.visit_f64(*x),
            Kind::Str(s) => visitor.visit_borrowed_str(s),
            Kind::Seq(items) => visitor.visit_seq(SeqDe {
                items: items.iter().enumerate(),
                path: &self.path,
            }),
            Kind::Map(entries) => visitor.visit_map(MapDe {
                entries: entries.iter(),
                value: None,
                path: &self.path,
            }),
        }
    }

    /// A number or boolean asked for where `${VAR}` produced a string: parse the text.
    fn interpolated_scalar<V: Visitor<'de>>(
        self,
        visitor: V,
        want: Want,
    ) -> Result<V::Value, DeError> {
        let s = match (&self.node.kind, self.node.interpolated) {
            (Kind::Str(s), true) => s.trim(),
            _ => return self.any(visitor),
        };
        let bad = |what: &str| {
            Err(DeError::msg(format!(
                "expected {what}, found a string (from environment interpolation) that is not one"
            )))
        };
        match want {
            Want::Bool => match s {
                "true" => visitor.visit_bool(true),
                "false" => visitor.visit_bool(false),
                _ => bad("a boolean"),
            },
            Want::Int => {
                if let Ok(n) = s.parse::<u64>() {
                    visitor.visit_u64(n)
                } else if let Ok(n) = s.parse::<i64>() {
                    visitor.visit_i64(n)
                } else {
                    bad("an integer")
                }
            }
            Want::Float => match s.parse::<f64>() {
                Ok(x) => visitor.visit_f64(x),
                Err(_) => bad("a number"),
            },
        }
    }
}

#[derive(Clone, Copy)]
enum Want {
    Bool,
    Int,
    Float,
}

macro_rules! located {
    ($self:ident, $body:expr) => {{
        let loc = $self.node.loc;
        let path = $self.path.clone();
        $body.map_err(|e: DeError| e.at(loc, &path))
    }};
}

macro_rules! forward_any {
    ($($method:ident)*) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
            located!(self, self.any(visitor))
        }
    )*};
}

macro_rules! forward_scalar {
    ($want:expr => $($method:ident)*) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
            located!(self, self.interpolated_scalar(visitor, $want))
        }
    )*};
}

impl<'de> Deserializer<'de> for NodeDe<'de> {
    type Error = DeError;

    forward_any! {
        deserialize_any deserialize_char deserialize_str deserialize_string
        deserialize_bytes deserialize_byte_buf deserialize_seq deserialize_map
        deserialize_identifier
    }
    forward_scalar! { Want::Bool => deserialize_bool }
    forward_scalar! {
        Want::Int => deserialize_i8 deserialize_i16 deserialize_i32 deserialize_i64
        deserialize_i128 deserialize_u8 deserialize_u16 deserialize_u32 deserialize_u64
        deserialize_u128
    }
    forward_scalar! { Want::Float => deserialize_f32 deserialize_f64 }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        if self.node.is_null() {
            visitor.visit_none()
        } else {
            visitor.visit_some(self)
        }
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        located!(self, self.any(visitor))
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        located!(self, self.any(visitor))
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        let loc = self.node.loc;
        let path = self.path.clone();
        visitor
            .visit_newtype_struct(self)
            .map_err(|e| e.at(loc, &path))
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        located!(self, self.any(visitor))
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        located!(self, self.any(visitor))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        located!(self, self.any(visitor))
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        located!(
            self,
            match &self.node.kind {
                Kind::Str(s) => visitor.visit_enum(UnitVariant(s.as_str())),
                other => Err(DeError::msg(format!(
                    "expected a string, found {}",
                    other.describe()
                ))),
            }
        )
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_unit()
    }
}

/// An enum written as a plain string: only unit variants.
struct UnitVariant<'a>(&'a str);

impl<'de, 'a> EnumAccess<'de> for UnitVariant<'a> {
    type Error = DeError;
    type Variant = Self;

    fn variant_seed<S: DeserializeSeed<'de>>(self, seed: S) -> Result<(S::Value, Self), DeError> {
        let de: de::value::StrDeserializer<'_, DeError> = self.0.into_deserializer();
        Ok((seed.deserialize(de)?, self))
    }
}

impl<'de, 'a> VariantAccess<'de> for UnitVariant<'a> {
    type Error = DeError;

    fn unit_variant(self) -> Result<(), DeError> {
        Ok(())
    }
    fn newtype_variant_seed<S: DeserializeSeed<'de>>(self, _: S) -> Result<S::Value, DeError> {
        Err(DeError::msg("expected a mapping for this value".into()))
    }
    fn tuple_variant<V: Visitor<'de>>(self, _: usize, _: V) -> Result<V::Value, DeError> {
        Err(DeError::msg("expected a list for this value".into()))
    }
    fn struct_variant<V: Visitor<'de>>(
        self,
        _: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, DeError> {
        Err(DeError::msg("expected a mapping for this value".into()))
    }
}

struct SeqDe<'de, 'p> {
    items: std::iter::Enumerate<std::slice::Iter<'de, Node>>,
    path: &'p KeyPath,
}

impl<'de> SeqAccess<'de> for SeqDe<'de, '_> {
    type Error = DeError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, DeError> {
        match self.items.next() {
            None => Ok(None),
            Some((i, node)) => seed
                .deserialize(NodeDe {
                    node,
                    path: self.path.index(i),
                })
                .map(Some),
        }
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.items.len())
    }
}

struct MapDe<'de, 'p> {
    entries: std::slice::Iter<'de, Entry>,
    value: Option<&'de Entry>,
    path: &'p KeyPath,
}

impl<'de> MapAccess<'de> for MapDe<'de, '_> {
    type Error = DeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, DeError> {
        let Some(entry) = self.entries.next() else {
            return Ok(None);
        };
        self.value = Some(entry);
        let path = self.path.key(&entry.key);
        let key: de::value::BorrowedStrDeserializer<'de, DeError> =
            de::value::BorrowedStrDeserializer::new(&entry.key);
        seed.deserialize(key)
            .map(Some)
            .map_err(|e| e.at(entry.key_loc, &path))
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, DeError> {
        let entry = self
            .value
            .take()
            .ok_or_else(|| DeError::msg("value requested before its key".into()))?;
        seed.deserialize(NodeDe {
            node: &entry.value,
            path: self.path.key(&entry.key),
        })
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.entries.len())
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::super::yaml::parse;
    use super::*;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Retry {
        max_attempts: Option<u32>,
        initial_delay: Option<String>,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Outer {
        name: String,
        retry: Retry,
        #[serde(default)]
        tags: Vec<String>,
        kind: Option<Color>,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(rename_all = "lowercase")]
    enum Color {
        Red,
        Green,
    }

    fn de<T: for<'a> Deserialize<'a>>(text: &str) -> Result<T, DeError> {
        let node = parse(text).unwrap();
        from_node(&node, &KeyPath::root().key("top"))
    }

    #[test]
    fn deserializes_a_struct() {
        let v: Outer =
            de("name: x\nretry: { max_attempts: 3 }\ntags: [a, b]\nkind: green\n").unwrap();
        assert_eq!(
            v,
            Outer {
                name: "x".into(),
                retry: Retry {
                    max_attempts: Some(3),
                    initial_delay: None
                },
                tags: vec!["a".into(), "b".into()],
                kind: Some(Color::Green),
            }
        );
    }

    #[test]
    fn unknown_field_points_at_the_key_with_a_suggestion() {
        let e = de::<Outer>("name: x\nretry:\n  max_attemps: 3\n").unwrap_err();
        assert_eq!(e.loc, Some(Loc::new(3, 3)));
        assert_eq!(e.path.unwrap().to_string(), "top.retry.max_attemps");
        assert_eq!(
            e.message,
            "unknown field `max_attemps`; did you mean `max_attempts`?"
        );
    }

    #[test]
    fn type_error_points_at_the_value_and_hides_strings() {
        let e = de::<Outer>("name: x\nretry:\n  max_attempts: lots\n").unwrap_err();
        assert_eq!(e.loc, Some(Loc::new(3, 17)));
        assert_eq!(e.path.unwrap().to_string(), "top.retry.max_attempts");
        assert_eq!(e.message, "expected a non-negative integer, found a string");
        let e = de::<Outer>("name: [1]\nretry: {}\n").unwrap_err();
        assert_eq!(e.message, "expected a string, found a list");
        let e = de::<Outer>("name: x\nretry: 5\n").unwrap_err();
        assert_eq!(e.message, "expected a mapping, found integer `5`");
        assert_eq!(e.loc, Some(Loc::new(2, 8)));
    }

    #[test]
    fn nested_form_of_a_dotted_key_is_explained() {
        assert_eq!(
            one_of("details", &["eventName", "details.gender", "details.age"]),
            "`details.gender` and `details.age` are written as one dotted key, such as `details.gender: ...`"
        );
        assert_eq!(
            one_of("colour", &["type", "path"]),
            "expected one of `type`, `path`"
        );
        assert_eq!(one_of("tpye", &["type", "path"]), "did you mean `type`?");
    }

    #[test]
    fn missing_field_points_at_the_mapping() {
        let e = de::<Outer>("retry: {}\n").unwrap_err();
        assert_eq!(e.message, "missing required key `name`");
        assert_eq!(e.loc, Some(Loc::new(1, 1)));
        assert_eq!(e.path.unwrap().to_string(), "top");
    }

    #[test]
    fn unknown_variant_suggests() {
        let e = de::<Outer>("name: x\nretry: {}\nkind: gren\n").unwrap_err();
        assert_eq!(e.message, "unknown value; did you mean `green`?");
        assert_eq!(e.loc, Some(Loc::new(3, 7)));
        assert_eq!(e.path.unwrap().to_string(), "top.kind");
    }

    #[test]
    fn interpolated_strings_may_hold_numbers() {
        let mut node = parse("max_attempts: '7'\n").unwrap();
        let e = from_node::<Retry>(&node, &KeyPath::root()).unwrap_err();
        assert_eq!(e.message, "expected a non-negative integer, found a string");
        if let Kind::Map(entries) = &mut node.kind {
            entries[0].value.interpolated = true;
        }
        let r: Retry = from_node(&node, &KeyPath::root()).unwrap();
        assert_eq!(r.max_attempts, Some(7));
    }
}
