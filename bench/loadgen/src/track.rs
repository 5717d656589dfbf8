//! Checks a stream of (room, seq) deliveries for one socket: after the first delivery in a room,
//! every next one must be exactly last + 1. Anything else is a gap, a duplicate or a reordering.

use std::collections::HashMap;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct OrderStats {
    pub delivered: u64,
    pub gaps: u64,
    pub duplicates: u64,
    pub reordered: u64,
    /// `message:new` frames whose room or seq could not be read.
    pub malformed: u64,
}

impl OrderStats {
    pub fn add(&mut self, o: OrderStats) {
        self.delivered += o.delivered;
        self.gaps += o.gaps;
        self.duplicates += o.duplicates;
        self.reordered += o.reordered;
        self.malformed += o.malformed;
    }
}

#[derive(Default)]
pub struct OrderTracker {
    last: HashMap<String, i64>,
    seen_below: HashMap<String, std::collections::HashSet<i64>>,
    pub stats: OrderStats,
}

impl OrderTracker {
    /// A raw `message:new` frame: counted, and checked for order when its fields can be read.
    pub fn observe_frame(&mut self, frame: &str) {
        match room_and_seq(frame) {
            Some((room, seq)) => self.observe(room, seq),
            None => {
                self.stats.delivered += 1;
                self.stats.malformed += 1;
            }
        }
    }

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

/// Whether a raw event frame (`["name",{...}]`) is a `message:new`.
pub fn is_message_new(frame: &str) -> bool {
    frame.starts_with(MESSAGE_NEW)
}

const MESSAGE_NEW: &str = "[\"message:new\",";

/// (room_id, seq) of a raw `message:new` frame (`["message:new",{...}]`), picked out without
/// parsing the whole message: the load generator shares the machine with the servers it measures,
/// and a full parse of every delivery cost it more CPU per ack than Redis spends on the send.
/// JSON escapes every quote inside a string, so `"room_id":"` and `"seq":` cannot occur inside the
/// body; the message's own fields come first.
pub fn room_and_seq(frame: &str) -> Option<(&str, i64)> {
    let body = frame.strip_prefix(MESSAGE_NEW)?;
    let room_at = body.find("\"room_id\":\"")? + "\"room_id\":\"".len();
    let room_len = body[room_at..].find('"')?;
    let seq_at = body.find("\"seq\":")? + "\"seq\":".len();
    let digits = body[seq_at..].bytes().take_while(u8::is_ascii_digit).count();
    let seq = body[seq_at..seq_at + digits].parse().ok()?;
    Some((&body[room_at..room_at + room_len], seq))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_and_seq_come_from_the_message_not_its_body() {
        let f = r#"["message:new",{"id":"01J","room_id":"R1","seq":42,"sender_id":"u","client_msg_id":"c","body":"x \"seq\":7 \"room_id\":\"R9\"","created_at":"t"}]"#;
        assert_eq!(room_and_seq(f), Some(("R1", 42)));
        let v: serde_json::Value = serde_json::from_str(f).unwrap();
        assert_eq!(
            (v[1]["room_id"].as_str(), v[1]["seq"].as_i64()),
            (Some("R1"), Some(42)),
            "agrees with a full parse"
        );
        assert_eq!(room_and_seq(r#"["typing",{"room_id":"R1"}]"#), None);
        assert_eq!(room_and_seq(r#"["message:new",{"room_id":"R1","seq":"x"}]"#), None);
    }

    #[test]
    fn unreadable_frames_are_counted_as_malformed() {
        let mut t = OrderTracker::default();
        t.observe_frame(r#"["message:new",{"room_id":"R1","seq":1}]"#);
        t.observe_frame(r#"["message:new",{"room_id":"R1"}]"#);
        t.observe_frame(r#"["message:new",{"room_id":"R1","seq":2}]"#);
        assert_eq!(t.stats, OrderStats { delivered: 3, malformed: 1, ..Default::default() });
    }

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
