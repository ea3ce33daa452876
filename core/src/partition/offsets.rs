//! Which offset of a partition may be committed.
//!
//! Invariant: the committed position is one past the highest offset below which every taken
//! offset has finished. It never passes an unfinished offset, so a crash re-delivers the
//! unfinished tail and loses nothing (at-least-once).

use std::collections::VecDeque;
use std::time::Instant;

/// Taken offsets of one partition, in the order they were taken (which is offset order).
#[derive(Debug, Default)]
pub struct OffsetTracker {
    /// Taken offsets not yet below the watermark, each with whether its event finished and when
    /// it was taken.
    window: VecDeque<(i64, bool, Instant)>,
    /// One past the last retired offset: the position to commit. `None` until one retires.
    position: Option<i64>,
}

impl OffsetTracker {
    /// An empty tracker.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `offset` was taken for processing. Offsets must be taken in increasing order;
    /// an offset at or below the last taken one is ignored and `false` is returned (a replay that
    /// must not move the window backwards).
    pub fn take(&mut self, offset: i64) -> bool {
        let last = self
            .window
            .back()
            .map(|(o, _, _)| *o)
            .or(self.position.map(|p| p - 1));
        if last.is_some_and(|last| offset <= last) {
            return false;
        }
        self.window.push_back((offset, false, Instant::now()));
        true
    }

    /// Marks `offset` finished and returns how many offsets retired below the new watermark.
    /// Unknown offsets are ignored.
    pub fn finish(&mut self, offset: i64) -> usize {
        if let Ok(i) = self.window.binary_search_by_key(&offset, |(o, _, _)| *o) {
            self.window[i].1 = true;
        }
        let mut retired = 0;
        while let Some(&(o, true, _)) = self.window.front() {
            self.window.pop_front();
            self.position = Some(o + 1);
            retired += 1;
        }
        retired
    }

    /// The position to commit: one past the highest offset below which everything finished.
    pub fn committable(&self) -> Option<i64> {
        self.position
    }

    /// When the oldest unfinished offset was taken (the front of the window is never finished).
    pub fn oldest_unfinished_since(&self) -> Option<Instant> {
        self.window.front().map(|(_, _, at)| *at)
    }

    /// Taken offsets not yet retired (finished ones stuck behind an unfinished one included).
    pub fn uncommitted(&self) -> usize {
        self.window.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn commits_only_the_finished_prefix() {
        let mut t = OffsetTracker::new();
        for o in [10, 11, 13, 14] {
            assert!(t.take(o));
        }
        assert_eq!(t.finish(11), 0);
        assert_eq!(t.committable(), None);
        assert_eq!(t.finish(10), 2);
        assert_eq!(t.committable(), Some(12));
        assert_eq!(t.finish(14), 0);
        assert_eq!(t.committable(), Some(12), "13 is unfinished");
        assert_eq!(t.finish(13), 2);
        assert_eq!(t.committable(), Some(15));
        assert!(!t.take(14), "replays are ignored");
        assert_eq!(t.uncommitted(), 0);
    }

    proptest! {
        /// Whatever the finish order, the position never passes an unfinished offset and reaches
        /// one past the last offset once all finished.
        #[test]
        fn never_passes_an_unfinished_offset(
            gaps in proptest::collection::vec(1i64..4, 1..200),
            seed in any::<u64>(),
        ) {
            let mut offsets = Vec::new();
            let mut o = 0;
            for g in gaps { o += g; offsets.push(o); }
            let mut t = OffsetTracker::new();
            for &o in &offsets { prop_assert!(t.take(o)); }
            // A deterministic shuffle from the seed.
            let mut order = offsets.clone();
            let mut s = seed;
            for i in (1..order.len()).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                order.swap(i, (s >> 33) as usize % (i + 1));
            }
            let mut finished = std::collections::BTreeSet::new();
            let mut retired_total = 0;
            for &o in &order {
                retired_total += t.finish(o);
                finished.insert(o);
                if let Some(pos) = t.committable() {
                    for &taken in offsets.iter().filter(|&&x| x < pos) {
                        prop_assert!(finished.contains(&taken), "position {} passed unfinished {}", pos, taken);
                    }
                }
                prop_assert_eq!(t.uncommitted() + retired_total, offsets.len());
            }
            prop_assert_eq!(t.committable(), offsets.last().map(|l| l + 1));
        }
    }
}
