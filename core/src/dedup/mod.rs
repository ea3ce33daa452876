//! Deduplication by message id: a message whose JSON payload carries an `id` that was already
//! handled for the same key (in the same consumer group and topic) is skipped.
//!
//! A message's identity is a 128-bit fingerprint (XXH3) of `idempotence_version`, group, topic,
//! key and id; changing the version changes every fingerprint, so earlier records no longer
//! match. Two tiers remember fingerprints:
//! - a cache of `idempotence_cache_size` entries per client, shared by all its partitions (so it
//!   survives reassignment within the process), consulted first (in mock mode the memory store
//!   answers at once and the cache is not filled);
//! - a store (Cassandra, or process memory in mock mode) with rows that expire after
//!   `idempotence_ttl`, consulted on a cache miss, so a message redelivered after a crash or a
//!   rebalance to another process is still skipped.
//!
//! A fingerprint is remembered once its message was handled for good (success or permanent
//! failure). The store is best-effort: when a read fails the message is handled (at-least-once
//! still holds), when a write fails the record is lost; each kind of failure is logged at most
//! once a minute.

pub mod cassandra;
pub mod memory;

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use twox_hash::XxHash3_128;

use crate::payload::Payload;
use crate::timers::BoxFuture;

/// A message identity: XXH3-128 of version, group, topic, key and id.
pub type Fingerprint = u128;

/// Hashes a [`Fingerprint`] for a map by folding its bits: it is a hash already.
#[derive(Default)]
pub struct FingerprintHasher(u64);

impl Hasher for FingerprintHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = self.0.rotate_left(5) ^ u64::from_le_bytes(word);
        }
    }

    fn write_u128(&mut self, id: u128) {
        // Truncation intended: the two halves folded into one.
        self.0 = (id as u64) ^ ((id >> 64) as u64);
    }
}

/// A map keyed by fingerprints.
pub type FingerprintMap<V> = HashMap<Fingerprint, V, BuildHasherDefault<FingerprintHasher>>;

/// A store operation that failed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct DedupError(pub String);

/// Where fingerprints outlive the cache.
pub trait DedupStore: Send + Sync {
    /// Which of `ids` were recorded (and have not expired), in their order.
    fn seen<'a>(&'a self, ids: &'a [Fingerprint]) -> BoxFuture<'a, Result<Vec<bool>, DedupError>>;

    /// Records `ids`, each expiring after `ttl`.
    fn record<'a>(
        &'a self,
        ids: &'a [Fingerprint],
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), DedupError>>;

    /// The answer of [`seen`](Self::seen) when the store can give it without waiting (memory).
    fn seen_now(&self, _id: Fingerprint) -> Option<bool> {
        None
    }

    /// Records `ids` at once when the store can (memory); `false` when the caller must use
    /// [`record`](Self::record).
    fn record_now(&self, _ids: &[Fingerprint], _ttl: Duration) -> bool {
        false
    }

    /// Whether [`seen_now`](Self::seen_now) always answers and [`record_now`](Self::record_now)
    /// always records (memory).
    fn answers_at_once(&self) -> bool {
        false
    }
}

/// A message's `id`: a String or an Integer at the top level of a JSON object. A String `"7"`
/// and an Integer `7` are different ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageId<'a> {
    /// A String id.
    Text(&'a str),
    /// An Integer id, by its digits (any size).
    Integer(&'a serde_json::Number),
}

impl<'a> MessageId<'a> {
    /// The id of a payload; `None` when it is not an object, has no `id`, or its `id` is neither
    /// a String nor an Integer (a float, `null`, an Array, an object).
    pub fn of(payload: &'a Payload) -> Option<Self> {
        match payload.id()? {
            Value::String(s) => Some(Self::Text(s)),
            Value::Number(n) if is_integer(n) => Some(Self::Integer(n)),
            _ => None,
        }
    }
}

/// Whether a JSON number is written as an integer (no fraction, no exponent).
fn is_integer(n: &serde_json::Number) -> bool {
    let text = n.as_str();
    let digits = text.strip_prefix('-').unwrap_or(text);
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
}

/// Where a message was consumed, for its fingerprint.
#[derive(Debug, Clone, Copy)]
pub struct Origin<'a> {
    /// Consumer group.
    pub group: &'a str,
    /// Topic.
    pub topic: &'a str,
    /// Record key; `None` for a keyless record (different from an empty key).
    pub key: Option<&'a [u8]>,
}

/// What the fast tiers know of a fingerprint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Known {
    /// Handled before: skip the message.
    Seen,
    /// Not handled before.
    New,
    /// Unknown to the cache; the store must be asked ([`Dedup::ask`]).
    Ask,
}

