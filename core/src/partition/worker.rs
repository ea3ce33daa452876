//! The worker of one assigned partition: a tokio task that owns the partition's key queues and
//! offset tracker. Messages arrive from the poll thread; completions arrive from the runners that
//! ran each event; retry and dead-letter results arrive from small tasks this worker spawned.
//! Everything that mutates the queues or the tracker happens on this one task, so neither needs
//! a lock.
//!
//! A failed event stays its key's in-flight event until the failure policy is done with it: a
//! retry waits in place (blocking only that key), a dead-letter send must be acknowledged before
//! the offset retires. Other keys keep flowing meanwhile.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use foldhash::quality::RandomState;
use rdkafka::message::OwnedMessage;
use tokio::sync::{mpsc, oneshot};
use tokio::time::sleep_until;

use super::keys::KeyQueues;
use super::offsets::OffsetTracker;
use crate::cancel::CancelToken;
use crate::engine::Engine;
use crate::event::{show_key, ConsumedMessage, Event, TimerEvent, SOURCE_SYSTEM_HEADER};
use crate::failure::deadletter::{dead_letter_headers, DeadLetters};
use crate::failure::{Decision, Reason};
use crate::handler::{Failure, Finished, Job, Outcome, Slot};
use crate::timers::{self, KeyTimers, PartitionTimerHandle, Scope, Seconds, TimerChange};
use crate::waker::Waker;

type Key = Option<crate::event::Key>;

/// Error class reported for a handler that ignored its cancellation.
const QUARANTINED: &str = "Prosody::HandlerQuarantined";
/// Error class reported for a payload that is not JSON.
const UNDECODABLE: &str = "Prosody::UndecodablePayload";

/// An event waiting in (or at the head of) its key's queue.
#[derive(Debug, Clone)]
enum Pending {
    /// A consumed message.
    Message(Arc<ConsumedMessage>),
    /// A due timer of the key, by its time.
    Timer(crate::event::Key, Seconds),
}

/// Where a key's in-flight event is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// With the scheduler or a runner.
    Running,
    /// Running, but it ignored its cancellation: whatever it returns counts as a failure.
    Quarantined,
    /// Failed; waiting for its retry delay.
    Waiting,
    /// Being sent to the failure topic.
    DeadLettering,
}

/// A key's in-flight event.
#[derive(Debug)]
struct Flight {
    event: Pending,
    cancel: CancelToken,
    /// Handler runs so far.
    attempts: u32,
    stage: Stage,
}

/// What the worker's own helper tasks report.
#[derive(Debug)]
enum Internal {
    /// The retry delay of this in-flight event passed.
    RetryDue(Key, Slot),
    /// This in-flight event reached the failure topic.
    DeadLettered(Key, Slot),
    /// This undecodable record reached the failure topic.
    UndecodableSent(i64),
}

/// The partition's timers as the worker schedules them.
struct PartitionTimers {
    /// Store, scope and change channel, shared with the contexts of this partition's jobs.
    handle: Arc<PartitionTimerHandle>,
    /// Stored timers not yet handed to their key's queue, earliest first.
    pending: BTreeSet<(Seconds, crate::event::Key)>,
    /// Timers in a key queue or running; removed from the store only after success.
    firing: HashSet<(crate::event::Key, Seconds)>,
    /// Firing timers that their key scheduled again meanwhile (e.g. `on_timer` re-arming for the
    /// same second): kept and fired again instead of deleted after success.
    rearmed: HashSet<(crate::event::Key, Seconds)>,
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

