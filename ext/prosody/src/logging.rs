//! Engine log records, buffered and handed to `Prosody.logger` in batches by a Ruby thread.
//!
//! Engine threads never call Ruby: they push a record and, when the buffer was empty, wake the
//! Ruby log thread through a pipe. The buffer is bounded; when Ruby falls behind, the oldest
//! records are dropped and the drop is reported.

use std::collections::VecDeque;
use std::sync::{Mutex, OnceLock};

use log::{Level, LevelFilter, Log, Metadata, Record};
use magnus::{function, Error, RArray, RModule, Ruby};

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

/// Installed once for the process (a documented static): `log` allows one global logger.
static LOGGER: OnceLock<Option<&'static RubyLogger>> = OnceLock::new();

/// Ruby `Logger` severities.
fn severity(level: Level) -> u8 {
    match level {
        Level::Error => 3,
        Level::Warn => 2,
        Level::Info => 1,
        Level::Debug | Level::Trace => 0,
    }
}

impl Log for RubyLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let target = record.target();
        let target = target.strip_prefix("prosody_core::").unwrap_or(target);
        let line = format!("[{target}] {}", record.args());
        let wake = {
            let Ok(mut buffer) = self.buffer.lock() else {
                return;
            };
            let was_empty = buffer.records.is_empty();
            if buffer.records.len() >= CAPACITY {
                buffer.records.pop_front();
                buffer.dropped += 1;
            }
            buffer.records.push_back((severity(record.level()), line));
            was_empty
        };
        if wake {
            self.pipe.wake();
        }
    }

    fn flush(&self) {}
}

/// Installs the logger on first use.
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
        log::set_logger(logger).ok()?;
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
    log::set_max_level(match level {
        i64::MIN..=0 => LevelFilter::Debug,
        1 => LevelFilter::Info,
        2 => LevelFilter::Warn,
        3 | 4 => LevelFilter::Error,
        _ => LevelFilter::Off,
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
            log::error!(target: "prosody::panic", "{line}");
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
