//! Deferred retry inside a partition worker (pipeline mode; see [`crate::defer`]).
//!
//! A deferred key goes through these phases: `Waiting` for its retry's due time; `Reading` its
//! next offsets (from the cache or the store) and their records (from Kafka, one fetch for every
//! key due at once); `Running` one re-read message in the key's queue, so it never overlaps the
//! key's timers; `Idle` between two runs, or while an append is not yet acknowledged. A success
//! runs the key's next message at once; a transient failure waits for the next retry, with the
//! message kept in memory; the key leaves deferral when its list is empty.
//!
//! Order: a key's offsets run lowest first, and an offset is taken only when no lower append of
//! the key is still unacknowledged (acknowledgements may come back out of order).

use crate::telemetry::{Detail, Kind};
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use foldhash::quality::RandomState;
use rdkafka::message::OwnedMessage;

use super::{Internal, Key, Pending, Stage, Worker};
use crate::defer::{now_ms, DeferError, Deferral, Offset, Retry};
use crate::event::{self, show_key, ConsumedMessage};
use crate::failure::Reason;
use crate::handler::{Failure, Slot};
use crate::kafka::reload::Fetched;
use crate::partition::stages::{Admission, Handled};
use crate::timers::{Scope, Seconds};

/// Offsets of one key taken per read.
const PAGE: usize = 256;

/// Re-read messages a partition holds in memory at most (waiting in their keys' lists, or
/// being read); keys due beyond that wait their turn.
const LOADED_MAX: usize = 16_384;

/// Where a deferred key is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the retry's due time.
    Waiting,
    /// Its next offsets are being read.
    Reading,
    /// One re-read message is in the key's queue or running.
    Running,
    /// Between runs, or waiting for an append's acknowledgement.
    Idle,
    /// Due, waiting for room among the partition's re-read messages ([`LOADED_MAX`]).
    Queued,
}

/// A deferred key of this partition.
#[derive(Debug)]
struct DeferredKey {
    /// Failed attempts of the key's oldest message, and when it runs again.
    retry: Retry,
    phase: Phase,
    /// Stored offsets above `last` that this worker knows, lowest first.
    cached: BTreeSet<Offset>,
    /// Whether `cached` holds every stored offset above `last`.
    complete: bool,
    /// An acknowledged append was not cached since the last store read began.
    overflowed: bool,
    /// Highest offset taken for a run (store reads go above it).
    last: Offset,
    /// Appends not yet acknowledged.
    appending: BTreeSet<Offset>,
    /// Messages of the key received from Kafka and not yet through the admit stages (waiting
    /// behind the key's in-flight event): they will be appended, so nothing above them runs.
    incoming: BTreeSet<Offset>,
    /// Re-read messages waiting their turn, lowest offset first.
    loaded: VecDeque<Arc<ConsumedMessage>>,
}

impl DeferredKey {
    fn new(retry: Retry, complete: bool) -> Self {
        Self {
            retry,
            phase: Phase::Waiting,
            cached: BTreeSet::new(),
            complete,
            overflowed: false,
            last: -1,
            appending: BTreeSet::new(),
            incoming: BTreeSet::new(),
            loaded: VecDeque::new(),
        }
    }

    /// The lowest offset the key must not run yet: an unacknowledged append, a message still
    /// on its way to the admit stages, or `cap` (what this worker has not received yet).
    fn bound(&self, cap: Offset) -> Offset {
        let appending = self.appending.first().copied().unwrap_or(Offset::MAX);
        let incoming = self.incoming.first().copied().unwrap_or(Offset::MAX);
        appending.min(incoming).min(cap)
    }

    /// Cached offsets that may run now: those below [`DeferredKey::bound`].
    fn takeable(&self, cap: Offset) -> impl Iterator<Item = Offset> + '_ {
        let bound = self.bound(cap);
        self.cached.iter().copied().take_while(move |o| *o < bound)
    }

    /// Whether nothing of the key is on its way into its list.
    fn settled(&self) -> bool {
        self.appending.is_empty() && self.incoming.is_empty()
    }
}

/// The deferred keys of one partition.
pub(super) struct PartitionDeferral {
    /// The subscription's store, reader and settings.
    setup: Arc<Deferral>,
    /// This partition, for the store.
    scope: Scope,
    /// Every deferred key of the partition.
    keys: HashMap<event::Key, DeferredKey, RandomState>,
    /// Keys in `Waiting`, by due time (milliseconds since the epoch).
    due: BTreeSet<(i64, event::Key)>,
    /// Store writes in flight; a drain waits for them.
    pub(super) writes: usize,
    /// Re-read messages held in keys' lists, plus room reserved by reads in flight.
    loaded: usize,
    /// Keys waiting for room to read (`Phase::Queued`), first come first served.
    queued: VecDeque<event::Key>,
    /// The group's committed position when the partition was assigned (`None`: none, or it
    /// could not be read). Offsets from there on are re-delivered to this worker.
    floor: Option<Offset>,
    /// The highest offset this worker received from Kafka.
    received: Offset,
    /// The lowest stored offset a key could not take because this worker had not received it
    /// yet; when reception passes it, idle keys are moved on again.
    blocked: Offset,
    /// Keys whose application timer failed and waits for its deferred retry.
    timers: HashMap<event::Key, DeferredTimer, RandomState>,
    /// Deferred timers by due time (milliseconds since the epoch).
    timer_due: BTreeSet<(i64, event::Key)>,
}

