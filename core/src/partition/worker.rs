//! The worker of one assigned partition: a tokio task that owns the partition's key queues and
//! offset tracker. Messages arrive from the poll thread; completions arrive from the tasks that
//! ran each event. Everything that mutates the queues or the tracker happens on this one task, so
//! neither needs a lock.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use rdkafka::message::OwnedMessage;
use tokio::sync::{mpsc, oneshot};
use tokio::time::sleep_until;

use super::keys::KeyQueues;
use super::offsets::OffsetTracker;
use crate::cancel::CancelToken;
use crate::engine::Engine;
use crate::event::{ConsumedMessage, Event, SOURCE_SYSTEM_HEADER};
use crate::handler::{Finished, Job, Outcome};
use crate::waker::Waker;

type Key = Option<Arc<str>>;

/// State of a partition shared between its worker and the poll thread.
#[derive(Debug)]
pub(crate) struct PartitionShared {
    /// Messages taken from Kafka and not yet retired below the commit watermark. The poll thread
    /// only reads the partition while this is below `max_uncommitted`.
    held: AtomicUsize,
    /// The `max_uncommitted` bound.
    max: usize,
    /// Position the worker allows to commit; -1 until something finished.
    committable: AtomicI64,
    /// Wakes the poll thread when the partition regains room.
    waker: Arc<Waker>,
}

impl PartitionShared {
    pub(crate) fn new(max: usize, waker: Arc<Waker>) -> Self {
        Self {
            held: AtomicUsize::new(0),
            max: max.max(1),
            committable: AtomicI64::new(-1),
            waker,
        }
    }

    /// Free room, as seen by the poll thread.
    pub(crate) fn room(&self) -> usize {
        self.max.saturating_sub(self.held.load(Ordering::Acquire))
    }

    /// The poll thread took one message.
    pub(crate) fn took(&self) {
        self.held.fetch_add(1, Ordering::AcqRel);
    }

    fn release(&self, n: usize) {
        if n == 0 {
            return;
        }
        let before = self.held.fetch_sub(n, Ordering::AcqRel);
        // Wake the poll thread only on the full -> room transition, not once per message.
        if before >= self.max && before - n < self.max {
            self.waker.wake();
        }
    }

    /// The committable position, if any.
    pub(crate) fn committable(&self) -> Option<i64> {
        let p = self.committable.load(Ordering::Acquire);
        (p >= 0).then_some(p)
    }
}

/// What the worker receives.
#[derive(Debug)]
pub(crate) enum WorkerInput {
    /// A record the poll thread read.
    Record(OwnedMessage),
    /// Stop: drop waiting events, let in-flight ones finish (cancelling them at `cancel_at`,
    /// giving up at `give_up_at`), then report the final committable position.
    Drain {
        cancel_at: Instant,
        give_up_at: Instant,
        ack: oneshot::Sender<Option<i64>>,
    },
}

struct Worker {
    /// Topic name shared by every message of this partition.
    topic: Arc<str>,
    /// Partition number.
    partition: i32,
    /// Client-wide engine: config, scheduler, dispatcher.
    engine: Arc<Engine>,
    /// Shared with the poll thread.
    shared: Arc<PartitionShared>,
    /// Where outcomes are sent; cloned into each job's completion.
    done: mpsc::UnboundedSender<Finished>,
    /// Per-key FIFO of events waiting behind the key's in-flight event.
    keys: KeyQueues<Key, ConsumedMessage>,
    /// Taken offsets and the commit watermark.
    tracker: OffsetTracker,
    /// Cancellation of each in-flight event, by offset.
    in_flight: HashMap<i64, CancelToken>,
    /// Cancelled on drain so events still waiting for a runner never start.
    abort: CancelToken,
}

/// Spawns the worker of one partition on the shared runtime.
pub(crate) fn spawn_worker(
    engine: Arc<Engine>,
    topic: Arc<str>,
    partition: i32,
    shared: Arc<PartitionShared>,
) -> mpsc::UnboundedSender<WorkerInput> {
    let (tx, rx) = mpsc::unbounded_channel();
    let (done, done_rx) = mpsc::unbounded_channel();
    let worker = Worker {
        topic,
        partition,
        engine: engine.clone(),
        shared,
        done,
        keys: KeyQueues::new(),
        tracker: OffsetTracker::new(),
        in_flight: HashMap::new(),
        abort: CancelToken::new(),
    };
    engine.runtime.spawn(worker.run(rx, done_rx));
    tx
}

