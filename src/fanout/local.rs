//! In-process fan-out: emits straight to this instance's sockets.

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::json;
use serde_json::value::RawValue;

use super::{Delivery, Evictions, Notices, end_local_sessions, user_channel};
use crate::cache::Invalidation;
use crate::domain::{Message, Room, User};
use crate::error::ApiError;
use crate::metrics as m;
use crate::sessions::Ended;
use crate::sio::{Io, SendError, Socket};

pub struct LocalFanout {
    io: Io,
}

impl LocalFanout {
    pub fn new(io: Io) -> Self {
        Self { io }
    }
}

/// Emits `message:new` (already serialized) to this instance's sockets in the room. A socket whose
/// buffer is full is disconnected: a skipped message would be a silent gap in its stream, a
/// disconnect makes the client reconnect and resync from its last seq.
pub fn deliver_local(io: &Io, room_id: &str, seq: i64, raw: &RawValue) {
    let Ok(frame) = crate::sio::packet::event("message:new", raw) else { return };
    let mut delivered = 0u64;
    let mut slow: Vec<Arc<Socket>> = Vec::new();
    io.for_each_in(room_id, |socket| match socket.send(frame.clone()) {
        Ok(()) => delivered += 1,
        Err(SendError::Full) => slow.push(socket.clone()),
        Err(SendError::Closed) => {}
    });
    for socket in slow {
        metrics::counter!(m::MESSAGES_DROPPED_SLOW).increment(1);
        tracing::warn!(socket = %socket.id, room = %room_id, seq, "slow consumer disconnected");
        socket.close();
    }
    m::TOTALS.delivered(delivered);
}

/// Takes this instance's sockets of `user_id` out of `room_id`.
pub fn stop_delivery(io: &Io, room_id: &str, user_id: &str) {
    for s in io.sockets_in(&user_channel(user_id)) {
        s.leave(room_id);
    }
}

/// `typing` to this instance's sockets in the room, except the typist's own socket.
pub async fn emit_typing(io: &Io, room_id: &str, user_id: &str, except_socket: &str) {
    let payload = json!({"room_id": room_id, "user_id": user_id});
    let Ok(frame) = crate::sio::packet::event("typing", &payload) else { return };
    io.for_each_in(room_id, |socket| {
        if &*socket.id != except_socket {
            let _ = socket.send(frame.clone());
        }
    });
}

#[async_trait]
impl Delivery for LocalFanout {
    async fn publish_message(&self, msg: &Message) {
        // Serialized once, copied verbatim into each socket's packet.
        if let Ok(raw) = serde_json::value::to_raw_value(msg) {
            deliver_local(&self.io, &msg.room_id, msg.seq, &raw);
        }
    }

    async fn watch_room(&self, _room_id: &str) -> Result<(), ApiError> {
        // Every accepted message is published in-process: nothing to subscribe to.
        Ok(())
    }

    async fn member_left(&self, room_id: &str, user_id: &str) -> Result<(), ApiError> {
        stop_delivery(&self.io, room_id, user_id);
        Ok(())
    }

    async fn end_sessions(&self, user_id: &str, ended: &Ended) {
        end_local_sessions(&self.io, user_id, ended);
    }
}

#[async_trait]
impl Notices for LocalFanout {
    async fn room_updated(&self, room: &Room) {
        self.io.broadcast(std::slice::from_ref(&room.id), "room:updated", room);
    }

    async fn user_updated(&self, user: &User, room_ids: &[String]) {
        let mut rooms: Vec<String> = room_ids.to_vec();
        rooms.push(user_channel(&user.id));
        self.io.broadcast(&rooms, "user:updated", user);
    }

    async fn presence(&self, user_id: &str, online: bool, room_ids: &[String]) -> bool {
        if !room_ids.is_empty() {
            let state = if online { "online" } else { "offline" };
            self.io.broadcast(room_ids, "presence", &json!({"user_id": user_id, "state": state}));
        }
        true
    }

    async fn typing(&self, room_id: &str, user_id: &str, except_socket: &str) {
        emit_typing(&self.io, room_id, user_id, except_socket).await;
    }
}

#[async_trait]
impl Evictions for LocalFanout {
    async fn invalidate(&self, _what: &Invalidation) {
        // One instance: the service evicted its own cache already.
    }
}
