//! Values created once per process, safe across `fork`.
//!
//! After `fork` the child has copies of the parent's statics but none of the threads behind them
//! (librdkafka's, tokio's). The child must neither use such a value (it would wait forever for a
//! thread that is gone) nor drop it (dropping a librdkafka handle or a tokio runtime joins threads
//! that do not exist). A [`PerProcess`] value is created on first use in each process; in a child,
//! the parent's copy is left untouched and never dropped.

use std::sync::Mutex;

/// A value created on first use in each process and kept for the life of that process.
pub struct PerProcess<T: 'static> {
    /// The process that created the value, and the value (leaked: statics are never dropped).
    slot: Mutex<Option<(u32, &'static T)>>,
}

impl<T: 'static> PerProcess<T> {
    /// An empty slot, for a `static`.
    pub const fn new() -> Self {
        Self {
            slot: Mutex::new(None),
        }
    }

    /// This process's value, created by `init` on first use (a failed `init` is tried again on
    /// the next call).
    pub fn get_or_try_init<E>(&self, init: impl FnOnce() -> Result<T, E>) -> Result<&'static T, E> {
        let pid = std::process::id();
        // A poisoned lock only means an `init` panicked; the slot itself is always consistent.
        let mut slot = self.slot.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((owner, value)) = *slot {
            if owner == pid {
                return Ok(value);
            }
        }
        let value: &'static T = Box::leak(Box::new(init()?));
        *slot = Some((pid, value));
        Ok(value)
    }

    /// This process's value, if it was created (never creates it).
    pub fn get(&self) -> Option<&'static T> {
        let slot = self.slot.lock().unwrap_or_else(|p| p.into_inner());
        match *slot {
            Some((owner, value)) if is_current(owner) => Some(value),
            _ => None,
        }
    }
}

impl<T: Default + 'static> PerProcess<T> {
    /// This process's value, created empty (`T::default()`) on first use.
    pub fn get_or_default(&self) -> &'static T {
        match self.get_or_try_init(|| Ok::<_, std::convert::Infallible>(T::default())) {
            Ok(value) => value,
            Err(never) => match never {},
        }
    }
}

impl<T: Default + Send + Sync + 'static> PerProcess<std::sync::Arc<T>> {
    /// This process's shared value, created empty (`T::default()`) on first use.
    pub fn shared(&self) -> std::sync::Arc<T> {
        self.get_or_default().clone()
    }
}

impl<T: 'static> Default for PerProcess<T> {
    fn default() -> Self {
        Self::new()
    }
}

/// Whether this is still the process `pid` (false in a child forked after `pid` recorded it).
pub fn is_current(pid: u32) -> bool {
    std::process::id() == pid
}
