//! The idempotent producer behind `send_message`.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, Message as _, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer as _, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use thiserror::Error;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use super::{KafkaError, ProducerContext};
use crate::event::SOURCE_SYSTEM_HEADER;
use crate::process::PerProcess;

/// Why a record was not delivered.
#[derive(Debug, Error)]
#[error("could not send to topic {topic:?} (key {key}): {reason}")]
pub struct SendError {
    /// Destination topic.
    pub topic: String,
    /// Record key, as log lines show it (quoted; `nil` for none).
    pub key: String,
    /// What librdkafka reported (a timeout names `send_timeout`).
    pub reason: String,
}

impl SendError {
    /// The failure of `record` for `reason`.
    pub fn of(record: &Record, reason: String) -> Self {
        Self::of_raw(record.as_raw(), reason)
    }

    /// The failure of `record` (given as bytes) for `reason`.
    pub fn of_raw(record: RawRecord<'_>, reason: String) -> Self {
        Self {
            topic: record.topic.to_owned(),
            key: crate::event::show_key(record.key),
            reason,
        }
    }
}

/// Where a delivered record landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// Partition written.
    pub partition: i32,
    /// Offset written.
    pub offset: i64,
}

/// An idempotent producer that stamps every record with the `source-system` header. Clients of
/// one process with the same servers and `send_timeout` share one librdkafka producer.
pub struct Producer {
    /// The shared librdkafka producer; replaced when the cluster behind the servers changed.
    shared: Mutex<Arc<Shared>>,
    /// Value of the `source-system` header.
    source_system: String,
    /// A `send` span per record, when spans are exported.
    spans: crate::spans::SendSpans,
}

/// A librdkafka producer shared by the clients of a process.
struct Shared {
    /// `bootstrap.servers`, part of the pool key.
    bootstrap: String,
    /// Security and the application's librdkafka settings, part of the pool key.
    properties: Vec<(String, String)>,
    /// Longest a send waits for the acknowledgement, part of the pool key.
    send_timeout: Duration,
    /// Whether `bootstrap` is the in-process mock cluster.
    mock: bool,
    /// librdkafka's producer; its own threads do the network work, and its polling thread hands
    /// each delivery report to the [`Acks`] of the send that queued the record.
    inner: ThreadedProducer<ProducerContext>,
    /// Set (by librdkafka's log callback) when the cluster behind `bootstrap` changed.
    cluster_changed: Arc<OnceLock<String>>,
    /// `None` during the start-up work (see [`Shared::warm_up`]), then whether a broker answered.
    ready: Arc<watch::Sender<Option<bool>>>,
    /// The cluster's last refusal of this producer (see [`ProducerContext`]), told in the error
    /// of a send that timed out.
    refused: Arc<Mutex<Option<String>>>,
    /// Topics whose metadata this producer has asked for, so it knows their leaders.
    known_topics: Mutex<HashSet<String>>,
}

/// Takes the pooled producers of `bootstrap` out of the pool (a retired mock cluster's): they
/// go when the last client that uses them does.
pub(crate) fn forget_pooled(bootstrap: &str) {
    if let Some(pool) = POOL.get() {
        pool.lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|p| p.bootstrap != bootstrap);
    }
}

/// The producers of this process, created on demand and kept for its life (a child forked from
/// it creates its own).
static POOL: PerProcess<Mutex<Vec<Arc<Shared>>>> = PerProcess::new();

/// Internal topic of the mock cluster that a new producer writes one record to, so that it has
/// its producer id before the application's first send.
pub const WARM_UP_TOPIC: &str = "__prosody_warm_up";

/// Longest a send waits for a new producer's start-up work before its own `send_timeout` clock
/// starts; the start-up work on a healthy cluster takes milliseconds.
const START_UP_WAIT: Duration = Duration::from_secs(2);

impl Producer {
    /// The process's producer for `bootstrap`, `properties` (security and the application's
    /// librdkafka settings, see [`super::settings`]) and `send_timeout`, created (and warmed up
    /// in the background) on first use. `mock` says that `bootstrap` is the in-process mock
    /// cluster.
    pub fn new(
        bootstrap: &str,
        properties: Vec<(String, String)>,
        source_system: &str,
        send_timeout: Duration,
        mock: bool,
    ) -> Result<Self, KafkaError> {
        Ok(Self {
            shared: Mutex::new(Shared::pooled(bootstrap, &properties, send_timeout, mock)?),
            source_system: source_system.to_owned(),
            spans: crate::spans::SendSpans::new().map_err(KafkaError::Tracing)?,
        })
    }

