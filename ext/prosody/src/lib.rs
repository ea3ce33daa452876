//! The `prosody` native extension: a thin magnus binding over `prosody-core`.
//!
//! One file per Ruby class, each with its own `init`; all GVL, thread and exception plumbing is
//! in [`ruby`].

mod bridge;
mod client;
mod context;
mod logging;
mod message;
mod operation;
mod ruby;
mod testing;

use magnus::{prelude::*, Error, Ruby};

/// The engine's own allocations (records, decoded payloads, jobs, scheduler entries: several per
/// message, freed on other threads than the one that made them) go through mimalloc, whose
/// per-thread free lists make that cheaper than glibc's arenas; Ruby and librdkafka keep their
/// own allocators.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[magnus::init(name = "prosody")]
fn init(ruby: &Ruby) -> Result<(), Error> {
    let prosody = ruby.define_module("Prosody")?;
    let native = prosody.define_module("Native")?;
    ruby::errors::init(ruby)?;
    message::init(ruby, prosody)?;
    context::init(ruby, prosody)?;
    bridge::init(ruby, native)?;
    operation::init(ruby, native)?;
    client::init(ruby, native)?;
    logging::init(ruby, native)?;
    testing::init(ruby, native)?;
    Ok(())
}
