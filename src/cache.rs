//! Caches of users, rooms and memberships in front of the store: L1 per instance (moka), L2
//! shared (Redis in cluster mode, none in embedded mode), L3 the store.
//!
//! Every change goes to the store first, then evicts the entry here and, through the fan-out, on
//! every other instance (cluster mode: one pub/sub message), so a rename on one instance is seen on
//! the others within one round trip. Entries also expire, which bounds how long anything missed
//! (e.g. while the pub/sub link was down) can stay stale. Memberships do not rely on eviction: a
//! leave must hold on every instance once it is answered, so each cached membership carries the
//! revocation count it was confirmed at (see [`revocation`](crate::revocation)).

use std::time::Duration;

use async_trait::async_trait;
use moka::future::Cache;
use redis::AsyncCommands;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::domain::{Room, User};
use crate::error::ApiResult;
use crate::redis_io::Redis;

// Long enough to ride out a store outage on cached memberships; invalidation, not expiry, is what
// keeps entries fresh.
const TTL: Duration = Duration::from_secs(300);

/// What changed; sent between instances.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Invalidation {
    User { id: String },
    Room { id: String },
    Member { room_id: String, user_id: String },
}

/// The shared (L2) cache: JSON values by key. Failures are misses, never errors: the store answers.
#[async_trait]
pub trait SharedCache: Send + Sync + 'static {
    async fn get(&self, key: &str) -> Option<String>;
    async fn set(&self, key: &str, value: String);
    async fn del(&self, keys: &[String]);
}

/// Embedded mode: one instance, L1 is enough.
pub struct NoSharedCache;

#[async_trait]
impl SharedCache for NoSharedCache {
    async fn get(&self, _key: &str) -> Option<String> {
        None
    }
    async fn set(&self, _key: &str, _value: String) {}
    async fn del(&self, _keys: &[String]) {}
}

/// Cluster mode: values under `<prefix>:cache:<key>` with the same TTL as L1.
pub struct RedisSharedCache {
    pub redis: Redis,
    pub prefix: String,
}

impl RedisSharedCache {
    fn key(&self, key: &str) -> String {
        format!("{}:cache:{key}", self.prefix)
    }
}

#[async_trait]
impl SharedCache for RedisSharedCache {
    async fn get(&self, key: &str) -> Option<String> {
        self.redis.conn().await.get::<_, Option<String>>(self.key(key)).await.ok().flatten()
    }
    async fn set(&self, key: &str, value: String) {
        let _ = self.redis.conn().await.set_ex::<_, _, ()>(self.key(key), value, TTL.as_secs()).await;
    }
    async fn del(&self, keys: &[String]) {
        let keys: Vec<String> = keys.iter().map(|k| self.key(k)).collect();
        if let Err(e) = self.redis.conn().await.del::<_, ()>(keys).await {
            tracing::warn!(error = %e, "L2 cache eviction failed (entries expire with their TTL)");
        }
    }
}

fn user_key(id: &str) -> String {
    format!("user:{id}")
}
fn room_key(id: &str) -> String {
    format!("room:{id}")
}
/// Holds the revocation count the membership was confirmed at (an earlier version stored "1"
/// under `member:`; a new name keeps a rolling upgrade from reading those as counts).
fn member_key(room_id: &str, user_id: &str) -> String {
    format!("membership:{room_id}:{user_id}")
}

pub struct Caches {
    pub l2: std::sync::Arc<dyn SharedCache>,
    pub users: Cache<String, User>,
    /// Room metadata for permission checks (its head_seq and member_count may lag).
    pub rooms: Cache<String, Room>,
    /// Known memberships (positive entries only: a join is visible at once everywhere), each with
    /// the revocation count it was confirmed at.
    pub members: Cache<(String, String), u64>,
}

impl Default for Caches {
    fn default() -> Self {
        Self::new(std::sync::Arc::new(NoSharedCache))
    }
}

impl Caches {
    pub fn new(l2: std::sync::Arc<dyn SharedCache>) -> Self {
        Self {
            l2,
            users: Cache::builder().max_capacity(100_000).time_to_live(TTL).build(),
            rooms: Cache::builder().max_capacity(100_000).time_to_live(TTL).build(),
            members: Cache::builder().max_capacity(500_000).time_to_live(TTL).build(),
        }
    }
}

