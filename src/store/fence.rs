//! The fencing rule of [`Store::upsert_messages_fenced`], decided once for every backend: which
//! messages of a batch the rooms' fences refuse.
//!
//! Pure: the backend reads the fences of the batch's rooms under whatever keeps them from changing
//! until it commits (a room row lock, SQLite's one writer, a transaction that writes each room's
//! fence document), then writes what [`split`] lets through.
//!
//! [`Store::upsert_messages_fenced`]: super::Store::upsert_messages_fenced

use std::collections::HashMap;

use super::{FencedMessage, RoomFence};
use crate::domain::Message;

/// Whether `fences` refuse a message of seq `seq` sequenced under `token`: one of them (of the
/// message's room) starts at or below `seq` and belongs to a newer epoch than `token`.
pub fn refuses<'a>(fences: impl IntoIterator<Item = &'a RoomFence>, seq: i64, token: i64) -> bool {
    fences.into_iter().any(|f| f.from_seq <= seq && f.token > token)
}

/// The messages of `batch` that `fences` let through, ordered by (room, seq) (the order every
/// backend inserts in), and the (room, seq) of those refused, in the same order and each once.
/// `fences` may hold fences of other rooms; a room without fences refuses nothing.
pub fn split<'a>(batch: &'a [FencedMessage], fences: &[RoomFence]) -> (Vec<&'a Message>, Vec<(String, i64)>) {
    let mut by_room: HashMap<&str, Vec<&RoomFence>> = HashMap::new();
    for f in fences {
        by_room.entry(f.room_id.as_str()).or_default().push(f);
    }
    let mut sorted: Vec<&FencedMessage> = batch.iter().collect();
    sorted
        .sort_by(|a, b| (a.message.room_id.as_str(), a.message.seq).cmp(&(b.message.room_id.as_str(), b.message.seq)));
    let (mut pass, mut refused) = (Vec::new(), Vec::<(String, i64)>::new());
    for fm in sorted {
        let m = &fm.message;
        let room_fences = by_room.get(m.room_id.as_str()).map_or(&[][..], Vec::as_slice);
        if refuses(room_fences.iter().copied(), m.seq, fm.token) {
            if refused.last().is_none_or(|(room, seq)| (room.as_str(), *seq) != (m.room_id.as_str(), m.seq)) {
                refused.push((m.room_id.clone(), m.seq));
            }
        } else {
            pass.push(m);
        }
    }
    (pass, refused)
}

/// The highest seq of each room among `msgs` (ordered by room), by room: what a write-back
/// raises each room's `head_seq` to.
pub fn heads<'a>(msgs: &[&'a Message]) -> Vec<(&'a str, i64)> {
    let mut heads: Vec<(&str, i64)> = Vec::new();
    for m in msgs {
        match heads.last_mut() {
            Some((room, head)) if *room == m.room_id => *head = (*head).max(m.seq),
            _ => heads.push((m.room_id.as_str(), m.seq)),
        }
    }
    heads
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Timestamp;

    fn fm(room: &str, seq: i64, token: i64) -> FencedMessage {
        let message = Message {
            id: format!("{room}-{seq}-{token}"),
            room_id: room.into(),
            seq,
            sender_id: "u".into(),
            client_msg_id: format!("c{seq}"),
            body: String::new(),
            created_at: Timestamp(0),
        };
        FencedMessage { message, token }
    }

    fn fence(room: &str, token: i64, from_seq: i64) -> RoomFence {
        RoomFence { room_id: room.into(), token, from_seq }
    }

    #[test]
    fn refuses_only_older_epochs_at_or_above_the_fence() {
        let fences = [fence("a", 2, 10)];
        assert!(!refuses(&fences, 9, 1), "below the fence point");
        assert!(refuses(&fences, 10, 1) && refuses(&fences, 11, 1), "at and above");
        assert!(!refuses(&fences, 10, 2) && !refuses(&fences, 10, 3), "the fence's epoch and newer");
        // a → b → a: the second takeover's fence refuses b's epoch above it, and a's first epoch.
        let chain = [fence("a", 2, 10), fence("a", 3, 20)];
        assert!(!refuses(&chain, 15, 2) && refuses(&chain, 20, 2) && refuses(&chain, 15, 1));
        assert!(!refuses(&chain, 25, 3));
    }

    #[test]
    fn split_orders_and_reports_each_refusal_once() {
        let batch = [fm("b", 3, 1), fm("a", 12, 1), fm("a", 5, 1), fm("a", 12, 1), fm("a", 11, 2)];
        let (pass, refused) = split(&batch, &[fence("a", 2, 10), fence("c", 9, 0)]);
        let pass: Vec<_> = pass.iter().map(|m| (m.room_id.as_str(), m.seq)).collect();
        assert_eq!(pass, vec![("a", 5), ("a", 11), ("b", 3)]);
        assert_eq!(refused, vec![("a".to_string(), 12)]);
    }

    #[test]
    fn heads_per_room() {
        let (a1, a4, b2) = (fm("a", 1, 1).message, fm("a", 4, 1).message, fm("b", 2, 1).message);
        assert_eq!(heads(&[&a1, &a4, &b2]), vec![("a", 4), ("b", 2)]);
        assert!(heads(&[]).is_empty());
    }
}
