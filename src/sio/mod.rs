//! A lean Socket.IO v5 / Engine.IO v4 server for namespace `/`: long-polling, WebSocket and the
//! upgrade between them, rooms and broadcast.
//!
//! Why not socketioxide: an idle socket there held ~16 KiB of heap (a channel block, three tasks,
//! a copy of the request head); here it is one struct and, on WebSocket, one task. Everything
//! queued for a socket goes out in one flush.

mod engine;

pub use engine::switching_protocols;
mod io;
pub mod packet;
mod socket;

pub use engine::serve;
pub use io::{Ack, Config, Handler, Io};
pub use socket::{Capacity, SendError, Socket, Transport};

/// The routes Socket.IO clients use (`/socket.io/`, with or without the trailing slash).
pub fn router(io: Io) -> axum::Router {
    let handler = move |req: axum::extract::Request| {
        let io = io.clone();
        async move { serve(io, req).await }
    };
    axum::Router::new()
        .route("/socket.io/", axum::routing::any(handler.clone()))
        .route("/socket.io", axum::routing::any(handler))
}
