//! What happens after a handler failed: retry with backoff, dead-letter, or commit, by mode.
//!
//! - `pipeline`: transient failures retry until they succeed (the retry waits in place and
//!   blocks only its key); permanent ones are logged, dead-lettered when `failure_topic` is set,
//!   and committed.
//! - `low_latency`: transient failures retry `max_retries` times, then dead-letter; permanent ones
//!   dead-letter at once.
//! - `best_effort`: logged and committed, never retried.

pub mod deadletter;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use crate::config::{Config, Mode};
use crate::handler::Failure;

/// What to do with an event whose handler failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Run it again after this delay.
    Retry(Duration),
    /// Send it to the failure topic, then commit.
    DeadLetter(Reason),
    /// Log it and commit.
    GiveUp,
}

/// Why an event was given up on (the `prosody-dlq-reason` header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The failure was classified permanent.
    Permanent,
    /// `max_retries` retries failed.
    RetriesExhausted,
    /// The payload could not be decoded.
    Undecodable,
    /// A deferred message the log no longer holds (retention, compaction): the dead letter has
    /// its key and no value.
    Unreadable,
}

impl Reason {
    /// The header value.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Permanent => "permanent",
            Reason::RetriesExhausted => "retries_exhausted",
            Reason::Undecodable => "undecodable",
            Reason::Unreadable => "unreadable",
        }
    }
}

/// The retry settings of a client.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Failure handling mode.
    pub mode: Mode,
    /// Retries after the first attempt (low_latency).
    pub max_retries: u32,
    /// Upper bound of the first retry's delay.
    pub retry_base: Duration,
    /// Upper bound of any delay.
    pub max_retry_delay: Duration,
    /// Whether a failure topic is configured.
    pub dead_letter: bool,
}

impl Policy {
    /// The policy of a client configuration.
    pub fn from_config(config: &Config) -> Self {
        Self {
            mode: config.mode,
            max_retries: u32::try_from(config.max_retries).unwrap_or(u32::MAX),
            retry_base: config.retry_base,
            max_retry_delay: config.max_retry_delay,
            dead_letter: config.failure_topic.is_some(),
        }
    }

    /// The decision after the `attempts`-th attempt (1 = the first) failed with `failure`.
    pub fn decide(&self, failure: &Failure, attempts: u32) -> Decision {
        let give_up = |reason| {
            if self.dead_letter {
                Decision::DeadLetter(reason)
            } else {
                Decision::GiveUp
            }
        };
        match self.mode {
            Mode::BestEffort => Decision::GiveUp,
            Mode::Pipeline if failure.permanent => give_up(Reason::Permanent),
            Mode::Pipeline => Decision::Retry(self.backoff(attempts)),
            Mode::LowLatency if failure.permanent => give_up(Reason::Permanent),
            Mode::LowLatency if attempts > self.max_retries => give_up(Reason::RetriesExhausted),
            Mode::LowLatency => Decision::Retry(self.backoff(attempts)),
        }
    }

    /// Full-jitter exponential backoff before retry number `retry` (1 = the first retry): a
    /// uniformly random delay up to `retry_base * 2^(retry - 1)`, capped at `max_retry_delay`.
    pub fn backoff(&self, retry: u32) -> Duration {
        self.ceiling(retry).mul_f64(random_unit())
    }

    /// The largest delay retry number `retry` can get.
    pub fn ceiling(&self, retry: u32) -> Duration {
        ceiling(self.retry_base, self.max_retry_delay, retry)
    }
}

/// `base · 2^(retry − 1)` capped at `max` (retry 1 = the first): the ceiling of an exponential
/// backoff.
pub fn ceiling(base: Duration, max: Duration, retry: u32) -> Duration {
    let doublings = retry.saturating_sub(1).min(31);
    base.checked_mul(1u32 << doublings).unwrap_or(max).min(max)
}

/// A uniform number in [0, 1) from a SplitMix64 sequence seeded once per process (not for
/// cryptography).
pub fn random_unit() -> f64 {
    static SEED: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(1);
    let seed = *SEED.get_or_init(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut z = seed.wrapping_add(n.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(mode: Mode, dead_letter: bool) -> Policy {
        Policy {
            mode,
            max_retries: 3,
            retry_base: Duration::from_millis(20),
            max_retry_delay: Duration::from_secs(300),
            dead_letter,
        }
    }

    #[test]
    fn pipeline_retries_transient_forever_and_gives_up_permanent() {
        let p = policy(Mode::Pipeline, true);
        let transient = Failure::transient("E", "m");
        for attempt in [1, 4, 100, 10_000] {
            assert!(matches!(p.decide(&transient, attempt), Decision::Retry(_)));
        }
        let permanent = Failure::permanent("E", "m");
        assert_eq!(
            p.decide(&permanent, 1),
            Decision::DeadLetter(Reason::Permanent)
        );
        assert_eq!(
            policy(Mode::Pipeline, false).decide(&permanent, 1),
            Decision::GiveUp
        );
    }

    #[test]
    fn low_latency_tries_max_retries_plus_one_times() {
        let p = policy(Mode::LowLatency, true);
        let transient = Failure::transient("E", "m");
        for attempt in 1..=3 {
            assert!(matches!(p.decide(&transient, attempt), Decision::Retry(_)));
        }
        assert_eq!(
            p.decide(&transient, 4),
            Decision::DeadLetter(Reason::RetriesExhausted)
        );
        assert_eq!(
            p.decide(&Failure::permanent("E", "m"), 1),
            Decision::DeadLetter(Reason::Permanent)
        );
    }

    #[test]
    fn best_effort_never_retries() {
        let p = policy(Mode::BestEffort, true);
        assert_eq!(p.decide(&Failure::transient("E", "m"), 1), Decision::GiveUp);
    }

    #[test]
    fn backoff_is_full_jitter_under_an_exponential_cap() {
        let p = policy(Mode::Pipeline, false);
        assert_eq!(p.ceiling(1), Duration::from_millis(20));
        assert_eq!(p.ceiling(2), Duration::from_millis(40));
        assert_eq!(p.ceiling(5), Duration::from_millis(320));
        assert_eq!(p.ceiling(40), Duration::from_secs(300));
        assert_eq!(p.ceiling(u32::MAX), Duration::from_secs(300));
        let samples: Vec<Duration> = (0..2000).map(|_| p.backoff(3)).collect();
        assert!(samples.iter().all(|d| *d <= Duration::from_millis(80)));
        let low = samples
            .iter()
            .filter(|d| **d < Duration::from_millis(40))
            .count();
        // Uniform: about half below the midpoint.
        assert!(
            (800..1200).contains(&low),
            "{low} of 2000 below the midpoint"
        );
    }
}
