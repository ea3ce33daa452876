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

use serde::de::{
    Deserialize, DeserializeSeed, Deserializer, Error as _, MapAccess, SeqAccess, Visitor,
};
use serde_json::Value;

/// The key under which serde_json (with `arbitrary_precision`) hands a number over: a map with
/// this one key and the number's digits as its value. A full decode reads any object whose first
/// key is this name that way (its value must be a number's digits, and nothing may follow), so
/// the check here and the binding's builder do too.
pub const NUMBER_MARKER: &str = "$serde_json::private::Number";

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
        let mut deserializer = serde_json::Deserializer::from_slice(text);
        let Head { id, kind } = Walk { top: true }.deserialize(&mut deserializer)?;
        deserializer.end()?;
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

/// What the check keeps of a payload.
#[derive(Default)]
struct Head {
    id: Option<Value>,
    kind: Option<Value>,
}

/// Walks one JSON value, checking it as a full decode would (Strings are read as text, so their
/// UTF-8 and escapes are validated: serde's `IgnoredAny` would take serde_json's skipping path,
/// which leaves them unchecked), and keeps nothing but, at the top level, `id` and `type`.
#[derive(Clone, Copy)]
struct Walk {
    top: bool,
}

impl<'de> DeserializeSeed<'de> for Walk {
    type Value = Head;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Head, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Walk {
    type Value = Head;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Head, A::Error> {
        // A repeated field keeps its last value, as a full decode does. A number arrives here as
        // a map under `NUMBER_MARKER`: checked, and nothing is kept.
        let mut head = Head::default();
        let inner = Walk { top: false };
        let mut first = true;
        while let Some(field) = map.next_key::<Field>()? {
            match field {
                Field::Marker if first => {
                    number_digits(&mut map)?;
                    return Ok(head);
                }
                Field::Id if self.top => head.id = Some(map.next_value()?),
                Field::Type if self.top => head.kind = Some(map.next_value()?),
                _ => {
                    map.next_value_seed(inner)?;
                }
            }
            first = false;
        }
        Ok(head)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Head, A::Error> {
        while seq.next_element_seed(Walk { top: false })?.is_some() {}
        Ok(Head::default())
    }

    // Scalars. (With `arbitrary_precision`, serde_json hands numbers over as a map; the number
    // methods serve other deserializers.)
    fn visit_str<E>(self, _: &str) -> Result<Head, E> {
        Ok(Head::default())
    }

    fn visit_bool<E>(self, _: bool) -> Result<Head, E> {
        Ok(Head::default())
    }

    fn visit_i64<E>(self, _: i64) -> Result<Head, E> {
        Ok(Head::default())
    }

    fn visit_u64<E>(self, _: u64) -> Result<Head, E> {
        Ok(Head::default())
    }

    fn visit_f64<E>(self, _: f64) -> Result<Head, E> {
        Ok(Head::default())
    }

    fn visit_unit<E>(self) -> Result<Head, E> {
        Ok(Head::default())
    }
}

/// A field name, as far as the check cares.
enum Field {
    Id,
    Type,
    Marker,
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
                    NUMBER_MARKER => Field::Marker,
                    _ => Field::Other,
                })
            }
        }
        deserializer.deserialize_str(FieldVisitor)
    }
}

/// Reads the value after a first key [`NUMBER_MARKER`] as a full decode does: it must be the
/// digits of a JSON number (serde_json's own numbers always are).
fn number_digits<'de, A: MapAccess<'de>>(map: &mut A) -> Result<(), A::Error> {
    let digits: String = map.next_value()?;
    if is_json_number(&digits) {
        Ok(())
    } else {
        Err(A::Error::custom(format!("invalid number {digits:?}")))
    }
}

/// Whether `text` is a number as JSON writes one: `-?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)?`.
fn is_json_number(text: &str) -> bool {
    let bytes = text.as_bytes();
    let mut at = usize::from(bytes.first() == Some(&b'-'));
    let digits_from = |at: &mut usize| {
        let start = *at;
        while bytes.get(*at).is_some_and(u8::is_ascii_digit) {
            *at += 1;
        }
        *at > start
    };
    match bytes.get(at) {
        Some(b'0') => at += 1,
        Some(b'1'..=b'9') => {
            digits_from(&mut at);
        }
        _ => return false,
    }
    if bytes.get(at) == Some(&b'.') {
        at += 1;
        if !digits_from(&mut at) {
            return false;
        }
    }
    if matches!(bytes.get(at), Some(b'e' | b'E')) {
        at += 1;
        if matches!(bytes.get(at), Some(b'+' | b'-')) {
            at += 1;
        }
        if !digits_from(&mut at) {
            return false;
        }
    }
    at == bytes.len()
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
        // An object whose first key is serde_json's number marker is read as a number by a full
        // decode: accepted and refused alike (the messages differ).
        let marker = NUMBER_MARKER;
        for text in [
            format!(r#"{{"{marker}":"12.5e3"}}"#),
            format!(r#"{{"{marker}":"abc"}}"#),
            format!(r#"{{"{marker}":"12","b":1}}"#),
            format!(r#"{{"{marker}":5}}"#),
            format!(r#"{{"a":{{"{marker}":"01"}}}}"#),
            format!(r#"{{"a":1,"{marker}":"x"}}"#),
            format!(r#"[{{"{marker}":"-0.5"}}]"#),
        ] {
            let full = serde_json::from_str::<Value>(&text).is_ok();
            assert_eq!(parse(&text).is_ok(), full, "{text}");
        }
        for (text, number) in [
            ("0", true),
            ("-12.50e+3", true),
            ("1E9", true),
            ("01", false),
            ("1.", false),
            (".5", false),
            ("-", false),
            ("1e", false),
            ("1e+", false),
            (" 1", false),
            ("", false),
        ] {
            assert_eq!(is_json_number(text), number, "{text:?}");
        }
        let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
        assert!(serde_json::from_str::<Value>(&deep).is_err());
        assert!(parse(&deep).is_err(), "the same depth limit");
    }
}
