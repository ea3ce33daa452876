//! Kafka: the poll thread and rebalance handling, the producer, and the in-process mock cluster.

pub mod consumer;
pub mod mock;
pub mod producer;
pub mod reload;
pub mod settings;

use std::sync::{Arc, Mutex, OnceLock};

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientContext;
use thiserror::Error;

/// Logs an error that librdkafka reports through its error callback. librdkafka has usually
/// logged the same event already (its `FAIL`/`ERROR` lines reach the log through
/// [`ClientContext::log`]), so a second line for it would double every error: only what it does
/// not log on its own is logged here above DEBUG.
pub(crate) fn log_client_error(error: &rdkafka::error::KafkaError, reason: &str) {
    match error.rdkafka_error_code() {
        Some(RDKafkaErrorCode::Fatal) => tracing::error!("fatal Kafka client error: {reason}"),
        Some(RDKafkaErrorCode::AllBrokersDown) => {
            tracing::warn!("no Kafka broker is reachable: {reason}")
        }
        _ => tracing::debug!("Kafka client error: {error}: {reason}"),
    }
}

/// Passes a librdkafka log line on to the log, and says whether it reports that the cluster
/// behind the bootstrap servers is another one than before (its cluster id changed: the broker
/// was wiped and recreated, or the address now points elsewhere). librdkafka repeats that warning
/// at every metadata refresh; the caller logs one clear error of its own instead.
pub(crate) fn log_librdkafka(level: RDKafkaLogLevel, facility: &str, message: &str) -> bool {
    if facility == "CLUSTERID" {
        tracing::debug!(target: "librdkafka", "librdkafka: {facility} {message}");
        return true;
    }
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error => {
            tracing::error!(target: "librdkafka", "librdkafka: {facility} {message}")
        }
        RDKafkaLogLevel::Warning => {
            tracing::warn!(target: "librdkafka", "librdkafka: {facility} {message}")
        }
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
            tracing::info!(target: "librdkafka", "librdkafka: {facility} {message}")
        }
        RDKafkaLogLevel::Debug => {
            tracing::debug!(target: "librdkafka", "librdkafka: {facility} {message}")
        }
    }
    false
}

/// The context of Prosody's producers: librdkafka's log lines as usual, errors once, and a
/// watch for a changed cluster (after which the producer is replaced, see `producer.rs`).
pub struct ProducerContext {
    /// librdkafka's words when it saw another cluster id than before (shared with the owner of
    /// the producer, since librdkafka's wrapper hides the context).
    pub cluster_changed: Arc<OnceLock<String>>,
    /// Which producer this is, for the log line (a process has one per servers and timeout).
    pub name: String,
    /// The last refusal by the cluster (failed SASL authentication, failed TLS handshake), so
    /// that a send that times out says why (shared with the owner, like `cluster_changed`).
    pub refused: Arc<Mutex<Option<String>>>,
    /// The producer's start-up state (see `Shared::warm_up`): a refusal ends the start-up as
    /// failed, so that no send waits for it.
    pub ready: Arc<tokio::sync::watch::Sender<Option<bool>>>,
    /// The process's producer figures, added to by each delivery report.
    pub metrics: &'static crate::metrics::ProducerMetrics,
}

/// Delivery reports go to the [`producer::Acks`] of the send that queued the record.
impl rdkafka::producer::ProducerContext for ProducerContext {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &rdkafka::producer::DeliveryResult<'_>, opaque: usize) {
        producer::Acks::report(result, opaque, self.metrics);
    }
}

impl ClientContext for ProducerContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        if log_librdkafka(level, facility, message)
            && self.cluster_changed.set(message.to_owned()).is_ok()
        {
            tracing::error!(
                "the Kafka cluster behind bootstrap_servers changed ({message}); the {}'s state \
                 belongs to the old cluster: it is replaced by a new one at the next send",
                self.name
            );
        }
    }

    fn stats(&self, statistics: rdkafka::statistics::Statistics) {
        if let Ok(mut queued) = self.metrics.queued.lock() {
            queued.insert(self.name.clone(), statistics.msg_cnt);
        }
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        log_client_error(&error, reason);
        // A TLS alert from the broker (a certificate it refused) comes as a transport failure.
        let refused = match error.rdkafka_error_code() {
            Some(RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SSL) => true,
            Some(RDKafkaErrorCode::BrokerTransportFailure) => reason.contains("SSL routines"),
            _ => false,
        };
        if refused {
            if let Ok(mut refused) = self.refused.lock() {
                *refused = Some(reason.to_owned());
            }
            self.ready.send_if_modified(|ready| {
                let starting = ready.is_none();
                if starting {
                    *ready = Some(false);
                }
                starting
            });
        }
    }
}

