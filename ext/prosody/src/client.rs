//! `Prosody::Native::Client`: the engine's client. `lib/prosody/client.rb` wraps it with the
//! public `Prosody::Client` API (argument checks, JSON encoding, the Ruby processor).

use std::mem::ManuallyDrop;
use std::sync::Arc;

use magnus::{
    function, method, prelude::*, value::Lazy, ArgList, Error, IntoValue, RArray, RHash, RModule,
    RString, Ruby, Symbol, Value,
};
use prosody_core::client::{Client as CoreClient, ConsumerState};
use prosody_core::config::Config;
use prosody_core::kafka::producer::{Done, Record, SendError};

use crate::bridge::Bridge;
use crate::operation::{self, OpResult, OpValue};
use crate::ruby::encode;
use crate::ruby::{convert, errors, gvl::without_gvl};

#[magnus::wrap(class = "Prosody::Native::Client", free_immediately, size)]
pub struct Client {
    /// The engine's client. Taken out only by `Drop`.
    inner: ManuallyDrop<Arc<CoreClient>>,
    /// The process that created it.
    pid: u32,
}

impl Drop for Client {
    /// In a process forked after this client was created, the engine threads it would stop on
    /// drop do not exist (joining them aborts the process): it is left as it is instead.
    fn drop(&mut self) {
        if prosody_core::process::is_current(self.pid) {
            // SAFETY: `inner` is not used again; this is the only place that takes it.
            unsafe { ManuallyDrop::drop(&mut self.inner) };
        }
    }
}

impl Client {
    /// Resolves options (a Hash with String keys) against env vars and defaults.
    fn new(ruby: &Ruby, options: RHash) -> Result<Self, Error> {
        let mut explicit = Vec::with_capacity(options.len());
        options.foreach(|k: Value, v: Value| {
            let key = convert::string_like(ruby, "option name", k)?;
            // An unknown option is reported by name (listing the valid ones), whatever its value.
            let value = if prosody_core::config::OPTIONS.iter().any(|o| o.name == key) {
                convert::raw_value(ruby, &key, v)?
            } else {
                prosody_core::config::RawValue::Nil
            };
            explicit.push((key, value));
            Ok(magnus::r_hash::ForEach::Continue)
        })?;
        let config = Config::resolve(explicit).map_err(|e| errors::config(ruby, e))?;
        crate::logging::ensure_installed();
        let client = without_gvl(ruby, move |_| CoreClient::new(config))?
            .map_err(|e| errors::kafka(ruby, e))?;
        Ok(Self {
            inner: ManuallyDrop::new(Arc::new(client)),
            pid: std::process::id(),
        })
    }

    /// Sends one record (`tombstone`: with no value; `payload` is then `Outgoing::TOMBSTONE`)
    /// for the waiter `target` names (see [`operation::start`]): the result is nil, or
    /// `Prosody::SendError`. Plain parts are read here (`ruby::encode`); otherwise
    /// `Prosody::Outgoing.row` checks and encodes them, or raises the `ArgumentError` that names
    /// what is wrong.
    #[allow(clippy::too_many_arguments)]
    fn send_record(
        ruby: &Ruby,
        rb_self: &Self,
        target: Value,
        topic: Value,
        key: Value,
        payload: Value,
        headers: Value,
        partition: Value,
        tombstone: bool,
        trace: Value,
    ) -> Result<Value, Error> {
        let mut one = encode::Batch::with_capacity(1);
        if !one.push_plain_parts(
            ruby,
            topic,
            key,
            (!tombstone).then_some(payload),
            headers,
            partition,
        ) {
            one.push(checked(
                ruby,
                "row",
                (topic, key, payload, headers, partition),
            )?);
        }
        if let Some(cx) = carried_trace(trace) {
            one.carry(&cx);
        }
        let client = Arc::clone(&rb_self.inner);
        if let Ok(bridge) = <&Bridge>::try_convert(target) {
            // A handler's send: queued here and reported from librdkafka's thread straight to
            // the bridge, with no engine task, when the producer can take it at once.
            let inner = bridge.inner();
            let id = inner.next_op();
            let done: Done = Box::new(move |result| inner.op_finished(id, sent(result)));
            if one
                .get(0)
                .is_some_and(|record| client.send_now(record, done).is_none())
            {
                return Ok(id.into_value_with(ruby));
            }
        }
        operation::start(ruby, target, async move {
            match one.get(0) {
                Some(record) => sent(client.send_raw(record).await),
                None => OpResult::Err(errors::Class::Send, "nothing to send".into()),
            }
        })
    }

