//! `Prosody::Context`: what a handler can ask about, and do for, the event it handles.
//! `lib/prosody/context.rb` adds the public timer methods (argument checks, `Time` conversion).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use magnus::{method, prelude::*, Error, RHash, RModule, Ruby};
use prosody_core::cancel::CancelToken;
use prosody_core::handler::{Completion, Outcome};
use prosody_core::scheduler::Grant;
use prosody_core::timers::{KeyTimers, TimerError};

use crate::bridge::BridgeInner;
use crate::operation::{OpResult, OpValue};
use crate::ruby::errors;

#[derive(magnus::TypedData)]
#[magnus(class = "Prosody::Context", free_immediately, size)]
pub struct Context {
    /// Cancelled on timeout, revoke or shutdown.
    cancel: CancelToken,
    /// The event key's timers; `None` without a key or without a timer store.
    timers: Option<KeyTimers>,
    /// False once the handler returned.
    active: AtomicBool,
    /// Where results of timer operations are delivered, and the outcome is buffered.
    bridge: Arc<BridgeInner>,
    /// The job this context belongs to (the id cancellations name).
    job_id: u64,
    /// The job's outcome handle and scheduler permit, taken once by [`Context::finish`]. A
    /// context collected unfinished drops them: the permit returns and the event is reported
    /// abandoned (not committed). Locked only with the GVL held, so never contended.
    job: Mutex<Option<(Completion, Grant)>>,
    /// The trace context of the handler call (its event's span when spans are exported, else
    /// the context the event carries).
    trace: opentelemetry::Context,
}

/// A timer operation, started on the engine's runtime.
enum Op {
    Schedule(i64),
    Unschedule(i64),
    Clear,
    ClearAndSchedule(i64),
    Scheduled,
}

impl Context {
    /// The context of job `job_id`, which reports through `completion` and holds `grant`.
    pub fn new(
        cancel: CancelToken,
        timers: Option<KeyTimers>,
        bridge: Arc<BridgeInner>,
        job_id: u64,
        job: (Completion, Grant),
        trace: opentelemetry::Context,
    ) -> Self {
        Self {
            cancel,
            timers,
            active: AtomicBool::new(true),
            bridge,
            job_id,
            job: Mutex::new(Some(job)),
            trace,
        }
    }

    /// The handler call's trace context.
    pub fn trace(&self) -> &opentelemetry::Context {
        &self.trace
    }

    /// `trace_context`: the W3C carrier of the handler call's span (`traceparent`, and
    /// `tracestate` / `baggage` when they have entries); empty when the event carries no trace.
    fn trace_context(ruby: &Ruby, rb_self: &Self) -> Result<RHash, Error> {
        let hash = ruby.hash_new();
        for (name, value) in prosody_core::spans::carrier(&rb_self.trace) {
            hash.aset(ruby.str_new(&name), ruby.str_new(&value))?;
        }
        Ok(hash)
    }

    /// The handler returned (or raised): the context stops working, the permit goes back at once
    /// (the worker takes its next job right after), and the outcome is buffered for the next
    /// flush. True when the caller must schedule a flush (the first outcome buffered since the
    /// last one). A second call does nothing: a job's outcome is sent once.
    pub fn finish(&self, outcome: Outcome) -> bool {
        self.active.store(false, Ordering::Release);
        let Some((completion, grant)) = self.job.lock().ok().and_then(|mut job| job.take()) else {
            return false;
        };
        drop(grant);
        self.bridge.complete(completion, outcome)
    }

