//! Wakes the poll thread from other threads (librdkafka's queue callbacks, partition workers).

use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// A flag with a condition variable: `wake` sets it, `wait` consumes it or times out.
#[derive(Debug, Default)]
pub struct Waker {
    state: Mutex<State>,
    cv: Condvar,
}

#[derive(Debug, Default)]
struct State {
    /// A wake-up is pending.
    woken: bool,
    /// The waiter is blocked in `wait`: only then does `wake` notify (a notification is a
    /// system call even when nobody waits, and wakes come once per read round).
    waiting: bool,
}

impl Waker {
    /// A waker with no pending wake-up.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the flag and wakes the waiter, if it waits.
    pub fn wake(&self) {
        if let Ok(mut state) = self.state.lock() {
            state.woken = true;
            if state.waiting {
                self.cv.notify_one();
            }
        }
    }

    /// Waits until woken or `timeout` passes, and clears the flag.
    pub fn wait(&self, timeout: Duration) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        if !state.woken {
            state.waiting = true;
            match self.cv.wait_timeout_while(state, timeout, |s| !s.woken) {
                Ok((guard, _)) => state = guard,
                Err(poisoned) => {
                    poisoned.into_inner().0.waiting = false;
                    return;
                }
            }
            state.waiting = false;
        }
        state.woken = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Instant;

    #[test]
    fn a_wake_before_the_wait_is_kept_and_consumed_once() {
        let waker = Waker::new();
        waker.wake();
        let started = Instant::now();
        waker.wait(Duration::from_secs(10));
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the kept wake-up was lost"
        );
        let started = Instant::now();
        waker.wait(Duration::from_millis(50));
        assert!(
            started.elapsed() >= Duration::from_millis(50),
            "the wake-up was consumed twice"
        );
    }

    #[test]
    fn a_wake_from_another_thread_ends_the_wait() {
        let waker = Arc::new(Waker::new());
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let waiter = {
            let waker = Arc::clone(&waker);
            std::thread::spawn(move || {
                let _ = started_tx.send(());
                let started = Instant::now();
                waker.wait(Duration::from_secs(30));
                started.elapsed()
            })
        };
        let _ = started_rx.recv();
        // Whether the waiter is already blocked or not, the wake must reach it.
        waker.wake();
        let waited = waiter.join().unwrap_or(Duration::MAX);
        assert!(waited < Duration::from_secs(10), "waited {waited:?}");
    }
}
