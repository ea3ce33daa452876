//! The partition's timers: the worker's in-memory schedule of its stored timers, loaded a window
//! (`slab_size`) at a time, and how a due timer becomes an event in its key's queue.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Pending, Worker};
use crate::timers::{self, PartitionTimerHandle, Seconds, StoredSpan, TimerChange};

/// The partition's timers as the worker schedules them.
pub(super) struct PartitionTimers {
    /// Store, scope and change channel, shared with the contexts of this partition's jobs.
    pub(super) handle: Arc<PartitionTimerHandle>,
    /// Stored timers not yet handed to their key's queue, earliest first.
    pub(super) pending: BTreeSet<(Seconds, crate::event::Key)>,
    /// Timers in a key queue or running; removed from the store only after success.
    pub(super) firing: HashSet<(crate::event::Key, Seconds)>,
    /// Firing timers that their key scheduled again meanwhile (e.g. `on_timer` re-arming for the
    /// same second): kept and fired again instead of deleted after success.
    pub(super) rearmed: HashSet<(crate::event::Key, Seconds)>,
    /// The trace context each scheduled or firing timer was scheduled in, when it has one.
    pub(super) spans: HashMap<(crate::event::Key, Seconds), Arc<str>>,
    /// How far ahead stored timers are loaded (`slab_size`); the rest load as time moves on.
    pub(super) horizon: Duration,
    /// When to load the next window of stored timers.
    pub(super) next_load: Instant,
    /// The client's timer clock (the wall clock unless a test moved it).
    pub(super) clock: Arc<timers::Clock>,
    /// The subscription's histograms (timer lateness is added to here).
    pub(super) histograms: Arc<crate::metrics::SchedulerHistograms>,
}

impl PartitionTimers {
    pub(super) fn apply(&mut self, change: TimerChange) {
        match change {
            TimerChange::Added(key, time, span) => {
                self.remember_span(&key, time, span);
                if self.firing.contains(&(key.clone(), time)) {
                    self.rearmed.insert((key, time));
                } else {
                    self.pending.insert((time, key));
                }
            }
            TimerChange::Removed(key, time) => {
                self.rearmed.remove(&(key.clone(), time));
                if self.pending.remove(&(time, key.clone())) {
                    self.spans.remove(&(key, time));
                }
            }
            TimerChange::Cleared(key) => {
                self.rearmed.retain(|(k, _)| *k != key);
                self.pending.retain(|(_, k)| *k != key);
                let firing = &self.firing;
                self.spans
                    .retain(|id, _| id.0 != key || firing.contains(id));
            }
        }
    }

    fn remember_span(&mut self, key: &crate::event::Key, time: Seconds, span: StoredSpan) {
        match span {
            Some(span) => {
                self.spans.insert((key.clone(), time), span);
            }
            None => {
                self.spans.remove(&(key.clone(), time));
            }
        }
    }

    /// The trace context the timer was scheduled in, if any.
    pub(super) fn span_of(&self, key: &crate::event::Key, time: Seconds) -> Option<Arc<str>> {
        if self.spans.is_empty() {
            return None;
        }
        self.spans.get(&(key.clone(), time)).cloned()
    }

    /// A firing timer stopped running; returns whether its key scheduled it again meanwhile.
    pub(super) fn unfire(&mut self, key: &crate::event::Key, time: Seconds) -> bool {
        let id = (key.clone(), time);
        self.firing.remove(&id);
        self.rearmed.remove(&id)
    }

    /// When the earliest pending timer is due, as a monotonic instant.
    pub(super) fn next_due(&self) -> Option<Instant> {
        let (time, _) = self.pending.first()?;
        let wall = time.saturating_sub(self.clock.offset());
        let wall = std::time::UNIX_EPOCH + Duration::from_secs(u64::try_from(wall).unwrap_or(0));
        let wait = wall
            .duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO);
        Some(Instant::now() + wait)
    }

    /// Takes every pending timer whose time has come (never early: whole seconds elapsed).
    pub(super) fn take_due(&mut self) -> Vec<(crate::event::Key, Seconds)> {
        let now = self.clock.now();
        let now_ms =
            crate::defer::now_ms().saturating_add(self.clock.offset().saturating_mul(1000));
        let mut due = Vec::new();
        while let Some((time, _)) = self.pending.first() {
            if *time > now {
                break;
            }
            if let Some((time, key)) = self.pending.pop_first() {
                // How long after its second the timer fires (a timer loaded late, after an
                // assignment, counts from its own time too).
                let late_ms = now_ms.saturating_sub(time.saturating_mul(1000)).max(0);
                self.histograms
                    .timer_lateness
                    .observe(Duration::from_millis(u64::try_from(late_ms).unwrap_or(0)));
                self.firing.insert((key.clone(), time));
                due.push((key, time));
            }
        }
        due
    }
}

impl Worker {
    /// Loads the partition's overdue and near-future stored timers (up to `horizon` ahead) into
    /// the schedule; called on assignment and every half horizon after.
    pub(super) async fn load_timers(&mut self) {
        let Some(timers) = self.timers.as_mut() else {
            return;
        };
        let horizon = i64::try_from(timers.horizon.as_secs()).unwrap_or(timers::MAX_TIME);
        let until = timers
            .clock
            .now()
            .saturating_add(horizon)
            .min(timers::MAX_TIME);
        timers.next_load = Instant::now() + (timers.horizon / 2).max(Duration::from_secs(1));
        match timers.handle.store.load(&timers.handle.scope, until).await {
            Ok(loaded) => {
                for (key, time, span) in loaded {
                    if !timers.firing.contains(&(key.clone(), time)) {
                        timers.remember_span(&key, time, span);
                        timers.pending.insert((time, key));
                    }
                }
            }
            Err(e) => tracing::error!(
                "could not load the timers of topic={} partition={}: {e}; they fire after the next assignment",
                self.topic,
                self.partition
            ),
        }
        self.fire_due();
    }

    /// Hands every due timer to its key's queue.
    pub(super) fn fire_due(&mut self) {
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

    /// A timer is done (succeeded or given up): delete it, unless its key scheduled it again
    /// while it ran (then it fires once more).
    pub(super) async fn timer_done(&mut self, key: crate::event::Key, time: Seconds) {
        let Some(timers) = self.timers.as_mut() else {
            return;
        };
        if timers.unfire(&key, time) {
            timers.pending.insert((time, key));
            return;
        }
        timers.spans.remove(&(key.clone(), time));
        if let Err(e) = timers
            .handle
            .store
            .unschedule(&timers.handle.scope, &key, time)
            .await
        {
            tracing::warn!(
                "could not delete fired timer key={key:?} time={time}: {e}; it may fire again"
            );
        }
    }
}
