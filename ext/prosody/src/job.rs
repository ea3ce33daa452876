//! `Prosody::Native::Job`: one handler call as the Ruby processor sees it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use magnus::{method, prelude::*, Error, RModule, Ruby, Value};
use prosody_core::cancel::CancelToken;
use prosody_core::event::Event;
use prosody_core::handler::{Completion, Failure, Job, Outcome};
use prosody_core::scheduler::Grant;
use prosody_core::timers::KeyTimers;

use crate::bridge::BridgeInner;
use crate::context::Context;
use crate::message::Message;

#[magnus::wrap(class = "Prosody::Native::Job", free_immediately, size)]
pub struct JobObj {
    /// Id used by cancellation requests.
    id: u64,
    /// The event, moved into a Ruby object on first access.
    event: Mutex<Option<Event>>,
    /// The job's cancellation signal.
    cancel: CancelToken,
    /// The event key's timers, if any.
    timers: Option<KeyTimers>,
    /// Whether the handler is still running; a context refuses to work once it is false.
    active: Arc<AtomicBool>,
    /// Where the outcome goes; dropped unsent (GC of an unfinished job) means abandoned.
    completion: Mutex<Option<Completion>>,
    /// The scheduler permit; returned the moment the handler returns.
    grant: Mutex<Option<Grant>>,
    /// Buffers the outcome until the bridge flushes.
    bridge: Arc<BridgeInner>,
}

impl JobObj {
    pub fn new(id: u64, job: Job, grant: Grant, bridge: Arc<BridgeInner>) -> Self {
        let (event, cancel, timers, completion) = job.into_parts();
        Self {
            id,
            event: Mutex::new(Some(event)),
            cancel,
            timers,
            active: Arc::new(AtomicBool::new(true)),
            completion: Mutex::new(Some(completion)),
            grant: Mutex::new(Some(grant)),
            bridge,
        }
    }

    fn id(&self) -> u64 {
        self.id
    }

    /// The event as a `Prosody::Message`; nil for a timer, and after the first call.
    fn message(ruby: &Ruby, rb_self: &Self) -> Value {
        let mut slot = match rb_self.event.lock() {
            Ok(slot) => slot,
            Err(_) => return ruby.qnil().as_value(),
        };
        match slot.take() {
            Some(Event::Message(m)) => ruby.into_value(Message::new(m)),
            other => {
                *slot = other;
                ruby.qnil().as_value()
            }
        }
    }

    /// `[key, seconds since the epoch]` when the event is a timer, else nil.
    fn timer(&self) -> Option<(String, i64)> {
        match self.event.lock().ok()?.as_ref()? {
            Event::Timer(t) => Some((t.key.to_string(), t.time)),
            Event::Message(_) => None,
        }
    }

    fn context(&self) -> Context {
        Context::new(
            self.cancel.clone(),
            self.timers.clone(),
            self.active.clone(),
            self.bridge.clone(),
            self.id,
        )
    }

    /// Hands the outcome to the bridge. True when the caller must schedule a flush (this was the
    /// first outcome buffered since the last one).
    fn finish(&self, outcome: Outcome) -> bool {
        self.active.store(false, Ordering::Release);
        // The permit goes back at once (the runner takes its next job right after); the outcome
        // travels to the partition worker with the next flush.
        drop(self.grant.lock().ok().and_then(|mut g| g.take()));
        let completion = self.completion.lock().ok().and_then(|mut c| c.take());
        match completion {
            Some(c) => self.bridge.complete(c, outcome),
            None => false,
        }
    }

    /// The handler returned. True when a flush must be scheduled.
    fn succeed(&self) -> bool {
        self.finish(Outcome::Success)
    }

    /// The handler raised `error_class: message` (with the first lines of its backtrace);
    /// `permanent` when retrying cannot help. True when a flush must be scheduled.
    fn fail(
        &self,
        error_class: String,
        message: String,
        backtrace: String,
        permanent: bool,
    ) -> bool {
        self.finish(Outcome::Failure(Failure {
            error_class,
            message,
            backtrace,
            permanent,
        }))
    }
}

pub fn init(ruby: &Ruby, native: RModule) -> Result<(), Error> {
    let class = native.define_class("Job", ruby.class_object())?;
    class.undef_default_alloc_func();
    class.define_method("id", method!(JobObj::id, 0))?;
    class.define_method("message", method!(JobObj::message, 0))?;
    class.define_method("timer", method!(JobObj::timer, 0))?;
    class.define_method("context", method!(JobObj::context, 0))?;
    class.define_method("succeed", method!(JobObj::succeed, 0))?;
    class.define_method("fail", method!(JobObj::fail, 4))?;
    Ok(())
}
