//! Durable per-key timers.
//!
//! A timer belongs to a key of a partition of a topic, for one consumer group ([`Scope`] plus
//! key), is stored with second precision, and is kept until its `on_timer` handler succeeded. The
//! partition worker keeps the partition's pending timers in memory and fires each due one as an
//! event in its key's queue, so a key's timers and messages never overlap. Stores implement
//! [`TimerStore`]: [`memory::MemoryStore`] serves mock mode, [`cassandra::CassandraStore`] production.

pub mod cassandra;
pub mod memory;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use thiserror::Error;

use crate::event::Key;

/// Seconds since the Unix epoch: the unit timers are stored in.
pub type Seconds = i64;

/// Earliest time a timer can have: 1970-01-01T00:00:00Z.
pub const MIN_TIME: Seconds = 0;
/// Latest time a timer can have: 9999-12-31T23:59:59Z.
pub const MAX_TIME: Seconds = 253_402_300_799;

/// Where timers live: one consumer group's view of one partition.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Scope {
    /// Consumer group.
    pub group: Arc<str>,
    /// Topic.
    pub topic: Arc<str>,
    /// Partition.
    pub partition: i32,
}

/// Why a timer operation failed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum TimerError {
    /// The time is outside what the stores can hold.
    #[error(
        "timer time {0} is outside the supported range 1970-01-01T00:00:00Z..9999-12-31T23:59:59Z"
    )]
    OutOfRange(Seconds),
    /// The store failed.
    #[error("timer store: {0}")]
    Store(String),
}

/// The trace context a timer was scheduled in (see [`crate::spans::encode_stored`]).
pub type StoredSpan = Option<Arc<str>>;

/// Timers as `(key, time, the context they were scheduled in)`, earliest first.
pub type Due = Vec<(Key, Seconds, StoredSpan)>;

/// A boxed future, so the trait stays object-safe without extra crates.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Persistent timers. Every operation is acknowledged only once durable.
pub trait TimerStore: Send + Sync + 'static {
    /// Adds a timer, with the trace context it was scheduled in; an existing one at the same
    /// second stays a single timer (with the latest context).
    fn schedule<'a>(
        &'a self,
        scope: &'a Scope,
        key: &'a [u8],
        time: Seconds,
        span: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), TimerError>>;
    /// Removes the timer at `time`, if any.
    fn unschedule<'a>(
        &'a self,
        scope: &'a Scope,
        key: &'a [u8],
        time: Seconds,
    ) -> BoxFuture<'a, Result<(), TimerError>>;
    /// Removes every timer of the key.
    fn clear<'a>(
        &'a self,
        scope: &'a Scope,
        key: &'a [u8],
    ) -> BoxFuture<'a, Result<(), TimerError>>;
    /// The key's timers, earliest first.
    fn scheduled<'a>(
        &'a self,
        scope: &'a Scope,
        key: &'a [u8],
    ) -> BoxFuture<'a, Result<Vec<Seconds>, TimerError>>;
    /// Every timer of the scope at or before `until`, earliest first.
    fn load<'a>(
        &'a self,
        scope: &'a Scope,
        until: Seconds,
    ) -> BoxFuture<'a, Result<Due, TimerError>>;
}

/// Checks that `time` is within the supported range.
pub fn check_range(time: Seconds) -> Result<Seconds, TimerError> {
    if (MIN_TIME..=MAX_TIME).contains(&time) {
        Ok(time)
    } else {
        Err(TimerError::OutOfRange(time))
    }
}

/// The current time in [`Seconds`].
pub fn now() -> Seconds {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(MAX_TIME))
        .unwrap_or(MIN_TIME)
}

/// The time a client's timers come due by: the wall clock, plus an offset that only moves
/// forward, and only when a test asks ([`Clock::advance`], the testing kit's
/// `advance_timers`), so that "a reminder in 2 hours" runs in milliseconds. Its partition
/// workers watch it and fire what became due at once.
#[derive(Debug)]
pub struct Clock {
    /// Seconds added to the wall clock.
    offset: std::sync::atomic::AtomicI64,
    /// How many times it moved; the workers wake when it changes.
    moved: tokio::sync::watch::Sender<u64>,
}

impl Default for Clock {
    fn default() -> Self {
        Self {
            offset: std::sync::atomic::AtomicI64::new(0),
            moved: tokio::sync::watch::Sender::new(0),
        }
    }
}

impl Clock {
    /// The current time in [`Seconds`] for timers.
    pub fn now(&self) -> Seconds {
        now().saturating_add(self.offset())
    }

    /// Seconds added to the wall clock.
    pub fn offset(&self) -> Seconds {
        self.offset.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Moves the clock `seconds` forward (never back) and returns the move's number, which
    /// each partition worker reports once it fired what became due (see
    /// [`crate::client::Client::timers_caught_up`]).
    pub fn advance(&self, seconds: Seconds) -> u64 {
        self.offset
            .fetch_add(seconds.max(0), std::sync::atomic::Ordering::AcqRel);
        let mut number = 0;
        self.moved.send_modify(|n| {
            *n += 1;
            number = *n;
        });
        number
    }

    /// Tells of each move.
    pub fn watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.moved.subscribe()
    }
}