    /// How many partitions `topic` has, as the cluster says within `timeout` (blocks); `None`
    /// when no broker answered or the topic does not exist.
    pub fn partition_count(&self, topic: &str, timeout: Duration) -> Option<usize> {
        let shared = self.current();
        let metadata = shared
            .inner
            .client()
            .fetch_metadata(Some(topic), timeout)
            .ok()?;
        metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none())
            .map(|t| t.partitions().len())
            .filter(|n| *n > 0)
    }

    /// The librdkafka producer to send with: the pooled one, replaced first when it saw the
    /// cluster change (its producer id and sequence numbers belong to the old cluster, so every
    /// send would fail).
    fn current(&self) -> Arc<Shared> {
        // A poisoned lock only means a panic elsewhere; the producer in it is still usable.
        let mut shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        if shared.cluster_changed.get().is_some() {
            match Shared::pooled(
                &shared.bootstrap,
                &shared.properties,
                shared.send_timeout,
                shared.mock,
            ) {
                Ok(fresh) => *shared = fresh,
                Err(e) => tracing::error!("could not replace the producer: {e}"),
            }
        }
        shared.clone()
    }

    /// Sends one record and waits for the broker's acknowledgement or `send_timeout`.
    pub async fn send(&self, record: &Record) -> Result<Delivery, SendError> {
        self.send_raw(record.as_raw()).await
    }

    /// Queues `record` now, on the calling thread, and reports its outcome to `done` from
    /// librdkafka's polling thread: no task, no timer and no engine wake-up per send (what a
    /// handler's `send_message` uses). Gives `done` back, with nothing sent, when the record
    /// cannot be queued at once (the producer is still starting, the topic's leaders were not
    /// asked for yet, or librdkafka's queue is full); [`Producer::send`] waits for those.
    /// Bounded like `send`: librdkafka fails an unacknowledged record after `send_timeout`, and
    /// a sweeper reports a record whose report never came a little later.
    pub fn send_now(&self, record: RawRecord<'_>, done: Done) -> Option<Done> {
        let shared = self.current();
        if !shared.prepared(record.topic) {
            return Some(done);
        }
        let traced = self.trace(record);
        let record = with_trace(record, &traced);
        let done = match &traced {
            Some((_, cx)) => traced_done(cx, done),
            None => done,
        };
        let acks = Acks::register(1);
        let base = self.base_record(record, acks.opaque(0));
        match shared.inner.send(base) {
            Ok(()) => {}
            Err((
                rdkafka::error::KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull),
                _,
            )) => {
                return Some(done);
            }
            Err((e, _)) => {
                done(Err(SendError::of_raw(record, e.to_string())));
                return None;
            }
        }
        // The report may already have come; `call_when_done` then calls at once.
        let (topic, key) = (record.topic.to_owned(), record.key.map(<[u8]>::to_vec));
        acks.call_when_done(
            Instant::now() + shared.send_timeout + OUTER_MARGIN,
            Box::new(move |mut outcomes| {
                let raw = RawRecord {
                    topic: &topic,
                    key: key.as_deref(),
                    payload: None,
                    headers: &[],
                    partition: None,
                };
                done(outcome_of(
                    outcomes.pop().flatten(),
                    shared.send_timeout,
                    shared.refusal().as_deref(),
                    raw,
                ));
            }),
        );
        None
    }

    /// Sends every record at once and waits once: all are queued in order (records of one
    /// partition are written in that order), then the acknowledgements are awaited together
    /// (one wake-up when the last one came, not one per record). Returns one result per record,
    /// in order; a failed record does not stop the others.
    pub async fn send_batch(&self, records: &[RawRecord<'_>]) -> Vec<Result<Delivery, SendError>> {
        let shared = self.current();
        let mut prepared: HashSet<&str> = HashSet::new();
        for record in records {
            if prepared.insert(record.topic) {
                shared.prepare(record.topic).await;
            }
        }
        let acks = Acks::register(records.len());
        let traced: Vec<_> = records.iter().map(|r| self.trace(*r)).collect();
        for (index, (record, traced)) in records.iter().zip(&traced).enumerate() {
            let record = with_trace(*record, traced);
            if let Err(reason) = self.enqueue(&shared, record, &acks, index).await {
                acks.settle(index, Err(Failed::Local(reason)));
            }
        }
        // Every record was queued before this instant, so none waits past its own bound.
        acks.wait(Instant::now() + shared.send_timeout + OUTER_MARGIN)
            .await;
        let send_timeout = shared.send_timeout;
        let refused = shared.refusal();
        acks.take()
            .into_iter()
            .zip(records)
            .zip(traced)
            .map(|((outcome, record), traced)| {
                let result = outcome_of(outcome, send_timeout, refused.as_deref(), *record);
                if let Some((_, cx)) = traced {
                    end_send(&cx, &result);
                }
                result
            })
            .collect()
    }

    /// Sends a record given as bytes (a missing key or payload stays missing). Every header is
    /// kept except `source-system`, which this producer sets itself.
    pub async fn send_raw(&self, record: RawRecord<'_>) -> Result<Delivery, SendError> {
        let shared = self.current();
        shared.prepare(record.topic).await;
        let traced = self.trace(record);
        let record = with_trace(record, &traced);
        let acks = Acks::register(1);
        match self.enqueue(&shared, record, &acks, 0).await {
            Ok(()) => {
                acks.wait(Instant::now() + shared.send_timeout + OUTER_MARGIN)
                    .await;
            }
            Err(reason) => acks.settle(0, Err(Failed::Local(reason))),
        }
        let outcome = acks.take().pop().flatten();
        let result = outcome_of(
            outcome,
            shared.send_timeout,
            shared.refusal().as_deref(),
            record,
        );
        if let Some((_, cx)) = traced {
            end_send(&cx, &result);
        }
        result
    }

    /// Starts `record`'s `send` span, when spans are exported: its headers with the span's
    /// context, and the span.
    fn trace(&self, record: RawRecord<'_>) -> Option<crate::spans::Traced> {
        self.spans
            .prepare(record.topic, record.key, record.partition, record.headers)
    }

    /// `record` as librdkafka takes it, with this producer's `source-system` header first (one
    /// given by the application is replaced) and `opaque` for its delivery report.
    fn base_record<'a>(
        &self,
        record: RawRecord<'a>,
        opaque: usize,
    ) -> BaseRecord<'a, [u8], [u8], usize> {
        let mut headers =
            OwnedHeaders::new_with_capacity(record.headers.len() + 1).insert(Header {
                key: SOURCE_SYSTEM_HEADER,
                value: Some(self.source_system.as_bytes()),
            });
        for (k, v) in record.headers {
            if k != SOURCE_SYSTEM_HEADER {
                headers = headers.insert(Header {
                    key: k,
                    value: Some(v.as_slice()),
                });
            }
        }
        let mut base = BaseRecord::with_opaque_to(record.topic, opaque).headers(headers);
        if let Some(key) = record.key {
            base = base.key(key);
        }
        if let Some(payload) = record.payload {
            base = base.payload(payload);
        }
        if let Some(partition) = record.partition {
            base = base.partition(partition);
        }
        base
    }

    /// Hands `record` to librdkafka's queue, its report to go to `acks` as record `index`,
    /// waiting (without blocking a thread) while that queue is full, at most `send_timeout`.
    async fn enqueue(
        &self,
        shared: &Shared,
        record: RawRecord<'_>,
        acks: &Acks,
        index: usize,
    ) -> Result<(), String> {
        let mut base = self.base_record(record, acks.opaque(index));
        // The clock is read only when the queue is full (the first time, that is when the record
        // was first tried).
        let mut started = None;
        loop {
            match shared.inner.send(base) {
                Ok(()) => return Ok(()),
                Err((
                    rdkafka::error::KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull),
                    back,
                )) => {
                    let now = Instant::now();
                    let started = *started.get_or_insert(now);
                    if now >= started + shared.send_timeout {
                        return Err(format!(
                            "librdkafka's send queue stayed full for send_timeout ({:?})",
                            shared.send_timeout
                        ));
                    }
                    base = back;
                    tokio::time::sleep(QUEUE_FULL_PAUSE).await;
                }
                Err((e, _)) => return Err(e.to_string()),
            }
        }
    }
}

