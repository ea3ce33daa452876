//! Failure-rate gating: while most handler calls fail (a downstream outage), deferring each
//! failing key would only move the whole backlog into the defer store. Over
//! `defer_failure_window`, when the share of failed handler calls (all keys, messages and timers)
//! exceeds `defer_failure_threshold`, new failures are not deferred: they retry in place and hold
//! their partition, which is the backpressure an outage calls for. Keys already deferred stay so.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Slices per window: the rate forgets old calls a tenth of a window at a time.
const SLICES: u64 = 10;

/// Handler calls in the window below which the rate is not trusted (a single failure after a
/// quiet spell is not an outage).
pub const MIN_CALLS: u64 = 10;

/// The calls of one slice of the window. Slice `n` lives at index `n % SLICES`, tagged with
/// `n + 1` (0: never used), so a stale one is recognised and reset.
#[derive(Debug, Default)]
struct Bucket {
    tag: AtomicU64,
    calls: AtomicU64,
    failed: AtomicU64,
}

/// The share of failed handler calls over a sliding window, shared by every partition of a
/// subscription. Lock-free: every handler outcome is counted with two relaxed atomic adds; a
/// slice being reset while another thread counts into it may lose that one count, which a
/// rate does not notice.
#[derive(Debug)]
pub struct FailureRate {
    /// `defer_failure_threshold`.
    threshold: f64,
    /// Width of a slice, in nanoseconds.
    slice_ns: u64,
    /// Origin of slice numbers.
    base: Instant,
    buckets: [Bucket; SLICES as usize],
}

impl FailureRate {
    /// A rate over `window` that gates deferral above `threshold`.
    pub fn new(window: Duration, threshold: f64) -> Self {
        let slice_ns = u64::try_from(window.as_nanos() / u128::from(SLICES)).unwrap_or(u64::MAX);
        Self {
            threshold,
            slice_ns: slice_ns.max(1),
            base: Instant::now(),
            buckets: Default::default(),
        }
    }

    fn slice(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX)
            / self.slice_ns
    }

    /// Counts one handler call.
    pub fn record(&self, failed: bool) {
        self.record_at(Instant::now(), failed);
    }

    fn record_at(&self, now: Instant, failed: bool) {
        let slice = self.slice(now);
        let bucket = &self.buckets[(slice % SLICES) as usize];
        let tag = slice + 1;
        let seen = bucket.tag.load(Ordering::Acquire);
        if seen != tag
            && bucket
                .tag
                .compare_exchange(seen, tag, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            bucket.calls.store(0, Ordering::Relaxed);
            bucket.failed.store(0, Ordering::Relaxed);
        }
        bucket.calls.fetch_add(1, Ordering::Relaxed);
        if failed {
            bucket.failed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Failed share of the window's calls; `None` while fewer than [`MIN_CALLS`] were made.
    pub fn rate(&self) -> Option<f64> {
        self.rate_at(Instant::now())
    }

    fn rate_at(&self, now: Instant) -> Option<f64> {
        let slice = self.slice(now);
        let oldest = slice.saturating_sub(SLICES - 1) + 1;
        let (calls, failed) = self
            .buckets
            .iter()
            .filter(|b| {
                let tag = b.tag.load(Ordering::Acquire);
                tag >= oldest && tag <= slice + 1
            })
            .fold((0, 0), |(c, f), b| {
                (
                    c + b.calls.load(Ordering::Relaxed),
                    f + b.failed.load(Ordering::Relaxed),
                )
            });
        (calls >= MIN_CALLS).then(|| failed as f64 / calls as f64)
    }

    /// Whether new failures may be deferred now.
    pub fn allows_deferral(&self) -> bool {
        self.rate().is_none_or(|rate| rate <= self.threshold)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gates_above_the_threshold_and_forgets_after_the_window() {
        let rate = FailureRate::new(Duration::from_secs(10), 0.9);
        let t0 = Instant::now();
        for _ in 0..9 {
            rate.record_at(t0, true);
        }
        assert_eq!(rate.rate_at(t0), None, "too few calls to judge");
        rate.record_at(t0, true);
        assert_eq!(rate.rate_at(t0), Some(1.0));
        for _ in 0..2 {
            rate.record_at(t0 + Duration::from_secs(5), false);
        }
        let r = rate.rate_at(t0 + Duration::from_secs(5)).unwrap();
        assert!((r - 10.0 / 12.0).abs() < 1e-9, "{r}");
        // The failures age out with their bucket; the two successes stay.
        assert_eq!(rate.rate_at(t0 + Duration::from_secs(11)), None);
    }
}
