//! The durable store: users, rooms, memberships and messages.
//!
//! One trait, one implementation per backend, chosen once at start. Every backend passes the same
//! contract suite (`tests/store_contract.rs`). The promises each method makes are stated on it.
//!
//! # Layout
//!
//! - [`sql`]: the SQL store, written once ([`sql::SqlStore`]) over a small [`sql::Dialect`];
//!   [`sqlite`] and [`postgres`] open it and say how their backend spells things.
//! - [`mongodb`]: the MongoDB store.
//! - [`append`]: the embedded sequencer's decision (dedupe, seq = head + 1), pure, used by every
//!   backend's [`Store::append_messages`].
//! - [`fence`]: the fencing rule of [`Store::upsert_messages_fenced`], pure, used by every backend.
//! - [`stored`]: the models as stored (times in ms), the shape of backup lines.

pub mod append;
pub mod fence;
pub mod mongodb;
pub mod postgres;
pub mod sql;
pub mod sqlite;
pub mod stored;

use std::sync::Arc;

use async_trait::async_trait;

use crate::config::StoreUrl;
use crate::domain::{Message, Room, RoomId, Timestamp, User, UserId, Visibility};

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
    /// A new password's hash (a password change; not versioned).
    pub password_hash: Option<String>,
    /// The version of this change (see [`RoomPatch::version`]).
    pub version: String,
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
    /// The change's version (a hybrid-logical-clock timestamp and region, ordered as text). Each
    /// field is written only if this is greater than the version of the field's last write, so
    /// every copy converges on the greatest whatever the order changes arrive in (per-field
    /// last-writer-wins). Empty: written unconditionally, the field's version kept.
    pub version: String,
}

impl NewUser {
    /// The user as first stored: no status, no avatar, updated when created.
    pub fn into_record(self) -> UserRecord {
        let NewUser { id, username, display_name, password_hash, created_at } = self;
        let (status_text, avatar_url, updated_at) = (String::new(), String::new(), created_at);
        UserRecord {
            user: User { id, username, display_name, status_text, avatar_url, created_at, updated_at },
            password_hash,
        }
    }
}

impl NewRoom {
    /// The room as first stored: no messages yet (head_seq 0), its owner the one member.
    pub fn into_room(self) -> Room {
        let NewRoom { id, name, topic, visibility, owner_id, home_region, created_at } = self;
        let (head_seq, member_count, updated_at) = (0, 1, created_at);
        Room { id, name, topic, visibility, owner_id, home_region, head_seq, member_count, created_at, updated_at }
    }
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
    /// W3C traceparent of the send, carried to whoever makes it durable (empty: none).
    pub trace: String,
    /// The revocation count the sender's membership was confirmed at; the cluster sequencer
    /// refuses the send when it is no longer current (see [`revocation`](crate::revocation)).
    /// Stores ignore it.
    pub membership: u64,
    /// With several regions: the home lease the send is decided under (stores ignore it).
    pub epoch: Option<Epoch>,
}

/// The home lease a message is sequenced under: its fencing token, and until when (Unix ms, this
/// instance's clock) its holder may still act on it. The token travels with the message to the
/// store and to other regions, which refuse it once a newer epoch fenced the room (issue 17).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Epoch {
    pub token: i64,
    pub until_ms: i64,
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

/// A lease on `name`: who holds it, under which fencing token, until when.
///
/// Leases and fences are operational state: they are neither exported by `chatmesh backup` nor
/// restored (a restored store starts with none; a region takes its lease again).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, sqlx::FromRow)]
pub struct Lease {
    pub name: String,
    pub holder: String,
    /// The fencing token: every acquisition of the lease (not an extension by its holder) gets a
    /// greater one than the last, so whatever acts under a lease can be told apart from whatever
    /// acted under an older one.
    pub token: i64,
    /// The lease is free from this time on (`expires_at <= now`).
    #[sqlx(try_from = "i64")]
    pub expires_at: Timestamp,
}

/// From `from_seq` on, a room's messages belong to the epoch of `token` (a takeover): see
/// [`Store::fence_rooms`].
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct RoomFence {
    pub room_id: String,
    pub token: i64,
    pub from_seq: i64,
}

/// A message to write back, with the token of the home lease it was sequenced under.
#[derive(Debug, Clone)]
pub struct FencedMessage {
    pub message: Message,
    pub token: i64,
}