/// A key's failed timer waiting for its retry. The timer stays stored (a new owner fires it
/// again); the key's later due timers wait behind it, its messages do not.
#[derive(Debug)]
struct DeferredTimer {
    /// The failed timer.
    time: Seconds,
    /// Its failed calls so far.
    attempts: u32,
    /// When it runs again.
    due_ms: i64,
    /// The key's later timers that came due meanwhile.
    parked: BTreeSet<Seconds>,
}

impl PartitionDeferral {
    pub(super) fn new(setup: Arc<Deferral>, scope: Scope, floor: Option<Offset>) -> Self {
        Self {
            setup,
            scope,
            loaded: 0,
            queued: VecDeque::new(),
            floor,
            received: -1,
            blocked: Offset::MAX,
            keys: HashMap::default(),
            due: BTreeSet::new(),
            writes: 0,
            timers: HashMap::default(),
            timer_due: BTreeSet::new(),
        }
    }

    /// Offsets from here on may still be re-delivered to this worker and appended by it:
    /// a stored offset at or above it (left by an earlier owner whose lower append never landed)
    /// waits until this worker received it, so a key's order holds across owners.
    fn cap(&self) -> Offset {
        self.floor.unwrap_or(0).max(self.received.saturating_add(1))
    }

    /// The subscription's failure rate.
    pub(super) fn gate(&self) -> &crate::defer::gate::FailureRate {
        &self.setup.gate
    }

    /// When the earliest waiting key is due (milliseconds since the epoch).
    /// Keys deferred in this partition (for `/metrics`).
    pub(super) fn deferred_keys(&self) -> usize {
        self.keys.len()
    }

    pub(super) fn next_due_ms(&self) -> Option<i64> {
        let messages = self.due.first().map(|(ms, _)| *ms);
        let timers = self.timer_due.first().map(|(ms, _)| *ms);
        messages.into_iter().chain(timers).min()
    }

    fn wait(&mut self, key: &event::Key, retry: Retry) {
        if let Some(state) = self.keys.get_mut(key) {
            self.due.remove(&(state.retry.due_ms, key.clone()));
            state.retry = retry;
            state.phase = Phase::Waiting;
            self.due.insert((retry.due_ms, key.clone()));
        }
    }
}

/// What deferral's helper tasks report to the worker.
#[derive(Debug)]
pub(super) enum DeferReport {
    /// A failed message's deferral was stored, or could not be.
    Deferred {
        key: event::Key,
        offset: Offset,
        retry: Retry,
        failure: Failure,
        result: Result<(), DeferError>,
    },
    /// A message of a deferred key was appended to its list (or the partition went away first).
    Appended {
        key: event::Key,
        offset: Offset,
        stored: bool,
    },
    /// A store write that only needed to land.
    Written,
    /// A deferred message that could not run reached the failure topic.
    DeadLettered { key: event::Key, offset: Offset },
    /// Offsets read for these keys, with whether the store has no more, and their records.
    Read {
        batch: Vec<ReadKey>,
        fetched: Result<HashMap<Offset, Fetched>, String>,
    },
}

/// Monotonic instant of a wall-clock time in milliseconds since the epoch.
pub(super) fn instant_of_ms(ms: i64) -> Instant {
    let wait = u64::try_from(ms.saturating_sub(now_ms())).unwrap_or(0);
    Instant::now() + Duration::from_millis(wait)
}

impl Worker {
    /// Loads the partition's deferred keys from the store (on assignment).
    pub(super) async fn load_deferred(&mut self) -> Result<(), DeferError> {
        let Some(d) = self.deferral.as_mut() else {
            return Ok(());
        };
        let keys = d.setup.store.load(&d.scope).await?;
        if !keys.is_empty() {
            tracing::info!(
                "topic={} partition={} has {} deferred key(s); retrying them when due",
                self.topic,
                self.partition,
                keys.len()
            );
        }
        for (key, retry) in keys {
            d.due.insert((retry.due_ms, key.clone()));
            d.keys.insert(key, DeferredKey::new(retry, false));
        }
        Ok(())
    }

    /// Runs a store write on the runtime, again after a backoff until it lands (or the
    /// partition is released), then reports `done(landed)`. A drain waits for it.
    fn spawn_write(&mut self, op: WriteOp, done: impl FnOnce(bool) -> Internal + Send + 'static) {
        let Some(d) = self.deferral.as_mut() else {
            return;
        };
        d.writes += 1;
        let (store, scope) = (d.setup.store.clone(), d.scope.clone());
        let internal = self.internal.clone();
        let abort = self.abort.clone();
        let policy = self.engine.policy.clone();
        self.engine.runtime.spawn(async move {
            let mut tries = 0u32;
            let landed = loop {
                let result = match &op {
                    WriteOp::Append(key, offset) => store.append(&scope, key, *offset).await,
                    WriteOp::Remove(key, offset) => store.remove(&scope, key, *offset).await,
                    WriteOp::Retry(key, retry) => store.set_retry(&scope, key, *retry).await,
                    WriteOp::Release(key, decided_us) => {
                        store.release(&scope, key, *decided_us).await
                    }
                };
                match result {
                    Ok(()) => break true,
                    Err(e) => {
                        tries = tries.saturating_add(1);
                        let delay = policy.ceiling(tries);
                        tracing::warn!(
                            "could not store {op:?} for topic={} partition={} ({e}); trying again in {delay:?}",
                            scope.topic,
                            scope.partition
                        );
                        tokio::time::sleep(delay).await;
                        if abort.is_cancelled() {
                            break false;
                        }
                    }
                }
            };
            let _ = internal.send(done(landed));
        });
    }

