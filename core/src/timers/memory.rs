//! Timers kept in process memory (mock mode). They belong to the scope and key, not to one
//! assignment, so they survive a rebalance within the process; they do not survive the process.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use super::{BoxFuture, Due, Scope, Seconds, StoredSpan, TimerError, TimerStore};
use crate::event::Key;
use crate::process::PerProcess;

/// Each key's timers within one scope, with the context each was scheduled in.
type KeyTimes = BTreeMap<Key, BTreeMap<Seconds, StoredSpan>>;

/// The timers of every scope, by scope then key.
#[derive(Default)]
pub struct MemoryStore {
    /// Per scope: each key's timers.
    timers: Mutex<BTreeMap<Scope, KeyTimes>>,
}

/// Shared by every mock-mode client of the process (a documented static), as the mock cluster is;
/// a forked child starts with an empty one (the parent's may be locked by a thread the child lacks).
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

    fn with<T>(
        &self,
        f: impl FnOnce(&mut BTreeMap<Scope, KeyTimes>) -> T,
    ) -> Result<T, TimerError> {
        self.timers
            .lock()
            .map(|mut t| f(&mut t))
            .map_err(|_| TimerError::Store("memory store poisoned".into()))
    }
}

/// A future already resolved: the memory store never waits.
fn ready<'a, T: Send + 'a>(value: T) -> BoxFuture<'a, T> {
    Box::pin(std::future::ready(value))
}

impl TimerStore for MemoryStore {
    fn schedule<'a>(
        &'a self,
        scope: &'a Scope,
        key: &'a [u8],
        time: Seconds,
        span: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), TimerError>> {
        let result = self.with(|t| {
            t.entry(scope.clone())
                .or_default()
                .entry(Arc::from(key))
                .or_default()
                .insert(time, span.map(Arc::from));
        });
        ready(result)
    }

    fn unschedule<'a>(
        &'a self,
        scope: &'a Scope,
        key: &'a [u8],
        time: Seconds,
    ) -> BoxFuture<'a, Result<(), TimerError>> {
        let result = self.with(|t| {
            if let Some(keys) = t.get_mut(scope) {
                if let Some(times) = keys.get_mut(key) {
                    times.remove(&time);
                    if times.is_empty() {
                        keys.remove(key);
                    }
                }
            }
        });
        ready(result)
    }

    fn clear<'a>(
        &'a self,
        scope: &'a Scope,
        key: &'a [u8],
    ) -> BoxFuture<'a, Result<(), TimerError>> {
        let result = self.with(|t| {
            if let Some(keys) = t.get_mut(scope) {
                keys.remove(key);
            }
        });
        ready(result)
    }

    fn scheduled<'a>(
        &'a self,
        scope: &'a Scope,
        key: &'a [u8],
    ) -> BoxFuture<'a, Result<Vec<Seconds>, TimerError>> {
        let result = self.with(|t| {
            t.get(scope)
                .and_then(|keys| keys.get(key))
                .map(|times| times.keys().copied().collect())
                .unwrap_or_default()
        });
        ready(result)
    }

    fn load<'a>(
        &'a self,
        scope: &'a Scope,
        until: Seconds,
    ) -> BoxFuture<'a, Result<Due, TimerError>> {
        let result = self.with(|t| {
            let mut due: Due = t
                .get(scope)
                .map(|keys| {
                    keys.iter()
                        .flat_map(|(k, times)| {
                            times
                                .range(..=until)
                                .map(move |(s, span)| (k.clone(), *s, span.clone()))
                        })
                        .collect()
                })
                .unwrap_or_default();
            due.sort_by_key(|(_, s, _)| *s);
            due
        });
        ready(result)
    }
}