impl Worker {
    async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<WorkerInput>,
        mut done_rx: mpsc::UnboundedReceiver<Finished>,
    ) {
        loop {
            tokio::select! {
                // Outcomes first: they free room and release the keys' next events.
                biased;
                Some(finished) = done_rx.recv() => self.on_finished(finished),
                input = rx.recv() => match input {
                    Some(WorkerInput::Record(record)) => self.on_record(record),
                    Some(WorkerInput::Drain { cancel_at, give_up_at, ack }) => {
                        self.drain(&mut rx, &mut done_rx, cancel_at, give_up_at).await;
                        let _ = ack.send(self.tracker.committable());
                        return;
                    }
                    None => return,
                },
            }
        }
    }

    fn on_record(&mut self, record: OwnedMessage) {
        let offset = rdkafka::Message::offset(&record);
        if !self.tracker.take(offset) {
            // A replay below what we already took (e.g. after a seek): already handled.
            self.shared.release(1);
            return;
        }
        let message = match ConsumedMessage::decode(self.topic.clone(), &record) {
            Ok(message) => message,
            Err(bad) => {
                log::error!(
                    "skipping undecodable record topic={} partition={} offset={} key={:?}: {}",
                    self.topic,
                    self.partition,
                    bad.offset,
                    bad.key.as_deref(),
                    bad.reason
                );
                self.retire(offset);
                return;
            }
        };
        if let Some(group) = self.engine.config.group_id.as_deref() {
            if message.header(SOURCE_SYSTEM_HEADER) == Some(group) {
                log::debug!(
                    "skipping record produced by this group topic={} partition={} offset={}",
                    self.topic,
                    self.partition,
                    offset
                );
                self.retire(offset);
                return;
            }
        }
        if let Some(ready) = self.keys.push(message.key.clone(), message) {
            self.start(ready);
        }
    }

    fn on_finished(&mut self, finished: Finished) {
        let Finished {
            key,
            offset,
            outcome,
        } = finished;
        self.in_flight.remove(&offset);
        match outcome {
            Outcome::Success => self.retire(offset),
            Outcome::Failure {
                error_class,
                message,
                ..
            } => {
                // The runner logged the exception in full; until retries exist a failed event
                // is committed so that it does not block its partition.
                log::debug!(
                    "committing failed event topic={} partition={} offset={} ({error_class}: {message})",
                    self.topic,
                    self.partition,
                    offset
                );
                self.retire(offset);
            }
            // Not finished: the offset stays uncommitted and is re-delivered after a restart.
            Outcome::Abandoned => {}
        }
        if self.abort.is_cancelled() {
            return;
        }
        if let Some(next) = self.keys.finish(&key) {
            self.start(next);
        }
    }

    fn retire(&mut self, offset: i64) {
        let retired = self.tracker.finish(offset);
        if retired > 0 {
            if let Some(position) = self.tracker.committable() {
                self.shared.committable.store(position, Ordering::Release);
            }
            self.shared.release(retired);
        }
    }

    /// Starts the key's in-flight event: submits it to the scheduler; the runner's completion
    /// sends the outcome back to this worker.
    fn start(&mut self, message: ConsumedMessage) {
        let cancel = CancelToken::new();
        self.in_flight.insert(message.offset, cancel.clone());
        let key = message.key.clone();
        let offset = message.offset;
        let job = Job::new(
            Event::Message(message),
            cancel,
            self.abort.clone(),
            self.done.clone(),
            key,
            offset,
        );
        self.engine.scheduler.submit(job);
    }

    async fn drain(
        &mut self,
        rx: &mut mpsc::UnboundedReceiver<WorkerInput>,
        done_rx: &mut mpsc::UnboundedReceiver<Finished>,
        cancel_at: Instant,
        give_up_at: Instant,
    ) {
        self.abort.cancel();
        self.engine.scheduler.purge_aborted();
        let dropped = self.keys.take_waiting().len();
        let mut cancelled = false;
        // The poll thread drops its sender right after `Drain`; outcomes keep arriving on
        // `done_rx` (this worker holds a sender of it, so it never closes here).
        let mut input_open = true;
        let started = Instant::now();
        while !self.in_flight.is_empty() {
            let deadline = if cancelled { give_up_at } else { cancel_at };
            tokio::select! {
                Some(finished) = done_rx.recv() => self.on_finished(finished),
                input = rx.recv(), if input_open => match input {
                    Some(WorkerInput::Record(_)) => {}
                    Some(WorkerInput::Drain { ack, .. }) => { let _ = ack.send(None); }
                    None => input_open = false,
                },
                _ = sleep_until(deadline.into()) => {
                    if cancelled {
                        log::warn!(
                            "releasing topic={} partition={} with {} handler(s) still running after the shutdown timeout; their events stay uncommitted",
                            self.topic, self.partition, self.in_flight.len()
                        );
                        break;
                    }
                    log::info!(
                        "cancelling {} handler(s) of topic={} partition={} near the shutdown timeout",
                        self.in_flight.len(), self.topic, self.partition
                    );
                    for token in self.in_flight.values() {
                        token.cancel();
                    }
                    cancelled = true;
                }
            }
        }
        log::debug!(
            "drained topic={} partition={} in {:?} ({} waiting event(s) left for the next owner)",
            self.topic,
            self.partition,
            started.elapsed(),
            dropped
        );
    }
}