/// Caches of at least this many entries are split in [`SHARDS`] locks.
const SHARDED_FROM: usize = 1024;
/// Locks of a large cache (partitions on different threads rarely meet on one).
const SHARDS: usize = 16;

/// Deduplication for one client: the cache and the store.
pub struct Dedup {
    /// `idempotence_version`.
    version: String,
    /// `idempotence_ttl`.
    ttl: Duration,
    /// The cache, split by fingerprint.
    shards: Vec<Mutex<Shard>>,
    /// The store, when the client has one (Cassandra, or memory in mock mode).
    store: Option<Arc<dyn DedupStore>>,
    /// Whether the store answers and records at once (memory): the cache is then never filled
    /// (see [`Dedup::remember`]), so lookups skip it.
    immediate: bool,
    /// When each kind of store failure was last logged.
    logged: Mutex<HashMap<&'static str, Instant>>,
}

/// Fingerprints with their expiry, at most `capacity` of them (the oldest go first): a cache
/// shard, and a shard of the memory store.
#[derive(Default)]
pub(crate) struct Recent {
    capacity: usize,
    /// Fingerprint → (expiry, insertion number).
    expiry: FingerprintMap<(Instant, u64)>,
    /// Insertion order, for eviction; an entry whose number no longer matches is stale.
    order: VecDeque<(Fingerprint, u64)>,
    /// Next insertion number.
    next: u64,
}

impl Recent {
    /// Empty, holding at most `capacity` fingerprints.
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            capacity,
            ..Self::default()
        }
    }

    /// Whether `id` is held and not expired (an expired one is dropped).
    pub(crate) fn contains(&mut self, id: Fingerprint) -> bool {
        match self.expiry.get(&id) {
            Some((until, _)) if Instant::now() < *until => true,
            Some(_) => {
                self.expiry.remove(&id);
                false
            }
            None => false,
        }
    }

    /// Holds `id` until `until`, evicting the oldest beyond the capacity.
    pub(crate) fn insert(&mut self, id: Fingerprint, until: Instant) {
        let number = self.next;
        self.next = self.next.wrapping_add(1);
        self.expiry.insert(id, (until, number));
        self.order.push_back((id, number));
        while self.expiry.len() > self.capacity {
            let Some((old, n)) = self.order.pop_front() else {
                break;
            };
            if self.expiry.get(&old).is_some_and(|(_, m)| *m == n) {
                self.expiry.remove(&old);
            }
        }
        if self.order.len() > self.capacity.saturating_mul(2).max(64) {
            let expiry = &self.expiry;
            self.order
                .retain(|(id, n)| expiry.get(id).is_some_and(|(_, m)| m == n));
        }
    }
}

/// When something recorded now with `ttl` expires (a TTL too large to add to now never does).
pub(crate) fn expiry(ttl: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(ttl)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}

/// One lock's part of the cache.
struct Shard {
    recent: Recent,
    /// Fingerprints whose store write is on its way (count of writes), so a cache too small to
    /// hold them still answers for them until the store does.
    writing: FingerprintMap<u32>,
}

impl Dedup {
    /// Deduplication with a cache of `capacity` fingerprints (at least 1) and `store`.
    pub fn new(
        capacity: usize,
        version: String,
        ttl: Duration,
        store: Option<Arc<dyn DedupStore>>,
    ) -> Self {
        let capacity = capacity.max(1);
        let count = if capacity >= SHARDED_FROM { SHARDS } else { 1 };
        let shards = (0..count)
            .map(|i| {
                Mutex::new(Shard {
                    // The first shards take the remainder, so the total is `capacity`.
                    recent: Recent::new(capacity / count + usize::from(i < capacity % count)),
                    writing: FingerprintMap::default(),
                })
            })
            .collect();
        let immediate = store.as_ref().is_some_and(|s| s.answers_at_once());
        Self {
            version,
            ttl,
            shards,
            store,
            immediate,
            logged: Mutex::new(HashMap::new()),
        }
    }

    /// The fingerprint of a message id consumed at `origin`.
    pub fn fingerprint(&self, origin: Origin<'_>, id: MessageId<'_>) -> Fingerprint {
        let mut hasher = XxHash3_128::new();
        let mut field = |bytes: &[u8]| {
            hasher.write(&(bytes.len() as u64).to_le_bytes());
            hasher.write(bytes);
        };
        field(b"prosody-dedup-1");
        field(self.version.as_bytes());
        field(origin.group.as_bytes());
        field(origin.topic.as_bytes());
        match origin.key {
            None => field(b"-"),
            Some(key) => {
                field(b"k");
                field(key);
            }
        }
        match id {
            MessageId::Text(text) => {
                field(b"s");
                field(text.as_bytes());
            }
            MessageId::Integer(n) => {
                // The digits as written (JSON integers have one spelling).
                field(b"i");
                field(n.as_str().as_bytes());
            }
        }
        hasher.finish_128()
    }

