//! Wakes the poll thread from other threads (librdkafka's queue callbacks, partition workers).

use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// A flag with a condition variable: `wake` sets it, `wait` consumes it or times out.
#[derive(Debug, Default)]
pub struct Waker {
    woken: Mutex<bool>,
    cv: Condvar,
}

impl Waker {
    /// A waker with no pending wake-up.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the flag and wakes the waiter.
    pub fn wake(&self) {
        if let Ok(mut woken) = self.woken.lock() {
            *woken = true;
            self.cv.notify_one();
        }
    }

    /// Waits until woken or `timeout` passes, and clears the flag.
    pub fn wait(&self, timeout: Duration) {
        let Ok(mut woken) = self.woken.lock() else {
            return;
        };
        if !*woken {
            if let Ok((guard, _)) = self.cv.wait_timeout_while(woken, timeout, |w| !*w) {
                woken = guard;
            } else {
                return;
            }
        }
        *woken = false;
    }
}
