//! Helpers shared by the integration tests: runners that pull jobs the way the Ruby processor's
//! workers do, and a recorder of what they saw.

// A test helper: a failed unwrap is a failed assertion.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prosody_core::client::Client;
use prosody_core::config::{Config, RawValue};
use prosody_core::event::Event;
use prosody_core::handler::{Job, Outcome};
use prosody_core::kafka::producer::Record;
use prosody_core::scheduler::{Scheduler, Take};

/// What the runners saw.
pub struct Recorder {
    pub seen: Mutex<Vec<(Option<String>, i64, u64)>>,
    pub running: Mutex<HashMap<Option<String>, usize>>,
    pub active: AtomicUsize,
    pub peak: AtomicUsize,
    pub overlap: AtomicUsize,
}

impl Recorder {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            seen: Mutex::new(Vec::new()),
            running: Mutex::new(HashMap::new()),
            active: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            overlap: AtomicUsize::new(0),
        })
    }
}

impl Recorder {
    /// The offsets the runners ran, in order.
    pub fn offsets(&self) -> Vec<i64> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .map(|(_, o, _)| *o)
            .collect()
    }

    /// The payload sequence numbers each key saw, in the order its handlers ran.
    pub fn seqs_by_key(&self) -> HashMap<Option<String>, Vec<u64>> {
        let mut by_key: HashMap<Option<String>, Vec<u64>> = HashMap::new();
        for (key, _, seq) in self.seen.lock().unwrap().iter() {
            by_key.entry(key.clone()).or_default().push(*seq);
        }
        by_key
    }
}

/// Subscribes `client` and starts `n` runners that pull jobs from its scheduler, as the Ruby
/// processor's workers do.
pub fn subscribe_runners(client: &Client, n: usize, rec: Arc<Recorder>) -> Arc<Scheduler> {
    let notify = Arc::new(tokio::sync::Notify::new());
    let wake = notify.clone();
    let scheduler = client
        .subscribe(move || wake.notify_waiters())
        .expect("subscribe");
    let rt = prosody_core::runtime::handle().unwrap();
    for _ in 0..n {
        let (scheduler, notify, rec) = (scheduler.clone(), notify.clone(), rec.clone());
        rt.spawn(async move {
            loop {
                let notified = notify.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                match scheduler.take() {
                    Take::Job(job, grant) => {
                        handle(job, &rec).await;
                        grant.release();
                    }
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
    let (event, _cancel, _timers, done) = job.into_parts();
    let Event::Message(m) = event else {
        done.complete(Outcome::Success);
        return;
    };
    let key = m
        .key
        .as_deref()
        .map(|k| String::from_utf8_lossy(k).into_owned());
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
    let payload: serde_json::Value = serde_json::from_slice(m.payload.text()).unwrap();
    let seq = payload["seq"].as_u64().unwrap();
    rec.seen.lock().unwrap().push((key, m.offset, seq));
    done.complete(Outcome::Success);
}

/// A record for `topic` with `key`, JSON `payload` bytes and `headers`.
pub fn record(topic: &str, key: &[u8], payload: &[u8], headers: &[(String, Vec<u8>)]) -> Record {
    Record {
        topic: topic.to_owned(),
        key: key.to_vec(),
        payload: Some(payload.to_vec()),
        headers: headers.to_vec(),
        partition: None,
    }
}

pub fn unique(prefix: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!(
        "{prefix}-{}-{nanos}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A consumer configuration: mock mode when `bootstrap` is `None`.
pub fn config(topic: &str, group: &str, max_concurrency: i64, bootstrap: Option<&str>) -> Config {
    config_with(topic, group, max_concurrency, bootstrap, &[])
}

/// [`config`] plus `extra` options.
pub fn config_with(
    topic: &str,
    group: &str,
    max_concurrency: i64,
    bootstrap: Option<&str>,
    extra: &[(&str, RawValue)],
) -> Config {
    let server = match bootstrap {
        Some(b) => ("bootstrap_servers".to_owned(), RawValue::Str(b.into())),
        None => ("mock".to_owned(), RawValue::Bool(true)),
    };
    let mut options = vec![
        server,
        ("send_timeout".into(), RawValue::Float(15.0)),
        ("group_id".into(), RawValue::Str(group.into())),
        (
            "source_system".into(),
            RawValue::Str("test-producer".into()),
        ),
        ("subscribed_topics".into(), RawValue::Str(topic.into())),
        ("max_concurrency".into(), RawValue::Int(max_concurrency)),
        ("commit_interval".into(), RawValue::Float(0.05)),
        // No probe server: the tests run side by side and would share port 8000.
        ("probe_port".into(), RawValue::Bool(false)),
    ];
    options.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
    Config::resolve(options).unwrap()
}

pub fn wait_until(deadline: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + deadline;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    f()
}

/// A session on the local Cassandra (`dev/services`) with `migrations` applied in a new keyspace
/// (applied twice: a recorded migration is a no-op the second time); returns it and the keyspace.
pub async fn migrated_cassandra(
    migrations: &[prosody_core::cassandra::Migration],
) -> (Arc<scylla::client::session::Session>, String) {
    let keyspace = unique("prosody_it").replace('-', "_");
    let config = Config::resolve(vec![
        ("mock".into(), RawValue::Bool(true)),
        (
            "cassandra_nodes".into(),
            RawValue::Str("127.0.0.1:9042".into()),
        ),
        ("cassandra_keyspace".into(), RawValue::Str(keyspace.clone())),
    ])
    .unwrap();
    let session = prosody_core::cassandra::connect(&config)
        .await
        .expect("Cassandra must run on 127.0.0.1:9042 (dev/services start cassandra)");
    for _ in 0..2 {
        prosody_core::cassandra::migrate(
            &session,
            &keyspace,
            &config.cassandra_replication,
            migrations,
        )
        .await
        .unwrap();
    }
    (session, keyspace)
}
