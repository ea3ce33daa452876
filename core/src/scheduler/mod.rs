//! The fair scheduler: which ready event runs next, and how many run at once.
//!
//! Runners *pull*: each runner (a Ruby worker fiber in the gem) takes its next job the moment it
//! finishes the previous one, so a free slot never waits for a round trip through the engine.
//! A take is granted only while fewer than `max_concurrency` permits are out; a permit returns
//! when its handler finishes ([`Grant`] is released or dropped), or when the handler ignored its
//! cancellation for a grace period (quarantine, below).
//!
//! Which event goes next:
//! - Each key has a virtual time: the handler time it used, halving every `max_wait / 2`.
//! - Fresh events and failure retries are separate classes with their own pools of used handler
//!   time. While both have work, the class whose use is lowest relative to its share goes next
//!   (retries get `scheduler_failure_weight`, fresh events the rest).
//! - Inside a class, the lowest virtual time minus a quadratic wait boost wins (see
//!   [`ready`]); an event that waited `max_wait` has the whole boost, and such an event goes
//!   before any that has not, whatever its class.
//!
//! Deadlines: [`Scheduler::watch`] runs a watchdog that cancels a handler running longer than
//! `timeout`, and `grace` later, if it still runs, quarantines it: its permit is released, its
//! partition worker is told (the event counts as a transient failure and its key stays blocked
//! until the handler really returns), and a warning names the key.

pub mod ready;

use std::collections::HashMap;

use foldhash::quality::RandomState;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::cancel::CancelToken;
use crate::config::Config;
use crate::event::show_key;
use crate::handler::{Finished, Job, Outcome, Slot};
use ready::{Decaying, ReadyQueue};

type Notify = Box<dyn Fn() + Send + Sync>;

/// Key charges are applied by a take once this many pile up, and before a take reports nothing
/// to run: a key's virtual time lags its handlers by at most this many calls, and the usage
/// observer is told in batches.
const CHARGE_BATCH: usize = 64;
type Key = Option<crate::event::Key>;

/// Which pool an event's handler time is charged to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// A first attempt.
    Fresh,
    /// A retry after a failure.
    Retry,
}

impl Class {
    fn index(self) -> usize {
        match self {
            Class::Fresh => 0,
            Class::Retry => 1,
        }
    }
}

/// The scheduler's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct FairConfig {
    /// Permits: handler calls running at once.
    pub max_concurrency: usize,
    /// Share of handler time retries get while fresh events also wait.
    pub failure_weight: f64,
    /// Wait after which an event has the whole boost.
    pub max_wait: Duration,
    /// The whole boost, in seconds of virtual time.
    pub wait_weight: f64,
    /// Keys whose virtual time is remembered.
    pub cache_size: usize,
    /// A handler running this long is cancelled.
    pub timeout: Duration,
    /// A cancelled handler still running this much later is quarantined.
    pub grace: Duration,
}

/// For tests and benchmarks that build a scheduler by hand: the values of the configuration
/// table's defaults (a unit test keeps the two equal; subscriptions use `from_config`).
impl Default for FairConfig {
    fn default() -> Self {
        Self {
            max_concurrency: 32,
            failure_weight: 0.3,
            max_wait: Duration::from_secs(120),
            wait_weight: 200.0,
            cache_size: 8192,
            timeout: Duration::from_secs(240),
            grace: Duration::from_secs(24),
        }
    }
}

impl FairConfig {
    /// The settings of a client configuration.
    pub fn from_config(config: &Config) -> Self {
        let timeout = config.effective_timeout();
        Self {
            max_concurrency: usize::try_from(config.max_concurrency.get()).unwrap_or(usize::MAX),
            failure_weight: config.scheduler_failure_weight,
            max_wait: config.scheduler_max_wait,
            wait_weight: config.scheduler_wait_weight,
            cache_size: usize::try_from(config.scheduler_cache_size.get()).unwrap_or(usize::MAX),
            timeout,
            grace: quarantine_grace(timeout),
        }
    }

