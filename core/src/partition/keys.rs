//! Per-key FIFO queues: a key has at most one event in flight; the next event of that key is
//! released only when the previous one finished. Different keys never wait for each other here
//! (the scheduler decides how many run at once).

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

use foldhash::quality::RandomState;

/// The waiting events of every key that has an event in flight.
#[derive(Debug)]
pub struct KeyQueues<K, E> {
    /// A key is present exactly while one of its events is in flight; the deque holds the events
    /// that wait behind it, in arrival order.
    active: HashMap<K, VecDeque<E>, RandomState>,
    /// Events waiting behind an in-flight one, over every key.
    waiting: usize,
}

impl<K: Hash + Eq + Clone, E> Default for KeyQueues<K, E> {
    fn default() -> Self {
        Self {
            active: HashMap::default(),
            waiting: 0,
        }
    }
}

impl<K: Hash + Eq + Clone, E> KeyQueues<K, E> {
    /// Empty queues.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an event. Returns it back when its key was idle: the caller must start it now, and the
    /// key counts as in flight until [`finish`](Self::finish). Otherwise it waits in the key's queue.
    pub fn push(&mut self, key: K, event: E) -> Option<E> {
        match self.active.entry(key) {
            Entry::Occupied(mut waiting) => {
                waiting.get_mut().push_back(event);
                self.waiting += 1;
                None
            }
            Entry::Vacant(idle) => {
                idle.insert(VecDeque::new());
                Some(event)
            }
        }
    }

    /// The in-flight event of `key` finished. Returns the key's next event, which is now in flight,
    /// or `None` when the key became idle.
    pub fn finish(&mut self, key: &K) -> Option<E> {
        let waiting = self.active.get_mut(key)?;
        let next = waiting.pop_front();
        match next {
            Some(_) => self.waiting -= 1,
            None => {
                self.active.remove(key);
            }
        }
        next
    }

    /// Drops every waiting (not in-flight) event and returns how many there were; in-flight keys
    /// stay in flight.
    pub fn drop_waiting(&mut self) -> usize {
        self.waiting = 0;
        self.active
            .values_mut()
            .map(|q| {
                let n = q.len();
                q.clear();
                n
            })
            .sum()
    }

    /// Events waiting behind an in-flight event of their key.
    pub fn waiting(&self) -> usize {
        self.waiting
    }

    /// Keys with an event in flight (each has exactly one; the events waiting behind them are
    /// not counted): zero when nothing runs or waits.
    pub fn in_flight(&self) -> usize {
        self.active.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Random arrivals and completions: each key's events start in arrival order, never two of
        /// one key at once, and an idle key's event starts immediately whatever other keys do.
        #[test]
        fn order_per_key_and_concurrency_across_keys(
            ops in proptest::collection::vec((0u8..8, any::<bool>(), any::<u8>()), 1..400)
        ) {
            let mut q: KeyQueues<u8, (u8, u32)> = KeyQueues::new();
            let mut in_flight: Vec<(u8, u32)> = Vec::new();
            let mut started: HashMap<u8, Vec<u32>> = HashMap::new();
            let mut seq: HashMap<u8, u32> = HashMap::new();
            for (key, arrive, pick) in ops {
                if arrive || in_flight.is_empty() {
                    let n = seq.entry(key).or_default();
                    let was_idle = !in_flight.iter().any(|(k, _)| *k == key);
                    let started_now = q.push(key, (key, *n));
                    prop_assert_eq!(started_now.is_some(), was_idle);
                    if let Some(e) = started_now {
                        started.entry(key).or_default().push(e.1);
                        in_flight.push(e);
                    }
                    *n += 1;
                } else {
                    let (k, _) = in_flight.remove(pick as usize % in_flight.len());
                    if let Some(next) = q.finish(&k) {
                        prop_assert_eq!(next.0, k);
                        started.entry(k).or_default().push(next.1);
                        in_flight.push(next);
                    }
                }
                let mut keys: Vec<u8> = in_flight.iter().map(|(k, _)| *k).collect();
                keys.sort_unstable();
                let before = keys.len();
                keys.dedup();
                prop_assert_eq!(before, keys.len(), "two events of one key in flight");
                prop_assert_eq!(q.in_flight(), keys.len());
                prop_assert_eq!(q.waiting(), q.active.values().map(VecDeque::len).sum::<usize>());
            }
            for seqs in started.values() {
                prop_assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "out of order: {:?}", seqs);
            }
        }
    }
}