    /// Sends every record at once and waits once, for the waiter `target` names. `records` are
    /// the application's Hashes: plain ones are read here (`ruby::encode`), others by
    /// `Prosody::Outgoing.indexed_row`, which raises `ArgumentError` naming a bad record's index
    /// (nothing is sent then). The result is nil when every record was acknowledged, else
    /// `[[index, topic, key, reason], ...]` for those that were not.
    fn send_records(
        ruby: &Ruby,
        rb_self: &Self,
        target: Value,
        records: RArray,
        trace: Value,
    ) -> Result<Value, Error> {
        let mut batch = encode::Batch::with_capacity(records.len());
        for (index, value) in records.into_iter().enumerate() {
            if !batch.push_plain(ruby, value) {
                batch.push(checked(ruby, "indexed_row", (value, index))?);
            }
        }
        if let Some(cx) = carried_trace(trace) {
            batch.carry(&cx);
        }
        let client = Arc::clone(&rb_self.inner);
        operation::start(ruby, target, async move {
            let records = batch.raw();
            let results = client.send_batch(&records).await;
            let failures = records
                .into_iter()
                .zip(results)
                .enumerate()
                .filter_map(|(index, (record, result))| {
                    result.err().map(|e| {
                        let key = record.key.unwrap_or_default().to_vec();
                        (index, record.topic.to_owned(), key, e.reason)
                    })
                })
                .collect();
            OpResult::Ok(OpValue::Failures(failures))
        })
    }

    /// Starts consuming; the processor pulls jobs through `bridge`.
    fn subscribe(ruby: &Ruby, rb_self: &Self, bridge: &Bridge) -> Result<(), Error> {
        let client = Arc::clone(&rb_self.inner);
        let notify = bridge.notifier();
        let scheduler = without_gvl(ruby, move |_| client.subscribe(notify))?
            .map_err(|e| errors::kafka(ruby, e))?;
        bridge.attach(scheduler);
        Ok(())
    }

    /// Drains, commits and stops consuming. Blocks up to about `shutdown_timeout` with the GVL
    /// released (handlers keep running on the processor thread meanwhile); not interruptible, so
    /// that the final commit is not lost.
    fn unsubscribe(ruby: &Ruby, rb_self: &Self) -> Result<(), Error> {
        let client = Arc::clone(&rb_self.inner);
        without_gvl(ruby, move |_| client.unsubscribe())?.map_err(|e| errors::kafka(ruby, e))
    }

    /// Test support: makes the poll thread panic, as a bug would.
    fn inject_fault(&self) -> bool {
        self.inner.inject_fault()
    }

    fn consumer_state(ruby: &Ruby, rb_self: &Self) -> Symbol {
        ruby.to_symbol(match rb_self.inner.consumer_state() {
            ConsumerState::Unconfigured => "unconfigured",
            ConsumerState::Configured => "configured",
            ConsumerState::Running => "running",
        })
    }

    fn source_system(&self) -> String {
        self.inner.config().effective_source_system().to_owned()
    }

    fn group_id(&self) -> Option<String> {
        self.inner.config().group_id.clone()
    }

    fn is_stalled(&self) -> bool {
        self.inner.is_stalled()
    }

    fn assigned_partitions(&self) -> usize {
        self.inner.assigned_partitions()
    }

    /// Testing kit: the topics this client subscribes.
    fn subscribed_topics(&self) -> Vec<String> {
        self.inner.config().subscribed_topics.clone()
    }

    /// Testing kit: moves the timer clock `seconds` forward; returns the move's number.
    fn advance_timers(&self, seconds: i64) -> u64 {
        self.inner.advance_timers(seconds)
    }

    /// Testing kit: whether every assigned partition acted on clock move `number` and has
    /// nothing in flight.
    fn timers_caught_up(&self, number: u64) -> bool {
        self.inner.timers_caught_up(number)
    }

    /// Testing kit: whether every `[topic, partition, high_watermark]` of `high` is assigned
    /// and finished below its watermark, with nothing in flight.
    fn settled(&self, high: Vec<(String, i32, i64)>) -> bool {
        self.inner.settled(&high)
    }

    /// `{source_system:, filtered:, duplicate:}`: events finished without a handler call.
    fn skipped_events(ruby: &Ruby, rb_self: &Self) -> Result<RHash, Error> {
        use std::sync::atomic::Ordering::Relaxed;
        let skipped = rb_self.inner.skipped();
        let hash = ruby.hash_new();
        hash.aset(ruby.to_symbol("source_system"), skipped.own.load(Relaxed))?;
        hash.aset(ruby.to_symbol("filtered"), skipped.filtered.load(Relaxed))?;
        hash.aset(
            ruby.to_symbol("duplicate"),
            skipped.duplicates.load(Relaxed),
        )?;
        Ok(hash)
    }

    /// `{emitted:, dropped:}` of the telemetry emitter, or nil when it does not run.
    fn telemetry_stats(ruby: &Ruby, rb_self: &Self) -> Result<Option<RHash>, Error> {
        use std::sync::atomic::Ordering::Relaxed;
        let Some(counts) = rb_self.inner.telemetry() else {
            return Ok(None);
        };
        let hash = ruby.hash_new();
        hash.aset(ruby.to_symbol("emitted"), counts.emitted.load(Relaxed))?;
        hash.aset(ruby.to_symbol("dropped"), counts.dropped.load(Relaxed))?;
        Ok(Some(hash))
    }

    fn max_concurrency(&self) -> u64 {
        self.inner.config().max_concurrency.get()
    }

    fn timers_available(&self) -> bool {
        self.inner.timers_available()
    }
}

