//! Maps engine errors to Ruby exceptions. The classes live in `lib/prosody/errors.rb`.

use magnus::{prelude::*, Error, ExceptionClass, RModule, Ruby};
use prosody_core::config::ConfigError;
use prosody_core::kafka::producer::SendError;
use prosody_core::kafka::KafkaError;

/// `Prosody::<name>`, or `RuntimeError` if the Ruby files were not loaded.
fn class(ruby: &Ruby, name: &str) -> ExceptionClass {
    ruby.class_object()
        .const_get::<_, RModule>("Prosody")
        .and_then(|m| m.const_get::<_, ExceptionClass>(name))
        .unwrap_or_else(|_| ruby.exception_runtime_error())
}

/// A `Prosody::<class_name>` with `message`.
pub fn prosody(ruby: &Ruby, class_name: &str, message: impl Into<String>) -> Error {
    Error::new(class(ruby, class_name), message.into())
}

/// Bad configuration: `ArgumentError`, as for any bad argument.
pub fn config(ruby: &Ruby, e: ConfigError) -> Error {
    Error::new(ruby.exception_arg_error(), e.to_string())
}

/// A failed delivery.
pub fn send(ruby: &Ruby, e: SendError) -> Error {
    prosody(ruby, "SendError", e.to_string())
}

/// Client and subscription failures.
pub fn kafka(ruby: &Ruby, e: KafkaError) -> Error {
    let class_name = match e {
        KafkaError::NotConsumer(_)
        | KafkaError::AlreadySubscribed
        | KafkaError::Subscribe { .. } => "SubscriptionError",
        _ => "ClientError",
    };
    prosody(ruby, class_name, e.to_string())
}
