//! OpenTelemetry spans and W3C trace context.
//!
//! Spans are exported over OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` (or the traces-specific
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set: one tracer provider per process, set up from the
//! standard `OTEL_*` variables the first time a client is created, batching spans on the SDK's
//! own thread. It is this module's own provider, never the process-global one, so an
//! application's Rust tracing setup (if any) is left alone.
//!
//! Trace context travels in record headers (`traceparent`, `tracestate`, `baggage`) whether or
//! not spans are exported: without an endpoint no span is created, but a consumed record's
//! context is still handed to its handler and to what the handler sends, so the traces of the
//! services around this one stay whole.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use opentelemetry::propagation::{
    Extractor, Injector, TextMapCompositePropagator, TextMapPropagator,
};
use opentelemetry::trace::{
    Link, SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::propagation::{BaggagePropagator, TraceContextPropagator};
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};

use crate::config::SpanLinking;
use crate::handler::Failure;
use crate::process::PerProcess;

/// Header names the W3C propagators read and write.
pub const TRACE_HEADERS: [&str; 3] = ["traceparent", "tracestate", "baggage"];

/// The instrumentation scope spans are reported under.
const SCOPE: &str = "prosody";

/// The process's exporting tracer provider, when an endpoint is configured.
struct Export {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    /// Set once the provider was shut down (at exit): a later flush has nothing to do.
    shut_down: AtomicBool,
}

/// Set up on first use in each process (a forked child sets up its own: the SDK's export thread
/// does not survive a fork).
static EXPORT: PerProcess<Option<Export>> = PerProcess::new();

/// The OTLP transport `OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Grpc,
    HttpProtobuf,
    HttpJson,
}

/// The first non-empty value among `names`, with the name it came from.
fn env_first(names: &[&'static str]) -> Option<(&'static str, String)> {
    names.iter().find_map(|name| {
        std::env::var(name)
            .ok()
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
            .map(|v| (*name, v))
    })
}

/// The transport to export with: `http/protobuf` unless a protocol variable names another.
fn transport() -> Result<Transport, String> {
    let Some((name, value)) = env_first(&[
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ]) else {
        return Ok(Transport::HttpProtobuf);
    };
    match value.to_ascii_lowercase().as_str() {
        "grpc" => Ok(Transport::Grpc),
        "http/protobuf" => Ok(Transport::HttpProtobuf),
        "http/json" => Ok(Transport::HttpJson),
        _ => Err(format!(
            "{name} is {value:?}; expected one of \"http/protobuf\", \"http/json\", \"grpc\""
        )),
    }
}

/// Spans are exported when an endpoint is set and `OTEL_SDK_DISABLED` is not `true`.
fn set_up() -> Result<Option<Export>, String> {
    let disabled =
        std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.trim().eq_ignore_ascii_case("true"));
    let endpoint = env_first(&[
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ]);
    let Some((name, endpoint)) = endpoint.filter(|_| !disabled) else {
        return Ok(None);
    };
    let transport = transport()?;
    if endpoint.to_ascii_lowercase().starts_with("https:") {
        return Err(format!(
            "{name} is {endpoint:?}: spans are exported over plain http:// only (no TLS in this \
             build); export to a collector reachable over http://"
        ));
    }
    let builder = opentelemetry_otlp::SpanExporter::builder();
    let exporter = match transport {
        Transport::Grpc => {
            // tonic's channel belongs to the runtime it is created in; the SDK's export thread
            // then drives each export to completion on it.
            let runtime = crate::runtime::handle()?;
            let _entered = runtime.enter();
            builder.with_tonic().build()
        }
        Transport::HttpProtobuf | Transport::HttpJson => {
            use opentelemetry_otlp::WithExportConfig as _;
            let protocol = if transport == Transport::HttpJson {
                opentelemetry_otlp::Protocol::HttpJson
            } else {
                opentelemetry_otlp::Protocol::HttpBinary
            };
            // The default client: reqwest, blocking, on the SDK's export thread.
            builder.with_http().with_protocol(protocol).build()
        }
    }
    .map_err(|e| format!("could not set up the OTLP span exporter: {e}"))?;
    // The provider's defaults read OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES,
    // OTEL_TRACES_SAMPLER(_ARG) and OTEL_BSP_*.
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .build();
    let tracer = provider.tracer(SCOPE);
    tracing::info!("exporting spans over OTLP ({transport:?})");
    Ok(Some(Export {
        provider,
        tracer,
        shut_down: AtomicBool::new(false),
    }))
}

