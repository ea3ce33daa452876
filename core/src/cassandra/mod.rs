//! The Cassandra session and the schema Prosody keeps in it.
//!
//! Migrations are versioned per component and recorded in `<keyspace>.prosody_schema`. Every
//! statement is idempotent (`IF NOT EXISTS`), so clients that start at the same moment can apply
//! the same migration concurrently without harm; each waits for schema agreement afterwards.

use std::sync::Arc;
use std::time::Duration;

use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::frame::types::Consistency;
use scylla::policies::timestamp_generator::MonotonicTimestampGenerator;
use thiserror::Error;

use crate::config::Config;

/// Failures talking to Cassandra, tied to what was being done.
#[derive(Debug, Error)]
pub enum CassandraError {
    /// No session could be opened.
    #[error("could not connect to Cassandra at {nodes:?}: {reason}; check cassandra_nodes, cassandra_user and cassandra_password")]
    Connect {
        /// The contact points tried.
        nodes: Vec<String>,
        /// What the driver said.
        reason: String,
    },
    /// A schema statement failed.
    #[error("Cassandra schema migration {component} v{version} failed: {reason}")]
    Migration {
        /// Which component's schema.
        component: &'static str,
        /// Which version.
        version: i32,
        /// What the driver said.
        reason: String,
    },
}

/// One schema change: statements that take a component from `version - 1` to `version`.
/// `{ks}` in a statement stands for the keyspace.
pub struct Migration {
    /// The feature whose tables these are.
    pub component: &'static str,
    /// Version reached after applying.
    pub version: i32,
    /// Idempotent CQL statements.
    pub statements: &'static [&'static str],
}

/// Opens a session from the `cassandra_*` options, with LOCAL_QUORUM as the default consistency.
pub async fn connect(config: &Config) -> Result<Arc<Session>, CassandraError> {
    let profile = ExecutionProfile::builder()
        .consistency(Consistency::LocalQuorum)
        .build()
        .into_handle();
    // Client-side timestamps (monotonic per process), so that a write decided earlier and
    // retried later can carry the moment it was decided (see the defer store's release).
    let mut builder = SessionBuilder::new()
        .timestamp_generator(Arc::new(MonotonicTimestampGenerator::new()))
        .known_nodes(&config.cassandra_nodes)
        .connection_timeout(Duration::from_secs(10))
        .default_execution_profile_handle(profile);
    if let Some(user) = &config.cassandra_user {
        let password = config
            .cassandra_password
            .as_ref()
            .map(|p| p.0.clone())
            .unwrap_or_default();
        builder = builder.user(user.clone(), password);
    }
    builder = match (&config.cassandra_datacenter, &config.cassandra_rack) {
        (Some(dc), Some(rack)) => builder.prefer_datacenter_and_rack(dc.clone(), rack.clone()),
        (Some(dc), None) => builder.prefer_datacenter(dc.clone()),
        _ => builder,
    };
    builder
        .build()
        .await
        .map(Arc::new)
        .map_err(|e| CassandraError::Connect {
            nodes: config.cassandra_nodes.clone(),
            reason: e.to_string(),
        })
}

/// A failed migration step of `component` at `version`.
fn migration_error(
    component: &'static str,
    version: i32,
    e: impl std::fmt::Display,
) -> CassandraError {
    CassandraError::Migration {
        component,
        version,
        reason: e.to_string(),
    }
}

/// Creates the keyspace if needed and applies every migration not yet recorded.
pub async fn migrate(
    session: &Session,
    keyspace: &str,
    replication: &str,
    migrations: &[Migration],
) -> Result<(), CassandraError> {
    let setup = [
        format!("CREATE KEYSPACE IF NOT EXISTS {keyspace} WITH replication = {replication}"),
        format!(
            "CREATE TABLE IF NOT EXISTS {keyspace}.prosody_schema \
             (component text, version int, applied_at timestamp, PRIMARY KEY (component, version))"
        ),
    ];
    for statement in setup {
        session
            .query_unpaged(statement, &[])
            .await
            .map_err(|e| migration_error("schema", 0, e))?;
    }
    let _ = session.await_schema_agreement().await;
    for migration in migrations {
        let applied = session
            .query_unpaged(
                format!(
                    "SELECT version FROM {keyspace}.prosody_schema WHERE component = ? AND version = ?"
                ),
                (migration.component, migration.version),
            )
            .await
            .map_err(|e| migration_error(migration.component, migration.version, e))?
            .into_rows_result()
            .map(|rows| rows.rows_num() > 0)
            .unwrap_or(false);
        if applied {
            continue;
        }
        for statement in migration.statements {
            session
                .query_unpaged(statement.replace("{ks}", keyspace), &[])
                .await
                .map_err(|e| migration_error(migration.component, migration.version, e))?;
        }
        let _ = session.await_schema_agreement().await;
        session
            .query_unpaged(
                format!(
                    "INSERT INTO {keyspace}.prosody_schema (component, version, applied_at) \
                     VALUES (?, ?, toTimestamp(now()))"
                ),
                (migration.component, migration.version),
            )
            .await
            .map_err(|e| migration_error(migration.component, migration.version, e))?;
        tracing::info!(
            "applied Cassandra schema {} v{} in keyspace {keyspace}",
            migration.component,
            migration.version
        );
    }
    Ok(())
}
