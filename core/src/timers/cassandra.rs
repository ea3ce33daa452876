//! Timers in Cassandra.
//!
//! Three tables, all keyed by consumer group, topic and partition (keys are the record key's bytes):
//! - `timers_by_slab`: timers grouped in slabs of `slab_size` (partition key includes the slab), so
//!   a partition's owner loads the overdue and near-future slabs without scanning the rest;
//! - `timer_slab_index`: which slabs of a partition hold timers;
//! - `timers_by_key`: each key's timers, for `scheduled` and `clear_scheduled`.
//!
//! Times are `bigint` seconds since the epoch (dates after 2038 are fine). Rows expire at
//! (time − now) + `cassandra_retention`, so a timer that nobody fires (its topic deleted, its group
//! gone) does not stay forever. Cassandra's default storage format cannot express an expiry after
//! 2038-01-19 (CASSANDRA-14092); such rows are written without a TTL, so the timer is kept until
//! it fires rather than expiring early.

use std::sync::Arc;

use scylla::client::session::Session;
use scylla::deserialize::row::DeserializeRow;
use scylla::serialize::row::SerializeRow;
use scylla::statement::prepared::PreparedStatement;

use super::{now, BoxFuture, Due, Scope, Seconds, TimerError, TimerStore};
use crate::cassandra::Migration;
use crate::event::Key;

/// Schema of the timer tables. Version 2 keys timers by the record key's bytes (`blob`): version
/// 1 stored keys as `text`, which merged keys that are not UTF-8. Its tables are left in place,
/// unused (timers stored before this release are not carried over).
pub const MIGRATIONS: &[Migration] = &[
    Migration {
    component: "timers",
    version: 1,
    statements: &[
        "CREATE TABLE IF NOT EXISTS {ks}.timer_slabs (grp text, topic text, part int, slab bigint, \
         key text, time bigint, PRIMARY KEY ((grp, topic, part, slab), key, time))",
        "CREATE TABLE IF NOT EXISTS {ks}.timer_slab_index (grp text, topic text, part int, \
         slab bigint, PRIMARY KEY ((grp, topic, part), slab))",
        "CREATE TABLE IF NOT EXISTS {ks}.timer_keys (grp text, topic text, part int, key text, \
         time bigint, PRIMARY KEY ((grp, topic, part, key), time))",
    ],
    },
    Migration {
        component: "timers",
        version: 2,
        statements: &[
            "CREATE TABLE IF NOT EXISTS {ks}.timers_by_slab (grp text, topic text, part int, \
             slab bigint, key blob, time bigint, PRIMARY KEY ((grp, topic, part, slab), key, time))",
            "CREATE TABLE IF NOT EXISTS {ks}.timers_by_key (grp text, topic text, part int, \
             key blob, time bigint, PRIMARY KEY ((grp, topic, part, key), time))",
        ],
    },
    // The trace context a timer was scheduled in, for its `fire` span.
    Migration {
        component: "timers",
        version: 3,
        statements: &["ALTER TABLE {ks}.timers_by_slab ADD IF NOT EXISTS span text"],
    },
];

/// Cassandra's largest TTL (20 years), in seconds.
const MAX_TTL: i64 = 630_720_000;

/// Latest expiry Cassandra's default storage format accepts (2038-01-19), less a day of margin.
const LATEST_EXPIRY: i64 = i32::MAX as i64 - 86_400;

/// Prepared statements over one session.
pub struct CassandraStore {
    /// The shared session.
    session: Arc<Session>,
    /// Width of a slab, in seconds.
    slab_seconds: i64,
    /// Kept after a timer's time, in seconds.
    retention_seconds: i64,
    insert_slab: PreparedStatement,
    insert_index: PreparedStatement,
    insert_key: PreparedStatement,
    delete_slab: PreparedStatement,
    delete_key: PreparedStatement,
    delete_all_keys: PreparedStatement,
    select_key: PreparedStatement,
    select_index: PreparedStatement,
    select_slab: PreparedStatement,
}

