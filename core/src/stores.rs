//! The one place that opens a client's stores: in memory in mock mode; in Cassandra when
//! `cassandra_nodes` is set, with one session (connected and migrated once per client) shared by
//! every store.

use std::sync::Arc;

use crate::config::Config;
use crate::dedup::DedupStore;
use crate::defer::DeferStore;
use crate::timers::TimerStore;

/// Every store of a client.
#[derive(Clone)]
pub struct Stores {
    /// Per-key timers.
    pub timers: Arc<dyn TimerStore>,
    /// Deferred keys and offsets (pipeline mode).
    pub defer: Arc<dyn DeferStore>,
    /// Deduplication records.
    pub dedup: Arc<dyn DedupStore>,
}

impl Stores {
    /// The process-wide memory stores of mock mode.
    pub fn memory() -> Self {
        Self {
            timers: crate::timers::memory::MemoryStore::shared(),
            defer: crate::defer::memory::MemoryStore::shared(),
            dedup: crate::dedup::memory::MemoryStore::shared(),
        }
    }

    /// Connects to Cassandra, applies every component's migrations, and prepares each store over
    /// the one session.
    pub async fn cassandra(config: &Config) -> Result<Self, String> {
        let session = crate::cassandra::connect(config)
            .await
            .map_err(|e| e.to_string())?;
        let keyspace = &config.cassandra_keyspace;
        for migrations in [
            crate::timers::cassandra::MIGRATIONS,
            crate::defer::cassandra::MIGRATIONS,
            crate::dedup::cassandra::MIGRATIONS,
        ] {
            crate::cassandra::migrate(
                &session,
                keyspace,
                &config.cassandra_replication,
                migrations,
            )
            .await
            .map_err(|e| e.to_string())?;
        }
        let seconds = |d: std::time::Duration| i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
        let retention = seconds(config.cassandra_retention);
        let timers = crate::timers::cassandra::CassandraStore::new(
            session.clone(),
            keyspace,
            seconds(config.slab_size),
            retention,
        )
        .await
        .map_err(|e| e.to_string())?;
        let defer =
            crate::defer::cassandra::CassandraStore::new(session.clone(), keyspace, retention)
                .await
                .map_err(|e| e.to_string())?;
        let dedup = crate::dedup::cassandra::CassandraStore::new(session, keyspace)
            .await
            .map_err(|e| e.to_string())?;
        Ok(Self {
            timers: Arc::new(timers),
            defer: Arc::new(defer),
            dedup: Arc::new(dedup),
        })
    }
}
