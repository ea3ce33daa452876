//! Conversions between Ruby values and engine data.

use magnus::{
    rb_sys::{AsRawValue, FromRawValue},
    value::ReprValue,
    Error, Float, Integer, RArray, RHash, RString, Ruby, Symbol, Value,
};
use prosody_core::config::RawValue;
use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

/// An option value as the configuration table reads it. `name` words the error.
pub fn raw_value(ruby: &Ruby, name: &str, value: Value) -> Result<RawValue, Error> {
    raw(ruby, name, prosody_core::config::is_secret(name), value)
}

/// [`raw_value`]; a `secret` value never appears in an error.
fn raw(ruby: &Ruby, name: &str, secret: bool, value: Value) -> Result<RawValue, Error> {
    if value.is_nil() {
        return Ok(RawValue::Nil);
    }
    if value.is_kind_of(ruby.class_true_class()) {
        return Ok(RawValue::Bool(true));
    }
    if value.is_kind_of(ruby.class_false_class()) {
        return Ok(RawValue::Bool(false));
    }
    if let Some(i) = Integer::from_value(value) {
        return Ok(i
            .to_i64()
            .map(RawValue::Int)
            .unwrap_or_else(|_| RawValue::Str(i.to_string())));
    }
    if let Some(f) = Float::from_value(value) {
        return Ok(RawValue::Float(f.to_f64()));
    }
    // A secret option's value never appears in an error.
    let shown = |value: Value| {
        if secret {
            prosody_core::config::HIDDEN.to_owned()
        } else {
            value.inspect()
        }
    };
    if let Some(s) = RString::from_value(value) {
        // SAFETY: the bytes are copied before any other Ruby code can run.
        return match std::str::from_utf8(unsafe { s.as_slice() }) {
            Ok(text) => Ok(RawValue::Str(text.to_owned())),
            Err(_) => Err(Error::new(
                ruby.exception_arg_error(),
                format!(
                    "invalid :{name}, expected valid UTF-8 text, got {}",
                    shown(value)
                ),
            )),
        };
    }
    if let Some(s) = Symbol::from_value(value) {
        return Ok(RawValue::Str(s.name()?.into_owned()));
    }
    if let Some(a) = RArray::from_value(value) {
        return a
            .into_iter()
            .map(|v| raw(ruby, name, secret, v))
            .collect::<Result<_, _>>()
            .map(RawValue::List);
    }
    if value.is_kind_of(ruby.class_numeric()) {
        let f: f64 = value.funcall("to_f", ())?;
        return Ok(RawValue::Float(f));
    }
    if let Some(hash) = RHash::from_value(value) {
        let mut entries = Vec::with_capacity(hash.len());
        hash.foreach(|k: Value, v: Value| {
            let key = string_like(ruby, &format!("key of :{name}"), k)?;
            let secret = secret || prosody_core::config::is_secret_property(&key);
            entries.push((key, raw(ruby, name, secret, v)?));
            Ok(magnus::r_hash::ForEach::Continue)
        })?;
        return Ok(RawValue::Map(entries));
    }
    // SAFETY: the class name is copied into the message before any other Ruby code runs.
    let class = unsafe { value.classname() }.into_owned();
    Err(Error::new(
        ruby.exception_arg_error(),
        format!(
            "invalid :{name}, got an instance of {class}: {}",
            shown(value)
        ),
    ))
}

/// The contents of a Ruby String that must be text: an `ArgumentError` naming `what` when its
/// bytes are not valid UTF-8 (whatever its encoding says), instead of a bare `EncodingError`.
pub fn utf8(ruby: &Ruby, what: &str, s: RString) -> Result<String, Error> {
    // SAFETY: the bytes are copied before any other Ruby code can run.
    let bytes = unsafe { s.as_slice() };
    std::str::from_utf8(bytes).map(str::to_owned).map_err(|_| {
        Error::new(
            ruby.exception_arg_error(),
            format!(
                "{what} must be valid UTF-8 text, got the bytes {}",
                s.inspect()
            ),
        )
    })
}

