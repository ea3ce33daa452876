//! The engine without Ruby: how fast Prosody's consumer path runs when the handler costs nothing.
//!
//! On the in-process mock cluster, fills a topic (PARTITIONS partitions, COUNT messages over
//! 1,000 keys, the consume benchmark's payloads), then alternates ROUNDS times:
//! - a raw librdkafka consumer (the settings of `raw_consumer`), counting messages;
//! - a Prosody client (mock mode, defaults otherwise) drained by one runner thread that takes each
//!   job from the scheduler and completes it at once, the way a Ruby processor thread pulls
//!   (outcomes flushed to the partition workers in batches of up to 8, as the Ruby bridge does).
//!
//! Prints each rate, the process's CPU per message while the engine ran, and the ratio of the
//! bests. The process allocates with mimalloc, as the Ruby extension does.
//!
//! `cargo run --release -p prosody-core --example engine_alone [COUNT] [PARTITIONS] [ROUNDS]`
//! (`make bench` runs it with 4 partitions).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prosody_core::client::Client;
use prosody_core::config::{Config, RawValue};
use prosody_core::handler::{Outcome, Relay};
use prosody_core::scheduler::{Scheduler, Take};
use prosody_core::testing::RawProducer;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};

/// The extension's allocator (see `ext/prosody/src/lib.rs`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const KEYS: usize = 1_000;
/// Outcomes buffered before one flush, as in the Ruby bridge.
const FLUSH_AT: usize = 8;
const LIMIT: Duration = Duration::from_secs(120);

fn main() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let mut arg = |default: usize| -> Result<usize, String> {
        args.next().map_or(Ok(default), |a| {
            a.parse().map_err(|e| format!("{a:?}: {e}"))
        })
    };
    let count = arg(200_000)?;
    let partitions = arg(4)?;
    let rounds = arg(3)?;
    let mock = prosody_core::kafka::mock::shared().map_err(|e| e.to_string())?;
    let bootstrap = mock.bootstrap_servers().to_owned();
    let topic = format!("engine-alone-{}", std::process::id());
    mock.ensure_topic(&topic, partitions as u64)
        .map_err(|e| e.to_string())?;
    let producer = RawProducer::new(&bootstrap).map_err(|e| e.to_string())?;
    for i in 0..count {
        let key = format!("k{}", i % KEYS);
        let payload = format!("{{\"id\":{i},\"ok\":true}}");
        producer.produce(
            &topic,
            None,
            Some(key.as_bytes()),
            Some(payload.as_bytes()),
            &[],
        )?;
    }
    producer.flush(LIMIT)?;

    println!(
        "Prosody engine alone (mock cluster, {count} messages, {partitions} partition(s), one \
         runner completing each job at once)"
    );
    let (mut best_raw, mut best_engine) = (0.0_f64, 0.0_f64);
    for round in 0..rounds {
        let raw = raw_rate(&bootstrap, &topic, count, round)?;
        let cpu_before = process_cpu();
        let engine = engine_rate(&topic, count, round)?;
        // CPU of every thread of this process while the engine ran, per message, and how many
        // of the cores it kept busy: a figure well under the core count means the engine waits
        // on its own hand-offs, not on the CPU.
        let cpu = process_cpu().saturating_sub(cpu_before).as_secs_f64();
        let per_message_us = cpu * 1e6 / count as f64;
        let busy = cpu * engine / count as f64;
        println!(
            "  raw rdkafka {raw:9.0} msg/s | engine {engine:9.0} msg/s, {per_message_us:.1} µs \
             CPU/msg, {busy:.2} cores busy"
        );
        best_raw = best_raw.max(raw);
        best_engine = best_engine.max(engine);
    }
    println!(
        "engine alone vs raw rdkafka, {partitions} partition(s): {best_engine:.0} vs {best_raw:.0} \
         msg/s | ratio {:.2} (best of {rounds} each, alternated)",
        best_engine / best_raw
    );
    Ok(())
}

