//! Monopolization detection (pipeline mode): a key whose handlers used more than
//! `monopolization_threshold` of the last `monopolization_window` is rejected before its next
//! handler runs, with a transient `Prosody::MonopolizationError`, so deferral sets it aside (or,
//! while the failure rate gates deferral, it backs off in place) and other keys get the time.
//!
//! Handler time comes from the scheduler, which measures each call from take to release and
//! reports it in batches ([`crate::scheduler::Scheduler::observe_usage`]). Each key's time is
//! kept in ten slices of the window, for at most `monopolization_cache_size` keys (when more are
//! seen, the quarter with the least time is forgotten: they are the furthest from the
//! threshold).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use foldhash::quality::RandomState;

use crate::event::Key;

/// Slices per window.
const SLICES: u32 = 10;

/// Error class of a rejection.
pub const MONOPOLIZATION_ERROR: &str = "Prosody::MonopolizationError";

/// One key's handler time in the window, without allocation: slice `n` is kept at index
/// `n % SLICES`, tagged with `n` so a stale one is recognised.
#[derive(Debug, Default)]
struct Usage {
    /// (slice number, seconds used in it).
    slices: [(u64, f64); SLICES as usize],
    /// When the key was last logged as monopolizing (logged once per window).
    logged: Option<Instant>,
    /// Counted in [`Monopolization::hot`]: it was above the threshold when last recorded, and
    /// no check has found it under since.
    hot: bool,
}

/// Per-key handler time over a rolling window, shared by a subscription's partitions.
#[derive(Debug)]
pub struct Monopolization {
    window: Duration,
    threshold: f64,
    cache_size: usize,
    /// Origin of slice numbers.
    base: Instant,
    keys: Mutex<HashMap<Key, Usage, RandomState>>,
    /// Keys marked `hot`. Time only leaves a key's window unless a record adds some, so a key
    /// can be above the threshold only if it is marked: while none is, a check is one atomic
    /// load, not a lock and a lookup per message.
    hot: AtomicUsize,
}

impl Monopolization {
    /// A detector for keys above `threshold` of `window`, tracking at most `cache_size` keys.
    pub fn new(window: Duration, threshold: f64, cache_size: usize) -> Self {
        Self {
            window: window.max(Duration::from_millis(SLICES.into())),
            threshold,
            cache_size: cache_size.max(1),
            base: Instant::now(),
            keys: Mutex::new(HashMap::default()),
            hot: AtomicUsize::new(0),
        }
    }

    fn slice(&self, at: Instant) -> u64 {
        let width = (self.window / SLICES).as_nanos().max(1);
        u64::try_from(at.saturating_duration_since(self.base).as_nanos() / width)
            .unwrap_or(u64::MAX)
    }