    /// Stores a write that only needs to land (remove, retry state, release).
    fn write(&mut self, op: WriteOp) {
        self.spawn_write(op, |_| Internal::Defer(DeferReport::Written));
    }

    /// The [`Admit::Deferred`](crate::partition::stages::Admit) stage: a message of a deferred
    /// key joins the key's list; its offset finishes once the append is acknowledged.
    pub(super) fn admit_deferred(&mut self, pending: &Pending) -> Admission {
        if let (Pending::Timer(key, time), Some(d)) = (pending, self.deferral.as_mut()) {
            // A later timer of a key whose timer is deferred waits behind it.
            return match d.timers.get_mut(key) {
                Some(deferred) if deferred.time != *time => {
                    deferred.parked.insert(*time);
                    Admission::Taken
                }
                _ => Admission::Pass,
            };
        }
        let Pending::Message(message) = pending else {
            return Admission::Pass;
        };
        let (Some(key), Some(d)) = (message.key.as_ref(), self.deferral.as_mut()) else {
            return Admission::Pass;
        };
        let Some(state) = d.keys.get_mut(key) else {
            return Admission::Pass;
        };
        let offset = message.offset;
        state.incoming.remove(&offset);
        state.appending.insert(offset);
        let key = key.clone();
        tracing::debug!(
            "message topic={} partition={} offset={offset} key={} joins its key's deferred messages",
            self.topic,
            self.partition,
            show_key(Some(&key))
        );
        let report_key = key.clone();
        self.spawn_write(WriteOp::Append(key, offset), move |stored| {
            Internal::Defer(DeferReport::Appended {
                key: report_key,
                offset,
                stored,
            })
        });
        Admission::Taken
    }

    /// A record arrived from Kafka: a message of a deferred key is on its way into its list
    /// (nothing of the key above it may run before it is appended); keys held back because this
    /// worker had not received an offset yet may move on.
    pub(super) fn deferral_received(&mut self, key: Option<&event::Key>, offset: Offset) {
        let Some(d) = self.deferral.as_mut() else {
            return;
        };
        d.received = d.received.max(offset);
        if let Some(state) = key.and_then(|k| d.keys.get_mut(k)) {
            state.incoming.insert(offset);
        }
        if d.blocked < d.cap() {
            d.blocked = Offset::MAX;
            let idle: Vec<event::Key> = d
                .keys
                .iter()
                .filter(|(_, s)| s.phase == Phase::Idle)
                .map(|(k, _)| k.clone())
                .collect();
            for key in idle {
                self.advance(&key);
            }
        }
    }

    /// A message left the admit stages (run, appended, skipped or rejected): it is no longer on
    /// its way into its key's list.
    pub(super) fn deferral_admitted(&mut self, pending: &Pending) {
        let Pending::Message(message) = pending else {
            return;
        };
        let Some(key) = message.key.as_ref() else {
            return;
        };
        let Some(state) = self.deferral.as_mut().and_then(|d| d.keys.get_mut(key)) else {
            return;
        };
        if state.incoming.remove(&message.offset) && state.phase == Phase::Idle {
            self.advance(&key.clone());
        }
    }

    /// The application unscheduled or cleared timers of a key: a deferred timer, or timers
    /// parked behind it, that were removed do not fire.
    pub(super) fn deferred_timer_change(&mut self, change: &crate::timers::TimerChange) {
        use crate::timers::TimerChange;
        let Some(d) = self.deferral.as_mut() else {
            return;
        };
        let (key, removed) = match change {
            TimerChange::Added(..) => return,
            TimerChange::Removed(key, time) => (key, Some(*time)),
            TimerChange::Cleared(key) => (key, None),
        };
        let Some(deferred) = d.timers.get_mut(key) else {
            return;
        };
        let unfired = match removed {
            // A parked timer.
            Some(time) if time != deferred.time => deferred.parked.remove(&time).then_some(time),
            // The deferred timer itself: its parked timers come due again.
            Some(_) => self.end_timer_deferral(key, true),
            None => self.end_timer_deferral(key, false),
        };
        if let (Some(timers), Some(time)) = (self.timers.as_mut(), unfired) {
            timers.unfire(key, time);
        }
        self.fire_due();
    }