/// A raw consumer in a fresh group: messages per second from subscribe to the last message.
fn raw_rate(bootstrap: &str, topic: &str, count: usize, round: usize) -> Result<f64, String> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("raw-{}-{round}", std::process::id()))
        .set("group.protocol", "consumer")
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        // As `raw_consumer`: Prosody's byte bound and back-off, librdkafka's record count.
        .set("queued.max.messages.kbytes", "16384")
        .set("fetch.queue.backoff.ms", "10")
        .create()
        .map_err(|e| e.to_string())?;
    let started = Instant::now();
    consumer.subscribe(&[topic]).map_err(|e| e.to_string())?;
    let mut seen = 0;
    while seen < count {
        if started.elapsed() > LIMIT {
            return Err(format!("raw consumer: only {seen} of {count} messages"));
        }
        if let Some(Ok(_)) = consumer.poll(Duration::from_millis(100)) {
            seen += 1;
        }
    }
    Ok(count as f64 / started.elapsed().as_secs_f64())
}

/// A Prosody client in a fresh group with one runner thread: messages per second from subscribe
/// to the last completion.
fn engine_rate(topic: &str, count: usize, round: usize) -> Result<f64, String> {
    let config = Config::resolve(vec![
        ("mock".into(), RawValue::Bool(true)),
        (
            "group_id".into(),
            RawValue::Str(format!("engine-{}-{round}", std::process::id())),
        ),
        ("subscribed_topics".into(), RawValue::Str(topic.to_owned())),
        ("probe_port".into(), RawValue::Bool(false)),
    ])
    .map_err(|e| e.to_string())?;
    let client = Client::new(config).map_err(|e| e.to_string())?;
    let handled = Arc::new(AtomicUsize::new(0));
    let (hand_over, scheduler_slot) = std::sync::mpsc::sync_channel::<Arc<Scheduler>>(1);
    let relay = Relay::start(&prosody_core::runtime::handle()?);
    let runner = {
        let handled = Arc::clone(&handled);
        std::thread::spawn(move || {
            let Ok(scheduler) = scheduler_slot.recv() else {
                return;
            };
            // As the Ruby bridge does: outcomes go to the partition workers in batches of at
            // most FLUSH_AT, and whatever is buffered goes before the runner waits.
            let mut outcomes = Vec::with_capacity(FLUSH_AT);
            loop {
                match scheduler.take() {
                    Take::Job(job, grant) => {
                        let (_event, _cancel, _timers, done) = job.into_parts();
                        grant.release();
                        outcomes.push((done, Outcome::Success));
                        handled.fetch_add(1, Ordering::Relaxed);
                        if outcomes.len() >= FLUSH_AT {
                            relay.send(std::mem::take(&mut outcomes));
                        }
                    }
                    Take::Empty => {
                        if !outcomes.is_empty() {
                            relay.send(std::mem::take(&mut outcomes));
                            continue;
                        }
                        // An unpark between the empty take and the park is kept, so none is
                        // lost.
                        std::thread::park();
                    }
                    Take::Closed => return,
                }
            }
        })
    };
    let thread = runner.thread().clone();
    let started = Instant::now();
    let scheduler = client
        .subscribe(move || thread.unpark())
        .map_err(|e| e.to_string())?;
    hand_over
        .send(Arc::clone(&scheduler))
        .map_err(|e| e.to_string())?;
    while handled.load(Ordering::Relaxed) < count && started.elapsed() < LIMIT {
        std::thread::sleep(Duration::from_micros(200));
    }
    let elapsed = started.elapsed();
    let seen = handled.load(Ordering::Relaxed);
    client.unsubscribe().map_err(|e| e.to_string())?;
    scheduler.close();
    runner.thread().unpark();
    runner.join().map_err(|_| "the runner panicked")?;
    if seen < count {
        return Err(format!("engine: only {seen} of {count} messages"));
    }
    Ok(count as f64 / elapsed.as_secs_f64())
}

/// CPU time used so far by every thread of this process (user and system), from
/// `/proc/self/stat` (clock ticks of 10 ms); zero where that file cannot be read.
fn process_cpu() -> Duration {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return Duration::ZERO;
    };
    // Fields after the command name (which may hold spaces, so split after its closing paren):
    // utime and stime are the 12th and 13th of them.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return Duration::ZERO;
    };
    let ticks: u64 = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|field| field.parse::<u64>().ok())
        .sum();
    Duration::from_millis(ticks * 10)
}
