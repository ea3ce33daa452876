//! Deduplication records in process memory (mock mode): shared by every mock-mode client of the
//! process, so a client created again in the same process (a "restart" in a spec) still skips
//! what an earlier one handled. Records expire after their TTL; at most [`CAPACITY`] are kept
//! (the oldest go first).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{DedupError, DedupStore, Fingerprint};
use crate::process::PerProcess;
use crate::timers::BoxFuture;

/// Records kept at most.
pub const CAPACITY: usize = 1 << 20;

/// Fingerprints with their expiry.
#[derive(Default)]
pub struct MemoryStore {
    records: Mutex<Records>,
}

#[derive(Default)]
struct Records {
    /// Fingerprint → (expiry, insertion number).
    expiry: HashMap<Fingerprint, (Instant, u64)>,
    /// Insertion order, for eviction; an entry whose number no longer matches is stale.
    order: VecDeque<(Fingerprint, u64)>,
    next: u64,
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
        match SHARED.get_or_try_init(|| Ok::<_, std::convert::Infallible>(Arc::new(Self::new()))) {
            Ok(store) => store.clone(),
            Err(never) => match never {},
        }
    }

    fn records(&self) -> std::sync::MutexGuard<'_, Records> {
        self.records
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

    fn record(&mut self, id: Fingerprint, ttl: Duration) {
        let number = self.next;
        self.next = self.next.wrapping_add(1);
        let until = Instant::now().checked_add(ttl).unwrap_or_else(far_future);
        self.expiry.insert(id, (until, number));
        self.order.push_back((id, number));
        while self.expiry.len() > CAPACITY {
            let Some((old, n)) = self.order.pop_front() else {
                break;
            };
            if self.expiry.get(&old).is_some_and(|(_, m)| *m == n) {
                self.expiry.remove(&old);
            }
        }
        if self.order.len() > CAPACITY.saturating_mul(2) {
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
    fn seen(&self, id: Fingerprint) -> BoxFuture<'_, Result<bool, DedupError>> {
        let seen = self.records().seen(id);
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
        Some(self.records().seen(id))
    }

    fn record_now(&self, ids: &[Fingerprint], ttl: Duration) -> bool {
        let mut records = self.records();
        for id in ids {
            records.record(*id, ttl);
        }
        true
    }
}
