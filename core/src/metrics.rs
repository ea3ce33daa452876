//! What `/metrics` reports (see [`crate::probe`]): counters and histograms the engine keeps as it
//! works, and the Prometheus text exposition of them.
//!
//! Nothing here is computed for a scrape that does not come: the hot paths add to atomics (an
//! event's outcome to its partition's counters, a handler's time to the scheduler's histogram,
//! a record's acknowledgement to the producer's), and librdkafka's statistics (consumer lag,
//! broker round trips, queue sizes) are kept as its statistics callback last reported them.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::telemetry::Kind;

/// Upper bounds (seconds) of the duration histograms' buckets; `+Inf` is implied.
pub const BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// A histogram of durations, added to from any thread without a lock.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations per bucket (not cumulative), the last one past every bound.
    buckets: [AtomicU64; BUCKETS.len() + 1],
    /// Sum of the observations, in nanoseconds.
    sum_ns: AtomicU64,
}

impl Histogram {
    /// Adds one observation.
    pub fn observe(&self, took: Duration) {
        let secs = took.as_secs_f64();
        let bucket = BUCKETS
            .iter()
            .position(|bound| secs <= *bound)
            .unwrap_or(BUCKETS.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.sum_ns.fetch_add(nanos, Ordering::Relaxed);
    }

    /// Writes the histogram's series as `name` with `labels` (already formatted, without
    /// braces; may be empty).
    fn write(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0u64;
        for (i, bucket) in self.buckets.iter().enumerate() {
            cumulative += bucket.load(Ordering::Relaxed);
            let bound = BUCKETS
                .get(i)
                .map_or_else(|| "+Inf".to_owned(), |b| b.to_string());
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}"
            );
        }
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        let braces = |labels: &str| {
            if labels.is_empty() {
                String::new()
            } else {
                format!("{{{labels}}}")
            }
        };
        let _ = writeln!(out, "{name}_sum{} {sum}", braces(labels));
        let _ = writeln!(out, "{name}_count{} {cumulative}", braces(labels));
    }
}

/// The histograms of a subscription: handler durations and waits for a runner (its scheduler's),
/// and how late timers fired (its partition workers').
#[derive(Debug, Default)]
pub struct SchedulerHistograms {
    /// Handler calls' durations.
    pub handler: Histogram,
    /// How long ready events waited for a runner.
    pub wait: Histogram,
    /// How long after their time timers fired.
    pub timer_lateness: Histogram,
}

/// Lifecycle events of one partition, by [`Kind`].
#[derive(Debug, Default)]
pub struct EventCounts([AtomicU64; Kind::ALL.len()]);

