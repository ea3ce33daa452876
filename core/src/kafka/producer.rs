//! The idempotent producer behind `send_message`.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer as _};
use rdkafka::types::RDKafkaErrorCode;
use thiserror::Error;
use tokio::sync::watch;
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
        Self {
            topic: record.topic.clone(),
            key: crate::event::show_key(Some(&record.key)),
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
}

/// A librdkafka producer shared by the clients of a process.
struct Shared {
    /// `bootstrap.servers`, part of the pool key.
    bootstrap: String,
    /// Longest a send waits for the acknowledgement, part of the pool key.
    send_timeout: Duration,
    /// Whether `bootstrap` is the in-process mock cluster.
    mock: bool,
    /// librdkafka's producer; its own threads do the network work.
    inner: FutureProducer<ProducerContext>,
    /// Set (by librdkafka's log callback) when the cluster behind `bootstrap` changed.
    cluster_changed: Arc<OnceLock<String>>,
    /// `None` during the start-up work (see [`Shared::warm_up`]), then whether a broker answered.
    ready: watch::Sender<Option<bool>>,
    /// Topics whose metadata this producer has asked for, so it knows their leaders.
    known_topics: Mutex<HashSet<String>>,
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
    /// The process's producer for `bootstrap` and `send_timeout`, created (and warmed up in the
    /// background) on first use. `mock` says that `bootstrap` is the in-process mock cluster.
    pub fn new(
        bootstrap: &str,
        source_system: &str,
        send_timeout: Duration,
        mock: bool,
    ) -> Result<Self, KafkaError> {
        Ok(Self {
            shared: Mutex::new(Shared::pooled(bootstrap, send_timeout, mock)?),
            source_system: source_system.to_owned(),
        })
    }

    /// The librdkafka producer to send with: the pooled one, replaced first when it saw the
    /// cluster change (its producer id and sequence numbers belong to the old cluster, so every
    /// send would fail).
    fn current(&self) -> Arc<Shared> {
        // A poisoned lock only means a panic elsewhere; the producer in it is still usable.
        let mut shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        if shared.cluster_changed.get().is_some() {
            match Shared::pooled(&shared.bootstrap, shared.send_timeout, shared.mock) {
                Ok(fresh) => *shared = fresh,
                Err(e) => log::error!("could not replace the producer: {e}"),
            }
        }
        shared.clone()
    }

    /// Sends one record and waits for the broker's acknowledgement or `send_timeout`.
    pub async fn send(&self, record: &Record) -> Result<Delivery, SendError> {
        self.send_raw(record.as_raw()).await
    }

    /// Sends every record at once and waits once: all are queued in order (records of one
    /// partition are written in that order), then every acknowledgement is awaited. Returns one
    /// result per record, in order; a failed record does not stop the others.
    pub async fn send_batch(&self, records: &[Record]) -> Vec<Result<Delivery, SendError>> {
        let shared = self.current();
        let mut prepared: HashSet<&str> = HashSet::new();
        for record in records {
            if prepared.insert(&record.topic) {
                shared.prepare(&record.topic).await;
            }
        }
        let mut queued = Vec::with_capacity(records.len());
        for record in records {
            queued.push(self.enqueue(&shared, record.as_raw()).await);
        }
        let mut results = Vec::with_capacity(records.len());
        for (record, queued) in records.iter().zip(queued) {
            results.push(settle(queued, &shared, record.as_raw()).await);
        }
        results
    }

    /// Sends a record given as bytes (a missing key or payload stays missing). Every header is
    /// kept except `source-system`, which this producer sets itself.
    pub async fn send_raw(&self, record: RawRecord<'_>) -> Result<Delivery, SendError> {
        let shared = self.current();
        shared.prepare(record.topic).await;
        let queued = self.enqueue(&shared, record).await;
        settle(queued, &shared, record).await
    }

    /// Hands `record` to librdkafka's queue, waiting (without blocking a thread) while that
    /// queue is full, at most `send_timeout`.
    async fn enqueue(&self, shared: &Shared, record: RawRecord<'_>) -> Result<Queued, String> {
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
        let mut future: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(record.topic).headers(headers);
        if let Some(key) = record.key {
            future = future.key(key);
        }
        if let Some(payload) = record.payload {
            future = future.payload(payload);
        }
        if let Some(partition) = record.partition {
            future = future.partition(partition);
        }
        // One clock read per record; a record that waited for room reads it again.
        let started = Instant::now();
        let mut now = started;
        loop {
            match shared.inner.send_result(future) {
                Ok(delivery) => {
                    return Ok(Queued {
                        delivery,
                        deadline: now + shared.send_timeout + OUTER_MARGIN,
                    })
                }
                Err((
                    rdkafka::error::KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull),
                    back,
                )) => {
                    if now >= started + shared.send_timeout {
                        return Err(format!(
                            "librdkafka's send queue stayed full for send_timeout ({:?})",
                            shared.send_timeout
                        ));
                    }
                    future = back;
                    tokio::time::sleep(QUEUE_FULL_PAUSE).await;
                    now = Instant::now();
                }
                Err((e, _)) => return Err(e.to_string()),
            }
        }
    }
}

