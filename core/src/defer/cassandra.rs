//! Deferred keys in Cassandra.
//!
//! Two tables, keyed by consumer group, topic and partition (keys are the record key's bytes):
//! - `deferred_keys`: one row per deferred key of a partition with its retry state, so a new
//!   owner loads every deferred key of its partition with one partition read;
//! - `deferred_offsets`: each key's offsets, one partition per key, clustered by offset, so the
//!   next offsets of a key are one partition read. The worker reads above the last offset it
//!   handled (`off > ?`), so the rows deleted behind it are not scanned; a key that leaves
//!   deferral drops its whole partition (one partition tombstone).
//!
//! Deferring writes the key's first offset and its retry row in one logged batch, so after a
//! crash both are there or neither is. Releasing a key deletes with the timestamp of the moment
//! the worker decided it, so a retried release never erases a later deferral of the key. Rows
//! expire after `cassandra_retention`.

use std::sync::Arc;

use scylla::client::session::Session;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;

use super::{DeferError, DeferStore, Offset, Retry};
use crate::cassandra::Migration;
use crate::event::Key;
use crate::timers::{BoxFuture, Scope};

/// Schema of the deferral tables.
pub const MIGRATIONS: &[Migration] = &[Migration {
    component: "defer",
    version: 1,
    statements: &[
        "CREATE TABLE IF NOT EXISTS {ks}.deferred_keys (grp text, topic text, part int, key blob, \
         attempts int, due bigint, PRIMARY KEY ((grp, topic, part), key))",
        "CREATE TABLE IF NOT EXISTS {ks}.deferred_offsets (grp text, topic text, part int, \
         key blob, off bigint, PRIMARY KEY ((grp, topic, part, key), off))",
    ],
}];

/// Prepared statements over one session.
pub struct CassandraStore {
    session: Arc<Session>,
    /// Row lifetime, in seconds (`cassandra_retention`, at most Cassandra's 20 years).
    ttl: i32,
    insert_key: PreparedStatement,
    insert_offset: PreparedStatement,
    delete_offset: PreparedStatement,
    select_offsets: PreparedStatement,
    select_keys: PreparedStatement,
    /// `insert_offset` then `insert_key`, logged.
    defer_batch: Batch,
    /// `delete_key` then `delete_offsets`, logged.
    release_batch: Batch,
}

fn store_error(e: impl std::fmt::Display) -> DeferError {
    DeferError(e.to_string())
}

/// Cassandra's largest TTL (20 years), in seconds.
const MAX_TTL: i64 = 630_720_000;

impl CassandraStore {
    /// Prepares the statements against `keyspace` (migrated beforehand).
    pub async fn new(
        session: Arc<Session>,
        keyspace: &str,
        retention_seconds: i64,
    ) -> Result<Self, DeferError> {
        let prepare = |cql: String| {
            let session = session.clone();
            async move { session.prepare(cql).await.map_err(store_error) }
        };
        let where_key = "grp = ? AND topic = ? AND part = ? AND key = ?";
        let insert_key = prepare(format!(
            "INSERT INTO {keyspace}.deferred_keys (grp, topic, part, key, attempts, due) \
             VALUES (?, ?, ?, ?, ?, ?) USING TTL ?"
        ))
        .await?;
        let insert_offset = prepare(format!(
            "INSERT INTO {keyspace}.deferred_offsets (grp, topic, part, key, off) \
             VALUES (?, ?, ?, ?, ?) USING TTL ?"
        ))
        .await?;
        let delete_key = prepare(format!(
            "DELETE FROM {keyspace}.deferred_keys WHERE {where_key}"
        ))
        .await?;
        let delete_offsets = prepare(format!(
            "DELETE FROM {keyspace}.deferred_offsets WHERE {where_key}"
        ))
        .await?;
        let mut defer_batch = Batch::new(BatchType::Logged);
        defer_batch.append_statement(insert_offset.clone());
        defer_batch.append_statement(insert_key.clone());
        let mut release_batch = Batch::new(BatchType::Logged);
        release_batch.append_statement(delete_key.clone());
        release_batch.append_statement(delete_offsets.clone());
        Ok(Self {
            delete_offset: prepare(format!(
                "DELETE FROM {keyspace}.deferred_offsets WHERE {where_key} AND off = ?"
            ))
            .await?,
            select_offsets: prepare(format!(
                "SELECT off FROM {keyspace}.deferred_offsets WHERE {where_key} AND off > ? LIMIT ?"
            ))
            .await?,
            select_keys: prepare(format!(
                "SELECT key, attempts, due FROM {keyspace}.deferred_keys \
                 WHERE grp = ? AND topic = ? AND part = ?"
            ))
            .await?,
            session,
            ttl: i32::try_from(retention_seconds.clamp(1, MAX_TTL)).unwrap_or(i32::MAX),
            insert_key,
            insert_offset,
            defer_batch,
            release_batch,
        })
    }
}

