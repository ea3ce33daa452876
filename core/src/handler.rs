//! The contract between the engine and whatever runs handler code (the Ruby binding).
//!
//! The engine submits a [`Job`] to the subscription's [`Scheduler`](crate::scheduler::Scheduler)
//! and a runner takes it from there. The job's [`Completion`] sends the outcome straight into
//! the channel of the partition worker that owns the event: no lock, no task per event. Each
//! send wakes that worker, which costs the runner a system call when the engine's threads are
//! parked; a runner that finishes many jobs at once hands them to a [`Relay`] instead, which
//! wakes the engine once for the whole batch.

use tokio::sync::mpsc;

use crate::cancel::CancelToken;
use crate::event::Event;
use crate::scheduler::Class;
use crate::timers::KeyTimers;

/// How a handler call ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The handler returned normally.
    Success,
    /// The handler raised; the runner already reported the exception in full.
    Failure(Failure),
    /// The runner went away before the handler finished (shutdown); the event is not committed.
    Abandoned,
    /// Sent by the scheduler's watchdog, not by the runner: the handler ignored its cancellation
    /// past the grace period. Its permit is released; its real outcome still follows.
    Quarantined,
}

/// Why a handler call failed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Failure {
    /// Class of the exception.
    pub error_class: String,
    /// Its message.
    pub message: String,
    /// The first lines of its backtrace, newline-separated (may be empty).
    pub backtrace: String,
    /// Whether retrying cannot help.
    pub permanent: bool,
}

impl Failure {
    /// A transient failure with this class and message.
    pub fn transient(error_class: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            error_class: error_class.into(),
            message: message.into(),
            backtrace: String::new(),
            permanent: false,
        }
    }

    /// A permanent failure with this class and message.
    pub fn permanent(error_class: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            permanent: true,
            ..Self::transient(error_class, message)
        }
    }
}

/// One line for logs: `transient RuntimeError: boom (at app/handler.rb:12:in 'on_message')`.
/// The whole backtrace goes to the dead-letter headers and, at DEBUG, to the handler's log line.
impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = if self.permanent {
            "permanent"
        } else {
            "transient"
        };
        write!(f, "{kind} {}: {}", self.error_class, self.message)?;
        match self.backtrace.lines().next() {
            Some(at) if !at.is_empty() => write!(f, " (at {at})"),
            _ => Ok(()),
        }
    }
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
    /// The event key's timers, when a timer store is configured and the event has a key.
    pub timers: Option<KeyTimers>,
    /// First attempt or retry: which pool of handler time it is charged to.
    pub class: Class,
    /// The trace context of the handler call: its event's span when spans are exported, else
    /// the context the event carries (empty when none).
    pub trace: opentelemetry::Context,
    /// Reports the outcome to the partition worker.
    completion: Completion,
}

/// Which event of a partition an outcome is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Slot {
    /// The message at this offset.
    Offset(i64),
    /// The key's timer at this time (seconds since the epoch).
    Timer(i64),
}

/// An event's outcome, as its partition worker receives it.
#[derive(Debug)]
pub struct Finished {
    /// Key of the event (its queue).
    pub key: Option<crate::event::Key>,
    /// Which event.
    pub slot: Slot,
    /// How the handler call ended.
    pub outcome: Outcome,
}

impl Job {
    /// A job whose outcome is sent to `done` as a [`Finished`] for `key` and `slot`.
    pub fn new(
        event: Event,
        cancel: CancelToken,
        abort: CancelToken,
        timers: Option<KeyTimers>,
        done: mpsc::UnboundedSender<Finished>,
        key: Option<crate::event::Key>,
        slot: Slot,
    ) -> Self {
        Self {
            event,
            cancel,
            abort,
            timers,
            class: Class::Fresh,
            trace: opentelemetry::Context::new(),
            completion: Completion {
                target: Some((done, key, slot)),
            },
        }
    }

    /// The same job with the trace context of its handler call (the event's span, or the
    /// context the event carries).
    pub fn traced(mut self, trace: opentelemetry::Context) -> Self {
        self.trace = trace;
        self
    }

    /// The same job charged as a retry.
    pub fn retry(mut self) -> Self {
        self.class = Class::Retry;
        self
    }

    /// The event's key (its scheduling identity).
    pub fn key(&self) -> &Option<crate::event::Key> {
        // The target is taken only when the outcome is sent, which consumes the job.
        static NO_KEY: Option<crate::event::Key> = None;
        self.completion
            .target
            .as_ref()
            .map_or(&NO_KEY, |(_, key, _)| key)
    }

    /// Where the scheduler's watchdog reports a quarantine for this job.
    pub(crate) fn notice_target(&self) -> Option<(mpsc::UnboundedSender<Finished>, Slot)> {
        self.completion
            .target
            .as_ref()
            .map(|(done, _, slot)| (done.clone(), *slot))
    }

    /// Splits the job so the event can be moved to the runner while the completion handle
    /// stays with whoever reports the outcome.
    pub fn into_parts(self) -> (Event, CancelToken, Option<KeyTimers>, Completion) {
        (self.event, self.cancel, self.timers, self.completion)
    }
}