/// A payload's JSON text (checked by the engine) as Ruby objects, built straight from the text:
/// Hash keys are Strings in the order written (a repeated key keeps its first place and its last
/// value, as `JSON.parse` does), integers of any size stay Integers.
pub fn json_text_to_ruby(ruby: &Ruby, text: &[u8]) -> Result<Value, serde_json::Error> {
    let mut deserializer = serde_json::Deserializer::from_slice(text);
    let value = Build(ruby).deserialize(&mut deserializer)?;
    deserializer.end()?;
    Ok(value)
}

/// Builds one JSON value as Ruby objects. With the GVL held (the `&Ruby` proves it); the
/// objects being filled are on this thread's stack, where Ruby's collector finds them.
#[derive(Clone, Copy)]
struct Build<'r>(&'r Ruby);

impl<'de> DeserializeSeed<'de> for Build<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Build<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(self.0.qnil().as_value())
    }

    fn visit_bool<E>(self, b: bool) -> Result<Value, E> {
        Ok(if b {
            self.0.qtrue().as_value()
        } else {
            self.0.qfalse().as_value()
        })
    }

    fn visit_i64<E>(self, i: i64) -> Result<Value, E> {
        Ok(self.0.integer_from_i64(i).as_value())
    }

    fn visit_u64<E>(self, u: u64) -> Result<Value, E> {
        Ok(self.0.integer_from_u64(u).as_value())
    }

    fn visit_f64<E>(self, f: f64) -> Result<Value, E> {
        Ok(self.0.float_from_f64(f).as_value())
    }

    fn visit_str<E>(self, s: &str) -> Result<Value, E> {
        Ok(self.0.str_new(s).as_value())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let array = self.0.ary_new_capa(seq.size_hint().unwrap_or(0));
        while let Some(item) = seq.next_element_seed(self)? {
            // SAFETY: the GVL is held; this Array was made here (not frozen, not shared), so
            // pushing raises nothing short of running out of memory, which every object made
            // here risks alike. (`RArray::push` would wrap each call in `rb_protect`.)
            unsafe { rb_sys::rb_ary_push(array.as_raw(), item.as_raw()) };
        }
        Ok(array.as_value())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let hash = self.0.hash_new();
        let mut first = true;
        while let Some(key) = map.next_key_seed(KeyOf(self.0, first))? {
            match key {
                // With `arbitrary_precision`, serde_json hands a number over as a one-entry map
                // under a private name, with its digits as the value.
                // (The digits come as an owned String: reading them moves it.)
                Key::Number => {
                    let digits: String = map.next_value()?;
                    return Ok(number_to_ruby(self.0, &digits));
                }
                Key::Text(key) => {
                    let value = map.next_value_seed(self)?;
                    // SAFETY: the GVL is held; this Hash was made here (not frozen, not being
                    // iterated) and the key is a String (hashed without calling Ruby code), so
                    // this raises nothing short of running out of memory, as above.
                    unsafe { rb_sys::rb_hash_aset(hash.as_raw(), key.as_raw(), value.as_raw()) };
                }
            }
            first = false;
        }
        Ok(hash.as_value())
    }
}

/// A map key: a Hash key, or the marker of a number (only ever as a map's first key).
enum Key {
    Number,
    Text(Value),
}

/// Reads a map key; `.1` says whether it is the map's first.
struct KeyOf<'r>(&'r Ruby, bool);

impl<'de> DeserializeSeed<'de> for KeyOf<'_> {
    type Value = Key;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Key, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl Visitor<'_> for KeyOf<'_> {
    type Value = Key;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a String key")
    }

    fn visit_str<E>(self, key: &str) -> Result<Key, E> {
        // An object whose first key is the marker is read as a number, as a full decode (and
        // the engine's check, which refused any whose value is not a number's digits) does.
        if self.1 && key == prosody_core::payload::NUMBER_MARKER {
            return Ok(Key::Number);
        }
        Ok(Key::Text(interned_key(self.0, key)))
    }
}

