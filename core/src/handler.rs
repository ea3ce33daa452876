//! The contract between the engine and whatever runs handler code (the Ruby binding).
//!
//! The engine submits a [`Job`] to the subscription's [`Scheduler`](crate::scheduler::Scheduler),
//! a runner takes it from there, and the engine awaits the job's reply on a one-shot channel.
//! Sending the reply needs no lock and no runtime, so the runner (a Ruby thread) can complete a
//! job without touching the engine's threads.

use tokio::sync::oneshot;

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
    reply: oneshot::Sender<Outcome>,
}

impl Job {
    /// A job and the receiver its outcome arrives on.
    pub fn new(
        event: Event,
        cancel: CancelToken,
        abort: CancelToken,
    ) -> (Self, oneshot::Receiver<Outcome>) {
        let (reply, rx) = oneshot::channel();
        (
            Self {
                event,
                cancel,
                abort,
                reply,
            },
            rx,
        )
    }

    /// Splits the job so the event can be moved to the runner while the reply stays with the
    /// completion handle.
    pub fn into_parts(self) -> (Event, CancelToken, Completion) {
        (self.event, self.cancel, Completion(self.reply))
    }
}

/// Sends a job's outcome. Dropping it unsent reports [`Outcome::Abandoned`].
#[derive(Debug)]
pub struct Completion(oneshot::Sender<Outcome>);

impl Completion {
    /// Reports the outcome; a receiver that went away is ignored.
    pub fn complete(self, outcome: Outcome) {
        let _ = self.0.send(outcome);
    }
}
