//! Deduplication records in Cassandra: one row per fingerprint (its 16 bytes, big-endian), with
//! a TTL of `idempotence_ttl`. A worker's reads go out together, as `IN` queries of up to
//! [`BATCH`] ids; its records go out together, as unlogged batches of up to [`BATCH`] rows (one
//! request, no batch log: each row is independent).

use std::sync::Arc;
use std::time::Duration;

use scylla::client::session::Session;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;

use super::{DedupError, DedupStore, Fingerprint};
use crate::cassandra::Migration;
use crate::timers::BoxFuture;

/// Schema of the deduplication table.
pub const MIGRATIONS: &[Migration] = &[Migration {
    component: "dedup",
    version: 1,
    statements: &["CREATE TABLE IF NOT EXISTS {ks}.dedup_records (id blob PRIMARY KEY)"],
}];

/// Ids per query or batch at most (well under Cassandra's batch size warning).
const BATCH: usize = 64;

/// Cassandra's largest TTL (20 years), in seconds.
pub const MAX_TTL_SECONDS: u64 = 630_720_000;

/// Prepared statements over the client's session.
pub struct CassandraStore {
    session: Arc<Session>,
    insert: PreparedStatement,
    select: PreparedStatement,
}

fn store_error(e: impl std::fmt::Display) -> DedupError {
    DedupError(e.to_string())
}

impl CassandraStore {
    /// Prepares the statements against `keyspace` (migrated beforehand).
    pub async fn new(session: Arc<Session>, keyspace: &str) -> Result<Self, DedupError> {
        let insert = session
            .prepare(format!(
                "INSERT INTO {keyspace}.dedup_records (id) VALUES (?) USING TTL ?"
            ))
            .await
            .map_err(store_error)?;
        let select = session
            .prepare(format!(
                "SELECT id FROM {keyspace}.dedup_records WHERE id IN ?"
            ))
            .await
            .map_err(store_error)?;
        Ok(Self {
            session,
            insert,
            select,
        })
    }
}

/// A TTL in Cassandra's range (1 s to 20 years).
fn ttl_seconds(ttl: Duration) -> i32 {
    i32::try_from(ttl.as_secs().clamp(1, MAX_TTL_SECONDS)).unwrap_or(i32::MAX)
}

impl DedupStore for CassandraStore {
    fn seen<'a>(&'a self, ids: &'a [Fingerprint]) -> BoxFuture<'a, Result<Vec<bool>, DedupError>> {
        Box::pin(async move {
            let mut found = std::collections::HashSet::new();
            for chunk in ids.chunks(BATCH) {
                let keys: Vec<Vec<u8>> = chunk.iter().map(|id| id.to_be_bytes().to_vec()).collect();
                let rows = self
                    .session
                    .execute_unpaged(&self.select, (keys,))
                    .await
                    .map_err(store_error)?
                    .into_rows_result()
                    .map_err(store_error)?;
                for row in rows.rows::<(Vec<u8>,)>().map_err(store_error)? {
                    let (bytes,) = row.map_err(store_error)?;
                    if let Ok(array) = <[u8; 16]>::try_from(bytes.as_slice()) {
                        found.insert(u128::from_be_bytes(array));
                    }
                }
            }
            Ok(ids.iter().map(|id| found.contains(id)).collect())
        })
    }

    fn record<'a>(
        &'a self,
        ids: &'a [Fingerprint],
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), DedupError>> {
        Box::pin(async move {
            let ttl = ttl_seconds(ttl);
            for chunk in ids.chunks(BATCH) {
                let mut batch = Batch::new(BatchType::Unlogged);
                let mut values = Vec::with_capacity(chunk.len());
                for id in chunk {
                    batch.append_statement(self.insert.clone());
                    values.push((id.to_be_bytes().to_vec(), ttl));
                }
                self.session
                    .batch(&batch, values)
                    .await
                    .map_err(store_error)?;
            }
            Ok(())
        })
    }
}
