//! What a handler receives: a decoded Kafka message (timers join in a later feature).

use std::sync::Arc;

use rdkafka::message::{Headers, Message as _, OwnedMessage};
use serde_json::Value;

/// Header that names the system which produced a record.
pub const SOURCE_SYSTEM_HEADER: &str = "source-system";

/// A key for log lines: `"the-key"` (quoted, as Ruby shows it), or `nil` for a keyless record.
pub fn show_key(key: Option<&str>) -> String {
    key.map_or_else(|| "nil".to_owned(), |k| format!("{k:?}"))
}

/// A consumed record with its payload decoded from JSON.
#[derive(Debug, Clone)]
pub struct ConsumedMessage {
    /// Topic it was read from.
    pub topic: Arc<str>,
    /// Partition it was read from.
    pub partition: i32,
    /// Offset within the partition.
    pub offset: i64,
    /// Milliseconds since the epoch (create or log-append time), when the broker gave one.
    pub timestamp_ms: Option<i64>,
    /// The record key; `None` for records produced without a key (they share one queue per
    /// partition and so keep their offset order among themselves).
    pub key: Option<Arc<str>>,
    /// The decoded JSON payload; a record with no value (a tombstone) decodes to `null`.
    pub payload: Value,
    /// Headers as UTF-8 strings (invalid UTF-8 replaced, a header without value is `""`).
    pub headers: Vec<(String, String)>,
    /// The record as read, for the dead-letter topic (its exact key, payload and headers); kept
    /// only when a failure topic is configured.
    pub raw: Option<OwnedMessage>,
}

/// A record whose payload could not be decoded, with enough context to report it.
#[derive(Debug)]
pub struct Undecodable {
    /// Offset of the record.
    pub offset: i64,
    /// Key of the record.
    pub key: Option<Arc<str>>,
    /// Why decoding failed.
    pub reason: String,
    /// The record as read.
    pub raw: OwnedMessage,
}

impl ConsumedMessage {
    /// Decodes a record read by the poll thread, keeping the record itself when `keep_raw`.
    /// Fails only on an invalid JSON payload (the record is always returned then).
    pub fn decode(
        topic: Arc<str>,
        record: OwnedMessage,
        keep_raw: bool,
    ) -> Result<Self, Box<Undecodable>> {
        let key = record
            .key()
            .map(|k| Arc::<str>::from(String::from_utf8_lossy(k).as_ref()));
        let payload = match record.payload() {
            None => Value::Null,
            Some(bytes) => match serde_json::from_slice(bytes) {
                Ok(value) => value,
                Err(e) => {
                    return Err(Box::new(Undecodable {
                        offset: record.offset(),
                        key,
                        reason: format!("payload is not valid JSON ({e})"),
                        raw: record,
                    }))
                }
            },
        };
        let headers = record
            .headers()
            .map(|hs| {
                hs.iter()
                    .map(|h| {
                        let value = h.value.map(String::from_utf8_lossy).unwrap_or_default();
                        (h.key.to_owned(), value.into_owned())
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(Self {
            topic,
            partition: record.partition(),
            offset: record.offset(),
            timestamp_ms: record.timestamp().to_millis(),
            key,
            payload,
            headers,
            raw: keep_raw.then_some(record),
        })
    }

    /// The value of the first header with this name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A timer that came due.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimerEvent {
    /// Topic of the partition the timer belongs to.
    pub topic: Arc<str>,
    /// Partition the timer belongs to.
    pub partition: i32,
    /// The key the timer belongs to.
    pub key: Arc<str>,
    /// When it was scheduled for, in seconds since the epoch.
    pub time: i64,
}

/// An event a handler runs for.
#[derive(Debug)]
pub enum Event {
    /// A Kafka message, shared with its partition worker (which keeps it for retries and the
    /// dead-letter topic).
    Message(Arc<ConsumedMessage>),
    /// A timer that came due.
    Timer(TimerEvent),
}