/// The process's exporting tracer, set up from the environment on first use; `None` when no
/// endpoint is configured. Fails on a protocol variable with an unknown value.
pub fn tracer() -> Result<Option<SdkTracer>, String> {
    EXPORT
        .get_or_try_init(set_up)
        .map(|export| export.as_ref().map(|e| e.tracer.clone()))
}

/// Exports every finished span now (blocking until the exporter answered or timed out).
pub fn flush() {
    if let Some(Some(export)) = EXPORT.get() {
        if export.shut_down.load(Ordering::Acquire) {
            return;
        }
        if let Err(e) = export.provider.force_flush() {
            tracing::warn!("could not export spans: {e}");
        }
    }
}

/// Exports every finished span and stops the export thread (at process exit).
pub fn shut_down() {
    if let Some(Some(export)) = EXPORT.get() {
        if export.shut_down.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Err(e) = export.provider.shutdown() {
            tracing::debug!("span export shut down: {e}");
        }
    }
}

fn propagator() -> &'static TextMapCompositePropagator {
    static PROPAGATOR: OnceLock<TextMapCompositePropagator> = OnceLock::new();
    PROPAGATOR.get_or_init(|| {
        TextMapCompositePropagator::new(vec![
            Box::new(TraceContextPropagator::new()),
            Box::new(BaggagePropagator::new()),
        ])
    })
}

/// Name-value pairs (record headers, or a Ruby carrier) read as a W3C carrier: names match
/// whatever their case; values that are not UTF-8 are ignored.
struct Reader<'a, V>(&'a [(String, V)]);

impl<V: AsRef<[u8]>> Extractor for Reader<'_, V> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(key))
            .and_then(|(_, value)| std::str::from_utf8(value.as_ref()).ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(name, _)| name.as_str()).collect()
    }
}

/// Record headers written as a W3C carrier: a header already there is replaced.
struct HeaderWriter<'a>(&'a mut Vec<(String, Vec<u8>)>);

impl Injector for HeaderWriter<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.retain(|(name, _)| !name.eq_ignore_ascii_case(key));
        self.0.push((key.to_owned(), value.into_bytes()));
    }
}

/// Whether `headers` carry trace context.
pub fn has_context(headers: &[(String, Vec<u8>)]) -> bool {
    headers.iter().any(|(name, _)| {
        TRACE_HEADERS
            .iter()
            .any(|trace| name.eq_ignore_ascii_case(trace))
    })
}

/// The trace context carried by `headers`; an empty context when they carry none (the common
/// case costs one scan of the header names).
pub fn extract(headers: &[(String, Vec<u8>)]) -> Context {
    if !has_context(headers) {
        return Context::new();
    }
    propagator().extract(&Reader(headers))
}

/// The trace context carried by a carrier of text pairs (what a Ruby tracer injects).
pub fn extract_pairs(pairs: &[(String, String)]) -> Context {
    propagator().extract(&Reader(pairs))
}

/// Writes `cx` into `headers` (replacing trace headers already there). Nothing is written for a
/// context without a valid span.
pub fn inject(cx: &Context, headers: &mut Vec<(String, Vec<u8>)>) {
    if cx.span().span_context().is_valid() {
        propagator().inject_context(cx, &mut HeaderWriter(headers));
    }
}

/// `cx` as a W3C carrier of text pairs (`traceparent`, and `tracestate` / `baggage` when they
/// have entries); empty without a valid span.
pub fn carrier(cx: &Context) -> Vec<(String, String)> {
    struct Pairs(Vec<(String, String)>);
    impl Injector for Pairs {
        fn set(&mut self, key: &str, value: String) {
            if !value.is_empty() {
                self.0.push((key.to_owned(), value));
            }
        }
    }
    let mut pairs = Pairs(Vec::new());
    if cx.span().span_context().is_valid() {
        propagator().inject_context(cx, &mut pairs);
    }
    pairs.0
}

/// The trace id of `cx`'s span, when it has a valid one.
pub fn trace_id(cx: &Context) -> Option<opentelemetry::trace::TraceId> {
    let span = cx.span();
    let context = span.span_context();
    context.is_valid().then(|| context.trace_id())
}

/// A key as a span attribute: the text when it is UTF-8, else its escaped bytes.
fn key_text(key: &[u8]) -> String {
    match std::str::from_utf8(key) {
        Ok(text) => text.to_owned(),
        Err(_) => key.escape_ascii().to_string(),
    }
}