/// `record` with the headers of its `send` span, when it has one.
fn with_trace<'a>(
    record: RawRecord<'a>,
    traced: &'a Option<crate::spans::Traced>,
) -> RawRecord<'a> {
    match traced {
        Some((headers, _)) => RawRecord { headers, ..record },
        None => record,
    }
}

/// Ends a `send` span with the record's outcome.
fn end_send(cx: &opentelemetry::Context, result: &Result<Delivery, SendError>) {
    crate::spans::sent(
        cx,
        result
            .as_ref()
            .map(|d| (d.partition, d.offset))
            .map_err(|e| e.reason.as_str()),
    );
}

/// `done`, ending the `send` span `cx` first.
fn traced_done(cx: &opentelemetry::Context, done: Done) -> Done {
    let cx = cx.clone();
    Box::new(move |result| {
        end_send(&cx, &result);
        done(result);
    })
}

/// A producer of records nobody waits for (the telemetry emitter's): its own librdkafka
/// producer, separate from the application's so that its batching suits it (records wait up to
/// 50 ms to go in large batches; no idempotence, so no producer-id handshake, and a rare
/// duplicate after a broker error is acceptable there). No span, no trace context, no headers;
/// librdkafka reports only records it could not deliver. Its owner polls it.
///
/// It writes to one topic, through a librdkafka topic handle made once: the crate's `send`
/// copies the topic name into a new C string and has librdkafka look the topic up by name for
/// every record, which was a measurable share of the emitter's cost.
pub struct DetachedProducer {
    /// The topic handle; declared first so that it is released before the producer.
    topic: TopicHandle,
    inner: rdkafka::producer::BaseProducer<DetachedContext>,
}

/// librdkafka's `RD_KAFKA_PARTITION_UA`: let the partitioner choose from the key.
const PARTITION_UNASSIGNED: i32 = -1;

/// A librdkafka topic handle (`rd_kafka_topic_t`) of a [`DetachedProducer`], released on drop.
struct TopicHandle(std::ptr::NonNull<rdkafka::bindings::rd_kafka_topic_t>);

// SAFETY: librdkafka topic handles are reference-counted and safe to use from any thread; the
// handle is only used to produce, and released once (on drop), before its producer.
unsafe impl Send for TopicHandle {}
// SAFETY: as above: `rd_kafka_produce` may be called on one handle from several threads.
unsafe impl Sync for TopicHandle {}

