//! The embedded sequencer's decision, made once for every backend: which request of a batch is a
//! duplicate, which conflicts, which names no room, and which seq each accepted one gets.
//!
//! Pure: the backend reads what the decision needs (the stored messages with the batch's dedupe
//! keys and the heads of its rooms) under whatever keeps them from moving until it commits, then
//! writes what [`decide`] answers. The promises are those of [`Store::append_messages`].
//!
//! [`Store::append_messages`]: super::Store::append_messages

use std::collections::{BTreeMap, HashMap};

use super::{AppendOutcome, SendRequest};
use crate::domain::Message;

/// What a batch does to the store.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AppendPlan {
    /// One per request, in batch order.
    pub outcomes: Vec<AppendOutcome>,
    /// The accepted messages, to insert, in batch order.
    pub fresh: Vec<Message>,
    /// The rooms whose head moved, by room id (the order every backend locks rooms in).
    pub heads: Vec<HeadMove>,
}

/// A room's head before and after the batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeadMove {
    pub room_id: String,
    pub from: i64,
    pub to: i64,
}

/// Decides every request of `batch`, in order, given the `stored` messages that share a dedupe
/// key (room, sender, client_msg_id) with some request (others are ignored) and the `heads` of
/// the batch's rooms that exist. A request whose key is stored (or accepted earlier in the
/// batch) is a `Duplicate` when the bodies match and a `Conflict` when they differ; else its room
/// must exist (`RoomMissing`), and it takes the room's head + 1.
pub fn decide(
    batch: &[SendRequest],
    stored: impl IntoIterator<Item = Message>,
    heads: impl IntoIterator<Item = (String, i64)>,
) -> AppendPlan {
    let mut known: HashMap<(String, String, String), Message> =
        stored.into_iter().map(|m| ((m.room_id.clone(), m.sender_id.clone(), m.client_msg_id.clone()), m)).collect();
    let before: HashMap<String, i64> = heads.into_iter().collect();
    let mut after: BTreeMap<&str, i64> = BTreeMap::new();
    let mut plan = AppendPlan { outcomes: Vec::with_capacity(batch.len()), ..AppendPlan::default() };
    for req in batch {
        let key = (req.room_id.clone(), req.sender_id.clone(), req.client_msg_id.clone());
        if let Some(original) = known.get(&key) {
            plan.outcomes.push(if original.body == req.body {
                AppendOutcome::Duplicate(original.clone())
            } else {
                AppendOutcome::Conflict
            });
            continue;
        }
        let Some(&head) = before.get(&req.room_id) else {
            plan.outcomes.push(AppendOutcome::RoomMissing);
            continue;
        };
        let seq = after.entry(&req.room_id).or_insert(head);
        *seq += 1;
        let msg = Message {
            id: req.message_id.clone(),
            room_id: req.room_id.clone(),
            seq: *seq,
            sender_id: req.sender_id.clone(),
            client_msg_id: req.client_msg_id.clone(),
            body: req.body.clone(),
            created_at: req.created_at,
        };
        known.insert(key, msg.clone());
        plan.fresh.push(msg.clone());
        plan.outcomes.push(AppendOutcome::Accepted(msg));
    }
    plan.heads =
        after.into_iter().map(|(room, to)| HeadMove { room_id: room.to_string(), from: before[room], to }).collect();
    plan
}

