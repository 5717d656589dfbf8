//! In-process fan-out: emits straight to this instance's sockets.

use async_trait::async_trait;
use serde_json::json;
use socketioxide::{SendError, SocketIo};

use super::{Fanout, user_channel};
use crate::domain::{Message, Room, User};
use crate::metrics as m;

pub struct LocalFanout {
    io: SocketIo,
}

impl LocalFanout {
    pub fn new(io: SocketIo) -> Self {
        Self { io }
    }
}

#[async_trait]
impl Fanout for LocalFanout {
    async fn publish_message(&self, msg: &Message) {
        let mut delivered = 0u64;
        // Serialized once, copied verbatim into each socket's packet.
        let Ok(raw) = serde_json::value::to_raw_value(msg) else {
            return;
        };
        for socket in self.io.to(msg.room_id.clone()).sockets() {
            match socket.emit("message:new", &raw) {
                Ok(()) => delivered += 1,
                Err(SendError::Socket(_)) | Err(SendError::Serialize(_)) => {
                    // A full buffer would mean a gap in this socket's stream: cut it instead, the
                    // client reconnects and resyncs from its last seq.
                    metrics::counter!(m::MESSAGES_DROPPED_SLOW).increment(1);
                    tracing::warn!(socket = %socket.id, room = %msg.room_id, seq = msg.seq, "slow consumer disconnected");
                    let _ = socket.disconnect();
                }
            }
        }
        metrics::counter!(m::MESSAGES_DELIVERED).increment(delivered);
    }

    async fn room_updated(&self, room: &Room) {
        let _ = self.io.to(room.id.clone()).emit("room:updated", room).await;
    }

    async fn user_updated(&self, user: &User, room_ids: &[String]) {
        let mut rooms: Vec<String> = room_ids.to_vec();
        rooms.push(user_channel(&user.id));
        let _ = self.io.to(rooms).emit("user:updated", user).await;
    }

    async fn presence(&self, user_id: &str, online: bool, room_ids: &[String]) {
        if room_ids.is_empty() {
            return;
        }
        let state = if online { "online" } else { "offline" };
        let _ = self
            .io
            .to(room_ids.to_vec())
            .emit("presence", &json!({"user_id": user_id, "state": state}))
            .await;
    }
}
