//! The ready queue: events whose key is free, waiting for a runner.
//!
//! Runners *pull*: each of the `max_concurrency` runner workers (Ruby worker fibers in the gem)
//! takes its next job the moment it finishes the previous one, so a free slot never waits for a
//! round trip through the engine, and the choice of the next event is made at the last possible
//! moment. Concurrency is bounded by the number of runners. This first version serves events in
//! arrival order; the fair scheduler (virtual time per key, separate pools for retries, wait
//! boost) replaces the policy behind the same `submit`/`take` interface.

use std::collections::VecDeque;
use std::sync::{Mutex, OnceLock};

use crate::handler::Job;

type Notify = Box<dyn Fn() + Send + Sync>;

#[derive(Default)]
struct State {
    /// Jobs ready to run, in arrival order.
    ready: VecDeque<Job>,
    /// A runner found the queue empty since the last notification.
    idle: bool,
    /// No more jobs are accepted; `take` reports `Closed` once empty.
    closed: bool,
}

/// One per subscription, shared by its partition workers and its runners.
#[derive(Default)]
pub struct Scheduler {
    /// The queue; the lock is held only to push, pop or purge.
    state: Mutex<State>,
    /// Called (outside the lock) when a job arrives while runners are idle.
    notify: OnceLock<Notify>,
}

/// What a runner gets from [`Scheduler::take`].
// Returned by value and matched at once, once per job: moving the job is cheaper than boxing it
// (a heap allocation per message) to make the variants the same size.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Take {
    /// Run this job.
    Job(Job),
    /// Nothing ready; the notifier fires when something arrives.
    Empty,
    /// The subscription ended.
    Closed,
}

impl Scheduler {
    /// An empty scheduler with no notifier.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the function that wakes idle runners (once; later calls are ignored).
    pub fn set_notify(&self, notify: impl Fn() + Send + Sync + 'static) {
        let _ = self.notify.set(Box::new(notify));
    }

    /// Adds a ready job. A closed scheduler drops it, which reports it abandoned.
    pub fn submit(&self, job: Job) {
        let wake = {
            let Ok(mut state) = self.state.lock() else {
                return;
            };
            if state.closed {
                return;
            }
            state.ready.push_back(job);
            std::mem::take(&mut state.idle)
        };
        if wake {
            self.wake();
        }
    }

    /// Takes the next job to run.
    pub fn take(&self) -> Take {
        let Ok(mut state) = self.state.lock() else {
            return Take::Closed;
        };
        match state.ready.pop_front() {
            Some(job) => Take::Job(job),
            None if state.closed => Take::Closed,
            None => {
                state.idle = true;
                Take::Empty
            }
        }
    }

    /// Drops ready jobs whose partition is being released (their `abort` was cancelled); each
    /// is reported abandoned to its partition.
    pub fn purge_aborted(&self) {
        let dropped: Vec<Job> = match self.state.lock() {
            Ok(mut state) => {
                let (keep, drop): (VecDeque<Job>, VecDeque<Job>) = std::mem::take(&mut state.ready)
                    .into_iter()
                    .partition(|job| !job.abort.is_cancelled());
                state.ready = keep;
                drop.into_iter().collect()
            }
            Err(_) => Vec::new(),
        };
        drop(dropped);
    }

    /// Stops accepting jobs, drops the queued ones (abandoned) and wakes the runners.
    pub fn close(&self) {
        let dropped = match self.state.lock() {
            Ok(mut state) => {
                state.closed = true;
                std::mem::take(&mut state.ready)
            }
            Err(_) => VecDeque::new(),
        };
        drop(dropped);
        self.wake();
    }

    /// Whether `close` was called.
    pub fn is_closed(&self) -> bool {
        self.state.lock().map(|s| s.closed).unwrap_or(true)
    }

    fn wake(&self) {
        if let Some(notify) = self.notify.get() {
            notify();
        }
    }
}