    fn half_life(&self) -> Duration {
        (self.max_wait / 2).max(Duration::from_secs(1))
    }
}

/// How long a handler may ignore its cancellation before it is quarantined: a tenth of the
/// timeout, at least one second and at most thirty.
pub fn quarantine_grace(timeout: Duration) -> Duration {
    (timeout / 10).clamp(Duration::from_secs(1), Duration::from_secs(30))
}

/// A job handed to a runner and not yet released.
struct Running {
    started: Instant,
    key: Key,
    class: Class,
    cancel: CancelToken,
    /// Where to tell the partition worker that the handler was quarantined.
    notice: Option<(mpsc::UnboundedSender<Finished>, Slot)>,
    cancelled: bool,
    quarantined: bool,
}

struct State {
    config: FairConfig,
    /// Ready events, fresh and retry.
    classes: [ReadyQueue<Key, Job>; 2],
    /// Handler time used per class by finished handlers, seconds.
    usage: [Decaying; 2],
    /// Running handlers per class, and the sum of their start times (seconds after `base`), so
    /// that time spent by handlers still running counts too: `count * now - sum`.
    running_class: [(u32, f64); 2],
    /// Origin for `running_class` sums.
    base: Instant,
    /// Handler time used per key, seconds.
    keys: HashMap<Key, Decaying, RandomState>,
    /// Jobs out with runners, by slot (the low 32 bits of a grant id); the high bits of the id
    /// are the slot's generation, so a stale id never names a newer job.
    running: Vec<(u32, Option<Running>)>,
    /// Free slots of `running`.
    free: Vec<u32>,
    /// Key charges of finished handlers (key, used seconds, when), applied in batches of
    /// [`CHARGE_BATCH`].
    charges: Vec<(Key, f64, Instant)>,
    /// Permits out (running jobs not quarantined).
    permits: usize,
    /// Spare buffer for [`Core::apply_released`], swapped with the released grants' list.
    applying: Vec<(u64, Instant)>,
    /// Spare buffer for [`Core::drain_incoming`], swapped with the submitted jobs' list.
    arriving: Vec<(Job, Instant)>,
    /// Told of each batch of key charges (monopolization detection).
    observer: Option<UsageObserver>,
}

/// A finished handler's time: its key, seconds used, and when it ended.
pub type Charge = (Key, f64, Instant);

/// Receives finished handlers' time per key, in batches, on the runner's thread that applied
/// them (outside the scheduler's lock): it should hand the batch on rather than work on it.
pub type UsageObserver = Arc<dyn Fn(Vec<Charge>) + Send + Sync>;

/// A batch of applied charges for the usage observer; told when dropped. Declared before the
/// scheduler's lock guard, it is dropped after it: the observer runs outside the lock.
#[derive(Default)]
struct Observed(Option<(UsageObserver, Vec<Charge>)>);

impl Observed {
    /// Keeps `batch` to be told when this is dropped.
    fn keep(&mut self, batch: Observed) {
        *self = batch;
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        if let Some((observer, charges)) = self.0.take() {
            observer(charges);
        }
    }
}

impl State {
    fn new(config: FairConfig) -> Self {
        let now = Instant::now();
        let queue = || ReadyQueue::new(config.max_wait, config.wait_weight);
        Self {
            classes: [queue(), queue()],
            usage: [Decaying::new(now), Decaying::new(now)],
            running_class: [(0, 0.0); 2],
            base: now,
            keys: HashMap::default(),
            running: Vec::new(),
            free: Vec::new(),
            charges: Vec::new(),
            permits: 0,
            applying: Vec::new(),
            arriving: Vec::new(),
            observer: None,
            config,
        }
    }

