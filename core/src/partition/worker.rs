//! The worker of one assigned partition: a tokio task that owns the partition's key queues and
//! offset tracker. Messages arrive from the poll thread; completions arrive from the runners that
//! ran each event; retry, dead-letter and store results arrive from small tasks this worker
//! spawned. Everything that mutates the queues or the tracker happens on this one task, so
//! neither needs a lock.
//!
//! An event goes through the stage list of [`super::stages`]: the admit stages when it is about
//! to become its key's in-flight event, the outcome stages after its handler. The parts of the
//! worker live beside this file: `timers.rs` (the partition's timers), `failure.rs` (the failure
//! policy, undecodable records), `deferral.rs` (deferred keys), `dedup.rs` (event-type filtering
//! and deduplication), `telemetry.rs` (the Report stage and the telemetry events).

mod dedup;
mod deferral;
mod failure;
mod telemetry;
mod timers;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use foldhash::quality::RandomState;
use rdkafka::message::OwnedMessage;
use tokio::sync::{mpsc, oneshot};
use tokio::time::sleep_until;

use self::deferral::{DeferReport, PartitionDeferral};
use self::timers::PartitionTimers;
use super::keys::KeyQueues;
use super::offsets::OffsetTracker;
use super::shared::{mono_ms, PartitionShared};
use super::stages::{self, Admission, Handled, ADMIT, OUTCOME};
use crate::cancel::CancelToken;
use crate::engine::Engine;
use crate::event::{ConsumedMessage, Event, TimerEvent, SOURCE_SYSTEM_HEADER};
use crate::handler::{Failure, Finished, Job, Outcome, Slot};
use crate::telemetry::{Detail, Kind};
use crate::timers::{KeyTimers, PartitionTimerHandle, Scope, Seconds, TimerChange};

type Key = Option<crate::event::Key>;

/// Error class reported for a handler that ignored its cancellation.
const QUARANTINED: &str = "Prosody::HandlerQuarantined";

/// An event waiting in (or at the head of) its key's queue.
#[derive(Debug, Clone)]
enum Pending {
    /// A consumed message.
    Message(Arc<ConsumedMessage>),
    /// A due timer of the key, by its time.
    Timer(crate::event::Key, Seconds),
    /// A deferred message re-read for its retry; its offset finished when it was deferred.
    Deferred(Arc<ConsumedMessage>),
}

impl Pending {
    /// The event's key queue and its slot.
    fn id(&self) -> (Key, Slot) {
        match self {
            Pending::Message(m) | Pending::Deferred(m) => (m.key.clone(), Slot::Offset(m.offset)),
            Pending::Timer(key, time) => (Some(key.clone()), Slot::Timer(*time)),
        }
    }
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
    /// Failed; its key's deferral is being stored.
    Deferring,
    /// Held by the dedup stage while the store is asked whether its id was handled.
    Checking,
}

/// A key's in-flight event.
#[derive(Debug)]
struct Flight {
    event: Pending,
    cancel: CancelToken,
    /// Handler runs so far.
    attempts: u32,
    stage: Stage,
    /// The message's dedup fingerprint, when the dedup stage computed one.
    fingerprint: Option<crate::dedup::Fingerprint>,
    /// Whether its id is remembered when it finishes (it succeeded or failed permanently).
    remember: bool,
    /// The event's span (a message's `process`, a timer's `fire timer`; its handler calls run
    /// in it), or the context the event carries.
    span: opentelemetry::Context,
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
    /// A deferral store operation or read finished.
    Defer(DeferReport),
    /// An admit stage rejected this in-flight event with this failure.
    Rejected(Key, Slot, Failure),
    /// The dedup store answered for these ids: whether each was handled before.
    Checked(Vec<(crate::dedup::Fingerprint, bool)>),
    /// The worker's dedup records reached the store (or failed to, logged).
    Remembered,
}