    /// The [`Outcome::Defer`](crate::partition::stages::Outcome) stage.
    pub(super) async fn defer_failure(&mut self, id: &(Key, Slot), failure: &Failure) -> Handled {
        let Some(d) = self.deferral.as_ref() else {
            return Handled::Next;
        };
        let (Some(key), Slot::Offset(offset)) = (id.0.clone(), id.1) else {
            if let (Some(key), Slot::Timer(time)) = (id.0.clone(), id.1) {
                return self.defer_timer(id, key, time, failure).await;
            }
            return Handled::Next;
        };
        let Some(flight) = self.in_flight.get_mut(id) else {
            return Handled::Next;
        };
        match &flight.event {
            // A deferred message failed again: it stays deferred, whatever the failure rate.
            Pending::Deferred(message) if !failure.permanent => {
                let message = message.clone();
                let attempts = d
                    .keys
                    .get(&key)
                    .map_or(1, |s| s.retry.attempts)
                    .saturating_add(1);
                if d.setup.max_retries.is_some_and(|max| attempts > max) {
                    return self.poisoned(id.clone(), failure, attempts).await;
                }
                let (retry, delay) = d.setup.backoff.retry(attempts);
                tracing::warn!(
                    "{} failed again (deferred retry {}, {failure}); next retry in {delay:?}",
                    self.describe(id),
                    attempts - 1
                );
                if let Some(flight) = self.in_flight.remove(id) {
                    let kinds = (Kind::MessageDeferred, Kind::MessageDeferred);
                    self.tell(kinds, &flight.event, &flight.span, Detail::None);
                    crate::spans::event(&flight.span, "defer", Vec::new);
                    crate::spans::finish_as(&flight.span, "deferred");
                }
                if let Some(d) = self.deferral.as_mut() {
                    if let Some(state) = d.keys.get_mut(&key) {
                        state.loaded.push_front(message);
                        d.loaded += 1;
                    }
                    d.wait(&key, retry);
                }
                self.write(WriteOp::Retry(key.clone(), retry));
                self.next_of(&id.0);
                Handled::Done
            }
            Pending::Message(_) if !failure.permanent && d.setup.gate.allows_deferral() => {
                let (retry, delay) = d.setup.backoff.retry(1);
                flight.stage = Stage::Deferring;
                crate::spans::event(&flight.span, "defer", || {
                    vec![opentelemetry::KeyValue::new(
                        "error.type",
                        failure.error_class.clone(),
                    )]
                });
                crate::spans::finish_as(&flight.span, "deferred");
                tracing::warn!(
                    "{} failed ({failure}); deferring its key, first retry in {delay:?}",
                    self.describe(id)
                );
                let (store, scope) = (d.setup.store.clone(), d.scope.clone());
                let failure = failure.clone();
                let internal = self.internal.clone();
                let kinds = (Kind::MessageDeferred, Kind::MessageDeferred);
                self.tell_flight(kinds, id, Detail::None);
                if let Some(d) = self.deferral.as_mut() {
                    d.writes += 1;
                }
                self.engine.runtime.spawn(async move {
                    let result = store.defer(&scope, &key, offset, retry).await;
                    let _ = internal.send(Internal::Defer(DeferReport::Deferred {
                        key,
                        offset,
                        retry,
                        failure,
                        result,
                    }));
                });
                Handled::Done
            }
            _ => Handled::Next,
        }
    }

    /// A deferred message failed `defer_max_retries` deferred retries: dead-letter it (or log
    /// and skip it) and let the key move on.
    async fn poisoned(&mut self, id: (Key, Slot), failure: &Failure, attempts: u32) -> Handled {
        let what = self.describe(&id);
        let raw = match self.in_flight.get(&id).map(|f| &f.event) {
            Some(Pending::Deferred(message)) => message.raw.clone(),
            _ => None,
        };
        match (raw, self.engine.dead_letters.clone()) {
            (Some(raw), Some(dead_letters)) => {
                tracing::error!(
                    "{what} failed {attempts} times ({failure}), past defer_max_retries; sending it to {}",
                    dead_letters.topic
                );
                let mut trace = opentelemetry::Context::new();
                if let Some(flight) = self.in_flight.get_mut(&id) {
                    flight.stage = Stage::DeadLettering;
                    crate::spans::event(&flight.span, "dead letter", Vec::new);
                    trace = flight.span.clone();
                }
                let detail = Detail::DeadLetter {
                    failure_topic: Arc::from(dead_letters.topic.as_str()),
                    reason: Reason::RetriesExhausted.as_str(),
                };
                let kinds = (Kind::MessageDeadLettered, Kind::MessageDeadLettered);
                self.tell_flight(kinds, &id, detail);
                let (key, slot) = id;
                self.spawn_dead_letter(
                    dead_letters,
                    raw,
                    (Reason::RetriesExhausted, failure, attempts),
                    &trace,
                    Internal::DeadLettered(key, slot),
                );
                Handled::Done
            }
            _ => {
                tracing::error!(
                    "{what} failed {attempts} times ({failure}), past defer_max_retries; skipping it \
                     (set failure_topic to keep such messages)"
                );
                self.succeeded(id).await;
                Handled::Done
            }
        }
    }

