//! Per-instance (L1) caches of users, rooms and memberships, in front of the store.
//!
//! Every change goes to the store first, then evicts the entry here and, through the fan-out, on
//! every other instance (cluster mode: one pub/sub message), so a rename on one instance is seen on
//! the others within one round trip. Entries also expire, which bounds how long anything missed
//! (e.g. while the pub/sub link was down) can stay stale.

use std::time::Duration;

use moka::future::Cache;
use serde::{Deserialize, Serialize};

use crate::domain::{Room, User};

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

pub struct Caches {
    pub users: Cache<String, User>,
    /// Room metadata for permission checks (its head_seq and member_count may lag).
    pub rooms: Cache<String, Room>,
    /// Known memberships (positive entries only: a join is visible at once everywhere).
    pub members: Cache<(String, String), ()>,
}

impl Default for Caches {
    fn default() -> Self {
        Self {
            users: Cache::builder().max_capacity(100_000).time_to_live(TTL).build(),
            rooms: Cache::builder().max_capacity(100_000).time_to_live(TTL).build(),
            members: Cache::builder().max_capacity(500_000).time_to_live(TTL).build(),
        }
    }
}

impl Caches {
    pub async fn evict(&self, what: &Invalidation) {
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

    #[test]
    fn invalidations_travel_as_tagged_json() {
        let v = Invalidation::Member { room_id: "r".into(), user_id: "u".into() };
        let json = serde_json::to_string(&v).unwrap();
        assert_eq!(json, r#"{"kind":"member","room_id":"r","user_id":"u"}"#);
        assert_eq!(serde_json::from_str::<Invalidation>(&json).unwrap(), v);
    }
}
