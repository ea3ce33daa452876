//! Kafka: the poll thread and rebalance handling, the producer, and the in-process mock cluster.

pub mod consumer;
pub mod mock;
pub mod producer;

use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientContext;
use thiserror::Error;

/// Logs an error that librdkafka reports through its error callback. librdkafka has usually
/// logged the same event already (its `FAIL`/`ERROR` lines reach the log through
/// [`ClientContext::log`]), so a second line for it would double every error: only what it does
/// not log on its own is logged here above DEBUG.
pub(crate) fn log_client_error(error: &rdkafka::error::KafkaError, reason: &str) {
    match error.rdkafka_error_code() {
        Some(RDKafkaErrorCode::Fatal) => log::error!("fatal Kafka client error: {reason}"),
        Some(RDKafkaErrorCode::AllBrokersDown) => {
            log::warn!("no Kafka broker is reachable: {reason}")
        }
        _ => log::debug!("Kafka client error: {error}: {reason}"),
    }
}

/// The context of Prosody's producers: librdkafka's log lines as usual, errors once.
pub struct QuietErrors;

impl ClientContext for QuietErrors {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        log_client_error(&error, reason);
    }
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
}
