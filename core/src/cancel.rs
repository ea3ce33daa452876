//! A cancellation signal shared by the engine and whoever runs a handler.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

type Hook = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct Inner {
    cancelled: AtomicBool,
    /// Run once on cancellation; the binding uses it to stop the handler's fiber.
    hook: Mutex<Option<Hook>>,
}

/// Cloneable handle; cancelling any clone cancels all.
#[derive(Clone, Default)]
pub struct CancelToken(Arc<Inner>);

impl std::fmt::Debug for CancelToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CancelToken(cancelled: {})", self.is_cancelled())
    }
}

impl CancelToken {
    /// A token not yet cancelled.
    pub fn new() -> Self {
        Self::default()
    }

    /// Signals cancellation (idempotent) and runs the hook once.
    pub fn cancel(&self) {
        if self.0.cancelled.swap(true, Ordering::AcqRel) {
            return;
        }
        let hook = self.0.hook.lock().ok().and_then(|mut h| h.take());
        if let Some(hook) = hook {
            hook();
        }
    }

    /// Whether cancellation was signalled.
    pub fn is_cancelled(&self) -> bool {
        self.0.cancelled.load(Ordering::Acquire)
    }

    /// Sets the hook run on cancellation; runs it at once if already cancelled.
    pub fn on_cancel(&self, hook: impl FnOnce() + Send + 'static) {
        if let Ok(mut slot) = self.0.hook.lock() {
            if !self.is_cancelled() {
                *slot = Some(Box::new(hook));
                return;
            }
        }
        hook();
    }
}