/// How long a send waits before trying again to queue a record while librdkafka's queue is full.
const QUEUE_FULL_PAUSE: Duration = Duration::from_millis(5);

/// librdkafka fails an unacknowledged record after `message.timeout.ms` (= `send_timeout`); this
/// outer bound, a little later, covers a delivery report that never comes.
const OUTER_MARGIN: Duration = Duration::from_millis(250);

/// A record in librdkafka's queue: its delivery report, and when to stop waiting for it.
struct Queued {
    delivery: DeliveryFuture,
    deadline: Instant,
}

/// Waits for a queued record's acknowledgement.
async fn settle(
    queued: Result<Queued, String>,
    shared: &Shared,
    record: RawRecord<'_>,
) -> Result<Delivery, SendError> {
    let fail = |reason: String| SendError {
        topic: record.topic.to_owned(),
        key: crate::event::show_key(record.key),
        reason,
    };
    let queued = queued.map_err(fail)?;
    let send_timeout = shared.send_timeout;
    match tokio::time::timeout_at(queued.deadline, queued.delivery).await {
        Err(_) => Err(fail(format!(
            "no acknowledgement within send_timeout ({send_timeout:?})"
        ))),
        Ok(Err(_)) => Err(fail("the producer went away before the acknowledgement".into())),
        Ok(Ok(Err((e, _)))) => Err(fail(match e.rdkafka_error_code() {
            Some(RDKafkaErrorCode::MessageTimedOut) => format!(
                "no acknowledgement within send_timeout ({send_timeout:?}); is the broker reachable?"
            ),
            _ => e.to_string(),
        })),
        Ok(Ok(Ok(d))) => Ok(Delivery {
            partition: d.partition,
            offset: d.offset,
        }),
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
    fn as_raw(&self) -> RawRecord<'_> {
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
        send_timeout: Duration,
        mock: bool,
    ) -> Result<Arc<Self>, KafkaError> {
        let pool = POOL.get_or_try_init(|| Ok::<_, KafkaError>(Mutex::new(Vec::new())))?;
        let mut pool = pool
            .lock()
            .map_err(|_| KafkaError::Runtime("producer pool poisoned".into()))?;
        pool.retain(|p| p.cluster_changed.get().is_none());
        if let Some(shared) = pool
            .iter()
            .find(|p| p.bootstrap == bootstrap && p.send_timeout == send_timeout)
        {
            return Ok(shared.clone());
        }
        let shared = Arc::new(Self::create(bootstrap, send_timeout, mock)?);
        let runtime = crate::runtime::handle().map_err(KafkaError::Runtime)?;
        runtime.spawn(shared.clone().warm_up());
        pool.push(shared.clone());
        Ok(shared)
    }

    fn create(bootstrap: &str, send_timeout: Duration, mock: bool) -> Result<Self, KafkaError> {
        let cluster_changed = Arc::new(OnceLock::new());
        let timeout_ms = send_timeout.as_millis().max(1).to_string();
        let inner = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("enable.idempotence", "true")
            .set("message.timeout.ms", &timeout_ms)
            .set("linger.ms", "1")
            .create_with_context(ProducerContext {
                cluster_changed: cluster_changed.clone(),
                name: format!("producer for {bootstrap} with send_timeout {send_timeout:?}"),
            })
            .map_err(|source| KafkaError::Create {
                what: "producer",
                source,
            })?;
        Ok(Self {
            bootstrap: bootstrap.to_owned(),
            send_timeout,
            mock,
            inner,
            cluster_changed,
            ready: watch::Sender::new(None),
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
        let producer = self.inner.clone();
        let connected = tokio::task::spawn_blocking(move || {
            producer.client().fetch_metadata(None, START_UP_WAIT)
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
                log::debug!("producer warm-up: no broker answered yet ({e})");
                false
            }
            Err(e) => {
                log::debug!("producer warm-up did not finish ({e})");
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
            log::debug!("producer warm-up: {e}");
            return;
        }
        let record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(WARM_UP_TOPIC).payload(b"{}".as_slice());
        if let Err((e, _)) = self.inner.send(record, START_UP_WAIT).await {
            log::debug!("producer warm-up: the probe record was not delivered ({e})");
        }
    }

    /// Waits (bounded) for the start-up work, and asks once for `topic`'s metadata, so that the
    /// send's clock starts with a producer that knows where to write.
    /// Skipped when no broker answered the start-up request: the send then fails on its own clock.
    /// Once started and the topic known, this is a read of the start-up state and one lookup:
    /// no timer, no allocation.
    async fn prepare(&self, topic: &str) {
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
        let producer = self.inner.clone();
        let name = topic.to_owned();
        let fetched = tokio::task::spawn_blocking(move || {
            producer.client().fetch_metadata(Some(&name), START_UP_WAIT)
        })
        .await;
        if let Ok(Err(e)) = fetched {
            log::debug!("no metadata for topic {topic:?} yet ({e})");
        }
    }
}
