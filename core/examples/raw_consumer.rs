//! Upper bound for the consume benchmark: a raw librdkafka consumer with no handler.
//!
//! `raw_consumer BOOTSTRAP TOPIC COUNT` subscribes with a fresh group, counts COUNT messages
//! and prints `messages_per_second=<rate>` (measured from subscribe to the last message).

use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, bootstrap, topic, count] = args.as_slice() else {
        return Err("usage: raw_consumer BOOTSTRAP TOPIC COUNT".into());
    };
    let count: usize = count.parse()?;
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("raw-bench-{}", std::process::id()))
        .set("group.protocol", "consumer")
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        // Prosody's byte bound and back-off. The record count per partition stays librdkafka's
        // (100,000): the fastest bare consumer, against Prosody's share of `prefetch_records`.
        .set("queued.max.messages.kbytes", "16384")
        .set("fetch.queue.backoff.ms", "10")
        .create()?;
    let started = Instant::now();
    consumer.subscribe(&[topic])?;
    let mut seen = 0;
    let mut bytes = 0usize;
    while seen < count {
        if started.elapsed() > Duration::from_secs(120) {
            return Err(format!("only {seen} of {count} messages after 120 s").into());
        }
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                bytes += rdkafka::Message::payload(&m).map_or(0, <[u8]>::len);
                seen += 1;
            }
            Some(Err(e)) => eprintln!("consumer error: {e}"),
            None => {}
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "messages_per_second={:.0} seconds={elapsed:.3} bytes={bytes}",
        count as f64 / elapsed
    );
    Ok(())
}
