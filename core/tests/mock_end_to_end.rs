//! End to end on the librdkafka mock cluster: messages sent through the client reach a
//! runner with per-key order and cross-key concurrency, offsets are committed, and a
//! restarted subscription resumes after the committed position.

// A test: a failed unwrap is a failed assertion.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{config, subscribe_runners, unique, wait_until, Recorder};
use prosody_core::client::Client;

#[test]
fn per_key_order_concurrency_and_resume_after_commit() {
    let topic = unique("e2e");
    let group = unique("group");
    let client = Client::new(config(&topic, &group, 8, None)).unwrap();
    let rt = prosody_core::runtime::handle().unwrap();
    let keys: u64 = 20;
    let per_key: u64 = 25;
    let send = |k: u64, seq: u64| {
        let payload = serde_json::json!({ "seq": seq, "key": k }).to_string();
        let record = common::record(&topic, format!("k{k}").as_bytes(), payload.as_bytes(), &[]);
        rt.block_on(client.send(&record)).unwrap();
    };
    for i in 0..per_key {
        for k in 0..keys {
            send(k, i);
        }
    }
    let rec = Recorder::new();
    let scheduler = subscribe_runners(&client, 8, rec.clone());
    let total = keys * per_key;
    assert!(
        wait_until(Duration::from_secs(30), || rec.seen.lock().unwrap().len()
            >= total as usize),
        "handled {} of {total}",
        rec.seen.lock().unwrap().len()
    );
    assert!(client.assigned_partitions() > 0);
    client.unsubscribe().expect("unsubscribe");
    scheduler.close();

    let seen = rec.seen.lock().unwrap().clone();
    assert_eq!(
        seen.len(),
        total as usize,
        "each message exactly once in one run"
    );
    for (key, seqs) in rec.seqs_by_key() {
        assert_eq!(
            seqs,
            (0..per_key).collect::<Vec<_>>(),
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
        send(k, per_key);
    }
    let rec2 = Recorder::new();
    let scheduler = subscribe_runners(&client, 8, rec2.clone());
    assert!(wait_until(Duration::from_secs(30), || rec2
        .seen
        .lock()
        .unwrap()
        .len()
        >= keys as usize));
    // Give a moment for anything unexpected (re-deliveries) to show up.
    std::thread::sleep(Duration::from_millis(300));
    client.unsubscribe().expect("unsubscribe");
    scheduler.close();
    let seen2 = rec2.seen.lock().unwrap().clone();
    assert_eq!(
        seen2.len(),
        keys as usize,
        "only the new messages: {seen2:?}"
    );
    assert!(seen2.iter().all(|(_, _, seq)| *seq == per_key));
}

#[test]
fn the_prefetch_budget_is_shared_by_the_subscribed_partitions() {
    use prosody_core::config::RawValue;
    let topic = unique("prefetch");
    let mock = prosody_core::kafka::mock::shared().unwrap();
    mock.ensure_topic(&topic, 8).unwrap();
    let with = |budget: i64| {
        let extra = [("prefetch_records", RawValue::Int(budget))];
        Client::new(common::config_with(&topic, "g", 4, None, &extra)).unwrap()
    };
    assert_eq!(with(16_000).prefetch_per_partition(), 2_000);
    assert_eq!(with(64_000).prefetch_per_partition(), 8_000);
    // Never below the floor.
    assert_eq!(
        with(800).prefetch_per_partition(),
        prosody_core::kafka::MIN_PREFETCH
    );
    // Two topics share the budget: 8 + 24 partitions.
    let other = unique("prefetch-other");
    mock.ensure_topic(&other, 24).unwrap();
    let extra = [
        ("prefetch_records", RawValue::Int(64_000)),
        (
            "subscribed_topics",
            RawValue::Str(format!("{topic},{other}")),
        ),
    ];
    let both = Client::new(common::config_with(&topic, "g", 4, None, &extra)).unwrap();
    assert_eq!(both.prefetch_per_partition(), 2_000);
}

#[test]
fn an_unknown_partition_count_gets_the_share_of_32_partitions() {
    // No broker answers: the count is unknown after the wait.
    let client = Client::new(common::config(
        &unique("prefetch-unreachable"),
        "g",
        4,
        Some("127.0.0.1:1"),
    ))
    .unwrap();
    assert_eq!(client.prefetch_per_partition(), 64_000 / 32);
}
