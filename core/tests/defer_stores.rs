//! Both defer stores against one model (memory always; Cassandra in the integration tier, against
//! the Cassandra that `dev/services` starts): random sequences of defer, append, retry updates,
//! removals and releases, checked after each step through `offsets` and `load`.

// A test: a failed unwrap is a failed assertion.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use common::unique;
use proptest::prelude::*;
use proptest::strategy::ValueTree;

use prosody_core::defer::cassandra::{CassandraStore, MIGRATIONS};
use prosody_core::defer::memory::MemoryStore;
use prosody_core::defer::{DeferStore, Retry};
use prosody_core::timers::Scope;

fn scope(partition: i32) -> Scope {
    Scope {
        group: Arc::from(unique("group").as_str()),
        topic: Arc::from("topic"),
        partition,
    }
}

#[derive(Debug, Clone)]
enum Op {
    Defer(u8, i64, u32),
    Append(u8, i64),
    SetRetry(u8, u32),
    Remove(u8, i64),
    Release(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (0u8..4, 0i64..30, 1u32..5).prop_map(|(k, o, a)| Op::Defer(k, o, a)),
        4 => (0u8..4, 0i64..30).prop_map(|(k, o)| Op::Append(k, o)),
        1 => (0u8..4, 1u32..9).prop_map(|(k, a)| Op::SetRetry(k, a)),
        3 => (0u8..4, 0i64..30).prop_map(|(k, o)| Op::Remove(k, o)),
        1 => (0u8..4).prop_map(Op::Release),
    ]
}

/// A key's state in the model: its retry (if any) and offsets.
#[derive(Debug, Default, Clone)]
struct Model {
    retry: Option<Retry>,
    offsets: BTreeSet<i64>,
}

fn retry(attempts: u32) -> Retry {
    Retry {
        attempts,
        due_ms: 1_700_000_000_000 + i64::from(attempts),
    }
}

/// Applies `ops` to the store and to the model, checking them against each other after each step.
async fn against_model(store: &dyn DeferStore, ops: &[Op]) -> Result<(), TestCaseError> {
    let s = scope(0);
    let other = Scope {
        partition: 1,
        ..s.clone()
    };
    // Another partition's key must never show up in this one.
    store.defer(&other, b"k0", 7, retry(1)).await.unwrap();
    let mut model: BTreeMap<String, Model> = BTreeMap::new();
    for op in ops {
        let key = match op {
            Op::Defer(k, o, a) => {
                let key = format!("k{k}");
                store
                    .defer(&s, key.as_bytes(), *o, retry(*a))
                    .await
                    .unwrap();
                let m = model.entry(key.clone()).or_default();
                m.offsets.insert(*o);
                m.retry = Some(retry(*a));
                key
            }
            Op::Append(k, o) => {
                let key = format!("k{k}");
                store.append(&s, key.as_bytes(), *o).await.unwrap();
                model.entry(key.clone()).or_default().offsets.insert(*o);
                key
            }
            Op::SetRetry(k, a) => {
                let key = format!("k{k}");
                store
                    .set_retry(&s, key.as_bytes(), retry(*a))
                    .await
                    .unwrap();
                model.entry(key.clone()).or_default().retry = Some(retry(*a));
                key
            }
            Op::Remove(k, o) => {
                let key = format!("k{k}");
                store.remove(&s, key.as_bytes(), *o).await.unwrap();
                model.entry(key.clone()).or_default().offsets.remove(o);
                key
            }
            Op::Release(k) => {
                let key = format!("k{k}");
                store
                    .release(&s, key.as_bytes(), prosody_core::defer::now_us())
                    .await
                    .unwrap();
                model.remove(&key);
                key
            }
        };
        let expected: Vec<i64> = model
            .get(&key)
            .map(|m| m.offsets.iter().copied().collect())
            .unwrap_or_default();
        prop_assert_eq!(
            &store.offsets(&s, key.as_bytes(), -1, 1_000).await.unwrap(),
            &expected
        );
        // Paging: above an offset, at most `limit`, lowest first.
        let above: Vec<i64> = expected
            .iter()
            .copied()
            .filter(|o| *o > 10)
            .take(3)
            .collect();
        prop_assert_eq!(
            store.offsets(&s, key.as_bytes(), 10, 3).await.unwrap(),
            above
        );
    }
    let mut expected: Vec<(String, Retry)> = model
        .iter()
        .filter_map(|(k, m)| m.retry.map(|r| (k.clone(), r)))
        .collect();
    expected.sort_by(|a, b| a.0.cmp(&b.0));
    let mut loaded: Vec<(String, Retry)> = store
        .load(&s)
        .await
        .unwrap()
        .into_iter()
        .map(|(k, r)| (String::from_utf8_lossy(&k).into_owned(), r))
        .collect();
    loaded.sort_by(|a, b| a.0.cmp(&b.0));
    prop_assert_eq!(loaded, expected);
    Ok(())
}

