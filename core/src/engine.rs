//! What every partition worker of one subscription shares.

use std::any::Any;
use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, OnceLock};

use tokio::runtime::Handle;

use crate::config::Config;
use crate::failure::deadletter::DeadLetters;
use crate::failure::Policy;
use crate::partition::PartitionShared;
use crate::scheduler::Scheduler;
use crate::timers::TimerStore;

/// Assigned partitions by (topic, partition).
pub(crate) type PartitionMap = HashMap<(Arc<str>, i32), Arc<PartitionShared>>;

/// Events finished without a handler call, by reason, over a client's life.
#[derive(Debug, Default)]
pub struct Skipped {
    /// Records this consumer group produced (`source-system`).
    pub own: AtomicU64,
    /// Messages whose event type `allowed_events` does not allow.
    pub filtered: AtomicU64,
    /// Messages whose id was handled before.
    pub duplicates: AtomicU64,
}

/// The per-subscription engine: configuration, the scheduler, the failure policy, the runtime.
pub struct Engine {
    /// Resolved client configuration.
    pub config: Arc<Config>,
    /// Ready events of every partition; the runners (the Ruby processor in the gem) pull from it.
    pub scheduler: Arc<Scheduler>,
    /// The runtime workers and event tasks run on.
    pub runtime: Handle,
    /// Where timers live (memory in mock mode); `None` when timers are unavailable.
    pub timers: Option<Arc<dyn TimerStore>>,
    /// What happens after a handler failed.
    pub policy: Policy,
    /// Deferred retry, in pipeline mode with `defer_enabled` and a store.
    pub deferral: Option<Arc<crate::defer::Deferral>>,
    /// Monopolization detection, in pipeline mode with `monopolization_enabled`.
    pub monopoly: Option<Arc<crate::monopoly::Monopolization>>,
    /// The failure topic, when one is configured.
    pub dead_letters: Option<Arc<DeadLetters>>,
    /// Event-type filtering, when `allowed_events` names prefixes.
    pub filter: Option<crate::filter::EventFilter>,
    /// Deduplication by message id, unless `idempotence_cache_size` is 0.
    pub dedup: Option<Arc<crate::dedup::Dedup>>,
    /// The client's telemetry emitter, when `telemetry_enabled`.
    pub telemetry: Option<Arc<crate::telemetry::Telemetry>>,
    /// The client's spans (recorded when exported) and how they relate to their causes.
    pub spans: crate::spans::Spans,
    /// The client's counts of events finished without a handler call.
    pub skipped: Arc<Skipped>,
    /// Assigned partitions' shared state, for health checks.
    pub(crate) partitions: Mutex<PartitionMap>,
    /// What librdkafka's statistics last said about the consumer (lag, round trips).
    pub kafka_stats: Mutex<crate::metrics::KafkaStats>,
    /// The client's timer clock.
    pub clock: Arc<crate::timers::Clock>,
    /// The first failure of one of this subscription's threads or tasks (a panic). Once set,
    /// the subscription no longer consumes as it should: `is_stalled` reports it, and
    /// unsubscribing reports it as an error.
    pub failure: OnceLock<String>,
}

impl Engine {
    /// Whether any assigned partition's oldest unfinished message is older than
    /// `stall_threshold`.
    pub fn is_stalled(&self) -> bool {
        if self.failure.get().is_some() {
            return true;
        }
        let threshold = self.config.stall_threshold;
        self.partitions
            .lock()
            .map(|p| p.values().any(|s| s.stalled(threshold)))
            .unwrap_or(false)
    }

    /// Partitions currently assigned.
    pub fn assigned_partitions(&self) -> usize {
        self.partitions.lock().map_or(0, |p| p.len())
    }

    /// Test support: whether every assigned partition acted on move `number` of the timer clock
    /// and has nothing in flight.
    pub fn timers_caught_up(&self, number: u64) -> bool {
        use std::sync::atomic::Ordering;
        self.partitions.lock().is_ok_and(|p| {
            p.values().all(|s| {
                s.clock_seen.load(Ordering::Acquire) >= number
                    && s.in_flight.load(Ordering::Acquire) == 0
            })
        })
    }

    /// Test support: whether each (topic, partition, high watermark) in `high` is assigned and
    /// finished everything below its high watermark, with nothing in flight (timers included).
    pub fn settled(&self, high: &[(String, i32, i64)]) -> bool {
        use std::sync::atomic::Ordering;
        let Ok(partitions) = self.partitions.lock() else {
            return false;
        };
        high.iter().all(|(topic, partition, high)| {
            partitions
                .get(&(Arc::from(topic.as_str()), *partition))
                .is_some_and(|s| {
                    s.committable().unwrap_or(0) >= *high
                        && s.oldest_wait().is_none()
                        && s.in_flight.load(Ordering::Acquire) == 0
                })
        })
    }

    /// This subscription's figures (for `/metrics` and `/livez`).
    pub fn figures(&self) -> crate::metrics::ClientFigures {
        let threshold = self.config.stall_threshold;
        let kafka = self
            .kafka_stats
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default();
        let mut partitions: Vec<_> = self
            .partitions
            .lock()
            .map(|p| {
                p.iter()
                    .map(|((topic, partition), shared)| {
                        use std::sync::atomic::Ordering::{Acquire, Relaxed};
                        let oldest_unfinished = shared.oldest_wait();
                        let librdkafka = kafka.partitions.get(&(topic.to_string(), *partition));
                        crate::metrics::PartitionFigures {
                            topic: topic.clone(),
                            partition: *partition,
                            held: shared.held(),
                            in_flight: shared.in_flight.load(Acquire),
                            queued: shared.queued.load(Relaxed),
                            timers_pending: shared.timers_pending.load(Relaxed),
                            deferred_keys: shared.deferred_keys.load(Relaxed),
                            committable: shared.committable(),
                            oldest_unfinished,
                            stalled: oldest_unfinished.is_some_and(|w| w > threshold),
                            events: shared.events.clone(),
                            lag: librdkafka.and_then(|(lag, _)| *lag),
                            fetch_queue: librdkafka.map(|(_, queued)| *queued),
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        partitions.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));

        crate::metrics::ClientFigures {
            group: self.config.group_id.clone().unwrap_or_default(),
            partitions,
            brokers: kafka.brokers,
            histograms: self.scheduler.histograms(),
            failed: self.failure.get().is_some(),
        }
    }

    /// Records that a thread or task of this subscription died (the first failure is kept) and
    /// logs it, so that it is never silent.
    pub fn fail(&self, what: String) {
        if self.failure.set(what).is_err() {
            return;
        }
        if let Some(what) = self.failure.get() {
            tracing::error!(
                "{what}; this subscription no longer consumes: unsubscribe (which reports this \
                 error) and subscribe again, or restart the process"
            );
        }
    }
}

/// The message of a caught panic.
pub fn panic_message(panic: &(dyn Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_owned())
}
