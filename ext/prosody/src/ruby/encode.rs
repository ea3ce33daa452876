//! Records for `send_messages`, read from their Ruby Hashes and encoded as JSON here, with no
//! Ruby call per record. Only plain cases are handled: anything else (a value that is not plainly
//! JSON, a String in another encoding or with broken bytes, a Float that is not finite, a
//! Bignum, nesting deeper than `JSON.generate` allows, an unknown or ill-typed field) returns
//! `None`, and `Prosody::Outgoing` encodes that record or raises the `ArgumentError` that says
//! what is wrong. Both produce the same record for the same input.

use std::io::Write as _;
use std::ops::Range;

use magnus::encoding::Coderange;
use magnus::r_hash::ForEach;
use magnus::rb_sys::{AsRawValue, FromRawValue};
use magnus::value::LazyId;
use magnus::{prelude::*, Float, Integer, RArray, RHash, RString, Ruby, Symbol, Value};
use prosody_core::kafka::producer::{RawRecord, Record};

/// `JSON.generate`'s default `max_nesting`.
const MAX_NESTING: usize = 100;

/// The largest partition number (librdkafka's partitions are 32-bit).
const MAX_PARTITION: i64 = i32::MAX as i64;

/// The fields a record Hash may have, as Symbols.
static FIELDS: [(&str, LazyId); 6] = [
    ("topic", LazyId::new("topic")),
    ("key", LazyId::new("key")),
    ("payload", LazyId::new("payload")),
    ("headers", LazyId::new("headers")),
    ("partition", LazyId::new("partition")),
    ("tombstone", LazyId::new("tombstone")),
];

/// The records of one `send_messages` call, their topics, keys and payloads in one buffer (no
/// allocation per record; librdkafka copies each record from it when it is queued).
#[derive(Default)]
pub struct Batch {
    /// Every record's bytes, one after another.
    bytes: Vec<u8>,
    /// Where each record's parts are in `bytes`.
    records: Vec<Span>,
}

impl Batch {
    /// An empty batch with room for `records` records.
    pub fn with_capacity(records: usize) -> Self {
        Self {
            bytes: Vec::with_capacity(records * 48),
            records: Vec::with_capacity(records),
        }
    }

    /// Appends the record a `{topic:, key:, payload:, headers:, partition:, tombstone:}` Hash
    /// describes, if it is a plain one (see the module documentation); otherwise appends nothing
    /// and returns false. Each field is looked up by its Symbol; a Hash with any other key (a
    /// String key, a typo) is not plain.
    pub fn push_plain(&mut self, ruby: &Ruby, value: Value) -> bool {
        let mark = self.bytes.len();
        let span = RHash::from_value(value).and_then(|hash| {
            let mut fields = Fields::new(&mut self.bytes);
            let mut found = 0;
            for (name, id) in &FIELDS {
                if let Some(v) = symbol_lookup(hash, ruby.into_value(**id)) {
                    found += 1;
                    fields.set(ruby, name, v)?;
                }
            }
            (found == hash.len()).then_some(())?;
            fields.finish()
        });
        self.keep(mark, span)
    }

    /// Appends a record read elsewhere (by `Prosody::Outgoing`).
    pub fn push(&mut self, record: Record) {
        let topic = append(&mut self.bytes, record.topic.as_bytes());
        let key = append(&mut self.bytes, &record.key);
        let payload = record.payload.map(|p| append(&mut self.bytes, &p));
        self.records.push(Span {
            topic,
            key,
            payload,
            headers: record.headers,
            partition: record.partition,
        });
    }

    /// The records, borrowing their bytes.
    pub fn raw(&self) -> Vec<RawRecord<'_>> {
        (0..self.records.len())
            .filter_map(|i| self.get(i))
            .collect()
    }

    /// Writes `cx` as the trace context of every record that carries none of its own.
    pub fn carry(&mut self, cx: &opentelemetry::Context) {
        use opentelemetry::trace::TraceContextExt as _;
        if !cx.span().span_context().is_valid() {
            return;
        }
        for record in &mut self.records {
            if !prosody_core::spans::has_context(&record.headers) {
                prosody_core::spans::inject(cx, &mut record.headers);
            }
        }
    }

    /// Record `index`, borrowing its bytes.
    pub fn get(&self, index: usize) -> Option<RawRecord<'_>> {
        let span = self.records.get(index)?;
        Some(RawRecord {
            // Topics were checked to be UTF-8 when read.
            topic: std::str::from_utf8(&self.bytes[span.topic.clone()]).unwrap_or_default(),
            key: Some(&self.bytes[span.key.clone()]),
            payload: span.payload.clone().map(|p| &self.bytes[p]),
            headers: &span.headers,
            partition: span.partition,
        })
    }

    /// Appends the record of one send (`payload` `None` for a tombstone), if every part is a
    /// plain one; otherwise appends nothing and returns false.
    pub fn push_plain_parts(
        &mut self,
        ruby: &Ruby,
        topic: Value,
        key: Value,
        payload: Option<Value>,
        headers: Value,
        partition: Value,
    ) -> bool {
        let mark = self.bytes.len();
        let mut fields = Fields::new(&mut self.bytes);
        let read = (|| {
            fields.set(ruby, "topic", topic)?;
            fields.set(ruby, "key", key)?;
            match payload {
                Some(payload) => fields.set(ruby, "payload", payload)?,
                None => fields.tombstone = true,
            }
            fields.set(ruby, "headers", headers)?;
            fields.set(ruby, "partition", partition)?;
            Some(())
        })();
        let span = read.and_then(|()| fields.finish());
        self.keep(mark, span)
    }

    /// Keeps `span` as the next record, or drops the bytes written since `mark`.
    fn keep(&mut self, mark: usize, span: Option<Span>) -> bool {
        match span {
            Some(span) => {
                self.records.push(span);
                true
            }
            None => {
                self.bytes.truncate(mark);
                false
            }
        }
    }
}

