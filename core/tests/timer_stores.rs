//! One compliance suite for every timer store (memory always; Cassandra in the integration
//! tier, against the Cassandra that `dev/services` starts), plus random operation sequences
//! checked against a simple model.

// A test: a failed unwrap is a failed assertion.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use common::unique;
use proptest::prelude::*;
use proptest::strategy::ValueTree;

use prosody_core::timers::cassandra::{CassandraStore, MIGRATIONS};
use prosody_core::timers::memory::MemoryStore;
use prosody_core::timers::{Due, Scope, Seconds, TimerStore};

/// A stored trace context (a `traceparent`, then a `tracestate` line).
const SPAN: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\nvendor=1";

fn scope(partition: i32) -> Scope {
    Scope {
        group: Arc::from(unique("group").as_str()),
        topic: Arc::from("topic"),
        partition,
    }
}

/// The behaviour every store must have.
async fn compliance(store: &dyn TimerStore) {
    let s = scope(0);
    let other = Scope {
        partition: 1,
        ..s.clone()
    };
    store.schedule(&s, b"a", 100, None).await.unwrap();
    store.schedule(&s, b"a", 100, None).await.unwrap(); // same second: one timer
    store.schedule(&s, b"a", 50, None).await.unwrap();
    store.schedule(&s, b"b", 75, None).await.unwrap();
    store.schedule(&other, b"a", 60, None).await.unwrap();
    let after_2038: Seconds = 4_102_444_800; // 2100-01-01
    store.schedule(&s, b"c", after_2038, None).await.unwrap();
    assert_eq!(store.scheduled(&s, b"a").await.unwrap(), vec![50, 100]);
    assert_eq!(store.scheduled(&s, b"c").await.unwrap(), vec![after_2038]);
    assert_eq!(
        store.scheduled(&s, b"nobody").await.unwrap(),
        Vec::<Seconds>::new()
    );
    let keyed = |v: Due| -> Vec<(String, Seconds)> {
        v.into_iter()
            .map(|(k, t, _)| (String::from_utf8_lossy(&k).into_owned(), t))
            .collect()
    };
    assert_eq!(
        keyed(store.load(&s, 99).await.unwrap()),
        vec![("a".into(), 50), ("b".into(), 75)],
        "load returns what is due by `until`, earliest first, only for its scope"
    );
    assert_eq!(keyed(store.load(&s, after_2038).await.unwrap()).len(), 4);
    store.unschedule(&s, b"a", 50).await.unwrap();
    store.unschedule(&s, b"a", 51).await.unwrap(); // absent: fine
    assert_eq!(store.scheduled(&s, b"a").await.unwrap(), vec![100]);
    store.clear(&s, b"a").await.unwrap();
    assert!(store.scheduled(&s, b"a").await.unwrap().is_empty());
    assert_eq!(
        keyed(store.load(&s, 1_000).await.unwrap()),
        vec![("b".into(), 75)]
    );
    assert_eq!(
        store.scheduled(&other, b"a").await.unwrap(),
        vec![60],
        "scopes are separate"
    );
    // Keys are bytes: two keys that are not UTF-8 and differ stay apart, and load returns them
    // exactly.
    store.schedule(&s, b"\xff\xfe", 10, None).await.unwrap();
    // The trace context it was scheduled in comes back with it.
    store
        .schedule(&s, b"\xfe\xff", 11, Some(SPAN))
        .await
        .unwrap();
    assert_eq!(store.scheduled(&s, b"\xff\xfe").await.unwrap(), vec![10]);
    assert_eq!(store.scheduled(&s, b"\xfe\xff").await.unwrap(), vec![11]);
    let loaded = store.load(&s, 11).await.unwrap();
    assert_eq!(
        loaded,
        vec![
            (Arc::from(&b"\xff\xfe"[..]), 10, None),
            (Arc::from(&b"\xfe\xff"[..]), 11, Some(Arc::from(SPAN)))
        ]
    );
}