impl EventCounts {
    /// Counts one event of `kind`.
    pub fn add(&self, kind: Kind) {
        self.0[kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Events of `kind` so far.
    pub fn get(&self, kind: Kind) -> u64 {
        self.0[kind as usize].load(Ordering::Relaxed)
    }
}

/// What librdkafka's statistics last said about a consumer.
#[derive(Debug, Default, Clone)]
pub struct KafkaStats {
    /// Per assigned (topic, partition): consumer lag (high watermark minus committed offset;
    /// `None` while librdkafka does not know it) and messages in its fetch queue.
    pub partitions: HashMap<(String, i32), (Option<i64>, i64)>,
    /// Per broker (librdkafka's name for it): the average round trip in the last window.
    pub brokers: Vec<(String, Duration)>,
}

impl KafkaStats {
    /// The figures of `stats` that `/metrics` shows.
    pub fn from_statistics(stats: &rdkafka::statistics::Statistics) -> Self {
        let partitions = stats
            .topics
            .iter()
            .flat_map(|(topic, t)| {
                t.partitions
                    .iter()
                    .filter(|(id, _)| **id >= 0)
                    .map(move |(id, p)| {
                        let lag = (p.consumer_lag >= 0).then_some(p.consumer_lag);
                        ((topic.clone(), *id), (lag, p.fetchq_cnt))
                    })
            })
            .collect();
        let brokers = stats
            .brokers
            .values()
            .filter(|b| b.nodeid >= 0)
            .filter_map(|b| {
                let rtt = b.rtt.as_ref()?;
                (rtt.cnt > 0).then(|| {
                    let micros = u64::try_from(rtt.avg).unwrap_or(0);
                    (b.name.clone(), Duration::from_micros(micros))
                })
            })
            .collect();
        Self {
            partitions,
            brokers,
        }
    }
}

/// The process's producers' figures: records acknowledged and failed, and how long the
/// acknowledgements took from the send.
#[derive(Debug, Default)]
pub struct ProducerMetrics {
    /// Records the broker acknowledged.
    pub acknowledged: AtomicU64,
    /// Records that failed (refused, or not acknowledged within `send_timeout`).
    pub failed: AtomicU64,
    /// Time from the send to each record's report.
    pub ack_latency: Histogram,
    /// Records waiting in each producer's queue (librdkafka's statistics), by producer.
    pub queued: std::sync::Mutex<HashMap<String, u64>>,
}

/// The process's producer figures (every client's sends, including dead letters).
pub fn producer() -> &'static ProducerMetrics {
    static METRICS: crate::process::PerProcess<ProducerMetrics> = crate::process::PerProcess::new();
    METRICS.get_or_default()
}

/// One partition's figures at the time of a scrape.
#[derive(Debug)]
pub struct PartitionFigures {
    pub topic: Arc<str>,
    pub partition: i32,
    /// Messages taken from Kafka and not yet retired below the commit watermark.
    pub held: usize,
    /// Events in flight (one per busy key): running, waiting for a handler slot or a retry.
    pub in_flight: usize,
    /// Events waiting behind an in-flight event of their key.
    pub queued: usize,
    /// Timers loaded and not yet due.
    pub timers_pending: usize,
    /// Keys deferred (pipeline mode).
    pub deferred_keys: usize,
    /// The position the engine lets commit (the next offset to read), when known.
    pub committable: Option<i64>,
    /// How long the oldest unfinished message has waited, when there is one.
    pub oldest_unfinished: Option<Duration>,
    /// Whether that is longer than `stall_threshold`.
    pub stalled: bool,
    /// Events by kind.
    pub events: Arc<EventCounts>,
    /// Consumer lag (librdkafka's statistics), when known.
    pub lag: Option<i64>,
    /// Messages in librdkafka's fetch queue, when known.
    pub fetch_queue: Option<i64>,
}

/// One subscribed client's figures at the time of a scrape.
#[derive(Debug)]
pub struct ClientFigures {
    pub group: String,
    pub partitions: Vec<PartitionFigures>,
    /// Average round trip to each broker (librdkafka's statistics).
    pub brokers: Vec<(String, Duration)>,
    /// Its histograms.
    pub histograms: Arc<SchedulerHistograms>,
    /// Whether a thread or task of the subscription died.
    pub failed: bool,
}

/// A label value, escaped for the exposition format.
fn label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Writes a `# HELP` and `# TYPE` header.
fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// The Prometheus text exposition (format 0.0.4) of `clients` and the process's producers.
pub fn render(clients: &[ClientFigures]) -> String {
    let mut out = String::with_capacity(4096);
    let partition_labels = |c: &ClientFigures, p: &PartitionFigures| {
        format!(
            "group=\"{}\",topic=\"{}\",partition=\"{}\"",
            label(&c.group),
            label(&p.topic),
            p.partition
        )
    };
    type Gauge = fn(&ClientFigures, &PartitionFigures) -> Option<f64>;
    let gauges: [(&str, &str, Gauge); 10] = [
        (
            "prosody_partition_queued_events",
            "Events waiting behind an in-flight event of their key.",
            |_, p| Some(p.queued as f64),
        ),
        (
            "prosody_partition_timers_pending",
            "Timers loaded for the coming window (slab_size) and not yet due.",
            |_, p| Some(p.timers_pending as f64),
        ),
        (
            "prosody_partition_deferred_keys",
            "Keys deferred for a later retry (pipeline mode).",
            |_, p| Some(p.deferred_keys as f64),
        ),
        (
            "prosody_partition_in_flight",
            "Events in flight (messages and timers; one per key at most): running, waiting for a handler slot or for a retry.",
            |_, p| Some(p.in_flight as f64),
        ),
        (
            "prosody_partition_held_messages",
            "Messages taken from Kafka and not yet committed (in flight, queued or waiting on an earlier offset).",
            |_, p| Some(p.held as f64),
        ),
        (
            "prosody_partition_committed_offset",
            "The position the engine commits (the next offset to read).",
            |_, p| p.committable.map(|o| o as f64),
        ),
        (
            "prosody_partition_oldest_unfinished_seconds",
            "How long the partition's oldest unfinished message has waited (0 when none).",
            |_, p| Some(p.oldest_unfinished.map_or(0.0, |d| d.as_secs_f64())),
        ),
        (
            "prosody_partition_stalled",
            "1 when the oldest unfinished message waited longer than stall_threshold.",
            |_, p| Some(f64::from(u8::from(p.stalled))),
        ),
        (
            "prosody_consumer_lag_messages",
            "High watermark minus committed offset, from librdkafka's statistics.",
            |_, p| p.lag.map(|lag| lag as f64),
        ),
        (
            "prosody_consumer_fetch_queue_messages",
            "Messages librdkafka fetched for the partition and the engine has not taken yet.",
            |_, p| p.fetch_queue.map(|queued| queued as f64),
        ),
    ];
    for (name, help, value) in gauges {
        header(&mut out, name, "gauge", help);
        for c in clients {
            for p in &c.partitions {
                if let Some(v) = value(c, p) {
                    let _ = writeln!(out, "{name}{{{}}} {v}", partition_labels(c, p));
                }
            }
        }
    }
    header(
        &mut out,
        "prosody_events_total",
        "counter",
        "Lifecycle events of the partition's messages and timers, by the telemetry topic's event names.",
    );
    for c in clients {
        for p in &c.partitions {
            for kind in Kind::ALL {
                if kind == Kind::MessageSent {
                    continue;
                }
                let _ = writeln!(
                    out,
                    "prosody_events_total{{{},event=\"{}\"}} {}",
                    partition_labels(c, p),
                    kind.name(),
                    p.events.get(kind)
                );
            }
        }
    }
    type Histo = fn(&ClientFigures) -> &Histogram;
    let histograms: [(&str, &str, Histo); 3] = [
        (
            "prosody_handler_duration_seconds",
            "Handler calls' durations.",
            |c| &c.histograms.handler,
        ),
        (
            "prosody_scheduler_wait_seconds",
            "How long ready events waited for a free runner.",
            |c| &c.histograms.wait,
        ),
        (
            "prosody_timer_lateness_seconds",
            "How long after their time timers fired.",
            |c| &c.histograms.timer_lateness,
        ),
    ];
    for (name, help, histogram) in histograms {
        header(&mut out, name, "histogram", help);
        for c in clients {
            histogram(c).write(&mut out, name, &format!("group=\"{}\"", label(&c.group)));
        }
    }
    header(
        &mut out,
        "prosody_subscription_failed",
        "gauge",
        "1 when a thread or task of the subscription died (see the log).",
    );
    for c in clients {
        let _ = writeln!(
            out,
            "prosody_subscription_failed{{group=\"{}\"}} {}",
            label(&c.group),
            u8::from(c.failed)
        );
    }
    header(
        &mut out,
        "prosody_kafka_broker_rtt_seconds",
        "gauge",
        "Average round trip to each broker in librdkafka's last statistics window.",
    );
    for c in clients {
        for (broker, rtt) in &c.brokers {
            let _ = writeln!(
                out,
                "prosody_kafka_broker_rtt_seconds{{group=\"{}\",broker=\"{}\"}} {}",
                label(&c.group),
                label(broker),
                rtt.as_secs_f64()
            );
        }
    }
    let producer = producer();
    header(
        &mut out,
        "prosody_producer_queue_messages",
        "gauge",
        "Records in a producer's librdkafka queue, not yet acknowledged (librdkafka's statistics).",
    );
    if let Ok(queued) = producer.queued.lock() {
        let mut queued: Vec<_> = queued.iter().collect();
        queued.sort();
        for (name, count) in queued {
            let _ = writeln!(
                out,
                "prosody_producer_queue_messages{{producer=\"{}\"}} {count}",
                label(name)
            );
        }
    }
    header(
        &mut out,
        "prosody_producer_records_total",
        "counter",
        "Records this process sent, by result.",
    );
    let _ = writeln!(
        out,
        "prosody_producer_records_total{{result=\"acknowledged\"}} {}",
        producer.acknowledged.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "prosody_producer_records_total{{result=\"failed\"}} {}",
        producer.failed.load(Ordering::Relaxed)
    );
    header(
        &mut out,
        "prosody_producer_ack_seconds",
        "histogram",
        "Time from a send to its record's acknowledgement (or failure).",
    );
    producer
        .ack_latency
        .write(&mut out, "prosody_producer_ack_seconds", "");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_counts_cumulatively_and_sums() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(200));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(100));
        let mut out = String::new();
        h.write(&mut out, "x", "g=\"a\"");
        assert!(out.contains("x_bucket{g=\"a\",le=\"0.0005\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{g=\"a\",le=\"0.005\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{g=\"a\",le=\"60\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{g=\"a\",le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_count{g=\"a\"} 3\n"), "{out}");
        assert!(out.contains("x_sum{g=\"a\"} 100.0032\n"), "{out}");
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
