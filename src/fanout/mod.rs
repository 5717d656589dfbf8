//! Delivers to connected sockets, on this instance or on all of them: three promises, three
//! traits ([`Delivery`] of chat messages, [`Notices`], cache [`Evictions`]), each implemented
//! once per mode ([`local::LocalFanout`] in-process, [`redis::RedisFanout`] over pub/sub).
//!
//! A socket that cannot keep up is disconnected rather than skipped, so it reconnects and
//! resyncs with `after_seq` instead of silently missing a message.

pub mod local;
pub mod redis;
pub mod seal;

use async_trait::async_trait;

use crate::cache::Invalidation;
use crate::domain::{Message, Room, User};
use crate::error::ApiError;
use crate::sessions::Ended;

/// Chat messages to the sockets in their room.
///
/// Promise: `publish_message` calls for one room are made in seq order (by the sequencer) and
/// every socket that joined the room receives them in that order, each once; a socket whose
/// user left the room receives none accepted after the leave was answered.
#[async_trait]
pub trait Delivery: Send + Sync + 'static {
    /// `message:new` to every socket that joined the message's room.
    async fn publish_message(&self, msg: &Message);
    /// Called before a local socket reads history after joining `room_id`: from the moment this
    /// returns, every message accepted in the room reaches this instance.
    async fn watch_room(&self, room_id: &str) -> Result<(), ApiError>;
    /// The user left the room: their sockets, on every instance, stop receiving it (as if each had
    /// sent `room:leave`). Once it returns `Ok`, no message accepted later reaches them.
    async fn member_left(&self, room_id: &str, user_id: &str) -> Result<(), ApiError>;
    /// The user's sessions that `ended` covers were revoked: their sockets, on every instance,
    /// are disconnected (their clients' next CONNECT is refused). Best effort: the revocation
    /// itself is already recorded, so a reconnect is refused whether or not this arrives.
    async fn end_sessions(&self, user_id: &str, ended: &Ended);
}

/// Notices to sockets on every instance, best effort and with no ordering promise: a lost one
/// costs a stale display, never a message.
#[async_trait]
pub trait Notices: Send + Sync + 'static {
    /// `room:updated` to every socket that joined the room.
    async fn room_updated(&self, room: &Room);
    /// `user:updated` to the user's own sockets and to sockets in `room_ids`.
    async fn user_updated(&self, user: &User, room_ids: &[String]);
    /// `presence` to sockets in `room_ids` when the user's first socket came or last went, here
    /// and in every region; returns whether it did so in this region (the other regions must
    /// hear of it).
    async fn presence(&self, user_id: &str, online: bool, room_ids: &[String]) -> bool;
    /// A peer region's user came online there (first socket) or went offline (last): `presence`
    /// here too unless this or a third region still has the user.
    async fn presence_elsewhere(&self, _region: &str, _user_id: &str, _online: bool, _room_ids: &[String]) {}
    /// `typing` to the room's sockets except `except_socket` (the typist's own).
    async fn typing(&self, room_id: &str, user_id: &str, except_socket: &str);
}

/// Cache evictions on every other instance (the caller evicted its own already). Best effort:
/// caches that must not be stale carry their own check (see [`revocation`](crate::revocation)).
#[async_trait]
pub trait Evictions: Send + Sync + 'static {
    async fn invalidate(&self, what: &Invalidation);
}

/// The Socket.IO room that holds a user's own sockets (room ids are ULIDs, never this shape).
pub fn user_channel(user_id: &str) -> String {
    format!("{USER_CHANNEL_PREFIX}{user_id}")
}

const USER_CHANNEL_PREFIX: &str = "user:";
/// Every connected socket is in its user channel and its session channel.
pub const INTERNAL_CHANNELS_PER_SOCKET: usize = 2;
const SESSION_CHANNEL_PREFIX: &str = "session:";

/// The Socket.IO room of the sockets connected with one token: `session:<issued ms>:<token id>`,
/// so that a revocation finds them by token or by issue time.
pub fn session_channel(session: &crate::auth::Session) -> String {
    format!("{SESSION_CHANNEL_PREFIX}{}:{}", session.issued_ms, session.token_id)
}

/// The (issued ms, token id) of a socket's session channel.
fn session_of(socket: &crate::sio::Socket) -> Option<(i64, String)> {
    let room = socket.room_starting_with(SESSION_CHANNEL_PREFIX)?;
    let (ms, id) = room.strip_prefix(SESSION_CHANNEL_PREFIX)?.split_once(':')?;
    Some((ms.parse().ok()?, id.to_string()))
}

/// Disconnects this instance's sockets of `user_id` whose session `ended` covers.
pub fn end_local_sessions(io: &crate::sio::Io, user_id: &str, ended: &Ended) -> usize {
    let mut cut = 0;
    for s in io.sockets_in(&user_channel(user_id)) {
        if session_of(&s).is_some_and(|(ms, id)| ended.covers(&id, ms)) {
            tracing::info!(socket = %s.id, user = %user_id, "session revoked: disconnecting");
            s.close();
            cut += 1;
        }
    }
    cut
}

/// Whether a Socket.IO room name is one of chatmesh's own channels, which sockets must not join,
/// leave or address: leaving its own user channel would let a socket escape a REST leave.
pub fn is_internal_channel(name: &str) -> bool {
    name.starts_with(USER_CHANNEL_PREFIX) || name.starts_with(SESSION_CHANNEL_PREFIX)
}
