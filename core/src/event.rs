//! What a handler receives: a decoded Kafka message (timers join in a later feature).

use std::sync::Arc;

use rdkafka::message::{Headers, Message as _, OwnedMessage};

use crate::payload::Payload;

/// Header that names the system which produced a record.
pub const SOURCE_SYSTEM_HEADER: &str = "source-system";

/// A record key: bytes, exactly as the producer wrote them. Keys that differ in any byte are
/// different keys (in ordering, timers and the handler's `message.key`), UTF-8 or not.
pub type Key = Arc<[u8]>;

/// A key for log lines: `"the-key"` (quoted), bytes that are not UTF-8 escaped as `"\xFF"`, or
/// `nil` for a keyless record.
pub fn show_key(key: Option<&[u8]>) -> String {
    match key {
        None => "nil".to_owned(),
        Some(bytes) => match std::str::from_utf8(bytes) {
            Ok(text) => format!("{text:?}"),
            Err(_) => format!("\"{}\"", bytes.escape_ascii()),
        },
    }
}

/// A consumed record with its JSON payload checked.
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
    pub key: Option<Key>,
    /// The JSON payload, checked; a record with no value (a tombstone) has `null`.
    pub payload: Payload,
    /// Whether the record has no value at all (a tombstone), as opposed to a JSON `null`.
    pub tombstone: bool,
    /// Headers: names as text, values as bytes exactly as written (a header without value is
    /// empty).
    pub headers: Vec<(String, Vec<u8>)>,
    /// The record as read, for the dead-letter topic (its exact key, payload and headers); kept
    /// only when a failure topic is configured.
    pub raw: Option<OwnedMessage>,
    /// The message's trace context: its `process` span when spans are exported (set when its
    /// record is read), else the context its headers carry (empty when none).
    pub trace: opentelemetry::Context,
}

/// A record whose payload could not be decoded, with enough context to report it.
#[derive(Debug)]
pub struct Undecodable {
    /// Offset of the record.
    pub offset: i64,
    /// Key of the record.
    pub key: Option<Key>,
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
        let key = record.key().map(Key::from);
        let payload = match record.payload() {
            None => Payload::null(),
            Some(bytes) => match Payload::parse(bytes) {
                Ok(payload) => payload,
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
                    .map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec()))
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
            tombstone: record.payload().is_none(),
            headers,
            raw: keep_raw.then_some(record),
            trace: opentelemetry::Context::new(),
        })
    }

    /// Where it came from, for its spans.
    pub fn origin(&self) -> crate::spans::Origin<'_> {
        crate::spans::Origin {
            topic: &self.topic,
            partition: self.partition,
            offset: self.offset,
            key: self.key.as_deref(),
        }
    }

    /// The value of the first header with this name.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_slice())
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
    pub key: Key,
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

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::Timestamp;

    fn record(payload: Option<&[u8]>) -> OwnedMessage {
        OwnedMessage::new(
            payload.map(<[u8]>::to_vec),
            Some(b"k".to_vec()),
            "t".into(),
            Timestamp::NotAvailable,
            0,
            7,
            None,
        )
    }

    #[test]
    fn a_record_without_value_is_a_tombstone_and_json_null_is_not() {
        let decode = |payload| ConsumedMessage::decode("t".into(), record(payload), false);
        let tombstone = decode(None).ok().map(|m| (m.tombstone, m.payload));
        assert_eq!(tombstone, Some((true, Payload::null())));
        let null = decode(Some(b"null")).ok().map(|m| (m.tombstone, m.payload));
        assert_eq!(null, Some((false, Payload::null())));
    }
}
