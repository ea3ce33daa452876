//! `Prosody::Context`: what a handler can ask about, and do for, the event it handles.
//! `lib/prosody/context.rb` adds the public timer methods (argument checks, `Time` conversion).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use magnus::{method, prelude::*, Error, RModule, Ruby};
use prosody_core::cancel::CancelToken;
use prosody_core::timers::{KeyTimers, TimerError};

use crate::ruby::{errors, gvl::without_gvl};

#[magnus::wrap(class = "Prosody::Context", free_immediately, size)]
pub struct Context {
    /// Cancelled on timeout, revoke or shutdown.
    cancel: CancelToken,
    /// The event key's timers; `None` without a key or without a timer store.
    timers: Option<KeyTimers>,
    /// False once the handler returned.
    active: Arc<AtomicBool>,
}

impl Context {
    pub fn new(cancel: CancelToken, timers: Option<KeyTimers>, active: Arc<AtomicBool>) -> Self {
        Self {
            cancel,
            timers,
            active,
        }
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

    /// Runs a timer operation with the GVL released, after checking the context may be used.
    fn with_timers<T: Send>(
        ruby: &Ruby,
        rb_self: &Self,
        op: impl FnOnce(&KeyTimers) -> Result<T, TimerError> + Send,
    ) -> Result<T, Error> {
        if !rb_self.active.load(Ordering::Acquire) {
            return Err(errors::prosody(
                ruby,
                "Error",
                "this context belongs to a handler call that already returned; use the context \
                 passed to the current on_message or on_timer",
            ));
        }
        let Some(timers) = rb_self.timers.as_ref() else {
            return Err(errors::prosody(
                ruby,
                "TimerError",
                "timers are not available for this event: it has no key (timers belong to a key), \
                 or the client has no timer store (set cassandra_nodes, or mock: true in tests)",
            ));
        };
        without_gvl(ruby, |_| op(timers))?.map_err(|e| match e {
            TimerError::OutOfRange(_) => Error::new(ruby.exception_arg_error(), e.to_string()),
            TimerError::Store(_) => errors::prosody(ruby, "TimerError", e.to_string()),
        })
    }

    fn block_on<T>(
        f: impl std::future::Future<Output = Result<T, TimerError>>,
    ) -> Result<T, TimerError> {
        prosody_core::runtime::handle()
            .map_err(TimerError::Store)?
            .block_on(f)
    }

    fn schedule(ruby: &Ruby, rb_self: &Self, seconds: i64) -> Result<(), Error> {
        Self::with_timers(ruby, rb_self, |t| Self::block_on(t.schedule(seconds)))
    }

    fn unschedule(ruby: &Ruby, rb_self: &Self, seconds: i64) -> Result<(), Error> {
        Self::with_timers(ruby, rb_self, |t| Self::block_on(t.unschedule(seconds)))
    }

    fn clear_scheduled(ruby: &Ruby, rb_self: &Self) -> Result<(), Error> {
        Self::with_timers(ruby, rb_self, |t| Self::block_on(t.clear()))
    }

    fn clear_and_schedule(ruby: &Ruby, rb_self: &Self, seconds: i64) -> Result<(), Error> {
        Self::with_timers(ruby, rb_self, |t| {
            Self::block_on(t.clear_and_schedule(seconds))
        })
    }

    fn scheduled(ruby: &Ruby, rb_self: &Self) -> Result<Vec<i64>, Error> {
        Self::with_timers(ruby, rb_self, |t| Self::block_on(t.scheduled()))
    }
}

pub fn init(ruby: &Ruby, prosody: RModule) -> Result<(), Error> {
    let class = prosody.define_class("Context", ruby.class_object())?;
    class.undef_default_alloc_func();
    class.define_method("should_cancel?", method!(Context::should_cancel, 0))?;
    class.define_method("inspect", method!(Context::inspect, 0))?;
    class.define_private_method("native_schedule", method!(Context::schedule, 1))?;
    class.define_private_method("native_unschedule", method!(Context::unschedule, 1))?;
    class.define_private_method(
        "native_clear_scheduled",
        method!(Context::clear_scheduled, 0),
    )?;
    class.define_private_method(
        "native_clear_and_schedule",
        method!(Context::clear_and_schedule, 1),
    )?;
    class.define_private_method("native_scheduled", method!(Context::scheduled, 0))?;
    Ok(())
}
