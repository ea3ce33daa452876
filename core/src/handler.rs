//! The contract between the engine and whatever runs handler code (the Ruby binding).
//!
//! The engine submits a [`Job`] to the subscription's [`Scheduler`](crate::scheduler::Scheduler)
//! and a runner takes it from there. The job's [`Completion`] sends the outcome straight into
//! the channel of the partition worker that owns the event: no lock, no runtime, no task per
//! event, so the runner (a Ruby thread) completes a job without touching the engine's threads.

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::cancel::CancelToken;
use crate::event::Event;

/// How a handler call ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The handler returned normally.
    Success,
    /// The handler raised; the runner already reported the exception in full.
    Failure {
        /// Class of the exception.
        error_class: String,
        /// Its message.
        message: String,
        /// Whether retrying cannot help.
        permanent: bool,
    },
    /// The runner went away before the handler finished (shutdown); the event is not committed.
    Abandoned,
}

/// One handler call: the event, its cancellation signal, and where the outcome goes.
#[derive(Debug)]
pub struct Job {
    /// The event to handle.
    pub event: Event,
    /// Cancelled on timeout, revoke or shutdown.
    pub cancel: CancelToken,
    /// Cancelled when the job's partition is released before the job started; the scheduler
    /// then drops it instead of running it.
    pub abort: CancelToken,
    /// Reports the outcome to the partition worker.
    completion: Completion,
}

/// An event's outcome, as its partition worker receives it.
#[derive(Debug)]
pub struct Finished {
    /// Key of the event (its queue).
    pub key: Option<Arc<str>>,
    /// Offset of the event.
    pub offset: i64,
    /// How the handler call ended.
    pub outcome: Outcome,
}

impl Job {
    /// A job whose outcome is sent to `done` as a [`Finished`] for `key` and `offset`.
    pub fn new(
        event: Event,
        cancel: CancelToken,
        abort: CancelToken,
        done: mpsc::UnboundedSender<Finished>,
        key: Option<Arc<str>>,
        offset: i64,
    ) -> Self {
        Self {
            event,
            cancel,
            abort,
            completion: Completion {
                target: Some((done, key, offset)),
            },
        }
    }

    /// Splits the job so the event can be moved to the runner while the completion handle
    /// stays with whoever reports the outcome.
    pub fn into_parts(self) -> (Event, CancelToken, Completion) {
        (self.event, self.cancel, self.completion)
    }
}

/// Sends a job's outcome once. Dropping it unsent reports [`Outcome::Abandoned`], so a job lost
/// on the way (a runner that went away) is never mistaken for a finished one.
#[derive(Debug)]
pub struct Completion {
    /// Where the outcome goes, and for which event; taken when sent.
    target: Option<(mpsc::UnboundedSender<Finished>, Option<Arc<str>>, i64)>,
}

impl Completion {
    /// Reports the outcome; a worker that went away is ignored.
    pub fn complete(mut self, outcome: Outcome) {
        self.send(outcome);
    }

    fn send(&mut self, outcome: Outcome) {
        if let Some((done, key, offset)) = self.target.take() {
            let _ = done.send(Finished {
                key,
                offset,
                outcome,
            });
        }
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        self.send(Outcome::Abandoned);
    }
}
