//! Keeping a message sequenced by its room's home region in this region's Redis: the apply
//! script (`redis_io/apply.lua`) takes it once, in seq order, into recent history and fan-out,
//! and keeps one that arrives before the one before it until the gap is filled.

use std::sync::Arc;

use redis::Value;

use crate::domain::{Message, RoomId};
use crate::error::{ApiError, ApiResult};
use crate::redis_io::{Keys, Redis};
use crate::store::Store;

/// Replicated messages of a room kept in this region's recent history (the store, written by
/// the home, has the rest).
pub const HISTORY_LEN: u64 = 2_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Taken (with any pending ones it unblocked); the room's highest applied seq now.
    Ok(i64),
    /// Had it already.
    Duplicate(i64),
    /// Kept aside: the messages after this applied seq and before it have not arrived.
    Gap(i64),
    /// Refused: sequenced under an older epoch than this region's takeover of the room (the
    /// room's epoch floor).
    Fenced(i64),
}

/// Moves a room's applied seq when it is still what the caller saw (built once: its hash too).
static SKIP: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        "if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('SET', KEYS[1], ARGV[2]) return 1 end return 0",
    )
});

pub struct Applier {
    pub redis: Redis,
    pub keys: Keys,
    pub store: Arc<dyn Store>,
    pub script: redis::Script,
    /// How long the dedupe key of an applied message is kept (as the home keeps its own).
    pub dedupe_ttl: std::time::Duration,
}

impl Applier {
    /// Applies a message sequenced under `epoch` (its home lease's fencing token, when known).
    pub async fn apply(&self, room_id: &str, seq: i64, json: &str, epoch: Option<i64>) -> ApiResult<Applied> {
        let epoch = epoch.map(|e| e.to_string()).unwrap_or_default();
        let mut floor = String::new();
        for _ in 0..2 {
            let mut conn = self.redis.conn().await;
            let reply: Value = self
                .script
                .key(self.keys.seq(room_id))
                .key(self.keys.history(room_id))
                .key(self.keys.replica_pending(room_id))
                .key(self.keys.room_epoch(room_id))
                .arg(seq)
                .arg(json)
                .arg(self.keys.channel(room_id))
                .arg(&floor)
                .arg(HISTORY_LEN)
                .arg(&epoch)
                .arg(self.keys.dedupe_prefix(room_id))
                .arg(self.dedupe_ttl.as_secs().max(1))
                .invoke_async(&mut conn)
                .await
                .map_err(|e| {
                    tracing::warn!(error = %e, "applying a replicated message failed");
                    ApiError::Unavailable("Redis is unavailable; retry".into())
                })?;
            match parse(&reply) {
                Some(("init", _)) => {
                    // The first message of the room seen here: start after what the store holds.
                    let head = self.store.head_seq(&RoomId::from(room_id)).await?.unwrap_or(0);
                    floor = head.to_string();
                }
                Some(("ok", n)) => return Ok(Applied::Ok(n)),
                Some(("dup", n)) => return Ok(Applied::Duplicate(n)),
                Some(("gap", n)) => return Ok(Applied::Gap(n)),
                Some(("fenced", n)) => return Ok(Applied::Fenced(n)),
                _ => break,
            }
        }
        Err(ApiError::Unavailable(format!("unexpected apply reply for room {room_id}")))
    }

    /// Moves the room's applied seq from `from` to `to` (when it is still `from`): the home has
    /// no messages between them either (dead-lettered), and waiting for them would stall every
    /// later message of the room here. Whether it moved.
    pub async fn skip(&self, room_id: &str, from: i64, to: i64) -> ApiResult<bool> {
        let mut conn = self.redis.conn().await;
        let moved: i64 =
            SKIP.key(self.keys.seq(room_id)).arg(from).arg(to).invoke_async(&mut conn).await.map_err(|e| {
                tracing::warn!(error = %e, "skipping a hole in a replicated room failed");
                ApiError::Unavailable("Redis is unavailable; retry".into())
            })?;
        Ok(moved == 1)
    }

    pub async fn apply_message(&self, m: &Message) -> ApiResult<Applied> {
        let json = serde_json::to_string(m).expect("a message always serializes");
        self.apply(&m.room_id, m.seq, &json, None).await
    }
}

fn parse(v: &Value) -> Option<(&str, i64)> {
    let Value::Array(parts) = v else { return None };
    let tag = match parts.first()? {
        Value::BulkString(b) => std::str::from_utf8(b).ok()?,
        Value::SimpleString(s) => s.as_str(),
        _ => return None,
    };
    let n = match parts.get(1) {
        Some(Value::Int(n)) => *n,
        _ => 0,
    };
    Some((tag, n))
}
