//! Reading a room's messages. Embedded: the store. Cluster: the union of the store (synced) and
//! the room's recent-history stream in Redis (everything not yet synced is still there), so a
//! message is readable from any instance the moment it is acknowledged.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use redis::AsyncCommands;
use redis::streams::StreamRangeReply;

use crate::domain::{HistoryPage, Message, Room, RoomId};
use crate::error::{ApiError, ApiResult};
use crate::redis_io::{Keys, Redis};
use crate::store::Store;

/// Where a history page starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cursor {
    After(i64),
    Before(i64),
    Latest,
}

#[async_trait]
pub trait History: Send + Sync + 'static {
    /// Up to `limit` messages ascending from the cursor, the room's head, and whether more exist
    /// in the direction of travel. `not_found` for an unknown room.
    async fn page(&self, room_id: &RoomId, cursor: Cursor, limit: u32) -> ApiResult<HistoryPage>;

    /// Raises each room's `head_seq` to the highest seq acknowledged in it, wherever it was
    /// acknowledged: the store's copy may lag the sequencer. After this, a room's `head_seq` is at
    /// least the seq of every send acknowledged before the call began.
    async fn current_heads(&self, rooms: &mut [Room]) -> ApiResult<()>;
}

/// Turns `limit + 1` messages read in the direction of travel into a page.
fn into_page(mut msgs: Vec<Message>, cursor: Cursor, limit: u32, head: i64) -> HistoryPage {
    let more = msgs.len() > limit as usize;
    match cursor {
        Cursor::After(_) => msgs.truncate(limit as usize),
        Cursor::Before(_) | Cursor::Latest => {
            if more {
                msgs.drain(..msgs.len() - limit as usize);
            }
        }
    }
    let head_seq = head.max(msgs.last().map(|m| m.seq).unwrap_or(0));
    HistoryPage { messages: msgs, head_seq, has_more: more }
}

pub struct LocalHistory {
    pub store: Arc<dyn Store>,
}

async fn store_part(store: &dyn Store, room_id: &RoomId, cursor: Cursor, probe: u32) -> ApiResult<Vec<Message>> {
    Ok(match cursor {
        Cursor::After(after) => store.messages_after(room_id, after, probe).await?,
        Cursor::Before(before) => store.messages_before(room_id, before, probe).await?,
        Cursor::Latest => store.messages_before(room_id, i64::MAX, probe).await?,
    })
}

#[async_trait]
impl History for LocalHistory {
    async fn page(&self, room_id: &RoomId, cursor: Cursor, limit: u32) -> ApiResult<HistoryPage> {
        let msgs = store_part(&*self.store, room_id, cursor, limit + 1).await?;
        let head = self.store.head_seq(room_id).await?.ok_or_else(ApiError::room_not_found)?;
        Ok(into_page(msgs, cursor, limit, head))
    }

    async fn current_heads(&self, _rooms: &mut [Room]) -> ApiResult<()> {
        // The store is the sequencer: its head is the head.
        Ok(())
    }
}

pub struct RedisHistory {
    pub store: Arc<dyn Store>,
    pub redis: Redis,
    pub keys: Keys,
}

fn parse_entries(reply: StreamRangeReply) -> Vec<Message> {
    reply
        .ids
        .into_iter()
        .filter_map(|e| {
            let raw: String = e.get("m")?;
            serde_json::from_str(&raw).ok()
        })
        .collect()
}

/// Reads of the store and the stream a page may take before it is served with a hole.
const UNION_ATTEMPTS: u32 = 3;

/// Whether `msgs` (ascending) has no gap in seq, and starts right after an `After` cursor.
fn is_contiguous(msgs: &[Message], cursor: Cursor) -> bool {
    let starts_right = match (cursor, msgs.first()) {
        (Cursor::After(after), Some(first)) => first.seq == after.saturating_add(1),
        _ => true,
    };
    starts_right && msgs.windows(2).all(|w| w[1].seq == w[0].seq + 1)
}

impl RedisHistory {
    /// Up to `probe` messages from the cursor, the union of the store's and the stream's, and
    /// the room's head.
    ///
    /// The store is read first: a message the store read missed (written back after it) is
    /// still in the stream when the stream is read, since the stream only loses messages the
    /// store held for a while (`SyncConfig::recent_per_room` newer ones synced). Read the other
    /// way round, or at once, the stream could be read before message N was accepted and the
    /// store after N+1 but not yet N was written back (consumers commit batches in any order):
    /// a hole, seen in the cluster suite's late-joiner test.
    async fn union(&self, room_id: &RoomId, cursor: Cursor, probe: u32) -> ApiResult<(Vec<Message>, i64)> {
        let (stored, store_head) =
            tokio::join!(store_part(&*self.store, room_id, cursor, probe), self.store.head_seq(room_id));
        let store_head = store_head?.ok_or_else(ApiError::room_not_found)?;
        let stored = stored?;
        let (recent, redis_head) = tokio::join!(self.recent(room_id, cursor, probe), self.redis_head(room_id));
        let mut by_seq: BTreeMap<i64, Message> = BTreeMap::new();
        for m in stored.into_iter().chain(recent?) {
            by_seq.insert(m.seq, m);
        }
        let mut msgs: Vec<Message> = by_seq.into_values().collect();
        match cursor {
            Cursor::After(_) => msgs.truncate(probe as usize),
            _ => {
                let keep = msgs.len().saturating_sub(probe as usize);
                msgs.drain(..keep);
            }
        }
        Ok((msgs, store_head.max(redis_head?.unwrap_or(0))))
    }