    /// Stores a running job; returns its grant id.
    fn insert_running(&mut self, running: Running) -> u64 {
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                self.running.push((0, None));
                u32::try_from(self.running.len() - 1).unwrap_or(u32::MAX)
            }
        };
        let entry = &mut self.running[slot as usize];
        entry.0 = entry.0.wrapping_add(1);
        entry.1 = Some(running);
        (u64::from(entry.0) << 32) | u64::from(slot)
    }

    /// Removes the running job of grant `id`, if it is still that job.
    fn remove_running(&mut self, id: u64) -> Option<Running> {
        let slot = (id & u64::from(u32::MAX)) as u32;
        let generation = (id >> 32) as u32;
        let entry = self.running.get_mut(slot as usize)?;
        if entry.0 != generation {
            return None;
        }
        let running = entry.1.take()?;
        self.free.push(slot);
        Some(running)
    }

    fn ready(&self) -> usize {
        self.classes[0].len() + self.classes[1].len()
    }

    /// The class to serve next and its best head, if any event is ready.
    fn pick(&mut self, now: Instant) -> Option<(usize, ready::Best)> {
        for queue in &mut self.classes {
            queue.promote(now);
        }
        let fresh = self.classes[0].best();
        let retry = self.classes[1].best();
        match (fresh, retry) {
            (None, None) => None,
            (Some(f), None) => Some((0, f)),
            (None, Some(r)) => Some((1, r)),
            (Some(f), Some(r)) => {
                if f.starving != r.starving {
                    return Some(if f.starving { (0, f) } else { (1, r) });
                }
                let w = self.config.failure_weight.clamp(0.0, 1.0);
                let used_fresh = self.used(0, now);
                let used_retry = self.used(1, now);
                // Serve retries while their use relative to their share is the lower one:
                // used_retry / w < used_fresh / (1 - w), written without dividing by zero.
                let retry_first = if used_retry * (1.0 - w) == used_fresh * w {
                    w >= 0.5
                } else {
                    used_retry * (1.0 - w) < used_fresh * w
                };
                Some(if retry_first { (1, r) } else { (0, f) })
            }
        }
    }

    /// Removes the event to run next, if any: its key, the event and when it became ready.
    fn take_next(&mut self, now: Instant) -> Option<(Key, Job, Instant)> {
        let (class, best) = self.pick(now)?;
        self.classes[class].take_best(&best, now)
    }

    /// Handler time used by a class: finished (decaying) plus running.
    fn used(&self, class: usize, now: Instant) -> f64 {
        let (count, sum) = self.running_class[class];
        let now_s = now.saturating_duration_since(self.base).as_secs_f64();
        self.usage[class].at(now, self.config.half_life())
            + (f64::from(count) * now_s - sum).max(0.0)
    }

    fn started(&mut self, class: Class, at: Instant) {
        let entry = &mut self.running_class[class.index()];
        entry.0 += 1;
        entry.1 += at.saturating_duration_since(self.base).as_secs_f64();
    }

    fn ended(&mut self, class: Class, started: Instant) {
        let entry = &mut self.running_class[class.index()];
        entry.0 = entry.0.saturating_sub(1);
        entry.1 -= started.saturating_duration_since(self.base).as_secs_f64();
        if entry.0 == 0 {
            entry.1 = 0.0;
        }
    }

    fn key_vt_us(&self, key: &Key, now: Instant) -> i64 {
        self.keys
            .get(key)
            .map_or(0, |d| (d.at(now, self.config.half_life()) * 1e6) as i64)
    }

    /// Charges a finished handler's time: to its class at once, to its key later (batched).
    fn charge(&mut self, key: Key, class: Class, now: Instant, used: Duration) {
        let secs = used.as_secs_f64();
        self.usage[class.index()].add(now, self.config.half_life(), secs);
        self.charges.push((key, secs, now));
    }

    /// Applies deferred key charges: adds to each key's virtual time and re-ranks its head.
    /// With an observer, hands the batch back for it, to be told once the lock is released.
    fn apply_charges(&mut self) -> Observed {
        let charges = std::mem::take(&mut self.charges);
        for (key, secs, at) in &charges {
            self.charge_key(key.clone(), *secs, *at);
        }
        if let Some(observer) = &self.observer {
            self.charges = Vec::with_capacity(charges.capacity());
            return Observed(Some((observer.clone(), charges)));
        }
        // Keep the buffer's capacity.
        self.charges = charges;
        self.charges.clear();
        Observed(None)
    }

    fn charge_key(&mut self, key: Key, secs: f64, now: Instant) {
        let half_life = self.config.half_life();
        let vt = self
            .keys
            .entry(key.clone())
            .or_insert_with(|| Decaying::new(now));
        vt.add(now, half_life, secs);
        let vt_us = (vt.at(now, half_life) * 1e6) as i64;
        for queue in &mut self.classes {
            queue.set_vt(&key, vt_us);
        }
        if self.keys.len() > self.config.cache_size {
            self.evict(now);
        }
    }

    /// Forgets the keys with the least virtual time until a quarter of the cache is free; they
    /// lose the least by being forgotten. Amortised O(log n) per charge.
    fn evict(&mut self, now: Instant) {
        let keep = self.config.cache_size - self.config.cache_size / 4;
        let half_life = self.config.half_life();
        let mut values: Vec<(f64, Key)> = self
            .keys
            .iter()
            .map(|(k, d)| (d.at(now, half_life), k.clone()))
            .collect();
        let drop_count = values.len().saturating_sub(keep);
        if drop_count == 0 {
            return;
        }
        values.select_nth_unstable_by(drop_count - 1, |a, b| a.0.total_cmp(&b.0));
        for (_, key) in values.into_iter().take(drop_count) {
            self.keys.remove(&key);
        }
    }
}

