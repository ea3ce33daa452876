//! Helpers for tests and benchmarks: a raw producer that writes records the way any other
//! producer could (no key, any bytes, a chosen partition), without waiting per record.

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer as _, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;

use crate::kafka::KafkaError;

/// A fire-and-forget producer; `flush` waits for every record.
pub struct RawProducer {
    /// librdkafka's producer with its own polling thread.
    inner: ThreadedProducer<DefaultProducerContext>,
}

impl RawProducer {
    /// A producer for `bootstrap` that batches for up to 5 ms.
    pub fn new(bootstrap: &str) -> Result<Self, KafkaError> {
        Self::with_linger(bootstrap, 5)
    }

    /// A producer for `bootstrap` that batches for up to `linger_ms` (0: sends at once).
    pub fn with_linger(bootstrap: &str, linger_ms: u32) -> Result<Self, KafkaError> {
        let inner = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("linger.ms", linger_ms.to_string())
            .set("queue.buffering.max.messages", "1000000")
            .create()
            .map_err(|source| KafkaError::Create {
                what: "raw producer",
                source,
            })?;
        Ok(Self { inner })
    }

    /// Queues one record, waiting for room when the local queue is full.
    pub fn produce(
        &self,
        topic: &str,
        partition: Option<i32>,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        headers: &[(String, Vec<u8>)],
    ) -> Result<(), String> {
        let mut owned = OwnedHeaders::new_with_capacity(headers.len());
        for (k, v) in headers {
            owned = owned.insert(Header {
                key: k,
                value: Some(v.as_slice()),
            });
        }
        let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic).headers(owned);
        if let Some(p) = partition {
            record = record.partition(p);
        }
        if let Some(k) = key {
            record = record.key(k);
        }
        if let Some(p) = payload {
            record = record.payload(p);
        }
        loop {
            match self.inner.send(record) {
                Ok(()) => return Ok(()),
                Err((e, back)) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull) => {
                    record = back;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((e, _)) => return Err(format!("could not produce to {topic:?}: {e}")),
            }
        }
    }

    /// Waits until every queued record was acknowledged.
    pub fn flush(&self, timeout: Duration) -> Result<(), String> {
        self.inner
            .flush(timeout)
            .map_err(|e| format!("flush failed: {e}"))
    }
}

