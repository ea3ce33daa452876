//! The dead-letter record: the failed record's key and payload, unchanged, its original headers,
//! and headers saying where it came from and why it failed.

use std::sync::Arc;

use rdkafka::message::{Headers, Message as _, OwnedMessage};

use super::Reason;
use crate::handler::Failure;
use crate::kafka::producer::{Producer, RawRecord, SendError};

/// Topic the record was read from.
pub const SOURCE_TOPIC: &str = "prosody-dlq-source-topic";
/// Its partition.
pub const SOURCE_PARTITION: &str = "prosody-dlq-source-partition";
/// Its offset.
pub const SOURCE_OFFSET: &str = "prosody-dlq-source-offset";
/// Its timestamp, milliseconds since the epoch (absent when the broker gave none).
pub const SOURCE_TIMESTAMP: &str = "prosody-dlq-source-timestamp";
/// The `source-system` header it arrived with (the dead-letter record carries this client's).
pub const SOURCE_SYSTEM: &str = "prosody-dlq-source-system";
/// The consumer group that gave up on it.
pub const CONSUMER_GROUP: &str = "prosody-dlq-consumer-group";
/// Why: `permanent`, `retries_exhausted` or `undecodable`.
pub const REASON: &str = "prosody-dlq-reason";
/// Class of the last exception (`Prosody::UndecodablePayload` for an undecodable payload).
pub const ERROR_CLASS: &str = "prosody-dlq-error-class";
/// Message of the last exception.
pub const ERROR_MESSAGE: &str = "prosody-dlq-error-message";
/// First lines of its backtrace.
pub const ERROR_BACKTRACE: &str = "prosody-dlq-error-backtrace";
/// How many times the handler ran.
pub const ATTEMPTS: &str = "prosody-dlq-attempts";

/// Where dead letters go.
pub struct DeadLetters {
    /// The failure topic.
    pub topic: String,
    /// The consumer group, for the header.
    pub group: String,
    /// The client's producer.
    pub producer: Arc<Producer>,
}

impl DeadLetters {
    /// Sends `record`'s key and payload with `headers` (from [`dead_letter_headers`]).
    pub async fn send(
        &self,
        record: &OwnedMessage,
        headers: &[(String, Vec<u8>)],
    ) -> Result<(), SendError> {
        self.producer
            .send_raw(RawRecord {
                topic: &self.topic,
                key: record.key(),
                payload: record.payload(),
                headers,
                partition: None,
            })
            .await
            .map(|_| ())
    }
}

/// The headers of a dead-letter record: every original header in order (the original
/// `source-system` is renamed, as the producer stamps its own), then the `prosody-dlq-*` ones.
pub fn dead_letter_headers(
    record: &OwnedMessage,
    group: &str,
    reason: Reason,
    failure: &Failure,
    attempts: u32,
) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = Vec::new();
    if let Some(headers) = record.headers() {
        for h in headers.iter() {
            let value = h.value.unwrap_or_default().to_vec();
            if h.key == crate::event::SOURCE_SYSTEM_HEADER {
                out.push((SOURCE_SYSTEM.to_owned(), value));
            } else {
                out.push((h.key.to_owned(), value));
            }
        }
    }
    let mut add = |k: &str, v: String| out.push((k.to_owned(), v.into_bytes()));
    add(SOURCE_TOPIC, record.topic().to_owned());
    add(SOURCE_PARTITION, record.partition().to_string());
    add(SOURCE_OFFSET, record.offset().to_string());
    if let Some(ms) = record.timestamp().to_millis() {
        add(SOURCE_TIMESTAMP, ms.to_string());
    }
    add(CONSUMER_GROUP, group.to_owned());
    add(REASON, reason.as_str().to_owned());
    add(ERROR_CLASS, failure.error_class.clone());
    add(ERROR_MESSAGE, failure.message.clone());
    if !failure.backtrace.is_empty() {
        add(ERROR_BACKTRACE, failure.backtrace.clone());
    }
    add(ATTEMPTS, attempts.to_string());
    out
}
