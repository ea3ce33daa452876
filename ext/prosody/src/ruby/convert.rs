//! Conversions between Ruby values and engine data.

use magnus::{
    rb_sys::FromRawValue, value::ReprValue, Error, Float, Integer, RArray, RHash, RString, Ruby,
    Symbol, Value,
};
use prosody_core::config::RawValue;
use serde_json::Value as Json;

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

/// A decoded JSON value as Ruby objects (Hash keys are Strings).
pub fn json_to_ruby(ruby: &Ruby, json: &Json) -> Value {
    match json {
        Json::Null => ruby.qnil().as_value(),
        Json::Bool(b) => {
            if *b {
                ruby.qtrue().as_value()
            } else {
                ruby.qfalse().as_value()
            }
        }
        Json::Number(n) => number_to_ruby(ruby, n),
        Json::String(s) => ruby.str_new(s).as_value(),
        Json::Array(items) => {
            let array = ruby.ary_new_capa(items.len());
            for item in items {
                let _ = array.push(json_to_ruby(ruby, item));
            }
            array.as_value()
        }
        Json::Object(map) => {
            let hash = ruby.hash_new();
            for (k, v) in map {
                let _ = hash.aset(interned_key(ruby, k), json_to_ruby(ruby, v));
            }
            hash.as_value()
        }
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

/// A JSON number as Ruby's `JSON.parse` makes it: an Integer of any size for a number written
/// without fraction or exponent, a Float otherwise.
fn number_to_ruby(ruby: &Ruby, n: &serde_json::Number) -> Value {
    if let Some(i) = n.as_i64() {
        return ruby.integer_from_i64(i).as_value();
    }
    if let Some(u) = n.as_u64() {
        return ruby.integer_from_u64(u).as_value();
    }
    let digits = n.as_str();
    if !digits.contains(['.', 'e', 'E']) {
        // Larger than 64 bits: Ruby parses the digits into a Bignum.
        if let Ok(big) = ruby.str_new(digits).funcall::<_, _, Value>("to_i", ()) {
            return big;
        }
    }
    ruby.float_from_f64(n.as_f64().unwrap_or(f64::NAN))
        .as_value()
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
