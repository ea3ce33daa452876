//! What every partition worker of one subscription shares.

use std::sync::Arc;

use tokio::runtime::Handle;

use crate::config::Config;
use crate::handler::Dispatcher;
use crate::scheduler::Scheduler;

/// The per-subscription engine: configuration, permits, and where jobs go.
pub struct Engine {
    /// Resolved client configuration.
    pub config: Arc<Config>,
    /// Grants `max_concurrency` permits across all partitions.
    pub scheduler: Scheduler,
    /// Runs handler calls (the Ruby processor in the gem).
    pub dispatcher: Arc<dyn Dispatcher>,
    /// The runtime workers and event tasks run on.
    pub runtime: Handle,
}