struct Core {
    state: Mutex<State>,
    /// Grants released since the state was last locked, with when each ended: applied under the
    /// state's lock by the next take, watchdog pass or load (a runner then locks the state once
    /// per job, to take it, not twice).
    released: Mutex<Vec<(u64, Instant)>>,
    /// A take found every permit out: releases apply themselves at once (and wake the runners)
    /// until one is free again.
    starved: AtomicBool,
    /// Jobs submitted since the state was last locked, with when each became ready: moved into
    /// the ready queues by the next take (or release applied at once, watchdog pass, load,
    /// purge), so a partition worker's submit never holds the state's lock, which the runners'
    /// takes need.
    incoming: Mutex<Vec<(Job, Instant)>>,
    /// No more jobs are accepted; `take` reports `Closed`. Set by `close` before it empties
    /// `incoming`; a submit reads it under `incoming`'s lock, so either `close` finds its jobs or
    /// the submit finds the flag.
    closed: AtomicBool,
    /// A runner found nothing it could run and waits for the notifier: the next submit (unless
    /// every permit is out) or release that makes work runnable wakes it.
    idle: AtomicBool,
    /// Called (outside the lock) when work is ready while runners are idle.
    notify: OnceLock<Notify>,
    /// Handler durations and waits for a runner (and the workers' timer lateness), for
    /// `/metrics`.
    histograms: Arc<crate::metrics::SchedulerHistograms>,
}

impl Core {
    fn wake(&self) {
        if let Some(notify) = self.notify.get() {
            notify();
        }
    }

    /// A grant ended: noted for the next take, which returns its permit (unless quarantined)
    /// and charges its handler time. While a runner waits for a permit, applied at once.
    fn release(&self, id: u64) {
        let now = Instant::now();
        match self.released.lock() {
            Ok(mut released) => released.push((id, now)),
            Err(_) => return,
        }
        // Read after the push, under the lock `take` drains with after setting the flag: either
        // that drain sees this release, or this sees the flag.
        if !self.starved.load(Ordering::SeqCst) {
            return;
        }
        let wake = {
            let Ok(mut state) = self.state.lock() else {
                return;
            };
            self.apply_released(&mut state);
            self.drain_incoming(&mut state);
            state.ready() > 0
                && state.permits < state.config.max_concurrency
                && self.idle.swap(false, Ordering::SeqCst)
        };
        if wake {
            self.wake();
        }
    }