impl Drop for TopicHandle {
    fn drop(&mut self) {
        // SAFETY: the handle came from `rd_kafka_topic_new` and is released exactly once, while
        // its producer is still alive (field order in `DetachedProducer`).
        unsafe { rdkafka::bindings::rd_kafka_topic_destroy(self.0.as_ptr()) }
    }
}

/// The context of a [`DetachedProducer`]: librdkafka's log lines and errors as for the other
/// producers, and each record that could not be delivered reported to `undelivered`.
pub struct DetachedContext {
    undelivered: Box<dyn Fn() + Send + Sync>,
}

impl rdkafka::ClientContext for DetachedContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, facility: &str, message: &str) {
        super::log_librdkafka(level, facility, message);
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        super::log_client_error(&error, reason);
    }
}

impl rdkafka::producer::ProducerContext for DetachedContext {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, (): ()) {
        if result.is_err() {
            (self.undelivered)();
        }
    }
}

impl DetachedProducer {
    /// A producer to `topic` on `bootstrap` with `properties` (see [`super::settings`]),
    /// failing a record not delivered within `timeout` and telling `undelivered` (on the thread
    /// that polls it).
    pub fn new(
        bootstrap: &str,
        properties: &[(String, String)],
        topic: &str,
        timeout: Duration,
        undelivered: impl Fn() + Send + Sync + 'static,
    ) -> Result<Self, KafkaError> {
        let mut settings = ClientConfig::new();
        settings
            .set("bootstrap.servers", bootstrap)
            .set("enable.idempotence", "false")
            .set("acks", "1")
            .set("linger.ms", "50")
            .set("delivery.report.only.error", "true")
            .set("message.timeout.ms", timeout.as_millis().max(1).to_string());
        super::settings::apply(&mut settings, properties);
        let inner: rdkafka::producer::BaseProducer<DetachedContext> = settings
            .create_with_context(DetachedContext {
                undelivered: Box::new(undelivered),
            })
            .map_err(|source| KafkaError::Create {
                what: "telemetry producer",
                source,
            })?;
        let name = std::ffi::CString::new(topic).map_err(|_| KafkaError::Create {
            what: "telemetry producer",
            source: rdkafka::error::KafkaError::ClientCreation(format!(
                "topic name {topic:?} contains a NUL byte"
            )),
        })?;
        // SAFETY: `inner` is a live producer and `name` a valid C string; a null configuration
        // takes the producer's defaults. The handle is released by `TopicHandle`'s drop.
        let raw = unsafe {
            rdkafka::bindings::rd_kafka_topic_new(
                inner.client().native_ptr(),
                name.as_ptr(),
                std::ptr::null_mut(),
            )
        };
        let topic = std::ptr::NonNull::new(raw)
            .map(TopicHandle)
            .ok_or_else(|| KafkaError::Create {
                what: "telemetry producer",
                source: rdkafka::error::KafkaError::ClientCreation(format!(
                    "librdkafka refused the topic name {name:?}"
                )),
            })?;
        Ok(Self { topic, inner })
    }

    /// Queues a record if librdkafka can take it at once; false when its queue is full.
    pub fn send(&self, key: Option<&[u8]>, payload: &[u8]) -> bool {
        let (key_ptr, key_len) = key.map_or((std::ptr::null(), 0), |k| (k.as_ptr(), k.len()));
        // SAFETY: the topic handle and its producer are alive for `&self`; with `MSG_F_COPY`
        // librdkafka copies payload and key before returning, so the borrowed slices suffice;
        // the null opaque is the `()` delivery opaque of `DetachedContext`.
        let result = unsafe {
            rdkafka::bindings::rd_kafka_produce(
                self.topic.0.as_ptr(),
                PARTITION_UNASSIGNED,
                rdkafka::bindings::RD_KAFKA_MSG_F_COPY,
                payload.as_ptr().cast_mut().cast(),
                payload.len(),
                key_ptr.cast(),
                key_len,
                std::ptr::null_mut(),
            )
        };
        result == 0
    }

    /// Serves librdkafka's callbacks (failed deliveries, logs) without waiting.
    pub fn poll(&self) {
        self.inner.poll(Duration::ZERO);
    }

    /// Waits (blocking, at most `timeout`) until every queued record was delivered or failed.
    pub fn flush(&self, timeout: Duration) {
        if let Err(e) = rdkafka::producer::Producer::flush(&self.inner, timeout) {
            tracing::debug!("telemetry producer flush: {e}");
        }
    }
}

/// How long a send waits before trying again to queue a record while librdkafka's queue is full.
const QUEUE_FULL_PAUSE: Duration = Duration::from_millis(5);

/// librdkafka fails an unacknowledged record after `message.timeout.ms` (= `send_timeout`); this
/// outer bound, a little later, covers a delivery report that never comes.
const OUTER_MARGIN: Duration = Duration::from_millis(250);

/// Where a send started with [`Producer::send_now`] reports its outcome (called once, on
/// librdkafka's polling thread or the sweeper's).
pub type Done = Box<dyn FnOnce(Result<Delivery, SendError>) + Send>;

