//! The only place that knows about the GVL, Ruby threads, exceptions and wake-up pipes.

pub mod convert;
pub mod encode;
pub mod errors;
pub mod event_fd;
pub mod graveyard;
pub mod gvl;
pub mod pipe;