    /// Applies the grants released since the last call: permits back, handler time charged.
    fn apply_released(&self, state: &mut State) {
        // The two buffers trade places, so neither side allocates per release.
        let mut released = std::mem::take(&mut state.applying);
        if let Ok(mut pending) = self.released.lock() {
            std::mem::swap(&mut *pending, &mut released);
        }
        for (id, at) in released.drain(..) {
            let Some(running) = state.remove_running(id) else {
                continue;
            };
            if !running.quarantined {
                state.permits = state.permits.saturating_sub(1);
            }
            let used = at.saturating_duration_since(running.started);
            self.histograms.handler.observe(used);
            state.ended(running.class, running.started);
            state.charge(running.key, running.class, at, used);
        }
        state.applying = released;
        if state.permits < state.config.max_concurrency && self.starved.load(Ordering::Relaxed) {
            self.starved.store(false, Ordering::SeqCst);
        }
    }

    /// Moves the jobs submitted since the last call into the ready queues.
    fn drain_incoming(&self, state: &mut State) {
        let mut arriving = std::mem::take(&mut state.arriving);
        if let Ok(mut incoming) = self.incoming.lock() {
            std::mem::swap(&mut *incoming, &mut arriving);
        }
        for (job, at) in arriving.drain(..) {
            let key = job.key().clone();
            let vt = state.key_vt_us(&key, at);
            let class = job.class.index();
            state.classes[class].push(at, key, vt, job);
        }
        state.arriving = arriving;
    }
}

/// A runner's permit for one job. Release it when the handler returns (dropping it releases
/// it too); the handler's time is charged to its key and class then.
pub struct Grant {
    core: Arc<Core>,
    id: u64,
}

impl std::fmt::Debug for Grant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Grant({})", self.id)
    }
}

impl Grant {
    /// The grant's id, unique within its scheduler.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Returns the permit now.
    pub fn release(self) {}
}

impl Drop for Grant {
    fn drop(&mut self) {
        self.core.release(self.id);
    }
}

/// What a runner gets from [`Scheduler::take`].
// Returned by value and matched at once, once per job: moving the job is cheaper than boxing it
// (a heap allocation per message) to make the variants the same size.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Take {
    /// Run this job; release the grant when its handler returns.
    Job(Job, Grant),
    /// Nothing to run now; the notifier fires when that changes.
    Empty,
    /// The subscription ended.
    Closed,
}

/// One per subscription, shared by its partition workers and its runners.
pub struct Scheduler {
    core: Arc<Core>,
}

impl Scheduler {
    /// A scheduler with these settings and no notifier (`Client::subscribe` makes one from the
    /// client's configuration).
    pub fn with_config(config: FairConfig) -> Self {
        Self {
            core: Arc::new(Core {
                state: Mutex::new(State::new(config)),
                released: Mutex::new(Vec::new()),
                starved: AtomicBool::new(false),
                incoming: Mutex::new(Vec::new()),
                closed: AtomicBool::new(false),
                idle: AtomicBool::new(false),
                notify: OnceLock::new(),
                histograms: Arc::default(),
            }),
        }
    }

    /// The subscription's histograms (see [`crate::metrics`]).
    pub fn histograms(&self) -> Arc<crate::metrics::SchedulerHistograms> {
        self.core.histograms.clone()
    }

    /// Sets the function that wakes idle runners (once; later calls are ignored).
    pub fn set_notify(&self, notify: impl Fn() + Send + Sync + 'static) {
        let _ = self.core.notify.set(Box::new(notify));
    }

    /// Sets what is told of finished handlers' time per key (in batches, on the thread that
    /// applies them).
    pub fn observe_usage(&self, observer: UsageObserver) {
        if let Ok(mut state) = self.core.state.lock() {
            state.observer = Some(observer);
        }
    }

    /// Adds a ready job. A closed scheduler drops it, which reports it abandoned.
    pub fn submit(&self, job: Job) {
        self.submit_all(std::iter::once(job));
    }

