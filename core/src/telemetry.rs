//! The telemetry emitter: lifecycle events (a message received, handled, failed, retried,
//! deferred, dead-lettered, deduplicated, filtered; a timer scheduled, unscheduled, fired,
//! handled, failed; a record sent) as JSON records on `telemetry_topic`, keyed by the event's
//! key.
//!
//! The handler path never waits for it: an event is a small value pushed onto the emitter's
//! inbox (a bounded list behind a short lock; only the push that finds it empty wakes the
//! emitter). One task per client takes the whole inbox at once, letting events gather for 5 ms
//! after each batch so that a busy handler path wakes it once per batch, writes each event as
//! JSON and queues it on the emitter's own producer (large batches, no delivery tracking)
//! without waiting for the broker. When either the inbox or librdkafka's queue is full the
//! event is dropped, counted, and a warning says so at most once a minute.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;

use crate::defer::now_ms;
use crate::event::Key;
use crate::kafka::producer::DetachedProducer;

/// Events waiting for the emitter task; beyond this, events are dropped.
const QUEUE: usize = 16_384;

/// How long the task lets events gather after writing a batch.
const LINGER: Duration = Duration::from_millis(5);

/// Shortest time between two warnings about dropped events.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// What happened (the `event` field of the JSON).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A record was read and decoded.
    MessageReceived,
    /// A message's handler returned.
    MessageSucceeded,
    /// A message's handler raised (or timed out).
    MessageFailed,
    /// A failed message will run again after a delay.
    MessageRetried,
    /// A failed message's key was deferred (pipeline mode).
    MessageDeferred,
    /// A message reached the failure topic.
    MessageDeadLettered,
    /// A message was skipped as a duplicate of one handled before.
    MessageDeduplicated,
    /// A message was skipped by `allowed_events`.
    MessageFiltered,
    /// A timer was stored.
    TimerScheduled,
    /// A timer (or every timer of a key) was removed.
    TimerUnscheduled,
    /// A timer came due and its handler is about to run.
    TimerFired,
    /// A timer's handler returned.
    TimerSucceeded,
    /// A timer's handler raised (or timed out).
    TimerFailed,
    /// A record was acknowledged by the broker.
    MessageSent,
}

impl Kind {
    /// Every kind, in declaration order (`kind as usize` is its index).
    pub const ALL: [Kind; 14] = [
        Kind::MessageReceived,
        Kind::MessageSucceeded,
        Kind::MessageFailed,
        Kind::MessageRetried,
        Kind::MessageDeferred,
        Kind::MessageDeadLettered,
        Kind::MessageDeduplicated,
        Kind::MessageFiltered,
        Kind::TimerScheduled,
        Kind::TimerUnscheduled,
        Kind::TimerFired,
        Kind::TimerSucceeded,
        Kind::TimerFailed,
        Kind::MessageSent,
    ];

    /// The name in the JSON.
    pub fn name(self) -> &'static str {
        match self {
            Kind::MessageReceived => "message.received",
            Kind::MessageSucceeded => "message.succeeded",
            Kind::MessageFailed => "message.failed",
            Kind::MessageRetried => "message.retried",
            Kind::MessageDeferred => "message.deferred",
            Kind::MessageDeadLettered => "message.dead_lettered",
            Kind::MessageDeduplicated => "message.deduplicated",
            Kind::MessageFiltered => "message.filtered",
            Kind::TimerScheduled => "timer.scheduled",
            Kind::TimerUnscheduled => "timer.unscheduled",
            Kind::TimerFired => "timer.fired",
            Kind::TimerSucceeded => "timer.succeeded",
            Kind::TimerFailed => "timer.failed",
            Kind::MessageSent => "message.sent",
        }
    }
}

/// Fields only some events have.
#[derive(Debug, Clone, PartialEq)]
pub enum Detail {
    /// Nothing more.
    None,
    /// A handler failure: its error class, whether permanent, which attempt.
    Failure {
        error_class: String,
        permanent: bool,
        attempt: u32,
    },
    /// A retry: after which attempt, and the delay.
    Retry { attempt: u32, delay_ms: u64 },
    /// A dead letter: the failure topic and why.
    DeadLetter {
        failure_topic: Arc<str>,
        reason: &'static str,
    },
}

