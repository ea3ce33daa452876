//! Both dedup stores behave alike (memory always; Cassandra in the integration tier, against the
//! Cassandra that `dev/services` starts): recorded fingerprints are seen, others are not, records
//! expire after their TTL; and the two-tier `Dedup` over a Cassandra store answers through the
//! store for what its cache no longer holds.

// A test: a failed unwrap is a failed assertion.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use prosody_core::dedup::cassandra::{CassandraStore, MIGRATIONS};
use prosody_core::dedup::memory::MemoryStore;
use prosody_core::dedup::{Dedup, DedupStore, Known, MessageId, Origin};

/// Fingerprints unlikely to meet another run's (the Cassandra keyspace is fresh anyway).
fn ids(n: u128) -> Vec<u128> {
    let base = u128::from(std::process::id()) << 64 | u128::from(rand_u32()) << 32;
    (0..n).map(|i| base + i).collect()
}

fn rand_u32() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
}

async fn records_and_expires(store: &dyn DedupStore) {
    let all = ids(150);
    let (recorded, others) = all.split_at(100);
    store
        .record(recorded.to_vec(), Duration::from_secs(3_600))
        .await
        .unwrap();
    for id in recorded {
        assert!(store.seen(*id).await.unwrap(), "{id:x} was recorded");
    }
    for id in others {
        assert!(!store.seen(*id).await.unwrap(), "{id:x} was not recorded");
    }
    // Cassandra's TTLs are whole seconds, checked at read time.
    let short = others[0];
    let recorded_at = Instant::now();
    store
        .record(vec![short], Duration::from_secs(1))
        .await
        .unwrap();
    assert!(store.seen(short).await.unwrap());
    std::thread::sleep(Duration::from_millis(2_100).saturating_sub(recorded_at.elapsed()));
    assert!(!store.seen(short).await.unwrap(), "expired after its TTL");
    assert!(store.seen(recorded[0]).await.unwrap(), "a longer TTL stays");
}

#[test]
fn memory_store_records_and_expires() {
    prosody_core::runtime::handle().unwrap().block_on(async {
        records_and_expires(&MemoryStore::new()).await;
    });
}

async fn cassandra_store() -> CassandraStore {
    let (session, keyspace) = common::migrated_cassandra(MIGRATIONS).await;
    CassandraStore::new(session, &keyspace).await.unwrap()
}

#[test]
#[ignore = "needs Cassandra on 127.0.0.1:9042: dev/services start cassandra"]
fn cassandra_store_records_and_expires() {
    prosody_core::runtime::handle().unwrap().block_on(async {
        records_and_expires(&cassandra_store().await).await;
    });
}

/// With a one-entry cache, the store answers for every other id: while its write is on the way
/// (the cache's "writing" set), then from Cassandra.
#[test]
#[ignore = "needs Cassandra on 127.0.0.1:9042: dev/services start cassandra"]
fn a_one_entry_cache_still_deduplicates_through_cassandra() {
    prosody_core::runtime::handle().unwrap().block_on(async {
        let store: Arc<dyn DedupStore> = Arc::new(cassandra_store().await);
        let dedup = Dedup::new(
            1,
            "1".into(),
            Duration::from_secs(3_600),
            Some(store.clone()),
        );
        let origin = Origin {
            group: "g",
            topic: "t",
            key: Some(b"k"),
        };
        let names: Vec<String> = (0..5).map(|i| format!("id-{i}")).collect();
        let prints: Vec<u128> = names
            .iter()
            .map(|n| dedup.fingerprint(origin, MessageId::Text(n)))
            .collect();
        for id in &prints {
            assert_eq!(dedup.check(*id), Known::Ask, "unknown to the cache");
            assert!(!dedup.ask(*id).await);
            assert!(dedup.remember(*id), "the store still has to be written");
        }
        // Not written yet: the cache answers for all five although it holds one.
        for id in &prints {
            assert_eq!(dedup.check(*id), Known::Seen);
        }
        dedup.write(prints.clone()).await;
        let seen_by_store = prints
            .iter()
            .filter(|id| dedup.check(**id) == Known::Ask)
            .count();
        assert_eq!(seen_by_store, 4, "the cache holds only the last id");
        for id in &prints {
            assert!(dedup.ask(*id).await, "Cassandra has {id:x}");
        }
        let fresh = dedup.fingerprint(origin, MessageId::Text("never"));
        assert!(!dedup.ask(fresh).await);
    });
}