/// Sends a job's outcome once. Dropping it unsent reports [`Outcome::Abandoned`], so a job lost
/// on the way (a runner that went away) is never mistaken for a finished one.
#[derive(Debug)]
pub struct Completion {
    /// Where the outcome goes, and for which event; taken when sent.
    target: Option<(
        mpsc::UnboundedSender<Finished>,
        Option<crate::event::Key>,
        Slot,
    )>,
}

impl Completion {
    /// Reports the outcome; a worker that went away is ignored.
    pub fn complete(mut self, outcome: Outcome) {
        self.send(outcome);
    }

    fn send(&mut self, outcome: Outcome) {
        if let Some((done, key, slot)) = self.target.take() {
            let _ = done.send(Finished { key, slot, outcome });
        }
    }
}

impl Completion {
    /// Whether both outcomes go to the same partition worker.
    fn same_worker(&self, other: &Completion) -> bool {
        match (&self.target, &other.target) {
            (Some((a, ..)), Some((b, ..))) => a.same_channel(b),
            _ => false,
        }
    }
}

/// Carries batches of outcomes from a runner thread (the Ruby processor) to the partition
/// workers through one engine task. Completing a batch directly wakes every partition worker it
/// touches, one wake-up of a parked engine thread (a futex or eventfd write) each, all paid on
/// the runner's thread; through the relay the runner pays one, and the per-partition wake-ups
/// happen on the engine's own threads. A batch for a single partition worker is sent directly
/// (one wake-up either way, and no extra hop).
///
/// Outcomes of one batch reach each worker in batch order. A batch sent directly may overtake an
/// earlier one still in the relay; that is harmless, since a key has at most one event in
/// flight, so two outcomes in flight at once are always for different keys.
///
/// The relay's task is owned by its senders: it ends once the last clone is dropped and every
/// batch sent before was delivered.
#[derive(Debug, Clone)]
pub struct Relay {
    /// The task's queue of batches.
    batches: mpsc::UnboundedSender<Vec<(Completion, Outcome)>>,
}

impl Relay {
    /// Starts the relay's task on `runtime`.
    pub fn start(runtime: &tokio::runtime::Handle) -> Self {
        let (batches, mut incoming) = mpsc::unbounded_channel::<Vec<(Completion, Outcome)>>();
        runtime.spawn(async move {
            while let Some(batch) = incoming.recv().await {
                complete_all(batch);
            }
        });
        Self { batches }
    }

    /// Delivers every outcome of `batch`, each to its partition worker, in order per worker.
    pub fn send(&self, batch: Vec<(Completion, Outcome)>) {
        let single_worker = match batch.split_first() {
            Some(((first, _), rest)) => rest.iter().all(|(c, _)| c.same_worker(first)),
            None => return,
        };
        if single_worker {
            complete_all(batch);
        } else if let Err(unsent) = self.batches.send(batch) {
            // The runtime is shutting down: deliver here, as before the relay existed.
            complete_all(unsent.0);
        }
    }
}

fn complete_all(batch: Vec<(Completion, Outcome)>) {
    for (completion, outcome) in batch {
        completion.complete(outcome);
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        self.send(Outcome::Abandoned);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::testing::timer_job;

    /// The outcome handle of a job for key `key` whose outcome goes to `done`.
    fn completion(done: &mpsc::UnboundedSender<Finished>, key: &str) -> Completion {
        timer_job(&Arc::from(key.as_bytes()), done, Class::Fresh)
            .into_parts()
            .3
    }

    /// The keys and outcomes `rx` receives until every sender is gone.
    async fn received(rx: &mut mpsc::UnboundedReceiver<Finished>) -> Vec<(String, Outcome)> {
        let mut got = Vec::new();
        while let Some(f) = rx.recv().await {
            let key = String::from_utf8_lossy(f.key.as_deref().unwrap_or_default()).into_owned();
            got.push((key, f.outcome));
        }
        got
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn relay_delivers_every_outcome_in_order_per_worker() {
        let relay = Relay::start(&tokio::runtime::Handle::current());
        let (a, mut a_rx) = mpsc::unbounded_channel();
        let (b, mut b_rx) = mpsc::unbounded_channel();
        let failure = Outcome::Failure(Failure::transient("E", "boom"));
        // Spans two workers: goes through the relay's task.
        relay.send(vec![
            (completion(&a, "1"), Outcome::Success),
            (completion(&b, "2"), failure.clone()),
            (completion(&a, "3"), Outcome::Abandoned),
        ]);
        // One worker: delivered at once, on this thread.
        relay.send(vec![(completion(&b, "4"), Outcome::Success)]);
        drop((relay, a, b));
        // Each channel ends once every outcome for it was delivered (the relay's task held the
        // last senders).
        assert_eq!(
            received(&mut a_rx).await,
            vec![
                ("1".into(), Outcome::Success),
                ("3".into(), Outcome::Abandoned)
            ]
        );
        // The direct batch may overtake the relayed one (different keys in real use).
        let mut got = received(&mut b_rx).await;
        got.sort_by(|x, y| x.0.cmp(&y.0));
        assert_eq!(
            got,
            vec![("2".into(), failure), ("4".into(), Outcome::Success)]
        );
    }
}