/// One lifecycle event. Built on the handler path, so it holds shared values only (no JSON, no
/// formatting): the emitter task writes it out.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// What happened.
    pub kind: Kind,
    /// When, in milliseconds since the epoch.
    pub at_ms: i64,
    /// The topic of the message or timer (for `message.sent`, where it was sent).
    pub topic: Arc<str>,
    /// Its partition.
    pub partition: i32,
    /// The message's offset (none for timers).
    pub offset: Option<i64>,
    /// The event's key (the telemetry record's key too); `None` for a keyless message.
    pub key: Option<Key>,
    /// The record's own timestamp, in milliseconds since the epoch, when it has one.
    pub message_ms: Option<i64>,
    /// The trace the event belongs to.
    pub trace_id: Option<opentelemetry::trace::TraceId>,
    /// For a timer event, the timer's time (seconds since the epoch), or `Some(None)` for
    /// "every timer of the key"; `None` for a message event.
    pub timer: Option<Option<i64>>,
    /// What only some events have.
    pub detail: Detail,
}

impl Event {
    /// An event of `kind` about `key` of `topic`'s `partition`, happening now, in the trace of
    /// `trace` (when it has one); the other fields empty.
    pub fn new(
        kind: Kind,
        topic: Arc<str>,
        partition: i32,
        key: Option<Key>,
        trace: &opentelemetry::Context,
    ) -> Self {
        Self {
            kind,
            at_ms: now_ms(),
            topic,
            partition,
            offset: None,
            key,
            message_ms: None,
            trace_id: crate::spans::trace_id(trace),
            timer: None,
            detail: Detail::None,
        }
    }

    /// The `message.sent` event with where its record landed.
    pub fn landed(&self, delivery: &crate::kafka::producer::Delivery) -> Self {
        Self {
            partition: delivery.partition,
            offset: Some(delivery.offset),
            ..self.clone()
        }
    }
}

/// Writes events as the JSON objects the topic receives (fields in a fixed order). Keeps the
/// group and the last topic already escaped, and one buffer, so that writing an event allocates
/// nothing once the buffer has grown.
pub struct JsonWriter {
    /// The group, as a JSON string.
    group: String,
    /// The last topic written, and it as a JSON string.
    topic: Option<(Arc<str>, String)>,
    /// The buffer.
    out: String,
}

impl JsonWriter {
    /// A writer for the events of `group`.
    pub fn new(group: &str) -> Self {
        let mut quoted = String::with_capacity(group.len() + 2);
        push_json_str(&mut quoted, group);
        Self {
            group: quoted,
            topic: None,
            out: String::with_capacity(256),
        }
    }