/// What a send started with [`Producer::send_now`] does with its outcomes.
type Callback = Box<dyn FnOnce(Vec<Option<Result<Delivery, Failed>>>) + Send>;

/// Why a record failed.
#[derive(Debug)]
pub(super) enum Failed {
    /// librdkafka's delivery report said so.
    Kafka(rdkafka::error::KafkaError),
    /// It never reached librdkafka's queue.
    Local(String),
}

/// The delivery reports of one send (one record, or a batch), filled in by librdkafka's
/// polling thread through [`ProducerContext`]'s delivery callback. The sender is woken once,
/// when the last report came.
///
/// A queued record carries no allocation of its own through librdkafka: its opaque value is
/// the send's id (high 32 bits) and the record's index (low 32 bits), and the callback finds the
/// send in [`WAITING`] (remembering the last one, since a batch's reports come together).
/// Freeing a per-record allocation on the polling thread contended with the sending thread's
/// allocations for the allocator's lock.
pub struct Acks {
    /// Key in [`WAITING`].
    id: u32,
    /// For a send started with [`Producer::send_now`]: when to give up on missing reports, and
    /// what to call with the outcomes (taken once, by the last report or by the sweeper). It
    /// holds the send's [`Registration`], so the send stays registered until then.
    callback: Mutex<Option<(Instant, Callback)>>,
    /// One slot per record, in send order; `None` until its report came.
    outcomes: Mutex<Vec<Option<Result<Delivery, Failed>>>>,
    /// Records whose report has not come yet.
    remaining: AtomicUsize,
    /// When the send queued its records (acknowledgement latency for `/metrics`).
    started: Instant,
    /// Signalled when `remaining` reaches zero.
    done: Notify,
}

/// Sends waiting for delivery reports, by id. A send removes itself when it stops waiting
/// ([`Registration`]); a report that comes later finds nothing and is dropped.
static WAITING: Mutex<Option<HashMap<u32, Arc<Acks>>>> = Mutex::new(None);

/// Ids for sends (wrapping; a send waits at most `send_timeout`, so ids never collide).
static NEXT_SEND: AtomicU32 = AtomicU32::new(0);

/// Sends with a callback still waiting (the sweeper sleeps while there are none).
static CALLBACK_SENDS: AtomicUsize = AtomicUsize::new(0);

/// How often the sweeper looks for callback sends past their deadline.
const SWEEP_EVERY: Duration = Duration::from_millis(100);

/// Reports, at their deadline, the records of [`Producer::send_now`] sends whose delivery report
/// never came (librdkafka sends one for every record, so normally it finds nothing). One task
/// per process on the shared runtime, started with the first such send; it sleeps on a
/// notification while no such send waits. Its owner is the process: it lives as long as the
/// runtime and the producer pool.
struct Sweeper {
    /// Wakes the task when the first callback send starts.
    wake: Notify,
}

/// This process's sweeper, started on first use.
static SWEEPER: PerProcess<Sweeper> = PerProcess::new();

impl Sweeper {
    /// Starts the sweeper if needed and wakes it.
    fn wake() {
        let sweeper = SWEEPER.get_or_try_init(|| {
            let runtime = crate::runtime::handle()?;
            runtime.spawn(Self::run());
            Ok::<_, String>(Sweeper {
                wake: Notify::new(),
            })
        });
        match sweeper {
            Ok(sweeper) => sweeper.wake.notify_one(),
            Err(e) => tracing::error!("could not start the producer's sweeper: {e}"),
        }
    }

    async fn run() {
        loop {
            if CALLBACK_SENDS.load(Ordering::Acquire) == 0 {
                match SWEEPER.get() {
                    Some(sweeper) => sweeper.wake.notified().await,
                    None => tokio::time::sleep(SWEEP_EVERY).await,
                }
                continue;
            }
            tokio::time::sleep(SWEEP_EVERY).await;
            let now = Instant::now();
            let waiting: Vec<Arc<Acks>> = {
                let waiting = WAITING.lock().unwrap_or_else(|p| p.into_inner());
                waiting
                    .as_ref()
                    .map(|w| w.values().cloned().collect())
                    .unwrap_or_default()
            };
            for acks in waiting {
                acks.call_back(Some(now));
            }
        }
    }
}

thread_local! {
    /// The send the polling thread reported to last.
    static LAST_SEND: RefCell<Option<Arc<Acks>>> = const { RefCell::new(None) };
}

/// A send's entry in [`WAITING`], removed when dropped.
pub(super) struct Registration(Arc<Acks>);

impl std::ops::Deref for Registration {
    type Target = Acks;
    fn deref(&self) -> &Acks {
        &self.0
    }
}