    /// Adds handler time of finished calls: (key, seconds, when it ended).
    pub fn record<'a>(&self, charges: impl IntoIterator<Item = (&'a Key, f64, Instant)>) {
        let Ok(mut keys) = self.keys.lock() else {
            return;
        };
        let limit = self.threshold * self.window.as_secs_f64();
        for (key, secs, at) in charges {
            let slice = self.slice(at);
            let usage = match keys.get_mut(key) {
                Some(usage) => usage,
                None => keys.entry(key.clone()).or_default(),
            };
            let cell = &mut usage.slices[(slice % u64::from(SLICES)) as usize];
            if cell.0 == slice {
                cell.1 += secs;
            } else {
                *cell = (slice, secs);
            }
            if !usage.hot && Self::total(usage, slice) > limit {
                usage.hot = true;
                self.hot.fetch_add(1, Ordering::AcqRel);
            }
        }
        if keys.len() > self.cache_size {
            let now = self.slice(Instant::now());
            let mut totals: Vec<(f64, Key)> = keys
                .iter()
                .map(|(k, u)| (Self::total(u, now), k.clone()))
                .collect();
            let drop = keys.len() - (self.cache_size - self.cache_size / 4);
            totals.select_nth_unstable_by(drop.saturating_sub(1), |a, b| a.0.total_cmp(&b.0));
            for (_, key) in totals.into_iter().take(drop) {
                if keys.remove(&key).is_some_and(|usage| usage.hot) {
                    self.hot.fetch_sub(1, Ordering::AcqRel);
                }
            }
        }
    }

    /// Seconds used in the window ending in slice `now`.
    fn total(usage: &Usage, now: u64) -> f64 {
        let oldest = now.saturating_sub(u64::from(SLICES) - 1);
        usage
            .slices
            .iter()
            .filter(|(s, _)| *s >= oldest)
            .map(|(_, used)| used)
            .sum()
    }

    /// Whether `key` used more than the threshold of the window; the second value says whether
    /// to log it (once per key per window).
    pub fn check(&self, key: &Key) -> Option<(f64, bool)> {
        if self.hot.load(Ordering::Acquire) == 0 {
            return None;
        }
        let now = Instant::now();
        let mut keys = self.keys.lock().ok()?;
        let usage = keys.get_mut(key)?;
        let share = Self::total(usage, self.slice(now)) / self.window.as_secs_f64();
        if share <= self.threshold {
            if usage.hot {
                usage.hot = false;
                self.hot.fetch_sub(1, Ordering::AcqRel);
            }
            return None;
        }
        let log = usage
            .logged
            .is_none_or(|at| now.saturating_duration_since(at) >= self.window);
        if log {
            usage.logged = Some(now);
        }
        Some((share, log))
    }

    /// The window, for messages.
    pub fn window(&self) -> Duration {
        self.window
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_above_the_threshold_is_reported_until_its_time_leaves_the_window() {
        let m = Monopolization::new(Duration::from_secs(10), 0.5, 100);
        let hot: Key = Key::from(&b"hot"[..]);
        let cold: Key = Key::from(&b"cold"[..]);
        let t0 = m.base + Duration::from_secs(100);
        m.record([(&hot, 4.0, t0), (&cold, 1.0, t0)]);
        assert_eq!(m.check(&hot), None, "4 s of 10 is under half");
        m.record([(&hot, 2.0, t0)]);
        let (share, log) = m.check(&hot).unwrap_or_default();
        assert!(share > 0.5 && log);
        assert_eq!(
            m.check(&hot).map(|(_, log)| log),
            Some(false),
            "logged once per window"
        );
        assert_eq!(m.check(&cold), None);
    }

    #[test]
    fn forgets_the_least_used_keys_beyond_the_cache_size() {
        let m = Monopolization::new(Duration::from_secs(10), 0.1, 8);
        let now = Instant::now();
        let keys: Vec<Key> = (0..9u8).map(|i| Key::from(&[i][..])).collect();
        m.record(keys.iter().enumerate().map(|(i, k)| (k, i as f64, now)));
        let kept = m.keys.lock().map(|k| k.len()).unwrap_or(0);
        assert_eq!(kept, 6, "a quarter freed");
        assert!(m.check(&keys[8]).is_some(), "the busiest key is kept");
    }

    #[test]
    fn a_key_found_under_the_threshold_is_unmarked_and_marked_again_when_it_climbs() {
        let mut m = Monopolization::new(Duration::from_secs(10), 0.5, 100);
        // Slice numbers start 100 s ago, so a charge can be recorded a window in the past.
        let past = m.base.checked_sub(Duration::from_secs(100));
        assert!(past.is_some(), "the monotonic clock is younger than 100 s");
        let Some(past) = past else { return };
        m.base = past;
        let key: Key = Key::from(&b"k"[..]);
        m.record([(&key, 6.0, past + Duration::from_secs(1))]);
        assert_eq!(m.hot.load(Ordering::Acquire), 1, "6 s of 10: marked");
        assert_eq!(m.check(&key), None, "its time left the window long ago");
        assert_eq!(m.hot.load(Ordering::Acquire), 0, "unmarked by the check");
        m.record([(&key, 6.0, Instant::now())]);
        assert_eq!(m.hot.load(Ordering::Acquire), 1, "marked again");
        assert!(m.check(&key).is_some_and(|(share, _)| share > 0.5));
    }

    #[test]
    fn evicting_a_marked_key_unmarks_it() {
        let m = Monopolization::new(Duration::from_secs(10), 0.1, 4);
        let now = Instant::now();
        let hot: Key = Key::from(&b"hot"[..]);
        m.record([(&hot, 2.0, now)]);
        assert_eq!(m.hot.load(Ordering::Acquire), 1);
        // Five busier keys push the marked one out of the cache.
        let others: Vec<Key> = (0..5u8).map(|i| Key::from(&[i][..])).collect();
        m.record(others.iter().map(|k| (k, 5.0, now)));
        let marked = m
            .keys
            .lock()
            .map(|k| k.values().filter(|u| u.hot).count())
            .unwrap_or(usize::MAX);
        assert_eq!(m.hot.load(Ordering::Acquire), marked);
    }
}
