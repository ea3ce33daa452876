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
                keys.remove(&key);
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
        let now = Instant::now();
        let mut keys = self.keys.lock().ok()?;
        let usage = keys.get_mut(key)?;
        let share = Self::total(usage, self.slice(now)) / self.window.as_secs_f64();
        if share <= self.threshold {
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
}