    /// A firing timer stopped running; returns whether its key scheduled it again meanwhile.
    fn unfire(&mut self, key: &crate::event::Key, time: Seconds) -> bool {
        let id = (key.clone(), time);
        self.firing.remove(&id);
        self.rearmed.remove(&id)
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
    fn take_due(&mut self) -> Vec<(crate::event::Key, Seconds)> {
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

/// Milliseconds on a process-wide monotonic clock, plus one (so 0 can mean "none").
fn mono_ms(at: Instant) -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    u64::try_from(at.saturating_duration_since(epoch).as_millis()).unwrap_or(u64::MAX - 1) + 1
}

/// State of a partition shared between its worker, the poll thread and health checks.
#[derive(Debug)]
pub struct PartitionShared {
    /// Messages taken from Kafka and not yet retired below the commit watermark. The poll thread
    /// only reads the partition while this is below `max_uncommitted`.
    held: AtomicUsize,
    /// The `max_uncommitted` bound.
    max: usize,
    /// Position the worker allows to commit; -1 until something finished.
    committable: AtomicI64,
    /// When the oldest unfinished message was taken ([`mono_ms`]); 0 when none is unfinished.
    oldest_unfinished: AtomicU64,
    /// Wakes the poll thread when the partition regains room.
    waker: Arc<Waker>,
}

impl PartitionShared {
    pub(crate) fn new(max: usize, waker: Arc<Waker>) -> Self {
        Self {
            held: AtomicUsize::new(0),
            max: max.max(1),
            committable: AtomicI64::new(-1),
            oldest_unfinished: AtomicU64::new(0),
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

    /// Whether the oldest unfinished message has waited longer than `threshold`.
    pub(crate) fn stalled(&self, threshold: Duration) -> bool {
        let since = self.oldest_unfinished.load(Ordering::Acquire);
        since != 0 && mono_ms(Instant::now()).saturating_sub(since) > threshold.as_millis() as u64
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
    /// Client-wide engine: config, scheduler, failure policy.
    engine: Arc<Engine>,
    /// Shared with the poll thread.
    shared: Arc<PartitionShared>,
    /// Where outcomes are sent; cloned into each job's completion.
    done: mpsc::UnboundedSender<Finished>,
    /// Where this worker's helper tasks report.
    internal: mpsc::UnboundedSender<Internal>,
    /// Per-key FIFO of events (messages and due timers) waiting behind the key's in-flight one.
    keys: KeyQueues<Key, Pending>,
    /// Taken offsets and the commit watermark.
    tracker: OffsetTracker,
    /// Each key's in-flight event.
    in_flight: HashMap<(Key, Slot), Flight, RandomState>,
    /// Undecodable records being dead-lettered.
    undecodable: usize,
    /// The partition's timers, when a store is configured.
    timers: Option<PartitionTimers>,
    /// Cancelled on drain so events still waiting for a runner never start, and helper tasks
    /// (retry delays, dead-letter sends) stop.
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
    let (internal, internal_rx) = mpsc::unbounded_channel();
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
        horizon: engine.config.slab_size,
        next_load: Instant::now(),
    });
    let worker = Worker {
        topic,
        partition,
        engine: engine.clone(),
        shared,
        done,
        internal,
        keys: KeyQueues::new(),
        tracker: OffsetTracker::new(),
        in_flight: HashMap::default(),
        undecodable: 0,
        timers,
        abort: CancelToken::new(),
    };
    let name = format!("{}/{partition}", worker.topic);
    let task = engine
        .runtime
        .spawn(worker.run(rx, done_rx, internal_rx, changes_rx));
    // Watches the worker (and ends with it), so that a panic is logged and marks the engine.
    let watched = engine.clone();
    engine.runtime.spawn(async move {
        if let Err(e) = task.await {
            if e.is_panic() {
                let panic = e.into_panic();
                watched.fail(format!(
                    "the worker of partition {name} panicked: {}",
                    crate::engine::panic_message(panic.as_ref())
                ));
            }
        }
    });
    tx
}

impl Worker {
    async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<WorkerInput>,
        mut done_rx: mpsc::UnboundedReceiver<Finished>,
        mut internal_rx: mpsc::UnboundedReceiver<Internal>,
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
                Some(internal) = internal_rx.recv() => self.on_internal(internal).await,
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
                        self.drain(&mut rx, &mut done_rx, &mut internal_rx, cancel_at, give_up_at).await;
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
        if self.tracker.uncommitted() == 1 {
            self.publish_oldest();
        }
        let keep_raw = self.engine.dead_letters.is_some();
        let message = match ConsumedMessage::decode(self.topic.clone(), record, keep_raw) {
            Ok(message) => message,
            Err(bad) => {
                self.on_undecodable(*bad);
                return;
            }
        };
        if let Some(group) = self.engine.config.group_id.as_deref() {
            if message.header(SOURCE_SYSTEM_HEADER) == Some(group.as_bytes()) {
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
        let key = message.key.clone();
        if let Some(ready) = self.keys.push(key, Pending::Message(Arc::new(message))) {
            self.start(ready);
        }
    }

    /// A record whose payload is not JSON: dead-lettered with its raw bytes when a failure topic
    /// is set (committed once the send is acknowledged), otherwise logged and committed.
    fn on_undecodable(&mut self, bad: crate::event::Undecodable) {
        let crate::event::Undecodable {
            offset,
            key,
            reason,
            raw,
        } = bad;
        let Some(dead_letters) = self.engine.dead_letters.clone() else {
            log::error!(
                "skipping undecodable record topic={} partition={} offset={offset} key={}: {reason} \
                 (set failure_topic to keep such records)",
                self.topic,
                self.partition,
                show_key(key.as_deref()),
            );
            self.retire(offset);
            return;
        };
        log::error!(
            "sending undecodable record topic={} partition={} offset={offset} key={} to {}: {reason}",
            self.topic,
            self.partition,
            show_key(key.as_deref()),
            dead_letters.topic
        );
        self.undecodable += 1;
        let failure = Failure::permanent(UNDECODABLE, reason);
        self.spawn_dead_letter(
            dead_letters,
            raw,
            Reason::Undecodable,
            &failure,
            0,
            Internal::UndecodableSent(offset),
        );
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
        let id = (key, slot);
        let Some(stage) = self.in_flight.get(&id).map(|f| f.stage) else {
            return;
        };
        let quarantined = stage == Stage::Quarantined;
        match outcome {
            Outcome::Quarantined => {
                // Only for the attempt the watchdog cancelled and that is still running: a notice
                // that arrives after that attempt's own outcome (it is sent outside the
                // scheduler's lock) must not touch a retry or a dead-letter send.
                if let Some(flight) = self.in_flight.get_mut(&id) {
                    if flight.stage == Stage::Running && flight.cancel.is_cancelled() {
                        flight.stage = Stage::Quarantined;
                    }
                }
            }
            Outcome::Abandoned => {
                // Not finished: the offset stays uncommitted and is re-delivered after a
                // restart; a timer stays stored.
                self.in_flight.remove(&id);
                // A timer stays stored: it fires again (unless the partition is going away).
                if let (Slot::Timer(time), Some(key)) = (id.1, id.0.clone()) {
                    if let Some(timers) = self.timers.as_mut() {
                        timers.unfire(&key, time);
                        if !self.abort.is_cancelled() {
                            timers.pending.insert((time, key));
                        }
                    }
                }
                self.next_of(&id.0);
            }
            // Whatever a quarantined handler finally reports counts as a transient failure.
            _ if quarantined => {
                let timeout = self.engine.config.effective_timeout();
                let failure = Failure::transient(
                    QUARANTINED,
                    format!(
                        "the handler ignored its cancellation after the {timeout:?} timeout and \
                         was quarantined; its result does not count"
                    ),
                );
                self.failed(id, failure).await;
            }
            Outcome::Success => self.succeeded(id).await,
            Outcome::Failure(failure) => self.failed(id, failure).await,
        }
    }

    /// The event is done: retire its offset, or delete its timer; start the key's next event.
    async fn succeeded(&mut self, id: (Key, Slot)) {
        self.in_flight.remove(&id);
        match id.1 {
            Slot::Offset(offset) => self.retire(offset),
            Slot::Timer(time) => {
                if let Some(key) = id.0.clone() {
                    self.timer_done(key, time).await;
                }
            }
        }
        self.next_of(&id.0);
    }

    /// Applies the failure policy to a failed event.
    async fn failed(&mut self, id: (Key, Slot), failure: Failure) {
        let what = self.describe(&id);
        let Some(flight) = self.in_flight.get_mut(&id) else {
            return;
        };
        let attempts = flight.attempts;
        let decision = self.engine.policy.decide(&failure, attempts);
        match decision {
            Decision::Retry(delay) => {
                flight.stage = Stage::Waiting;
                log::warn!("{what} failed (attempt {attempts}, {failure}); retrying in {delay:?}");
                let internal = self.internal.clone();
                let abort = self.abort.clone();
                let (key, slot) = id;
                self.engine.runtime.spawn(async move {
                    tokio::time::sleep(delay).await;
                    if !abort.is_cancelled() {
                        let _ = internal.send(Internal::RetryDue(key, slot));
                    }
                });
            }
            Decision::DeadLetter(reason) => {
                // Timers have no record to dead-letter: they are given up instead.
                let raw = match &flight.event {
                    Pending::Message(message) => message.raw.clone(),
                    Pending::Timer(..) => None,
                };
                let (Some(raw), Some(dead_letters)) = (raw, self.engine.dead_letters.clone())
                else {
                    self.give_up(id, &what, &failure, attempts).await;
                    return;
                };
                log::error!(
                    "{what} failed (attempt {attempts}, {failure}); sending it to {} ({})",
                    dead_letters.topic,
                    reason.as_str()
                );
                flight.stage = Stage::DeadLettering;
                let (key, slot) = id;
                self.spawn_dead_letter(
                    dead_letters,
                    raw,
                    reason,
                    &failure,
                    attempts,
                    Internal::DeadLettered(key, slot),
                );
            }
            Decision::GiveUp => self.give_up(id, &what, &failure, attempts).await,
        }
    }

    /// Logs the failure of `what` and lets the event go (commits its offset, deletes its timer).
    async fn give_up(&mut self, id: (Key, Slot), what: &str, failure: &Failure, attempts: u32) {
        log::error!("{what} failed (attempt {attempts}, {failure}); giving up on it and moving on");
        self.succeeded(id).await;
    }

    fn describe(&self, id: &(Key, Slot)) -> String {
        match id.1 {
            Slot::Offset(offset) => format!(
                "message topic={} partition={} offset={offset} key={}",
                self.topic,
                self.partition,
                show_key(id.0.as_deref())
            ),
            Slot::Timer(time) => format!(
                "timer topic={} partition={} key={} time={time}",
                self.topic,
                self.partition,
                show_key(id.0.as_deref())
            ),
        }
    }

    /// Sends `raw` to the failure topic, retrying with backoff until it is acknowledged (the
    /// record is never dropped); reports `done` to this worker once sent. Stops when the
    /// partition is released (the offset then stays uncommitted).
    fn spawn_dead_letter(
        &self,
        dead_letters: Arc<DeadLetters>,
        raw: OwnedMessage,
        reason: Reason,
        failure: &Failure,
        attempts: u32,
        done: Internal,
    ) {
        let headers = dead_letter_headers(&raw, &dead_letters.group, reason, failure, attempts);
        let internal = self.internal.clone();
        let abort = self.abort.clone();
        let policy = self.engine.policy.clone();
        self.engine.runtime.spawn(async move {
            let mut tries = 0u32;
            loop {
                match dead_letters.send(&raw, &headers).await {
                    Ok(()) => {
                        let _ = internal.send(done);
                        return;
                    }
                    Err(e) => {
                        tries = tries.saturating_add(1);
                        let delay = policy.ceiling(tries);
                        log::error!(
                            "could not send topic={} partition={} offset={} to the failure topic ({}); retrying in {delay:?}",
                            rdkafka::Message::topic(&raw),
                            rdkafka::Message::partition(&raw),
                            rdkafka::Message::offset(&raw),
                            e.reason
                        );
                        tokio::time::sleep(delay).await;
                        if abort.is_cancelled() {
                            return;
                        }
                    }
                }
            }
        });
    }

    async fn on_internal(&mut self, internal: Internal) {
        match internal {
            Internal::RetryDue(key, slot) => {
                if self.abort.is_cancelled() {
                    return;
                }
                let id = (key, slot);
                let Some(flight) = self.in_flight.get_mut(&id) else {
                    return;
                };
                if flight.stage != Stage::Waiting {
                    return;
                }
                flight.stage = Stage::Running;
                flight.attempts = flight.attempts.saturating_add(1);
                flight.cancel = CancelToken::new();
                let event = flight.event.clone();
                let cancel = flight.cancel.clone();
                let job = self.job(id.0, id.1, event, cancel).retry();
                self.engine.scheduler.submit(job);
            }
            Internal::DeadLettered(key, slot) => {
                let id = (key, slot);
                if self
                    .in_flight
                    .get(&id)
                    .is_some_and(|f| f.stage == Stage::DeadLettering)
                {
                    self.succeeded(id).await;
                }
            }
            Internal::UndecodableSent(offset) => {
                self.undecodable = self.undecodable.saturating_sub(1);
                self.retire(offset);
            }
        }
    }

    /// Starts the key's next waiting event, if any.
    fn next_of(&mut self, key: &Key) {
        if self.abort.is_cancelled() {
            return;
        }
        if let Some(next) = self.keys.finish(key) {
            self.start(next);
        }
    }

    /// A timer is done (succeeded or given up): delete it, unless its key scheduled it again
    /// while it ran (then it fires once more).
    async fn timer_done(&mut self, key: crate::event::Key, time: Seconds) {
        let Some(timers) = self.timers.as_mut() else {
            return;
        };
        if timers.unfire(&key, time) {
            timers.pending.insert((time, key));
            return;
        }
        if let Err(e) = timers
            .handle
            .store
            .unschedule(&timers.handle.scope, &key, time)
            .await
        {
            log::warn!(
                "could not delete fired timer key={key:?} time={time}: {e}; it may fire again"
            );
        }
    }

    fn retire(&mut self, offset: i64) {
        let retired = self.tracker.finish(offset);
        if retired > 0 {
            if let Some(position) = self.tracker.committable() {
                self.shared.committable.store(position, Ordering::Release);
            }
            self.publish_oldest();
            self.shared.release(retired);
        }
    }

    /// Publishes when the oldest unfinished message was taken, for stall detection.
    fn publish_oldest(&self) {
        let value = self.tracker.oldest_unfinished_since().map_or(0, mono_ms);
        self.shared
            .oldest_unfinished
            .store(value, Ordering::Release);
    }

    fn job(&self, key: Key, slot: Slot, event: Pending, cancel: CancelToken) -> Job {
        let event = match event {
            Pending::Message(message) => Event::Message(message),
            Pending::Timer(key, time) => Event::Timer(TimerEvent {
                topic: self.topic.clone(),
                partition: self.partition,
                key,
                time,
            }),
        };
        let timers = match (&self.timers, &key) {
            (Some(t), Some(k)) => Some(KeyTimers::new(t.handle.clone(), k.clone())),
            _ => None,
        };
        Job::new(
            event,
            cancel,
            self.abort.clone(),
            timers,
            self.done.clone(),
            key,
            slot,
        )
    }

    /// Starts the key's in-flight event: submits it to the scheduler; the runner's completion
    /// sends the outcome back to this worker.
    fn start(&mut self, pending: Pending) {
        let cancel = CancelToken::new();
        let (key, slot) = match &pending {
            Pending::Message(message) => (message.key.clone(), Slot::Offset(message.offset)),
            Pending::Timer(key, time) => (Some(key.clone()), Slot::Timer(*time)),
        };
        let job = self.job(key.clone(), slot, pending.clone(), cancel.clone());
        self.in_flight.insert(
            (key, slot),
            Flight {
                event: pending,
                cancel,
                attempts: 1,
                stage: Stage::Running,
            },
        );
        self.engine.scheduler.submit(job);
    }

    async fn drain(
        &mut self,
        rx: &mut mpsc::UnboundedReceiver<WorkerInput>,
        done_rx: &mut mpsc::UnboundedReceiver<Finished>,
        internal_rx: &mut mpsc::UnboundedReceiver<Internal>,
        cancel_at: Instant,
        give_up_at: Instant,
    ) {
        self.abort.cancel();
        self.engine.scheduler.purge_aborted();
        let dropped = self.keys.drop_waiting();
        // Events waiting for a retry are left for the next owner, uncommitted.
        self.in_flight.retain(|_, f| f.stage != Stage::Waiting);
        let mut cancelled = false;
        // The poll thread drops its sender right after `Drain`; outcomes keep arriving on
        // `done_rx` (this worker holds a sender of it, so it never closes here).
        let mut input_open = true;
        let started = Instant::now();
        while !self.in_flight.is_empty() || self.undecodable > 0 {
            let deadline = if cancelled { give_up_at } else { cancel_at };
            tokio::select! {
                Some(finished) = done_rx.recv() => self.on_finished(finished).await,
                Some(internal) = internal_rx.recv() => self.on_internal(internal).await,
                input = rx.recv(), if input_open => match input {
                    Some(WorkerInput::Record(_)) => {}
                    Some(WorkerInput::Drain { ack, .. }) => { let _ = ack.send(None); }
                    None => input_open = false,
                },
                _ = sleep_until(deadline.into()) => {
                    if cancelled {
                        log::warn!(
                            "releasing topic={} partition={} with {} event(s) still in flight after the shutdown timeout; they stay uncommitted",
                            self.topic, self.partition, self.in_flight.len() + self.undecodable
                        );
                        break;
                    }
                    log::info!(
                        "cancelling {} handler(s) of topic={} partition={} near the shutdown timeout",
                        self.in_flight.len(), self.topic, self.partition
                    );
                    for flight in self.in_flight.values() {
                        flight.cancel.cancel();
                    }
                    cancelled = true;
                }
            }
            // Failures during the drain retry later, under the next owner.
            self.in_flight.retain(|_, f| f.stage != Stage::Waiting);
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
