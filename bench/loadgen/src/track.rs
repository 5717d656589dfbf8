//! Checks a stream of (room, seq) deliveries for one socket: after the first delivery in a room,
//! every next one must be exactly last + 1. Anything else is a gap, a duplicate or a reordering.

use std::collections::HashMap;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct OrderStats {
    pub delivered: u64,
    pub gaps: u64,
    pub duplicates: u64,
    pub reordered: u64,
}

impl OrderStats {
    pub fn add(&mut self, o: OrderStats) {
        self.delivered += o.delivered;
        self.gaps += o.gaps;
        self.duplicates += o.duplicates;
        self.reordered += o.reordered;
    }
}

#[derive(Default)]
pub struct OrderTracker {
    last: HashMap<String, i64>,
    seen_below: HashMap<String, std::collections::HashSet<i64>>,
    pub stats: OrderStats,
}

impl OrderTracker {
    pub fn observe(&mut self, room: &str, seq: i64) {
        self.stats.delivered += 1;
        match self.last.get(room).copied() {
            None => {
                self.last.insert(room.to_string(), seq);
            }
            Some(last) if seq == last + 1 => {
                self.last.insert(room.to_string(), seq);
            }
            Some(last) if seq > last + 1 => {
                // Remember the hole so a late arrival is counted as reordered, not duplicate.
                let holes = self.seen_below.entry(room.to_string()).or_default();
                holes.extend(last + 1..seq);
                self.stats.gaps += 1;
                self.last.insert(room.to_string(), seq);
            }
            Some(_) => {
                let filled = self.seen_below.get_mut(room).is_some_and(|h| h.remove(&seq));
                if filled {
                    self.stats.reordered += 1;
                } else {
                    self.stats.duplicates += 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(seqs: &[i64]) -> OrderStats {
        let mut t = OrderTracker::default();
        for &s in seqs {
            t.observe("r", s);
        }
        t.stats
    }

    #[test]
    fn in_order_is_clean_from_any_start() {
        assert_eq!(run(&[5, 6, 7, 8]), OrderStats { delivered: 4, ..Default::default() });
    }

    #[test]
    fn detects_gap_duplicate_and_reorder() {
        assert_eq!(run(&[1, 2, 4]).gaps, 1);
        assert_eq!(run(&[1, 2, 2]).duplicates, 1);
        let s = run(&[1, 3, 2, 4]);
        assert_eq!((s.gaps, s.reordered, s.duplicates), (1, 1, 0));
        let s = run(&[1, 3, 2, 2]);
        assert_eq!((s.reordered, s.duplicates), (1, 1));
    }

    #[test]
    fn rooms_are_independent() {
        let mut t = OrderTracker::default();
        for (r, s) in [("a", 1), ("b", 10), ("a", 2), ("b", 11)] {
            t.observe(r, s);
        }
        assert_eq!(t.stats, OrderStats { delivered: 4, ..Default::default() });
    }
}
