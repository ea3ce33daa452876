//! `Prosody::Native::RawProducer` and mock helpers, for the gem's specs and benchmarks.

use std::time::Duration;

use magnus::{function, method, prelude::*, Error, RArray, RHash, RModule, RString, Ruby};
use prosody_core::kafka::mock;
use prosody_core::testing::{create_topic as core_create_topic, RawProducer as CoreRawProducer};

use crate::ruby::{convert, errors, gvl::without_gvl};

#[magnus::wrap(class = "Prosody::Native::RawProducer", free_immediately, size)]
struct RawProducer(CoreRawProducer);

impl RawProducer {
    fn new(ruby: &Ruby, bootstrap: String) -> Result<Self, Error> {
        CoreRawProducer::new(&bootstrap)
            .map(Self)
            .map_err(|e| errors::kafka(ruby, e))
    }

    /// `RawProducer.unbatched(bootstrap)`: sends each record at once (`linger.ms` 0), for
    /// latency measurements.
    fn unbatched(ruby: &Ruby, bootstrap: String) -> Result<Self, Error> {
        CoreRawProducer::with_linger(&bootstrap, 0)
            .map(Self)
            .map_err(|e| errors::kafka(ruby, e))
    }

    /// `produce(topic, partition_or_nil, key_or_nil, payload_bytes_or_nil, headers_hash)`.
    fn produce(
        ruby: &Ruby,
        rb_self: &Self,
        topic: String,
        partition: Option<i32>,
        key: Option<RString>,
        payload: Option<RString>,
        headers: Option<RHash>,
    ) -> Result<(), Error> {
        let headers = convert::headers(ruby, headers)?;
        // SAFETY: the slices are used before any other Ruby code runs (no GVL release here).
        let key = key.map(|k| unsafe { k.as_slice() }.to_vec());
        let payload = payload.map(|p| unsafe { p.as_slice() }.to_vec());
        rb_self
            .0
            .produce(
                &topic,
                partition,
                key.as_deref(),
                payload.as_deref(),
                &headers,
            )
            .map_err(|e| errors::prosody(ruby, errors::Class::Send, e))
    }

    fn flush(ruby: &Ruby, rb_self: &Self, seconds: f64) -> Result<(), Error> {
        let producer = &rb_self.0;
        let timeout = Duration::try_from_secs_f64(seconds).unwrap_or(Duration::from_secs(30));
        without_gvl(ruby, |_| producer.flush(timeout))?
            .map_err(|e| errors::prosody(ruby, errors::Class::Send, e))
    }
}

/// Bootstrap servers of the process's mock cluster (started if needed).
fn mock_bootstrap_servers(ruby: &Ruby) -> Result<String, Error> {
    mock::shared()
        .map(|m| m.bootstrap_servers().to_owned())
        .map_err(|e| errors::kafka(ruby, e))
}

/// Creates a mock topic with `partitions` partitions (no-op if it exists).
fn mock_create_topic(ruby: &Ruby, topic: String, partitions: u64) -> Result<(), Error> {
    mock::shared()
        .and_then(|m| m.ensure_topic(&topic, partitions))
        .map_err(|e| errors::kafka(ruby, e))
}

/// Creates a topic on a real cluster and waits for its leaders (GVL released).
fn create_topic(
    ruby: &Ruby,
    bootstrap: String,
    topic: String,
    partitions: i32,
) -> Result<(), Error> {
    without_gvl(ruby, |_| {
        core_create_topic(&bootstrap, &topic, partitions, Duration::from_secs(30))
    })?
    .map_err(|e| errors::prosody(ruby, errors::Class::Client, e))
}

/// Reads up to `count` records of a mock topic from the beginning (waiting at most `seconds`):
/// an Array of Hashes with "partition", "offset", "key", "payload" (binary Strings or nil) and
/// "headers" (an Array of [name, value] pairs, in order).
fn mock_read_topic(
    ruby: &Ruby,
    topic: String,
    count: usize,
    seconds: f64,
) -> Result<RArray, Error> {
    let bootstrap = mock_bootstrap_servers(ruby)?;
    read_topic(ruby, bootstrap, topic, count, seconds)
}

/// [`mock_read_topic`] on the cluster at `bootstrap`.
fn read_topic(
    ruby: &Ruby,
    bootstrap: String,
    topic: String,
    count: usize,
    seconds: f64,
) -> Result<RArray, Error> {
    let timeout = Duration::try_from_secs_f64(seconds).unwrap_or(Duration::from_secs(10));
    let records = without_gvl(ruby, |_| {
        prosody_core::testing::read_topic(&bootstrap, &topic, count, timeout)
    })?
    .map_err(|e| errors::prosody(ruby, errors::Class::Client, e))?;
    records_to_ruby(ruby, records)
}

