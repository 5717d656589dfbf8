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
/// membership lives (at most 600 s: 300 s in L2, then 300 s in an L1 it was copied into), so no
/// count confirmed before a leave can outlive that leave's key; once a key has expired counts read
/// as 0 again, and cached ones ≥ 1 fail the check, which only costs a store read.
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
    /// With ack level `replica`: a leave answers only once a replica has its bump (`WAIT 1`), so
    /// a failover of the Redis primary cannot lose it.
    pub wait_replica: Option<std::time::Duration>,
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
        let mut pipe = redis::pipe();
        pipe.incr(&key, 1).ignore().expire(&key, COUNT_TTL_SECS as i64).ignore();
        if let Some(timeout) = self.wait_replica {
            pipe.cmd("WAIT").arg(1).arg(timeout.as_millis() as u64);
        }
        // One connection: WAIT counts the replication of this connection's writes.
        let mut conn = self.redis.conn().await;
        let replies: Vec<i64> = pipe.query_async(&mut conn).await.map_err(unavailable)?;
        if self.wait_replica.is_some() && replies.first().copied().unwrap_or(0) < 1 {
            // The bump is on the primary, not yet confirmed on a replica: the leave is not
            // answered; its retry bumps again (harmless: any change of the count refuses).
            return Err(ApiError::Unavailable("no replica confirmed the leave in time; retry".into()));
        }
        Ok(())
    }
}