impl Caches {
    async fn through<T, F>(&self, l1: &Cache<String, T>, id: &str, l2_key: String, load: F) -> ApiResult<T>
    where
        T: Clone + Send + Sync + Serialize + DeserializeOwned + 'static,
        F: std::future::Future<Output = ApiResult<T>>,
    {
        if let Some(v) = l1.get(id).await {
            return Ok(v);
        }
        if let Some(v) = self.l2.get(&l2_key).await.and_then(|raw| serde_json::from_str::<T>(&raw).ok()) {
            l1.insert(id.to_string(), v.clone()).await;
            return Ok(v);
        }
        let v = load.await?;
        if let Ok(raw) = serde_json::to_string(&v) {
            self.l2.set(&l2_key, raw).await;
        }
        l1.insert(id.to_string(), v.clone()).await;
        Ok(v)
    }

    /// A user through L1 → L2 → `load` (the store).
    pub async fn user<F: std::future::Future<Output = ApiResult<User>>>(&self, id: &str, load: F) -> ApiResult<User> {
        self.through(&self.users, id, user_key(id), load).await
    }

    /// Room metadata through L1 → L2 → `load`.
    pub async fn room<F: std::future::Future<Output = ApiResult<Room>>>(&self, id: &str, load: F) -> ApiResult<Room> {
        self.through(&self.rooms, id, room_key(id), load).await
    }

    /// The revocation count a known membership of (room, user) was confirmed at (L1, then L2);
    /// `None` when not known. The count may be stale: callers compare it with the current one
    /// (see [`revocation`](crate::revocation)).
    pub async fn known_member(&self, room_id: &str, user_id: &str) -> Option<u64> {
        let key = (room_id.to_string(), user_id.to_string());
        if let Some(count) = self.members.get(&key).await {
            return Some(count);
        }
        let count = self.l2.get(&member_key(room_id, user_id)).await?.parse::<u64>().ok()?;
        self.members.insert(key, count).await;
        Some(count)
    }

    /// Remembers that (room, user) was confirmed a member at revocation count `count`.
    pub async fn remember_member(&self, room_id: &str, user_id: &str, count: u64) {
        self.l2.set(&member_key(room_id, user_id), count.to_string()).await;
        self.members.insert((room_id.to_string(), user_id.to_string()), count).await;
    }

    /// Drops this instance's entry for (room, user) (found stale).
    pub async fn forget_member(&self, room_id: &str, user_id: &str) {
        self.members.invalidate(&(room_id.to_string(), user_id.to_string())).await;
    }

    /// Evicts `what` from L2 and this instance's L1 (other instances evict their L1 when told).
    pub async fn evict(&self, what: &Invalidation) {
        let keys = match what {
            Invalidation::User { id } => vec![user_key(id)],
            Invalidation::Room { id } => vec![room_key(id)],
            Invalidation::Member { room_id, user_id } => vec![member_key(room_id, user_id), room_key(room_id)],
        };
        self.l2.del(&keys).await;
        self.evict_local(what).await;
    }

    /// Evicts `what` from this instance's L1 only.
    pub async fn evict_local(&self, what: &Invalidation) {
        match what {
            Invalidation::User { id } => self.users.invalidate(id).await,
            Invalidation::Room { id } => self.rooms.invalidate(id).await,
            Invalidation::Member { room_id, user_id } => {
                self.members.invalidate(&(room_id.clone(), user_id.clone())).await;
                self.rooms.invalidate(room_id).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn l1_serves_after_the_first_load() {
        let c = Caches::default();
        let room = |name: &str| Room {
            id: "r".into(),
            name: name.into(),
            topic: String::new(),
            visibility: crate::domain::Visibility::Public,
            owner_id: "o".into(),
            home_region: "local".into(),
            head_seq: 0,
            member_count: 1,
            created_at: crate::domain::Timestamp(0),
            updated_at: crate::domain::Timestamp(0),
        };
        assert_eq!(c.room("r", async { Ok(room("first")) }).await.unwrap().name, "first");
        assert_eq!(c.room("r", async { Ok(room("second")) }).await.unwrap().name, "first", "cached");
        c.evict(&Invalidation::Room { id: "r".into() }).await;
        assert_eq!(c.room("r", async { Ok(room("second")) }).await.unwrap().name, "second", "evicted");
        assert_eq!(c.known_member("r", "u").await, None);
        c.remember_member("r", "u", 3).await;
        assert_eq!(c.known_member("r", "u").await, Some(3));
        c.forget_member("r", "u").await;
        assert_eq!(c.known_member("r", "u").await, None);
    }

    #[test]
    fn invalidations_travel_as_tagged_json() {
        let v = Invalidation::Member { room_id: "r".into(), user_id: "u".into() };
        let json = serde_json::to_string(&v).unwrap();
        assert_eq!(json, r#"{"kind":"member","room_id":"r","user_id":"u"}"#);
        assert_eq!(serde_json::from_str::<Invalidation>(&json).unwrap(), v);
    }
}
