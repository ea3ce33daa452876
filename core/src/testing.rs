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
    /// A producer for `bootstrap`.
    pub fn new(bootstrap: &str) -> Result<Self, KafkaError> {
        let inner = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("linger.ms", "5")
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
        headers: &[(String, String)],
    ) -> Result<(), String> {
        let mut owned = OwnedHeaders::new_with_capacity(headers.len());
        for (k, v) in headers {
            owned = owned.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
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
