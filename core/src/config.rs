//! Typed configuration: an explicit value wins over its `PROSODY_*` environment variable, which
//! wins over the default.
//!
//! Every option is one row of the [`options!`] table below. A row names the field, its Rust type,
//! its environment variable, its default (written in environment-variable syntax so that defaults
//! go through the same parser as user input) and whether the engine acts on it yet. Later features
//! add rows; nothing else in this file needs to change.
//!
//! Explicit values arrive as [`RawValue`]s (the binding converts from its own language), so this
//! module knows nothing about Ruby. Errors name the option or the variable, what is accepted, and
//! what was given.

use std::collections::BTreeMap;
use std::fmt;
use std::num::NonZeroU64;
use std::time::Duration;

use thiserror::Error;

/// A value given explicitly by the application, before it is typed.
#[derive(Clone, Debug, PartialEq)]
pub enum RawValue {
    /// `nil`: the option is treated as unset (except where the option gives `nil` a meaning).
    Nil,
    /// `true` / `false`.
    Bool(bool),
    /// An integer.
    Int(i64),
    /// A floating-point number.
    Float(f64),
    /// A string or a symbol.
    Str(String),
    /// An array.
    List(Vec<RawValue>),
    /// A Hash with String or Symbol keys, in the order given.
    Map(Vec<(String, RawValue)>),
}

impl fmt::Display for RawValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RawValue::Nil => f.write_str("nil"),
            RawValue::Bool(b) => write!(f, "{b}"),
            RawValue::Int(i) => write!(f, "{i}"),
            RawValue::Float(x) => write!(f, "{x}"),
            RawValue::Str(s) => write!(f, "{s:?}"),
            RawValue::List(items) => {
                f.write_str("[")?;
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{item}")?;
                }
                f.write_str("]")
            }
            RawValue::Map(entries) => {
                f.write_str("{")?;
                for (i, (key, value)) in entries.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    if is_secret_property(key) {
                        write!(f, "{key:?} => {HIDDEN}")?;
                    } else {
                        write!(f, "{key:?} => {value}")?;
                    }
                }
                f.write_str("}")
            }
        }
    }
}

/// Whether a librdkafka property holds a secret (a password, a key): its value never shows in
/// errors, logs or `inspect`.
pub fn is_secret_property(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    name.contains("password") || name.contains("secret") || name == "ssl.key.pem"
}

/// Why a configuration could not be built.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum ConfigError {
    /// An option key that no row of the table defines.
    #[error("unknown option :{name}; valid options are: {valid}")]
    UnknownOption { name: String, valid: String },
    /// An explicit value of the wrong type or out of range.
    #[error("invalid :{name}, expected {expected}, got {got}")]
    InvalidOption {
        name: &'static str,
        expected: String,
        got: String,
    },
    /// An environment variable that does not parse.
    #[error("invalid {env}, expected {expected}, got {got:?}")]
    InvalidEnv {
        env: &'static str,
        expected: String,
        got: String,
    },
    /// A required option with no value from any source.
    #[error("missing :{name}: {why}; pass it to Prosody::Client.new or set {env}")]
    Missing {
        name: &'static str,
        env: &'static str,
        why: &'static str,
    },
}

/// One row of the options table, for listings and documentation.
#[derive(Clone, Copy, Debug)]
pub struct OptionInfo {
    /// Option name as the application writes it.
    pub name: &'static str,
    /// Environment variable consulted when the option is not given.
    pub env: &'static str,
    /// Default in environment-variable syntax, if any.
    pub default: Option<&'static str>,
}

/// A type an option can have: how it reads from an explicit value and from an environment string.
pub trait OptionType: Sized {
    /// What is accepted, worded for an error message ("an Integer >= 0").
    fn expected() -> String;
    /// Reads an explicit value; `None` means the value does not fit the type.
    fn from_raw(raw: &RawValue) -> Option<Self>;
    /// Reads an environment string (also used for the defaults in the table).
    fn from_env(s: &str) -> Option<Self>;
    /// The value when no source gives one; `None` means the option is required.
    fn absent() -> Option<Self> {
        None
    }
    /// Whether an explicit `nil` is a value of this type rather than "unset".
    fn nil_is_value() -> bool {
        false
    }
    /// Whether values of this type are secrets: errors never show them.
    fn secret() -> bool {
        false
    }
}

/// What errors show in place of a secret option's value.
pub const HIDDEN: &str = "a value that is not shown (the option is secret)";

impl OptionType for String {
    fn expected() -> String {
        "a non-empty String".into()
    }
    fn from_raw(raw: &RawValue) -> Option<Self> {
        match raw {
            RawValue::Str(s) => Self::from_env(s),
            _ => None,
        }
    }
    fn from_env(s: &str) -> Option<Self> {
        let s = s.trim();
        (!s.is_empty()).then(|| s.to_owned())
    }
}

impl OptionType for Vec<String> {
    fn expected() -> String {
        "an Array of Strings or a comma-separated String".into()
    }
    fn from_raw(raw: &RawValue) -> Option<Self> {
        match raw {
            RawValue::Str(s) => Self::from_env(s).filter(|list| !list.is_empty()),
            RawValue::List(items) => {
                let mut out = Vec::with_capacity(items.len());
                for item in items {
                    match item {
                        RawValue::Str(s) if !s.trim().is_empty() => out.push(s.trim().to_owned()),
                        _ => return None,
                    }
                }
                Some(out)
            }
            _ => None,
        }
    }
    fn from_env(s: &str) -> Option<Self> {
        Some(
            s.split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(str::to_owned)
                .collect(),
        )
    }
    fn absent() -> Option<Self> {
        Some(Vec::new())
    }
}

impl OptionType for bool {
    fn expected() -> String {
        "true or false".into()
    }
    fn from_raw(raw: &RawValue) -> Option<Self> {
        match raw {
            RawValue::Bool(b) => Some(*b),
            _ => None,
        }
    }
    fn from_env(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Some(true),
            "false" | "0" | "no" | "off" => Some(false),
            _ => None,
        }
    }
}

impl OptionType for u64 {
    fn expected() -> String {
        "an Integer >= 0".into()
    }
    fn from_raw(raw: &RawValue) -> Option<Self> {
        match raw {
            RawValue::Int(i) => u64::try_from(*i).ok(),
            _ => None,
        }
    }
    fn from_env(s: &str) -> Option<Self> {
        s.trim().parse().ok()
    }
}

