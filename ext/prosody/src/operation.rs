//! Engine work that a Ruby caller waits for without freezing its reactor (`Prosody::Native::Pending`
//! and the result types it shares with the processor's bridge).
//!
//! An operation runs as a task on the engine's runtime. Where its result goes depends on who
//! waits, which the Ruby side decides:
//! - a handler's fiber on the processor thread: the subscription's bridge, whose main fiber hands
//!   results to the waiting fibers (batched, one pipe for all);
//! - a fiber of any other reactor (the application's own `Async` block): a [`Pending`], whose
//!   eventfd the fiber waits on with `IO#wait_readable`;
//! - a thread with no reactor: nobody; the caller blocks with the GVL released.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use magnus::{function, method, prelude::*, Error, IntoValue, RModule, Ruby, TryConvert, Value};

use crate::bridge::{Bridge, BridgeInner};
use crate::ruby::convert::bytes_to_ruby;
use crate::ruby::event_fd::EventFd;
use crate::ruby::{errors, gvl::without_gvl};

/// What a finished operation gives back.
#[derive(Debug)]
pub enum OpValue {
    /// Nothing (`nil`).
    Nil,
    /// Times in seconds since the epoch, for `scheduled`.
    Times(Vec<i64>),
    /// The records of a batch that were not delivered: `[index, topic, key, reason]` each;
    /// `nil` if none.
    Failures(Vec<(usize, String, Vec<u8>, String)>),
}

/// The result of an operation.
#[derive(Debug)]
pub enum OpResult {
    /// Done.
    Ok(OpValue),
    /// Failed: the Ruby exception class and message.
    Err(errors::Class, String),
}

impl OpResult {
    /// The value as Ruby objects, or the error to raise.
    pub fn into_ruby(self, ruby: &Ruby) -> Result<Value, Error> {
        match self {
            OpResult::Ok(value) => Ok(value_to_ruby(ruby, value)),
            OpResult::Err(class, message) => Err(errors::prosody(ruby, class, message)),
        }
    }
}

/// An operation's value as Ruby objects.
pub fn value_to_ruby(ruby: &Ruby, value: OpValue) -> Value {
    match value {
        OpValue::Nil => ruby.qnil().as_value(),
        OpValue::Times(times) => times.into_value_with(ruby),
        OpValue::Failures(failures) if failures.is_empty() => ruby.qnil().as_value(),
        OpValue::Failures(failures) => {
            let rows = ruby.ary_new_capa(failures.len());
            for (index, topic, key, reason) in failures {
                let _ = rows.push((index, topic, bytes_to_ruby(ruby, &key), reason));
            }
            rows.as_value()
        }
    }
}

/// Starts `work` on the engine's runtime for the waiter `target` names (see the module
/// documentation): a Bridge returns the operation id to await, a Pending returns nil, and nil
/// blocks this thread (GVL released, interruptible) and returns the value or raises.
pub fn start<F>(ruby: &Ruby, target: Value, work: F) -> Result<Value, Error>
where
    F: Future<Output = OpResult> + Send + 'static,
{
    let runtime = prosody_core::runtime::handle()
        .map_err(|e| errors::prosody(ruby, errors::Class::Client, e))?;
    if target.is_nil() {
        let result = without_gvl(ruby, move |interrupted| {
            runtime.block_on(async {
                tokio::pin!(work);
                loop {
                    tokio::select! {
                        result = &mut work => return Some(result),
                        _ = tokio::time::sleep(Duration::from_millis(20)) => {
                            if interrupted.load(Ordering::Acquire) {
                                return None;
                            }
                        }
                    }
                }
            })
        })?;
        return match result {
            Some(result) => result.into_ruby(ruby),
            None => {
                ruby.thread_check_ints()?;
                Err(errors::prosody(
                    ruby,
                    errors::Class::Send,
                    "the wait for the engine was interrupted",
                ))
            }
        };
    }
    if let Ok(bridge) = <&Bridge>::try_convert(target) {
        let inner: Arc<BridgeInner> = bridge.inner();
        let id = inner.next_op();
        runtime.spawn(async move { inner.op_finished(id, work.await) });
        return Ok(id.into_value_with(ruby));
    }
    if let Ok(pending) = <&Pending>::try_convert(target) {
        let inner = pending.inner.clone();
        runtime.spawn(async move {
            let result = work.await;
            if let Ok(mut slot) = inner.result.lock() {
                *slot = Some(result);
            }
            inner.ready.signal();
        });
        return Ok(ruby.qnil().as_value());
    }
    Err(Error::new(
        ruby.exception_type_error(),
        format!(
            "expected a Prosody::Native::Bridge, a Prosody::Native::Pending or nil, got {}",
            target.inspect()
        ),
    ))
}

/// Shared by a `Pending` and the engine task that fills it; the eventfd closes when both let go.
struct PendingInner {
    /// Readable once the result is in.
    ready: EventFd,
    /// The result, taken once.
    result: Mutex<Option<OpResult>>,
}

/// One operation's result for a fiber of any reactor (`lib/prosody/pending.rb` waits for it).
#[magnus::wrap(class = "Prosody::Native::Pending", free_immediately, size)]
pub struct Pending {
    inner: Arc<PendingInner>,
}

impl Pending {
    fn new(ruby: &Ruby) -> Result<Self, Error> {
        let ready = EventFd::new().map_err(|e| {
            Error::new(
                ruby.exception_runtime_error(),
                format!("could not open an eventfd: {e}"),
            )
        })?;
        Ok(Self {
            inner: Arc::new(PendingInner {
                ready,
                result: Mutex::new(None),
            }),
        })
    }

    /// The descriptor that turns readable when the result is in.
    fn fd(&self) -> i32 {
        self.inner.ready.fd()
    }

    /// Whether the result is in.
    fn is_ready(&self) -> bool {
        self.inner.result.lock().is_ok_and(|r| r.is_some())
    }

    /// The value, or raises the operation's error; `Prosody::Error` if it is not in yet (or was
    /// taken).
    fn result(ruby: &Ruby, rb_self: &Self) -> Result<Value, Error> {
        let taken = rb_self.inner.result.lock().ok().and_then(|mut r| r.take());
        match taken {
            Some(result) => result.into_ruby(ruby),
            None => Err(errors::prosody(
                ruby,
                errors::Class::Error,
                "the operation has no result yet",
            )),
        }
    }
}

pub fn init(ruby: &Ruby, native: RModule) -> Result<(), Error> {
    let class = native.define_class("Pending", ruby.class_object())?;
    class.define_singleton_method("new", function!(Pending::new, 0))?;
    class.define_method("fd", method!(Pending::fd, 0))?;
    class.define_method("ready?", method!(Pending::is_ready, 0))?;
    class.define_method("result", method!(Pending::result, 0))?;
    Ok(())
}