impl Registration {
    /// Has `callback` called with the outcomes once every report came (at once if they already
    /// did), or at `deadline` by the sweeper with what came by then.
    fn call_when_done(self, deadline: Instant, callback: Callback) {
        let acks = self.0.clone();
        // The send stays registered (its reports find it) until its outcomes were taken.
        let callback: Callback = Box::new(move |outcomes| {
            drop(self);
            callback(outcomes);
        });
        // Counted before it can be called (the count never goes below zero).
        if CALLBACK_SENDS.fetch_add(1, Ordering::AcqRel) == 0 {
            Sweeper::wake();
        }
        if let Ok(mut slot) = acks.callback.lock() {
            *slot = Some((deadline, callback));
        }
        if acks.remaining.load(Ordering::Acquire) == 0 {
            acks.call_back(None);
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut waiting = WAITING.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(waiting) = waiting.as_mut() {
            waiting.remove(&self.0.id);
        }
    }
}

impl Acks {
    /// A send of `records` records, registered for their reports.
    fn register(records: usize) -> Registration {
        let acks = Arc::new(Self {
            id: NEXT_SEND.fetch_add(1, Ordering::Relaxed),
            callback: Mutex::new(None),
            outcomes: Mutex::new(std::iter::repeat_with(|| None).take(records).collect()),
            remaining: AtomicUsize::new(records),
            started: Instant::now(),
            done: Notify::new(),
        });
        let mut waiting = WAITING.lock().unwrap_or_else(|p| p.into_inner());
        waiting
            .get_or_insert_with(HashMap::new)
            .insert(acks.id, acks.clone());
        Registration(acks)
    }

    /// The opaque value of record `index` (indexes beyond 32 bits are not sent: a batch that
    /// large could not be held in memory).
    fn opaque(&self, index: usize) -> usize {
        (usize::try_from(self.id).unwrap_or(0) << 32) | (index & 0xffff_ffff)
    }

    /// Records the outcome of record `index` (once; a second report for it is ignored).
    pub(super) fn settle(&self, index: usize, outcome: Result<Delivery, Failed>) {
        let first = match self.outcomes.lock() {
            Ok(mut outcomes) => match outcomes.get_mut(index) {
                Some(slot @ None) => {
                    *slot = Some(outcome);
                    true
                }
                _ => false,
            },
            Err(_) => false,
        };
        if first && self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            // Stores a permit if the sender is not waiting yet.
            self.done.notify_one();
            self.call_back(None);
        }
    }

    /// Calls the callback, if there is one (and, with `due`, only if its deadline passed).
    fn call_back(&self, due: Option<Instant>) {
        let taken = match self.callback.lock() {
            Ok(mut slot) => match slot.as_ref() {
                Some((deadline, _)) if due.is_none_or(|now| *deadline <= now) => slot.take(),
                _ => None,
            },
            Err(_) => None,
        };
        if let Some((_, callback)) = taken {
            CALLBACK_SENDS.fetch_sub(1, Ordering::AcqRel);
            callback(self.take());
        }
    }

    /// The delivery callback's half: the report of the record whose opaque value is `opaque`,
    /// counted in `metrics`.
    pub(super) fn report(
        result: &DeliveryResult<'_>,
        opaque: usize,
        metrics: &crate::metrics::ProducerMetrics,
    ) {
        let id = u32::try_from(opaque >> 32).unwrap_or(u32::MAX);
        let index = opaque & 0xffff_ffff;
        let Some(acks) = LAST_SEND.with(|last| {
            let mut last = last.borrow_mut();
            if last.as_ref().is_none_or(|acks| acks.id != id) {
                let waiting = WAITING.lock().unwrap_or_else(|p| p.into_inner());
                *last = waiting.as_ref().and_then(|w| w.get(&id)).cloned();
            }
            last.clone()
        }) else {
            return;
        };
        let outcome = match result {
            Ok(message) => Ok(Delivery {
                partition: message.partition(),
                offset: message.offset(),
            }),
            Err((e, _)) => Err(Failed::Kafka(e.clone())),
        };
        let counter = match outcome {
            Ok(_) => &metrics.acknowledged,
            Err(_) => &metrics.failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        metrics.ack_latency.observe(acks.started.elapsed());
        acks.settle(index, outcome);
    }

    /// Waits until every report came, or until `deadline`.
    async fn wait(&self, deadline: Instant) {
        while self.remaining.load(Ordering::Acquire) > 0 {
            if tokio::time::timeout_at(deadline, self.done.notified())
                .await
                .is_err()
            {
                return;
            }
        }
    }

    /// The outcomes so far, in send order (`None` for a report that never came).
    fn take(&self) -> Vec<Option<Result<Delivery, Failed>>> {
        self.outcomes
            .lock()
            .map(|mut outcomes| std::mem::take(&mut *outcomes))
            .unwrap_or_default()
    }
}

/// A record's result as the application sees it; `refused` is why the cluster last refused the
/// producer (failed authentication or TLS handshake), told when the record timed out.
fn outcome_of(
    outcome: Option<Result<Delivery, Failed>>,
    send_timeout: Duration,
    refused: Option<&str>,
    record: RawRecord<'_>,
) -> Result<Delivery, SendError> {
    let why = refused.map_or_else(
        || "is the broker reachable?".to_owned(),
        |reason| {
            format!(
                "the cluster refused this client ({reason}); check the sasl_* and ssl_* options"
            )
        },
    );
    let fail = |reason: String| SendError {
        topic: record.topic.to_owned(),
        key: crate::event::show_key(record.key),
        reason,
    };
    match outcome {
        Some(Ok(delivery)) => Ok(delivery),
        None => Err(fail(match refused {
            Some(_) => format!("no acknowledgement within send_timeout ({send_timeout:?}); {why}"),
            None => format!("no acknowledgement within send_timeout ({send_timeout:?})"),
        })),
        Some(Err(Failed::Local(reason))) => Err(fail(reason)),
        Some(Err(Failed::Kafka(e))) => Err(fail(match e.rdkafka_error_code() {
            Some(RDKafkaErrorCode::MessageTimedOut) => {
                format!("no acknowledgement within send_timeout ({send_timeout:?}); {why}")
            }
            _ => e.to_string(),
        })),
    }
}

/// A record to send, as the application gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Destination topic.
    pub topic: String,
    /// Record key.
    pub key: Vec<u8>,
    /// The value (JSON bytes); `None` sends a tombstone, a record with no value.
    pub payload: Option<Vec<u8>>,
    /// Headers, in order; a `source-system` header is replaced by the producer's own.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The partition to write, or `None` for the key's partition (librdkafka's partitioner).
    pub partition: Option<i32>,
}