/// A Hash key as `JSON.parse` makes it: a frozen String from Ruby's table of deduplicated
/// strings. After a key's first use this allocates nothing, and `Hash#[]=` keeps it as it is
/// (an unfrozen key would be copied and frozen: two objects per key per message).
fn interned_key(_ruby: &Ruby, key: &str) -> Value {
    let len = std::os::raw::c_long::try_from(key.len()).unwrap_or(std::os::raw::c_long::MAX);
    // SAFETY: the GVL is held (the `&Ruby` proves it); `key` is valid UTF-8 that Ruby copies
    // when its table has no such string yet; the result is a live, frozen String.
    unsafe {
        Value::from_raw(rb_sys::rb_enc_interned_str(
            key.as_ptr().cast(),
            len,
            rb_sys::rb_utf8_encoding(),
        ))
    }
}

/// A JSON number, from its digits as written, as Ruby's `JSON.parse` makes it: an Integer of
/// any size for a number written without fraction or exponent, a Float otherwise (NaN for one
/// beyond the Float range).
fn number_to_ruby(ruby: &Ruby, digits: &str) -> Value {
    if let Ok(i) = digits.parse::<i64>() {
        return ruby.integer_from_i64(i).as_value();
    }
    if let Ok(u) = digits.parse::<u64>() {
        return ruby.integer_from_u64(u).as_value();
    }
    if !digits.contains(['.', 'e', 'E']) {
        // Larger than 64 bits: Ruby parses the digits into a Bignum.
        if let Ok(big) = ruby.str_new(digits).funcall::<_, _, Value>("to_i", ()) {
            return big;
        }
    }
    let float = digits.parse::<f64>().ok().filter(|f| f.is_finite());
    ruby.float_from_f64(float.unwrap_or(f64::NAN)).as_value()
}

/// A Hash of String (or Symbol) keys and values as header pairs.
/// Header names are text; values are bytes, sent exactly as given (a binary String too).
pub fn headers(ruby: &Ruby, hash: Option<RHash>) -> Result<Vec<(String, Vec<u8>)>, Error> {
    let Some(hash) = hash else {
        return Ok(Vec::new());
    };
    let mut out = Vec::with_capacity(hash.len());
    hash.foreach(|k: Value, v: Value| {
        let key = string_like(ruby, "header name", k)?;
        let value = if let Some(s) = RString::from_value(v) {
            bytes(s)
        } else {
            string_like(ruby, &format!("value of header {key:?}"), v)?.into_bytes()
        };
        out.push((key, value));
        Ok(magnus::r_hash::ForEach::Continue)
    })?;
    Ok(out)
}

/// A copy of a Ruby String's bytes, whatever its encoding.
pub fn bytes(s: RString) -> Vec<u8> {
    // SAFETY: the bytes are copied before any other Ruby code can run.
    unsafe { s.as_slice() }.to_vec()
}

/// Bytes as a Ruby String: UTF-8 when they are valid UTF-8, binary (ASCII-8BIT) otherwise, so
/// that bytes arrive exactly as sent and text arrives as text.
pub fn bytes_to_ruby(ruby: &Ruby, bytes: &[u8]) -> RString {
    match std::str::from_utf8(bytes) {
        Ok(text) => ruby.str_new(text),
        Err(_) => ruby.str_from_slice(bytes),
    }
}

/// A String or Symbol as a Rust string; anything else is an `ArgumentError` naming `what`.
pub fn string_like(ruby: &Ruby, what: &str, value: Value) -> Result<String, Error> {
    if let Some(s) = RString::from_value(value) {
        return utf8(ruby, what, s);
    }
    if let Some(s) = Symbol::from_value(value) {
        return Ok(s.name()?.into_owned());
    }
    Err(Error::new(
        ruby.exception_arg_error(),
        format!("{what} must be a String, got {}", value.inspect()),
    ))
}