    /// A deferral was stored (the offset finishes and the key's next event may start) or could
    /// not be (the failure is retried in place instead).
    async fn deferred(
        &mut self,
        key: event::Key,
        offset: Offset,
        retry: Retry,
        failure: Failure,
        result: Result<(), DeferError>,
    ) {
        let id = (Some(key.clone()), Slot::Offset(offset));
        let Some(flight) = self.in_flight.get_mut(&id) else {
            return;
        };
        if flight.stage != Stage::Deferring {
            return;
        }
        if let Err(e) = result {
            tracing::error!(
                "could not defer {} ({e}); retrying it in place",
                self.describe(&id)
            );
            if let Some(flight) = self.in_flight.get_mut(&id) {
                flight.stage = Stage::Running;
            }
            self.apply_policy(id, failure).await;
            return;
        }
        let message = match self.in_flight.remove(&id).map(|f| f.event) {
            Some(Pending::Message(message)) => Some(message),
            _ => None,
        };
        if let Some(d) = self.deferral.as_mut() {
            let mut state = DeferredKey::new(retry, true);
            state.last = offset;
            // The failed message is kept for its retry while the cache has room; otherwise it
            // is read again from Kafka.
            match message {
                Some(message) if d.keys.len() < d.setup.cache_size && d.loaded < LOADED_MAX => {
                    state.loaded.push_back(message);
                    d.loaded += 1;
                }
                _ => {
                    state.last = offset - 1;
                    state.cached.insert(offset);
                }
            }
            d.due.insert((retry.due_ms, key.clone()));
            d.keys.insert(key, state);
        }
        self.retire(offset);
        self.next_of(&id.0);
    }

    /// A deferred message's run is over (succeeded, given up, dead-lettered): forget its offset
    /// and run the key's next one.
    pub(super) fn deferred_done(&mut self, key: event::Key, offset: Offset) {
        let mut reset = None;
        if let Some(state) = self.deferral.as_mut().and_then(|d| d.keys.get_mut(&key)) {
            // The key's next message starts with no failed attempts; the store hears of it
            // once, after the success that follows failures (a new owner must not count the
            // old message's failures against the next one).
            if state.retry.attempts > 0 {
                state.retry = Retry {
                    attempts: 0,
                    due_ms: now_ms(),
                };
                reset = Some(state.retry);
            }
            state.phase = Phase::Idle;
        }
        if let Some(retry) = reset {
            self.write(WriteOp::Retry(key.clone(), retry));
        }
        self.write(WriteOp::Remove(key, offset));
    }

    /// A deferred message's run was abandoned (shutdown): keep it for the next run.
    pub(super) fn deferred_abandoned(&mut self, message: Arc<ConsumedMessage>) {
        let Some(key) = message.key.clone() else {
            return;
        };
        if let Some(d) = self.deferral.as_mut() {
            if let Some(state) = d.keys.get_mut(&key) {
                state.loaded.push_front(message);
                state.phase = Phase::Idle;
                d.loaded += 1;
            }
        }
    }

    /// Reads for keys that waited for room among the partition's re-read messages.
    fn serve_queued(&mut self) {
        let Some(d) = self.deferral.as_mut() else {
            return;
        };
        let mut room = LOADED_MAX.saturating_sub(d.loaded);
        let mut keys = Vec::new();
        while room > 0 {
            let Some(key) = d.queued.pop_front() else {
                break;
            };
            if let Some(state) = d.keys.get_mut(&key) {
                if state.phase == Phase::Queued {
                    state.phase = Phase::Idle;
                    keys.push(key);
                    room = room.saturating_sub(PAGE);
                }
            }
        }
        self.read_deferred(keys);
    }

    /// Starts the retries that are due.
    pub(super) fn fire_deferred(&mut self) {
        if self.abort.is_cancelled() {
            return;
        }
        let Some(d) = self.deferral.as_mut() else {
            return;
        };
        let now = now_ms();
        let mut timers = Vec::new();
        while d.timer_due.first().is_some_and(|(ms, _)| *ms <= now) {
            if let Some((_, key)) = d.timer_due.pop_first() {
                if let Some(deferred) = d.timers.get(&key) {
                    timers.push((key, deferred.time));
                }
            }
        }
        let mut ready = Vec::new();
        while d.due.first().is_some_and(|(ms, _)| *ms <= now) {
            if let Some((_, key)) = d.due.pop_first() {
                if let Some(state) = d.keys.get_mut(&key) {
                    if state.phase == Phase::Waiting {
                        state.phase = Phase::Idle;
                        ready.push(key);
                    }
                }
            }
        }
        // Keys whose next message is still in memory run it; the others read theirs.
        let (loaded, read): (Vec<event::Key>, Vec<event::Key>) = ready
            .into_iter()
            .partition(|key| d.keys.get(key).is_some_and(|s| !s.loaded.is_empty()));
        self.read_deferred(read);
        for key in loaded {
            self.advance(&key);
        }
        for (key, time) in timers {
            if let Some(ready) = self.keys.push(Some(key.clone()), Pending::Timer(key, time)) {
                self.start(ready);
            }
        }
    }