/// A change to a partition's timers, sent to its worker so its in-memory schedule follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TimerChange {
    /// A timer was stored (with the context it was scheduled in).
    Added(Key, Seconds, StoredSpan),
    /// A timer was removed.
    Removed(Key, Seconds),
    /// Every timer of the key was removed.
    Cleared(Key),
}

/// One partition's timers: where they are stored, and the worker that schedules them. Shared
/// by every job of the partition, so a job carries one `Arc` rather than copies of each part.
pub struct PartitionTimerHandle {
    /// Where timers are stored.
    pub store: Arc<dyn TimerStore>,
    /// The partition.
    pub scope: Scope,
    /// The partition worker's schedule.
    pub changes: tokio::sync::mpsc::UnboundedSender<TimerChange>,
    /// The client's spans (a `schedule timer` span per scheduled timer when exported).
    pub spans: crate::spans::Spans,
    /// The client's telemetry emitter (`timer.scheduled` / `timer.unscheduled`), if it runs.
    pub telemetry: Option<Arc<crate::telemetry::Telemetry>>,
    /// The partition's event counts for `/metrics` (those two events are counted here).
    pub events: Arc<crate::metrics::EventCounts>,
}

/// What a handler's context uses to manage its own key's timers.
#[derive(Clone)]
pub struct KeyTimers {
    /// The event's partition.
    partition: Arc<PartitionTimerHandle>,
    /// The event's key.
    key: Key,
}

impl std::fmt::Debug for KeyTimers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyTimers({:?}, {:?})", self.partition.scope, self.key)
    }
}

impl KeyTimers {
    /// Timers of `key` in `partition`.
    pub fn new(partition: Arc<PartitionTimerHandle>, key: Key) -> Self {
        Self { partition, key }
    }

    fn tell(&self, change: TimerChange) {
        // A worker that is gone (partition released) reloads from the store on the next assign.
        let _ = self.partition.changes.send(change);
    }

    /// A telemetry event about this key's timer at `time` (`None`: every timer of the key).
    fn report(
        &self,
        kind: crate::telemetry::Kind,
        time: Option<Seconds>,
        trace: &opentelemetry::Context,
    ) {
        self.partition.events.add(kind);
        if let Some(telemetry) = &self.partition.telemetry {
            telemetry.send(crate::telemetry::Event {
                timer: Some(time),
                ..crate::telemetry::Event::new(
                    kind,
                    self.partition.scope.topic.clone(),
                    self.partition.scope.partition,
                    Some(self.key.clone()),
                    trace,
                )
            });
        }
    }

    /// Stores a timer at `time` (idempotent per second), scheduled from the handler call whose
    /// trace context is `trace`: the timer keeps the context of a `schedule timer` span (when
    /// spans are exported) or `trace` itself, and its `fire` span relates to it.
    pub async fn schedule(
        &self,
        time: Seconds,
        trace: &opentelemetry::Context,
    ) -> Result<(), TimerError> {
        check_range(time)?;
        let scheduled = self.partition.spans.schedule(trace, &self.key, time);
        let span: StoredSpan = crate::spans::encode_stored(&scheduled).map(Arc::from);
        self.partition
            .store
            .schedule(&self.partition.scope, &self.key, time, span.as_deref())
            .await?;
        self.tell(TimerChange::Added(self.key.clone(), time, span));
        self.report(
            crate::telemetry::Kind::TimerScheduled,
            Some(time),
            &scheduled,
        );
        Ok(())
    }

    /// Removes the timer at `time`, if any (from the handler call whose context is `trace`).
    pub async fn unschedule(
        &self,
        time: Seconds,
        trace: &opentelemetry::Context,
    ) -> Result<(), TimerError> {
        check_range(time)?;
        self.partition
            .store
            .unschedule(&self.partition.scope, &self.key, time)
            .await?;
        self.tell(TimerChange::Removed(self.key.clone(), time));
        self.report(crate::telemetry::Kind::TimerUnscheduled, Some(time), trace);
        Ok(())
    }

    /// Removes every timer of the key (from the handler call whose context is `trace`).
    pub async fn clear(&self, trace: &opentelemetry::Context) -> Result<(), TimerError> {
        self.partition
            .store
            .clear(&self.partition.scope, &self.key)
            .await?;
        self.tell(TimerChange::Cleared(self.key.clone()));
        self.report(crate::telemetry::Kind::TimerUnscheduled, None, trace);
        Ok(())
    }

    /// Removes every timer of the key, then stores one at `time`.
    pub async fn clear_and_schedule(
        &self,
        time: Seconds,
        trace: &opentelemetry::Context,
    ) -> Result<(), TimerError> {
        check_range(time)?;
        self.clear(trace).await?;
        self.schedule(time, trace).await
    }

    /// The key's timers, earliest first.
    pub async fn scheduled(&self) -> Result<Vec<Seconds>, TimerError> {
        self.partition
            .store
            .scheduled(&self.partition.scope, &self.key)
            .await
    }
}