    /// `event` as JSON (valid until the next call).
    pub fn write(&mut self, event: &Event) -> &str {
        let topic = match &mut self.topic {
            Some((name, quoted)) if Arc::ptr_eq(name, &event.topic) || **name == *event.topic => {
                quoted
            }
            slot => {
                let mut quoted = String::with_capacity(event.topic.len() + 2);
                push_json_str(&mut quoted, &event.topic);
                &slot.insert((event.topic.clone(), quoted)).1
            }
        };
        let out = &mut self.out;
        let mut digits = itoa::Buffer::new();
        out.clear();
        out.push_str("{\"event\":\"");
        out.push_str(event.kind.name());
        out.push_str("\",\"timestamp_ms\":");
        out.push_str(digits.format(event.at_ms));
        out.push_str(",\"group\":");
        out.push_str(&self.group);
        out.push_str(",\"topic\":");
        out.push_str(topic);
        out.push_str(",\"partition\":");
        out.push_str(digits.format(event.partition));
        if let Some(offset) = event.offset {
            out.push_str(",\"offset\":");
            out.push_str(digits.format(offset));
        }
        match event.key.as_deref() {
            None => out.push_str(",\"key\":null"),
            Some(key) => match std::str::from_utf8(key) {
                Ok(text) => {
                    out.push_str(",\"key\":");
                    push_json_str(out, text);
                }
                Err(_) => {
                    const HEX: &[u8; 16] = b"0123456789abcdef";
                    out.push_str(",\"key_hex\":\"");
                    for byte in key {
                        out.push(char::from(HEX[usize::from(byte >> 4)]));
                        out.push(char::from(HEX[usize::from(byte & 0xf)]));
                    }
                    out.push('"');
                }
            },
        }
        if let Some(ms) = event.message_ms {
            out.push_str(",\"message_timestamp_ms\":");
            out.push_str(digits.format(ms));
        }
        if let Some(trace_id) = event.trace_id {
            use std::fmt::Write as _;
            let _ = write!(out, ",\"trace_id\":\"{trace_id}\"");
        }
        match event.timer {
            None => {}
            Some(Some(time)) => {
                out.push_str(",\"timer_time\":");
                out.push_str(digits.format(time));
            }
            Some(None) => out.push_str(",\"timer_time\":null"),
        }
        match &event.detail {
            Detail::None => {}
            Detail::Failure {
                error_class,
                permanent,
                attempt,
            } => {
                out.push_str(",\"error_class\":");
                push_json_str(out, error_class);
                out.push_str(if *permanent {
                    ",\"permanent\":true,\"attempt\":"
                } else {
                    ",\"permanent\":false,\"attempt\":"
                });
                out.push_str(digits.format(*attempt));
            }
            Detail::Retry { attempt, delay_ms } => {
                out.push_str(",\"attempt\":");
                out.push_str(digits.format(*attempt));
                out.push_str(",\"delay_ms\":");
                out.push_str(digits.format(*delay_ms));
            }
            Detail::DeadLetter {
                failure_topic,
                reason,
            } => {
                out.push_str(",\"failure_topic\":");
                push_json_str(out, failure_topic);
                out.push_str(",\"reason\":");
                push_json_str(out, reason);
            }
        }
        out.push('}');
        out
    }
}

/// Appends `text` as a JSON string.
fn push_json_str(out: &mut String, text: &str) {
    use std::fmt::Write as _;
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Counts of what the emitter did, over a client's life.
#[derive(Debug, Default)]
pub struct Counts {
    /// Events queued for the topic.
    pub emitted: AtomicU64,
    /// Events dropped because the inbox or the producer's queue was full, or because the
    /// broker did not take them within `send_timeout`.
    pub dropped: AtomicU64,
    /// Milliseconds since the epoch of the last warning about drops.
    last_warning_ms: AtomicU64,
}

impl Counts {
    fn dropped(&self) {
        let total = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        let now = u64::try_from(now_ms()).unwrap_or(0);
        let last = self.last_warning_ms.load(Ordering::Relaxed);
        let every = u64::try_from(WARN_EVERY.as_millis()).unwrap_or(u64::MAX);
        if now.saturating_sub(last) >= every
            && self
                .last_warning_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                "telemetry events are being dropped: the emitter or the producer's queue is full \
                 ({total} dropped so far); the handlers are not slowed down"
            );
        }
    }
}

/// Where the handler path leaves events for the emitter task.
#[derive(Default)]
struct Inbox {
    /// The events not taken yet (at most [`QUEUE`]).
    events: Mutex<Vec<Event>>,
    /// Wakes the task: told by the push that finds `events` empty, and on close.
    wake: Notify,
    /// How many events the task took and has not queued on the producer yet.
    taking: AtomicUsize,
    /// Set when the client's emitter is dropped: the task ends once `events` is empty.
    closed: AtomicBool,
}

impl Inbox {
    /// The events waiting, leaving `spare` (emptied) in their place; records how many were
    /// taken in `taking`, under the same lock, so that [`Telemetry::flush`] never sees an event
    /// in neither place.
    fn take(&self, spare: Vec<Event>) -> Vec<Event> {
        let mut events = self.events.lock().unwrap_or_else(PoisonError::into_inner);
        self.taking.store(events.len(), Ordering::Release);
        std::mem::replace(&mut *events, spare)
    }

