//! The idempotent producer behind `send_message`.

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use thiserror::Error;

use super::KafkaError;
use crate::event::SOURCE_SYSTEM_HEADER;

/// Why a record was not delivered.
#[derive(Debug, Error)]
#[error("could not send to topic {topic:?} (key {key:?}): {reason}")]
pub struct SendError {
    /// Destination topic.
    pub topic: String,
    /// Record key.
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

/// An idempotent producer that stamps every record with the `source-system` header.
pub struct Producer {
    /// librdkafka's producer; its own threads do the network work.
    inner: FutureProducer,
    /// Value of the `source-system` header.
    source_system: String,
    /// Longest a send waits for the acknowledgement.
    send_timeout: Duration,
}

impl Producer {
    /// Creates the producer (it connects lazily).
    pub fn new(
        bootstrap: &str,
        source_system: &str,
        send_timeout: Duration,
    ) -> Result<Self, KafkaError> {
        let timeout_ms = send_timeout.as_millis().max(1).to_string();
        let inner = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("enable.idempotence", "true")
            .set("message.timeout.ms", &timeout_ms)
            .set("linger.ms", "1")
            .create()
            .map_err(|source| KafkaError::Create {
                what: "producer",
                source,
            })?;
        Ok(Self {
            inner,
            source_system: source_system.to_owned(),
            send_timeout,
        })
    }

    /// Connects in the background so the first send does not pay for it. librdkafka's idempotent
    /// producer waits a fixed 500 ms for a broker connection before it asks for its producer id;
    /// a metadata request brings connections up early, so the id is usually ready before the
    /// application's first `send_message`.
    pub fn warm_up(&self, runtime: &tokio::runtime::Handle) {
        let producer = self.inner.clone();
        let timeout = self.send_timeout.max(Duration::from_secs(5));
        runtime.spawn_blocking(move || {
            if let Err(e) = producer.client().fetch_metadata(None, timeout) {
                log::debug!("producer warm-up: no metadata yet ({e})");
            }
        });
    }

    /// Sends one record and waits for the broker's acknowledgement or `send_timeout`.
    pub async fn send(
        &self,
        topic: &str,
        key: &str,
        payload: &[u8],
        headers: &[(String, String)],
    ) -> Result<Delivery, SendError> {
        let headers = headers.iter().map(|(k, v)| (k.as_str(), v.as_bytes()));
        self.send_raw(topic, Some(key.as_bytes()), Some(payload), headers)
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
            key: key
                .map(|k| String::from_utf8_lossy(k).into_owned())
                .unwrap_or_default(),
            reason,
        };
        let sending = self.inner.send(record, self.send_timeout);
        // librdkafka enforces message.timeout.ms; this outer bound also covers a full local queue.
        match tokio::time::timeout(self.send_timeout + Duration::from_millis(250), sending).await {
            Err(_) => Err(fail(format!(
                "no acknowledgement within send_timeout ({:?})",
                self.send_timeout
            ))),
            Ok(Err((e, _))) => Err(fail(match e.rdkafka_error_code() {
                Some(rdkafka::types::RDKafkaErrorCode::MessageTimedOut) => format!(
                    "no acknowledgement within send_timeout ({:?}); is the broker reachable?",
                    self.send_timeout
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
