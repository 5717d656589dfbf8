//! Delivers events to connected sockets.
//!
//! Promise: `publish_message` calls for one room are made in seq order (by the sequencer) and every
//! socket that joined the room receives them in that order. A socket that cannot keep up is
//! disconnected rather than skipped, so it reconnects and resyncs with `after_seq` instead of
//! silently missing a message.

pub mod local;
pub mod redis;

use async_trait::async_trait;

use crate::domain::{Message, Room, User};

#[async_trait]
pub trait Fanout: Send + Sync + 'static {
    /// `message:new` to every socket that joined the message's room.
    async fn publish_message(&self, msg: &Message);
    /// `room:updated` to every socket that joined the room.
    async fn room_updated(&self, room: &Room);
    /// `user:updated` to the user's own sockets and to sockets in `room_ids`.
    async fn user_updated(&self, user: &User, room_ids: &[String]);
    /// `presence` to sockets in `room_ids`.
    async fn presence(&self, user_id: &str, online: bool, room_ids: &[String]);
    /// `typing` to the room's sockets except `except_socket` (the typist's own).
    async fn typing(&self, room_id: &str, user_id: &str, except_socket: &str);
    /// The user left the room: their sockets, on every instance, stop receiving it (as if each had
    /// sent `room:leave`). Once it returns `Ok`, no message accepted later reaches them.
    async fn member_left(&self, room_id: &str, user_id: &str) -> Result<(), crate::error::ApiError>;
    /// Evicts a cache entry on every other instance (this one already did).
    async fn invalidate(&self, what: &crate::cache::Invalidation);
    /// Called before a local socket reads history after joining `room_id`: from the moment this
    /// returns, every message accepted in the room reaches this instance.
    async fn watch_room(&self, room_id: &str) -> Result<(), crate::error::ApiError>;
}

/// The Socket.IO room that holds a user's own sockets (room ids are ULIDs, never this shape).
pub fn user_channel(user_id: &str) -> String {
    format!("user:{user_id}")
}
