//! The models as stored, field for field: what a backup line carries (see [`crate::backup`]).
//! Times are Unix milliseconds, as in every store (the API serializes them as RFC 3339), so the
//! conversions to and from the domain models are written here, once.
//!
//! SQL rows need no such types: they decode into the domain models themselves (their
//! `sqlx::FromRow` derives). MongoDB's documents keep their own (`_id` for the id, and an
//! ObjectId `_id` on memberships), in [`super::mongodb`].

use serde::{Deserialize, Serialize};

use super::{Membership, UserRecord};
use crate::domain::{Message, Room, Timestamp, User, Visibility};

/// A user with its password hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredUser {
    pub id: String,
    pub username: String,
    pub display_name: String,
    pub status_text: String,
    pub avatar_url: String,
    pub password_hash: String,
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredRoom {
    pub id: String,
    pub name: String,
    pub topic: String,
    pub visibility: Visibility,
    pub owner_id: String,
    pub home_region: String,
    pub head_seq: i64,
    pub member_count: i64,
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredMembership {
    pub room_id: String,
    pub user_id: String,
    pub joined_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredMessage {
    pub id: String,
    pub room_id: String,
    pub seq: i64,
    pub sender_id: String,
    pub client_msg_id: String,
    pub body: String,
    pub created_at: i64,
}

impl From<UserRecord> for StoredUser {
    fn from(r: UserRecord) -> Self {
        let User { id, username, display_name, status_text, avatar_url, created_at, updated_at } = r.user;
        let (created_at, updated_at) = (created_at.0, updated_at.0);
        Self {
            id,
            username,
            display_name,
            status_text,
            avatar_url,
            password_hash: r.password_hash,
            created_at,
            updated_at,
        }
    }
}

impl From<StoredUser> for UserRecord {
    fn from(s: StoredUser) -> Self {
        let StoredUser { id, username, display_name, status_text, avatar_url, password_hash, created_at, updated_at } =
            s;
        let (created_at, updated_at) = (Timestamp(created_at), Timestamp(updated_at));
        UserRecord {
            user: User { id, username, display_name, status_text, avatar_url, created_at, updated_at },
            password_hash,
        }
    }
}

impl From<Room> for StoredRoom {
    fn from(r: Room) -> Self {
        let (created_at, updated_at) = (r.created_at.0, r.updated_at.0);
        let Room { id, name, topic, visibility, owner_id, home_region, head_seq, member_count, .. } = r;
        Self { id, name, topic, visibility, owner_id, home_region, head_seq, member_count, created_at, updated_at }
    }
}

impl From<StoredRoom> for Room {
    fn from(s: StoredRoom) -> Self {
        let StoredRoom {
            id,
            name,
            topic,
            visibility,
            owner_id,
            home_region,
            head_seq,
            member_count,
            created_at,
            updated_at,
        } = s;
        let (created_at, updated_at) = (Timestamp(created_at), Timestamp(updated_at));
        Room { id, name, topic, visibility, owner_id, home_region, head_seq, member_count, created_at, updated_at }
    }
}

impl From<Membership> for StoredMembership {
    fn from(m: Membership) -> Self {
        Self { room_id: m.room_id, user_id: m.user_id, joined_at: m.joined_at.0 }
    }
}

impl From<StoredMembership> for Membership {
    fn from(s: StoredMembership) -> Self {
        Membership { room_id: s.room_id, user_id: s.user_id, joined_at: Timestamp(s.joined_at) }
    }
}

impl From<Message> for StoredMessage {
    fn from(m: Message) -> Self {
        let Message { id, room_id, seq, sender_id, client_msg_id, body, created_at } = m;
        Self { id, room_id, seq, sender_id, client_msg_id, body, created_at: created_at.0 }
    }
}

impl From<StoredMessage> for Message {
    fn from(s: StoredMessage) -> Self {
        let StoredMessage { id, room_id, seq, sender_id, client_msg_id, body, created_at } = s;
        Message { id, room_id, seq, sender_id, client_msg_id, body, created_at: Timestamp(created_at) }
    }
}