/// The distinct values, sorted: the rooms of a batch in the order they are locked.
pub fn distinct<'a>(values: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut v: Vec<&str> = values.collect();
    v.sort_unstable();
    v.dedup();
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Timestamp;

    fn req(room: &str, cmid: &str, body: &str) -> SendRequest {
        SendRequest {
            message_id: format!("m-{room}-{cmid}-{body}"),
            room_id: room.into(),
            sender_id: "u".into(),
            client_msg_id: cmid.into(),
            body: body.into(),
            created_at: Timestamp(7),
            trace: String::new(),
            membership: 0,
            epoch: None,
        }
    }

    fn stored(room: &str, seq: i64, cmid: &str, body: &str) -> Message {
        Message {
            id: format!("old-{seq}"),
            room_id: room.into(),
            seq,
            sender_id: "u".into(),
            client_msg_id: cmid.into(),
            body: body.into(),
            created_at: Timestamp(1),
        }
    }

    fn seqs(plan: &AppendPlan) -> Vec<Option<i64>> {
        plan.outcomes.iter().map(|o| if let AppendOutcome::Accepted(m) = o { Some(m.seq) } else { None }).collect()
    }

    #[test]
    fn accepted_requests_take_the_next_seqs_of_their_room() {
        let batch = [req("a", "1", "x"), req("b", "1", "x"), req("a", "2", "x"), req("a", "3", "x")];
        let plan = decide(&batch, [], [("a".to_string(), 5), ("b".to_string(), 0)]);
        assert_eq!(seqs(&plan), [Some(6), Some(1), Some(7), Some(8)]);
        assert_eq!(plan.fresh.len(), 4);
        assert_eq!(plan.fresh[2].id, batch[2].message_id);
        assert_eq!(plan.fresh[2].created_at, Timestamp(7));
        assert_eq!(
            plan.heads,
            [HeadMove { room_id: "a".into(), from: 5, to: 8 }, HeadMove { room_id: "b".into(), from: 0, to: 1 }]
        );
    }

    #[test]
    fn a_stored_key_is_a_duplicate_with_the_same_body_and_a_conflict_with_another() {
        let batch = [req("a", "1", "hi"), req("a", "2", "changed"), req("a", "3", "new")];
        let plan = decide(&batch, [stored("a", 4, "1", "hi"), stored("a", 5, "2", "was")], [("a".to_string(), 5)]);
        assert_eq!(plan.outcomes[0], AppendOutcome::Duplicate(stored("a", 4, "1", "hi")));
        assert_eq!(plan.outcomes[1], AppendOutcome::Conflict);
        assert_eq!(seqs(&plan), [None, None, Some(6)]);
        assert_eq!(plan.heads, [HeadMove { room_id: "a".into(), from: 5, to: 6 }]);
    }

    #[test]
    fn a_key_repeated_in_the_batch_is_decided_against_the_first() {
        let batch = [req("a", "1", "hi"), req("a", "1", "hi"), req("a", "1", "other")];
        let plan = decide(&batch, [], [("a".to_string(), 0)]);
        let AppendOutcome::Accepted(first) = &plan.outcomes[0] else { panic!("{:?}", plan.outcomes) };
        assert_eq!(plan.outcomes[1], AppendOutcome::Duplicate(first.clone()));
        assert_eq!(plan.outcomes[2], AppendOutcome::Conflict);
        assert_eq!(plan.fresh.len(), 1);
        assert_eq!(plan.heads, [HeadMove { room_id: "a".into(), from: 0, to: 1 }]);
    }

    #[test]
    fn a_missing_room_takes_no_seq_and_moves_no_head() {
        let batch = [req("gone", "1", "x"), req("a", "1", "x")];
        let plan = decide(&batch, [], [("a".to_string(), 2)]);
        assert_eq!(plan.outcomes[0], AppendOutcome::RoomMissing);
        assert_eq!(seqs(&plan), [None, Some(3)]);
        assert_eq!(plan.heads, [HeadMove { room_id: "a".into(), from: 2, to: 3 }]);
    }

    #[test]
    fn dedupe_comes_before_the_room_check() {
        // A key stored for a room that is gone since still answers with the original.
        let plan = decide(&[req("gone", "1", "x")], [stored("gone", 1, "1", "x")], []);
        assert_eq!(plan.outcomes, [AppendOutcome::Duplicate(stored("gone", 1, "1", "x"))]);
        assert!(plan.fresh.is_empty() && plan.heads.is_empty());
    }

    #[test]
    fn an_empty_batch_changes_nothing() {
        assert_eq!(decide(&[], [], [("a".to_string(), 3)]), AppendPlan::default());
    }

    #[test]
    fn distinct_sorts_and_dedupes() {
        assert_eq!(distinct(["b", "a", "b", "c", "a"].into_iter()), ["a", "b", "c"]);
    }
}