/// What the worker receives.
#[derive(Debug)]
pub(crate) enum WorkerInput {
    /// Records the poll thread read from the partition in one round, in offset order.
    Records(Vec<OwnedMessage>),
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
    /// The partition's deferred keys (pipeline mode with deferral on).
    deferral: Option<PartitionDeferral>,
    /// Dedup records for the store's next write.
    remembered: dedup::Batch<crate::dedup::Fingerprint>,
    /// Ids for the dedup store's next read.
    unchecked: dedup::Batch<crate::dedup::Fingerprint>,
    /// Ids looked up as their records arrived: the store's answer, `None` while it is read.
    ahead: crate::dedup::FingerprintMap<Option<bool>>,
    /// Events held by the dedup stage, by the id they wait for.
    held: crate::dedup::FingerprintMap<(Key, Slot)>,
    /// The fingerprint the dedup stage computed for the event being walked (its flight keeps
    /// it, so the outcome does not compute it again).
    admitted: Option<crate::dedup::Fingerprint>,
    /// Cancelled on drain so events still waiting for a runner never start, and helper tasks
    /// (retry delays, dead-letter sends) stop.
    abort: CancelToken,
    /// Jobs made ready in this turn, submitted to the scheduler together (one lock, at most one
    /// runner wake) before the worker waits or awaits a store.
    outbox: Vec<Job>,
}