    /// Adds ready jobs, waking idle runners at most once (a partition worker submits what one
    /// turn made ready this way). They are noted under a small lock of their own and moved into
    /// the ready queues by the next take, so a submit never waits for the state's lock, nor
    /// holds it while a runner waits (the runner is the thread the Ruby path waits on). A closed
    /// scheduler drops them, which reports each abandoned.
    pub fn submit_all(&self, jobs: impl IntoIterator<Item = Job>) {
        let mut jobs = jobs.into_iter().peekable();
        if jobs.peek().is_none() {
            return;
        }
        let now = Instant::now();
        {
            let Ok(mut incoming) = self.core.incoming.lock() else {
                return;
            };
            if self.core.closed.load(Ordering::Acquire) {
                // Dropped outside the lock: each reports itself abandoned.
                drop(incoming);
                jobs.for_each(drop);
                return;
            }
            incoming.extend(jobs.map(|job| (job, now)));
        }
        // Read after the push: either a runner's check after it set `idle` finds these jobs, or
        // this finds `idle` set. While every permit is out, the release that frees one wakes.
        if !self.core.starved.load(Ordering::SeqCst) && self.core.idle.swap(false, Ordering::SeqCst)
        {
            self.core.wake();
        }
    }

    /// Takes the next job to run, if a permit is free.
    pub fn take(&self) -> Take {
        let now = Instant::now();
        let mut observed = Observed::default();
        let Ok(mut state) = self.core.state.lock() else {
            return Take::Closed;
        };
        // Closed first: runners waiting for a permit must still learn that the subscription
        // ended (`close` empties the queues).
        if self.core.closed.load(Ordering::Acquire) {
            return Take::Closed;
        }
        self.core.apply_released(&mut state);
        if state.permits >= state.config.max_concurrency {
            self.core.starved.store(true, Ordering::SeqCst);
            // A release that came between the drain above and the flag did not see the flag:
            // drain again (one after this sees it, and applies itself).
            self.core.apply_released(&mut state);
            if state.permits >= state.config.max_concurrency {
                self.core.idle.store(true, Ordering::SeqCst);
                return Take::Empty;
            }
        }
        self.core.drain_incoming(&mut state);
        if state.charges.len() >= CHARGE_BATCH {
            observed.keep(state.apply_charges());
        }
        let mut picked = state.take_next(now);
        if picked.is_none() {
            // Idle: the charges waiting are applied now, not with the next burst.
            if !state.charges.is_empty() {
                observed.keep(state.apply_charges());
            }
            self.core.idle.store(true, Ordering::SeqCst);
            // A submit between the drain above and the flag did not see the flag: drain again
            // (one after this sees it, and wakes the runners).
            self.core.drain_incoming(&mut state);
            picked = state.take_next(now);
            if picked.is_some() {
                self.core.idle.store(false, Ordering::SeqCst);
            }
        }
        let Some((key, job, since)) = picked else {
            return Take::Empty;
        };
        state.permits += 1;
        state.started(job.class, now);
        let notice = job.notice_target();
        let id = state.insert_running(Running {
            started: now,
            key,
            class: job.class,
            cancel: job.cancel.clone(),
            notice,
            cancelled: false,
            quarantined: false,
        });
        drop(state);
        self.core
            .histograms
            .wait
            .observe(now.saturating_duration_since(since));
        Take::Job(
            job,
            Grant {
                core: self.core.clone(),
                id,
            },
        )
    }

    /// Drops ready jobs whose partition is being released (their `abort` was cancelled); each
    /// is reported abandoned to its partition.
    pub fn purge_aborted(&self) {
        let dropped: Vec<Job> = match self.core.state.lock() {
            Ok(mut state) => {
                self.core.drain_incoming(&mut state);
                let mut out = Vec::new();
                for queue in &mut state.classes {
                    out.extend(queue.remove_where(|job| job.abort.is_cancelled()));
                }
                out
            }
            Err(_) => Vec::new(),
        };
        drop(dropped);
    }