/// A send's outcome as the waiting fiber receives it: nil, or `Prosody::SendError`.
/// The trace context records sent now carry, from what `Prosody::Tracing.current` gave: the
/// running handler's `Prosody::Context`, a W3C carrier Hash (from the application's Ruby
/// tracer), or nil.
fn carried_trace(value: Value) -> Option<opentelemetry::Context> {
    if value.is_nil() {
        return None;
    }
    if let Ok(context) = <&crate::context::Context>::try_convert(value) {
        return Some(context.trace().clone());
    }
    let hash = RHash::from_value(value)?;
    let mut pairs = Vec::with_capacity(hash.len());
    hash.foreach(|k: Value, v: Value| {
        if let (Some(k), Some(v)) = (RString::from_value(k), RString::from_value(v)) {
            if let (Ok(k), Ok(v)) = (k.to_string(), v.to_string()) {
                pairs.push((k, v));
            }
        }
        Ok(magnus::r_hash::ForEach::Continue)
    })
    .ok()?;
    Some(prosody_core::spans::extract_pairs(&pairs))
}

/// `Prosody::Native.flush_spans`: exports every finished span and stops span export (called at
/// exit; a no-op when spans are not exported).
fn flush_spans(ruby: &Ruby) -> Result<(), Error> {
    without_gvl(ruby, |_| prosody_core::spans::shut_down())
}

fn sent<T>(result: Result<T, SendError>) -> OpResult {
    match result {
        Ok(_) => OpResult::Ok(OpValue::Nil),
        Err(e) => OpResult::Err(errors::Class::Send, e.to_string()),
    }
}

/// `Prosody::Outgoing`, which checks and encodes the records `ruby::encode` leaves to it.
static OUTGOING: Lazy<RModule> = Lazy::new(|ruby| {
    // `lib/prosody/outgoing.rb` defines it before any client exists; this finds it.
    ruby.define_module("Prosody")
        .and_then(|prosody| prosody.define_module("Outgoing"))
        .unwrap_or_else(|_| ruby.module_kernel())
});

/// A record as `Prosody::Outgoing.row` and `indexed_row` return it.
type Row = (
    RString,
    RString,
    Option<RString>,
    Option<RHash>,
    Option<i32>,
);

/// The record `Prosody::Outgoing.<method>(*args)` checks and encodes (it raises the
/// `ArgumentError` that names a bad value).
fn checked(ruby: &Ruby, method: &str, args: impl ArgList) -> Result<Record, Error> {
    let (topic, key, payload, headers, partition): Row =
        ruby.get_inner(&OUTGOING).funcall(method, args)?;
    record(ruby, topic, key, payload, headers, partition)
}

/// A record from its Ruby parts (already checked by `lib/prosody/client.rb`; this checks again
/// what the engine relies on).
fn record(
    ruby: &Ruby,
    topic: RString,
    key: RString,
    payload: Option<RString>,
    headers: Option<RHash>,
    partition: Option<i32>,
) -> Result<Record, Error> {
    if partition.is_some_and(|p| p < 0) {
        return Err(Error::new(
            ruby.exception_arg_error(),
            format!(
                "partition must be 0 or more, got {}",
                partition.unwrap_or_default()
            ),
        ));
    }
    Ok(Record {
        topic: convert::utf8(ruby, "topic", topic)?,
        key: convert::bytes(key),
        payload: payload.map(convert::bytes),
        headers: convert::headers(ruby, headers)?,
        partition,
    })
}

pub fn init(ruby: &Ruby, native: RModule) -> Result<(), Error> {
    native.define_module_function("flush_spans", function!(flush_spans, 0))?;
    let class = native.define_class("Client", ruby.class_object())?;
    class.define_singleton_method("new", function!(Client::new, 1))?;
    class.define_method("send_record", method!(Client::send_record, 8))?;
    class.define_method("send_records", method!(Client::send_records, 3))?;
    class.define_method("subscribe", method!(Client::subscribe, 1))?;
    class.define_method("unsubscribe", method!(Client::unsubscribe, 0))?;
    class.define_method("consumer_state", method!(Client::consumer_state, 0))?;
    class.define_method("source_system", method!(Client::source_system, 0))?;
    class.define_method("group_id", method!(Client::group_id, 0))?;
    class.define_method(
        "assigned_partitions",
        method!(Client::assigned_partitions, 0),
    )?;
    class.define_method("max_concurrency", method!(Client::max_concurrency, 0))?;
    class.define_method("skipped_events", method!(Client::skipped_events, 0))?;
    class.define_method("telemetry_stats", method!(Client::telemetry_stats, 0))?;
    class.define_method("stalled?", method!(Client::is_stalled, 0))?;
    class.define_method("timers_available?", method!(Client::timers_available, 0))?;
    class.define_method("inject_fault", method!(Client::inject_fault, 0))?;
    class.define_method("advance_timers", method!(Client::advance_timers, 1))?;
    class.define_method("timers_caught_up?", method!(Client::timers_caught_up, 1))?;
    class.define_method("settled?", method!(Client::settled, 1))?;
    class.define_method("subscribed_topics", method!(Client::subscribed_topics, 0))?;
    Ok(())
}