/// Appends `part` to `bytes` and returns where it is.
fn append(bytes: &mut Vec<u8>, part: &[u8]) -> Range<usize> {
    let start = bytes.len();
    bytes.extend_from_slice(part);
    start..bytes.len()
}

/// Where one record's parts are in its buffer.
struct Span {
    topic: Range<usize>,
    key: Range<usize>,
    /// `None` for a tombstone.
    payload: Option<Range<usize>>,
    headers: Vec<(String, Vec<u8>)>,
    partition: Option<i32>,
}

/// `hash[symbol]` without its default, or `None`. A Symbol key is hashed and compared by Ruby
/// itself, never by a method of the application's, so the lookup runs no Ruby code and cannot
/// raise (which is why it needs no `rb_protect` around it).
fn symbol_lookup(hash: RHash, symbol: Value) -> Option<Value> {
    // SAFETY: called with the GVL held (the callers hold a `&Ruby`); `hash` and `symbol` are live
    // values; `rb_hash_lookup2` returns the stored value or the given default.
    let undef = rb_sys::special_consts::Qundef as rb_sys::VALUE;
    let found = unsafe { rb_sys::rb_hash_lookup2(hash.as_raw(), symbol.as_raw(), undef) };
    // SAFETY: a value other than the default is a live value stored in `hash`.
    (found != undef).then(|| unsafe { Value::from_raw(found) })
}

/// A record's fields as read so far, their bytes appended to `out`.
struct Fields<'a> {
    out: &'a mut Vec<u8>,
    topic: Option<Range<usize>>,
    key: Option<Range<usize>>,
    payload: Option<Range<usize>>,
    headers: Vec<(String, Vec<u8>)>,
    partition: Option<i32>,
    tombstone: bool,
}

impl<'a> Fields<'a> {
    fn new(out: &'a mut Vec<u8>) -> Self {
        Self {
            out,
            topic: None,
            key: None,
            payload: None,
            headers: Vec::new(),
            partition: None,
            tombstone: false,
        }
    }

    /// Reads field `name`; `None` when it is not a plain one.
    fn set(&mut self, ruby: &Ruby, name: &str, v: Value) -> Option<()> {
        let start = self.out.len();
        match name {
            "topic" => {
                append_text(v, self.out)?;
                self.topic = Some(start..self.out.len());
            }
            "key" => {
                append_bytes_or_symbol(v, self.out)?;
                self.key = Some(start..self.out.len());
            }
            "payload" => {
                json(ruby, v, self.out, 0)?;
                self.payload = Some(start..self.out.len());
            }
            "headers" => self.headers = headers(RHash::from_value(v)?)?,
            "partition" if v.is_nil() => {}
            "partition" => {
                let p = Integer::from_value(v)?.to_i64().ok()?;
                self.partition = Some(
                    i32::try_from(p)
                        .ok()
                        .filter(|_| (0..=MAX_PARTITION).contains(&p))?,
                );
            }
            "tombstone" if v.is_nil() => {}
            "tombstone" => self.tombstone = boolean(ruby, v)?,
            _ => return None,
        }
        Some(())
    }

    /// Where the record's parts are, when the fields make a whole one.
    fn finish(self) -> Option<Span> {
        let payload = match (self.tombstone, self.payload) {
            (true, None) => None,
            (false, Some(payload)) => Some(payload),
            _ => return None,
        };
        Some(Span {
            topic: self.topic.filter(|t| !t.is_empty())?,
            key: self.key?,
            payload,
            headers: self.headers,
            partition: self.partition,
        })
    }
}

