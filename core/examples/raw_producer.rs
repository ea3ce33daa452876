//! Upper bound for the batch-send benchmark: a raw librdkafka producer, with the same
//! idempotence and linger settings as Prosody's, writing COUNT records (with the `source-system`
//! header Prosody's records carry) and waiting for every delivery report.
//!
//! `raw_producer BOOTSTRAP TOPIC COUNT` writes `{"id":i,"ok":true}` with keys `k0`..`k9999`
//! and prints `messages_per_second=<rate>` (from the first record queued to the last report).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;

/// Counts delivery reports; failures too, so the run ends.
struct Reports {
    delivered: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
}

impl ClientContext for Reports {}

impl ProducerContext for Reports {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => self.delivered.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.failed.fetch_add(1, Ordering::Relaxed),
        };
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, bootstrap, topic, count] = args.as_slice() else {
        return Err("usage: raw_producer BOOTSTRAP TOPIC COUNT".into());
    };
    let count: usize = count.parse()?;
    let delivered = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let producer: ThreadedProducer<Reports> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("linger.ms", "1")
        .create_with_context(Reports {
            delivered: delivered.clone(),
            failed: failed.clone(),
        })?;
    // Connected, with a producer id, before the clock starts (as Prosody's warm-up does).
    producer
        .send(BaseRecord::<[u8], [u8]>::to(topic).payload(b"{}".as_slice()))
        .map_err(|(e, _)| e)?;
    producer.flush(Duration::from_secs(30))?;
    let (delivered_before, failed_before) = (
        delivered.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
    );
    let payloads: Vec<(String, String)> = (0..count)
        .map(|i| {
            (
                format!("k{}", i % 10_000),
                format!("{{\"id\":{i},\"ok\":true}}"),
            )
        })
        .collect();
    let started = Instant::now();
    for (key, payload) in &payloads {
        let headers = OwnedHeaders::new_with_capacity(1).insert(Header {
            key: "source-system",
            value: Some("bench"),
        });
        let mut record = BaseRecord::<str, str>::to(topic)
            .key(key)
            .payload(payload)
            .headers(headers);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, back)) => {
                    record = back;
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }
    while delivered.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed)
        < count + delivered_before + failed_before
    {
        if started.elapsed() > Duration::from_secs(120) {
            return Err("not every record was acknowledged after 120 s".into());
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    let elapsed = started.elapsed().as_secs_f64();
    let failures = failed.load(Ordering::Relaxed) - failed_before;
    if failures > 0 {
        return Err(format!("{failures} records failed").into());
    }
    println!(
        "messages_per_second={:.0} seconds={elapsed:.3}",
        count as f64 / elapsed
    );
    Ok(())
}
