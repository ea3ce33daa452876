//! Deferred retry (pipeline mode): a key whose message failed transiently is set aside so its
//! partition moves on.
//!
//! The failing message's offset is stored for its key together with the key's retry state
//! ([`Retry`]: failed attempts and when to try again), and the offset finishes, so the commit
//! position passes it. Later messages of the key are appended to its list without running. When
//! the retry is due, the partition worker re-reads the key's oldest offsets from Kafka
//! ([`crate::kafka::reload`]) and runs them in the key's queue, one after another; the key
//! leaves deferral when its list is empty. The store is the truth: a new owner of the partition
//! loads its deferred keys ([`DeferStore::load`]) and carries on.
//!
//! Stores implement [`DeferStore`]: [`memory::MemoryStore`] serves mock mode,
//! [`cassandra::CassandraStore`] production. [`gate::FailureRate`] switches deferral off for new
//! failures while most handler calls fail.

pub mod cassandra;
pub mod gate;
pub mod memory;

use std::time::Duration;

use thiserror::Error;

use crate::event::Key;
use crate::timers::{BoxFuture, Scope};

/// A Kafka offset.
pub type Offset = i64;

/// A deferred key's retry state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    /// Failed handler calls of the key's oldest deferred message so far.
    pub attempts: u32,
    /// When to try again, in milliseconds since the Unix epoch.
    pub due_ms: i64,
}

/// Why a defer store operation failed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("defer store: {0}")]
pub struct DeferError(pub String);

/// Deferred keys and their offsets, per consumer group's partition ([`Scope`]). Every operation
/// is acknowledged only once durable.
pub trait DeferStore: Send + Sync + 'static {
    /// Stores `offset` for `key` and sets the key's retry state, together: after a crash either
    /// both are there or neither is.
    fn defer<'a>(
        &'a self,
        scope: &'a Scope,
        key: &'a [u8],
        offset: Offset,
        retry: Retry,
    ) -> BoxFuture<'a, Result<(), DeferError>>;
    /// Adds `offset` to the key's list (an offset already there stays once).
    fn append<'a>(
        &'a self,
        scope: &'a Scope,
        key: &'a [u8],
        offset: Offset,
    ) -> BoxFuture<'a, Result<(), DeferError>>;
    /// Replaces the key's retry state.
    fn set_retry<'a>(
        &'a self,
        scope: &'a Scope,
        key: &'a [u8],
        retry: Retry,
    ) -> BoxFuture<'a, Result<(), DeferError>>;
    /// Removes one offset from the key's list.
    fn remove<'a>(
        &'a self,
        scope: &'a Scope,
        key: &'a [u8],
        offset: Offset,
    ) -> BoxFuture<'a, Result<(), DeferError>>;
    /// Up to `limit` offsets of the key above `after`, lowest first.
    fn offsets<'a>(
        &'a self,
        scope: &'a Scope,
        key: &'a [u8],
        after: Offset,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Offset>, DeferError>>;
    /// Forgets the key: its retry state and every offset written before `decided_us`
    /// (microseconds since the epoch, when the worker decided to release it), so a release
    /// retried after a failure never erases a deferral of the key written after that moment.
    fn release<'a>(
        &'a self,
        scope: &'a Scope,
        key: &'a [u8],
        decided_us: i64,
    ) -> BoxFuture<'a, Result<(), DeferError>>;
    /// Every deferred key of the scope (those with a retry state), in key order.
    fn load<'a>(&'a self, scope: &'a Scope)
        -> BoxFuture<'a, Result<Vec<(Key, Retry)>, DeferError>>;
}

/// The deferral settings of a client.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// Ceiling of the first deferred retry's delay (`defer_base`).
    pub base: Duration,
    /// Ceiling of any delay (`defer_max_delay`).
    pub max: Duration,
}

impl Backoff {
    /// The delay before retry number `retry` (1 = the first): with
    /// `ceiling = min(base · 2^(retry − 1), max)`, a uniformly random delay in
    /// `[ceiling / 2, ceiling]` ("equal jitter": keys that failed together spread out, and no
    /// retry comes much earlier than its ceiling).
    pub fn delay(&self, retry: u32) -> Duration {
        let ceiling = crate::failure::ceiling(self.base, self.max, retry);
        ceiling.mul_f64(0.5 + 0.5 * crate::failure::random_unit())
    }

    /// The retry state after `attempts` failed calls: due after [`Backoff::delay`], returned
    /// too.
    pub fn retry(&self, attempts: u32) -> (Retry, Duration) {
        let delay = self.delay(attempts);
        let due_ms = now_ms().saturating_add(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX));
        (Retry { attempts, due_ms }, delay)
    }
}

/// What a subscription needs to defer keys; present only in pipeline mode with `defer_enabled`
/// and a store (mock mode or `cassandra_nodes`).
pub struct Deferral {
    /// Where deferred keys and offsets are kept.
    pub store: std::sync::Arc<dyn DeferStore>,
    /// Re-reads deferred messages from Kafka.
    pub reloader: crate::kafka::reload::Reloader,
    /// Delay before each deferred retry.
    pub backoff: Backoff,
    /// Switches deferral off for new failures while most calls fail.
    pub gate: gate::FailureRate,
    /// Failed deferred retries after which a message is dead-lettered or skipped
    /// (`defer_max_retries`).
    pub max_retries: Option<u32>,
    /// Deferred keys whose offsets (and re-failed message) are kept in memory
    /// (`defer_cache_size`).
    pub cache_size: usize,
}

/// Microseconds since the Unix epoch, now.
pub fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_with_equal_jitter() {
        let b = Backoff {
            base: Duration::from_secs(1),
            max: Duration::from_secs(10),
        };
        for (retry, ceiling) in [
            (1, 1_000),
            (2, 2_000),
            (3, 4_000),
            (4, 8_000),
            (5, 10_000),
            (60, 10_000),
        ] {
            for _ in 0..200 {
                let d = b.delay(retry).as_millis();
                assert!(d >= ceiling / 2 && d <= ceiling, "retry {retry}: {d} ms");
            }
        }
    }
}
