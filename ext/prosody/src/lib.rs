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
