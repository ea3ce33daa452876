//! Benchmark of deferred retry's drain against the local Kafka and Cassandra (`dev/services`):
//! 10,000 messages over 100 keys on one partition, all deferred and due now, and the group's
//! commit past them; a subscribed client with 32 runners that complete each job at once then
//! retries them all. Prints the drain rate and its ratio to the 5,000 msg/s target, and checks
//! that every message ran once, in offset order per key, and that the store is empty afterwards.
//!
//! `make bench-defer` (starts the services), or
//! `cargo run --release -p prosody-core --example defer_drain`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prosody_core::client::Client;
use prosody_core::config::{Config, RawValue};
use prosody_core::defer::{now_ms, Retry};
use prosody_core::event::Event;
use prosody_core::handler::Outcome;
use prosody_core::scheduler::Take;
use prosody_core::stores::Stores;
use prosody_core::testing::{create_topic, RawProducer};
use prosody_core::timers::Scope;

const KEYS: usize = 100;
const MESSAGES: usize = 10_000;
const TARGET: f64 = 5_000.0;

fn main() -> Result<(), String> {
    let bootstrap =
        std::env::var("PROSODY_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:9092".to_owned());
    let cassandra =
        std::env::var("PROSODY_TEST_CASSANDRA").unwrap_or_else(|_| "127.0.0.1:9042".to_owned());
    let stamp = now_ms();
    let topic = format!("defer-bench-{stamp}");
    let group = format!("defer-bench-{stamp}");
    let runtime = prosody_core::runtime::handle()?;

    create_topic(&bootstrap, &topic, 1, Duration::from_secs(30))?;
    let producer = RawProducer::new(&bootstrap).map_err(|e| e.to_string())?;
    for i in 0..MESSAGES {
        let key = format!("key-{}", i % KEYS);
        let payload = format!("{{\"seq\":{}}}", i / KEYS);
        producer.produce(
            &topic,
            Some(0),
            Some(key.as_bytes()),
            Some(payload.as_bytes()),
            &[],
        )?;
    }
    producer.flush(Duration::from_secs(60))?;

    let config = Config::resolve(vec![
        ("bootstrap_servers".into(), RawValue::Str(bootstrap.clone())),
        ("group_id".into(), RawValue::Str(group.clone())),
        ("subscribed_topics".into(), RawValue::Str(topic.clone())),
        ("cassandra_nodes".into(), RawValue::Str(cassandra)),
        (
            "cassandra_keyspace".into(),
            RawValue::Str("prosody_bench".into()),
        ),
        ("commit_interval".into(), RawValue::Float(0.1)),
        ("probe_port".into(), RawValue::Bool(false)),
    ])
    .map_err(|e| e.to_string())?;

    // The backlog: each key deferred at its first offset, due now, with the rest appended.
    let stores = runtime.block_on(Stores::cassandra(&config))?;
    let scope = Scope {
        group: Arc::from(group.as_str()),
        topic: Arc::from(topic.as_str()),
        partition: 0,
    };
    let started = Instant::now();
    runtime.block_on(async {
        let retry = Retry {
            attempts: 1,
            due_ms: now_ms(),
        };
        let mut writes = tokio::task::JoinSet::new();
        for i in 0..MESSAGES {
            let (store, scope) = (stores.defer.clone(), scope.clone());
            writes.spawn(async move {
                let key = format!("key-{}", i % KEYS);
                let offset = i64::try_from(i).unwrap_or(i64::MAX);
                if i < KEYS {
                    store.defer(&scope, key.as_bytes(), offset, retry).await
                } else {
                    store.append(&scope, key.as_bytes(), offset).await
                }
            });
            if writes.len() >= 256 {
                if let Some(done) = writes.join_next().await {
                    done.map_err(|e| e.to_string())?
                        .map_err(|e| e.to_string())?;
                }
            }
        }
        while let Some(done) = writes.join_next().await {
            done.map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
        }
        Ok::<_, String>(())
    })?;
    println!(
        "stored {MESSAGES} deferred offsets over {KEYS} keys in {:.2}s",
        started.elapsed().as_secs_f64()
    );
    // The group's position past the backlog, as the client that deferred it would leave it.
    let end = i64::try_from(MESSAGES).map_err(|e| e.to_string())?;
    prosody_core::testing::commit_position(&bootstrap, &group, &topic, 0, end)?;

    // The drain.
    let client = Client::new(config).map_err(|e| e.to_string())?;
    let handled = Arc::new(AtomicUsize::new(0));
    let order: Arc<Mutex<HashMap<Vec<u8>, Vec<i64>>>> = Arc::default();
    let first = Arc::new(Mutex::new(None::<Instant>));
    let notify = Arc::new(tokio::sync::Notify::new());
    let wake = notify.clone();
    let subscribed = Instant::now();
    let scheduler = client
        .subscribe(move || wake.notify_waiters())
        .map_err(|e| e.to_string())?;
    for _ in 0..32 {
        let (scheduler, notify) = (scheduler.clone(), notify.clone());
        let (handled, order, first) = (handled.clone(), order.clone(), first.clone());
        runtime.spawn(async move {
            loop {
                let notified = notify.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                match scheduler.take() {
                    Take::Job(job, grant) => {
                        let (event, _cancel, _timers, done) = job.into_parts();
                        if let Event::Message(m) = event {
                            if let Ok(mut first) = first.lock() {
                                first.get_or_insert_with(Instant::now);
                            }
                            if let Ok(mut order) = order.lock() {
                                let key = m.key.as_deref().unwrap_or_default().to_vec();
                                order.entry(key).or_default().push(m.offset);
                            }
                            handled.fetch_add(1, Ordering::Relaxed);
                        }
                        grant.release();
                        done.complete(Outcome::Success);
                    }
                    Take::Empty => notified.await,
                    Take::Closed => return,
                }
            }
        });
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut assigned = None;
    while handled.load(Ordering::Relaxed) < MESSAGES && Instant::now() < deadline {
        if assigned.is_none() && client.assigned_partitions() > 0 {
            assigned = Some(subscribed.elapsed());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let finished = Instant::now();
    let count = handled.load(Ordering::Relaxed);
    client.unsubscribe().map_err(|e| e.to_string())?;
    scheduler.close();
    if count < MESSAGES {
        return Err(format!(
            "only {count} of {MESSAGES} deferred messages ran within 120 s"
        ));
    }
    let order = order.lock().map_err(|_| "poisoned")?.clone();
    let in_order = order.values().all(|o| o.windows(2).all(|w| w[0] < w[1]));
    let once = order.len() == KEYS && order.values().all(|o| o.len() == MESSAGES / KEYS);
    let left = runtime
        .block_on(stores.defer.load(&scope))
        .map_err(|e| e.to_string())?;
    let from_first = first
        .lock()
        .map_err(|_| "poisoned")?
        .map_or(Duration::ZERO, |f| finished - f);
    // The target is judged from subscribe: loading the deferred keys, reading their offsets
    // and re-reading the messages count too.
    let from_subscribe = finished - subscribed;
    let rate = MESSAGES as f64 / from_subscribe.as_secs_f64();
    println!(
        "the partition was assigned {:.3}s after subscribe (the group join)",
        assigned.unwrap_or_default().as_secs_f64()
    );
    println!(
        "drained {MESSAGES} deferred messages over {KEYS} keys in {:.3}s from subscribe \
         ({:.3}s from the first run, {:.0} msg/s): {rate:.0} msg/s, {:.2} of the {TARGET:.0} \
         msg/s target; once each: {once}; in order per key: {in_order}; keys left in the \
         store: {}",
        from_subscribe.as_secs_f64(),
        from_first.as_secs_f64(),
        MESSAGES as f64 / from_first.as_secs_f64(),
        rate / TARGET,
        left.len()
    );
    if !(once && in_order && left.is_empty()) {
        return Err("the drain lost, repeated or reordered messages".into());
    }
    Ok(())
}