/// A partition number as the `messaging.destination.partition.id` attribute (a string, by the
/// conventions): the first 256 are made once, not per span.
fn partition_id(partition: i32) -> opentelemetry::Value {
    static IDS: OnceLock<Vec<Arc<str>>> = OnceLock::new();
    let ids = IDS.get_or_init(|| (0..256).map(|p: i32| Arc::from(p.to_string())).collect());
    match usize::try_from(partition).ok().and_then(|p| ids.get(p)) {
        Some(id) => Arc::clone(id).into(),
        None => partition.to_string().into(),
    }
}

/// How a span relates to the context that caused it, for a span `linking` says to start.
fn related(linking: SpanLinking, cause: &Context) -> (Context, Vec<Link>) {
    let cause_span = cause.span();
    let cause_context = cause_span.span_context();
    match linking {
        _ if !cause_context.is_valid() => (Context::new(), Vec::new()),
        SpanLinking::Child => (cause.clone(), Vec::new()),
        SpanLinking::FollowsFrom => (
            Context::new(),
            vec![Link::with_context(cause_context.clone())],
        ),
    }
}

/// Where a consumed message came from, for its spans' attributes.
#[derive(Debug, Clone, Copy)]
pub struct Origin<'a> {
    /// Topic it was read from (shared, so an attribute costs no copy).
    pub topic: &'a Arc<str>,
    /// Partition it was read from.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// Its key, if any.
    pub key: Option<&'a [u8]>,
}

/// What one client records: the process's tracer (if spans are exported) and how its spans
/// relate to their causes.
#[derive(Clone)]
pub struct Spans {
    /// `None` when spans are not exported: contexts are then only passed along.
    tracer: Option<SdkTracer>,
    /// How a message's spans relate to the producer's span (`message_spans`).
    messages: SpanLinking,
    /// How a timer's spans relate to the span that scheduled it (`timer_spans`).
    timers: SpanLinking,
    /// The consumer group, for attributes.
    group: Option<Arc<str>>,
}

impl std::fmt::Debug for Spans {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spans")
            .field("exported", &self.tracer.is_some())
            .field("messages", &self.messages)
            .field("timers", &self.timers)
            .finish()
    }
}

impl Spans {
    /// A client's spans: exported through the process's tracer when an endpoint is configured.
    pub fn new(
        messages: SpanLinking,
        timers: SpanLinking,
        group: Option<String>,
    ) -> Result<Self, String> {
        Ok(Self {
            tracer: tracer()?,
            messages,
            timers,
            group: group.map(Arc::from),
        })
    }

    /// Whether spans are recorded (and exported).
    pub fn exported(&self) -> bool {
        self.tracer.is_some()
    }

    fn consumer_attributes(&self, origin: Origin<'_>) -> Vec<KeyValue> {
        // Room for the operation attributes added after, and the two set when it ends.
        let mut attributes = Vec::with_capacity(12);
        attributes.extend([
            KeyValue::new("messaging.system", "kafka"),
            KeyValue::new("messaging.destination.name", Arc::clone(origin.topic)),
            KeyValue::new(
                "messaging.destination.partition.id",
                partition_id(origin.partition),
            ),
            KeyValue::new("messaging.kafka.offset", origin.offset),
        ]);
        if let Some(key) = origin.key {
            attributes.push(KeyValue::new("messaging.kafka.message.key", key_text(key)));
        }
        if let Some(group) = &self.group {
            attributes.push(KeyValue::new(
                "messaging.consumer.group.name",
                Arc::clone(group),
            ));
        }
        attributes
    }

    /// The `process` span of a consumed message: it starts when the record is read and ends
    /// when the message is finished (handled, skipped, dead-lettered or deferred); its handler
    /// calls run in it (attempts, failures and retries are its attributes and events). With
    /// `message_spans: child` its parent is the producer's span (from the record's headers);
    /// with `follows_from` it starts a trace linked to it. Without export, the record's own
    /// context is passed along unchanged.
    pub fn receive(&self, origin: Origin<'_>, headers: &[(String, Vec<u8>)]) -> Context {
        let cause = extract(headers);
        let Some(tracer) = &self.tracer else {
            return cause;
        };
        let (parent, links) = related(self.messages, &cause);
        let mut attributes = self.consumer_attributes(origin);
        attributes.push(KeyValue::new("messaging.operation.name", "process"));
        attributes.push(KeyValue::new("messaging.operation.type", "process"));
        let span = tracer
            .span_builder(format!("process {}", origin.topic))
            .with_kind(SpanKind::Consumer)
            .with_attributes(attributes)
            .with_links(links)
            .start_with_context(tracer, &parent);
        parent.with_span(span)
    }

