//! `Prosody::Native::Bridge`: how one Ruby processor thread pulls jobs from a subscription.
//!
//! Each Ruby worker fiber calls `take` the moment it is free, with the GVL held and no engine
//! round trip. Only when the ready queue is empty does a worker wait; the engine then wakes the
//! processor through a pipe (which `IO#wait_readable` turns into a fiber-scheduler wait, not a
//! frozen reactor), once per idle period, never once per message.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use magnus::{function, method, prelude::*, Error, IntoValue, RArray, RModule, Ruby, Value};
use prosody_core::event::Event;
use prosody_core::handler::{Completion, Failure, Outcome, Relay};
use prosody_core::scheduler::{Scheduler, Take};

use crate::context::Context;
use crate::message::Message;
use crate::operation::{value_to_ruby, OpResult};
use crate::ruby::convert;
use crate::ruby::pipe::WakePipe;

/// Completions buffered before one flush; bounds how long a burst of tiny handlers waits.
const FLUSH_AT: usize = 8;

/// Shared by the Ruby object, its jobs, and the cancellation hooks on engine threads.
pub struct BridgeInner {
    /// Wakes the processor's main fiber.
    pipe: WakePipe,
    /// Ids of running jobs whose cancellation was requested, not yet seen by Ruby.
    cancels: Mutex<Vec<u64>>,
    /// Outcomes not yet sent to the engine. Sending one wakes a parked engine thread (a futex
    /// call, about a third of the Ruby thread's time when sent one by one), so outcomes of a
    /// burst of handlers go together: when the buffer is full, when a worker finds no work, and
    /// at the reactor's next turn (the processor schedules a flush on the first buffered outcome,
    /// which runs as soon as the running fiber yields).
    pending: Mutex<Vec<(Completion, Outcome)>>,
    /// Takes each flushed batch to the partition workers with one wake-up of the engine.
    relay: Relay,
    /// Results of operations started for handler fibers (timer calls, sends), by operation id,
    /// not yet handed to the fibers waiting for them.
    finished_ops: Mutex<Vec<(u64, OpResult)>>,
    /// Ids for asynchronous operations.
    next_op: AtomicU64,
}

impl BridgeInner {
    /// A fresh operation id.
    pub fn next_op(&self) -> u64 {
        self.next_op.fetch_add(1, Ordering::Relaxed)
    }

    /// Records an operation's result and wakes the processor to deliver it.
    pub fn op_finished(&self, id: u64, result: OpResult) {
        if let Ok(mut ops) = self.finished_ops.lock() {
            ops.push((id, result));
        }
        self.pipe.wake();
    }

    /// Buffers an outcome; returns true if it is the first one since the last flush (the caller
    /// then schedules a flush).
    pub fn complete(&self, completion: Completion, outcome: Outcome) -> bool {
        let Ok(mut pending) = self.pending.lock() else {
            completion.complete(outcome);
            return false;
        };
        pending.push((completion, outcome));
        let first = pending.len() == 1;
        if pending.len() >= FLUSH_AT {
            let batch = std::mem::take(&mut *pending);
            drop(pending);
            self.relay.send(batch);
            return false;
        }
        first
    }

    /// Sends every buffered outcome.
    fn flush(&self) {
        let batch = match self.pending.lock() {
            Ok(mut pending) if !pending.is_empty() => std::mem::take(&mut *pending),
            _ => return,
        };
        self.relay.send(batch);
    }
}

#[magnus::wrap(class = "Prosody::Native::Bridge", free_immediately, size)]
pub struct Bridge {
    /// The subscription's ready queue, made by `Client#subscribe` from the client's
    /// configuration ([`Bridge::attach`]); until then workers find nothing to do.
    scheduler: OnceLock<Arc<Scheduler>>,
    /// Set by `close` (the only closer of the scheduler), which may come before a scheduler was
    /// attached (a failed subscribe).
    closed: AtomicBool,
    /// Pipe and pending cancellations.
    inner: Arc<BridgeInner>,
}

impl Bridge {
    fn new(ruby: &Ruby) -> Result<Self, Error> {
        let pipe = WakePipe::new().map_err(|e| {
            Error::new(
                ruby.exception_runtime_error(),
                format!("could not open a wake-up pipe: {e}"),
            )
        })?;
        let runtime = prosody_core::runtime::handle()
            .map_err(|e| Error::new(ruby.exception_runtime_error(), e))?;
        let inner = Arc::new(BridgeInner {
            pipe,
            relay: Relay::start(&runtime),
            cancels: Mutex::new(Vec::new()),
            pending: Mutex::new(Vec::new()),
            finished_ops: Mutex::new(Vec::new()),
            next_op: AtomicU64::new(1),
        });
        Ok(Self {
            scheduler: OnceLock::new(),
            closed: AtomicBool::new(false),
            inner,
        })
    }

    /// What operations started for this processor's fibers report to.
    pub fn inner(&self) -> Arc<BridgeInner> {
        self.inner.clone()
    }