    /// Whether no event waits or is being queued.
    fn idle(&self) -> bool {
        let events = self.events.lock().unwrap_or_else(PoisonError::into_inner);
        events.is_empty() && self.taking.load(Ordering::Acquire) == 0
    }
}

/// A client's emitter. Dropping it closes the inbox, and the task ends once it queued what was
/// left.
pub struct Telemetry {
    /// Where events go.
    inbox: Arc<Inbox>,
    /// What happened to them.
    pub counts: Arc<Counts>,
    /// Where the task queues them.
    producer: Arc<DetachedProducer>,
    /// The task that writes them out (it ends once the inbox is closed and empty).
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("counts", &self.counts)
            .finish()
    }
}

impl Telemetry {
    /// Starts the emitter of a client of `group`, sending to `topic` on `bootstrap` through a
    /// producer of its own with the client's producer `properties` (records not delivered
    /// within `timeout` count as dropped).
    pub fn start(
        runtime: &tokio::runtime::Handle,
        bootstrap: &str,
        properties: &[(String, String)],
        timeout: Duration,
        topic: String,
        group: String,
    ) -> Result<Self, crate::kafka::KafkaError> {
        let inbox = Arc::new(Inbox::default());
        let counts = Arc::new(Counts::default());
        let undelivered = counts.clone();
        let producer = Arc::new(DetachedProducer::new(
            bootstrap,
            properties,
            &topic,
            timeout,
            move || {
                undelivered.dropped();
            },
        )?);
        let task = runtime.spawn(emit(inbox.clone(), producer.clone(), group, counts.clone()));
        Ok(Self {
            inbox,
            counts,
            producer,
            task,
        })
    }

    /// Hands `event` to the emitter, or drops it (counted) when the emitter is behind.
    pub fn send(&self, event: Event) {
        let mut events = self
            .inbox
            .events
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if events.len() >= QUEUE {
            drop(events);
            self.counts.dropped();
            return;
        }
        let first = events.is_empty();
        events.push(event);
        drop(events);
        if first {
            self.inbox.wake.notify_one();
        }
    }

    /// Waits (blocking the calling thread, at most `timeout`) until every event sent so far is
    /// queued on the producer, then until the producer delivered what it holds: what
    /// `unsubscribe` does, so that a process that exits after it loses no events.
    pub fn flush(&self, timeout: Duration) {
        let deadline = std::time::Instant::now() + timeout;
        while !self.inbox.idle() && std::time::Instant::now() < deadline && !self.task.is_finished()
        {
            std::thread::sleep(Duration::from_millis(2));
        }
        self.producer
            .flush(deadline.saturating_duration_since(std::time::Instant::now()));
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.inbox.closed.store(true, Ordering::Release);
        self.inbox.wake.notify_one();
    }
}