/// Keys are bytes: two keys that are not UTF-8 and differ stay apart.
async fn byte_keys(store: &dyn DeferStore) {
    let s = scope(0);
    store.defer(&s, b"\xff\xfe", 1, retry(1)).await.unwrap();
    store.defer(&s, b"\xfe\xff", 2, retry(2)).await.unwrap();
    assert_eq!(
        store.offsets(&s, b"\xff\xfe", -1, 10).await.unwrap(),
        vec![1]
    );
    assert_eq!(
        store.offsets(&s, b"\xfe\xff", -1, 10).await.unwrap(),
        vec![2]
    );
    let mut loaded = store.load(&s).await.unwrap();
    loaded.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        loaded,
        vec![
            (Arc::from(&b"\xfe\xff"[..]), retry(2)),
            (Arc::from(&b"\xff\xfe"[..]), retry(1)),
        ]
    );
}

#[test]
fn memory_store_keeps_byte_keys_apart() {
    prosody_core::runtime::handle()
        .unwrap()
        .block_on(byte_keys(&MemoryStore::new()));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn memory_store_matches_model(ops in proptest::collection::vec(op(), 1..60)) {
        let store = MemoryStore::new();
        prosody_core::runtime::handle().unwrap().block_on(against_model(&store, &ops))?;
    }
}

async fn cassandra_store() -> CassandraStore {
    let (session, keyspace) = common::migrated_cassandra(MIGRATIONS).await;
    CassandraStore::new(session, &keyspace, 3_600)
        .await
        .unwrap()
}

#[test]
#[ignore = "needs Cassandra on 127.0.0.1:9042: dev/services start cassandra"]
fn cassandra_store_keeps_byte_keys_apart() {
    prosody_core::runtime::handle().unwrap().block_on(async {
        byte_keys(&cassandra_store().await).await;
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

/// A release decided before a later deferral of the same key (and retried after it, as a
/// failed write is) does not erase that deferral.
#[test]
#[ignore = "needs Cassandra on 127.0.0.1:9042: dev/services start cassandra"]
fn cassandra_release_never_erases_a_later_deferral() {
    prosody_core::runtime::handle().unwrap().block_on(async {
        let store = cassandra_store().await;
        let s = scope(0);
        store.defer(&s, b"k", 1, retry(1)).await.unwrap();
        let decided = prosody_core::defer::now_us();
        std::thread::sleep(std::time::Duration::from_millis(2));
        store.defer(&s, b"k", 5, retry(1)).await.unwrap();
        store.release(&s, b"k", decided).await.unwrap();
        assert_eq!(store.offsets(&s, b"k", -1, 10).await.unwrap(), vec![5]);
        assert_eq!(store.load(&s).await.unwrap().len(), 1);
        store
            .release(&s, b"k", prosody_core::defer::now_us())
            .await
            .unwrap();
        assert!(store.load(&s).await.unwrap().is_empty());
    });
}
