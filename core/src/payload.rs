//! A consumed record's JSON payload as the engine keeps it: the text exactly as sent, checked
//! when the record was read, and the two top-level fields the engine's stages read (`id` for
//! deduplication, `type` for event filtering).
//!
//! The payload is parsed twice, but built once: a partition worker checks the whole text as
//! strictly as a full decode would (the same parser, every String's UTF-8 and escapes included,
//! so a record that cannot be decoded is still found here and dead-lettered, never in the
//! handler) while keeping only `id` and `type`; the binding builds the handler's Ruby objects
//! straight from the text on first access. Before, the worker built a `serde_json::Value`
//! of the whole payload (an allocation per String, number, object and array), which the Ruby
//! side walked and the engine then freed.

use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

/// A consumed record's payload.
#[derive(Debug, Clone, PartialEq)]
pub struct Payload {
    /// The JSON text as sent (`null` for a record without value).
    text: Box<[u8]>,
    /// The top-level `id`, when the payload is an object that has one (any JSON value).
    id: Option<Value>,
    /// The top-level `type`, when the payload is an object that has one (any JSON value).
    kind: Option<Value>,
}

impl Payload {
    /// Checks `text` as JSON and keeps it with its `id` and `type`.
    pub fn parse(text: &[u8]) -> Result<Self, serde_json::Error> {
        let Head { id, kind } = serde_json::from_slice(text)?;
        Ok(Self {
            text: text.into(),
            id,
            kind,
        })
    }

    /// The payload of a record without value: JSON `null`.
    pub fn null() -> Self {
        Self {
            text: (*b"null").into(),
            id: None,
            kind: None,
        }
    }

    /// The JSON text, checked.
    pub fn text(&self) -> &[u8] {
        &self.text
    }

    /// The top-level `id` field, if any.
    pub fn id(&self) -> Option<&Value> {
        self.id.as_ref()
    }

    /// The top-level `type` field, if any.
    pub fn kind(&self) -> Option<&Value> {
        self.kind.as_ref()
    }
}

/// Visitor methods for every JSON scalar (a String, a boolean, a number, `null`), each accepting
/// it and answering `$value`. (With `arbitrary_precision`, serde_json hands numbers over as a map;
/// the number methods stay for other deserializers.)
macro_rules! scalars_are {
    ($value:expr) => {
        fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
            Ok($value)
        }

        fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
            Ok($value)
        }

        fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
            Ok($value)
        }

        fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
            Ok($value)
        }

        fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
            Ok($value)
        }

        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok($value)
        }
    };
}

/// What the check keeps of a payload.
#[derive(Default)]
struct Head {
    id: Option<Value>,
    kind: Option<Value>,
}

impl<'de> Deserialize<'de> for Head {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(HeadVisitor)
    }
}

struct HeadVisitor;

impl<'de> Visitor<'de> for HeadVisitor {
    type Value = Head;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Head, A::Error> {
        // A repeated field keeps its last value, as a full decode does. (With
        // `arbitrary_precision`, a top-level number arrives here as a one-entry map under a
        // private name: neither field, so it is checked and nothing is kept.)
        let mut head = Head::default();
        while let Some(field) = map.next_key::<Field>()? {
            match field {
                Field::Id => head.id = Some(map.next_value()?),
                Field::Type => head.kind = Some(map.next_value()?),
                Field::Other => {
                    map.next_value::<Checked>()?;
                }
            }
        }
        Ok(head)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Head, A::Error> {
        while seq.next_element::<Checked>()?.is_some() {}
        Ok(Head::default())
    }

    scalars_are!(Head::default());
}

/// A top-level field name.
enum Field {
    Id,
    Type,
    Other,
}

impl<'de> Deserialize<'de> for Field {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct FieldVisitor;
        impl Visitor<'_> for FieldVisitor {
            type Value = Field;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a field name")
            }

            fn visit_str<E>(self, name: &str) -> Result<Field, E> {
                Ok(match name {
                    "id" => Field::Id,
                    "type" => Field::Type,
                    _ => Field::Other,
                })
            }
        }
        deserializer.deserialize_str(FieldVisitor)
    }
}

/// Any JSON value, checked as a full decode would check it (Strings are read as text: their
/// UTF-8 and escapes are validated), and not kept. Serde's `IgnoredAny` would take serde_json's
/// skipping path, which leaves Strings unchecked.
struct Checked;

impl<'de> Deserialize<'de> for Checked {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(CheckedVisitor)
    }
}

struct CheckedVisitor;

impl<'de> Visitor<'de> for CheckedVisitor {
    type Value = Checked;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Checked, A::Error> {
        while map.next_key::<Checked>()?.is_some() {
            map.next_value::<Checked>()?;
        }
        Ok(Checked)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Checked, A::Error> {
        while seq.next_element::<Checked>()?.is_some() {}
        Ok(Checked)
    }

    scalars_are!(Checked);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Payload, String> {
        Payload::parse(text.as_bytes()).map_err(|e| e.to_string())
    }

    #[test]
    fn keeps_the_text_and_the_top_level_id_and_type() {
        let text =
            r#"{"type":"user.created","n":{"id":"inner"},"id":123456789012345678901234567890}"#;
        let p = parse(text).unwrap();
        assert_eq!(p.text(), text.as_bytes());
        assert_eq!(p.kind(), Some(&Value::String("user.created".into())));
        // The number keeps its digits.
        let id = p
            .id()
            .and_then(Value::as_number)
            .map(serde_json::Number::as_str);
        assert_eq!(id, Some("123456789012345678901234567890"));
    }

    #[test]
    fn a_repeated_field_keeps_its_last_value_as_a_full_decode_does() {
        let text = r#"{"id":"a","id":"b"}"#;
        let full: Value = serde_json::from_str(text).unwrap();
        assert_eq!(parse(text).unwrap().id(), full.get("id"));
    }

    #[test]
    fn payloads_that_are_not_objects_have_no_fields() {
        for text in [
            "42",
            "-1.5e3",
            "\"id\"",
            "[{\"id\":1}]",
            "true",
            "null",
            " {} ",
        ] {
            let p = parse(text).unwrap();
            assert_eq!((p.id(), p.kind()), (None, None), "{text}");
        }
    }

    /// Everything a full decode into a `Value` refuses is refused, inside fields that are not
    /// kept too; everything it accepts is accepted.
    #[test]
    fn refuses_exactly_what_a_full_decode_refuses() {
        let cases: [&[u8]; 16] = [
            br#"{"a":"\ud800"}"#,
            br#"{"a":"\x"}"#,
            b"{\"a\":\"\xff\"}",
            b"{\"\xff\":1}",
            b"{\"a\":\"tab\there\"}",
            br#"{"a":01}"#,
            br#"{"a":1.}"#,
            br#"{"a":[1,]}"#,
            br#"{"a":1} x"#,
            br#"{"a":1"#,
            b"",
            br#"{"a":"\ud83d\ude00","b":1e400,"c":-0}"#,
            br#"[[[[[["deep"]]]]]]"#,
            br#"{"id":"\u00e9t\u00e9"}"#,
            b"{\"a\":\"caf\xc3\xa9\"}",
            br#"{"a":NaN}"#,
        ];
        for text in cases {
            let full = serde_json::from_slice::<Value>(text).map_err(|e| e.to_string());
            let ours = Payload::parse(text).map(|_| ()).map_err(|e| e.to_string());
            assert_eq!(ours, full.map(|_| ()), "{}", text.escape_ascii());
        }
        let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
        assert!(serde_json::from_str::<Value>(&deep).is_err());
        assert!(parse(&deep).is_err(), "the same depth limit");
    }
}
