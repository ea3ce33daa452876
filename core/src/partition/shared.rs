//! State of a partition shared between its worker, the poll thread and health checks: room
//! (backpressure), the committable position, and when the oldest unfinished message was taken.

use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::waker::Waker;

/// Milliseconds on a process-wide monotonic clock, plus one (so 0 can mean "none").
pub(crate) fn mono_ms(at: Instant) -> u64 {
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
    pub(crate) committable: AtomicI64,
    /// When the oldest unfinished message was taken ([`mono_ms`]); 0 when none is unfinished.
    pub(crate) oldest_unfinished: AtomicU64,
    /// Wakes the poll thread when the partition regains room.
    waker: Arc<Waker>,
    /// Lifecycle events of this partition's messages and timers, for `/metrics`.
    pub(crate) events: Arc<crate::metrics::EventCounts>,
    /// Events in flight (one per busy key: running, waiting for a handler slot or a retry), as
    /// the worker last counted them.
    pub(crate) in_flight: AtomicUsize,
    /// The last move of the timer clock the worker acted on (see [`crate::timers::Clock`]).
    pub(crate) clock_seen: AtomicU64,
    /// Events waiting behind an in-flight event of their key, as the worker last counted them.
    pub(crate) queued: AtomicUsize,
    /// Timers loaded and not yet due, as the worker last counted them.
    pub(crate) timers_pending: AtomicUsize,
    /// Keys deferred (pipeline mode), as the worker last counted them.
    pub(crate) deferred_keys: AtomicUsize,
}

impl PartitionShared {
    pub(crate) fn new(max: usize, waker: Arc<Waker>) -> Self {
        Self {
            held: AtomicUsize::new(0),
            max: max.max(1),
            committable: AtomicI64::new(-1),
            oldest_unfinished: AtomicU64::new(0),
            waker,
            events: Arc::default(),
            in_flight: AtomicUsize::new(0),
            clock_seen: AtomicU64::new(0),
            queued: AtomicUsize::new(0),
            timers_pending: AtomicUsize::new(0),
            deferred_keys: AtomicUsize::new(0),
        }
    }

    /// Free room, as seen by the poll thread.
    pub(crate) fn room(&self) -> usize {
        self.max.saturating_sub(self.held.load(Ordering::Acquire))
    }

    /// The poll thread took `n` messages.
    pub(crate) fn took(&self, n: usize) {
        self.held.fetch_add(n, Ordering::AcqRel);
    }

    /// `n` messages were retired below the commit watermark: room for the poll thread.
    pub(crate) fn release(&self, n: usize) {
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
        self.oldest_wait().is_some_and(|waited| waited > threshold)
    }

    /// How long the oldest unfinished message has waited (to the millisecond), if there is one.
    pub(crate) fn oldest_wait(&self) -> Option<Duration> {
        let since = self.oldest_unfinished.load(Ordering::Acquire);
        (since != 0).then(|| Duration::from_millis(mono_ms(Instant::now()).saturating_sub(since)))
    }

    /// Messages taken from Kafka and not yet retired below the commit watermark.
    pub(crate) fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }
}