    fn shard(&self, id: Fingerprint) -> std::sync::MutexGuard<'_, Shard> {
        let index = (id as usize) % self.shards.len();
        // A poisoned shard only means a panic while it was held; its maps stay usable.
        self.shards[index]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether every lookup is answered at once (no store, or one in memory): nothing to read
    /// ahead.
    pub fn answers_at_once(&self) -> bool {
        self.store.is_none() || self.immediate
    }

    /// What the cache (and a store that answers at once) knows of `id`.
    pub fn check(&self, id: Fingerprint) -> Known {
        if !self.immediate {
            let mut shard = self.shard(id);
            if shard.recent.contains(id) || shard.writing.contains_key(&id) {
                return Known::Seen;
            }
        }
        match self.store.as_ref() {
            None => Known::New,
            // A store's answer is not cached: the cache would keep it for a whole TTL from now,
            // past the record's own expiry.
            Some(store) => match store.seen_now(id) {
                Some(true) => Known::Seen,
                Some(false) => Known::New,
                None => Known::Ask,
            },
        }
    }

    /// Asks the store which of `ids` were recorded (in one read); a failed read counts as "not
    /// seen" (the messages are handled) and is logged.
    pub async fn ask(&self, ids: &[Fingerprint]) -> Vec<bool> {
        let count = ids.len();
        let Some(store) = self.store.as_ref() else {
            return vec![false; count];
        };
        let failure = match store.seen(ids).await {
            Ok(seen) if seen.len() == count => return seen,
            Ok(seen) => format!("the store answered for {} of them", seen.len()),
            Err(e) => e.to_string(),
        };
        self.log_failure(
            "read",
            &format!(
                "could not read {count} deduplication record(s) ({failure}); the messages are \
                 handled"
            ),
        );
        vec![false; count]
    }

    /// Remembers that `id` was handled. Returns `true` when the store must still be written
    /// ([`write`](Self::write)); the cache answers for it until then. A store that records at
    /// once (memory, in mock mode) answers at once too, so the cache is left out: one map
    /// instead of two per message.
    pub fn remember(&self, id: Fingerprint) -> bool {
        let pending = match self.store.as_ref() {
            Some(store) if store.record_now(&[id], self.ttl) => return false,
            Some(_) => true,
            None => false,
        };
        let mut shard = self.shard(id);
        shard.recent.insert(id, expiry(self.ttl));
        if pending {
            *shard.writing.entry(id).or_insert(0) += 1;
        }
        pending
    }

    /// Writes remembered fingerprints to the store (one write per fingerprint, sent together);
    /// a failure is logged and loses the records, never the messages.
    pub async fn write(&self, ids: &[Fingerprint]) {
        let Some(store) = self.store.as_ref() else {
            return;
        };
        let count = ids.len();
        match store.record(ids, self.ttl).await {
            Ok(()) => tracing::debug!("stored {count} deduplication record(s)"),
            Err(e) => self.log_failure(
                "write",
                &format!(
                    "could not write {count} deduplication record(s) ({e}); a redelivery of \
                     those messages after a restart would be handled again"
                ),
            ),
        }
        for &id in ids {
            let mut shard = self.shard(id);
            if let Some(n) = shard.writing.get_mut(&id) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    shard.writing.remove(&id);
                }
            }
        }
    }

    /// Logs a store failure, at most once a minute per kind.
    fn log_failure(&self, kind: &'static str, message: &str) {
        let mut logged = self
            .logged
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        if logged
            .get(kind)
            .is_some_and(|at| now.duration_since(*at) < LOG_EVERY)
        {
            return;
        }
        logged.insert(kind, now);
        tracing::warn!("{message} (further {kind} failures of the deduplication store are not logged for a minute)");
    }
}

