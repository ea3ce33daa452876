//! Engine log records, buffered and handed to `Prosody.logger` in batches by a Ruby thread.
//!
//! The engine is instrumented with `tracing`; this module installs the process's subscriber: a
//! registry with one layer ([`RubyLayer`]) that turns the engine's events (and the `log` records
//! of dependencies, through `tracing-log`) into log lines. Engine threads never call Ruby: they
//! push a line and, when the buffer was empty, wake the Ruby log thread through a pipe. The
//! buffer is bounded; when Ruby falls behind, the oldest lines are dropped and the drop is
//! reported.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Mutex, OnceLock};

use magnus::{function, Error, RArray, RModule, Ruby};
use tracing::field::{Field, Visit};
use tracing::subscriber::Interest;
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

use crate::ruby::pipe::WakePipe;

/// Records kept while Ruby is busy.
const CAPACITY: usize = 10_000;

struct Buffer {
    records: VecDeque<(u8, String)>,
    dropped: usize,
}

pub struct RubyLogger {
    buffer: Mutex<Buffer>,
    pipe: WakePipe,
}

/// Installed once for the process (a documented static): there is one global subscriber.
static LOGGER: OnceLock<Option<&'static RubyLogger>> = OnceLock::new();

/// The least Ruby `Logger` severity that is kept (`Prosody.logger`'s level); 5 keeps nothing.
static THRESHOLD: AtomicU8 = AtomicU8::new(1);

/// Ruby `Logger` severities.
fn severity(level: Level) -> u8 {
    match level {
        Level::ERROR => 3,
        Level::WARN => 2,
        Level::INFO => 1,
        Level::DEBUG | Level::TRACE => 0,
    }
}

/// Whether events of `target` are Prosody's: the engine's own, librdkafka's lines, the rdkafka
/// crate's records, and the OpenTelemetry SDK's and exporter's (a failed span export) — the
/// other dependencies' events, e.g. the Cassandra driver's, are not shown.
fn shown(target: &str) -> bool {
    ["prosody", "librdkafka", "rdkafka", "opentelemetry"]
        .iter()
        .any(|prefix| target.starts_with(prefix))
}

/// The layer that turns events into `Prosody.logger` lines.
struct RubyLayer(&'static RubyLogger);

/// Collects an event's message, its `log` target (for records from the `log` crate), and its
/// other fields as ` name=value`.
#[derive(Default)]
struct Line {
    message: String,
    log_target: Option<String>,
    fields: String,
}

impl Visit for Line {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "log.target" => self.log_target = Some(value.to_owned()),
            "message" => self.message.push_str(value),
            name if name.starts_with("log.") => {}
            name => {
                let _ = write!(self.fields, " {name}={value}");
            }
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "message" => {
                let _ = write!(self.message, "{value:?}");
            }
            name if name.starts_with("log.") => {}
            name => {
                let _ = write!(self.fields, " {name}={value:?}");
            }
        }
    }
}

impl<S: Subscriber> Layer<S> for RubyLayer {
    fn register_callsite(&self, _: &'static Metadata<'static>) -> Interest {
        // `Prosody.logger`'s level can change at any time: ask `enabled` every time.
        Interest::sometimes()
    }

    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        // Lets a disabled event cost one comparison, as with `log`; `set_log_level` rebuilds
        // the cached hint when the level changes.
        use tracing::level_filters::LevelFilter;
        Some(match THRESHOLD.load(Ordering::Relaxed) {
            0 => LevelFilter::DEBUG,
            1 => LevelFilter::INFO,
            2 => LevelFilter::WARN,
            3 => LevelFilter::ERROR,
            _ => LevelFilter::OFF,
        })
    }

    fn enabled(&self, metadata: &Metadata<'_>, _: Context<'_, S>) -> bool {
        severity(*metadata.level()) >= THRESHOLD.load(Ordering::Relaxed) && shown(metadata.target())
    }

    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let mut line = Line::default();
        event.record(&mut line);
        let target = line
            .log_target
            .as_deref()
            .unwrap_or_else(|| event.metadata().target());
        let target = target.strip_prefix("prosody_core::").unwrap_or(target);
        let text = format!("[{target}] {}{}", line.message, line.fields);
        self.0.push(severity(*event.metadata().level()), text);
    }
}

