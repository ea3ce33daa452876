//! Deduplication records in process memory (mock mode): shared by every mock-mode client of the
//! process, so a client created again in the same process (a "restart" in a spec) still skips
//! what an earlier one handled. Records expire after their TTL; the [`CAPACITY`] most recent
//! are kept (plenty for tests, and small enough to stay in the processor's caches: a million
//! records made every lookup a cache miss and cost a benchmark a tenth of its speed).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{DedupError, DedupStore, Fingerprint, FingerprintMap};
use crate::process::PerProcess;
use crate::timers::BoxFuture;

/// Records kept at most.
pub const CAPACITY: usize = 1 << 16;

/// Locks the records are split in (partitions on different threads rarely meet on one).
const SHARDS: usize = 16;

/// Fingerprints with their expiry.
pub struct MemoryStore {
    shards: Vec<Mutex<Records>>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
        }
    }
}

/// One lock's records.
#[derive(Default)]
struct Records {
    /// Fingerprint → (expiry, insertion number).
    expiry: FingerprintMap<(Instant, u64)>,
    /// Insertion order, for eviction; an entry whose number no longer matches is stale.
    order: VecDeque<(Fingerprint, u64)>,
    next: u64,
}

/// Records per shard at most.
const SHARD_CAPACITY: usize = CAPACITY / SHARDS;

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

    fn records(&self, id: Fingerprint) -> std::sync::MutexGuard<'_, Records> {
        // Truncation intended: the low bits pick the shard.
        self.shards[(id as usize) % SHARDS]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Records {
    fn seen(&mut self, id: Fingerprint) -> bool {
        match self.expiry.get(&id) {
            Some((until, _)) if Instant::now() < *until => true,
            Some(_) => {
                self.expiry.remove(&id);
                false
            }
            None => false,
        }
    }

    fn record(&mut self, id: Fingerprint, until: Instant) {
        let number = self.next;
        self.next = self.next.wrapping_add(1);
        self.expiry.insert(id, (until, number));
        self.order.push_back((id, number));
        while self.expiry.len() > SHARD_CAPACITY {
            let Some((old, n)) = self.order.pop_front() else {
                break;
            };
            if self.expiry.get(&old).is_some_and(|(_, m)| *m == n) {
                self.expiry.remove(&old);
            }
        }
        if self.order.len() > SHARD_CAPACITY.saturating_mul(2) {
            let expiry = &self.expiry;
            self.order
                .retain(|(id, n)| expiry.get(id).is_some_and(|(_, m)| m == n));
        }
    }
}

/// An instant far enough ahead to never come (a TTL too large to add to now).
fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600)
}

impl DedupStore for MemoryStore {
    fn seen(&self, ids: Vec<Fingerprint>) -> BoxFuture<'_, Result<Vec<bool>, DedupError>> {
        let seen = ids.iter().map(|id| self.records(*id).seen(*id)).collect();
        Box::pin(std::future::ready(Ok(seen)))
    }

    fn record(
        &self,
        ids: Vec<Fingerprint>,
        ttl: Duration,
    ) -> BoxFuture<'_, Result<(), DedupError>> {
        self.record_now(&ids, ttl);
        Box::pin(std::future::ready(Ok(())))
    }

    fn seen_now(&self, id: Fingerprint) -> Option<bool> {
        Some(self.records(id).seen(id))
    }

    fn answers_at_once(&self) -> bool {
        true
    }

    fn record_now(&self, ids: &[Fingerprint], ttl: Duration) -> bool {
        let until = Instant::now().checked_add(ttl).unwrap_or_else(far_future);
        for id in ids {
            self.records(*id).record(*id, until);
        }
        true
    }
}
