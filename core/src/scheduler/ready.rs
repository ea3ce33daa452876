//! The ready events of one class (fresh or retry), ordered for the fair scheduler.
//!
//! Events are grouped by key: a key's events wait in arrival order, and only the oldest one
//! (the key's head) competes. The head's priority is its key's virtual time minus a boost that
//! grows with the square of how long the head has waited. The boost changes with time while the
//! virtual time does not, so a single heap ordered once would go stale. Instead the wait is
//! quantised into [`LEVELS`] + 1 levels: level `i` holds heads that have waited at least
//! `i / LEVELS` of `max_wait` and carries the boost `wait_weight * (i / LEVELS)^2`; the last
//! level holds heads that waited `max_wait` or more and carries the whole `wait_weight`. Inside a
//! level the boost is the same for everyone, so each level is a B-tree ordered by virtual time,
//! plus a B-tree by arrival so that promotion to the next level looks only at the oldest.
//! A grant looks at the first entry of each non-empty level: `O(LEVELS · log n)` per grant,
//! never `O(n)`. When a key's virtual time changes (it was charged), its head is re-keyed in
//! `O(log n)`.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::Hash;
use std::time::Duration;

use foldhash::quality::RandomState;
use tokio::time::Instant;

/// Wait levels below the maximum boost.
pub const LEVELS: usize = 16;

/// A head's place in its level: virtual time in microseconds, then its sequence number.
type Rank = (i64, u64);

struct Level<K> {
    /// Heads by (virtual time, sequence).
    by_vt: BTreeMap<Rank, K>,
    /// Heads' virtual time by (ready since, sequence), for promotion.
    by_age: BTreeMap<(Instant, u64), i64>,
}

impl<K> Default for Level<K> {
    fn default() -> Self {
        Self {
            by_vt: BTreeMap::new(),
            by_age: BTreeMap::new(),
        }
    }
}

/// A key's ready events, oldest first, each with when it became ready. The head is stored
/// inline: most keys have one ready event at a time, and that one needs no allocation.
struct Fifo<T> {
    head: Option<(Instant, T)>,
    rest: VecDeque<(Instant, T)>,
}

impl<T> Fifo<T> {
    fn one(at: Instant, item: T) -> Self {
        Self {
            head: Some((at, item)),
            rest: VecDeque::new(),
        }
    }

    fn front_since(&self) -> Option<Instant> {
        self.head.as_ref().map(|(at, _)| *at)
    }

    fn push_back(&mut self, at: Instant, item: T) {
        if self.head.is_none() {
            self.head = Some((at, item));
        } else {
            self.rest.push_back((at, item));
        }
    }

    fn pop_front(&mut self) -> Option<(Instant, T)> {
        let head = self.head.take();
        self.head = self.rest.pop_front();
        head
    }

    fn is_empty(&self) -> bool {
        self.head.is_none()
    }

    fn take_all(&mut self) -> Vec<(Instant, T)> {
        let mut out = Vec::with_capacity(1 + self.rest.len());
        while let Some(entry) = self.pop_front() {
            out.push(entry);
        }
        out
    }
}

/// A key with ready events.
struct Waiting<T> {
    /// Its ready events.
    events: Fifo<T>,
    /// The head's level, virtual time and sequence number.
    level: usize,
    vt: i64,
    seq: u64,
}

/// Ready events of one class.
pub struct ReadyQueue<K, T> {
    keys: HashMap<K, Waiting<T>, RandomState>,
    levels: Vec<Level<K>>,
    /// Boost of each level, in microseconds of virtual time.
    boost_us: Vec<i64>,
    /// Age at which a head enters each level.
    threshold: Vec<Duration>,
    /// Sequence numbers for heads (ties go in order).
    seq: u64,
    len: usize,
    /// Bit `i` is set while level `i` holds a head, so grants skip empty levels.
    occupied: u32,
}

/// The best head of a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Best {
    /// Its level and rank (virtual time, sequence).
    level: usize,
    vt: i64,
    /// Virtual time minus wait boost, microseconds; lower goes first.
    pub priority: i64,
    /// Sequence number (arrival order of heads), for ties.
    pub seq: u64,
    /// Whether the head has waited `max_wait` or longer.
    pub starving: bool,
}