impl RubyLogger {
    fn push(&self, severity: u8, line: String) {
        let wake = {
            let Ok(mut buffer) = self.buffer.lock() else {
                return;
            };
            let was_empty = buffer.records.is_empty();
            if buffer.records.len() >= CAPACITY {
                buffer.records.pop_front();
                buffer.dropped += 1;
            }
            buffer.records.push_back((severity, line));
            was_empty
        };
        if wake {
            self.pipe.wake();
        }
    }
}

/// Installs the subscriber (and the `log` bridge) on first use.
pub fn ensure_installed() -> Option<&'static RubyLogger> {
    *LOGGER.get_or_init(|| {
        let pipe = WakePipe::new().ok()?;
        let logger: &'static RubyLogger = Box::leak(Box::new(RubyLogger {
            buffer: Mutex::new(Buffer {
                records: VecDeque::new(),
                dropped: 0,
            }),
            pipe,
        }));
        let subscriber = tracing_subscriber::registry().with(RubyLayer(logger));
        tracing::subscriber::set_global_default(subscriber).ok()?;
        tracing_log::LogTracer::init().ok()?;
        set_log_level(i64::from(THRESHOLD.load(Ordering::Relaxed)));
        Some(logger)
    })
}

/// The pipe the Ruby log thread waits on.
fn log_fd() -> Option<i32> {
    ensure_installed().map(|l| l.pipe.read_fd())
}

/// Pending records as `[[severity, line], ...]`.
fn drain_logs(ruby: &Ruby) -> Result<RArray, Error> {
    let Some(logger) = ensure_installed() else {
        return Ok(ruby.ary_new());
    };
    logger.pipe.clear();
    let (records, dropped) = match logger.buffer.lock() {
        Ok(mut b) => (
            std::mem::take(&mut b.records),
            std::mem::take(&mut b.dropped),
        ),
        Err(_) => return Ok(ruby.ary_new()),
    };
    let out = ruby.ary_new_capa(records.len() + 1);
    if dropped > 0 {
        out.push((
            2u8,
            format!("[prosody] {dropped} log records were dropped while Ruby was busy"),
        ))?;
    }
    for record in records {
        out.push(record)?;
    }
    Ok(out)
}

/// Sets the most verbose level the engine produces, from a Ruby `Logger` severity.
fn set_log_level(level: i64) {
    let threshold = match level {
        i64::MIN..=0 => 0,
        1 => 1,
        2 => 2,
        3 | 4 => 3,
        _ => 5,
    };
    THRESHOLD.store(threshold, Ordering::Relaxed);
    tracing::callsite::rebuild_interest_cache();
    // The `log` bridge filters before converting a record: the same level.
    log::set_max_level(match threshold {
        0 => log::LevelFilter::Debug,
        1 => log::LevelFilter::Info,
        2 => log::LevelFilter::Warn,
        3 => log::LevelFilter::Error,
        _ => log::LevelFilter::Off,
    });
}

/// Sends every panic of an engine thread to `Prosody.logger` (Rust prints them to stderr by
/// default, where nobody looks), naming the thread. What a panic then means is handled where it
/// is caught: a dead poll thread or worker marks its subscription failed.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let line = format!(
            "panic in thread {}{at}: {}",
            thread.name().unwrap_or("unnamed"),
            prosody_core::engine::panic_message(info.payload())
        );
        if ensure_installed().is_some() {
            tracing::error!(target: "prosody::panic", "{line}");
        } else {
            eprintln!("prosody: {line}");
        }
    }));
}

pub fn init(_ruby: &Ruby, native: RModule) -> Result<(), Error> {
    install_panic_hook();
    native.define_module_function("log_fd", function!(log_fd, 0))?;
    native.define_module_function("drain_logs", function!(drain_logs, 0))?;
    native.define_module_function("log_level=", function!(set_log_level, 1))?;
    Ok(())
}