impl OptionType for NonZeroU64 {
    fn expected() -> String {
        "an Integer >= 1".into()
    }
    fn from_raw(raw: &RawValue) -> Option<Self> {
        match raw {
            RawValue::Int(i) => u64::try_from(*i).ok().and_then(NonZeroU64::new),
            _ => None,
        }
    }
    fn from_env(s: &str) -> Option<Self> {
        s.trim().parse().ok()
    }
}

impl OptionType for f64 {
    fn expected() -> String {
        "a Numeric".into()
    }
    fn from_raw(raw: &RawValue) -> Option<Self> {
        match raw {
            RawValue::Int(i) => Some(*i as f64),
            RawValue::Float(x) if x.is_finite() => Some(*x),
            _ => None,
        }
    }
    fn from_env(s: &str) -> Option<Self> {
        s.trim().parse::<f64>().ok().filter(|x| x.is_finite())
    }
}

/// The longest duration any option accepts: 100 years. Longer ones would overflow the clocks
/// that deadlines are computed on (`Instant + Duration` panics), and mean nothing in practice.
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 86_400 + 25 * 86_400);

/// The longest `send_timeout`: librdkafka's `message.timeout.ms` is a 32-bit millisecond count.
pub const MAX_SEND_TIMEOUT: Duration = Duration::from_millis(i32::MAX as u64);

impl OptionType for Duration {
    fn expected() -> String {
        format!(
            "a duration: Numeric seconds from 0 to {} (100 years), or a String such as \"100ms\", \"30s\", \"5m\", \"1h\", \"7d\"",
            MAX_DURATION.as_secs()
        )
    }
    fn from_raw(raw: &RawValue) -> Option<Self> {
        match raw {
            RawValue::Int(i) => u64::try_from(*i).ok().map(Duration::from_secs),
            RawValue::Float(x) => Duration::try_from_secs_f64(*x).ok(),
            RawValue::Str(s) => Self::from_env(s),
            _ => None,
        }
        .filter(|d| *d <= MAX_DURATION)
    }
    fn from_env(s: &str) -> Option<Self> {
        parse_duration(s).filter(|d| *d <= MAX_DURATION)
    }
}

impl<T: OptionType> OptionType for Option<T> {
    fn expected() -> String {
        T::expected()
    }
    fn secret() -> bool {
        T::secret()
    }
    fn from_raw(raw: &RawValue) -> Option<Self> {
        T::from_raw(raw).map(Some)
    }
    fn from_env(s: &str) -> Option<Self> {
        T::from_env(s).map(Some)
    }
    fn absent() -> Option<Self> {
        Some(None)
    }
}

/// A TCP port that can be switched off (`nil`, `false`, or `none` in the variable).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Port(pub Option<u16>);

impl OptionType for Port {
    fn expected() -> String {
        "an Integer from 1 to 65535, or nil/false to disable".into()
    }
    fn from_raw(raw: &RawValue) -> Option<Self> {
        match raw {
            RawValue::Nil | RawValue::Bool(false) => Some(Port(None)),
            RawValue::Int(i) => u16::try_from(*i)
                .ok()
                .filter(|p| *p > 0)
                .map(|p| Port(Some(p))),
            RawValue::Str(s) => Self::from_env(s),
            _ => None,
        }
    }
    fn from_env(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "none" | "false" | "off" => Some(Port(None)),
            other => other
                .parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .map(|p| Port(Some(p))),
        }
    }
    fn nil_is_value() -> bool {
        true
    }
}

/// Declares an enum option type from its accepted words.
macro_rules! word_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $word:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum $name { $($(#[$vmeta])* $variant),+ }

        impl $name {
            /// The word that names this value.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $word),+ }
            }
        }

        impl OptionType for $name {
            fn expected() -> String {
                let words: &[&str] = &[$(concat!(":", $word)),+];
                format!("one of {}", words.join(", "))
            }
            fn from_raw(raw: &RawValue) -> Option<Self> {
                match raw { RawValue::Str(s) => Self::from_env(s), _ => None }
            }
            fn from_env(s: &str) -> Option<Self> {
                match s.trim() { $($word => Some($name::$variant),)+ _ => None }
            }
        }
    };
}

word_enum! {
    /// How failures are handled.
    Mode {
        /// Retry until success, in order.
        Pipeline = "pipeline",
        /// Retry a few times, then dead-letter.
        LowLatency = "low_latency",
        /// Log and move on.
        BestEffort = "best_effort",
    }
}

word_enum! {
    /// How the clients talk to the brokers (librdkafka's `security.protocol`).
    SecurityProtocol {
        /// No encryption, no authentication.
        Plaintext = "plaintext",
        /// TLS.
        Ssl = "ssl",
        /// SASL authentication without encryption.
        SaslPlaintext = "sasl_plaintext",
        /// SASL authentication over TLS.
        SaslSsl = "sasl_ssl",
    }
}

/// A SASL mechanism (librdkafka's `sasl.mechanisms`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SaslMechanism {
    /// User name and password, sent as they are (use it over TLS).
    Plain,
    /// SCRAM with SHA-256.
    ScramSha256,
    /// SCRAM with SHA-512.
    ScramSha512,
}