fn store_error(e: impl std::fmt::Display) -> TimerError {
    TimerError::Store(e.to_string())
}

impl CassandraStore {
    /// Prepares the statements against `keyspace` (migrated beforehand).
    pub async fn new(
        session: Arc<Session>,
        keyspace: &str,
        slab_seconds: i64,
        retention_seconds: i64,
    ) -> Result<Self, TimerError> {
        let prepare = |cql: String| {
            let session = session.clone();
            async move { session.prepare(cql).await.map_err(store_error) }
        };
        Ok(Self {
            insert_slab: prepare(format!(
                "INSERT INTO {keyspace}.timers_by_slab (grp, topic, part, slab, key, time, span) VALUES (?, ?, ?, ?, ?, ?, ?) USING TTL ?"
            ))
            .await?,
            insert_index: prepare(format!(
                "INSERT INTO {keyspace}.timer_slab_index (grp, topic, part, slab) VALUES (?, ?, ?, ?) USING TTL ?"
            ))
            .await?,
            insert_key: prepare(format!(
                "INSERT INTO {keyspace}.timers_by_key (grp, topic, part, key, time) VALUES (?, ?, ?, ?, ?) USING TTL ?"
            ))
            .await?,
            delete_slab: prepare(format!(
                "DELETE FROM {keyspace}.timers_by_slab WHERE grp = ? AND topic = ? AND part = ? AND slab = ? AND key = ? AND time = ?"
            ))
            .await?,
            delete_key: prepare(format!(
                "DELETE FROM {keyspace}.timers_by_key WHERE grp = ? AND topic = ? AND part = ? AND key = ? AND time = ?"
            ))
            .await?,
            delete_all_keys: prepare(format!(
                "DELETE FROM {keyspace}.timers_by_key WHERE grp = ? AND topic = ? AND part = ? AND key = ?"
            ))
            .await?,
            select_key: prepare(format!(
                "SELECT time FROM {keyspace}.timers_by_key WHERE grp = ? AND topic = ? AND part = ? AND key = ?"
            ))
            .await?,
            select_index: prepare(format!(
                "SELECT slab FROM {keyspace}.timer_slab_index WHERE grp = ? AND topic = ? AND part = ? AND slab <= ?"
            ))
            .await?,
            select_slab: prepare(format!(
                "SELECT key, time, span FROM {keyspace}.timers_by_slab WHERE grp = ? AND topic = ? AND part = ? AND slab = ?"
            ))
            .await?,
            session,
            slab_seconds: slab_seconds.max(1),
            retention_seconds,
        })
    }

    fn slab(&self, time: Seconds) -> i64 {
        time.div_euclid(self.slab_seconds)
    }

    /// Seconds until the rows of a timer at `time` expire; 0 (no expiry) when the expiry would
    /// pass what the server can store.
    fn ttl(&self, time: Seconds) -> i32 {
        let now = now();
        let ttl = (time - now).max(0).saturating_add(self.retention_seconds);
        if ttl > MAX_TTL || now.saturating_add(ttl) > LATEST_EXPIRY {
            return 0;
        }
        i32::try_from(ttl.max(1)).unwrap_or(0)
    }

    /// Runs a select and decodes every row; a row that does not decode is an error, never
    /// skipped (a skipped index row would hide a slab's timers).
    async fn select<R>(
        &self,
        statement: &PreparedStatement,
        values: impl SerializeRow,
    ) -> Result<Vec<R>, TimerError>
    where
        R: for<'r> DeserializeRow<'r, 'r>,
    {
        self.session
            .execute_unpaged(statement, values)
            .await
            .map_err(store_error)?
            .into_rows_result()
            .map_err(store_error)?
            .rows::<R>()
            .map_err(store_error)?
            .collect::<Result<Vec<R>, _>>()
            .map_err(store_error)
    }

    async fn times_of(&self, scope: &Scope, key: &[u8]) -> Result<Vec<Seconds>, TimerError> {
        let rows: Vec<(i64,)> = self
            .select(
                &self.select_key,
                (&*scope.group, &*scope.topic, scope.partition, key),
            )
            .await?;
        let mut times: Vec<Seconds> = rows.into_iter().map(|(t,)| t).collect();
        times.sort_unstable();
        Ok(times)
    }