/// Spawns the worker of one partition on the shared runtime; `committed` is the group's
/// committed position for it, when known (deferral uses it, see `worker/deferral.rs`).
pub(crate) fn spawn_worker(
    engine: Arc<Engine>,
    topic: Arc<str>,
    partition: i32,
    shared: Arc<PartitionShared>,
    committed: Option<i64>,
) -> mpsc::UnboundedSender<WorkerInput> {
    let (tx, rx) = mpsc::unbounded_channel();
    let (done, done_rx) = mpsc::unbounded_channel();
    let (internal, internal_rx) = mpsc::unbounded_channel();
    let (changes, changes_rx) = mpsc::unbounded_channel();
    let scope = Scope {
        group: Arc::from(engine.config.group_id.as_deref().unwrap_or_default()),
        topic: topic.clone(),
        partition,
    };
    let deferral = engine
        .deferral
        .clone()
        .map(|setup| PartitionDeferral::new(setup, scope.clone(), committed));
    let timers = engine.timers.clone().map(|store| PartitionTimers {
        handle: Arc::new(PartitionTimerHandle {
            store,
            scope,
            changes,
            spans: engine.spans.clone(),
            telemetry: engine.telemetry.clone(),
            events: shared.events.clone(),
        }),
        pending: BTreeSet::new(),
        firing: HashSet::new(),
        rearmed: HashSet::new(),
        spans: HashMap::new(),
        horizon: engine.config.slab_size,
        next_load: Instant::now(),
        clock: engine.clock.clone(),
        histograms: engine.scheduler.histograms(),
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
        deferral,
        remembered: dedup::Batch::new(dedup::WRITES),
        unchecked: dedup::Batch::new(dedup::READS),
        ahead: crate::dedup::FingerprintMap::default(),
        held: crate::dedup::FingerprintMap::default(),
        admitted: None,
        abort: CancelToken::new(),
        outbox: Vec::new(),
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

/// What the worker's wake-up sleep is armed for: (earliest pending timer, next timer load) and
/// the earliest deferred retry.
type Plan = (Option<(Option<Seconds>, Instant)>, Option<i64>);

impl Worker {
    async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<WorkerInput>,
        mut done_rx: mpsc::UnboundedReceiver<Finished>,
        mut internal_rx: mpsc::UnboundedReceiver<Internal>,
        mut changes_rx: mpsc::UnboundedReceiver<TimerChange>,
    ) {
        // Without its deferred keys the partition could run a deferred key's later messages
        // before its deferred ones: records wait (the poll thread stops at `max_uncommitted`)
        // until the load succeeds. A drain meanwhile reports nothing finished.
        let mut held = Vec::new();
        let mut tries = 0u32;
        while let Err(e) = self.load_deferred().await {
            tries = tries.saturating_add(1);
            let delay = self
                .engine
                .policy
                .ceiling(tries)
                .max(Duration::from_millis(100));
            tracing::error!(
                "could not load the deferred keys of topic={} partition={} ({e}); its messages wait, trying again in {delay:?}",
                self.topic,
                self.partition
            );
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                input = rx.recv() => match input {
                    Some(WorkerInput::Records(records)) => held.extend(records),
                    Some(WorkerInput::Drain { ack, .. }) => {
                        let _ = ack.send(self.tracker.committable());
                        return;
                    }
                    None => return,
                },
            }
        }
        self.load_timers().await;
        self.fire_deferred();
        for record in held {
            self.on_record(record);
        }
        // One sleep for the schedule of timers and deferred retries, re-armed only when the plan
        // (earliest pending timer, next timer load, earliest deferred retry) changes: building a
        // fresh sleep per loop turn would register and drop a timer-wheel entry per message.
        let wake = sleep_until(Instant::now().into());
        tokio::pin!(wake);
        let mut armed: Option<Plan> = None;
        let mut clock = self.engine.clock.watch();
        loop {
            self.flush_jobs();
            self.publish_counts();
            let plan = self.plan();
            if plan != armed {
                if let Some(at) = self.wake_at() {
                    wake.as_mut().reset(at.into());
                }
                armed = plan;
            }
            tokio::select! {
                // Outcomes first: they free room and release the keys' next events.
                biased;
                Some(finished) = done_rx.recv() => {
                    self.on_finished(finished).await;
                    // The outcomes already waiting, in the same turn (bounded by the events in
                    // flight): one wake, one submit and one publish for a run of completions.
                    while let Ok(finished) = done_rx.try_recv() {
                        self.on_finished(finished).await;
                    }
                }
                Some(internal) = internal_rx.recv() => self.on_internal(internal).await,
                Some(change) = changes_rx.recv() => {
                    self.deferred_timer_change(&change);
                    if let Some(timers) = self.timers.as_mut() {
                        timers.apply(change);
                    }
                    self.fire_due();
                }
                // A test moved the timer clock: load the window it reached and fire what is due.
                Ok(()) = clock.changed() => {
                    let moved = *clock.borrow_and_update();
                    armed = None;
                    if let Some(timers) = self.timers.as_mut() {
                        timers.next_load = Instant::now();
                    }
                    self.load_timers().await;
                    // In flight first: the testing kit reads the move, then the count.
                    self.publish_counts();
                    self.shared
                        .clock_seen
                        .store(moved, std::sync::atomic::Ordering::Release);
                }
                () = &mut wake, if armed.is_some() => {
                    armed = None;
                    if self.timers.as_ref().is_some_and(|t| Instant::now() >= t.next_load) {
                        self.load_timers().await;
                    }
                    self.fire_due();
                    self.fire_deferred();
                }
                input = rx.recv() => match input {
                    Some(WorkerInput::Records(records)) => {
                        for record in records {
                            self.on_record(record);
                        }
                    }
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

    /// Publishes the partition's counts for `/metrics`: events in flight (one per busy key:
    /// running, waiting for a handler slot or for a retry; the testing kit waits until none is),
    /// events queued behind them, timers pending and keys deferred.
    fn publish_counts(&self) {
        use std::sync::atomic::Ordering::{Relaxed, Release};
        let shared = &self.shared;
        shared.queued.store(self.keys.waiting(), Relaxed);
        let pending = self.timers.as_ref().map_or(0, |t| t.pending.len());
        shared.timers_pending.store(pending, Relaxed);
        let deferred = self
            .deferral
            .as_ref()
            .map_or(0, PartitionDeferral::deferred_keys);
        shared.deferred_keys.store(deferred, Relaxed);
        shared.in_flight.store(self.keys.in_flight(), Release);
    }

    /// What the wake-up sleep is armed for; `None` when nothing is scheduled.
    fn plan(&self) -> Option<Plan> {
        let timers = self
            .timers
            .as_ref()
            .map(|t| (t.pending.first().map(|(s, _)| *s), t.next_load));
        let deferred = self
            .deferral
            .as_ref()
            .and_then(PartitionDeferral::next_due_ms);
        (timers.is_some() || deferred.is_some()).then_some((timers, deferred))
    }

    /// When the earliest timer, timer load or deferred retry is due.
    fn wake_at(&self) -> Option<Instant> {
        let timers = self
            .timers
            .as_ref()
            .map(|t| t.next_due().map_or(t.next_load, |due| due.min(t.next_load)));
        let deferred = self
            .deferral
            .as_ref()
            .and_then(PartitionDeferral::next_due_ms)
            .map(deferral::instant_of_ms);
        timers.into_iter().chain(deferred).min()
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
        let mut message = match ConsumedMessage::decode(self.topic.clone(), record, keep_raw) {
            Ok(message) => message,
            Err(bad) => {
                self.deferral_received(None, offset);
                self.on_undecodable(*bad);
                return;
            }
        };
        message.trace = self
            .engine
            .spans
            .receive(message.origin(), &message.headers);
        self.tell_message(Kind::MessageReceived, &message, Detail::None);
        self.deferral_received(message.key.as_ref(), offset);
        self.read_ahead(&message);
        let key = message.key.clone();
        if let Some(ready) = self.keys.push(key, Pending::Message(Arc::new(message))) {
            self.start(ready);
        }
    }

    /// Walks the admit stages for an event that is about to become its key's in-flight event;
    /// runs it when every stage lets it through.
    fn start(&mut self, first: Pending) {
        self.walk(first, 0, None);
    }

    /// Walks the admit stages from `ADMIT[from]` (or acts on `decided`, the admission of a stage
    /// that held the event). When a stage takes the event over or skips it, the key's next
    /// waiting event is walked the same way, from the first stage.
    fn walk(&mut self, first: Pending, from: usize, decided: Option<Admission>) {
        let mut pending = first;
        let mut from = from;
        let mut decided = decided;
        loop {
            let admission = match decided.take() {
                Some(admission) => admission,
                None => {
                    if from == 0 {
                        self.admitted = None;
                    }
                    let mut admission = Admission::Pass;
                    for stage in ADMIT.iter().skip(from) {
                        admission = self.admit_stage(*stage, &pending);
                        if admission != Admission::Pass {
                            break;
                        }
                    }
                    admission
                }
            };
            if admission == Admission::Hold {
                return;
            }
            self.deferral_admitted(&pending);
            match admission {
                Admission::Pass => {
                    self.submit(pending);
                    return;
                }
                Admission::Reject(failure) => {
                    self.reject(pending, failure);
                    return;
                }
                Admission::Skip => self.skip(&pending),
                Admission::Taken | Admission::Hold => {}
            }
            if self.abort.is_cancelled() {
                return;
            }
            match self.keys.finish(&pending.id().0) {
                Some(next) => {
                    pending = next;
                    from = 0;
                }
                None => return,
            }
        }
    }

    fn admit_stage(&mut self, stage: stages::Admit, pending: &Pending) -> Admission {
        match stage {
            stages::Admit::SourceSystem => self.admit_source_system(pending),
            stages::Admit::EventType => self.admit_event_type(pending),
            stages::Admit::Dedup => self.admit_dedup(pending),
            stages::Admit::Deferred => self.admit_deferred(pending),
            stages::Admit::Monopolization => self.admit_monopolization(pending),
        }
    }

    /// Finishes an event an admit stage skipped, as a success would: a fresh message's offset
    /// finishes; a deferred message leaves its key's list and the key moves on.
    fn skip(&mut self, pending: &Pending) {
        if let Pending::Message(message) = pending {
            crate::spans::finish_as(&message.trace, "skipped");
        }
        match pending {
            Pending::Message(message) => self.retire(message.offset),
            Pending::Deferred(message) => {
                if let Some(key) = message.key.clone() {
                    self.deferred_done(key.clone(), message.offset);
                    self.advance(&key);
                }
            }
            Pending::Timer(..) => {}
        }
    }

    /// The [`Admit::Monopolization`](stages::Admit) stage.
    fn admit_monopolization(&self, pending: &Pending) -> Admission {
        let (Pending::Message(message) | Pending::Deferred(message)) = pending else {
            return Admission::Pass;
        };
        let (Some(monopoly), Some(key)) = (self.engine.monopoly.as_ref(), message.key.as_ref())
        else {
            return Admission::Pass;
        };
        let Some((share, log)) = monopoly.check(key) else {
            return Admission::Pass;
        };
        let window = monopoly.window();
        if log {
            tracing::warn!(
                "key={} of topic={} partition={} used {:.0}% of the last {window:?} of handler time \
                 (monopolization_threshold {:.0}%); its messages are rejected until it falls under",
                crate::event::show_key(Some(key)),
                self.topic,
                self.partition,
                share * 100.0,
                self.engine.config.monopolization_threshold * 100.0
            );
        }
        Admission::Reject(Failure::transient(
            crate::monopoly::MONOPOLIZATION_ERROR,
            format!(
                "the key used {:.0}% of the last {window:?} of handler time",
                share * 100.0
            ),
        ))
    }

    /// Makes the event its key's in-flight event as if its handler had failed with `failure`;
    /// the outcome stages take it from there.
    fn reject(&mut self, pending: Pending, failure: Failure) {
        let (key, slot) = pending.id();
        self.in_flight.insert(
            (key.clone(), slot),
            Flight {
                cancel: CancelToken::new(),
                attempts: 1,
                stage: Stage::Running,
                // The dedup stage ran before the rejecting one: its fingerprint is this event's.
                fingerprint: self.admitted.take(),
                remember: false,
                span: self.event_span(&pending),
                event: pending,
            },
        );
        let _ = self.internal.send(Internal::Rejected(key, slot, failure));
    }

    /// The [`Admit::SourceSystem`](stages::Admit) stage: records this group produced finish
    /// without a handler call.
    fn admit_source_system(&mut self, pending: &Pending) -> Admission {
        let (Pending::Message(message), Some(group)) =
            (pending, self.engine.config.group_id.as_deref())
        else {
            return Admission::Pass;
        };
        if message.header(SOURCE_SYSTEM_HEADER) != Some(group.as_bytes()) {
            return Admission::Pass;
        }
        tracing::debug!(
            "skipping record produced by this group topic={} partition={} offset={}",
            self.topic,
            self.partition,
            message.offset
        );
        self.engine.skipped.own.fetch_add(1, Ordering::Relaxed);
        Admission::Skip
    }

    /// Makes the event its key's in-flight event and submits it to the scheduler; the runner's
    /// completion sends the outcome back to this worker.
    fn submit(&mut self, pending: Pending) {
        let cancel = CancelToken::new();
        let (key, slot) = pending.id();
        let deferred = matches!(pending, Pending::Deferred(_));
        let span = self.event_span(&pending);
        let mut job = self.job(
            key.clone(),
            slot,
            pending.clone(),
            cancel.clone(),
            span.clone(),
        );
        if deferred {
            // A deferred message's run is a retry: charged to the retries' share.
            job = job.retry();
        }
        if let Pending::Timer(..) = pending {
            self.tell(
                (Kind::TimerFired, Kind::TimerFired),
                &pending,
                &span,
                Detail::None,
            );
        }
        self.in_flight.insert(
            (key, slot),
            Flight {
                event: pending,
                cancel,
                attempts: 1,
                stage: Stage::Running,
                fingerprint: self.admitted.take(),
                remember: false,
                span,
            },
        );
        self.outbox.push(job);
    }

    /// Submits the jobs this turn made ready, in the order they became ready.
    fn flush_jobs(&mut self) {
        if !self.outbox.is_empty() {
            self.engine.scheduler.submit_all(self.outbox.drain(..));
        }
    }

    /// The span of an event about to become its key's in-flight event: a fresh message's was
    /// started when its record was read; a deferred message's and a timer's start now.
    fn event_span(&self, pending: &Pending) -> opentelemetry::Context {
        match pending {
            Pending::Message(message) => message.trace.clone(),
            Pending::Deferred(message) => {
                let cx = self
                    .engine
                    .spans
                    .receive(message.origin(), &message.headers);
                crate::spans::event(&cx, "deferred retry", Vec::new);
                cx
            }
            Pending::Timer(key, time) => {
                let stored = self.timers.as_ref().and_then(|t| t.span_of(key, *time));
                self.engine
                    .spans
                    .fire(&self.topic, self.partition, key, *time, stored.as_deref())
            }
        }
    }

    async fn on_finished(&mut self, finished: Finished) {
        if finished.outcome != Outcome::Success || matches!(finished.slot, Slot::Timer(_)) {
            // What follows may wait for a store: the jobs already made ready go first.
            self.flush_jobs();
        }
        let Finished { key, slot, outcome } = finished;
        let id = (key, slot);
        let Some(stage) = self.in_flight.get(&id).map(|f| f.stage) else {
            return;
        };
        let quarantined = stage == Stage::Quarantined;
        let result = match outcome {
            Outcome::Quarantined => {
                // Only for the attempt the watchdog cancelled and that is still running: a notice
                // that arrives after that attempt's own outcome (it is sent outside the
                // scheduler's lock) must not touch a retry or a dead-letter send.
                if let Some(flight) = self.in_flight.get_mut(&id) {
                    if flight.stage == Stage::Running && flight.cancel.is_cancelled() {
                        flight.stage = Stage::Quarantined;
                    }
                }
                return;
            }
            Outcome::Abandoned => {
                self.abandoned(id);
                return;
            }
            // Whatever a quarantined handler finally reports counts as a transient failure.
            _ if quarantined => {
                let timeout = self.engine.config.effective_timeout();
                Err(Failure::transient(
                    QUARANTINED,
                    format!(
                        "the handler ignored its cancellation after the {timeout:?} timeout and \
                         was quarantined; its result does not count"
                    ),
                ))
            }
            Outcome::Success => Ok(()),
            Outcome::Failure(failure) => Err(failure),
        };
        self.outcome(id, result).await;
    }

    /// Walks the outcome stages.
    async fn outcome(&mut self, id: (Key, Slot), result: Result<(), Failure>) {
        for stage in OUTCOME {
            if self.outcome_stage(stage, &id, &result).await == Handled::Done {
                return;
            }
        }
    }

    async fn outcome_stage(
        &mut self,
        stage: stages::Outcome,
        id: &(Key, Slot),
        result: &Result<(), Failure>,
    ) -> Handled {
        match (stage, result) {
            (stages::Outcome::Report, _) => {
                self.report(id, result);
                Handled::Next
            }
            (stages::Outcome::Remember, _) => {
                self.remember(id, result);
                Handled::Next
            }
            (stages::Outcome::Account, _) => {
                if let Some(d) = self.deferral.as_ref() {
                    d.gate().record(result.is_err());
                }
                Handled::Next
            }
            (stages::Outcome::Defer, Err(failure)) => self.defer_failure(id, failure).await,
            (stages::Outcome::Defer, Ok(())) => Handled::Next,
            (stages::Outcome::Policy, Ok(())) => {
                self.succeeded(id.clone()).await;
                Handled::Done
            }
            (stages::Outcome::Policy, Err(failure)) => {
                self.apply_policy(id.clone(), failure.clone()).await;
                Handled::Done
            }
        }
    }

    /// Not finished: the offset stays uncommitted and is re-delivered after a restart; a timer
    /// stays stored; a deferred message stays deferred.
    fn abandoned(&mut self, id: (Key, Slot)) {
        let flight = self.in_flight.remove(&id);
        if let Some(flight) = flight.as_ref() {
            crate::spans::finish_as(&flight.span, "abandoned");
        }
        match (id.1, id.0.clone(), flight.map(|f| f.event)) {
            (Slot::Timer(time), Some(key), _) => {
                // It fires again (unless the partition is going away).
                if let Some(timers) = self.timers.as_mut() {
                    timers.unfire(&key, time);
                    if !self.abort.is_cancelled() {
                        timers.pending.insert((time, key));
                    }
                }
            }
            (_, _, Some(Pending::Deferred(message))) => self.deferred_abandoned(message),
            _ => {}
        }
        self.next_of(&id.0);
        if let Some(key) = id.0 {
            self.advance(&key);
        }
    }

    /// The event is done: retire its offset (a deferred message's finished when it was
    /// deferred: it leaves its key's list instead), or delete its timer; start the key's next
    /// event.
    async fn succeeded(&mut self, id: (Key, Slot)) {
        let flight = self.in_flight.remove(&id);
        if let Some(flight) = flight.as_ref() {
            self.remember_finished(flight);
            crate::spans::finish_as(&flight.span, "success");
        }
        let deferred = matches!(flight.map(|f| f.event), Some(Pending::Deferred(_)));
        match (id.1, id.0.clone()) {
            (Slot::Offset(offset), Some(key)) if deferred => self.deferred_done(key, offset),
            (Slot::Offset(offset), _) => self.retire(offset),
            (Slot::Timer(time), Some(key)) => {
                self.timer_done(key.clone(), time).await;
                self.timer_deferral_done(&key, time);
            }
            (Slot::Timer(_), None) => {}
        }
        self.next_of(&id.0);
        if let (true, Some(key)) = (deferred, id.0) {
            self.advance(&key);
        }
    }

    async fn on_internal(&mut self, internal: Internal) {
        // What follows may wait for a store: the jobs already made ready go first.
        self.flush_jobs();
        match internal {
            Internal::RetryDue(key, slot) => self.retry_due(key, slot),
            Internal::DeadLettered(key, slot) => {
                let id = (key, slot);
                if let Some(flight) = self
                    .in_flight
                    .get(&id)
                    .filter(|f| f.stage == Stage::DeadLettering)
                {
                    crate::spans::finish_as(&flight.span, "dead_lettered");
                    self.succeeded(id).await;
                }
            }
            Internal::UndecodableSent(offset) => {
                self.undecodable = self.undecodable.saturating_sub(1);
                self.retire(offset);
            }
            Internal::Defer(report) => self.on_defer_report(report).await,
            Internal::Rejected(key, slot, failure) => {
                self.outcome((key, slot), Err(failure)).await;
            }
            Internal::Checked(answers) => self.on_checked(answers),
            Internal::Remembered => self.on_remembered(),
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

    /// Store writes of this partition still in flight.
    fn writes(&self) -> usize {
        self.deferral.as_ref().map_or(0, |d| d.writes) + self.remembered.in_flight()
    }

    fn job(
        &self,
        key: Key,
        slot: Slot,
        event: Pending,
        cancel: CancelToken,
        trace: opentelemetry::Context,
    ) -> Job {
        let event = match event {
            Pending::Message(message) | Pending::Deferred(message) => Event::Message(message),
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
        .traced(trace)
    }

    /// Whether a draining worker waits for this in-flight event (it is running or finishing);
    /// events waiting for a retry or for the dedup store are left to the next owner.
    fn runs_on(flight: &Flight) -> bool {
        !matches!(flight.stage, Stage::Waiting | Stage::Checking)
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
        // Events waiting for a retry (or for the dedup store) are left for the next owner,
        // uncommitted.
        self.in_flight.retain(|_, f| Self::runs_on(f));
        let mut cancelled = false;
        // The poll thread drops its sender right after `Drain`; outcomes keep arriving on
        // `done_rx` (this worker holds a sender of it, so it never closes here).
        let mut input_open = true;
        let started = Instant::now();
        while !self.in_flight.is_empty() || self.undecodable > 0 || self.writes() > 0 {
            self.flush_jobs();
            let deadline = if cancelled { give_up_at } else { cancel_at };
            tokio::select! {
                Some(finished) = done_rx.recv() => self.on_finished(finished).await,
                Some(internal) = internal_rx.recv() => self.on_internal(internal).await,
                input = rx.recv(), if input_open => match input {
                    Some(WorkerInput::Records(_)) => {}
                    Some(WorkerInput::Drain { ack, .. }) => { let _ = ack.send(None); }
                    None => input_open = false,
                },
                _ = sleep_until(deadline.into()) => {
                    if cancelled {
                        tracing::warn!(
                            "releasing topic={} partition={} with {} event(s) still in flight after the shutdown timeout; they stay uncommitted",
                            self.topic, self.partition, self.in_flight.len() + self.undecodable + self.writes()
                        );
                        break;
                    }
                    tracing::info!(
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
            self.in_flight.retain(|_, f| Self::runs_on(f));
        }
        tracing::debug!(
            "drained topic={} partition={} in {:?} ({} waiting event(s) left for the next owner)",
            self.topic,
            self.partition,
            started.elapsed(),
            dropped
        );
    }
}