    /// The [`Outcome::Defer`](crate::partition::stages::Outcome) stage for a timer: a failing
    /// timer waits for a deferred retry (the key's messages go on; its later timers wait).
    async fn defer_timer(
        &mut self,
        id: &(Key, Slot),
        key: event::Key,
        time: Seconds,
        failure: &Failure,
    ) -> Handled {
        let Some(d) = self.deferral.as_mut() else {
            return Handled::Next;
        };
        if failure.permanent {
            return Handled::Next;
        }
        let attempts = match d.timers.get(&key) {
            Some(deferred) if deferred.time == time => deferred.attempts.saturating_add(1),
            Some(_) => return Handled::Next,
            None if d.setup.gate.allows_deferral() => 1,
            None => return Handled::Next,
        };
        if d.setup.max_retries.is_some_and(|max| attempts > max) {
            let what = self.describe(id);
            tracing::error!(
                "{what} failed {attempts} times ({failure}), past defer_max_retries; giving up on it"
            );
            self.succeeded(id.clone()).await;
            return Handled::Done;
        }
        let (Retry { due_ms, .. }, delay) = d.setup.backoff.retry(attempts);
        let parked = match d.timers.remove(&key) {
            Some(old) => {
                d.timer_due.remove(&(old.due_ms, key.clone()));
                old.parked
            }
            None => BTreeSet::new(),
        };
        d.timers.insert(
            key.clone(),
            DeferredTimer {
                time,
                attempts,
                due_ms,
                parked,
            },
        );
        d.timer_due.insert((due_ms, key));
        tracing::warn!(
            "{} failed ({failure}); deferring it (the key's later timers wait), retry in {delay:?}",
            self.describe(id)
        );
        self.in_flight.remove(id);
        self.next_of(&id.0);
        Handled::Done
    }

    /// A key's timer is done (succeeded or given up): when it was the deferred one, the key's
    /// parked timers come due again.
    pub(super) fn timer_deferral_done(&mut self, key: &event::Key, time: Seconds) {
        let deferred = self.deferral.as_ref().and_then(|d| d.timers.get(key));
        if deferred.is_some_and(|t| t.time == time) {
            self.end_timer_deferral(key, true);
            self.fire_due();
        }
    }

    /// Ends a key's timer deferral and returns its deferred timer. Its parked timers come due
    /// again (`requeue`) or, when the key's timers were cleared, are forgotten with it; either
    /// way they are no longer firing.
    fn end_timer_deferral(&mut self, key: &event::Key, requeue: bool) -> Option<Seconds> {
        let d = self.deferral.as_mut()?;
        let deferred = d.timers.remove(key)?;
        d.timer_due.remove(&(deferred.due_ms, key.clone()));
        if let Some(timers) = self.timers.as_mut() {
            for parked in deferred.parked {
                timers.unfire(key, parked);
                if requeue {
                    timers.pending.insert((parked, key.clone()));
                }
            }
        }
        Some(deferred.time)
    }

    /// Moves a key on: runs its next loaded message, reads more, waits for an append, or ends
    /// its deferral.
    pub(super) fn advance(&mut self, key: &event::Key) {
        if self.abort.is_cancelled() {
            return;
        }
        let Some(d) = self.deferral.as_mut() else {
            return;
        };
        let cap = d.cap();
        let Some(state) = d.keys.get_mut(key) else {
            return;
        };
        if state.phase != Phase::Idle {
            return;
        }
        if let Some(message) = state.loaded.pop_front() {
            state.phase = Phase::Running;
            d.loaded = d.loaded.saturating_sub(1);
            let queued = !d.queued.is_empty();
            if let Some(ready) = self
                .keys
                .push(Some(key.clone()), Pending::Deferred(message))
            {
                self.start(ready);
            }
            if queued {
                self.serve_queued();
            }
            return;
        }
        if state.takeable(cap).next().is_some()
            || (!state.complete && state.bound(cap) > state.last)
        {
            self.read_deferred(vec![key.clone()]);
            return;
        }
        if !state.settled() || !state.cached.is_empty() {
            // An acknowledgement, an admission or a reception below will move it on.
            if let Some(first) = state.cached.first() {
                d.blocked = d.blocked.min(*first);
            }
            return;
        }
        d.keys.remove(key);
        tracing::info!(
            "key={} of topic={} partition={} has no deferred messages left; it runs normally again",
            show_key(Some(key)),
            self.topic,
            self.partition
        );
        self.write(WriteOp::Release(key.clone(), crate::defer::now_us()));
    }

