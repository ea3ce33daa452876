//! `Prosody::Context`: what a handler can ask about the event it handles.

use magnus::{method, prelude::*, Error, RModule, Ruby};
use prosody_core::cancel::CancelToken;

#[magnus::wrap(class = "Prosody::Context", free_immediately, size)]
pub struct Context {
    /// Cancelled on timeout, revoke or shutdown.
    cancel: CancelToken,
}

impl Context {
    pub fn new(cancel: CancelToken) -> Self {
        Self { cancel }
    }

    /// Whether the handler should stop (shutdown, revoke or timeout).
    fn should_cancel(&self) -> bool {
        self.cancel.is_cancelled()
    }

    fn inspect(&self) -> String {
        format!(
            "#<Prosody::Context should_cancel?={}>",
            self.should_cancel()
        )
    }
}

pub fn init(ruby: &Ruby, prosody: RModule) -> Result<(), Error> {
    let class = prosody.define_class("Context", ruby.class_object())?;
    class.undef_default_alloc_func();
    class.define_method("should_cancel?", method!(Context::should_cancel, 0))?;
    class.define_method("inspect", method!(Context::inspect, 0))?;
    Ok(())
}
