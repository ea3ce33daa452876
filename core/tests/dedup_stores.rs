//! Both dedup stores behave alike (memory always; Cassandra in the integration tier, against the
//! Cassandra that `dev/services` starts): recorded fingerprints are seen, others are not, records
//! expire after their TTL; and the two-tier `Dedup` over a Cassandra store answers through the
//! store for what its cache no longer holds.

// A test: a failed unwrap is a failed assertion.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
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

async fn seen(store: &dyn DedupStore, id: u128) -> bool {
    store.seen(&[id]).await.unwrap()[0]
}

async fn records_and_expires(store: &dyn DedupStore) {
    let all = ids(150);
    let (recorded, others) = all.split_at(100);
    store
        .record(recorded, Duration::from_secs(3_600))
        .await
        .unwrap();
    // One read for all 150, answered in their order (more than one IN query's worth).
    let answers = store.seen(&all).await.unwrap();
    assert_eq!(answers.len(), all.len());
    for (id, seen) in all.iter().zip(&answers) {
        assert_eq!(*seen, recorded.contains(id), "{id:x}");
    }
    assert!(store.seen(&[]).await.unwrap().is_empty());
    // Cassandra's TTLs are whole seconds from the write's whole second, checked against the
    // read's whole second: a 2 s TTL ends between 1 and 2 s after the write (a 1 s one could
    // end a millisecond after it, and the read just after would miss it).
    let short = others[0];
    let recorded_at = Instant::now();
    store
        .record(&[short], Duration::from_secs(2))
        .await
        .unwrap();
    assert!(seen(store, short).await);
    std::thread::sleep(Duration::from_millis(2_100).saturating_sub(recorded_at.elapsed()));
    assert!(!seen(store, short).await, "expired after its TTL");
    assert!(seen(store, recorded[0]).await, "a longer TTL stays");
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

/// Counts the calls a store gets, and the ids in them.
struct Counting {
    inner: CassandraStore,
    reads: AtomicUsize,
    read_ids: AtomicUsize,
    writes: AtomicUsize,
    written_ids: AtomicUsize,
}

impl DedupStore for Counting {
    fn seen<'a>(
        &'a self,
        ids: &'a [u128],
    ) -> prosody_core::timers::BoxFuture<'a, Result<Vec<bool>, prosody_core::dedup::DedupError>>
    {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.read_ids.fetch_add(ids.len(), Ordering::SeqCst);
        self.inner.seen(ids)
    }

    fn record<'a>(
        &'a self,
        ids: &'a [u128],
        ttl: Duration,
    ) -> prosody_core::timers::BoxFuture<'a, Result<(), prosody_core::dedup::DedupError>> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.written_ids.fetch_add(ids.len(), Ordering::SeqCst);
        self.inner.record(ids, ttl)
    }
}

/// With a one-entry cache, the store answers for every other id: while its write is on the way
/// (the cache's "writing" set), then from Cassandra. Each miss is one id in one read; each
/// remembered id one row in one write.
#[test]
#[ignore = "needs Cassandra on 127.0.0.1:9042: dev/services start cassandra"]
fn a_one_entry_cache_still_deduplicates_through_cassandra() {
    prosody_core::runtime::handle().unwrap().block_on(async {
        let store = Arc::new(Counting {
            inner: cassandra_store().await,
            reads: AtomicUsize::new(0),
            read_ids: AtomicUsize::new(0),
            writes: AtomicUsize::new(0),
            written_ids: AtomicUsize::new(0),
        });
        let dedup = Dedup::new(
            1,
            "1".into(),
            Duration::from_secs(3_600),
            Some(store.clone() as Arc<dyn DedupStore>),
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
        }
        assert_eq!(dedup.ask(&prints).await, vec![false; 5]);
        for id in &prints {
            assert!(dedup.remember(*id), "the store still has to be written");
        }
        // Not written yet: the cache answers for all five although it holds one.
        for id in &prints {
            assert_eq!(dedup.check(*id), Known::Seen);
        }
        dedup.write(&prints).await;
        let asked = prints
            .iter()
            .filter(|id| dedup.check(**id) == Known::Ask)
            .count();
        assert_eq!(asked, 4, "the cache holds only the last id");
        assert_eq!(dedup.ask(&prints).await, vec![true; 5]);
        let fresh = dedup.fingerprint(origin, MessageId::Text("never"));
        assert_eq!(dedup.ask(&[fresh]).await, vec![false]);
        assert_eq!(store.reads.load(Ordering::SeqCst), 3);
        assert_eq!(store.read_ids.load(Ordering::SeqCst), 11);
        assert_eq!(store.writes.load(Ordering::SeqCst), 1);
        assert_eq!(store.written_ids.load(Ordering::SeqCst), 5);
    });
}
