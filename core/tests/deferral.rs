//! Deferred retry end to end on the mock cluster with the process-wide memory store: what a new
//! owner of a partition does with the deferred keys an earlier owner left behind.

// A test: a failed unwrap is a failed assertion.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{config_with, subscribe_runners, unique, wait_until, Recorder};
use prosody_core::client::Client;
use prosody_core::config::RawValue;
use prosody_core::defer::memory::MemoryStore;
use prosody_core::defer::{now_ms, DeferStore, Retry};
use prosody_core::timers::Scope;

/// An earlier owner deferred key `k` at offset 0 and stored the append of offset 3, but died
/// before the appends of 1 and 2 landed (so it committed up to 1 only). The new owner runs the
/// key's messages in offset order: 0, then 1 and 2 (read again from Kafka), then 3 and 4.
#[test]
fn a_new_owner_keeps_key_order_when_an_earlier_owner_left_appends_unstored() {
    let topic = unique("defer-owner");
    let group = unique("group");
    let config = config_with(
        &topic,
        &group,
        8,
        None,
        &[("mock_partitions", RawValue::Int(1))],
    );
    let client = Client::new(config).unwrap();
    let rt = prosody_core::runtime::handle().unwrap();
    for seq in 0..5 {
        let payload = format!("{{\"seq\":{seq}}}");
        rt.block_on(client.send(&common::record(&topic, b"k", payload.as_bytes(), &[])))
            .unwrap();
    }
    let scope = Scope {
        group: Arc::from(group.as_str()),
        topic: Arc::from(topic.as_str()),
        partition: 0,
    };
    let store = MemoryStore::shared();
    rt.block_on(async {
        let retry = Retry {
            attempts: 1,
            due_ms: now_ms(),
        };
        store.defer(&scope, b"k", 0, retry).await.unwrap();
        store.append(&scope, b"k", 3).await.unwrap();
    });
    let bootstrap = prosody_core::kafka::mock::shared()
        .unwrap()
        .bootstrap_servers()
        .to_owned();
    prosody_core::testing::commit_position(&bootstrap, &group, &topic, 0, 1).unwrap();

    let rec = Recorder::new();
    let scheduler = subscribe_runners(&client, 8, rec.clone());
    assert!(
        wait_until(Duration::from_secs(20), || rec.seen.lock().unwrap().len()
            >= 5),
        "ran {:?}",
        rec.seen.lock().unwrap()
    );
    client.unsubscribe().unwrap();
    scheduler.close();
    let offsets = rec.offsets();
    assert_eq!(offsets, vec![0, 1, 2, 3, 4]);
    let left = rt.block_on(store.load(&scope)).unwrap();
    assert!(left.is_empty(), "the key left deferral: {left:?}");
}
