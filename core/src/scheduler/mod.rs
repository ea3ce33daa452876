//! Grants the permits that bound how many handler calls run at once.
//!
//! This first version grants permits first come, first served across keys. The fair scheduler
//! (virtual time per key, separate pools for retries, wait boost) replaces the policy behind the
//! same interface.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// One per client.
#[derive(Clone, Debug)]
pub struct Scheduler {
    /// `max_concurrency` permits.
    permits: Arc<Semaphore>,
}

/// Held while a handler call runs; dropping it returns the permit.
#[derive(Debug)]
pub struct Permit(#[allow(dead_code)] OwnedSemaphorePermit);

impl Scheduler {
    /// A scheduler granting at most `max_concurrency` permits at once.
    pub fn new(max_concurrency: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max_concurrency.max(1))),
        }
    }

    /// Waits for a permit. Returns `None` only if the scheduler was closed.
    pub async fn acquire(&self) -> Option<Permit> {
        self.permits.clone().acquire_owned().await.ok().map(Permit)
    }

    /// Permits currently free.
    pub fn available(&self) -> usize {
        self.permits.available_permits()
    }
}
