//! The durable store: users, rooms, memberships and messages.
//!
//! One trait, one implementation per backend, chosen once at start. Every backend passes the same
//! contract suite (`tests/store_contract.rs`). The promises each method makes are stated on it.

pub mod mongodb;
pub mod postgres;
pub mod sqlite;

use async_trait::async_trait;

use crate::domain::{Message, Room, Timestamp, User, Visibility};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("username is taken")]
    UsernameTaken,
    #[error("{0} not found")]
    NotFound(&'static str),
    /// The backend could not answer (I/O, connection, lock timeout). Safe to retry.
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

#[derive(Debug, Clone)]
pub struct NewUser {
    pub id: String,
    pub username: String,
    pub display_name: String,
    pub password_hash: String,
    pub created_at: Timestamp,
}

#[derive(Debug, Clone, Default)]
pub struct UserPatch {
    pub display_name: Option<String>,
    pub status_text: Option<String>,
    pub avatar_url: Option<String>,
}

#[derive(Debug, Clone)]
pub struct NewRoom {
    pub id: String,
    pub name: String,
    pub topic: String,
    pub visibility: Visibility,
    pub owner_id: String,
    pub home_region: String,
    pub created_at: Timestamp,
}

#[derive(Debug, Clone, Default)]
pub struct RoomPatch {
    pub name: Option<String>,
    pub topic: Option<String>,
}

/// A send that still needs its seq.
#[derive(Debug, Clone)]
pub struct SendRequest {
    pub message_id: String,
    pub room_id: String,
    pub sender_id: String,
    pub client_msg_id: String,
    pub body: String,
    pub created_at: Timestamp,
}

/// What became of one [`SendRequest`] in [`Store::append_messages`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppendOutcome {
    /// Stored now with the next seq of its room.
    Accepted(Message),
    /// (room, sender, client_msg_id) was stored before with the same body: the original.
    Duplicate(Message),
    /// (room, sender, client_msg_id) was stored before with a different body.
    Conflict,
    /// The room does not exist.
    RoomMissing,
}

/// The durable store. All methods are safe to call concurrently.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Round trip to the backend; used by readiness.
    async fn ping(&self) -> StoreResult<()>;

    /// Creates a user. `UsernameTaken` if the (lower-case) username exists.
    async fn create_user(&self, user: NewUser) -> StoreResult<User>;
    async fn user(&self, id: &str) -> StoreResult<Option<User>>;
    /// The user and its password hash, by lower-case username.
    async fn credentials(&self, username: &str) -> StoreResult<Option<(User, String)>>;
    /// Applies the fields that are `Some`; bumps `updated_at`. `NotFound` for an unknown user.
    async fn update_user(&self, id: &str, patch: UserPatch, now: Timestamp) -> StoreResult<User>;

    /// Creates a room with its owner as first member (member_count 1, head_seq 0), atomically.
    async fn create_room(&self, room: NewRoom) -> StoreResult<Room>;
    async fn room(&self, id: &str) -> StoreResult<Option<Room>>;
    async fn update_room(&self, id: &str, patch: RoomPatch, now: Timestamp) -> StoreResult<Room>;
    /// Rooms the user is a member of, newest first.
    async fn rooms_of_user(&self, user_id: &str) -> StoreResult<Vec<Room>>;
    /// Public rooms, newest first, at most `limit`.
    async fn public_rooms(&self, limit: u32) -> StoreResult<Vec<Room>>;

    /// Adds a member; `Ok(true)` if newly added, `Ok(false)` if already one (idempotent).
    /// member_count stays equal to the number of members. `NotFound` for an unknown room.
    async fn add_member(&self, room_id: &str, user_id: &str, now: Timestamp) -> StoreResult<bool>;
    /// Removes a member; `Ok(false)` if it was not one.
    async fn remove_member(&self, room_id: &str, user_id: &str) -> StoreResult<bool>;
    async fn is_member(&self, room_id: &str, user_id: &str) -> StoreResult<bool>;
    /// Members, in the order they joined.
    async fn members(&self, room_id: &str) -> StoreResult<Vec<User>>;
    /// Ids of the rooms the user is a member of.
    async fn room_ids_of_user(&self, user_id: &str) -> StoreResult<Vec<String>>;

    /// The embedded sequencer: in ONE transaction, for each request in order, dedupe on
    /// (room, sender, client_msg_id), else assign `seq = head_seq + 1` and store it. Either every
    /// outcome is durable when this returns `Ok`, or nothing is. Seqs of a room are gap-free.
    async fn append_messages(&self, batch: &[SendRequest]) -> StoreResult<Vec<AppendOutcome>>;

    /// Stores messages that already carry their seq (write-back from the cluster sequencer).
    /// Idempotent: a message whose id or (room, seq) is stored already is skipped. Raises the
    /// room's head_seq to at least the highest seq stored.
    async fn upsert_messages(&self, batch: &[Message]) -> StoreResult<()>;

    /// Messages with seq > after_seq, ascending, at most `limit`.
    async fn messages_after(&self, room_id: &str, after_seq: i64, limit: u32) -> StoreResult<Vec<Message>>;
    /// The `limit` messages just below `before_seq`, ascending.
    async fn messages_before(&self, room_id: &str, before_seq: i64, limit: u32) -> StoreResult<Vec<Message>>;
    /// The room's head seq (0 when empty); `None` for an unknown room.
    async fn head_seq(&self, room_id: &str) -> StoreResult<Option<i64>>;
}