/// Attempts as Cassandra's `int`.
fn attempts(retry: Retry) -> i32 {
    i32::try_from(retry.attempts).unwrap_or(i32::MAX)
}

impl DeferStore for CassandraStore {
    fn defer<'a>(
        &'a self,
        scope: &'a Scope,
        key: &'a [u8],
        offset: Offset,
        retry: Retry,
    ) -> BoxFuture<'a, Result<(), DeferError>> {
        Box::pin(async move {
            let (g, t, p) = (&*scope.group, &*scope.topic, scope.partition);
            self.session
                .batch(
                    &self.defer_batch,
                    (
                        (g, t, p, key, offset, self.ttl),
                        (g, t, p, key, attempts(retry), retry.due_ms, self.ttl),
                    ),
                )
                .await
                .map_err(store_error)?;
            Ok(())
        })
    }

    fn append<'a>(
        &'a self,
        scope: &'a Scope,
        key: &'a [u8],
        offset: Offset,
    ) -> BoxFuture<'a, Result<(), DeferError>> {
        Box::pin(async move {
            let values = (
                &*scope.group,
                &*scope.topic,
                scope.partition,
                key,
                offset,
                self.ttl,
            );
            self.session
                .execute_unpaged(&self.insert_offset, values)
                .await
                .map_err(store_error)?;
            Ok(())
        })
    }

    fn set_retry<'a>(
        &'a self,
        scope: &'a Scope,
        key: &'a [u8],
        retry: Retry,
    ) -> BoxFuture<'a, Result<(), DeferError>> {
        Box::pin(async move {
            let (g, t, p) = (&*scope.group, &*scope.topic, scope.partition);
            let values = (g, t, p, key, attempts(retry), retry.due_ms, self.ttl);
            self.session
                .execute_unpaged(&self.insert_key, values)
                .await
                .map_err(store_error)?;
            Ok(())
        })
    }

    fn remove<'a>(
        &'a self,
        scope: &'a Scope,
        key: &'a [u8],
        offset: Offset,
    ) -> BoxFuture<'a, Result<(), DeferError>> {
        Box::pin(async move {
            let values = (&*scope.group, &*scope.topic, scope.partition, key, offset);
            self.session
                .execute_unpaged(&self.delete_offset, values)
                .await
                .map_err(store_error)?;
            Ok(())
        })
    }

    fn offsets<'a>(
        &'a self,
        scope: &'a Scope,
        key: &'a [u8],
        after: Offset,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Offset>, DeferError>> {
        Box::pin(async move {
            let limit = i32::try_from(limit.max(1)).unwrap_or(i32::MAX);
            let values = (
                &*scope.group,
                &*scope.topic,
                scope.partition,
                key,
                after,
                limit,
            );
            let rows = self
                .session
                .execute_unpaged(&self.select_offsets, values)
                .await
                .map_err(store_error)?
                .into_rows_result()
                .map_err(store_error)?;
            rows.rows::<(i64,)>()
                .map_err(store_error)?
                .map(|row| row.map(|(o,)| o).map_err(store_error))
                .collect()
        })
    }

    fn release<'a>(
        &'a self,
        scope: &'a Scope,
        key: &'a [u8],
        decided_us: i64,
    ) -> BoxFuture<'a, Result<(), DeferError>> {
        Box::pin(async move {
            let (g, t, p) = (&*scope.group, &*scope.topic, scope.partition);
            // Deletes with the decision's timestamp: a deferral written later (the session uses
            // client-side timestamps) survives a release retried after it.
            let mut batch = self.release_batch.clone();
            batch.set_timestamp(Some(decided_us));
            self.session
                .batch(&batch, ((g, t, p, key), (g, t, p, key)))
                .await
                .map_err(store_error)?;
            Ok(())
        })
    }

    fn load<'a>(
        &'a self,
        scope: &'a Scope,
    ) -> BoxFuture<'a, Result<Vec<(Key, Retry)>, DeferError>> {
        Box::pin(async move {
            let values = (&*scope.group, &*scope.topic, scope.partition);
            let rows = self
                .session
                .execute_unpaged(&self.select_keys, values)
                .await
                .map_err(store_error)?
                .into_rows_result()
                .map_err(store_error)?;
            rows.rows::<(Vec<u8>, i32, i64)>()
                .map_err(store_error)?
                .map(|row| {
                    row.map(|(key, attempts, due_ms)| {
                        let retry = Retry {
                            attempts: u32::try_from(attempts).unwrap_or(0),
                            due_ms,
                        };
                        (Key::from(key), retry)
                    })
                    .map_err(store_error)
                })
                .collect()
        })
    }
}
