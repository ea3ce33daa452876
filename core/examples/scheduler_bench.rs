//! Micro-benchmark of the fair scheduler: the cost of one grant (take, release, and the key's
//! next event submitted) with 1k, 10k and 100k events waiting. Selection is a priority
//! structure, so the cost should grow with log n, not n.
//!
//! `cargo run --release -p prosody-core --example scheduler_bench`

use std::sync::Arc;
use std::time::Instant;

use prosody_core::scheduler::{Class, FairConfig, Scheduler, Take};
use prosody_core::testing::timer_job;
use tokio::sync::mpsc;

/// Nanoseconds per grant with `waiting` events queued (a quarter of them retries).
fn measure(waiting: usize, grants: usize) -> f64 {
    let scheduler = Scheduler::with_config(FairConfig {
        max_concurrency: 32,
        ..FairConfig::default()
    });
    let (done, mut rx) = mpsc::unbounded_channel();
    let keys: Vec<Arc<[u8]>> = (0..waiting)
        .map(|i| Arc::from(format!("key-{i}").as_bytes()))
        .collect();
    for (i, key) in keys.iter().enumerate() {
        let class = if i % 4 == 0 {
            Class::Retry
        } else {
            Class::Fresh
        };
        scheduler.submit(timer_job(key, &done, class));
    }
    let start = Instant::now();
    for i in 0..grants {
        let Take::Job(job, grant) = scheduler.take() else {
            return f64::NAN;
        };
        let key = job.key().clone().unwrap_or_else(|| Arc::from(&b""[..]));
        let class = job.class;
        drop(job); // reports Abandoned to `rx`, drained below
        grant.release();
        scheduler.submit(timer_job(&key, &done, class));
        if i % 1024 == 0 {
            while rx.try_recv().is_ok() {}
        }
    }
    start.elapsed().as_nanos() as f64 / grants as f64
}

fn main() {
    let grants = 300_000;
    let _ = measure(1_000, 50_000); // warm-up
    let mut results = Vec::new();
    for waiting in [1_000, 10_000, 100_000] {
        let ns = (0..3)
            .map(|_| measure(waiting, grants))
            .fold(f64::INFINITY, f64::min);
        println!(
            "{waiting:>7} events waiting: {ns:>7.0} ns per grant (best of 3, {grants} grants)"
        );
        results.push(ns);
    }
    println!(
        "ratio 100k / 10k waiting: {:.2} (linear selection would be ~10)",
        results[2] / results[1]
    );
}