    /// Reads the next offsets of `keys` (cache, else store) and their records from Kafka, in one
    /// fetch; reports [`DeferReport::Read`].
    fn read_deferred(&mut self, keys: Vec<event::Key>) {
        let Some(d) = self.deferral.as_mut() else {
            return;
        };
        let mut plan = Vec::new();
        let cap = d.cap();
        for key in keys {
            let Some(state) = d.keys.get_mut(&key) else {
                continue;
            };
            let limit = PAGE.min(LOADED_MAX.saturating_sub(d.loaded));
            if limit == 0 {
                state.phase = Phase::Queued;
                d.queued.push_back(key);
                continue;
            }
            d.loaded += limit;
            state.phase = Phase::Reading;
            // A complete cache says it all; otherwise the store may hold offsets below the
            // cached ones (a new owner's cache holds only what it appended itself), so the
            // store is read from `last` on and merged with the cache.
            let plan_key = if state.complete {
                (key, state.takeable(cap).take(limit).collect(), None, limit)
            } else {
                state.overflowed = false;
                let cached: Vec<Offset> = state.cached.iter().copied().take(limit).collect();
                (key, cached, Some(state.last), limit)
            };
            plan.push(plan_key);
        }
        if plan.is_empty() {
            return;
        }
        let store = d.setup.store.clone();
        let scope = d.scope.clone();
        let setup = d.setup.clone();
        let internal = self.internal.clone();
        let (topic, partition) = (self.topic.clone(), self.partition);
        self.engine.runtime.spawn(async move {
            // The keys' store reads go out together (one round trip of latency, not one per key).
            let mut reads = tokio::task::JoinSet::new();
            for (index, (key, offsets, after, limit)) in plan.into_iter().enumerate() {
                let (store, scope) = (store.clone(), scope.clone());
                reads.spawn(async move {
                    let more = match after {
                        Some(after) => Some(store.offsets(&scope, &key, after, limit).await),
                        None => None,
                    };
                    (index, key, offsets, limit, more)
                });
            }
            let mut read = Vec::with_capacity(reads.len());
            while let Some(done) = reads.join_next().await {
                if let Ok(done) = done {
                    read.push(done);
                }
            }
            read.sort_by_key(|(index, ..)| *index);
            let mut batch: Vec<ReadKey> = Vec::with_capacity(read.len());
            let mut all = Vec::new();
            let mut failed = None;
            for (_, key, mut offsets, limit, more) in read {
                let mut complete = None;
                match more {
                    Some(Ok(more)) => {
                        complete = Some(more.len() < limit);
                        offsets.extend(more);
                        offsets.sort_unstable();
                        offsets.dedup();
                        if offsets.len() > limit {
                            offsets.truncate(limit);
                            complete = Some(false);
                        }
                    }
                    Some(Err(e)) => failed = Some(e),
                    None => {}
                }
                all.extend(offsets.iter().copied());
                batch.push((key, offsets, complete, limit));
            }
            if let Some(e) = failed {
                // Every key of the request hears of it, not only the one whose read failed.
                let fetched = Err(format!("could not read deferred offsets: {e}"));
                let _ = internal.send(Internal::Defer(DeferReport::Read { batch, fetched }));
                return;
            }
            all.sort_unstable();
            all.dedup();
            let fetched = if all.is_empty() {
                Ok(HashMap::new())
            } else {
                setup
                    .reloader
                    .fetch(topic, partition, all)
                    .await
                    .map(|records| {
                        records
                            .into_iter()
                            .map(|f| match &f {
                                Fetched::Found(record) => (rdkafka::Message::offset(record), f),
                                Fetched::Gone(offset) => (*offset, f),
                            })
                            .collect()
                    })
            };
            let _ = internal.send(Internal::Defer(DeferReport::Read { batch, fetched }));
        });
    }

    /// Records of deferred keys were read: queue them, or retry the read later.
    fn on_read(&mut self, batch: Vec<ReadKey>, fetched: Result<HashMap<Offset, Fetched>, String>) {
        let mut fetched = match fetched {
            Ok(fetched) => fetched,
            Err(e) => {
                tracing::warn!(
                    "could not read deferred messages of topic={} partition={}: {e}; trying again later",
                    self.topic,
                    self.partition
                );
                let Some(d) = self.deferral.as_mut() else {
                    return;
                };
                for (key, _, _, limit) in batch {
                    d.loaded = d.loaded.saturating_sub(limit);
                    let attempts = d.keys.get(&key).map_or(1, |s| s.retry.attempts.max(1));
                    let (retry, _) = d.setup.backoff.retry(attempts);
                    d.wait(&key, retry);
                }
                return;
            }
        };
        let keep_raw = self.engine.dead_letters.is_some();
        let mut gone = Vec::new();
        let mut ready = Vec::new();
        let Some(d) = self.deferral.as_mut() else {
            return;
        };
        let cap = d.cap();
        for (key, offsets, complete, limit) in batch {
            // The reservation becomes the messages actually held.
            d.loaded = d.loaded.saturating_sub(limit);
            let Some(state) = d.keys.get_mut(&key) else {
                continue;
            };
            if state.phase != Phase::Reading {
                continue;
            }
            if let Some(complete) = complete {
                state.complete = complete && !state.overflowed;
            }
            // Offsets at or above the key's bound wait (they stay known), and so do those above
            // an offset that became known while this read was out (an append acknowledged
            // meanwhile): the key's next read takes them in order.
            let newer = state
                .cached
                .iter()
                .copied()
                .find(|o| offsets.binary_search(o).is_err())
                .unwrap_or(Offset::MAX);
            let bound = state.bound(cap).min(newer);
            let mut taken = 0;
            for offset in offsets {
                if offset >= bound {
                    state.cached.insert(offset);
                    d.blocked = d.blocked.min(offset);
                    continue;
                }
                taken += 1;
                state.cached.remove(&offset);
                state.last = state.last.max(offset);
                match fetched.remove(&offset) {
                    Some(Fetched::Found(record)) => {
                        match ConsumedMessage::decode(self.topic.clone(), record, keep_raw) {
                            Ok(message) => {
                                state.loaded.push_back(Arc::new(message));
                                d.loaded += 1;
                            }
                            Err(bad) => gone.push(Lost {
                                key: key.clone(),
                                offset,
                                reason: Reason::Undecodable,
                                why: format!("it no longer decodes: {}", bad.reason),
                                record: bad.raw,
                            }),
                        }
                    }
                    Some(Fetched::Gone(_)) | None => gone.push(Lost {
                        key: key.clone(),
                        offset,
                        reason: Reason::Unreadable,
                        why: "the log no longer holds it (retention or compaction)".to_owned(),
                        record: OwnedMessage::new(
                            None,
                            Some(key.to_vec()),
                            self.topic.to_string(),
                            rdkafka::Timestamp::NotAvailable,
                            self.partition,
                            offset,
                            None,
                        ),
                    }),
                }
            }
            state.phase = Phase::Idle;
            if taken > 0 || (state.settled() && state.cached.first().is_none_or(|o| *o < cap)) {
                ready.push(key);
            }
        }
        for lost in gone {
            self.lost(lost);
        }
        // Room reserved beyond what the read found is free again.
        self.serve_queued();
        for key in ready {
            self.advance(&key);
        }
    }