/// Creates `topic` with `partitions` partitions (replication 1) on the cluster at `bootstrap`
/// and waits until its metadata shows every partition with a leader. An existing topic is fine.
pub fn create_topic(
    bootstrap: &str,
    topic: &str,
    partitions: i32,
    timeout: Duration,
) -> Result<(), String> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::consumer::{BaseConsumer, Consumer as _};

    let runtime = crate::runtime::handle()?;
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .map_err(|e| format!("could not create an admin client: {e}"))?;
    let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    let options = AdminOptions::new().operation_timeout(Some(timeout));
    let results = runtime
        .block_on(admin.create_topics([&new], &options))
        .map_err(|e| format!("could not create topic {topic:?}: {e}"))?;
    for result in results {
        match result {
            Ok(_) => {}
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => return Err(format!("could not create topic {name:?}: {code}")),
        }
    }
    let probe: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .map_err(|e| format!("could not create a metadata client: {e}"))?;
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Ok(metadata) = probe.fetch_metadata(Some(topic), Duration::from_secs(2)) {
            let ready = metadata.topics().iter().any(|t| {
                t.error().is_none()
                    && t.partitions().len() == usize::try_from(partitions).unwrap_or(0)
                    && t.partitions().iter().all(|p| p.leader() >= 0)
            });
            if ready {
                return Ok(());
            }
        }
        if std::time::Instant::now() > deadline {
            return Err(format!("topic {topic:?} has no leaders after {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Commits `offset` as `group`'s position in `topic`/`partition` on the cluster at `bootstrap`,
/// as a consumer of the group that finished everything below it would have.
pub fn commit_position(
    bootstrap: &str,
    group: &str,
    topic: &str,
    partition: i32,
    offset: i64,
) -> Result<(), String> {
    use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _};
    use rdkafka::{Offset, TopicPartitionList};

    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .map_err(|e| format!("could not create a consumer to commit with: {e}"))?;
    let mut list = TopicPartitionList::new();
    list.add_partition_offset(topic, partition, Offset::Offset(offset))
        .map_err(|e| e.to_string())?;
    consumer.commit(&list, CommitMode::Sync).map_err(|e| {
        format!("could not commit {group}'s position {offset} in {topic}/{partition}: {e}")
    })
}

/// A record as read back by [`read_topic`].
#[derive(Debug, Clone)]
pub struct RawRecord {
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Key bytes, if any.
    pub key: Option<Vec<u8>>,
    /// Payload bytes, if any.
    pub payload: Option<Vec<u8>>,
    /// Headers in order (a header without value has an empty one).
    pub headers: Vec<(String, Vec<u8>)>,
}

/// Reads `topic` from the beginning, without a consumer group, until `count` records arrived
/// or `timeout` passed; returns what it read. For tests that inspect records byte for byte.
pub fn read_topic(
    bootstrap: &str,
    topic: &str,
    count: usize,
    timeout: Duration,
) -> Result<Vec<RawRecord>, String> {
    use rdkafka::consumer::{BaseConsumer, Consumer as _};
    use rdkafka::message::{Headers as _, Message as _};
    use rdkafka::{Offset, TopicPartitionList};

    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "prosody-test-reader")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .create()
        .map_err(|e| e.to_string())?;
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(|e| e.to_string())?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    let mut list = TopicPartitionList::new();
    for p in partitions {
        list.add_partition_offset(topic, p, Offset::Beginning)
            .map_err(|e| e.to_string())?;
    }
    consumer.assign(&list).map_err(|e| e.to_string())?;
    let deadline = std::time::Instant::now() + timeout;
    let mut out = Vec::new();
    while out.len() < count && std::time::Instant::now() < deadline {
        let Some(result) = consumer.poll(Duration::from_millis(50)) else {
            continue;
        };
        let Ok(m) = result else {
            continue;
        };
        let headers = m
            .headers()
            .map(|hs| {
                hs.iter()
                    .map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec()))
                    .collect()
            })
            .unwrap_or_default();
        out.push(RawRecord {
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().map(<[u8]>::to_vec),
            headers,
        });
    }
    Ok(out)
}

/// Consumers for reading watermarks, by bootstrap servers.
type Watchers = std::sync::Mutex<
    std::collections::HashMap<String, std::sync::Arc<rdkafka::consumer::BaseConsumer>>,
>;

/// The process's watermark readers (see [`watcher`]).
static WATCHERS: crate::process::PerProcess<Watchers> = crate::process::PerProcess::new();

/// Drops the watermark reader of `bootstrap` (a retired mock cluster's).
pub(crate) fn forget(bootstrap: &str) {
    if let Some(watchers) = WATCHERS.get() {
        watchers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(bootstrap);
    }
}

/// A consumer for reading watermarks, one per bootstrap servers for the process (made on first
/// use): the testing kit asks often, and a new client per question would take its connection
/// time each time.
fn watcher(bootstrap: &str) -> Result<std::sync::Arc<rdkafka::consumer::BaseConsumer>, String> {
    use std::sync::Arc;
    let watchers = WATCHERS.get_or_default();
    let mut watchers = watchers
        .lock()
        .map_err(|_| "watermark readers poisoned".to_owned())?;
    if let Some(watcher) = watchers.get(bootstrap) {
        return Ok(watcher.clone());
    }
    let watcher: rdkafka::consumer::BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "prosody-test-watermarks")
        .set("enable.auto.commit", "false")
        .create()
        .map_err(|e| e.to_string())?;
    let watcher = Arc::new(watcher);
    watchers.insert(bootstrap.to_owned(), watcher.clone());
    Ok(watcher)
}

