//! Deduplication records in process memory (mock mode): shared by every mock-mode client of the
//! process, so a client created again in the same process (a "restart" in a spec) still skips
//! what an earlier one handled. Records expire after their TTL; the [`CAPACITY`] most recent
//! are kept (plenty for tests, and small enough to stay in the processor's caches: a million
//! records made every lookup a cache miss and cost a benchmark a tenth of its speed).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{expiry, DedupError, DedupStore, Fingerprint, Recent};
use crate::process::PerProcess;
use crate::timers::BoxFuture;

/// Records kept at most.
pub const CAPACITY: usize = 1 << 16;

/// Locks the records are split in (partitions on different threads rarely meet on one).
const SHARDS: usize = 16;

/// Fingerprints with their expiry, split by fingerprint.
pub struct MemoryStore {
    shards: Vec<Mutex<Recent>>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(Recent::new(CAPACITY / SHARDS)))
                .collect(),
        }
    }
}

/// Shared by every mock-mode client of the process; a forked child starts with an empty one.
static SHARED: PerProcess<Arc<MemoryStore>> = PerProcess::new();

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// The process-wide store used in mock mode.
    pub fn shared() -> Arc<MemoryStore> {
        SHARED.shared()
    }

    fn records(&self, id: Fingerprint) -> std::sync::MutexGuard<'_, Recent> {
        // Truncation intended: the low bits pick the shard.
        self.shards[(id as usize) % SHARDS]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl DedupStore for MemoryStore {
    fn seen<'a>(&'a self, ids: &'a [Fingerprint]) -> BoxFuture<'a, Result<Vec<bool>, DedupError>> {
        let seen = ids
            .iter()
            .map(|&id| self.records(id).contains(id))
            .collect();
        Box::pin(std::future::ready(Ok(seen)))
    }

    fn record<'a>(
        &'a self,
        ids: &'a [Fingerprint],
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), DedupError>> {
        self.record_now(ids, ttl);
        Box::pin(std::future::ready(Ok(())))
    }

    fn seen_now(&self, id: Fingerprint) -> Option<bool> {
        Some(self.records(id).contains(id))
    }

    fn answers_at_once(&self) -> bool {
        true
    }

    fn record_now(&self, ids: &[Fingerprint], ttl: Duration) -> bool {
        let until = expiry(ttl);
        for &id in ids {
            self.records(id).insert(id, until);
        }
        true
    }
}
