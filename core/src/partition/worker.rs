//! The worker of one assigned partition: a tokio task that owns the partition's key queues and
//! offset tracker. Messages arrive from the poll thread; completions arrive from the tasks that
//! ran each event. Everything that mutates the queues or the tracker happens on this one task, so
//! neither needs a lock.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::message::OwnedMessage;
use tokio::sync::{mpsc, oneshot};
use tokio::time::sleep_until;

use super::keys::KeyQueues;
use super::offsets::OffsetTracker;
use crate::cancel::CancelToken;
use crate::engine::Engine;
use crate::event::{ConsumedMessage, Event, TimerEvent, SOURCE_SYSTEM_HEADER};
use crate::handler::{Finished, Job, Outcome, Slot};
use crate::timers::{self, KeyTimers, PartitionTimerHandle, Scope, Seconds, TimerChange};
use crate::waker::Waker;

type Key = Option<Arc<str>>;

/// An event waiting in (or at the head of) its key's queue.
#[derive(Debug)]
enum Pending {
    /// A consumed message.
    Message(ConsumedMessage),
    /// A due timer of the key, by its time.
    Timer(Arc<str>, Seconds),
}

/// The partition's timers as the worker schedules them.
struct PartitionTimers {
    /// Store, scope and change channel, shared with the contexts of this partition's jobs.
    handle: Arc<PartitionTimerHandle>,
    /// Stored timers not yet handed to their key's queue, earliest first.
    pending: BTreeSet<(Seconds, Arc<str>)>,
    /// Timers in a key queue or running; removed from the store only after success.
    firing: HashSet<(Arc<str>, Seconds)>,
    /// Firing timers that their key scheduled again meanwhile (e.g. `on_timer` re-arming for the
    /// same second): kept and fired again instead of deleted after success.
    rearmed: HashSet<(Arc<str>, Seconds)>,
    /// Failed attempts per timer, for the retry backoff.
    attempts: HashMap<(Arc<str>, Seconds), u32>,
    /// How far ahead stored timers are loaded (`slab_size`); the rest load as time moves on.
    horizon: Duration,
    /// When to load the next window of stored timers.
    next_load: Instant,
}

impl PartitionTimers {
    fn apply(&mut self, change: TimerChange) {
        match change {
            TimerChange::Added(key, time) => {
                if self.firing.contains(&(key.clone(), time)) {
                    self.rearmed.insert((key, time));
                } else {
                    self.pending.insert((time, key));
                }
            }
            TimerChange::Removed(key, time) => {
                self.rearmed.remove(&(key.clone(), time));
                self.pending.remove(&(time, key));
            }
            TimerChange::Cleared(key) => {
                self.rearmed.retain(|(k, _)| *k != key);
                self.pending.retain(|(_, k)| *k != key);
            }
        }
    }

    /// When the earliest pending timer is due, as a monotonic instant.
    fn next_due(&self) -> Option<Instant> {
        let (time, _) = self.pending.first()?;
        let wall = std::time::UNIX_EPOCH + Duration::from_secs(u64::try_from(*time).unwrap_or(0));
        let wait = wall
            .duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO);
        Some(Instant::now() + wait)
    }

    /// Takes every pending timer whose time has come (never early: whole seconds elapsed).
    fn take_due(&mut self) -> Vec<(Arc<str>, Seconds)> {
        let now = timers::now();
        let mut due = Vec::new();
        while let Some((time, _)) = self.pending.first() {
            if *time > now {
                break;
            }
            if let Some((time, key)) = self.pending.pop_first() {
                self.firing.insert((key.clone(), time));
                due.push((key, time));
            }
        }
        due
    }
}

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
    /// Per-key FIFO of events (messages and due timers) waiting behind the key's in-flight one.
    keys: KeyQueues<Key, Pending>,
    /// Taken offsets and the commit watermark.
    tracker: OffsetTracker,
    /// Cancellation of each in-flight event.
    in_flight: HashMap<Slot, CancelToken>,
    /// The partition's timers, when a store is configured.
    timers: Option<PartitionTimers>,
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
    let (changes, changes_rx) = mpsc::unbounded_channel();
    let timers = engine.timers.clone().map(|store| PartitionTimers {
        handle: Arc::new(PartitionTimerHandle {
            store,
            scope: Scope {
                group: Arc::from(engine.config.group_id.as_deref().unwrap_or_default()),
                topic: topic.clone(),
                partition,
            },
            changes,
        }),
        pending: BTreeSet::new(),
        firing: HashSet::new(),
        rearmed: HashSet::new(),
        attempts: HashMap::new(),
        horizon: engine.config.slab_size,
        next_load: Instant::now(),
    });
    let worker = Worker {
        topic,
        partition,
        engine: engine.clone(),
        shared,
        done,
        keys: KeyQueues::new(),
        tracker: OffsetTracker::new(),
        in_flight: HashMap::new(),
        timers,
        abort: CancelToken::new(),
    };
    engine.runtime.spawn(worker.run(rx, done_rx, changes_rx));
    tx
}

