//! The in-process librdkafka mock cluster used when `mock: true`.
//!
//! One cluster per process, created on first use and shared by every client, so that a producer
//! and consumers of the same process see the same topics. Topics are created on first use.
//! [`reset`] (the testing kit's `reset_mock!`) gives the clients created after it a new, empty
//! cluster; each client holds the cluster it was created with, which goes when its last client
//! does.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};

use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;

use super::KafkaError;
use crate::process::PerProcess;

/// The mock cluster and the topics created on it.
pub struct MockKafka {
    /// librdkafka's mock brokers, listening on loopback.
    cluster: SyncMock,
    /// `bootstrap.servers` for clients of the mock.
    bootstrap: String,
    /// Topics already created (creation is idempotent but costs a round trip).
    created: Mutex<HashSet<String>>,
}

struct SyncMock(MockCluster<'static, DefaultProducerContext>);

// SAFETY: the mock cluster runs on its own librdkafka thread; the `rd_kafka_mock_*` calls we make
// (create topic, read bootstrap servers) enqueue operations to that thread under librdkafka's own
// locks and are documented as thread-safe. The handle itself is never moved out; it is freed once,
// when the last `Arc` of its `MockKafka` drops (after a reset, with its last client), on
// whichever thread that is, which librdkafka allows.
unsafe impl Send for SyncMock {}
// SAFETY: see `Send` above; shared references only call thread-safe mock operations.
unsafe impl Sync for SyncMock {}

/// The process's current cluster (none before first use, or after a reset); a forked child
/// starts with none and creates its own.
static MOCK: PerProcess<Mutex<Option<Arc<MockKafka>>>> = PerProcess::new();

/// The process's current mock cluster, created on first use.
pub fn shared() -> Result<Arc<MockKafka>, KafkaError> {
    let mut current = MOCK
        .get_or_default()
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if let Some(mock) = current.as_ref() {
        return Ok(mock.clone());
    }
    let cluster =
        MockCluster::new(1).map_err(|e| KafkaError::Mock(format!("could not create: {e}")))?;
    let bootstrap = cluster.bootstrap_servers();
    tracing::debug!("started the mock Kafka cluster at {bootstrap}");
    let mock = Arc::new(MockKafka {
        cluster: SyncMock(cluster),
        bootstrap,
        created: Mutex::new(HashSet::new()),
    });
    *current = Some(mock.clone());
    Ok(mock)
}

/// Retires the current cluster: the clients created from now on get a new, empty one. Those
/// created before keep theirs until they are dropped; the pooled producer of the retired cluster
/// leaves the pool, so it goes with the last client that uses it.
pub fn reset() {
    let retired = MOCK
        .get_or_default()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take();
    if let Some(retired) = retired {
        super::producer::forget_pooled(retired.bootstrap_servers());
        crate::testing::forget(retired.bootstrap_servers());
        tracing::debug!(
            "retired the mock Kafka cluster at {}",
            retired.bootstrap_servers()
        );
    }
}

impl MockKafka {
    /// `bootstrap.servers` of the mock brokers.
    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap
    }

    /// Creates `topic` with `partitions` partitions unless it exists already.
    pub fn ensure_topic(&self, topic: &str, partitions: u64) -> Result<(), KafkaError> {
        let mut created = self
            .created
            .lock()
            .map_err(|_| KafkaError::Mock("topic registry poisoned".into()))?;
        if created.contains(topic) {
            return Ok(());
        }
        let partitions = i32::try_from(partitions).unwrap_or(i32::MAX);
        self.cluster
            .0
            .create_topic(topic, partitions, 1)
            .map_err(|e| KafkaError::Mock(format!("could not create topic {topic:?}: {e}")))?;
        created.insert(topic.to_owned());
        Ok(())
    }

    /// Makes the mock broker answer metadata requests for `topic` with an authorization error
    /// (`fail`), or normally again; for tests of sends that fail.
    pub fn fail_topic(&self, topic: &str, fail: bool) -> Result<(), KafkaError> {
        let error = if fail {
            rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED
        } else {
            rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR
        };
        self.cluster
            .0
            .topic_error(topic, error)
            .map_err(|e| KafkaError::Mock(format!("could not set an error on {topic:?}: {e}")))
    }
}
