//! `Prosody::Native::Bridge`: the queue between the engine and one Ruby processor thread.
//!
//! Engine threads push jobs without touching Ruby. The processor drains the whole queue in one
//! call with the GVL held and waits on a pipe only when the queue is empty, so it is woken once
//! per batch, never once per message.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use magnus::{function, method, prelude::*, Error, IntoValue, RArray, RModule, Ruby};
use prosody_core::handler::{Dispatcher, Job};

use crate::job::JobObj;
use crate::ruby::pipe::WakePipe;

enum Item {
    /// Run this job.
    Run(u64, Job),
    /// Stop the handler running the job with this id.
    Cancel(u64),
}

#[derive(Default)]
struct Queue {
    /// Items not yet drained by Ruby.
    items: VecDeque<Item>,
    /// Ruby found the queue empty and is (about to be) waiting on the pipe.
    sleeping: bool,
    /// No more items will be accepted; `drain` returns nil once empty.
    closed: bool,
}

/// Shared by the Ruby object and the engine's dispatcher.
pub struct BridgeInner {
    /// Pending items; the lock is held only to push or to swap the whole deque out.
    queue: Mutex<Queue>,
    /// Wakes the processor when it sleeps.
    pipe: WakePipe,
    /// Job ids, for cancellation.
    next_id: AtomicU64,
}

impl BridgeInner {
    fn push(&self, item: Item) {
        let wake = {
            let Ok(mut q) = self.queue.lock() else {
                return;
            };
            if q.closed {
                // Dropping a job reports it abandoned: it stays uncommitted.
                return;
            }
            q.items.push_back(item);
            std::mem::take(&mut q.sleeping)
        };
        if wake {
            self.pipe.wake();
        }
    }
}

/// The dispatcher the engine calls from its threads.
pub struct BridgeDispatcher(Arc<BridgeInner>);

impl Dispatcher for BridgeDispatcher {
    fn dispatch(&self, job: Job) {
        let id = self.0.next_id.fetch_add(1, Ordering::Relaxed);
        let cancel = job.cancel.clone();
        self.0.push(Item::Run(id, job));
        let weak: Weak<BridgeInner> = Arc::downgrade(&self.0);
        cancel.on_cancel(move || {
            if let Some(inner) = weak.upgrade() {
                inner.push(Item::Cancel(id));
            }
        });
    }
}

#[magnus::wrap(class = "Prosody::Native::Bridge", free_immediately, size)]
pub struct Bridge(Arc<BridgeInner>);

impl Bridge {
    fn new(ruby: &Ruby) -> Result<Self, Error> {
        let pipe = WakePipe::new().map_err(|e| {
            Error::new(
                ruby.exception_runtime_error(),
                format!("could not open a wake-up pipe: {e}"),
            )
        })?;
        Ok(Self(Arc::new(BridgeInner {
            queue: Mutex::new(Queue::default()),
            pipe,
            next_id: AtomicU64::new(1),
        })))
    }

    /// The dispatcher to hand to the engine.
    pub fn dispatcher(&self) -> Arc<dyn Dispatcher> {
        Arc::new(BridgeDispatcher(self.0.clone()))
    }

    /// File descriptor to wait on with `IO#wait_readable` when `drain` returned an empty batch.
    fn fd(&self) -> i32 {
        self.0.pipe.read_fd()
    }

    /// Everything queued: `Job`s to run and Integer ids of jobs to cancel. Empty when nothing is
    /// queued (wait on `fd` then), nil once closed and empty.
    fn drain(ruby: &Ruby, rb_self: &Self) -> Result<Option<RArray>, Error> {
        rb_self.0.pipe.clear();
        let items = {
            let Ok(mut q) = rb_self.0.queue.lock() else {
                return Ok(None);
            };
            if q.items.is_empty() {
                if q.closed {
                    return Ok(None);
                }
                q.sleeping = true;
                return Ok(Some(ruby.ary_new()));
            }
            std::mem::take(&mut q.items)
        };
        let batch = ruby.ary_new_capa(items.len());
        for item in items {
            match item {
                Item::Run(id, job) => batch.push(JobObj::new(id, job).into_value_with(ruby))?,
                Item::Cancel(id) => batch.push(id)?,
            }
        }
        Ok(Some(batch))
    }

    /// Stops accepting work and wakes the processor so `drain` returns nil. Queued jobs are
    /// dropped, which reports them abandoned (uncommitted).
    fn close(&self) {
        let dropped = self
            .0
            .queue
            .lock()
            .map(|mut q| {
                q.closed = true;
                std::mem::take(&mut q.items)
            })
            .unwrap_or_default();
        drop(dropped);
        self.0.pipe.wake();
    }
}

pub fn init(ruby: &Ruby, native: RModule) -> Result<(), Error> {
    let class = native.define_class("Bridge", ruby.class_object())?;
    class.define_singleton_method("new", function!(Bridge::new, 0))?;
    class.define_method("fd", method!(Bridge::fd, 0))?;
    class.define_method("drain", method!(Bridge::drain, 0))?;
    class.define_method("close", method!(Bridge::close, 0))?;
    Ok(())
}
