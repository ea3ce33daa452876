//! The librdkafka settings every client of one configuration shares, beyond Prosody's own:
//! security (TLS, SASL) from the dedicated options, then the application's properties
//! (`kafka_config`, then `consumer_kafka_config` or `producer_kafka_config`). Each librdkafka
//! client applies them after its own settings, so that the application's win, except for the
//! properties Prosody must own ([`OWNED`]), which are refused when the client is created.

use rdkafka::config::ClientConfig;

use crate::config::{is_secret_property, Config, SecurityProtocol, HIDDEN};

/// Which kind of librdkafka client the settings are for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// A consumer (the subscription's, deferral's reloader).
    Consumer,
    /// A producer (`send_message`, dead letters, the telemetry emitter).
    Producer,
}

/// Properties Prosody sets itself and relies on, with what to use instead.
pub const OWNED: &[(&str, &str)] = &[
    ("bootstrap.servers", "use bootstrap_servers"),
    ("metadata.broker.list", "use bootstrap_servers"),
    ("group.id", "use group_id"),
    ("group.protocol", "use group_protocol"),
    (
        "partition.assignment.strategy",
        "use group_protocol (:classic uses cooperative-sticky)",
    ),
    (
        "enable.auto.commit",
        "Prosody commits only offsets whose messages finished",
    ),
    (
        "enable.auto.offset.store",
        "Prosody stores only offsets whose messages finished",
    ),
    (
        "enable.partition.eof",
        "the poll loop does not expect end-of-partition events",
    ),
    (
        "queued.max.messages.kbytes",
        "it bounds the engine's prefetch (see max_uncommitted)",
    ),
    (
        "queued.min.messages",
        "use prefetch_records, the client's prefetch shared by its partitions",
    ),
    (
        "statistics.interval.ms",
        "/metrics reads librdkafka's statistics at its own interval",
    ),
    (
        "enable.idempotence",
        "per-key order of sends relies on the idempotent producer",
    ),
    ("message.timeout.ms", "use send_timeout"),
    ("delivery.timeout.ms", "use send_timeout"),
];

/// The settings for `side`: security, then `kafka_config`, then the side's own properties.
pub fn properties(config: &Config, side: Side) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut set = |name: &str, value: &str| out.push((name.to_owned(), value.to_owned()));
    let ssl = config.ssl_ca_location.is_some()
        || config.ssl_certificate_location.is_some()
        || config.ssl_key_location.is_some();
    let protocol = config
        .security_protocol
        .or(match (config.sasl_mechanism.is_some(), ssl) {
            (true, _) => Some(SecurityProtocol::SaslSsl),
            (false, true) => Some(SecurityProtocol::Ssl),
            (false, false) => None,
        });
    if let Some(protocol) = protocol {
        set("security.protocol", protocol.as_str());
    }
    if let Some(path) = &config.ssl_ca_location {
        set("ssl.ca.location", path);
    }
    if let Some(path) = &config.ssl_certificate_location {
        set("ssl.certificate.location", path);
    }
    if let Some(path) = &config.ssl_key_location {
        set("ssl.key.location", path);
    }
    if let Some(password) = &config.ssl_key_password {
        set("ssl.key.password", &password.0);
    }
    if let Some(mechanism) = config.sasl_mechanism {
        set("sasl.mechanisms", mechanism.as_str());
    }
    if let Some(username) = &config.sasl_username {
        set("sasl.username", username);
    }
    if let Some(password) = &config.sasl_password {
        set("sasl.password", &password.0);
    }
    let own = match side {
        Side::Consumer => &config.consumer_kafka_config,
        Side::Producer => &config.producer_kafka_config,
    };
    for (name, value) in config.kafka_config.0.iter().chain(&own.0) {
        set(name, value);
    }
    out
}

/// Applies `properties` to a client's settings (after Prosody's own).
pub fn apply(settings: &mut ClientConfig, properties: &[(String, String)]) {
    for (name, value) in properties {
        settings.set(name, value);
    }
}

/// Why `config`'s librdkafka settings cannot be used: an owned property set, or one librdkafka
/// refuses (unknown, or a bad value). Returns the option that set it, what it accepts and what it
/// got, never showing a secret value.
pub fn check(config: &Config) -> Result<(), (&'static str, &'static str, String)> {
    let options = [
        ("kafka_config", &config.kafka_config),
        ("consumer_kafka_config", &config.consumer_kafka_config),
        ("producer_kafka_config", &config.producer_kafka_config),
    ];
    for (option, properties) in options {
        for (name, _) in &properties.0 {
            if let Some((_, instead)) = OWNED.iter().find(|(owned, _)| owned == name) {
                return Err((
                    option,
                    "librdkafka properties that Prosody does not set itself",
                    format!("{name:?} ({instead})"),
                ));
            }
        }
    }
    for side in [Side::Consumer, Side::Producer] {
        let properties = properties(config, side);
        let mut settings = ClientConfig::new();
        apply(&mut settings, &properties);
        if let Err(rdkafka::error::KafkaError::ClientConfig(_, said, name, value)) =
            settings.create_native_config()
        {
            let shown = if is_secret_property(&name) {
                HIDDEN.to_owned()
            } else {
                format!("{value:?}")
            };
            let mut said = said;
            for (property, value) in &properties {
                if is_secret_property(property) && !value.is_empty() {
                    said = said.replace(value.as_str(), HIDDEN);
                }
            }
            return Err((
                which_option(config, side, &name),
                "settings librdkafka accepts",
                format!("{name:?} => {shown} (librdkafka: {said})"),
            ));
        }
    }
    Ok(())
}

/// The option that set librdkafka property `name` last for `side`.
fn which_option(config: &Config, side: Side, name: &str) -> &'static str {
    let own = match side {
        Side::Consumer => ("consumer_kafka_config", &config.consumer_kafka_config),
        Side::Producer => ("producer_kafka_config", &config.producer_kafka_config),
    };
    if own.1 .0.iter().any(|(n, _)| n == name) {
        return own.0;
    }
    if config.kafka_config.0.iter().any(|(n, _)| n == name) {
        return "kafka_config";
    }
    match name {
        "security.protocol" => "security_protocol",
        "ssl.ca.location" => "ssl_ca_location",
        "ssl.certificate.location" => "ssl_certificate_location",
        "ssl.key.location" => "ssl_key_location",
        "ssl.key.password" => "ssl_key_password",
        "sasl.mechanisms" => "sasl_mechanism",
        "sasl.username" => "sasl_username",
        "sasl.password" => "sasl_password",
        _ => "kafka_config",
    }
}
