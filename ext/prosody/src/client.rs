//! `Prosody::Native::Client`: the engine's client. `lib/prosody/client.rb` wraps it with the
//! public `Prosody::Client` API (argument checks, JSON encoding, the Ruby processor).

use std::mem::ManuallyDrop;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use magnus::{function, method, prelude::*, Error, RHash, RModule, RString, Ruby, Symbol, Value};
use prosody_core::client::{Client as CoreClient, ConsumerState};
use prosody_core::config::Config;

use crate::bridge::Bridge;
use crate::ruby::{convert, errors, gvl::without_gvl};

#[magnus::wrap(class = "Prosody::Native::Client", free_immediately, size)]
pub struct Client {
    /// The engine's client. Taken out only by `Drop`.
    inner: ManuallyDrop<Arc<CoreClient>>,
    /// The process that created it.
    pid: u32,
}

impl Drop for Client {
    /// In a process forked after this client was created, the engine threads it would stop on
    /// drop do not exist (joining them aborts the process): it is left as it is instead.
    fn drop(&mut self) {
        if prosody_core::process::is_current(self.pid) {
            // SAFETY: `inner` is not used again; this is the only place that takes it.
            unsafe { ManuallyDrop::drop(&mut self.inner) };
        }
    }
}

impl Client {
    /// Resolves options (a Hash with String keys) against env vars and defaults.
    fn new(ruby: &Ruby, options: RHash) -> Result<Self, Error> {
        let mut explicit = Vec::with_capacity(options.len());
        options.foreach(|k: Value, v: Value| {
            let key = convert::string_like(ruby, "option name", k)?;
            // An unknown option is reported by name (listing the valid ones), whatever its value.
            let value = if prosody_core::config::OPTIONS.iter().any(|o| o.name == key) {
                convert::raw_value(ruby, &key, v)?
            } else {
                prosody_core::config::RawValue::Nil
            };
            explicit.push((key, value));
            Ok(magnus::r_hash::ForEach::Continue)
        })?;
        let config = Config::resolve(explicit).map_err(|e| errors::config(ruby, e))?;
        crate::logging::ensure_installed();
        let client = without_gvl(ruby, move |_| CoreClient::new(config))?
            .map_err(|e| errors::kafka(ruby, e))?;
        Ok(Self {
            inner: ManuallyDrop::new(Arc::new(client)),
            pid: std::process::id(),
        })
    }

    /// Sends JSON bytes and blocks (GVL released) until acknowledged or `send_timeout`; returns
    /// nil.
    fn send_message(
        ruby: &Ruby,
        rb_self: &Self,
        topic: RString,
        key: RString,
        payload: RString,
        headers: Option<RHash>,
    ) -> Result<(), Error> {
        let topic = convert::utf8(ruby, "topic", topic)?;
        let key = convert::bytes(key);
        // SAFETY: the bytes are copied before any other Ruby code can run.
        let payload = unsafe { payload.as_slice() }.to_vec();
        let headers = convert::headers(ruby, headers)?;
        let client = Arc::clone(&rb_self.inner);
        let runtime = prosody_core::runtime::handle()
            .map_err(|e| errors::prosody(ruby, errors::Class::Client, e))?;
        let result = without_gvl(ruby, move |interrupted| {
            runtime.block_on(async {
                let send = client.send(&topic, &key, &payload, &headers);
                tokio::pin!(send);
                loop {
                    tokio::select! {
                        result = &mut send => return Some(result),
                        _ = tokio::time::sleep(Duration::from_millis(20)) => {
                            if interrupted.load(Ordering::Acquire) {
                                return None;
                            }
                        }
                    }
                }
            })
        })?;
        match result {
            Some(Ok(_)) => Ok(()),
            Some(Err(e)) => Err(errors::send(ruby, e)),
            None => {
                ruby.thread_check_ints()?;
                Err(errors::prosody(
                    ruby,
                    errors::Class::Send,
                    "send_message was interrupted",
                ))
            }
        }
    }

    /// Starts consuming; the processor pulls jobs through `bridge`.
    fn subscribe(ruby: &Ruby, rb_self: &Self, bridge: &Bridge) -> Result<(), Error> {
        let client = Arc::clone(&rb_self.inner);
        let scheduler = bridge.scheduler();
        without_gvl(ruby, move |_| client.subscribe(scheduler))?.map_err(|e| errors::kafka(ruby, e))
    }

    /// Drains, commits and stops consuming. Blocks up to about `shutdown_timeout` with the GVL
    /// released (handlers keep running on the processor thread meanwhile); not interruptible, so
    /// that the final commit is not lost.
    fn unsubscribe(ruby: &Ruby, rb_self: &Self) -> Result<(), Error> {
        let client = Arc::clone(&rb_self.inner);
        without_gvl(ruby, move |_| client.unsubscribe())?.map_err(|e| errors::kafka(ruby, e))
    }

    /// Test support: makes the poll thread panic, as a bug would.
    fn inject_fault(&self) -> bool {
        self.inner.inject_fault()
    }

    fn consumer_state(ruby: &Ruby, rb_self: &Self) -> Symbol {
        ruby.to_symbol(match rb_self.inner.consumer_state() {
            ConsumerState::Unconfigured => "unconfigured",
            ConsumerState::Configured => "configured",
            ConsumerState::Running => "running",
        })
    }

    fn source_system(&self) -> String {
        self.inner.config().effective_source_system().to_owned()
    }

    fn group_id(&self) -> Option<String> {
        self.inner.config().group_id.clone()
    }

    fn is_stalled(&self) -> bool {
        self.inner.is_stalled()
    }

    fn assigned_partitions(&self) -> usize {
        self.inner.assigned_partitions()
    }

    fn max_concurrency(&self) -> u64 {
        self.inner.config().max_concurrency.get()
    }

    fn timers_available(&self) -> bool {
        self.inner.timers_available()
    }
}

pub fn init(ruby: &Ruby, native: RModule) -> Result<(), Error> {
    let class = native.define_class("Client", ruby.class_object())?;
    class.define_singleton_method("new", function!(Client::new, 1))?;
    class.define_method("send_message", method!(Client::send_message, 4))?;
    class.define_method("subscribe", method!(Client::subscribe, 1))?;
    class.define_method("unsubscribe", method!(Client::unsubscribe, 0))?;
    class.define_method("consumer_state", method!(Client::consumer_state, 0))?;
    class.define_method("source_system", method!(Client::source_system, 0))?;
    class.define_method("group_id", method!(Client::group_id, 0))?;
    class.define_method(
        "assigned_partitions",
        method!(Client::assigned_partitions, 0),
    )?;
    class.define_method("max_concurrency", method!(Client::max_concurrency, 0))?;
    class.define_method("stalled?", method!(Client::is_stalled, 0))?;
    class.define_method("timers_available?", method!(Client::timers_available, 0))?;
    class.define_method("inject_fault", method!(Client::inject_fault, 0))?;
    Ok(())
}