    /// A deferred message that cannot run any more: dead-lettered when a failure topic is set
    /// (then forgotten), otherwise logged and forgotten.
    fn lost(&mut self, lost: Lost) {
        let Lost {
            key,
            offset,
            reason,
            why,
            record,
        } = lost;
        let what = format!(
            "deferred message topic={} partition={} offset={offset} key={}",
            self.topic,
            self.partition,
            show_key(Some(&key))
        );
        let Some(dead_letters) = self.engine.dead_letters.clone() else {
            tracing::error!("skipping {what}: {why} (set failure_topic to keep such messages)");
            self.forget(key, offset);
            return;
        };
        // Not counted as a store write: if the partition goes away first, the offset stays
        // stored and the next owner tries again.
        tracing::error!("sending {what} to {}: {why}", dead_letters.topic);
        let class = match reason {
            Reason::Undecodable => super::failure::UNDECODABLE,
            _ => "Prosody::DeferredMessageGone",
        };
        let failure = Failure::permanent(class, why);
        self.spawn_dead_letter(
            dead_letters,
            record,
            (reason, &failure, 0),
            &opentelemetry::Context::new(),
            Internal::Defer(DeferReport::DeadLettered { key, offset }),
        );
    }

    /// Removes a deferred offset from the store.
    fn forget(&mut self, key: event::Key, offset: Offset) {
        self.write(WriteOp::Remove(key, offset));
    }

    /// An append was acknowledged (its offset finishes) or the partition went away first.
    fn appended(&mut self, key: event::Key, offset: Offset, stored: bool) {
        let (keys_len, cache_size) = self
            .deferral
            .as_ref()
            .map_or((0, 0), |d| (d.keys.len(), d.setup.cache_size));
        if let Some(state) = self.deferral.as_mut().and_then(|d| d.keys.get_mut(&key)) {
            state.appending.remove(&offset);
            // An offset at or below `last` was re-delivered after it ran (a key takes only
            // offsets below everything it has not received, admitted and stored yet): it does
            // not run twice from here.
            if stored && offset > state.last {
                // Offsets are cached for at most `defer_cache_size` keys (those that started
                // caching while the partition had no more deferred keys than that), PAGE each.
                let may_cache = !state.cached.is_empty() || keys_len <= cache_size;
                if state.cached.len() < PAGE && may_cache {
                    state.cached.insert(offset);
                } else {
                    state.complete = false;
                    state.overflowed = true;
                }
            }
        }
        if stored {
            self.retire(offset);
            self.advance(&key);
        }
    }

    /// A report of a deferral helper task.
    pub(super) async fn on_defer_report(&mut self, report: DeferReport) {
        let wrote = !matches!(
            report,
            DeferReport::Read { .. } | DeferReport::DeadLettered { .. }
        );
        if wrote {
            if let Some(d) = self.deferral.as_mut() {
                d.writes = d.writes.saturating_sub(1);
            }
        }
        match report {
            DeferReport::Deferred {
                key,
                offset,
                retry,
                failure,
                result,
            } => self.deferred(key, offset, retry, failure, result).await,
            DeferReport::Appended {
                key,
                offset,
                stored,
            } => self.appended(key, offset, stored),
            DeferReport::Written => {}
            DeferReport::DeadLettered { key, offset } => self.forget(key, offset),
            DeferReport::Read { batch, fetched } => self.on_read(batch, fetched),
        }
    }
}

/// One key's part of a read: its offsets, whether the store has no more (when it was read),
/// and the room reserved for it.
type ReadKey = (event::Key, Vec<Offset>, Option<bool>, usize);

/// A deferred message that cannot run any more.
struct Lost {
    key: event::Key,
    offset: Offset,
    reason: Reason,
    /// Why, for the log and the dead-letter headers.
    why: String,
    /// The record as read, or (when the log no longer holds it) one with its key and no value.
    record: OwnedMessage,
}

/// A store write, retried until it lands.
#[derive(Debug)]
enum WriteOp {
    Append(event::Key, Offset),
    Remove(event::Key, Offset),
    Retry(event::Key, Retry),
    /// With the moment the release was decided (microseconds since the epoch).
    Release(event::Key, i64),
}
