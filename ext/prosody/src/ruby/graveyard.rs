//! Where Ruby's garbage collector leaves the native halves of dead per-event objects
//! (`Prosody::Message`, `Prosody::Context`), to be dropped on an engine thread.
//!
//! Dropping them inside the collector was most of its pause: each drop releases shared
//! reference counts and frees the record's payload, headers and cancellation hooks, memory that
//! has long left the cache by the time the object is swept, and every handler fiber waits
//! through the pause. With the I/O benchmark (32 handlers each sleeping 1 ms), leaving those
//! drops out of the collector cut its time from 230–270 ms to 85–110 ms of a 2.7 s run. A free
//! function here only moves a pointer into a batch; a full batch is dropped by a task on the
//! engine's runtime, whose threads are mostly idle while Ruby code runs.
//!
//! A batch is handed over when it is full ([`BATCH`]) and whenever a processor runs out of work
//! ([`flush`]), so dead objects are not held past the burst that made them. In a process forked
//! while a batch was being filled, that batch is left alone (its memory is the parent's copy;
//! dropping it could touch handles whose threads the child does not have).

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
        take(&mut grave)
    };
    drop_elsewhere(full);
}

/// Hands over what was buried so far (called with the GVL held, when a processor found no work).
pub fn flush() {
    let some = {
        let mut grave = GRAVE.lock().unwrap_or_else(|p| p.into_inner());
        if grave.1.is_empty() {
            return;
        }
        take(&mut grave)
    };
    drop_elsewhere(some);
}

/// The batch, unless it was started before a fork (then it is forgotten: the parent's corpses
/// are not ours to drop, and the child's few buried since the fork are leaked with them).
fn take(grave: &mut (u32, Vec<Corpse>)) -> Vec<Corpse> {
    let batch = std::mem::replace(&mut grave.1, Vec::with_capacity(BATCH));
    if grave.0 == std::process::id() {
        batch
    } else {
        std::mem::forget(batch);
        Vec::new()
    }
}

/// Drops `batch` on an engine thread.
fn drop_elsewhere(batch: Vec<Corpse>) {
    if batch.is_empty() {
        return;
    }
    match prosody_core::runtime::existing_handle() {
        // A runtime that is shutting down drops the task, and with it the batch, at once.
        Some(runtime) => drop(runtime.spawn(async move { drop(batch) })),
        // No engine in this process (objects made by tests without a client): drop them here.
        None => drop(batch),
    }
}
