//! End to end on the librdkafka mock cluster: messages sent through the client reach a
//! runner with per-key order and cross-key concurrency, offsets are committed, and a
//! restarted subscription resumes after the committed position.

// A test: a failed unwrap is a failed assertion.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prosody_core::client::Client;
use prosody_core::config::{Config, RawValue};
use prosody_core::event::Event;
use prosody_core::handler::{Job, Outcome};
use prosody_core::scheduler::{Scheduler, Take};

/// What the runners saw.
struct Recorder {
    seen: Mutex<Vec<(Option<String>, i64, u64)>>,
    running: Mutex<HashMap<Option<String>, usize>>,
    active: AtomicUsize,
    peak: AtomicUsize,
    overlap: AtomicUsize,
}

impl Recorder {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            seen: Mutex::new(Vec::new()),
            running: Mutex::new(HashMap::new()),
            active: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            overlap: AtomicUsize::new(0),
        })
    }
}

/// Starts `n` runners that pull jobs from `scheduler`, as the Ruby processor's workers do.
fn runners(n: usize, rec: Arc<Recorder>) -> Arc<Scheduler> {
    let scheduler = Arc::new(Scheduler::new());
    let notify = Arc::new(tokio::sync::Notify::new());
    let wake = notify.clone();
    scheduler.set_notify(move || wake.notify_waiters());
    let rt = prosody_core::runtime::handle().unwrap();
    for _ in 0..n {
        let (scheduler, notify, rec) = (scheduler.clone(), notify.clone(), rec.clone());
        rt.spawn(async move {
            loop {
                let notified = notify.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                match scheduler.take() {
                    Take::Job(job) => handle(job, &rec).await,
                    Take::Empty => notified.await,
                    Take::Closed => return,
                }
            }
        });
    }
    scheduler
}

/// Records what the job saw, after a short async delay.
async fn handle(job: Job, rec: &Recorder) {
    let (event, _cancel, done) = job.into_parts();
    let Event::Message(m) = event;
    let key = m.key.as_deref().map(str::to_owned);
    {
        let mut running = rec.running.lock().unwrap();
        let n = running.entry(key.clone()).or_default();
        *n += 1;
        if *n > 1 {
            rec.overlap.fetch_add(1, Ordering::SeqCst);
        }
    }
    let now = rec.active.fetch_add(1, Ordering::SeqCst) + 1;
    rec.peak.fetch_max(now, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1)).await;
    rec.active.fetch_sub(1, Ordering::SeqCst);
    *rec.running.lock().unwrap().get_mut(&key).unwrap() -= 1;
    let seq = m.payload["seq"].as_u64().unwrap();
    rec.seen.lock().unwrap().push((key, m.offset, seq));
    done.complete(Outcome::Success);
}

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        Instant::now().elapsed().as_nanos() ^ (std::ptr::addr_of!(prefix) as u128)
    )
}

fn config(topic: &str, group: &str, max_concurrency: i64) -> Config {
    Config::resolve(vec![
        ("mock".into(), RawValue::Bool(true)),
        ("group_id".into(), RawValue::Str(group.into())),
        (
            "source_system".into(),
            RawValue::Str("test-producer".into()),
        ),
        ("subscribed_topics".into(), RawValue::Str(topic.into())),
        ("max_concurrency".into(), RawValue::Int(max_concurrency)),
        ("commit_interval".into(), RawValue::Float(0.05)),
    ])
    .unwrap()
}

fn wait_until(deadline: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + deadline;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    f()
}

#[test]
fn per_key_order_concurrency_and_resume_after_commit() {
    let topic = unique("e2e");
    let group = unique("group");
    let client = Client::new(config(&topic, &group, 8)).unwrap();
    let rt = prosody_core::runtime::handle().unwrap();
    let keys = 20;
    let per_key = 25;
    for i in 0..per_key {
        for k in 0..keys {
            let payload = serde_json::json!({ "seq": i, "key": k }).to_string();
            rt.block_on(client.send(&topic, &format!("k{k}"), payload.as_bytes(), &[]))
                .unwrap();
        }
    }
    let rec = Recorder::new();
    let scheduler = runners(8, rec.clone());
    client.subscribe(scheduler.clone()).unwrap();
    let total = keys * per_key;
    assert!(
        wait_until(Duration::from_secs(30), || rec.seen.lock().unwrap().len()
            >= total as usize),
        "handled {} of {total}",
        rec.seen.lock().unwrap().len()
    );
    assert!(client.assigned_partitions() > 0);
    client.unsubscribe();
    scheduler.close();

    let seen = rec.seen.lock().unwrap().clone();
    assert_eq!(
        seen.len(),
        total as usize,
        "each message exactly once in one run"
    );
    let mut by_key: HashMap<Option<String>, Vec<u64>> = HashMap::new();
    for (key, _, seq) in &seen {
        by_key.entry(key.clone()).or_default().push(*seq);
    }
    for (key, seqs) in by_key {
        assert_eq!(
            seqs,
            (0..per_key as u64).collect::<Vec<_>>(),
            "order of key {key:?}"
        );
    }
    assert_eq!(
        rec.overlap.load(Ordering::SeqCst),
        0,
        "two events of one key overlapped"
    );
    let peak = rec.peak.load(Ordering::SeqCst);
    assert!(
        peak > 1 && peak <= 8,
        "peak concurrency {peak} should be in 2..=8"
    );

    // A new subscription of the same group resumes after the committed offsets.
    for k in 0..keys {
        let payload = serde_json::json!({ "seq": per_key, "key": k }).to_string();
        rt.block_on(client.send(&topic, &format!("k{k}"), payload.as_bytes(), &[]))
            .unwrap();
    }
    let rec2 = Recorder::new();
    let scheduler = runners(8, rec2.clone());
    client.subscribe(scheduler.clone()).unwrap();
    assert!(wait_until(Duration::from_secs(30), || rec2
        .seen
        .lock()
        .unwrap()
        .len()
        >= keys as usize));
    // Give a moment for anything unexpected (re-deliveries) to show up.
    std::thread::sleep(Duration::from_millis(300));
    client.unsubscribe();
    scheduler.close();
    let seen2 = rec2.seen.lock().unwrap().clone();
    assert_eq!(
        seen2.len(),
        keys as usize,
        "only the new messages: {seen2:?}"
    );
    assert!(seen2.iter().all(|(_, _, seq)| *seq == per_key as u64));
}
