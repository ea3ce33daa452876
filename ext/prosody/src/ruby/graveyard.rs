//! Where Ruby's garbage collector leaves the native halves of dead per-event objects
//! (`Prosody::Message`, `Prosody::Context`), to be dropped on an engine
//! thread.
//!
//! Dropping them inside the collector was most of its pause: each drop releases shared
//! reference counts and frees the record's payload, headers and cancellation hooks, memory that
//! has long left the cache by the time the object is swept. Every handler fiber waits through
//! the pause. Measured with the I/O benchmark (32 handlers each sleeping 1 ms): 230–270 ms of GC
//! in a 2.7 s run with the drops in the collector, 85–110 ms without them. A free function here
//! only moves a pointer into a batch; a full batch is dropped by a task on the engine's runtime,
//! whose threads are mostly idle while Ruby code runs.
//!
//! Up to [`BATCH`] dead objects wait for the next batch (their memory is held that long). In a
//! process forked while a batch was being filled, that batch is left alone (its memory is the
//! parent's copy; dropping it could touch handles whose threads the child does not have).

use std::sync::Mutex;

/// Dead objects dropped together, by one engine task.
const BATCH: usize = 1024;

/// What a free function hands over; dropped on an engine thread.
type Corpse = Box<dyn Send>;

/// The batch being filled, and the process that started it. Touched only by free functions,
/// which run with the GVL held, so the lock is never contended.
static GRAVE: Mutex<(u32, Vec<Corpse>)> = Mutex::new((0, Vec::new()));

/// Takes the native half of a dead Ruby object. Call from a `DataTypeFunctions::free`.
pub fn bury<T: Send + 'static>(object: Box<T>) {
    let full = {
        let mut grave = GRAVE.lock().unwrap_or_else(|p| p.into_inner());
        if grave.1.is_empty() {
            grave.0 = std::process::id();
        }
        grave.1.push(object);
        if grave.1.len() < BATCH {
            return;
        }
        let full = std::mem::replace(&mut grave.1, Vec::with_capacity(BATCH));
        if grave.0 != std::process::id() {
            // Started before a fork: the parent's corpses are not ours to drop (the child's
            // few buried since the fork are leaked with them).
            std::mem::forget(full);
            return;
        }
        full
    };
    match prosody_core::runtime::existing_handle() {
        // A runtime that is shutting down drops the task, and with it the batch, at once.
        Some(runtime) => drop(runtime.spawn(async move { drop(full) })),
        // No engine in this process (objects made by tests without a client): drop them here.
        None => drop(full),
    }
}