#[derive(Debug, Clone)]
enum Op {
    Schedule(u8, i64),
    Unschedule(u8, i64),
    Clear(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u8..4, 0i64..40).prop_map(|(k, t)| Op::Schedule(k, t)),
        1 => (0u8..4, 0i64..40).prop_map(|(k, t)| Op::Unschedule(k, t)),
        1 => (0u8..4).prop_map(Op::Clear),
    ]
}

/// Applies `ops` to the store and to a model, checking them against each other after each step.
async fn against_model(store: &dyn TimerStore, ops: &[Op]) -> Result<(), TestCaseError> {
    let s = scope(0);
    let mut model: BTreeMap<String, BTreeSet<Seconds>> = BTreeMap::new();
    for op in ops {
        let key = match op {
            Op::Schedule(k, t) => {
                let key = format!("k{k}");
                store.schedule(&s, key.as_bytes(), *t, None).await.unwrap();
                model.entry(key.clone()).or_default().insert(*t);
                key
            }
            Op::Unschedule(k, t) => {
                let key = format!("k{k}");
                store.unschedule(&s, key.as_bytes(), *t).await.unwrap();
                model.entry(key.clone()).or_default().remove(t);
                key
            }
            Op::Clear(k) => {
                let key = format!("k{k}");
                store.clear(&s, key.as_bytes()).await.unwrap();
                model.remove(&key);
                key
            }
        };
        let expected: Vec<Seconds> = model
            .get(&key)
            .map(|t| t.iter().copied().collect())
            .unwrap_or_default();
        prop_assert_eq!(store.scheduled(&s, key.as_bytes()).await.unwrap(), expected);
    }
    let mut expected: Vec<(String, Seconds)> = model
        .iter()
        .flat_map(|(k, ts)| {
            ts.iter()
                .filter(|t| **t <= 20)
                .map(move |t| (k.clone(), *t))
        })
        .collect();
    expected.sort_by_key(|(k, t)| (*t, k.clone()));
    let mut loaded: Vec<(String, Seconds)> = store
        .load(&s, 20)
        .await
        .unwrap()
        .into_iter()
        .map(|(k, t, _)| (String::from_utf8_lossy(&k).into_owned(), t))
        .collect();
    loaded.sort_by_key(|(k, t)| (*t, k.clone()));
    prop_assert_eq!(loaded, expected);
    Ok(())
}

#[test]
fn memory_store_compliance() {
    prosody_core::runtime::handle()
        .unwrap()
        .block_on(compliance(&MemoryStore::new()));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// Random schedule / unschedule / clear sequences agree with a model.
    #[test]
    fn memory_store_matches_model(ops in proptest::collection::vec(op(), 1..60)) {
        let store = MemoryStore::new();
        prosody_core::runtime::handle().unwrap().block_on(against_model(&store, &ops))?;
    }
}

async fn cassandra_store() -> CassandraStore {
    let (session, keyspace) = common::migrated_cassandra(MIGRATIONS).await;
    CassandraStore::new(session, &keyspace, 10, 3_600)
        .await
        .unwrap()
}

#[test]
#[ignore = "needs Cassandra on 127.0.0.1:9042: dev/services start cassandra"]
fn cassandra_store_compliance() {
    prosody_core::runtime::handle().unwrap().block_on(async {
        let store = cassandra_store().await;
        compliance(&store).await;
    });
}

#[test]
#[ignore = "needs Cassandra on 127.0.0.1:9042: dev/services start cassandra"]
fn cassandra_store_matches_model() {
    prosody_core::runtime::handle().unwrap().block_on(async {
        let store = cassandra_store().await;
        let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(4));
        let ops = proptest::collection::vec(op(), 1..80);
        // Each sequence runs in a fresh scope (`scope` makes a unique group).
        for _ in 0..4 {
            let ops = ops.new_tree(&mut runner).unwrap().current();
            against_model(&store, &ops).await.unwrap();
        }
    });
}
