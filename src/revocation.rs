//! Membership revocations that every instance's sends see at once.
//!
//! Instances cache "this user is a member of this room" (see [`cache`](crate::cache)); the
//! pub/sub eviction that follows a leave reaches the other instances a moment later, so on its own
//! it would let a send through on another instance right after the leave was answered. Each
//! (room, user) therefore has a revocation count: a leave bumps it before it answers, a cached
//! membership remembers the count it was confirmed at, and the cluster send script refuses a send
//! whose count is no longer current. The hot path pays nothing extra: the count is checked inside
//! the script that sequences the send.

use async_trait::async_trait;
use redis::AsyncCommands;

use crate::error::{ApiError, ApiResult};
use crate::redis_io::{Keys, Redis};

/// How long a revocation count outlives the leave that bumped it. Longer than any cached
/// membership lives (the caches' TTL is 300 s), so no cached count can outlive its key; if a key
/// expires anyway (or Redis loses it), counts read as 0 and cached ones ≥ 1 fail the check, which
/// only costs a store read.
const COUNT_TTL_SECS: u64 = 900;

#[async_trait]
pub trait Revocations: Send + Sync + 'static {
    /// The (room, user) membership's revocation count now.
    async fn count(&self, room_id: &str, user_id: &str) -> ApiResult<u64>;

    /// Bumps the count; once this returns, every instance's sends see it.
    async fn revoke(&self, room_id: &str, user_id: &str) -> ApiResult<()>;
}

/// Embedded mode: one instance evicts its own cache before a leave answers, so no count is needed.
pub struct LocalRevocations;

#[async_trait]
impl Revocations for LocalRevocations {
    async fn count(&self, _room_id: &str, _user_id: &str) -> ApiResult<u64> {
        Ok(0)
    }
    async fn revoke(&self, _room_id: &str, _user_id: &str) -> ApiResult<()> {
        Ok(())
    }
}

/// Cluster mode: one Redis counter per (room, user), under the room's shard tag so the send
/// script can read it.
pub struct RedisRevocations {
    pub redis: Redis,
    pub keys: Keys,
}

fn unavailable(e: redis::RedisError) -> ApiError {
    tracing::warn!(error = %e, "revocation count unreachable");
    ApiError::Unavailable("Redis is unavailable; retry".into())
}

#[async_trait]
impl Revocations for RedisRevocations {
    async fn count(&self, room_id: &str, user_id: &str) -> ApiResult<u64> {
        let key = self.keys.revocations(room_id, user_id);
        let n: Option<u64> = self.redis.conn().await.get(key).await.map_err(unavailable)?;
        Ok(n.unwrap_or(0))
    }

    async fn revoke(&self, room_id: &str, user_id: &str) -> ApiResult<()> {
        let key = self.keys.revocations(room_id, user_id);
        let mut conn = self.redis.conn().await;
        redis::pipe()
            .atomic()
            .incr(&key, 1)
            .ignore()
            .expire(&key, COUNT_TTL_SECS as i64)
            .ignore()
            .query_async::<()>(&mut conn)
            .await
            .map_err(unavailable)
    }
}