/// Interval between two log lines of the same kind of store failure.
const LOG_EVERY: Duration = Duration::from_secs(60);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn payload(value: Value) -> Payload {
        Payload::parse(value.to_string().as_bytes()).unwrap()
    }

    fn origin(key: Option<&[u8]>) -> Origin<'_> {
        Origin {
            group: "g",
            topic: "t",
            key,
        }
    }

    #[test]
    fn ids_are_top_level_strings_and_integers() {
        let big = Payload::parse(br#"{"id": 123456789012345678901234567890}"#).unwrap();
        assert!(matches!(MessageId::of(&big), Some(MessageId::Integer(_))));
        assert_eq!(
            MessageId::of(&payload(json!({"id": "a"}))),
            Some(MessageId::Text("a"))
        );
        assert!(matches!(
            MessageId::of(&payload(json!({"id": -7}))),
            Some(MessageId::Integer(_))
        ));
        for value in [
            json!({"id": 1.5}),
            json!({"id": null}),
            json!({"id": [1]}),
            json!({"id": {"a": 1}}),
            json!({"ID": "a"}),
            json!({"nested": {"id": "a"}}),
            json!(["id"]),
            json!("id"),
            Value::Null,
        ] {
            assert_eq!(MessageId::of(&payload(value.clone())), None, "{value}");
        }
        let exp = Payload::parse(br#"{"id": 1e3}"#).unwrap();
        assert_eq!(MessageId::of(&exp), None);
    }

    #[test]
    fn the_fingerprint_covers_version_key_and_id_kind() {
        let d = Dedup::new(8, "1".into(), Duration::from_secs(60), None);
        let v2 = Dedup::new(8, "2".into(), Duration::from_secs(60), None);
        let seven = payload(json!({"id": 7}));
        let int = MessageId::of(&seven).unwrap();
        let a = d.fingerprint(origin(Some(b"k")), MessageId::Text("7"));
        assert_ne!(a, d.fingerprint(origin(Some(b"k")), int));
        assert_ne!(a, d.fingerprint(origin(Some(b"j")), MessageId::Text("7")));
        assert_ne!(a, d.fingerprint(origin(None), MessageId::Text("7")));
        assert_ne!(a, d.fingerprint(origin(Some(b"")), MessageId::Text("7")));
        assert_ne!(a, v2.fingerprint(origin(Some(b"k")), MessageId::Text("7")));
        assert_eq!(a, d.fingerprint(origin(Some(b"k")), MessageId::Text("7")));
    }

    #[test]
    fn the_cache_holds_its_capacity_and_evicts_the_oldest() {
        let d = Dedup::new(2, "1".into(), Duration::from_secs(60), None);
        for id in [1, 2, 3] {
            assert_eq!(d.check(id), Known::New);
            assert!(!d.remember(id));
        }
        assert_eq!(d.check(1), Known::New);
        assert_eq!(d.check(2), Known::Seen);
        assert_eq!(d.check(3), Known::Seen);
        let big = Dedup::new(5000, "1".into(), Duration::from_secs(60), None);
        for id in 0..10_000u128 {
            big.remember(id.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        }
        let held = (0..10_000u128)
            .filter(|id| big.check(id.wrapping_mul(0x9E37_79B9_7F4A_7C15)) == Known::Seen)
            .count();
        assert_eq!(held, 5000);
    }

    /// A store whose every call fails.
    struct Down;

    impl DedupStore for Down {
        fn seen<'a>(
            &'a self,
            _: &'a [Fingerprint],
        ) -> BoxFuture<'a, Result<Vec<bool>, DedupError>> {
            Box::pin(std::future::ready(Err(DedupError(
                "connection refused".into(),
            ))))
        }

        fn record<'a>(
            &'a self,
            _: &'a [Fingerprint],
            _: Duration,
        ) -> BoxFuture<'a, Result<(), DedupError>> {
            Box::pin(std::future::ready(Err(DedupError(
                "connection refused".into(),
            ))))
        }
    }

    #[test]
    fn a_failing_store_lets_messages_run_and_is_logged_once_per_kind() {
        let d = Dedup::new(8, "1".into(), Duration::from_secs(60), Some(Arc::new(Down)));
        crate::runtime::handle().unwrap().block_on(async {
            assert_eq!(d.check(1), Known::Ask);
            assert_eq!(d.ask(&[1, 2]).await, vec![false, false]);
            assert_eq!(d.ask(&[3]).await, vec![false]);
            assert!(d.remember(1));
            d.write(&[1]).await;
            d.write(&[2]).await;
        });
        // The cache still knows what this process handled; the failed write left no "writing"
        // entry behind.
        assert_eq!(d.check(1), Known::Seen);
        assert!(d.shard(1).writing.is_empty());
        let logged = d.logged.lock().unwrap();
        assert_eq!(logged.len(), 2, "one line per kind: read, write");
    }

    #[test]
    fn cached_entries_expire_with_the_ttl() {
        let d = Dedup::new(8, "1".into(), Duration::from_millis(1), None);
        d.remember(1);
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(d.check(1), Known::New);
    }
}