impl<K: Clone + Eq + Hash, T> ReadyQueue<K, T> {
    /// An empty queue for the given `max_wait` and `wait_weight` (boost at `max_wait`, in
    /// seconds of virtual time).
    pub fn new(max_wait: Duration, wait_weight: f64) -> Self {
        let levels = (0..=LEVELS).map(|_| Level::default()).collect();
        let boost_us = (0..=LEVELS)
            .map(|i| {
                let share = i as f64 / LEVELS as f64;
                (wait_weight * share * share * 1e6) as i64
            })
            .collect();
        let threshold = (0..=LEVELS)
            .map(|i| max_wait.mul_f64(i as f64 / LEVELS as f64))
            .collect();
        Self {
            keys: HashMap::default(),
            levels,
            boost_us,
            threshold,
            seq: 0,
            len: 0,
            occupied: 0,
        }
    }

    fn insert_head(&mut self, level: usize, rank: Rank, since: Instant, key: K) {
        self.levels[level].by_vt.insert(rank, key);
        self.levels[level].by_age.insert((since, rank.1), rank.0);
        self.occupied |= 1 << level;
    }

    fn remove_head(&mut self, level: usize, rank: Rank, since: Option<Instant>) -> Option<K> {
        let l = &mut self.levels[level];
        let key = l.by_vt.remove(&rank);
        if let Some(since) = since {
            l.by_age.remove(&(since, rank.1));
        }
        if l.by_vt.is_empty() {
            self.occupied &= !(1 << level);
        }
        key
    }

    /// Occupied levels, lowest first.
    fn occupied_levels(&self) -> impl Iterator<Item = usize> {
        let mut bits = self.occupied;
        std::iter::from_fn(move || {
            if bits == 0 {
                return None;
            }
            let level = bits.trailing_zeros() as usize;
            bits &= bits - 1;
            Some(level)
        })
    }

    /// Number of ready events.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no event is ready.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The level a head that became ready at `since` belongs in at `now`.
    fn level_for(&self, since: Instant, now: Instant) -> usize {
        let age = now.saturating_duration_since(since);
        self.threshold.iter().rposition(|t| age >= *t).unwrap_or(0)
    }

    fn place_head(&mut self, key: &K, now: Instant) {
        let Some(since) = self.keys.get(key).and_then(|w| w.events.front_since()) else {
            return;
        };
        let level = self.level_for(since, now);
        self.seq += 1;
        let seq = self.seq;
        let Some(waiting) = self.keys.get_mut(key) else {
            return;
        };
        waiting.level = level;
        waiting.seq = seq;
        let rank = (waiting.vt, seq);
        self.insert_head(level, rank, since, key.clone());
    }

    fn unplace_head(&mut self, key: &K) {
        let Some(waiting) = self.keys.get(key) else {
            return;
        };
        let since = waiting.events.front_since();
        let (level, rank) = (waiting.level, (waiting.vt, waiting.seq));
        self.remove_head(level, rank, since);
    }

    /// Adds an event of `key` that became ready at `now`; `vt_us` is the key's virtual time
    /// (used when the key had no ready event).
    pub fn push(&mut self, now: Instant, key: K, vt_us: i64, item: T) {
        self.len += 1;
        let mut new_head = None;
        match self.keys.entry(key) {
            Entry::Occupied(mut waiting) => waiting.get_mut().events.push_back(now, item),
            Entry::Vacant(slot) => {
                self.seq += 1;
                let seq = self.seq;
                new_head = Some((slot.key().clone(), seq));
                slot.insert(Waiting {
                    events: Fifo::one(now, item),
                    level: 0,
                    vt: vt_us,
                    seq,
                });
            }
        }
        if let Some((key, seq)) = new_head {
            self.insert_head(0, (vt_us, seq), now, key);
        }
    }

    /// The key's virtual time changed: re-ranks its head, if it has one here.
    pub fn set_vt(&mut self, key: &K, vt_us: i64) {
        let Some(waiting) = self.keys.get_mut(key) else {
            return;
        };
        if waiting.vt == vt_us {
            return;
        }
        let (level, seq, old) = (waiting.level, waiting.seq, waiting.vt);
        waiting.vt = vt_us;
        let since = waiting.events.front_since();
        let l = &mut self.levels[level];
        if let Some(k) = l.by_vt.remove(&(old, seq)) {
            l.by_vt.insert((vt_us, seq), k);
        }
        if let Some(vt) = since.and_then(|since| l.by_age.get_mut(&(since, seq))) {
            *vt = vt_us;
        }
    }