    /// Stops accepting jobs, drops the queued ones (abandoned) and wakes the runners.
    pub fn close(&self) {
        self.core.closed.store(true, Ordering::Release);
        let dropped: Vec<Job> = match self.core.state.lock() {
            Ok(mut state) => {
                let mut out = Vec::new();
                if let Ok(mut incoming) = self.core.incoming.lock() {
                    out.extend(incoming.drain(..).map(|(job, _)| job));
                }
                for queue in &mut state.classes {
                    out.extend(queue.drain());
                }
                out
            }
            Err(_) => Vec::new(),
        };
        drop(dropped);
        self.core.wake();
    }

    /// Whether `close` was called.
    pub fn is_closed(&self) -> bool {
        self.core.closed.load(Ordering::Acquire)
    }

    /// Permits out and events ready, for tests and diagnostics.
    pub fn load(&self) -> (usize, usize) {
        self.core
            .state
            .lock()
            .map(|mut s| {
                self.core.apply_released(&mut s);
                self.core.drain_incoming(&mut s);
                (s.permits, s.ready())
            })
            .unwrap_or_default()
    }

    /// Cancels handlers past their timeout and quarantines those past the grace period after it.
    /// Called by [`watch`](Self::watch); public for deterministic tests.
    pub fn check_deadlines(&self) {
        let now = Instant::now();
        let mut cancel = Vec::new();
        let mut quarantined = Vec::new();
        let wake = {
            let Ok(mut state) = self.core.state.lock() else {
                return;
            };
            // A handler that already returned is not cancelled.
            self.core.apply_released(&mut state);
            let timeout = state.config.timeout;
            let grace = state.config.grace;
            let mut freed = 0;
            for running in state.running.iter_mut().filter_map(|(_, r)| r.as_mut()) {
                let ran = now.saturating_duration_since(running.started);
                if !running.cancelled && ran >= timeout {
                    running.cancelled = true;
                    cancel.push((running.cancel.clone(), running.key.clone(), ran));
                }
                if running.cancelled && !running.quarantined && ran >= timeout + grace {
                    running.quarantined = true;
                    freed += 1;
                    quarantined.push((running.notice.take(), running.key.clone(), ran));
                }
            }
            state.permits = state.permits.saturating_sub(freed);
            self.core.drain_incoming(&mut state);
            freed > 0 && state.ready() > 0 && self.core.idle.swap(false, Ordering::SeqCst)
        };
        for (token, key, ran) in cancel {
            tracing::warn!(
                "handler for key={} exceeded its timeout ({ran:?}); cancelling it",
                show_key(key.as_deref())
            );
            token.cancel();
        }
        for (notice, key, ran) in quarantined {
            tracing::warn!(
                "handler for key={} ignored its cancellation and is still running after {ran:?}; \
                 its permit is released and the event counts as a transient failure, but the key \
                 stays blocked until the handler returns",
                show_key(key.as_deref())
            );
            if let Some((done, slot)) = notice {
                let _ = done.send(Finished {
                    key,
                    slot,
                    outcome: Outcome::Quarantined,
                });
            }
        }
        if wake {
            self.core.wake();
        }
    }

    /// Runs the deadline watchdog on the current runtime until the scheduler is closed or
    /// dropped. It ticks at a twentieth of the timeout (between 10 ms and 1 s).
    pub fn watch(self: &Arc<Self>, runtime: &tokio::runtime::Handle) {
        let weak: Weak<Self> = Arc::downgrade(self);
        let tick = self
            .core
            .state
            .lock()
            .map(|s| s.config.timeout / 20)
            .unwrap_or(Duration::from_secs(1))
            .clamp(Duration::from_millis(10), Duration::from_secs(1));
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(tick).await;
                let Some(scheduler) = weak.upgrade() else {
                    return;
                };
                if scheduler.is_closed() {
                    return;
                }
                scheduler.check_deadlines();
            }
        });
    }
}