impl Worker {
    async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<WorkerInput>,
        mut done_rx: mpsc::UnboundedReceiver<Finished>,
        mut changes_rx: mpsc::UnboundedReceiver<TimerChange>,
    ) {
        self.load_timers().await;
        // One sleep for the timer schedule, re-armed only when the plan (earliest pending timer,
        // next load) changes: building a fresh sleep per loop turn would register and drop a
        // timer-wheel entry for every message.
        let wake = sleep_until(Instant::now().into());
        tokio::pin!(wake);
        let mut armed: Option<(Option<Seconds>, Instant)> = None;
        loop {
            let plan = self
                .timers
                .as_ref()
                .map(|t| (t.pending.first().map(|(s, _)| *s), t.next_load));
            if plan != armed {
                if let Some(timers) = self.timers.as_ref() {
                    let at = timers
                        .next_due()
                        .map_or(timers.next_load, |due| due.min(timers.next_load));
                    wake.as_mut().reset(at.into());
                }
                armed = plan;
            }
            tokio::select! {
                // Outcomes first: they free room and release the keys' next events.
                biased;
                Some(finished) = done_rx.recv() => self.on_finished(finished).await,
                Some(change) = changes_rx.recv() => {
                    if let Some(timers) = self.timers.as_mut() {
                        timers.apply(change);
                    }
                    self.fire_due();
                }
                () = &mut wake, if armed.is_some() => {
                    armed = None;
                    if self.timers.as_ref().is_some_and(|t| Instant::now() >= t.next_load) {
                        self.load_timers().await;
                    }
                    self.fire_due();
                }
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
        if let Some(ready) = self
            .keys
            .push(message.key.clone(), Pending::Message(message))
        {
            self.start(ready);
        }
    }

    /// Loads the partition's overdue and near-future stored timers (up to `horizon` ahead) into
    /// the schedule; called on assignment and every half horizon after.
    async fn load_timers(&mut self) {
        let Some(timers) = self.timers.as_mut() else {
            return;
        };
        let horizon = i64::try_from(timers.horizon.as_secs()).unwrap_or(timers::MAX_TIME);
        let until = timers::now().saturating_add(horizon).min(timers::MAX_TIME);
        timers.next_load = Instant::now() + (timers.horizon / 2).max(Duration::from_secs(1));
        match timers.handle.store.load(&timers.handle.scope, until).await {
            Ok(loaded) => {
                for (key, time) in loaded {
                    if !timers.firing.contains(&(key.clone(), time)) {
                        timers.pending.insert((time, key));
                    }
                }
            }
            Err(e) => log::error!(
                "could not load the timers of topic={} partition={}: {e}; they fire after the next assignment",
                self.topic,
                self.partition
            ),
        }
        self.fire_due();
    }

    /// Hands every due timer to its key's queue.
    fn fire_due(&mut self) {
        if self.abort.is_cancelled() {
            return;
        }
        let due = match self.timers.as_mut() {
            Some(timers) => timers.take_due(),
            None => return,
        };
        for (key, time) in due {
            if let Some(ready) = self.keys.push(Some(key.clone()), Pending::Timer(key, time)) {
                self.start(ready);
            }
        }
    }

    async fn on_finished(&mut self, finished: Finished) {
        let Finished { key, slot, outcome } = finished;
        self.in_flight.remove(&slot);
        match slot {
            Slot::Offset(offset) => match outcome {
                Outcome::Success => self.retire(offset),
                Outcome::Failure {
                    error_class,
                    message,
                    ..
                } => {
                    // The runner logged the exception in full; until retries exist a failed
                    // message is committed so that it does not block its partition.
                    log::debug!(
                        "committing failed event topic={} partition={} offset={offset} ({error_class}: {message})",
                        self.topic,
                        self.partition,
                    );
                    self.retire(offset);
                }
                // Not finished: the offset stays uncommitted and is re-delivered after a restart.
                Outcome::Abandoned => {}
            },
            Slot::Timer(time) => {
                if let Some(timer_key) = key.clone() {
                    self.timer_finished(timer_key, time, outcome).await;
                }
            }
        }
        if self.abort.is_cancelled() {
            return;
        }
        if let Some(next) = self.keys.finish(&key) {
            self.start(next);
        }
    }

    /// A timer's handler ended: delete it after success; retry it with backoff after a failure
    /// (it stays stored, so it is never silently dropped); leave it stored when abandoned.
    async fn timer_finished(&mut self, key: Arc<str>, time: Seconds, outcome: Outcome) {
        let Some(timers) = self.timers.as_mut() else {
            return;
        };
        timers.firing.remove(&(key.clone(), time));
        match outcome {
            Outcome::Success => {
                timers.attempts.remove(&(key.clone(), time));
                if timers.rearmed.remove(&(key.clone(), time)) {
                    // Scheduled again while it ran: it stays stored and fires once more.
                    timers.pending.insert((time, key));
                    return;
                }
                if let Err(e) = timers
                    .handle
                    .store
                    .unschedule(&timers.handle.scope, &key, time)
                    .await
                {
                    log::warn!("could not delete fired timer key={key:?} time={time}: {e}; it may fire again");
                }
            }
            Outcome::Failure { .. } => {
                let attempts = timers.attempts.entry((key.clone(), time)).or_default();
                *attempts += 1;
                // 1 s, 2 s, 4 s, ... capped at one minute.
                let delay = Duration::from_secs(1u64 << (*attempts - 1).min(6))
                    .min(Duration::from_secs(60));
                log::warn!(
                    "on_timer failed for key={key:?} time={time} (attempt {attempts}); retrying in {delay:?}"
                );
                let changes = timers.handle.changes.clone();
                self.engine.runtime.spawn(async move {
                    tokio::time::sleep(delay).await;
                    let _ = changes.send(TimerChange::Added(key, time));
                });
            }
            Outcome::Abandoned => {
                if !self.abort.is_cancelled() {
                    timers.pending.insert((time, key));
                }
            }
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
    fn start(&mut self, pending: Pending) {
        let cancel = CancelToken::new();
        let (key, slot, event) = match pending {
            Pending::Message(message) => (
                message.key.clone(),
                Slot::Offset(message.offset),
                Event::Message(message),
            ),
            Pending::Timer(key, time) => (
                Some(key.clone()),
                Slot::Timer(time),
                Event::Timer(TimerEvent {
                    topic: self.topic.clone(),
                    partition: self.partition,
                    key,
                    time,
                }),
            ),
        };
        self.in_flight.insert(slot, cancel.clone());
        let timers = match (&self.timers, &key) {
            (Some(t), Some(k)) => Some(KeyTimers::new(t.handle.clone(), k.clone())),
            _ => None,
        };
        let job = Job::new(
            event,
            cancel,
            self.abort.clone(),
            timers,
            self.done.clone(),
            key,
            slot,
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
                Some(finished) = done_rx.recv() => self.on_finished(finished).await,
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