    /// Moves heads that have waited long enough into their next level.
    pub fn promote(&mut self, now: Instant) {
        if self.len == 0 {
            return;
        }
        // Lowest level first, so a head that aged past several levels moves all the way up.
        for i in 0..LEVELS {
            if self.occupied & (1 << i) == 0 {
                continue;
            }
            let next_at = self.threshold[i + 1];
            while let Some((&(since, seq), &vt)) = self.levels[i].by_age.first_key_value() {
                if now.saturating_duration_since(since) < next_at {
                    break;
                }
                let rank = (vt, seq);
                let Some(key) = self.remove_head(i, rank, Some(since)) else {
                    // Not in the B-tree by virtual time: a stale entry; drop it.
                    self.levels[i].by_age.remove(&(since, seq));
                    continue;
                };
                if let Some(w) = self.keys.get_mut(&key) {
                    w.level = i + 1;
                }
                self.insert_head(i + 1, rank, since, key);
            }
        }
    }

    /// The head that should go next, after [`promote`](Self::promote).
    pub fn best(&self) -> Option<Best> {
        let mut best: Option<Best> = None;
        for level in self.occupied_levels() {
            let Some((&(vt, seq), _)) = self.levels[level].by_vt.first_key_value() else {
                continue;
            };
            let priority = vt.saturating_sub(self.boost_us[level]);
            let better = match &best {
                None => true,
                Some(b) => (priority, seq) < (b.priority, b.seq),
            };
            if better {
                best = Some(Best {
                    level,
                    vt,
                    priority,
                    seq,
                    starving: level == LEVELS,
                });
            }
        }
        best
    }

    /// The key of the head `best` names.
    #[cfg(test)]
    fn key_of(&self, best: &Best) -> Option<&K> {
        self.levels[best.level].by_vt.get(&(best.vt, best.seq))
    }

    /// Removes the head `best` names and returns its key (moved out, not cloned), its event and
    /// when that event was pushed; the key's next event (if any) becomes its head, placed by its
    /// own age.
    pub fn take_best(&mut self, best: &Best, now: Instant) -> Option<(K, T, Instant)> {
        let level = best.level;
        let key = self.levels[level].by_vt.remove(&(best.vt, best.seq))?;
        if self.levels[level].by_vt.is_empty() {
            self.occupied &= !(1 << level);
        }
        // Most keys have one ready event: remove the entry, and put it back only if more wait.
        let mut waiting = self.keys.remove(&key)?;
        let (since, item) = waiting.events.pop_front()?;
        self.len -= 1;
        self.levels[level].by_age.remove(&(since, best.seq));
        if let Some(next_since) = waiting.events.front_since() {
            let level = self.level_for(next_since, now);
            self.seq += 1;
            waiting.level = level;
            waiting.seq = self.seq;
            self.insert_head(level, (waiting.vt, waiting.seq), next_since, key.clone());
            self.keys.insert(key.clone(), waiting);
        }
        Some((key, item, since))
    }

    /// Removes every event for which `drop` is true, returning them.
    pub fn remove_where(&mut self, mut drop: impl FnMut(&T) -> bool) -> Vec<T> {
        let now = Instant::now();
        let keys: Vec<K> = self.keys.keys().cloned().collect();
        let mut out = Vec::new();
        for key in keys {
            self.unplace_head(&key);
            if let Some(waiting) = self.keys.get_mut(&key) {
                for (at, item) in waiting.events.take_all() {
                    if drop(&item) {
                        out.push(item);
                    } else {
                        waiting.events.push_back(at, item);
                    }
                }
                if waiting.events.is_empty() {
                    self.keys.remove(&key);
                    continue;
                }
            }
            self.place_head(&key, now);
        }
        self.len -= out.len();
        out
    }

    /// Removes every event.
    pub fn drain(&mut self) -> Vec<T> {
        self.remove_where(|_| true)
    }
}

/// A quantity that halves every `half_life` (handler time used by a key or a class).
#[derive(Debug, Clone, Copy)]
pub struct Decaying {
    value: f64,
    at: Instant,
}

