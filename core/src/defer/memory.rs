//! Deferred keys kept in process memory (mock mode). Like the memory timer store, they belong to
//! the scope, not to one assignment: a partition reassigned within the process finds its
//! deferred keys again. They do not survive the process.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use super::{DeferError, DeferStore, Offset, Retry};
use crate::event::Key;
use crate::process::PerProcess;
use crate::timers::{BoxFuture, Scope};

/// A key's state: its retry (absent for offsets appended without one) and its offsets.
#[derive(Debug, Default)]
struct Entry {
    retry: Option<Retry>,
    offsets: BTreeSet<Offset>,
}

/// Every scope's deferred keys.
#[derive(Default)]
pub struct MemoryStore {
    keys: Mutex<BTreeMap<Scope, BTreeMap<Key, Entry>>>,
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

    fn with<'a, T: Send + 'a>(
        &self,
        f: impl FnOnce(&mut BTreeMap<Scope, BTreeMap<Key, Entry>>) -> T,
    ) -> BoxFuture<'a, Result<T, DeferError>> {
        let result = self
            .keys
            .lock()
            .map(|mut k| f(&mut k))
            .map_err(|_| DeferError("memory store poisoned".into()));
        Box::pin(std::future::ready(result))
    }
}

/// The entry of `key` in `scope`, created when absent.
fn entry<'m>(
    keys: &'m mut BTreeMap<Scope, BTreeMap<Key, Entry>>,
    scope: &Scope,
    key: &[u8],
) -> &'m mut Entry {
    keys.entry(scope.clone())
        .or_default()
        .entry(Key::from(key))
        .or_default()
}

impl DeferStore for MemoryStore {
    fn defer<'a>(
        &'a self,
        scope: &'a Scope,
        key: &'a [u8],
        offset: Offset,
        retry: Retry,
    ) -> BoxFuture<'a, Result<(), DeferError>> {
        self.with(|k| {
            let e = entry(k, scope, key);
            e.offsets.insert(offset);
            e.retry = Some(retry);
        })
    }

    fn append<'a>(
        &'a self,
        scope: &'a Scope,
        key: &'a [u8],
        offset: Offset,
    ) -> BoxFuture<'a, Result<(), DeferError>> {
        self.with(|k| {
            entry(k, scope, key).offsets.insert(offset);
        })
    }

    fn set_retry<'a>(
        &'a self,
        scope: &'a Scope,
        key: &'a [u8],
        retry: Retry,
    ) -> BoxFuture<'a, Result<(), DeferError>> {
        self.with(|k| entry(k, scope, key).retry = Some(retry))
    }

    fn remove<'a>(
        &'a self,
        scope: &'a Scope,
        key: &'a [u8],
        offset: Offset,
    ) -> BoxFuture<'a, Result<(), DeferError>> {
        self.with(|k| {
            if let Some(e) = k.get_mut(scope).and_then(|s| s.get_mut(key)) {
                e.offsets.remove(&offset);
            }
        })
    }

    fn offsets<'a>(
        &'a self,
        scope: &'a Scope,
        key: &'a [u8],
        after: Offset,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Offset>, DeferError>> {
        self.with(|k| {
            k.get(scope)
                .and_then(|s| s.get(key))
                .map(|e| {
                    e.offsets
                        .range(after.saturating_add(1)..)
                        .take(limit)
                        .copied()
                        .collect()
                })
                .unwrap_or_default()
        })
    }

    /// The memory store applies every write at once, in order: nothing written after the
    /// decision can be in the store when the release runs.
    fn release<'a>(
        &'a self,
        scope: &'a Scope,
        key: &'a [u8],
        _decided_us: i64,
    ) -> BoxFuture<'a, Result<(), DeferError>> {
        self.with(|k| {
            if let Some(s) = k.get_mut(scope) {
                s.remove(key);
            }
        })
    }

    fn load<'a>(
        &'a self,
        scope: &'a Scope,
    ) -> BoxFuture<'a, Result<Vec<(Key, Retry)>, DeferError>> {
        self.with(|k| {
            k.get(scope)
                .map(|s| {
                    s.iter()
                        .filter_map(|(key, e)| e.retry.map(|r| (key.clone(), r)))
                        .collect()
                })
                .unwrap_or_default()
        })
    }
}