    fn job_id(&self) -> u64 {
        self.job_id
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

    /// Raises `Prosody::Error` once the handler call that received this context returned.
    fn check_active(ruby: &Ruby, rb_self: &Self) -> Result<(), Error> {
        if rb_self.active.load(Ordering::Acquire) {
            return Ok(());
        }
        Err(errors::prosody(
            ruby,
            errors::Class::Error,
            "this context belongs to a handler call that already returned; use the context \
             passed to the current on_message or on_timer",
        ))
    }

    /// Starts a timer operation on the engine and returns its id; the processor hands the result
    /// to the waiting fiber, so other handlers keep running while the store works. Checks first
    /// that the context may be used.
    fn start(ruby: &Ruby, rb_self: &Self, op: Op) -> Result<u64, Error> {
        Self::check_active(ruby, rb_self)?;
        let Some(timers) = rb_self.timers.clone() else {
            return Err(errors::prosody(
                ruby,
                errors::Class::Timer,
                "timers are not available for this event: it has no key (timers belong to a key), \
                 or the client has no timer store (set cassandra_nodes, or mock: true in tests)",
            ));
        };
        let runtime = prosody_core::runtime::handle()
            .map_err(|e| errors::prosody(ruby, errors::Class::Timer, e))?;
        let bridge = rb_self.bridge.clone();
        let id = bridge.next_op();
        let trace = rb_self.trace.clone();
        runtime.spawn(async move {
            let result = match op {
                Op::Schedule(s) => timers.schedule(s, &trace).await.map(|()| OpValue::Nil),
                Op::Unschedule(s) => timers.unschedule(s, &trace).await.map(|()| OpValue::Nil),
                Op::Clear => timers.clear(&trace).await.map(|()| OpValue::Nil),
                Op::ClearAndSchedule(s) => timers
                    .clear_and_schedule(s, &trace)
                    .await
                    .map(|()| OpValue::Nil),
                Op::Scheduled => timers.scheduled().await.map(OpValue::Times),
            };
            bridge.op_finished(
                id,
                match result {
                    Ok(value) => OpResult::Ok(value),
                    Err(e @ TimerError::OutOfRange(_)) => {
                        OpResult::Err(errors::Class::Argument, e.to_string())
                    }
                    Err(e @ TimerError::Store(_)) => {
                        OpResult::Err(errors::Class::Timer, e.to_string())
                    }
                },
            );
        });
        Ok(id)
    }

    fn schedule(ruby: &Ruby, rb_self: &Self, seconds: i64) -> Result<u64, Error> {
        Self::start(ruby, rb_self, Op::Schedule(seconds))
    }

    fn unschedule(ruby: &Ruby, rb_self: &Self, seconds: i64) -> Result<u64, Error> {
        Self::start(ruby, rb_self, Op::Unschedule(seconds))
    }

    fn clear_scheduled(ruby: &Ruby, rb_self: &Self) -> Result<u64, Error> {
        Self::start(ruby, rb_self, Op::Clear)
    }

    fn clear_and_schedule(ruby: &Ruby, rb_self: &Self, seconds: i64) -> Result<u64, Error> {
        Self::start(ruby, rb_self, Op::ClearAndSchedule(seconds))
    }

    fn scheduled(ruby: &Ruby, rb_self: &Self) -> Result<u64, Error> {
        Self::start(ruby, rb_self, Op::Scheduled)
    }
}

/// Dropped on an engine thread, not inside the garbage collector (see `ruby::graveyard`).
impl magnus::DataTypeFunctions for Context {
    fn free(self: Box<Self>) {
        crate::ruby::graveyard::bury(self);
    }
}

pub fn init(ruby: &Ruby, prosody: RModule) -> Result<(), Error> {
    let class = prosody.define_class("Context", ruby.class_object())?;
    class.undef_default_alloc_func();
    class.define_method("should_cancel?", method!(Context::should_cancel, 0))?;
    class.define_method("inspect", method!(Context::inspect, 0))?;
    class.define_method("trace_context", method!(Context::trace_context, 0))?;
    class.define_private_method("job_id", method!(Context::job_id, 0))?;
    class.define_private_method("check_active", method!(Context::check_active, 0))?;
    class.define_private_method("start_schedule", method!(Context::schedule, 1))?;
    class.define_private_method("start_unschedule", method!(Context::unschedule, 1))?;
    class.define_private_method(
        "start_clear_scheduled",
        method!(Context::clear_scheduled, 0),
    )?;
    class.define_private_method(
        "start_clear_and_schedule",
        method!(Context::clear_and_schedule, 1),
    )?;
    class.define_private_method("start_scheduled", method!(Context::scheduled, 0))?;
    Ok(())
}