    async fn delete(&self, scope: &Scope, key: &[u8], time: Seconds) -> Result<(), TimerError> {
        let (g, t, p) = (&*scope.group, &*scope.topic, scope.partition);
        let (slab_row, key_row) = tokio::join!(
            self.session
                .execute_unpaged(&self.delete_slab, (g, t, p, self.slab(time), key, time)),
            self.session
                .execute_unpaged(&self.delete_key, (g, t, p, key, time)),
        );
        slab_row.map_err(store_error)?;
        key_row.map_err(store_error)?;
        Ok(())
    }
}

impl TimerStore for CassandraStore {
    fn schedule<'a>(
        &'a self,
        scope: &'a Scope,
        key: &'a [u8],
        time: Seconds,
        span: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), TimerError>> {
        Box::pin(async move {
            let (g, t, p) = (&*scope.group, &*scope.topic, scope.partition);
            let (slab, ttl) = (self.slab(time), self.ttl(time));
            // The three rows go out together (one round trip of latency); the timer counts as
            // stored, and `schedule` returns, only once all three are written.
            let (index, slab_row, key_row) = tokio::join!(
                self.session
                    .execute_unpaged(&self.insert_index, (g, t, p, slab, ttl)),
                self.session
                    .execute_unpaged(&self.insert_slab, (g, t, p, slab, key, time, span, ttl)),
                self.session
                    .execute_unpaged(&self.insert_key, (g, t, p, key, time, ttl)),
            );
            index.map_err(store_error)?;
            slab_row.map_err(store_error)?;
            key_row.map_err(store_error)?;
            Ok(())
        })
    }

    fn unschedule<'a>(
        &'a self,
        scope: &'a Scope,
        key: &'a [u8],
        time: Seconds,
    ) -> BoxFuture<'a, Result<(), TimerError>> {
        Box::pin(self.delete(scope, key, time))
    }

    fn clear<'a>(
        &'a self,
        scope: &'a Scope,
        key: &'a [u8],
    ) -> BoxFuture<'a, Result<(), TimerError>> {
        Box::pin(async move {
            for time in self.times_of(scope, key).await? {
                self.session
                    .execute_unpaged(
                        &self.delete_slab,
                        (
                            &*scope.group,
                            &*scope.topic,
                            scope.partition,
                            self.slab(time),
                            key,
                            time,
                        ),
                    )
                    .await
                    .map_err(store_error)?;
            }
            self.session
                .execute_unpaged(
                    &self.delete_all_keys,
                    (&*scope.group, &*scope.topic, scope.partition, key),
                )
                .await
                .map_err(store_error)?;
            Ok(())
        })
    }

    fn scheduled<'a>(
        &'a self,
        scope: &'a Scope,
        key: &'a [u8],
    ) -> BoxFuture<'a, Result<Vec<Seconds>, TimerError>> {
        Box::pin(self.times_of(scope, key))
    }

    fn load<'a>(
        &'a self,
        scope: &'a Scope,
        until: Seconds,
    ) -> BoxFuture<'a, Result<Due, TimerError>> {
        Box::pin(async move {
            let (g, t, p) = (&*scope.group, &*scope.topic, scope.partition);
            let slabs: Vec<(i64,)> = self
                .select(&self.select_index, (g, t, p, self.slab(until)))
                .await?;
            let mut due: Due = Vec::new();
            for (slab,) in slabs {
                let rows: Vec<(Vec<u8>, i64, Option<String>)> =
                    self.select(&self.select_slab, (g, t, p, slab)).await?;
                due.extend(
                    rows.into_iter()
                        .filter(|(_, time, _)| *time <= until)
                        .map(|(key, time, span)| (Key::from(key), time, span.map(Arc::from))),
                );
            }
            due.sort_by_key(|(_, s, _)| *s);
            Ok(due)
        })
    }
}
