//! Maps engine errors to Ruby exceptions: the one place that knows the Ruby classes. They are
//! defined in `lib/prosody/errors.rb` (loaded before the extension) and looked up once, at init.

use magnus::{prelude::*, value::Lazy, Error, ExceptionClass, RModule, Ruby};
use prosody_core::config::ConfigError;
use prosody_core::kafka::KafkaError;

/// A Ruby exception class the binding raises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// `ArgumentError`.
    Argument,
    /// `Prosody::Error`.
    Error,
    /// `Prosody::SendError`.
    Send,
    /// `Prosody::SubscriptionError`.
    Subscription,
    /// `Prosody::TimerError`.
    Timer,
    /// `Prosody::ClientError`.
    Client,
}

/// `Prosody::<name>`, which `lib/prosody/errors.rb` defines before the extension loads.
fn lookup(ruby: &Ruby, name: &str) -> ExceptionClass {
    ruby.class_object()
        .const_get::<_, RModule>("Prosody")
        .and_then(|m| m.const_get::<_, ExceptionClass>(name))
        .unwrap_or_else(|_| ruby.exception_runtime_error())
}

static ERROR: Lazy<ExceptionClass> = Lazy::new(|ruby| lookup(ruby, "Error"));
static SEND: Lazy<ExceptionClass> = Lazy::new(|ruby| lookup(ruby, "SendError"));
static SUBSCRIPTION: Lazy<ExceptionClass> = Lazy::new(|ruby| lookup(ruby, "SubscriptionError"));
static TIMER: Lazy<ExceptionClass> = Lazy::new(|ruby| lookup(ruby, "TimerError"));
static CLIENT: Lazy<ExceptionClass> = Lazy::new(|ruby| lookup(ruby, "ClientError"));

impl Class {
    /// The Ruby class.
    pub fn get(self, ruby: &Ruby) -> ExceptionClass {
        match self {
            Class::Argument => ruby.exception_arg_error(),
            Class::Error => ruby.get_inner(&ERROR),
            Class::Send => ruby.get_inner(&SEND),
            Class::Subscription => ruby.get_inner(&SUBSCRIPTION),
            Class::Timer => ruby.get_inner(&TIMER),
            Class::Client => ruby.get_inner(&CLIENT),
        }
    }
}

/// Resolves every class now, so that a missing one shows at load time, not at the first error.
pub fn init(ruby: &Ruby) -> Result<(), Error> {
    for (class, name) in [
        (&ERROR, "Error"),
        (&SEND, "SendError"),
        (&SUBSCRIPTION, "SubscriptionError"),
        (&TIMER, "TimerError"),
        (&CLIENT, "ClientError"),
    ] {
        Lazy::force(class, ruby);
        if ruby
            .get_inner(class)
            .as_value()
            .eql(ruby.exception_runtime_error())?
        {
            return Err(Error::new(
                ruby.exception_load_error(),
                format!(
                    "Prosody::{name} is not defined: require \"prosody\", not the extension alone"
                ),
            ));
        }
    }
    Ok(())
}

/// An exception of `class` with `message`.
pub fn prosody(ruby: &Ruby, class: Class, message: impl Into<String>) -> Error {
    Error::new(class.get(ruby), message.into())
}

/// Bad configuration: `ArgumentError`, as for any bad argument.
pub fn config(ruby: &Ruby, e: ConfigError) -> Error {
    prosody(ruby, Class::Argument, e.to_string())
}

/// Client and subscription failures. The timer store is set up when subscribing, so its
/// failure (Cassandra unreachable, a migration failed) is a subscription error.
pub fn kafka(ruby: &Ruby, e: KafkaError) -> Error {
    let class = match e {
        KafkaError::NotConsumer(_)
        | KafkaError::AlreadySubscribed
        | KafkaError::Subscribe { .. }
        | KafkaError::Timers(_)
        | KafkaError::Probe { .. } => Class::Subscription,
        KafkaError::EngineFailed(_) => Class::Error,
        KafkaError::Tracing(_) => Class::Argument,
        _ => Class::Client,
    };
    prosody(ruby, class, e.to_string())
}
