//! The idempotent producer behind `send_message`.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use thiserror::Error;
use tokio::sync::watch;

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
    pub async fn send(
        &self,
        topic: &str,
        key: &[u8],
        payload: &[u8],
        headers: &[(String, Vec<u8>)],
    ) -> Result<Delivery, SendError> {
        let headers = headers.iter().map(|(k, v)| (k.as_str(), v.as_slice()));
        self.send_raw(topic, Some(key), Some(payload), headers)
            .await
    }

    /// Sends a record given as bytes (a missing key or payload stays missing). Every header is
    /// kept except `source-system`, which this producer sets itself.
    pub async fn send_raw(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        headers: impl ExactSizeIterator<Item = (&str, &[u8])>,
    ) -> Result<Delivery, SendError> {
        let shared = self.current();
        shared.prepare(topic).await;
        let send_timeout = shared.send_timeout;
        let mut owned = OwnedHeaders::new_with_capacity(headers.len() + 1).insert(Header {
            key: SOURCE_SYSTEM_HEADER,
            value: Some(self.source_system.as_bytes()),
        });
        for (k, v) in headers {
            if k == SOURCE_SYSTEM_HEADER {
                continue;
            }
            owned = owned.insert(Header {
                key: k,
                value: Some(v),
            });
        }
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).headers(owned);
        if let Some(key) = key {
            record = record.key(key);
        }
        if let Some(payload) = payload {
            record = record.payload(payload);
        }
        let fail = |reason: String| SendError {
            topic: topic.to_owned(),
            key: crate::event::show_key(key),
            reason,
        };
        let sending = shared.inner.send(record, send_timeout);
        // librdkafka enforces message.timeout.ms; this outer bound also covers a full local queue.
        match tokio::time::timeout(send_timeout + Duration::from_millis(250), sending).await {
            Err(_) => Err(fail(format!(
                "no acknowledgement within send_timeout ({send_timeout:?})"
            ))),
            Ok(Err((e, _))) => Err(fail(match e.rdkafka_error_code() {
                Some(rdkafka::types::RDKafkaErrorCode::MessageTimedOut) => format!(
                    "no acknowledgement within send_timeout ({send_timeout:?}); is the broker reachable?"
                ),
                _ => e.to_string(),
            })),
            Ok(Ok(d)) => Ok(Delivery {
                partition: d.partition,
                offset: d.offset,
            }),
        }
    }
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
