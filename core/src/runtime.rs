//! The process-wide tokio runtime that runs partition workers and producer futures.

use std::sync::OnceLock;

use tokio::runtime::{Builder, Handle, Runtime};

/// Created on first use and kept for the life of the process (a documented static): workers
/// of every client share it, and no Ruby object is ever touched by its threads.
static RUNTIME: OnceLock<Result<Runtime, String>> = OnceLock::new();

/// The shared runtime's handle.
pub fn handle() -> Result<Handle, String> {
    RUNTIME
        .get_or_init(|| {
            Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("prosody-worker")
                .enable_all()
                .build()
                .map_err(|e| format!("could not start the tokio runtime: {e}"))
        })
        .as_ref()
        .map(|rt| rt.handle().clone())
        .map_err(Clone::clone)
}