impl Decaying {
    /// Zero at `now`.
    pub fn new(now: Instant) -> Self {
        Self {
            value: 0.0,
            at: now,
        }
    }

    /// The value at `now`.
    pub fn at(&self, now: Instant, half_life: Duration) -> f64 {
        let age = now.saturating_duration_since(self.at).as_secs_f64();
        self.value * (-age / half_life.as_secs_f64().max(1e-3) * std::f64::consts::LN_2).exp()
    }

    /// Adds `amount` at `now`.
    pub fn add(&mut self, now: Instant, half_life: Duration, amount: f64) {
        self.value = self.at(now, half_life) + amount;
        self.at = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain_order(q: &mut ReadyQueue<&'static str, u32>, now: Instant) -> Vec<u32> {
        let mut order = Vec::new();
        while let Some(best) = q.best() {
            order.extend(q.take_best(&best, now).map(|(_, item, _)| item));
        }
        order
    }

    #[test]
    fn lowest_virtual_time_first_then_arrival_and_key_order() {
        let now = Instant::now();
        let mut q = ReadyQueue::new(Duration::from_secs(120), 200.0);
        q.push(now, "b", 500, 1);
        q.push(now, "a", 0, 2);
        q.push(now, "c", 500, 3);
        q.push(now, "a", 0, 4);
        // "a" has the lowest virtual time: both its events go first, in order.
        assert_eq!(drain_order(&mut q, now), vec![2, 4, 1, 3]);
        assert!(q.is_empty());
    }

    #[test]
    fn a_charged_key_is_re_ranked() {
        let now = Instant::now();
        let mut q = ReadyQueue::new(Duration::from_secs(120), 200.0);
        q.push(now, "hot", 0, 1);
        q.push(now, "hot", 0, 2);
        q.push(now, "cold", 0, 3);
        let best = q.best().and_then(|b| q.key_of(&b).copied());
        assert_eq!(best, Some("hot"));
        let taken = q.best().and_then(|b| q.take_best(&b, now));
        assert_eq!(taken, Some(("hot", 1, now)));
        q.set_vt(&"hot", 1_000_000);
        assert_eq!(drain_order(&mut q, now), vec![3, 2]);
    }

    #[test]
    fn waiting_overrides_virtual_time() {
        let start = Instant::now();
        let max_wait = Duration::from_secs(120);
        let mut q = ReadyQueue::new(max_wait, 200.0);
        // A key that used 190 s of handler time (just under the whole boost of 200 s), waiting
        // since `start`.
        q.push(start, "heavy", 190_000_000, 1);
        // A fresh key arriving just before the heavy one reached the full boost.
        let later = start + max_wait - Duration::from_secs(1);
        q.push(later, "fresh", 0, 2);
        q.promote(later);
        let best = q.best().and_then(|b| q.key_of(&b).copied());
        assert_eq!(best, Some("fresh"));
        let taken = q.best().and_then(|b| q.take_best(&b, later));
        assert_eq!(taken.map(|(key, _, _)| key), Some("fresh"));
        q.push(later, "fresh2", 0, 3);
        q.promote(start + max_wait);
        let best = q.best();
        assert!(best.as_ref().is_some_and(|b| b.starving));
        assert_eq!(best.and_then(|b| q.key_of(&b).copied()), Some("heavy"));
    }

    #[test]
    fn a_new_head_keeps_the_age_of_its_event() {
        let start = Instant::now();
        let max_wait = Duration::from_secs(16);
        let mut q = ReadyQueue::new(max_wait, 200.0);
        q.push(start, "k", 0, 1);
        q.push(start, "k", 0, 2);
        let now = start + max_wait;
        let taken = q.best().and_then(|b| q.take_best(&b, now));
        assert_eq!(taken, Some(("k", 1, start)));
        assert!(
            q.best().is_some_and(|b| b.starving),
            "event 2 waited max_wait"
        );
    }

    #[test]
    fn decay_halves_every_half_life() {
        let now = Instant::now();
        let mut d = Decaying::new(now);
        d.add(now, Duration::from_secs(60), 8.0);
        let later = now + Duration::from_secs(120);
        assert!((d.at(later, Duration::from_secs(60)) - 2.0).abs() < 1e-9);
    }
}