    /// What the subscription's scheduler calls when events arrive while workers are idle.
    pub fn notifier(&self) -> impl Fn() + Send + Sync + 'static {
        let inner = self.inner.clone();
        move || inner.pipe.wake()
    }

    /// Hands the workers the subscription's scheduler, and wakes them to pull from it.
    pub fn attach(&self, scheduler: Arc<Scheduler>) {
        if self.closed.load(Ordering::Acquire) {
            scheduler.close();
        }
        let _ = self.scheduler.set(scheduler);
        self.inner.pipe.wake();
    }

    /// File descriptor the main fiber waits on with `IO#wait_readable`.
    fn fd(&self) -> i32 {
        self.inner.pipe.read_fd()
    }

    /// The next job as `[id, context, event]` (the event a `Prosody::Message`, or
    /// `[key, seconds since the epoch]` for a timer); nil when none is ready (wait for the main
    /// fiber's signal), false once closed. The job ends with `succeed` or `fail` on its context.
    fn take(ruby: &Ruby, rb_self: &Self) -> Value {
        let taken = match rb_self.scheduler.get() {
            Some(scheduler) => scheduler.take(),
            None if rb_self.closed.load(Ordering::Acquire) => Take::Closed,
            None => Take::Empty,
        };
        match taken {
            Take::Job(job, grant) => {
                let id = grant.id();
                let weak = Arc::downgrade(&rb_self.inner);
                job.cancel.on_cancel(move || {
                    if let Some(inner) = weak.upgrade() {
                        if let Ok(mut cancels) = inner.cancels.lock() {
                            cancels.push(id);
                        }
                        inner.pipe.wake();
                    }
                });
                let trace = job.trace.clone();
                let (event, cancel, timers, completion) = job.into_parts();
                let context = Context::new(
                    cancel,
                    timers,
                    rb_self.inner.clone(),
                    id,
                    (completion, grant),
                    trace,
                );
                let event = match event {
                    Event::Message(m) => ruby.into_value(Message::new(m)),
                    Event::Timer(t) => {
                        (convert::bytes_to_ruby(ruby, &t.key), t.time).into_value_with(ruby)
                    }
                };
                (id, context, event).into_value_with(ruby)
            }
            Take::Empty => {
                // About to wait: the engine must hear about everything finished first, and dead
                // objects of the burst are dropped now rather than with the next one.
                rb_self.inner.flush();
                crate::ruby::graveyard::flush();
                ruby.qnil().as_value()
            }
            Take::Closed => {
                rb_self.inner.flush();
                ruby.qfalse().as_value()
            }
        }
    }

    /// Called by the main fiber after the pipe became readable: clears it and returns the ids of
    /// jobs to cancel, or nil once the bridge is closed (the workers then finish).
    fn cancellations(&self) -> Option<Vec<u64>> {
        self.inner.pipe.clear();
        self.inner.flush();
        if self.closed.load(Ordering::Acquire) {
            return None;
        }
        Some(
            self.inner
                .cancels
                .lock()
                .map(|mut c| std::mem::take(&mut *c))
                .unwrap_or_default(),
        )
    }

    /// The handler of `context`'s job returned. True when a flush must be scheduled.
    fn succeed(&self, context: &Context) -> bool {
        context.finish(Outcome::Success)
    }

    /// The handler of `context`'s job raised `error_class: message` (with the first lines of its
    /// backtrace); `permanent` when retrying cannot help. True when a flush must be scheduled.
    fn fail(
        &self,
        context: &Context,
        error_class: String,
        message: String,
        backtrace: String,
        permanent: bool,
    ) -> bool {
        context.finish(Outcome::Failure(Failure {
            error_class,
            message,
            backtrace,
            permanent,
        }))
    }

    /// Sends buffered outcomes to the engine.
    fn flush(&self) {
        self.inner.flush();
    }

    /// Finished asynchronous operations as `[id, value, error_class, message]`, for the main
    /// fiber to hand to the fibers waiting on them.
    fn finished_ops(ruby: &Ruby, rb_self: &Self) -> Result<RArray, Error> {
        let ops = rb_self
            .inner
            .finished_ops
            .lock()
            .map(|mut o| std::mem::take(&mut *o))
            .unwrap_or_default();
        let rows = ruby.ary_new_capa(ops.len());
        for (id, result) in ops {
            match result {
                OpResult::Ok(value) => rows.push((id, value_to_ruby(ruby, value)))?,
                OpResult::Err(class, message) => {
                    rows.push((id, ruby.qnil(), class.get(ruby), message))?;
                }
            }
        }
        Ok(rows)
    }

    /// Stops handing out jobs: queued ones are reported abandoned (uncommitted) and `take`
    /// returns false.
    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.inner.flush();
        if let Some(scheduler) = self.scheduler.get() {
            scheduler.close();
        }
        // The main fiber learns it from the pipe (the scheduler, if any, wakes it too).
        self.inner.pipe.wake();
    }
}

pub fn init(ruby: &Ruby, native: RModule) -> Result<(), Error> {
    let class = native.define_class("Bridge", ruby.class_object())?;
    class.define_singleton_method("new", function!(Bridge::new, 0))?;
    class.define_method("fd", method!(Bridge::fd, 0))?;
    class.define_method("take", method!(Bridge::take, 0))?;
    class.define_method("cancellations", method!(Bridge::cancellations, 0))?;
    class.define_method("succeed", method!(Bridge::succeed, 1))?;
    class.define_method("fail", method!(Bridge::fail, 5))?;
    class.define_method("flush", method!(Bridge::flush, 0))?;
    class.define_method("finished_ops", method!(Bridge::finished_ops, 0))?;
    class.define_method("close", method!(Bridge::close, 0))?;
    Ok(())
}