    /// The `fire` span of a timer: with `timer_spans: follows_from` a new trace linked to the
    /// span that scheduled it (`scheduled_by`, the stored carrier); with `child`, its child.
    pub fn fire(
        &self,
        topic: &Arc<str>,
        partition: i32,
        key: &[u8],
        time: i64,
        scheduled_by: Option<&str>,
    ) -> Context {
        let cause = scheduled_by.map_or_else(Context::new, decode_stored);
        let Some(tracer) = &self.tracer else {
            return cause;
        };
        let (parent, links) = related(self.timers, &cause);
        let mut attributes = vec![
            KeyValue::new("messaging.system", "kafka"),
            KeyValue::new("messaging.destination.name", Arc::clone(topic)),
            KeyValue::new(
                "messaging.destination.partition.id",
                partition_id(partition),
            ),
            KeyValue::new("messaging.kafka.message.key", key_text(key)),
            KeyValue::new("prosody.timer.time", time),
        ];
        if let Some(group) = &self.group {
            attributes.push(KeyValue::new(
                "messaging.consumer.group.name",
                Arc::clone(group),
            ));
        }
        let span = tracer
            .span_builder("fire timer")
            .with_kind(SpanKind::Internal)
            .with_attributes(attributes)
            .with_links(links)
            .start_with_context(tracer, &parent);
        parent.with_span(span)
    }

    /// The `schedule timer` span, a child of `parent` (the handler's span), for a timer at
    /// `time`. Ends at once; its context is what the timer stores.
    pub fn schedule(&self, parent: &Context, key: &[u8], time: i64) -> Context {
        let Some(tracer) = &self.tracer else {
            return parent.clone();
        };
        let span = tracer
            .span_builder("schedule timer")
            .with_kind(SpanKind::Internal)
            .with_attributes([
                KeyValue::new("messaging.kafka.message.key", key_text(key)),
                KeyValue::new("prosody.timer.time", time),
            ])
            .start_with_context(tracer, parent);
        let cx = parent.with_span(span);
        cx.span().end();
        cx
    }
}

/// A record's headers carrying its `send` span's context, and the span.
pub type Traced = (Vec<(String, Vec<u8>)>, Context);

/// A producer's spans: a `send` span per record, the child of the trace context the record
/// already carries (a handler's, or the application's), whose context replaces it in the record.
#[derive(Clone, Default)]
pub struct SendSpans {
    tracer: Option<SdkTracer>,
}

impl std::fmt::Debug for SendSpans {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SendSpans(exported: {})", self.tracer.is_some())
    }
}

impl SendSpans {
    /// The process's tracer, when spans are exported.
    pub fn new() -> Result<Self, String> {
        Ok(Self { tracer: tracer()? })
    }

    /// Starts the `send` span of a record and returns it with the record's headers carrying its
    /// context; `None` (the record unchanged) when spans are not exported.
    pub fn prepare(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        partition: Option<i32>,
        headers: &[(String, Vec<u8>)],
    ) -> Option<Traced> {
        let tracer = self.tracer.as_ref()?;
        let parent = extract(headers);
        let mut attributes = vec![
            KeyValue::new("messaging.system", "kafka"),
            KeyValue::new("messaging.operation.name", "send"),
            KeyValue::new("messaging.operation.type", "send"),
            KeyValue::new("messaging.destination.name", topic.to_owned()),
        ];
        if let Some(key) = key {
            attributes.push(KeyValue::new("messaging.kafka.message.key", key_text(key)));
        }
        if let Some(partition) = partition {
            attributes.push(KeyValue::new(
                "messaging.destination.partition.id",
                partition_id(partition),
            ));
        }
        let span = tracer
            .span_builder(format!("send {topic}"))
            .with_kind(SpanKind::Producer)
            .with_attributes(attributes)
            .start_with_context(tracer, &parent);
        let cx = parent.with_span(span);
        let mut headers = headers.to_vec();
        inject(&cx, &mut headers);
        Some((headers, cx))
    }
}

/// Ends a `send` span with where the record landed, or why it did not.
pub fn sent(cx: &Context, outcome: Result<(i32, i64), &str>) {
    let span = cx.span();
    match outcome {
        Ok((partition, offset)) => {
            span.set_attribute(KeyValue::new(
                "messaging.destination.partition.id",
                partition_id(partition),
            ));
            span.set_attribute(KeyValue::new("messaging.kafka.offset", offset));
        }
        Err(reason) => span.set_status(Status::error(reason.to_owned())),
    }
    span.end();
}

/// Adds an event (retry, defer, dead-letter, dedup-skip, filter-skip) to `cx`'s span; its
/// attributes are built only when the span is recorded.
pub fn event(cx: &Context, name: &'static str, attributes: impl FnOnce() -> Vec<KeyValue>) {
    let span = cx.span();
    if span.is_recording() {
        span.add_event(name, attributes());
    }
}

