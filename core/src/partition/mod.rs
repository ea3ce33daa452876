//! Per-partition processing: key queues, offset tracking, and the worker task that owns them.

pub mod keys;
pub mod offsets;
mod worker;

pub use worker::PartitionShared;
pub(crate) use worker::{spawn_worker, WorkerInput};
