//! What this region decided besides messages (the send script appends those itself), for the
//! other regions to pull: leaves and joins, ended sessions, changed rooms and users. Entries go
//! to the outbox of the shard of the room (or user) they concern, so a room's messages and its
//! membership changes share one ordered stream.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::error::{ApiError, ApiResult};
use crate::redis_io::{Keys, Redis};
use crate::sessions::Ended;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Replicated {
    /// The user left (or was removed from) the room: stop delivery, refuse cached memberships.
    Left { room_id: String, user_id: String },
    /// The user became a member of the room.
    Joined { room_id: String, user_id: String },
    /// The room's name or topic changed, with the change's version (see `region::hlc`).
    RoomChanged {
        room_id: String,
        #[serde(default)]
        version: String,
    },
    UserChanged {
        user_id: String,
        #[serde(default)]
        version: String,
    },
    /// The user's first socket in the region came, or the last went.
    Presence { user_id: String, online: bool, region: String },
    /// A user typing in a room (best effort, like everywhere).
    Typing { room_id: String, user_id: String },
    /// The user's tokens were revoked (logout, password change): cut their sockets everywhere.
    SessionsEnded { user_id: String, ended: Ended },
}

impl Replicated {
    /// The id whose shard's outbox carries the entry.
    fn subject(&self) -> &str {
        match self {
            Self::Left { room_id, .. }
            | Self::Joined { room_id, .. }
            | Self::RoomChanged { room_id, .. }
            | Self::Typing { room_id, .. } => room_id,
            Self::UserChanged { user_id, .. }
            | Self::SessionsEnded { user_id, .. }
            | Self::Presence { user_id, .. } => user_id,
        }
    }
}

#[async_trait]
pub trait Outbox: Send + Sync + 'static {
    /// Appends the change for the other regions; `Err` when it could not be recorded (the
    /// caller decides whether the change may stand without it).
    async fn record(&self, change: Replicated) -> ApiResult<()>;
}

/// A single region: nobody to tell.
pub struct NoOutbox;

#[async_trait]
impl Outbox for NoOutbox {
    async fn record(&self, _change: Replicated) -> ApiResult<()> {
        Ok(())
    }
}

pub struct RedisOutbox {
    pub redis: Redis,
    pub keys: Keys,
    /// Entries kept per shard (approximately; older ones are trimmed).
    pub len: u64,
}

#[async_trait]
impl Outbox for RedisOutbox {
    async fn record(&self, change: Replicated) -> ApiResult<()> {
        let json = serde_json::to_string(&change).expect("a change always serializes");
        let mut conn = self.redis.conn().await;
        redis::cmd("XADD")
            .arg(self.keys.outbox_of(change.subject()))
            .arg("MAXLEN")
            .arg("~")
            .arg(self.len)
            .arg("*")
            .arg("e")
            .arg(json)
            .query_async::<String>(&mut conn)
            .await
            .map(|_| ())
            .map_err(|e| {
                tracing::warn!(error = %e, "could not record a change for the other regions");
                ApiError::Unavailable("Redis is unavailable; retry".into())
            })
    }
}