/// How often librdkafka reports its statistics to the consumers and producers (read by
/// `/metrics`), in milliseconds.
pub(crate) const STATISTICS_INTERVAL_MS: &str = "1000";

/// Fewest records librdkafka prefetches per partition, however many partitions share
/// `prefetch_records`: below this, fetch round trips would pace the partition.
pub const MIN_PREFETCH: u64 = 1_000;

/// Partitions assumed when the cluster did not tell how many the subscribed topics have.
pub const UNKNOWN_PARTITIONS: u64 = 32;

/// Records librdkafka may prefetch for each partition: `budget` (`prefetch_records`) shared by
/// the subscribed topics' `partitions` (as if there were [`UNKNOWN_PARTITIONS`] when unknown),
/// at least [`MIN_PREFETCH`]. A client can be assigned every partition, so the budget bounds
/// its prefetch whatever it is assigned (partitions added later get the same share each).
pub fn prefetch_share(budget: u64, partitions: Option<usize>) -> u64 {
    let partitions = partitions.map_or(UNKNOWN_PARTITIONS, |p| p as u64).max(1);
    (budget / partitions).max(MIN_PREFETCH)
}

/// Failures talking to Kafka, each tied to the operation that failed.
#[derive(Debug, Error)]
pub enum KafkaError {
    /// The client configuration was rejected by librdkafka.
    #[error("could not create the Kafka {what}: {source}; check bootstrap_servers and the other Kafka options")]
    Create {
        what: &'static str,
        source: rdkafka::error::KafkaError,
    },
    /// Subscribing failed.
    #[error("could not subscribe to {topics:?}: {source}")]
    Subscribe {
        topics: Vec<String>,
        source: rdkafka::error::KafkaError,
    },
    /// Span export could not be set up from the `OTEL_*` environment.
    #[error("tracing: {0}")]
    Tracing(String),
    /// The mock cluster could not be created or changed.
    #[error("mock cluster: {0}")]
    Mock(String),
    /// Subscribing needs a group and topics.
    #[error("cannot subscribe: {0}")]
    NotConsumer(&'static str),
    /// A second subscribe on the same client.
    #[error("already subscribed; call unsubscribe first")]
    AlreadySubscribed,
    /// A thread could not be started.
    #[error("could not start the {what} thread: {source}")]
    Thread {
        what: &'static str,
        source: std::io::Error,
    },
    /// The shared runtime is unavailable.
    #[error("{0}")]
    Runtime(String),
    /// A thread or task of the subscription died (a panic); it was stopped.
    #[error("the subscription failed and was stopped: {0}")]
    EngineFailed(String),
    /// The timer store could not be set up.
    #[error("could not set up the timer store: {0}")]
    Timers(String),
    /// The probe server could not listen on `probe_host`:`probe_port`.
    #[error(
        "could not start the probe server on {addr} (probe_host {host}, probe_port {port}): {source}; \
         choose a free probe_port, or set it to nil to turn the probe server off",
        host = addr.ip(),
        port = addr.port()
    )]
    Probe {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

#[cfg(test)]
mod tests {
    use super::{prefetch_share, MIN_PREFETCH};

    #[test]
    fn the_prefetch_budget_is_shared_by_the_partitions_with_a_floor() {
        assert_eq!(prefetch_share(64_000, Some(1)), 64_000);
        assert_eq!(prefetch_share(64_000, Some(4)), 16_000);
        assert_eq!(prefetch_share(64_000, Some(32)), 2_000);
        // Unknown: as if 32 partitions.
        assert_eq!(prefetch_share(64_000, None), 2_000);
        // Never below the floor, however many partitions.
        assert_eq!(prefetch_share(64_000, Some(1_000)), MIN_PREFETCH);
        assert_eq!(prefetch_share(10, Some(0)), MIN_PREFETCH);
    }
}