impl Record {
    /// The record as borrowed bytes.
    pub fn as_raw(&self) -> RawRecord<'_> {
        RawRecord {
            topic: &self.topic,
            key: Some(&self.key),
            payload: self.payload.as_deref(),
            headers: &self.headers,
            partition: self.partition,
        }
    }
}

/// A record as borrowed bytes: what the dead-letter path forwards (a missing key stays missing).
#[derive(Debug, Clone, Copy)]
pub struct RawRecord<'a> {
    /// Destination topic.
    pub topic: &'a str,
    /// Record key, if any.
    pub key: Option<&'a [u8]>,
    /// Value, if any.
    pub payload: Option<&'a [u8]>,
    /// Headers, in order.
    pub headers: &'a [(String, Vec<u8>)],
    /// Explicit partition, if any.
    pub partition: Option<i32>,
}

impl Shared {
    /// The process's producer for `bootstrap` and `send_timeout`, created and warmed up on first
    /// use, and again after the one in the pool saw its cluster change.
    fn pooled(
        bootstrap: &str,
        properties: &[(String, String)],
        send_timeout: Duration,
        mock: bool,
    ) -> Result<Arc<Self>, KafkaError> {
        let pool = POOL.get_or_try_init(|| Ok::<_, KafkaError>(Mutex::new(Vec::new())))?;
        let mut pool = pool
            .lock()
            .map_err(|_| KafkaError::Runtime("producer pool poisoned".into()))?;
        pool.retain(|p| p.cluster_changed.get().is_none());
        if let Some(shared) = pool.iter().find(|p| {
            p.bootstrap == bootstrap && p.properties == properties && p.send_timeout == send_timeout
        }) {
            return Ok(shared.clone());
        }
        let shared = Arc::new(Self::create(bootstrap, properties, send_timeout, mock)?);
        let runtime = crate::runtime::handle().map_err(KafkaError::Runtime)?;
        runtime.spawn(shared.clone().warm_up());
        pool.push(shared.clone());
        Ok(shared)
    }

    fn create(
        bootstrap: &str,
        properties: &[(String, String)],
        send_timeout: Duration,
        mock: bool,
    ) -> Result<Self, KafkaError> {
        let cluster_changed = Arc::new(OnceLock::new());
        let ready = Arc::new(watch::Sender::new(None));
        let refused = Arc::new(Mutex::new(None));
        let timeout_ms = send_timeout.as_millis().max(1).to_string();
        let mut settings = ClientConfig::new();
        settings
            .set("bootstrap.servers", bootstrap)
            .set("enable.idempotence", "true")
            .set("message.timeout.ms", &timeout_ms)
            .set("linger.ms", "1")
            // The queue size for /metrics.
            .set("statistics.interval.ms", super::STATISTICS_INTERVAL_MS);
        super::settings::apply(&mut settings, properties);
        let inner = settings
            .create_with_context(ProducerContext {
                cluster_changed: cluster_changed.clone(),
                name: format!("producer for {bootstrap} with send_timeout {send_timeout:?}"),
                refused: refused.clone(),
                ready: ready.clone(),
                metrics: crate::metrics::producer(),
            })
            .map_err(|source| KafkaError::Create {
                what: "producer",
                source,
            })?;
        Ok(Self {
            bootstrap: bootstrap.to_owned(),
            properties: properties.to_vec(),
            send_timeout,
            mock,
            inner,
            cluster_changed,
            ready,
            refused,
            known_topics: Mutex::new(HashSet::new()),
        })
    }

