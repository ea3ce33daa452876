//! What every partition worker of one subscription shares.

use std::sync::Arc;

use tokio::runtime::Handle;

use crate::config::Config;
use crate::scheduler::Scheduler;
use crate::timers::TimerStore;

/// The per-subscription engine: configuration, the ready queue, the runtime.
pub struct Engine {
    /// Resolved client configuration.
    pub config: Arc<Config>,
    /// Ready events of every partition; the runners (the Ruby processor in the gem) pull from it.
    pub scheduler: Arc<Scheduler>,
    /// The runtime workers and event tasks run on.
    pub runtime: Handle,
    /// Where timers live (memory in mock mode); `None` when timers are unavailable.
    pub timers: Option<Arc<dyn TimerStore>>,
}