/// Records a handler call's end on its event's span: `prosody.attempt` (the calls so far), and
/// for a failure an event with its class, message and kind, and the class as `error.type`.
pub fn attempted(cx: &Context, attempts: u32, failure: Option<&Failure>) {
    let span = cx.span();
    if !span.is_recording() {
        return;
    }
    span.set_attribute(KeyValue::new("prosody.attempt", i64::from(attempts)));
    if let Some(failure) = failure {
        span.set_attribute(KeyValue::new("error.type", failure.error_class.clone()));
        span.add_event(
            "handler failure",
            vec![
                KeyValue::new("prosody.attempt", i64::from(attempts)),
                KeyValue::new("exception.type", failure.error_class.clone()),
                KeyValue::new("exception.message", failure.message.clone()),
                KeyValue::new("prosody.permanent", failure.permanent),
            ],
        );
    }
}

/// Ends `cx`'s span (a second end does nothing) with how the event finished: `success`,
/// `failure` (given up), `dead_lettered`, `deferred`, `skipped` or `abandoned`. The first two
/// after a failure, and `dead_lettered`, carry an error status.
pub fn finish_as(cx: &Context, outcome: &'static str) {
    let span = cx.span();
    if !span.is_recording() {
        return;
    }
    span.set_attribute(KeyValue::new("prosody.outcome", outcome));
    if matches!(outcome, "failure" | "dead_lettered") {
        span.set_status(Status::error(outcome));
    }
    span.end();
}

/// A timer's stored span context: the `traceparent` value, then `tracestate` after a newline
/// when it has entries. Empty for a context without a valid span.
pub fn encode_stored(cx: &Context) -> Option<String> {
    let pairs = carrier(cx);
    let parent = pairs.iter().find(|(k, _)| k == "traceparent")?;
    let state = pairs.iter().find(|(k, _)| k == "tracestate");
    Some(match state {
        Some((_, state)) => format!("{}\n{state}", parent.1),
        None => parent.1.clone(),
    })
}

/// The context [`encode_stored`] wrote.
pub fn decode_stored(stored: &str) -> Context {
    let mut lines = stored.splitn(2, '\n');
    let mut pairs = Vec::with_capacity(2);
    if let Some(parent) = lines.next() {
        pairs.push(("traceparent".to_owned(), parent.to_owned()));
    }
    if let Some(state) = lines.next() {
        pairs.push(("tracestate".to_owned(), state.to_owned()));
    }
    extract_pairs(&pairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    #[test]
    fn headers_round_trip_a_context_and_replace_what_was_there() {
        let mut headers = vec![
            ("traceparent".to_owned(), PARENT.as_bytes().to_vec()),
            ("tracestate".to_owned(), b"vendor=1".to_vec()),
            ("other".to_owned(), b"x".to_vec()),
        ];
        let cx = extract(&headers);
        assert_eq!(
            trace_id(&cx).map(|id| id.to_string()).as_deref(),
            Some("0af7651916cd43dd8448eb211c80319c")
        );
        let carried = carrier(&cx);
        assert!(carried.contains(&("traceparent".to_owned(), PARENT.to_owned())));
        assert!(carried.contains(&("tracestate".to_owned(), "vendor=1".to_owned())));
        inject(&cx, &mut headers);
        assert_eq!(
            headers.iter().filter(|(k, _)| k == "traceparent").count(),
            1
        );
        assert!(headers.iter().any(|(k, _)| k == "other"));
    }

    #[test]
    fn no_context_costs_no_parse_and_injects_nothing() {
        let mut headers = vec![("other".to_owned(), b"x".to_vec())];
        let cx = extract(&headers);
        assert!(!cx.span().span_context().is_valid());
        inject(&cx, &mut headers);
        assert_eq!(headers.len(), 1);
        assert!(carrier(&cx).is_empty());
        assert_eq!(encode_stored(&cx), None);
    }

    #[test]
    fn a_stored_context_decodes_to_the_same_span() {
        let headers = vec![
            ("traceparent".to_owned(), PARENT.as_bytes().to_vec()),
            ("tracestate".to_owned(), b"a=b".to_vec()),
        ];
        let cx = extract(&headers);
        let stored = encode_stored(&cx).unwrap_or_default();
        assert_eq!(stored, format!("{PARENT}\na=b"));
        let back = decode_stored(&stored);
        assert_eq!(
            back.span().span_context().span_id(),
            cx.span().span_context().span_id()
        );
    }
}
