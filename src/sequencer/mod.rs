//! Assigns each accepted message its per-room seq and makes it durable before the ack.
//!
//! Promise of every implementation: within a room seqs are 1, 2, 3, ... without gap or duplicate;
//! a retried (room, sender, client_msg_id) with the same body returns the original message; once
//! `send` returns `Ok` the message is kept (the mode's ack level); accepted messages are handed to
//! the [`Fanout`](crate::fanout::Fanout) in seq order per room.

pub mod embedded;
pub mod redis;

use async_trait::async_trait;

use crate::domain::Message;
use crate::error::ApiError;
use crate::store::SendRequest;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendOutcome {
    /// Newly accepted.
    Accepted(Message),
    /// An idempotent retry: the message first accepted for this client_msg_id.
    Duplicate(Message),
}

impl SendOutcome {
    pub fn message(&self) -> &Message {
        match self {
            Self::Accepted(m) | Self::Duplicate(m) => m,
        }
    }
}

/// Completes once the submitted send is sequenced and kept (or refused).
pub type Receipt = futures::future::BoxFuture<'static, Result<SendOutcome, ApiError>>;

#[async_trait]
pub trait Sequencer: Send + Sync + 'static {
    /// Name of the span covering one send's sequencing (traces).
    fn span_name(&self) -> &'static str;

    /// Enqueues a send. Sends submitted one after another (each `submit` awaited before the next)
    /// are sequenced in that order, which keeps one client's messages in the order it sent them.
    async fn submit(&self, req: SendRequest) -> Result<Receipt, ApiError>;

    async fn send(&self, req: SendRequest) -> Result<SendOutcome, ApiError> {
        self.submit(req).await?.await
    }
}
