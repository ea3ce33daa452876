//! `Prosody::Native::Job`: one handler call as the Ruby processor sees it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use magnus::{method, prelude::*, Error, IntoValue, RModule, Ruby, Value};
use prosody_core::event::Event;
use prosody_core::handler::{Completion, Failure, Job, Outcome};
use prosody_core::scheduler::Grant;

use crate::bridge::BridgeInner;
use crate::context::Context;
use crate::message::Message;
use crate::ruby::convert;

/// What a job hands out once: its event and context, then its outcome.
struct Parts {
    /// The event, moved into a Ruby object by `event`.
    event: Option<Event>,
    /// The handler's context, moved into a Ruby object by `context`.
    context: Option<Context>,
    /// Where the outcome goes; dropped unsent (GC of an unfinished job) means abandoned.
    completion: Option<Completion>,
    /// The scheduler permit; returned the moment the handler returns.
    grant: Option<Grant>,
}

#[magnus::wrap(class = "Prosody::Native::Job", free_immediately, size)]
pub struct JobObj {
    /// Id used by cancellation requests.
    id: u64,
    /// Everything handed out once, behind one lock (taken only with the GVL held, so never
    /// contended).
    parts: Mutex<Parts>,
    /// Whether the handler is still running; its context refuses to work once it is false.
    active: Arc<AtomicBool>,
    /// Buffers the outcome until the bridge flushes.
    bridge: Arc<BridgeInner>,
}

impl JobObj {
    pub fn new(id: u64, job: Job, grant: Grant, bridge: Arc<BridgeInner>) -> Self {
        let (event, cancel, timers, completion) = job.into_parts();
        let active = Arc::new(AtomicBool::new(true));
        let context = Context::new(cancel, timers, active.clone(), bridge.clone(), id);
        Self {
            id,
            parts: Mutex::new(Parts {
                event: Some(event),
                context: Some(context),
                completion: Some(completion),
                grant: Some(grant),
            }),
            active,
            bridge,
        }
    }

    fn id(&self) -> u64 {
        self.id
    }

    /// The event, once: a `Prosody::Message`, or `[key, seconds since the epoch]` for a timer;
    /// nil after the first call.
    fn event(ruby: &Ruby, rb_self: &Self) -> Value {
        let event = rb_self.parts.lock().ok().and_then(|mut p| p.event.take());
        match event {
            Some(Event::Message(m)) => ruby.into_value(Message::new(m)),
            Some(Event::Timer(t)) => {
                (convert::bytes_to_ruby(ruby, &t.key), t.time).into_value_with(ruby)
            }
            None => ruby.qnil().as_value(),
        }
    }

    /// The handler's `Prosody::Context`, once; nil after the first call.
    fn context(&self) -> Option<Context> {
        self.parts.lock().ok().and_then(|mut p| p.context.take())
    }

    /// Hands the outcome to the bridge. True when the caller must schedule a flush (this was the
    /// first outcome buffered since the last one).
    fn finish(&self, outcome: Outcome) -> bool {
        self.active.store(false, Ordering::Release);
        let (grant, completion) = match self.parts.lock() {
            Ok(mut p) => (p.grant.take(), p.completion.take()),
            Err(_) => return false,
        };
        // The permit goes back at once (the runner takes its next job right after); the outcome
        // travels to the partition worker with the next flush.
        drop(grant);
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
    class.define_method("event", method!(JobObj::event, 0))?;
    class.define_method("context", method!(JobObj::context, 0))?;
    class.define_method("succeed", method!(JobObj::succeed, 0))?;
    class.define_method("fail", method!(JobObj::fail, 4))?;
    Ok(())
}
