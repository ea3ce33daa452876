//! The process-wide tokio runtime that runs partition workers and producer futures.

use tokio::runtime::{Builder, Handle, Runtime};

use crate::process::PerProcess;

/// Created on first use in each process and kept for its life (a documented static): workers
/// of every client share it, and no Ruby object is ever touched by its threads. A child forked
/// from a process that had one creates its own.
static RUNTIME: PerProcess<Runtime> = PerProcess::new();

/// The shared runtime's handle.
pub fn handle() -> Result<Handle, String> {
    RUNTIME
        .get_or_try_init(|| {
            Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("prosody-worker")
                .enable_all()
                .build()
                .map_err(|e| format!("could not start the tokio runtime: {e}"))
        })
        .map(|rt| rt.handle().clone())
}

/// The shared runtime's handle if this process already started it (never starts it).
pub fn existing_handle() -> Option<Handle> {
    RUNTIME.get().map(|rt| rt.handle().clone())
}
