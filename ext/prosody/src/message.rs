//! `Prosody::Message`: a consumed record. Its JSON payload was checked on an engine thread; it
//! becomes Ruby objects, built straight from the text, on first access and is kept (GC-marked)
//! for later calls.

use std::sync::{Arc, OnceLock};

use magnus::{
    gc, method, prelude::*, value::Opaque, DataTypeFunctions, Error, RModule, RString, Ruby,
    TypedData, Value,
};
use prosody_core::event::ConsumedMessage;

use crate::ruby::convert::{bytes_to_ruby, json_text_to_ruby};
use crate::ruby::errors;

#[derive(TypedData)]
#[magnus(class = "Prosody::Message", free_immediately, size, mark)]
pub struct Message {
    /// The record (shared with its partition worker, which keeps it for retries).
    inner: Arc<ConsumedMessage>,
    /// `payload` as Ruby objects, built on first call.
    payload: OnceLock<Opaque<Value>>,
    /// `headers` as a Ruby Hash, built on first call.
    headers: OnceLock<Opaque<Value>>,
}

/// Dropped on an engine thread, not inside the garbage collector (see `ruby::graveyard`).
impl DataTypeFunctions for Message {
    fn free(self: Box<Self>) {
        crate::ruby::graveyard::bury(self);
    }

    fn mark(&self, marker: &gc::Marker) {
        for cached in [&self.payload, &self.headers] {
            if let Some(v) = cached.get() {
                marker.mark(*v);
            }
        }
    }
}

impl Message {
    pub fn new(inner: Arc<ConsumedMessage>) -> Self {
        Self {
            inner,
            payload: OnceLock::new(),
            headers: OnceLock::new(),
        }
    }

    fn topic(&self) -> &str {
        &self.inner.topic
    }

    fn partition(&self) -> i32 {
        self.inner.partition
    }

    fn offset(&self) -> i64 {
        self.inner.offset
    }

    fn key(ruby: &Ruby, rb_self: &Self) -> Option<RString> {
        rb_self.inner.key.as_deref().map(|k| bytes_to_ruby(ruby, k))
    }

    fn timestamp(ruby: &Ruby, rb_self: &Self) -> Result<Value, Error> {
        match rb_self.inner.timestamp_ms {
            Some(ms) => Ok(ruby
                .time_new(ms.div_euclid(1000), ms.rem_euclid(1000) * 1000)?
                .as_value()),
            None => Ok(ruby.qnil().as_value()),
        }
    }

    fn payload(ruby: &Ruby, rb_self: &Self) -> Result<Value, Error> {
        if let Some(cached) = rb_self.payload.get() {
            return Ok(ruby.get_inner(*cached));
        }
        // The engine checked the text with the same parser when the record was read, so this
        // cannot fail; if it ever did, the handler gets an error naming the record, never nil.
        let value = json_text_to_ruby(ruby, rb_self.inner.payload.text()).map_err(|e| {
            errors::prosody(
                ruby,
                errors::Class::Error,
                format!("could not decode the payload of {}: {e}", rb_self.inspect()),
            )
        })?;
        let _ = rb_self.payload.set(Opaque::from(value));
        Ok(value)
    }

    /// Whether the record has no value (a tombstone); its payload is then nil.
    fn tombstone(&self) -> bool {
        self.inner.tombstone
    }

    fn headers(ruby: &Ruby, rb_self: &Self) -> Result<Value, Error> {
        if let Some(cached) = rb_self.headers.get() {
            return Ok(ruby.get_inner(*cached));
        }
        let hash = ruby.hash_new();
        for (k, v) in &rb_self.inner.headers {
            hash.aset(ruby.str_new(k), bytes_to_ruby(ruby, v))?;
        }
        let value = hash.as_value();
        let _ = rb_self.headers.set(Opaque::from(value));
        Ok(value)
    }

    fn inspect(&self) -> String {
        format!(
            "#<Prosody::Message topic={:?} partition={} offset={} key={}>",
            self.inner.topic,
            self.inner.partition,
            self.inner.offset,
            prosody_core::event::show_key(self.inner.key.as_deref())
        )
    }
}

pub fn init(ruby: &Ruby, prosody: RModule) -> Result<(), Error> {
    let class = prosody.define_class("Message", ruby.class_object())?;
    class.undef_default_alloc_func();
    class.define_method("topic", method!(Message::topic, 0))?;
    class.define_method("partition", method!(Message::partition, 0))?;
    class.define_method("offset", method!(Message::offset, 0))?;
    class.define_method("key", method!(Message::key, 0))?;
    class.define_method("timestamp", method!(Message::timestamp, 0))?;
    class.define_method("payload", method!(Message::payload, 0))?;
    class.define_method("headers", method!(Message::headers, 0))?;
    class.define_method("tombstone?", method!(Message::tombstone, 0))?;
    class.define_method("inspect", method!(Message::inspect, 0))?;
    Ok(())
}