    /// Start-up work, so that the application's first send is not slowed by it. librdkafka's
    /// idempotent producer asks for its producer id when it is created, finds no broker connected
    /// yet, and tries again only 500 ms later (once more after another 500 ms if the connection
    /// is still not up). A metadata request brings the connection up. On the mock cluster, one
    /// record to an internal topic then waits until the producer id is there; on a real cluster
    /// nothing is written, and the first send may still include that wait.
    async fn warm_up(self: Arc<Self>) {
        let producer = self.clone();
        let connected = tokio::task::spawn_blocking(move || {
            producer.inner.client().fetch_metadata(None, START_UP_WAIT)
        })
        .await;
        let connected = match connected {
            Ok(Ok(_)) => {
                if self.mock {
                    self.probe().await;
                }
                true
            }
            Ok(Err(e)) => {
                tracing::debug!("producer warm-up: no broker answered yet ({e})");
                false
            }
            Err(e) => {
                tracing::debug!("producer warm-up did not finish ({e})");
                false
            }
        };
        self.ready.send_replace(Some(connected));
    }

    /// Writes one record to the mock cluster's internal topic and waits for its acknowledgement.
    async fn probe(&self) {
        let created =
            crate::kafka::mock::shared().and_then(|mock| mock.ensure_topic(WARM_UP_TOPIC, 1));
        if let Err(e) = created {
            tracing::debug!("producer warm-up: {e}");
            return;
        }
        let acks = Acks::register(1);
        let record: BaseRecord<'_, [u8], [u8], usize> =
            BaseRecord::with_opaque_to(WARM_UP_TOPIC, acks.opaque(0)).payload(b"{}".as_slice());
        if let Err((e, _)) = self.inner.send(record) {
            tracing::debug!("producer warm-up: the probe record was not queued ({e})");
            return;
        }
        acks.wait(Instant::now() + START_UP_WAIT).await;
        if let Some(Some(Err(e))) = acks.take().pop() {
            tracing::debug!("producer warm-up: the probe record was not delivered ({e:?})");
        }
    }

    /// Whether a send to `topic` can be queued at once: the start-up work found a broker and
    /// `topic`'s metadata was asked for (see [`Shared::prepare`]).
    fn prepared(&self, topic: &str) -> bool {
        *self.ready.borrow() == Some(true)
            && self
                .known_topics
                .lock()
                .is_ok_and(|known| known.contains(topic))
    }

    /// The cluster's last refusal of this producer, if any.
    fn refusal(&self) -> Option<String> {
        self.refused.lock().ok().and_then(|r| r.clone())
    }

    /// Waits (bounded) for the start-up work, and asks once for `topic`'s metadata, so that the
    /// send's clock starts with a producer that knows where to write.
    /// Skipped when no broker answered the start-up request: the send then fails on its own clock.
    /// Once started and the topic known, this is a read of the start-up state and one lookup:
    /// no timer, no allocation.
    async fn prepare(self: &Arc<Self>, topic: &str) {
        let started = *self.ready.borrow();
        let connected = match started {
            Some(connected) => connected,
            None => {
                let mut ready = self.ready.subscribe();
                tokio::time::timeout(START_UP_WAIT, ready.wait_for(Option::is_some))
                    .await
                    .is_ok_and(|r| r.is_ok_and(|r| *r == Some(true)))
            }
        };
        if !connected {
            return;
        }
        let first = self
            .known_topics
            .lock()
            .map(|mut known| !known.contains(topic) && known.insert(topic.to_owned()))
            .unwrap_or(false);
        if !first {
            return;
        }
        let producer = self.clone();
        let name = topic.to_owned();
        let fetched = tokio::task::spawn_blocking(move || {
            producer
                .inner
                .client()
                .fetch_metadata(Some(&name), START_UP_WAIT)
        })
        .await;
        if let Ok(Err(e)) = fetched {
            tracing::debug!("no metadata for topic {topic:?} yet ({e})");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Waits for what a callback send reports: whether its one record was acknowledged, and
    /// whether a report came at all.
    fn reported(acks: Registration, deadline: Instant) -> (bool, bool) {
        let (tx, rx) = std::sync::mpsc::channel();
        acks.call_when_done(
            deadline,
            Box::new(move |mut outcomes| {
                let outcome = outcomes.pop().flatten();
                let _ = tx.send((matches!(outcome, Some(Ok(_))), outcome.is_some()));
            }),
        );
        rx.recv_timeout(Duration::from_secs(10))
            .expect("the callback ran")
    }

    #[test]
    fn a_report_that_came_before_the_callback_was_set_is_not_lost() {
        let acks = Acks::register(1);
        acks.settle(
            0,
            Ok(Delivery {
                partition: 0,
                offset: 7,
            }),
        );
        assert_eq!(
            reported(acks, Instant::now() + Duration::from_secs(60)),
            (true, true)
        );
    }

    #[test]
    fn a_report_that_never_comes_is_given_up_by_the_sweeper_at_the_deadline() {
        let acks = Acks::register(1);
        let id = acks.id;
        assert_eq!(
            reported(acks, Instant::now() + Duration::from_millis(50)),
            (false, false)
        );
        // The send is no longer registered: a late report finds nothing.
        let waiting = WAITING.lock().unwrap_or_else(|p| p.into_inner());
        assert!(waiting.as_ref().is_none_or(|w| !w.contains_key(&id)));
    }
}
