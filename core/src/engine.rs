//! What every partition worker of one subscription shares.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::runtime::Handle;

use crate::config::Config;
use crate::failure::deadletter::DeadLetters;
use crate::failure::Policy;
use crate::partition::PartitionShared;
use crate::scheduler::Scheduler;
use crate::timers::TimerStore;

/// Assigned partitions by (topic, partition).
pub(crate) type PartitionMap = HashMap<(Arc<str>, i32), Arc<PartitionShared>>;

/// The per-subscription engine: configuration, the scheduler, the failure policy, the runtime.
pub struct Engine {
    /// Resolved client configuration.
    pub config: Arc<Config>,
    /// Ready events of every partition; the runners (the Ruby processor in the gem) pull from it.
    pub scheduler: Arc<Scheduler>,
    /// The runtime workers and event tasks run on.
    pub runtime: Handle,
    /// Where timers live (memory in mock mode); `None` when timers are unavailable.
    pub timers: Option<Arc<dyn TimerStore>>,
    /// What happens after a handler failed.
    pub policy: Policy,
    /// The failure topic, when one is configured.
    pub dead_letters: Option<Arc<DeadLetters>>,
    /// Assigned partitions' shared state, for health checks.
    pub(crate) partitions: Mutex<PartitionMap>,
}

impl Engine {
    /// Whether any assigned partition's oldest unfinished message is older than
    /// `stall_threshold`.
    pub fn is_stalled(&self) -> bool {
        let threshold = self.config.stall_threshold;
        self.partitions
            .lock()
            .map(|p| p.values().any(|s| s.stalled(threshold)))
            .unwrap_or(false)
    }
}