/// The emitter task: takes every waiting event at once, writes each as JSON and queues it on
/// the producer without waiting for its acknowledgement; ends once the inbox is closed and
/// empty.
async fn emit(
    inbox: Arc<Inbox>,
    producer: Arc<DetachedProducer>,
    group: String,
    counts: Arc<Counts>,
) {
    let mut spare = Vec::new();
    let mut json = JsonWriter::new(&group);
    loop {
        let mut batch = inbox.take(spare);
        if batch.is_empty() {
            if inbox.closed.load(Ordering::Acquire) {
                return;
            }
            spare = batch;
            inbox.wake.notified().await;
            continue;
        }
        let mut emitted = 0;
        for event in batch.drain(..) {
            if producer.send(event.key.as_deref(), json.write(&event).as_bytes()) {
                emitted += 1;
            } else {
                counts.dropped();
            }
        }
        counts.emitted.fetch_add(emitted, Ordering::Relaxed);
        inbox.taking.store(0, Ordering::Release);
        spare = batch;
        producer.poll();
        // Let events gather for a moment, so that a busy handler path wakes this task once per
        // batch rather than once per event.
        tokio::time::sleep(LINGER).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: Kind, key: Option<&[u8]>, detail: Detail) -> Event {
        Event {
            kind,
            at_ms: 1_796_000_000_123,
            topic: Arc::from("orders"),
            partition: 2,
            offset: Some(41),
            key: key.map(Key::from),
            message_ms: Some(1_796_000_000_000),
            trace_id: None,
            timer: None,
            detail,
        }
    }

    #[test]
    fn every_kind_is_listed_at_its_own_index() {
        for (i, kind) in Kind::ALL.iter().enumerate() {
            assert_eq!(*kind as usize, i, "{}", kind.name());
        }
    }

    #[test]
    fn events_are_written_with_their_fields_in_a_fixed_order() {
        let failed = event(
            Kind::MessageFailed,
            Some(b"c-7"),
            Detail::Failure {
                error_class: "IOError".into(),
                permanent: false,
                attempt: 2,
            },
        );
        let mut json = JsonWriter::new("billing");
        assert_eq!(
            json.write(&failed),
            r#"{"event":"message.failed","timestamp_ms":1796000000123,"group":"billing","topic":"orders","partition":2,"offset":41,"key":"c-7","message_timestamp_ms":1796000000000,"error_class":"IOError","permanent":false,"attempt":2}"#
        );
    }

    #[test]
    fn a_full_emitter_drops_and_counts_without_waiting() -> Result<(), Box<dyn std::error::Error>> {
        let bootstrap = crate::kafka::mock::shared()?.bootstrap_servers().to_owned();
        // A runtime nobody drives: the emitter task never takes anything from its channel.
        let idle = tokio::runtime::Builder::new_current_thread().build()?;
        let telemetry = Telemetry::start(
            idle.handle(),
            &bootstrap,
            &[],
            Duration::from_secs(1),
            "t".into(),
            "g".into(),
        )?;
        let started = std::time::Instant::now();
        for _ in 0..QUEUE + 10 {
            telemetry.send(event(Kind::MessageReceived, Some(b"k"), Detail::None));
        }
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(telemetry.counts.dropped.load(Ordering::Relaxed), 10);
        Ok(())
    }

    fn parsed(event: &Event, group: &str) -> serde_json::Value {
        serde_json::from_str(JsonWriter::new(group).write(event)).unwrap_or_default()
    }

    #[test]
    fn keys_that_are_not_text_are_written_as_hex_and_keyless_as_null() {
        let bytes = parsed(
            &event(Kind::MessageReceived, Some(b"\xff\x00"), Detail::None),
            "g",
        );
        assert_eq!(bytes["key_hex"], "ff00");
        assert!(bytes.get("key").is_none());
        let keyless = parsed(&event(Kind::MessageReceived, None, Detail::None), "g");
        assert_eq!(keyless["key"], serde_json::Value::Null);
    }

    #[test]
    fn a_writer_names_each_event_s_own_topic() {
        let mut json = JsonWriter::new("g");
        let mut other = event(Kind::MessageReceived, Some(b"k"), Detail::None);
        other.topic = Arc::from("payments");
        for (e, topic) in [
            (
                &event(Kind::MessageReceived, Some(b"k"), Detail::None),
                "orders",
            ),
            (&other, "payments"),
            (
                &event(Kind::MessageSucceeded, Some(b"k"), Detail::None),
                "orders",
            ),
        ] {
            let written: serde_json::Value =
                serde_json::from_str(json.write(e)).unwrap_or_default();
            assert_eq!(written["topic"], topic);
        }
    }

    #[test]
    fn text_is_escaped_as_json() {
        let odd = "q\"b\\n\nt\t\u{1}é";
        let mut e = event(Kind::MessageReceived, Some(odd.as_bytes()), Detail::None);
        e.topic = Arc::from(odd);
        let json = parsed(&e, odd);
        assert_eq!(json["key"], odd);
        assert_eq!(json["topic"], odd);
        assert_eq!(json["group"], odd);
    }
}
