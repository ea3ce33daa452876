//! Failure-rate gating: while most handler calls fail (a downstream outage), deferring each
//! failing key would only move the whole backlog into the defer store. Over
//! `defer_failure_window`, when the share of failed handler calls (all keys, messages and timers)
//! exceeds `defer_failure_threshold`, new failures are not deferred: they retry in place and hold
//! their partition, which is the backpressure an outage calls for. Keys already deferred stay so.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Buckets per window: the rate forgets old calls a tenth of a window at a time.
const BUCKETS: u32 = 10;

/// Handler calls in the window below which the rate is not trusted (a single failure after a
/// quiet spell is not an outage).
pub const MIN_CALLS: u64 = 10;

/// Handler calls counted in one slice of the window.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    start: Instant,
    calls: u64,
    failed: u64,
}

/// The share of failed handler calls over a sliding window, shared by every partition of a
/// subscription.
#[derive(Debug)]
pub struct FailureRate {
    /// `defer_failure_window`.
    window: Duration,
    /// `defer_failure_threshold`.
    threshold: f64,
    /// Oldest first; none older than the window.
    buckets: Mutex<VecDeque<Bucket>>,
}

impl FailureRate {
    /// A rate over `window` that gates deferral above `threshold`.
    pub fn new(window: Duration, threshold: f64) -> Self {
        Self {
            window: window.max(Duration::from_millis(BUCKETS.into())),
            threshold,
            buckets: Mutex::new(VecDeque::new()),
        }
    }

    /// Counts one handler call.
    pub fn record(&self, failed: bool) {
        self.record_at(Instant::now(), failed);
    }

    fn record_at(&self, now: Instant, failed: bool) {
        let Ok(mut buckets) = self.buckets.lock() else {
            return;
        };
        let slice = self.window / BUCKETS;
        match buckets.back_mut() {
            Some(b) if now.saturating_duration_since(b.start) < slice => {
                b.calls += 1;
                b.failed += u64::from(failed);
            }
            _ => buckets.push_back(Bucket {
                start: now,
                calls: 1,
                failed: u64::from(failed),
            }),
        }
        self.expire(&mut buckets, now);
    }

    fn expire(&self, buckets: &mut VecDeque<Bucket>, now: Instant) {
        while buckets
            .front()
            .is_some_and(|b| now.saturating_duration_since(b.start) > self.window)
        {
            buckets.pop_front();
        }
    }

    /// Failed share of the window's calls; `None` while fewer than [`MIN_CALLS`] were made.
    pub fn rate(&self) -> Option<f64> {
        self.rate_at(Instant::now())
    }

    fn rate_at(&self, now: Instant) -> Option<f64> {
        let mut buckets = self.buckets.lock().ok()?;
        self.expire(&mut buckets, now);
        let (calls, failed) = buckets
            .iter()
            .fold((0, 0), |(c, f), b| (c + b.calls, f + b.failed));
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