/// Header pairs: names and values Strings or Symbols, names valid UTF-8.
fn headers(hash: RHash) -> Option<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::with_capacity(hash.len());
    let mut plain = true;
    let _ = hash.foreach(|k: Value, v: Value| {
        let (mut name, mut value) = (Vec::new(), Vec::new());
        let pair = append_text(k, &mut name)
            .and_then(|()| String::from_utf8(name).ok())
            .zip(append_bytes_or_symbol(v, &mut value).map(|()| value));
        match pair {
            Some(pair) => out.push(pair),
            None => plain = false,
        }
        Ok(if plain {
            ForEach::Continue
        } else {
            ForEach::Stop
        })
    });
    plain.then_some(out)
}

fn boolean(ruby: &Ruby, v: Value) -> Option<bool> {
    if v.is_kind_of(ruby.class_true_class()) {
        Some(true)
    } else if v.is_kind_of(ruby.class_false_class()) {
        Some(false)
    } else {
        None
    }
}

/// Appends a String's bytes (any encoding) or a Symbol's name.
fn append_bytes_or_symbol(v: Value, out: &mut Vec<u8>) -> Option<()> {
    if let Some(s) = RString::from_value(v) {
        // SAFETY: copied before any other Ruby code runs.
        out.extend_from_slice(unsafe { s.as_slice() });
        return Some(());
    }
    out.extend_from_slice(Symbol::from_value(v)?.name().ok()?.as_bytes());
    Some(())
}

/// Appends the UTF-8 bytes of a String in a UTF-8 compatible encoding (or of ASCII-only bytes),
/// or of a Symbol's name.
fn append_text(v: Value, out: &mut Vec<u8>) -> Option<()> {
    if let Some(s) = RString::from_value(v) {
        return with_utf8(s, |bytes| out.extend_from_slice(bytes));
    }
    out.extend_from_slice(Symbol::from_value(v)?.name().ok()?.as_bytes());
    Some(())
}

/// `f` of the bytes of `s`, when they are UTF-8 text as `JSON.generate` takes it without
/// converting. `f` must not call Ruby (the bytes are Ruby's).
fn with_utf8<R>(s: RString, f: impl FnOnce(&[u8]) -> R) -> Option<R> {
    let range = s.enc_coderange_scan();
    let plain = range == Coderange::SevenBit
        || (range == Coderange::Valid && s.is_utf8_compatible_encoding());
    // SAFETY: `f` uses the bytes before any other Ruby code runs.
    plain.then(|| f(unsafe { s.as_slice() }))
}

/// Appends `v` as JSON to `out`.
fn json(ruby: &Ruby, v: Value, out: &mut Vec<u8>, depth: usize) -> Option<()> {
    if v.is_nil() {
        out.extend_from_slice(b"null");
    } else if let Some(b) = boolean(ruby, v) {
        out.extend_from_slice(if b { b"true" } else { b"false" });
    } else if let Some(s) = RString::from_value(v) {
        with_utf8(s, |bytes| string(bytes, out))?;
    } else if let Some(s) = Symbol::from_value(v) {
        string(s.name().ok()?.as_bytes(), out);
    } else if let Some(i) = Integer::from_value(v) {
        write!(out, "{}", i.to_i64().ok()?).ok()?;
    } else if let Some(f) = Float::from_value(v) {
        let f = f.to_f64();
        if !f.is_finite() {
            return None;
        }
        // Debug keeps a fraction or an exponent (1.0, 1e20), so it reads back as a Float.
        write!(out, "{f:?}").ok()?;
    } else if let Some(a) = RArray::from_value(v) {
        if depth >= MAX_NESTING {
            return None;
        }
        out.push(b'[');
        for (i, item) in a.into_iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            json(ruby, item, out, depth + 1)?;
        }
        out.push(b']');
    } else if let Some(h) = RHash::from_value(v) {
        if depth >= MAX_NESTING {
            return None;
        }
        out.push(b'{');
        let mut first = true;
        let mut plain = true;
        let _ = h.foreach(|k: Value, item: Value| {
            if !first {
                out.push(b',');
            }
            first = false;
            let named = if let Some(s) = RString::from_value(k) {
                with_utf8(s, |name| string(name, out))
            } else if let Some(name) = Symbol::from_value(k).and_then(|s| s.name().ok()) {
                string(name.as_bytes(), out);
                Some(())
            } else {
                None
            };
            plain = named.is_some() && {
                out.push(b':');
                json(ruby, item, out, depth + 1).is_some()
            };
            Ok(if plain {
                ForEach::Continue
            } else {
                ForEach::Stop
            })
        });
        if !plain {
            return None;
        }
        out.push(b'}');
    } else {
        return None;
    }
    Some(())
}

/// Appends UTF-8 `s` as a JSON string, escaped as `JSON.generate` escapes it.
fn string(s: &[u8], out: &mut Vec<u8>) {
    out.push(b'"');
    let mut start = 0;
    for (i, &b) in s.iter().enumerate() {
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&s[start..i]);
        if escape.is_empty() {
            let _ = write!(out, "\\u{b:04x}");
        } else {
            out.extend_from_slice(escape);
        }
        start = i + 1;
    }
    out.extend_from_slice(&s[start..]);
    out.push(b'"');
}