    /// Recent messages from the room's stream, in the direction of travel.
    pub async fn recent(&self, room_id: &RoomId, cursor: Cursor, probe: u32) -> ApiResult<Vec<Message>> {
        let key = self.keys.history(room_id);
        let mut conn = self.redis.conn().await;
        let reply: Result<StreamRangeReply, _> = match cursor {
            Cursor::After(after) => conn.xrange_count(&key, format!("{}-0", after.saturating_add(1)), "+", probe).await,
            Cursor::Before(before) if before <= 1 => return Ok(Vec::new()),
            Cursor::Before(before) => conn.xrevrange_count(&key, format!("{}-0", before - 1), "-", probe).await,
            Cursor::Latest => conn.xrevrange_count(&key, "+", "-", probe).await,
        };
        let mut msgs = parse_entries(reply.map_err(|e| {
            tracing::warn!(error = %e, "redis history read failed");
            ApiError::Unavailable("Redis is unavailable; retry".into())
        })?);
        if !matches!(cursor, Cursor::After(_)) {
            msgs.reverse();
        }
        Ok(msgs)
    }

    /// Messages with from <= seq <= to (used to fill a gap seen on the fan-out).
    pub async fn range(&self, room_id: &RoomId, from: i64, to: i64) -> ApiResult<Vec<Message>> {
        let count = (to - from + 1).clamp(0, 10_000) as u32;
        let page = self.page(room_id, Cursor::After(from - 1), count).await?;
        Ok(page.messages.into_iter().filter(|m| m.seq <= to).collect())
    }

    async fn redis_head(&self, room_id: &RoomId) -> ApiResult<Option<i64>> {
        let mut conn = self.redis.conn().await;
        conn.get::<_, Option<i64>>(self.keys.seq(room_id))
            .await
            .map_err(|_| ApiError::Unavailable("Redis is unavailable; retry".into()))
    }
}

#[async_trait]
impl History for RedisHistory {
    async fn page(&self, room_id: &RoomId, cursor: Cursor, limit: u32) -> ApiResult<HistoryPage> {
        let probe = limit + 1;
        let mut attempt = 1;
        loop {
            let (msgs, head) = self.union(room_id, cursor, probe).await?;
            // Seqs are gap-free: a hole means the two reads raced the write-back (below). Read
            // again; a hole that stays is a message missing from both (dead-lettered), and the
            // rest of the page is still worth serving.
            if is_contiguous(&msgs, cursor) || attempt == UNION_ATTEMPTS {
                if attempt > 1 {
                    tracing::warn!(
                        room_id = room_id.as_str(),
                        attempt,
                        contiguous = is_contiguous(&msgs, cursor),
                        "history read again"
                    );
                }
                return Ok(into_page(msgs, cursor, limit, head));
            }
            attempt += 1;
        }
    }

    async fn current_heads(&self, rooms: &mut [Room]) -> ApiResult<()> {
        let ids: Vec<RoomId> = rooms.iter().map(|r| RoomId::from(r.id.as_str())).collect();
        for (room, head) in rooms.iter_mut().zip(self.heads(&ids).await?) {
            room.head_seq = room.head_seq.max(head);
        }
        Ok(())
    }
}

impl RedisHistory {
    /// The highest seq acknowledged (or, for a room homed in another region, applied) in each
    /// room by this Redis; 0 where it holds no counter.
    pub async fn heads(&self, ids: &[RoomId]) -> ApiResult<Vec<i64>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        // One GET per room in one round trip (a pipeline, not MGET: the counters live in
        // different shards' hash slots).
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.get(self.keys.seq(id));
        }
        let heads: Vec<Option<i64>> = pipe.query_async(&mut self.redis.conn().await).await.map_err(|e| {
            tracing::warn!(error = %e, "redis head read failed");
            ApiError::Unavailable("Redis is unavailable; retry".into())
        })?;
        Ok(heads.into_iter().map(|h| h.unwrap_or(0)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Timestamp;

    fn m(seq: i64) -> Message {
        Message {
            id: format!("m{seq}"),
            room_id: "r".into(),
            seq,
            sender_id: "u".into(),
            client_msg_id: format!("c{seq}"),
            body: "b".into(),
            created_at: Timestamp(0),
        }
    }

    #[test]
    fn pages_keep_the_right_end() {
        let p = into_page((1..=4).map(m).collect(), Cursor::After(0), 3, 9);
        assert_eq!(p.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert!(p.has_more);
        assert_eq!(p.head_seq, 9);
        let p = into_page((5..=8).map(m).collect(), Cursor::Before(9), 3, 8);
        assert_eq!(p.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![6, 7, 8]);
        assert!(p.has_more);
        let p = into_page((1..=2).map(m).collect(), Cursor::Latest, 3, 0);
        assert!(!p.has_more);
        assert_eq!(p.head_seq, 2, "head is never below what was read");
    }

    #[test]
    fn holes_are_seen() {
        let seqs = |v: &[i64]| v.iter().copied().map(m).collect::<Vec<_>>();
        assert!(is_contiguous(&seqs(&[3, 4, 5]), Cursor::After(2)));
        assert!(!is_contiguous(&seqs(&[3, 4, 5]), Cursor::After(1)), "first after the cursor missing");
        assert!(!is_contiguous(&seqs(&[197, 198, 200]), Cursor::Latest));
        assert!(is_contiguous(&seqs(&[197, 198, 199]), Cursor::Before(200)));
        assert!(is_contiguous(&[], Cursor::After(9)));
    }
}