/// Each partition of `topic` with its high watermark (the offset the next record gets); empty
/// when the topic does not exist.
pub fn high_watermarks(
    bootstrap: &str,
    topic: &str,
    timeout: Duration,
) -> Result<Vec<(i32, i64)>, String> {
    use rdkafka::consumer::Consumer as _;
    let watcher = watcher(bootstrap)?;
    let metadata = watcher
        .fetch_metadata(Some(topic), timeout)
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for t in metadata.topics() {
        if t.error().is_some() {
            continue;
        }
        for p in t.partitions() {
            let (_, high) = watcher
                .fetch_watermarks(topic, p.id(), timeout)
                .map_err(|e| e.to_string())?;
            out.push((p.id(), high));
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// Every record of `topic` written so far (up to its high watermarks when called), partition by
/// partition in offset order.
pub fn read_all(bootstrap: &str, topic: &str, timeout: Duration) -> Result<Vec<RawRecord>, String> {
    let high = high_watermarks(bootstrap, topic, timeout)?;
    let count = high
        .iter()
        .map(|(_, h)| usize::try_from(*h).unwrap_or(0))
        .sum();
    if count == 0 {
        return Ok(Vec::new());
    }
    let mut records = read_topic(bootstrap, topic, count, timeout)?;
    if records.len() < count {
        return Err(format!(
            "read {} of the {count} records of {topic:?} within {timeout:?}",
            records.len()
        ));
    }
    records.sort_by_key(|r| (r.partition, r.offset));
    Ok(records)
}

/// A consumed message built from parts, decoded exactly as the poll thread decodes a record
/// (for unit tests of handlers); an undecodable payload is an error.
#[allow(clippy::too_many_arguments)]
pub fn message(
    topic: &str,
    partition: i32,
    offset: i64,
    key: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
    headers: &[(String, Vec<u8>)],
    timestamp_ms: Option<i64>,
) -> Result<crate::event::ConsumedMessage, String> {
    let mut owned = OwnedHeaders::new_with_capacity(headers.len());
    for (name, value) in headers {
        owned = owned.insert(Header {
            key: name,
            value: Some(value.as_slice()),
        });
    }
    let timestamp = timestamp_ms.map_or(rdkafka::Timestamp::NotAvailable, |ms| {
        rdkafka::Timestamp::CreateTime(ms)
    });
    let record = rdkafka::message::OwnedMessage::new(
        payload,
        key,
        topic.to_owned(),
        timestamp,
        partition,
        offset,
        Some(owned),
    );
    crate::event::ConsumedMessage::decode(std::sync::Arc::from(topic), record, false)
        .map_err(|undecodable| undecodable.reason)
}

/// A job for a timer event of `key` (the cheapest event to build), reporting to `done`; for
/// scheduler tests and benchmarks.
pub fn timer_job(
    key: &crate::event::Key,
    done: &tokio::sync::mpsc::UnboundedSender<crate::handler::Finished>,
    class: crate::scheduler::Class,
) -> crate::handler::Job {
    use crate::event::{Event, TimerEvent};
    static TOPIC: std::sync::OnceLock<std::sync::Arc<str>> = std::sync::OnceLock::new();
    let event = Event::Timer(TimerEvent {
        topic: TOPIC.get_or_init(|| std::sync::Arc::from("test")).clone(),
        partition: 0,
        key: key.clone(),
        time: 0,
    });
    let job = crate::handler::Job::new(
        event,
        crate::cancel::CancelToken::new(),
        crate::cancel::CancelToken::new(),
        None,
        done.clone(),
        Some(key.clone()),
        crate::handler::Slot::Timer(0),
    );
    match class {
        crate::scheduler::Class::Fresh => job,
        crate::scheduler::Class::Retry => job.retry(),
    }
}