impl SaslMechanism {
    /// The mechanism's name, as Kafka and librdkafka write it.
    pub fn as_str(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

impl OptionType for SaslMechanism {
    fn expected() -> String {
        r#"one of "PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512""#.into()
    }
    fn from_raw(raw: &RawValue) -> Option<Self> {
        match raw {
            RawValue::Str(s) => Self::from_env(s),
            _ => None,
        }
    }
    fn from_env(s: &str) -> Option<Self> {
        match s.trim().to_ascii_uppercase().replace('_', "-").as_str() {
            "PLAIN" => Some(SaslMechanism::Plain),
            "SCRAM-SHA-256" => Some(SaslMechanism::ScramSha256),
            "SCRAM-SHA-512" => Some(SaslMechanism::ScramSha512),
            _ => None,
        }
    }
}

/// librdkafka properties given as they are (`kafka_config` and its one-sided variants): name
/// and value, in the order given. `Debug` hides the values of secret properties.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct KafkaProperties(pub Vec<(String, String)>);

impl fmt::Debug for KafkaProperties {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut map = f.debug_map();
        for (name, value) in &self.0 {
            if is_secret_property(name) {
                map.entry(name, &HIDDEN);
            } else {
                map.entry(name, value);
            }
        }
        map.finish()
    }
}

impl KafkaProperties {
    fn value(raw: &RawValue) -> Option<String> {
        match raw {
            RawValue::Str(s) => Some(s.clone()),
            RawValue::Int(i) => Some(i.to_string()),
            RawValue::Float(x) => Some(x.to_string()),
            RawValue::Bool(b) => Some(b.to_string()),
            _ => None,
        }
    }
}

impl OptionType for KafkaProperties {
    fn expected() -> String {
        "a Hash of librdkafka property names to String, Integer, Float or true/false values (in the \
         variable: a JSON object)"
            .into()
    }
    fn from_raw(raw: &RawValue) -> Option<Self> {
        match raw {
            RawValue::Map(entries) => entries
                .iter()
                .map(|(name, value)| Some((name.trim().to_owned(), Self::value(value)?)))
                .collect::<Option<Vec<_>>>()
                .map(KafkaProperties),
            _ => None,
        }
    }
    fn from_env(s: &str) -> Option<Self> {
        let parsed: serde_json::Map<String, serde_json::Value> = serde_json::from_str(s).ok()?;
        parsed
            .into_iter()
            .map(|(name, value)| {
                let value = match value {
                    serde_json::Value::String(s) => s,
                    serde_json::Value::Number(n) => n.to_string(),
                    serde_json::Value::Bool(b) => b.to_string(),
                    _ => return None,
                };
                Some((name, value))
            })
            .collect::<Option<Vec<_>>>()
            .map(KafkaProperties)
    }
    fn absent() -> Option<Self> {
        Some(KafkaProperties::default())
    }
}

word_enum! {
    /// The consumer-group protocol.
    GroupProtocol {
        /// KIP-848 (Kafka 4.0+): the broker assigns partitions incrementally.
        Consumer = "consumer",
        /// The classic protocol with the cooperative-sticky assignor, for older brokers.
        Classic = "classic",
    }
}

word_enum! {
    /// How an execution span relates to the span that caused it.
    SpanLinking {
        /// The execution span is a child of the producer's span.
        Child = "child",
        /// The execution span starts a new trace linked to the cause.
        FollowsFrom = "follows_from",
    }
}

/// Parses `"100ms"`, `"30s"`, `"5m"`, `"1h"`, `"7d"`, `"1.5s"`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let value: f64 = number.parse().ok()?;
    let seconds_per_unit = match unit.trim() {
        "" | "s" | "sec" | "secs" | "second" | "seconds" => 1.0,
        "ms" => 0.001,
        "us" | "µs" => 0.000_001,
        "m" | "min" | "mins" | "minute" | "minutes" => 60.0,
        "h" | "hr" | "hour" | "hours" => 3_600.0,
        "d" | "day" | "days" => 86_400.0,
        "y" | "year" | "years" => 31_536_000.0,
        _ => return None,
    };
    Duration::try_from_secs_f64(value * seconds_per_unit).ok()
}

/// The explicit values and the environment, consumed row by row.
struct Sources<'a> {
    explicit: BTreeMap<String, RawValue>,
    env: &'a dyn Fn(&str) -> Option<String>,
    /// Rows whose value came from the application or the environment, not the default.
    set: Vec<&'static str>,
    /// Rows whose value came from the environment.
    from_env: Vec<&'static str>,
}

impl Sources<'_> {
    fn take<T: OptionType>(
        &mut self,
        name: &'static str,
        env: &'static str,
        default: Option<&'static str>,
    ) -> Result<T, ConfigError> {
        if let Some(raw) = self.explicit.remove(name) {
            if raw != RawValue::Nil || T::nil_is_value() {
                self.set.push(name);
                return T::from_raw(&raw).ok_or_else(|| ConfigError::InvalidOption {
                    name,
                    expected: T::expected(),
                    got: if T::secret() {
                        HIDDEN.into()
                    } else {
                        raw.to_string()
                    },
                });
            }
        }
        if let Some(value) = (self.env)(env) {
            self.set.push(name);
            self.from_env.push(name);
            return T::from_env(&value).ok_or_else(|| ConfigError::InvalidEnv {
                env,
                expected: T::expected(),
                got: if T::secret() { HIDDEN.into() } else { value },
            });
        }
        if let Some(default) = default {
            return T::from_env(default).ok_or_else(|| ConfigError::InvalidEnv {
                env,
                expected: T::expected(),
                got: format!("built-in default {default}"),
            });
        }
        T::absent().ok_or(ConfigError::Missing {
            name,
            env,
            why: "no default",
        })
    }
}