/// Records as an Array of Hashes (see [`mock_read_topic`]).
fn records_to_ruby(
    ruby: &Ruby,
    records: Vec<prosody_core::testing::RawRecord>,
) -> Result<RArray, Error> {
    let out = ruby.ary_new_capa(records.len());
    for r in records {
        let hash = ruby.hash_new();
        hash.aset("partition", r.partition)?;
        hash.aset("offset", r.offset)?;
        hash.aset("key", r.key.map(|k| ruby.str_from_slice(&k)))?;
        hash.aset("payload", r.payload.map(|p| ruby.str_from_slice(&p)))?;
        let headers = ruby.ary_new_capa(r.headers.len());
        for (k, v) in r.headers {
            headers.push(ruby.ary_new_from_values(&[
                ruby.str_new(&k).as_value(),
                ruby.str_from_slice(&v).as_value(),
            ]))?;
        }
        hash.aset("headers", headers)?;
        out.push(hash)?;
    }
    Ok(out)
}

/// The high watermark of each partition of a mock topic: a Hash of partition => offset (empty
/// when the topic does not exist).
fn mock_high_watermarks(ruby: &Ruby, topic: String) -> Result<RHash, Error> {
    let bootstrap = mock_bootstrap_servers(ruby)?;
    let high = without_gvl(ruby, |_| {
        prosody_core::testing::high_watermarks(&bootstrap, &topic, Duration::from_secs(10))
    })?
    .map_err(|e| errors::prosody(ruby, errors::Class::Client, e))?;
    let out = ruby.hash_new();
    for (partition, offset) in high {
        out.aset(partition, offset)?;
    }
    Ok(out)
}

/// Every record of a mock topic so far, as [`mock_read_topic`] gives them, partition by
/// partition in offset order.
fn mock_read_all(ruby: &Ruby, topic: String) -> Result<RArray, Error> {
    let bootstrap = mock_bootstrap_servers(ruby)?;
    let records = without_gvl(ruby, |_| {
        prosody_core::testing::read_all(&bootstrap, &topic, Duration::from_secs(10))
    })?
    .map_err(|e| errors::prosody(ruby, errors::Class::Client, e))?;
    records_to_ruby(ruby, records)
}

/// A `Prosody::Message` from parts, decoded as a consumed record is: `payload` is the JSON
/// bytes (nil for a tombstone), `headers` a Hash of names to binary Strings.
#[allow(clippy::too_many_arguments)]
fn build_message(
    ruby: &Ruby,
    topic: String,
    partition: i32,
    offset: i64,
    key: Option<RString>,
    payload: Option<RString>,
    headers: Option<RHash>,
    timestamp_ms: Option<i64>,
) -> Result<crate::message::Message, Error> {
    let headers = convert::headers(ruby, headers)?;
    // SAFETY: the slices are copied before any other Ruby code runs.
    let key = key.map(|k| unsafe { k.as_slice() }.to_vec());
    let payload = payload.map(|p| unsafe { p.as_slice() }.to_vec());
    let message = prosody_core::testing::message(
        &topic,
        partition,
        offset,
        key,
        payload,
        &headers,
        timestamp_ms,
    )
    .map_err(|e| errors::prosody(ruby, errors::Class::Argument, e))?;
    Ok(crate::message::Message::new(std::sync::Arc::new(message)))
}

/// Gives the clients created from now on a new, empty mock cluster (see `mock::reset`).
fn mock_reset() {
    mock::reset();
}

/// Makes sends to a mock topic fail (`true`) or work again (`false`).
fn mock_fail_topic(ruby: &Ruby, topic: String, fail: bool) -> Result<(), Error> {
    mock::shared()
        .and_then(|m| m.fail_topic(&topic, fail))
        .map_err(|e| errors::kafka(ruby, e))
}

pub fn init(ruby: &Ruby, native: RModule) -> Result<(), Error> {
    let class = native.define_class("RawProducer", ruby.class_object())?;
    class.define_singleton_method("new", function!(RawProducer::new, 1))?;
    class.define_singleton_method("unbatched", function!(RawProducer::unbatched, 1))?;
    class.define_method("produce", method!(RawProducer::produce, 5))?;
    class.define_method("flush", method!(RawProducer::flush, 1))?;
    native.define_module_function(
        "mock_bootstrap_servers",
        function!(mock_bootstrap_servers, 0),
    )?;
    native.define_module_function("mock_create_topic", function!(mock_create_topic, 2))?;
    native.define_module_function("create_topic", function!(create_topic, 3))?;
    native.define_module_function("mock_read_topic", function!(mock_read_topic, 3))?;
    native.define_module_function("read_topic", function!(read_topic, 4))?;
    native.define_module_function("mock_fail_topic", function!(mock_fail_topic, 2))?;
    native.define_module_function("mock_high_watermarks", function!(mock_high_watermarks, 1))?;
    native.define_module_function("mock_read_all", function!(mock_read_all, 1))?;
    native.define_module_function("mock_reset", function!(mock_reset, 0))?;
    native.define_module_function("build_message", function!(build_message, 7))?;
    Ok(())
}