/// A user with its password hash: what `chatmesh backup` exports and `restore` imports.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct UserRecord {
    #[sqlx(flatten)]
    pub user: User,
    pub password_hash: String,
}

/// A member of a room, with the time they joined: the place of a page of [`Store::members`].
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Member {
    #[sqlx(flatten)]
    pub user: User,
    #[sqlx(try_from = "i64")]
    pub joined_at: Timestamp,
}

/// One membership, with the time the user joined (it orders [`Store::members`]).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Membership {
    pub room_id: String,
    pub user_id: String,
    #[sqlx(try_from = "i64")]
    pub joined_at: Timestamp,
}

/// What an [`ExportSnapshot`] guarantees about the pages it returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportConsistency {
    /// Every page is read from one snapshot taken when the export started: writes committed
    /// after that are not seen, and the pages together are one consistent state of the store.
    Snapshot,
    /// Each page is read as of when it is read (MongoDB without a replica set): a write made
    /// during the export may or may not be seen, and rows written meanwhile may disagree with
    /// each other (e.g. a room's `member_count` with the memberships exported).
    BestEffort,
}

impl ExportConsistency {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Snapshot => "snapshot",
            Self::BestEffort => "best-effort",
        }
    }
}

/// A read-only view of the whole store for `chatmesh backup`, opened by [`Store::export`].
///
/// Every `*_page` method pages with a keyset cursor: it returns the rows whose key is strictly
/// greater than `after` (`None`: from the first), ascending by key, at most `limit` of them (none
/// for `limit` 0). Passing the key of the last row of a page as the next `after` visits every row
/// exactly once; a short (or empty) page means there are no more. Keys compare bytewise in every
/// backend. Memory is bounded by one page.
///
/// Dropping the snapshot ends it (rolls back its read transaction / ends its session).
#[async_trait]
pub trait ExportSnapshot: Send {
    /// What this snapshot guarantees; see [`ExportConsistency`].
    fn consistency(&self) -> ExportConsistency;
    /// Users with their password hashes, by id.
    async fn users_page(&mut self, after: Option<&str>, limit: u32) -> StoreResult<Vec<UserRecord>>;
    /// Rooms (with `head_seq` and `member_count`), by id.
    async fn rooms_page(&mut self, after: Option<&str>, limit: u32) -> StoreResult<Vec<Room>>;
    /// Memberships, by (room_id, user_id).
    async fn memberships_page(&mut self, after: Option<(&str, &str)>, limit: u32) -> StoreResult<Vec<Membership>>;
    /// Messages of every room, by (room_id, seq).
    async fn messages_page(&mut self, after: Option<(&str, i64)>, limit: u32) -> StoreResult<Vec<Message>>;
}

/// Opens the store `url` names: SQLite (created if missing), PostgreSQL or MongoDB, with its
/// migrations / indexes applied.
pub async fn open(url: &StoreUrl) -> anyhow::Result<Arc<dyn Store>> {
    Ok(match url {
        StoreUrl::Sqlite { path } => Arc::new(sqlite::SqliteStore::open(path).await?),
        StoreUrl::Postgres { url } => Arc::new(postgres::PostgresStore::connect(url).await?),
        StoreUrl::Mongo { url } => Arc::new(mongodb::MongoStore::connect(url).await?),
    })
}