/// Defines [`Config`], [`OPTIONS`] and the row-by-row resolution from one table.
macro_rules! options {
    ($( $(#[doc = $doc:literal])* $name:ident : $ty:ty, $env:literal, $default:expr; )*) => {
        /// The client's resolved configuration. See the README's configuration reference.
        #[derive(Clone, Debug)]
        pub struct Config {
            $( $(#[doc = $doc])* pub $name: $ty, )*
            /// Options whose value came from the application or the environment.
            pub set_options: Vec<&'static str>,
            /// Options whose value came from their environment variable (errors name it).
            pub env_options: Vec<&'static str>,
        }

        /// Every option, in table order.
        pub const OPTIONS: &[OptionInfo] = &[
            $( OptionInfo { name: stringify!($name), env: $env, default: $default }, )*
        ];

        /// Whether `name` is a secret option: its value never appears in errors, logs or
        /// `inspect`.
        pub fn is_secret(name: &str) -> bool {
            $( if name == stringify!($name) { return <$ty as OptionType>::secret(); } )*
            false
        }

        impl Config {
            fn from_sources(sources: &mut Sources<'_>) -> Result<Self, ConfigError> {
                $( let $name: $ty = sources.take(stringify!($name), $env, $default)?; )*
                Ok(Config {
                    $( $name, )*
                    set_options: std::mem::take(&mut sources.set),
                    env_options: std::mem::take(&mut sources.from_env),
                })
            }
        }
    };
}

options! {
    // --- Core
    /// Kafka servers to connect to (ignored in mock mode).
    bootstrap_servers: Option<Vec<String>>, "PROSODY_BOOTSTRAP_SERVERS", None;
    /// Consumer group; required to subscribe.
    group_id: Option<String>, "PROSODY_GROUP_ID", None;
    /// Topics to read; required to subscribe.
    subscribed_topics: Vec<String>, "PROSODY_SUBSCRIBED_TOPICS", None;
    /// Event-type prefixes to process (all when empty).
    allowed_events: Vec<String>, "PROSODY_ALLOWED_EVENTS", None;
    /// Value of the `source-system` header on produced records; defaults to `group_id`.
    source_system: Option<String>, "PROSODY_SOURCE_SYSTEM", None;
    /// Use the in-process librdkafka mock cluster and in-memory stores.
    mock: bool, "PROSODY_MOCK", Some("false");
    /// Partitions of topics the mock cluster creates on first use.
    mock_partitions: NonZeroU64, "PROSODY_MOCK_PARTITIONS", Some("4");
    /// Failure handling mode.
    mode: Mode, "PROSODY_MODE", Some("pipeline");
    /// Consumer-group protocol: `consumer` (KIP-848) or `classic` (cooperative-sticky).
    group_protocol: GroupProtocol, "PROSODY_GROUP_PROTOCOL", Some("consumer");

    // --- Security and librdkafka
    /// How the clients talk to the brokers; by default `ssl` when an `ssl_*` option is set,
    /// `sasl_ssl` with a SASL mechanism too, `sasl_plaintext` with a SASL mechanism alone.
    security_protocol: Option<SecurityProtocol>, "PROSODY_SECURITY_PROTOCOL", None;
    /// CA certificate(s) (PEM file) to verify the brokers with, or `probe` for the system's.
    ssl_ca_location: Option<String>, "PROSODY_SSL_CA_LOCATION", None;
    /// The client's certificate (PEM file), when the brokers ask for one.
    ssl_certificate_location: Option<String>, "PROSODY_SSL_CERTIFICATE_LOCATION", None;
    /// The client's private key (PEM file).
    ssl_key_location: Option<String>, "PROSODY_SSL_KEY_LOCATION", None;
    /// The private key's password (never logged).
    ssl_key_password: Option<Secret>, "PROSODY_SSL_KEY_PASSWORD", None;
    /// SASL mechanism: `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`.
    sasl_mechanism: Option<SaslMechanism>, "PROSODY_SASL_MECHANISM", None;
    /// SASL user name.
    sasl_username: Option<String>, "PROSODY_SASL_USERNAME", None;
    /// SASL password (never logged).
    sasl_password: Option<Secret>, "PROSODY_SASL_PASSWORD", None;
    /// librdkafka properties for the consumers and producers, applied after Prosody's own.
    kafka_config: KafkaProperties, "PROSODY_KAFKA_CONFIG", None;
    /// librdkafka properties for the consumers only (after `kafka_config`).
    consumer_kafka_config: KafkaProperties, "PROSODY_CONSUMER_KAFKA_CONFIG", None;
    /// librdkafka properties for the producers only (after `kafka_config`).
    producer_kafka_config: KafkaProperties, "PROSODY_PRODUCER_KAFKA_CONFIG", None;

    // --- Consumer
    /// Handler calls running at once, across all partitions.
    max_concurrency: NonZeroU64, "PROSODY_MAX_CONCURRENCY", Some("32");
    /// Messages per partition held by the engine before it stops reading that partition.
    max_uncommitted: NonZeroU64, "PROSODY_MAX_UNCOMMITTED", Some("64");
    /// Records librdkafka may prefetch for this client, shared by the partitions of its
    /// subscribed topics (librdkafka's `queued.min.messages` per partition, at least
    /// [`crate::kafka::MIN_PREFETCH`]).
    prefetch_records: NonZeroU64, "PROSODY_PREFETCH_RECORDS", Some("64000");
    /// Handler deadline; defaults to 80% of `stall_threshold`.
    timeout: Option<Duration>, "PROSODY_TIMEOUT", None;
    /// How often finished offsets are committed.
    commit_interval: Duration, "PROSODY_COMMIT_INTERVAL", Some("1s");
    /// Longest the poll thread waits for news before checking its duties again.
    poll_interval: Duration, "PROSODY_POLL_INTERVAL", Some("100ms");
    /// Budget for draining in-flight handlers on unsubscribe and revoke.
    shutdown_timeout: Duration, "PROSODY_SHUTDOWN_TIMEOUT", Some("30s");
    /// A partition whose oldest unfinished event is older than this is stalled.
    stall_threshold: Duration, "PROSODY_STALL_THRESHOLD", Some("5m");
    /// Port of the HTTP probe server (`/readyz`, `/livez`, `/metrics`); off in mock mode
    /// unless given.
    probe_port: Port, "PROSODY_PROBE_PORT", Some("8000");
    /// Address the probe server binds (an IP address).
    probe_host: String, "PROSODY_PROBE_HOST", Some("0.0.0.0");
    /// Dead-letter topic.
    failure_topic: Option<String>, "PROSODY_FAILURE_TOPIC", None;
    /// Dedup cache capacity (0 disables deduplication).
    idempotence_cache_size: u64, "PROSODY_IDEMPOTENCE_CACHE_SIZE", Some("8192");
    /// Version mixed into dedup hashes.
    idempotence_version: String, "PROSODY_IDEMPOTENCE_VERSION", Some("1");
    /// Retention of dedup records in Cassandra.
    idempotence_ttl: Duration, "PROSODY_IDEMPOTENCE_TTL", Some("7d");
    /// Timer storage granularity.
    slab_size: Duration, "PROSODY_SLAB_SIZE", Some("1h");
    /// Span linking for message execution.
    message_spans: SpanLinking, "PROSODY_MESSAGE_SPANS", Some("child");
    /// Span linking for timer execution.
    timer_spans: SpanLinking, "PROSODY_TIMER_SPANS", Some("follows_from");

    // --- Producer
    /// Longest `send_message` waits for the broker's acknowledgement.
    send_timeout: Duration, "PROSODY_SEND_TIMEOUT", Some("1s");

    // --- Retry
    /// Retries after the first attempt.
    max_retries: u64, "PROSODY_MAX_RETRIES", Some("3");
    /// First retry delay.
    retry_base: Duration, "PROSODY_RETRY_BASE", Some("20ms");
    /// Longest retry delay.
    max_retry_delay: Duration, "PROSODY_RETRY_MAX_DELAY", Some("5m");

    // --- Deferral
    /// Defer failing keys to timers.
    defer_enabled: bool, "PROSODY_DEFER_ENABLED", Some("true");
    /// First deferred retry delay.
    defer_base: Duration, "PROSODY_DEFER_BASE", Some("1s");
    /// Longest deferred retry delay.
    defer_max_delay: Duration, "PROSODY_DEFER_MAX_DELAY", Some("24h");
    /// Failure rate above which deferral switches off.
    defer_failure_threshold: f64, "PROSODY_DEFER_FAILURE_THRESHOLD", Some("0.9");
    /// Window for the failure rate.
    defer_failure_window: Duration, "PROSODY_DEFER_FAILURE_WINDOW", Some("5m");
    /// Deferred keys tracked in memory.
    defer_cache_size: u64, "PROSODY_DEFER_CACHE_SIZE", Some("1024");
    /// Timeout when reloading deferred messages.
    defer_seek_timeout: Duration, "PROSODY_DEFER_SEEK_TIMEOUT", Some("30s");
    /// Read optimisation for deferred reloads.
    defer_discard_threshold: u64, "PROSODY_DEFER_DISCARD_THRESHOLD", Some("100");
    /// Deferred retries of one message before it goes to the failure topic (or is logged and
    /// skipped); none: retry until it succeeds.
    defer_max_retries: Option<NonZeroU64>, "PROSODY_DEFER_MAX_RETRIES", None;

    // --- Monopolization
    /// Reject keys that use most of the handler time.
    monopolization_enabled: bool, "PROSODY_MONOPOLIZATION_ENABLED", Some("true");
    /// Fraction of the window above which a key is rejected.
    monopolization_threshold: f64, "PROSODY_MONOPOLIZATION_THRESHOLD", Some("0.9");
    /// Measurement window.
    monopolization_window: Duration, "PROSODY_MONOPOLIZATION_WINDOW", Some("5m");
    /// Keys tracked.
    monopolization_cache_size: u64, "PROSODY_MONOPOLIZATION_CACHE_SIZE", Some("8192");

    // --- Fair scheduling
    /// Share of handler time for retries while fresh work waits.
    scheduler_failure_weight: f64, "PROSODY_SCHEDULER_FAILURE_WEIGHT", Some("0.3");
    /// Wait after which an event gets the maximum boost.
    scheduler_max_wait: Duration, "PROSODY_SCHEDULER_MAX_WAIT", Some("2m");
    /// Size of the maximum wait boost.
    scheduler_wait_weight: f64, "PROSODY_SCHEDULER_WAIT_WEIGHT", Some("200.0");
    /// Keys tracked by the scheduler.
    scheduler_cache_size: NonZeroU64, "PROSODY_SCHEDULER_CACHE_SIZE", Some("8192");

    // --- Cassandra
    /// Cassandra contact points (host:port).
    cassandra_nodes: Vec<String>, "PROSODY_CASSANDRA_NODES", None;
    /// Keyspace.
    cassandra_keyspace: String, "PROSODY_CASSANDRA_KEYSPACE", Some("prosody");
    /// User name.
    cassandra_user: Option<String>, "PROSODY_CASSANDRA_USER", None;
    /// Password (never logged).
    cassandra_password: Option<Secret>, "PROSODY_CASSANDRA_PASSWORD", None;
    /// Preferred datacenter.
    cassandra_datacenter: Option<String>, "PROSODY_CASSANDRA_DATACENTER", None;
    /// Preferred rack.
    cassandra_rack: Option<String>, "PROSODY_CASSANDRA_RACK", None;
    /// Retention of stored rows.
    cassandra_retention: Duration, "PROSODY_CASSANDRA_RETENTION", Some("1y");
    /// Replication of the keyspace when Prosody creates it, as a CQL map.
    cassandra_replication: String, "PROSODY_CASSANDRA_REPLICATION", Some("{'class': 'SimpleStrategy', 'replication_factor': 1}");

    // --- Telemetry emitter
    /// Topic for internal telemetry events.
    telemetry_topic: String, "PROSODY_TELEMETRY_TOPIC", Some("prosody.telemetry-events");
    /// Whether the telemetry emitter runs.
    telemetry_enabled: bool, "PROSODY_TELEMETRY_ENABLED", Some("true");
}

/// A string that never shows in `Debug` output, logs or errors.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[REDACTED]")
    }
}

impl OptionType for Secret {
    fn expected() -> String {
        "a String".into()
    }
    fn from_raw(raw: &RawValue) -> Option<Self> {
        match raw {
            RawValue::Str(s) => Some(Secret(s.clone())),
            _ => None,
        }
    }
    fn from_env(s: &str) -> Option<Self> {
        Some(Secret(s.to_owned()))
    }
    fn secret() -> bool {
        true
    }
}

impl Config {
    /// Resolves the configuration from explicit values and the process environment.
    pub fn resolve(explicit: Vec<(String, RawValue)>) -> Result<Self, ConfigError> {
        for option in OPTIONS {
            if let Err(std::env::VarError::NotUnicode(value)) = std::env::var(option.env) {
                return Err(ConfigError::InvalidEnv {
                    env: option.env,
                    expected: "valid UTF-8".into(),
                    got: if is_secret(option.name) {
                        HIDDEN.into()
                    } else {
                        value.to_string_lossy().into_owned()
                    },
                });
            }
        }
        Self::resolve_with_env(explicit, &|name| std::env::var(name).ok())
    }

    /// Resolves with a custom environment lookup (tests use this).
    pub fn resolve_with_env(
        explicit: Vec<(String, RawValue)>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let mut map = BTreeMap::new();
        for (key, value) in explicit {
            if !OPTIONS.iter().any(|o| o.name == key) {
                let valid: Vec<&str> = OPTIONS.iter().map(|o| o.name).collect();
                return Err(ConfigError::UnknownOption {
                    name: key,
                    valid: valid.join(", "),
                });
            }
            map.insert(key, value);
        }
        let mut sources = Sources {
            explicit: map,
            env,
            set: Vec::new(),
            from_env: Vec::new(),
        };
        let config = Self::from_sources(&mut sources)?;
        config.validate()?;
        Ok(config)
    }

    /// An out-of-range value of `name`, reported against its environment variable when that is
    /// where it came from.
    fn invalid(&self, name: &'static str, expected: impl Into<String>, got: String) -> ConfigError {
        let expected = expected.into();
        match OPTIONS.iter().find(|o| o.name == name) {
            Some(o) if self.env_options.contains(&name) => ConfigError::InvalidEnv {
                env: o.env,
                expected,
                got,
            },
            _ => ConfigError::InvalidOption {
                name,
                expected,
                got,
            },
        }
    }

    /// TLS and SASL options that only make sense together, files that must exist, and the
    /// librdkafka properties (see [`crate::kafka::settings::check`]).
    fn validate_security(&self) -> Result<(), ConfigError> {
        // `needed` is missing although `by` is set.
        let pair = |by: &'static str, set: bool, needed: &'static str, has: bool| {
            if !set || has {
                return Ok(());
            }
            let env = OPTIONS
                .iter()
                .find(|o| o.name == needed)
                .map_or("", |o| o.env);
            let why = match by {
                "sasl_mechanism" => "sasl_mechanism is set",
                "sasl_username" | "sasl_password" => "SASL credentials are set",
                "ssl_certificate_location" => "ssl_certificate_location is set",
                _ => "a client key is set",
            };
            Err(ConfigError::Missing {
                name: needed,
                env,
                why,
            })
        };
        let mechanism = self.sasl_mechanism.is_some();
        let (user, password) = (self.sasl_username.is_some(), self.sasl_password.is_some());
        pair("sasl_mechanism", mechanism, "sasl_username", user)?;
        pair("sasl_mechanism", mechanism, "sasl_password", password)?;
        pair("sasl_username", user, "sasl_mechanism", mechanism)?;
        pair("sasl_password", password, "sasl_mechanism", mechanism)?;
        let (cert, key) = (
            self.ssl_certificate_location.is_some(),
            self.ssl_key_location.is_some(),
        );
        pair("ssl_certificate_location", cert, "ssl_key_location", key)?;
        pair("ssl_key_location", key, "ssl_certificate_location", cert)?;
        pair(
            "ssl_key_password",
            self.ssl_key_password.is_some(),
            "ssl_key_location",
            key,
        )?;
        for (name, path) in [
            ("ssl_ca_location", &self.ssl_ca_location),
            ("ssl_certificate_location", &self.ssl_certificate_location),
            ("ssl_key_location", &self.ssl_key_location),
        ] {
            let Some(path) = path else { continue };
            if name == "ssl_ca_location" && path == "probe" {
                continue;
            }
            if let Err(e) = std::fs::File::open(path) {
                return Err(self.invalid(
                    name,
                    format!("a readable PEM file ({e})"),
                    format!("{path:?}"),
                ));
            }
        }
        crate::kafka::settings::check(self)
            .map_err(|(name, expected, got)| self.invalid(name, expected, got))
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let positive = |name: &'static str, d: Duration| {
            if d.is_zero() {
                Err(self.invalid(name, "a duration > 0", "0".into()))
            } else {
                Ok(())
            }
        };
        self.validate_security()?;
        if self.probe_host.trim().parse::<std::net::IpAddr>().is_err() {
            return Err(self.invalid(
                "probe_host",
                "an IP address such as 0.0.0.0 or 127.0.0.1",
                format!("{:?}", self.probe_host),
            ));
        }
        positive("commit_interval", self.commit_interval)?;
        positive("poll_interval", self.poll_interval)?;
        positive("send_timeout", self.send_timeout)?;
        positive("shutdown_timeout", self.shutdown_timeout)?;
        positive("slab_size", self.slab_size)?;
        positive("stall_threshold", self.stall_threshold)?;
        positive("retry_base", self.retry_base)?;
        positive("max_retry_delay", self.max_retry_delay)?;
        positive("scheduler_max_wait", self.scheduler_max_wait)?;
        // Cassandra's TTLs are whole seconds, at most 20 years.
        let ttl = self.idempotence_ttl;
        if ttl < Duration::from_secs(1) || ttl.as_secs() > crate::dedup::cassandra::MAX_TTL_SECONDS
        {
            return Err(self.invalid(
                "idempotence_ttl",
                "a duration from 1 second to 20 years",
                format!("{ttl:?}"),
            ));
        }
        if let Some(timeout) = self.timeout {
            positive("timeout", timeout)?;
        }
        // librdkafka's message.timeout.ms is a 32-bit count of milliseconds.
        if self.send_timeout > MAX_SEND_TIMEOUT {
            return Err(self.invalid(
                "send_timeout",
                format!(
                    "a duration of at most {} seconds",
                    MAX_SEND_TIMEOUT.as_secs()
                ),
                format!("{:?}", self.send_timeout),
            ));
        }
        if !(self.scheduler_wait_weight.is_finite() && self.scheduler_wait_weight >= 0.0) {
            return Err(self.invalid(
                "scheduler_wait_weight",
                "a number >= 0",
                self.scheduler_wait_weight.to_string(),
            ));
        }
        if self.mode == Mode::LowLatency && self.failure_topic.is_none() {
            return Err(ConfigError::Missing {
                name: "failure_topic",
                env: "PROSODY_FAILURE_TOPIC",
                why: "mode :low_latency sends messages that keep failing to the failure topic",
            });
        }
        for (name, value) in [
            ("defer_failure_threshold", self.defer_failure_threshold),
            ("monopolization_threshold", self.monopolization_threshold),
            ("scheduler_failure_weight", self.scheduler_failure_weight),
        ] {
            if !(0.0..=1.0).contains(&value) {
                return Err(self.invalid(name, "a fraction from 0.0 to 1.0", value.to_string()));
            }
        }
        if !self.mock && self.bootstrap_servers.as_ref().is_none_or(Vec::is_empty) {
            return Err(ConfigError::Missing {
                name: "bootstrap_servers",
                env: "PROSODY_BOOTSTRAP_SERVERS",
                why: "Kafka servers are needed unless mock: true",
            });
        }
        Ok(())
    }

    /// The `source-system` header value: `source_system`, else `group_id`, else `"prosody"`.
    pub fn effective_source_system(&self) -> &str {
        self.source_system
            .as_deref()
            .or(self.group_id.as_deref())
            .unwrap_or("prosody")
    }

    /// Whether the telemetry emitter runs: `telemetry_enabled` on a real cluster; in mock mode
    /// only when `telemetry_enabled` (or its variable) says `true` explicitly, so that specs
    /// see the telemetry topic only when they ask for it.
    pub fn effective_telemetry(&self) -> bool {
        self.telemetry_enabled && (!self.mock || self.set_options.contains(&"telemetry_enabled"))
    }

    /// Where the probe server listens: `probe_host`:`probe_port` when the port is set; in mock
    /// mode only when `probe_port` (or its variable) was given, so that specs start no server
    /// unless they ask for one.
    pub fn effective_probe(&self) -> Option<std::net::SocketAddr> {
        let port = self.probe_port.0?;
        if self.mock && !self.set_options.contains(&"probe_port") {
            return None;
        }
        let host: std::net::IpAddr = self.probe_host.trim().parse().ok()?;
        Some(std::net::SocketAddr::new(host, port))
    }

    /// The handler timeout: `timeout`, else 80% of `stall_threshold`.
    pub fn effective_timeout(&self) -> Duration {
        self.timeout
            .unwrap_or_else(|| self.stall_threshold.mul_f64(0.8))
            .max(Duration::from_millis(1))
    }

    /// Whether this client can consume: it needs a group and at least one topic.
    pub fn can_consume(&self) -> bool {
        self.group_id.is_some() && !self.subscribed_topics.is_empty()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_schedulers_hand_made_defaults_are_the_tables() {
        let config =
            Config::resolve_with_env(vec![("mock".into(), RawValue::Bool(true))], &|_| None)
                .unwrap();
        assert_eq!(
            crate::scheduler::FairConfig::from_config(&config),
            crate::scheduler::FairConfig::default()
        );
    }

    use super::*;

    fn resolve(explicit: &[(&str, RawValue)], env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let lookup = move |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        Config::resolve_with_env(
            explicit
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
            &lookup,
        )
    }

    fn mock() -> (&'static str, RawValue) {
        ("mock", RawValue::Bool(true))
    }

    #[test]
    fn explicit_beats_env_beats_default() {
        let c = resolve(&[mock()], &[]).unwrap();
        assert_eq!(c.max_concurrency.get(), 32);
        assert_eq!(c.commit_interval, Duration::from_secs(1));
        let c = resolve(&[mock()], &[("PROSODY_MAX_CONCURRENCY", "7")]).unwrap();
        assert_eq!(c.max_concurrency.get(), 7);
        let c = resolve(
            &[mock(), ("max_concurrency", RawValue::Int(3))],
            &[("PROSODY_MAX_CONCURRENCY", "7")],
        )
        .unwrap();
        assert_eq!(c.max_concurrency.get(), 3);
        let c = resolve(
            &[mock(), ("max_concurrency", RawValue::Nil)],
            &[("PROSODY_MAX_CONCURRENCY", "7")],
        )
        .unwrap();
        assert_eq!(c.max_concurrency.get(), 7, "nil means unset");
    }

    #[test]
    fn durations_and_lists() {
        assert_eq!(parse_duration("100ms"), Some(Duration::from_millis(100)));
        assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("604800"), Some(Duration::from_secs(604_800)));
        assert_eq!(parse_duration("5 parsecs"), None);
        let c = resolve(
            &[
                mock(),
                ("poll_interval", RawValue::Float(0.25)),
                ("subscribed_topics", RawValue::Str("a, b,,c".into())),
            ],
            &[("PROSODY_SHUTDOWN_TIMEOUT", "2m")],
        )
        .unwrap();
        assert_eq!(c.poll_interval, Duration::from_millis(250));
        assert_eq!(c.shutdown_timeout, Duration::from_secs(120));
        assert_eq!(c.subscribed_topics, vec!["a", "b", "c"]);
    }

    #[test]
    fn errors_name_the_option_or_variable() {
        let e = resolve(&[mock(), ("max_concurency", RawValue::Int(1))], &[]).unwrap_err();
        assert!(
            e.to_string().contains("unknown option :max_concurency"),
            "{e}"
        );
        assert!(e.to_string().contains("max_concurrency"), "{e}");
        let e = resolve(&[mock(), ("max_concurrency", RawValue::Int(0))], &[]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid :max_concurrency, expected an Integer >= 1, got 0"
        );
        let e = resolve(&[mock()], &[("PROSODY_COMMIT_INTERVAL", "soon")]).unwrap_err();
        assert!(
            e.to_string().starts_with("invalid PROSODY_COMMIT_INTERVAL"),
            "{e}"
        );
        let e = resolve(&[mock(), ("mode", RawValue::Str("fast".into()))], &[]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid :mode, expected one of :pipeline, :low_latency, :best_effort, got \"fast\""
        );
        let e = resolve(&[], &[]).unwrap_err();
        assert!(e.to_string().contains("bootstrap_servers"), "{e}");
    }

    #[test]
    fn durations_are_bounded_and_errors_name_the_source() {
        let e = resolve(&[mock(), ("commit_interval", RawValue::Float(1e19))], &[]).unwrap_err();
        assert!(e.to_string().starts_with("invalid :commit_interval, expected a duration: Numeric seconds from 0 to 3155760000"), "{e}");
        let e = resolve(&[mock()], &[("PROSODY_SHUTDOWN_TIMEOUT", "200y")]).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("invalid PROSODY_SHUTDOWN_TIMEOUT"),
            "{e}"
        );
        let e = resolve(&[mock()], &[("PROSODY_SHUTDOWN_TIMEOUT", "0")]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid PROSODY_SHUTDOWN_TIMEOUT, expected a duration > 0, got \"0\""
        );
        let c = resolve(
            &[mock(), ("commit_interval", RawValue::Str("100y".into()))],
            &[],
        )
        .unwrap();
        assert_eq!(c.commit_interval, Duration::from_secs(100 * 31_536_000));
        let e = resolve(&[mock()], &[("PROSODY_SCHEDULER_FAILURE_WEIGHT", "2")]).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("invalid PROSODY_SCHEDULER_FAILURE_WEIGHT"),
            "{e}"
        );
        let e = resolve(
            &[mock(), ("cassandra_nodes", RawValue::Str(" ".into()))],
            &[],
        )
        .unwrap_err();
        assert!(e.to_string().starts_with("invalid :cassandra_nodes"), "{e}");
    }

    #[test]
    fn secrets_stay_hidden() {
        let c = resolve(
            &[
                mock(),
                ("cassandra_password", RawValue::Str("hunter2".into())),
                ("probe_port", RawValue::Bool(false)),
            ],
            &[],
        )
        .unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
        let e = resolve(
            &[
                mock(),
                (
                    "cassandra_password",
                    RawValue::List(vec![RawValue::Str("hunter2".into())]),
                ),
            ],
            &[],
        )
        .unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
        assert!(is_secret("cassandra_password") && !is_secret("group_id"));
        assert_eq!(c.probe_port, Port(None));
        assert_eq!(c.effective_source_system(), "prosody");
    }

    fn map(entries: &[(&str, RawValue)]) -> RawValue {
        RawValue::Map(
            entries
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
        )
    }

    #[test]
    fn kafka_config_reaches_both_sides_after_security_and_one_side_after_it() {
        let c = resolve(
            &[
                mock(),
                ("sasl_mechanism", RawValue::Str("scram-sha-512".into())),
                ("sasl_username", RawValue::Str("u".into())),
                ("sasl_password", RawValue::Str("p".into())),
                (
                    "kafka_config",
                    map(&[
                        ("fetch.min.bytes", RawValue::Int(2)),
                        ("socket.keepalive.enable", RawValue::Bool(true)),
                    ]),
                ),
            ],
            &[(
                "PROSODY_CONSUMER_KAFKA_CONFIG",
                r#"{"auto.offset.reset": "latest"}"#,
            )],
        )
        .unwrap();
        use crate::kafka::settings::{properties, Side};
        let consumer = properties(&c, Side::Consumer);
        let has = |props: &[(String, String)], k: &str, v: &str| {
            props.iter().any(|(a, b)| a == k && b == v)
        };
        assert!(
            has(&consumer, "security.protocol", "sasl_ssl"),
            "{consumer:?}"
        );
        assert!(has(&consumer, "sasl.mechanisms", "SCRAM-SHA-512"));
        assert!(has(&consumer, "fetch.min.bytes", "2"));
        assert!(has(&consumer, "socket.keepalive.enable", "true"));
        assert!(has(&consumer, "auto.offset.reset", "latest"));
        let producer = properties(&c, Side::Producer);
        assert!(!has(&producer, "auto.offset.reset", "latest"));
        assert!(has(&producer, "fetch.min.bytes", "2"));
    }

    #[test]
    fn owned_and_unknown_properties_are_refused_naming_the_option() {
        let owned = resolve(
            &[
                mock(),
                (
                    "producer_kafka_config",
                    map(&[("enable.idempotence", RawValue::Bool(false))]),
                ),
            ],
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            owned.starts_with("invalid :producer_kafka_config"),
            "{owned}"
        );
        assert!(owned.contains("enable.idempotence"), "{owned}");
        let unknown = resolve(
            &[mock()],
            &[("PROSODY_KAFKA_CONFIG", r#"{"no.such.thing": "1"}"#)],
        )
        .unwrap_err()
        .to_string();
        assert!(
            unknown.starts_with("invalid PROSODY_KAFKA_CONFIG"),
            "{unknown}"
        );
        assert!(
            unknown.contains("No such configuration property"),
            "{unknown}"
        );
    }

    #[test]
    fn secret_properties_never_show() {
        let bad = resolve(
            &[
                mock(),
                (
                    "kafka_config",
                    map(&[
                        ("sasl.password", RawValue::Str("hunter2".into())),
                        ("x", RawValue::List(vec![])),
                    ]),
                ),
            ],
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(!bad.contains("hunter2"), "{bad}");
        let refused = resolve(
            &[
                mock(),
                (
                    "kafka_config",
                    map(&[("ssl.key.password", RawValue::Str("hunter2".into()))]),
                ),
                (
                    "consumer_kafka_config",
                    map(&[("fetch.min.bytes", RawValue::Str("x".into()))]),
                ),
            ],
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(!refused.contains("hunter2"), "{refused}");
        let c = resolve(
            &[
                mock(),
                (
                    "kafka_config",
                    map(&[("sasl.password", RawValue::Str("hunter2".into()))]),
                ),
                ("ssl_key_password", RawValue::Str("hunter3".into())),
            ],
            &[],
        );
        // ssl_key_password alone lacks its key: refused, without the value.
        let e = c.unwrap_err().to_string();
        assert!(e.starts_with("missing :ssl_key_location"), "{e}");
        let c = resolve(
            &[
                mock(),
                (
                    "kafka_config",
                    map(&[("sasl.password", RawValue::Str("hunter2".into()))]),
                ),
            ],
            &[],
        )
        .unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn sasl_and_tls_options_come_in_pairs() {
        let e = resolve(&[mock(), ("sasl_username", RawValue::Str("u".into()))], &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("missing :sasl_mechanism: SASL credentials are set"),
            "{e}"
        );
        let e = resolve(
            &[mock(), ("sasl_mechanism", RawValue::Str("MD5".into()))],
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains(r#"one of "PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512""#),
            "{e}"
        );
        let e = resolve(
            &[
                mock(),
                (
                    "ssl_certificate_location",
                    RawValue::Str("/etc/hostname".into()),
                ),
            ],
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("missing :ssl_key_location"), "{e}");
        let e = resolve(
            &[
                mock(),
                ("ssl_ca_location", RawValue::Str("/no/such.pem".into())),
            ],
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("invalid :ssl_ca_location, expected a readable PEM file"),
            "{e}"
        );
        assert!(resolve(
            &[mock(), ("ssl_ca_location", RawValue::Str("probe".into()))],
            &[]
        )
        .is_ok());
    }
}
