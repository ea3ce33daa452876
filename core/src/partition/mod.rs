//! Per-partition processing: key queues, offset tracking, the stage list around the handler,
//! and the worker task that owns them.

pub mod keys;
pub mod offsets;
mod shared;
pub(crate) mod stages;
mod worker;

pub use shared::PartitionShared;
pub(crate) use worker::{spawn_worker, WorkerInput};