/// The durable store. All methods are safe to call concurrently.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Round trip to the backend; used by readiness.
    async fn ping(&self) -> StoreResult<()>;

    /// Creates a user. `UsernameTaken` if the (lower-case) username exists.
    async fn create_user(&self, user: NewUser) -> StoreResult<User>;
    async fn user(&self, id: &UserId) -> StoreResult<Option<User>>;
    /// The user and its password hash, by lower-case username.
    async fn credentials(&self, username: &str) -> StoreResult<Option<(User, String)>>;
    /// Applies the fields that are `Some`; bumps `updated_at`. `NotFound` for an unknown user.
    async fn update_user(&self, id: &UserId, patch: UserPatch, now: Timestamp) -> StoreResult<User>;

    /// Creates a room with its owner as first member (member_count 1, head_seq 0), atomically.
    async fn create_room(&self, room: NewRoom) -> StoreResult<Room>;
    async fn room(&self, id: &RoomId) -> StoreResult<Option<Room>>;
    async fn update_room(&self, id: &RoomId, patch: RoomPatch, now: Timestamp) -> StoreResult<Room>;
    /// Rooms the user is a member of, newest first.
    async fn rooms_of_user(&self, user_id: &UserId) -> StoreResult<Vec<Room>>;
    /// Public rooms, newest first, at most `limit`.
    async fn public_rooms(&self, limit: u32) -> StoreResult<Vec<Room>>;

    /// Adds a member; `Ok(true)` if newly added, `Ok(false)` if already one (idempotent).
    /// member_count stays equal to the number of members. `NotFound` for an unknown room.
    async fn add_member(&self, room_id: &RoomId, user_id: &UserId, now: Timestamp) -> StoreResult<bool>;
    /// Removes a member; `Ok(false)` if it was not one.
    async fn remove_member(&self, room_id: &RoomId, user_id: &UserId) -> StoreResult<bool>;
    async fn is_member(&self, room_id: &RoomId, user_id: &UserId) -> StoreResult<bool>;
    /// Up to `limit` members in the order they joined (then by user id), after the member that
    /// joined at `after.0` with id `after.1` if given.
    async fn members(&self, room_id: &RoomId, after: Option<(Timestamp, &str)>, limit: u32)
    -> StoreResult<Vec<Member>>;
    /// Ids of the rooms the user is a member of, ascending (bytewise).
    async fn room_ids_of_user(&self, user_id: &UserId) -> StoreResult<Vec<String>>;

    /// The embedded sequencer: in ONE transaction, for each request in order, dedupe on
    /// (room, sender, client_msg_id), else assign `seq = head_seq + 1` and store it. Either every
    /// outcome is durable when this returns `Ok`, or nothing is. Seqs of a room are gap-free.
    async fn append_messages(&self, batch: &[SendRequest]) -> StoreResult<Vec<AppendOutcome>>;

    /// Stores messages that already carry their seq (write-back from the cluster sequencer).
    /// Idempotent: a message whose id or (room, seq) is stored already is skipped. Raises the
    /// room's head_seq to at least the highest seq stored.
    async fn upsert_messages(&self, batch: &[Message]) -> StoreResult<()>;

    /// [`Store::upsert_messages`] for a write-back that may come from an epoch that has been taken
    /// over: each message is written as `upsert_messages` writes it (idempotent by (room, seq),
    /// message id and dedupe key; each room's head_seq raised to at least the highest seq written)
    /// unless a fence of its room ([`Store::fence_rooms`]) has `from_seq <= seq` and a token
    /// greater than the message's: then it is refused, not written, and its (room_id, seq) is in
    /// the answer (ordered by room and seq, each once). Refused messages do not move head_seq.
    ///
    /// Atomic with respect to [`Store::fence_rooms`]: the fences checked are those recorded
    /// before the batch is written, and no fence is recorded between the check and the write, so
    /// once `fence_rooms` has returned no message it refuses is stored by a batch (it may have
    /// been stored before the fence: a fence removes nothing). SQL: one transaction, the rooms'
    /// rows locked first (PostgreSQL; SQLite has one writer). MongoDB: one multi-document
    /// transaction on a replica set; a standalone server has none, and there a fence recorded
    /// between the check and the write does not stop that batch (see `MongoStore`).
    ///
    /// [`Store::upsert_messages`] itself ignores fences.
    async fn upsert_messages_fenced(&self, batch: &[FencedMessage]) -> StoreResult<Vec<(String, i64)>>;

    /// Records each fence: from its `from_seq` on, the messages of its room belong to the epoch of
    /// its token, and [`Store::upsert_messages_fenced`] refuses there messages sequenced under a
    /// lower token. A room gathers fences over successive takeovers, one per (room, token):
    /// recording a fence again changes nothing, whatever its `from_seq` (the first one of a token
    /// stands), so a batch can be repeated until it succeeds. All of the batch or nothing (on a
    /// MongoDB standalone server, fence by fence: a retry completes it); `NotFound("room")`, with
    /// nothing recorded, if a room is not stored.
    ///
    /// A fence removes nothing: a message of an older epoch stored before the fence, at or above
    /// its `from_seq`, stays. The new epoch reads `head_seq` after fencing to know where the seqs
    /// it may hand out start.
    async fn fence_rooms(&self, fences: &[RoomFence]) -> StoreResult<()>;
    /// The fences of a room, ascending by token (none for an unknown room).
    async fn room_fences(&self, room_id: &RoomId) -> StoreResult<Vec<RoomFence>>;

    /// Messages with seq > after_seq, ascending, at most `limit`.
    async fn messages_after(&self, room_id: &RoomId, after_seq: i64, limit: u32) -> StoreResult<Vec<Message>>;
    /// The `limit` messages just below `before_seq`, ascending.
    async fn messages_before(&self, room_id: &RoomId, before_seq: i64, limit: u32) -> StoreResult<Vec<Message>>;
    /// The room's head seq (0 when empty); `None` for an unknown room.
    async fn head_seq(&self, room_id: &RoomId) -> StoreResult<Option<i64>>;

    /// Opens a read-only view of the whole store for a backup. SQLite and PostgreSQL always give
    /// [`ExportConsistency::Snapshot`] (one read transaction; REPEATABLE READ on PostgreSQL);
    /// MongoDB gives it on a replica set or sharded cluster (a snapshot session) and
    /// [`ExportConsistency::BestEffort`] on a standalone server. Writers are never blocked.
    async fn export(&self) -> StoreResult<Box<dyn ExportSnapshot>>;

    /// Restore: stores each user that is missing (by id) exactly as given (id, fields, password
    /// hash, `created_at`, `updated_at`). A user whose id is stored already is left as it is,
    /// whatever its fields, so importing the same users again changes nothing. `UsernameTaken`
    /// if a missing user's username belongs to another stored user; then nothing of the batch is
    /// stored (on MongoDB, the users of the batch without a conflict may be).
    async fn import_users(&self, users: &[UserRecord]) -> StoreResult<()>;

    /// Restore: stores each room that is missing (by id) exactly as given, `head_seq` and
    /// `member_count` included; no membership is created (they come with
    /// [`Store::import_memberships`]). A stored room is left as it is, except that its `head_seq`
    /// is raised to the given one if lower (never lowered: a seq handed out once is never handed
    /// out again). `NotFound("user")` if a missing room's owner is not stored (SQL backends;
    /// MongoDB has no foreign keys).
    async fn import_rooms(&self, rooms: &[Room]) -> StoreResult<()>;

    /// Restore: stores each membership that is missing (by (room_id, user_id)) with its
    /// `joined_at`; a stored one is left as it is. Then sets the `member_count` of every room the
    /// batch names to its number of stored memberships, so "member_count is the number of
    /// members" holds after any import (for a consistent backup that is the exported count).
    /// `NotFound("room")` / `NotFound("user")` (SQLite: `NotFound("room or user")`) if a membership
    /// names a room or user that is not stored; then nothing of the batch is stored.
    async fn import_memberships(&self, memberships: &[Membership]) -> StoreResult<()>;

    /// Takes the lease `name` for `holder` until `now + ttl_ms` if it is free: never taken, or
    /// expired (`expires_at <= now`; a released lease is expired). It then gets the next fencing
    /// token of the name, one more than the last one handed out (1 for a new name), so a name's
    /// tokens strictly increase over acquisitions and none is handed out twice, even across
    /// releases. Held unexpired by `holder` itself: extended to `now + ttl_ms`, the token kept.
    /// Held unexpired by another: `None`, nothing changed.
    ///
    /// Atomic: of concurrent acquirers of one free lease, exactly one gets it. Time is the
    /// caller's `now` (the store reads no clock): holders' clocks must agree to within the margin
    /// they keep between renewing and `ttl_ms`.
    async fn acquire_lease(&self, name: &str, holder: &str, ttl_ms: i64, now: Timestamp) -> StoreResult<Option<Lease>>;
    /// Extends the lease to `now + ttl_ms`, same token, if `holder` holds it under `token` and it
    /// has not expired. `None` otherwise, nothing changed: the lease was lost (expired, released,
    /// taken by another), and the caller must stop acting under `token` (acquiring it again gives
    /// a new token).
    async fn renew_lease(
        &self,
        name: &str,
        holder: &str,
        token: i64,
        ttl_ms: i64,
        now: Timestamp,
    ) -> StoreResult<Option<Lease>>;
    /// Ends the lease now if `holder` holds it under `token` and it has not expired: it expires at
    /// `now`, the token stays (the next acquisition gets the one after). Whether it did; `false`
    /// (nothing changed) if the lease was not held so.
    async fn release_lease(&self, name: &str, holder: &str, token: i64, now: Timestamp) -> StoreResult<bool>;
    /// The lease `name` as stored, expired or not; `None` if it was never taken.
    async fn lease(&self, name: &str) -> StoreResult<Option<Lease>>;
    /// Every lease, expired or not, by name (bytewise).
    async fn leases(&self) -> StoreResult<Vec<Lease>>;
}
