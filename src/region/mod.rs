//! Several regions active-active (DESIGN.md §6). Every room has a home region, whose Redis
//! decides its order and who may write to it: an instance that receives a send, join, leave or
//! invitation for a room homed elsewhere forwards it to the home's internal API
//! ([`forward`], [`client`]) and answers with the home's answer. What each region decides goes
//! to its outboxes ([`outbox`]); every other region pulls them and applies them idempotently
//! ([`replicator`], [`apply`]): messages in seq order into its recent history and fan-out,
//! membership, session and metadata changes into its caches and sockets.
//!
//! With no peer regions (`CHATMESH_PEER_REGIONS` unset) every room is homed here and nothing of
//! this runs.

pub mod apply;
pub mod client;
pub mod forward;
pub mod hlc;
pub mod outbox;
pub mod replicator;
pub mod view;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::domain::Message;
use crate::error::{ApiError, ApiResult};
pub use client::PeerClient;
pub use forward::{ForwardedSend, SendLanes};
pub use outbox::{NoOutbox, Outbox, RedisOutbox, Replicated};

/// Another region, as this instance reaches it.
pub struct Peer {
    pub client: Arc<PeerClient>,
    pub sends: SendLanes,
}

/// This region and its peers.
pub struct Regions {
    own: String,
    peers: Vec<Peer>,
}

impl Regions {
    /// A single region: every room is homed here.
    pub fn single(own: &str) -> Self {
        Self { own: own.to_string(), peers: Vec::new() }
    }

    pub fn from_clients(own: &str, clients: Vec<Arc<PeerClient>>) -> Self {
        let peers =
            clients.into_iter().map(|client| Peer { sends: SendLanes::start(client.clone()), client }).collect();
        Self { own: own.to_string(), peers }
    }

    pub fn name(&self) -> &str {
        &self.own
    }

    pub fn has_peers(&self) -> bool {
        !self.peers.is_empty()
    }

    pub fn peers(&self) -> &[Peer] {
        &self.peers
    }

    /// Where a room homed in `home_region` is decided: `None` here, else the peer to forward to.
    /// A home that is neither this region nor a peer is refused rather than guessed: deciding
    /// such a room here could give two regions the same seq.
    pub fn home_of(&self, home_region: &str) -> ApiResult<Option<&Peer>> {
        if self.peers.is_empty() || home_region == self.own {
            return Ok(None);
        }
        match self.peers.iter().find(|p| p.client.region == home_region) {
            Some(peer) => Ok(Some(peer)),
            None => Err(ApiError::Unavailable(format!(
                "this room's home region `{home_region}` is not among this deployment's regions (CHATMESH_PEER_REGIONS)"
            ))),
        }
    }
}

/// Gets messages into another region's Redis before they are acknowledged (ack level `region`).
#[async_trait]
pub trait HoldElsewhere: Send + Sync + 'static {
    async fn hold(&self, messages: &[Message]) -> ApiResult<()>;
}

/// Asks every peer at once; the first to confirm is enough.
pub struct PeersHold {
    pub peers: Vec<Arc<PeerClient>>,
    pub timeout: Duration,
}

#[async_trait]
impl HoldElsewhere for PeersHold {
    async fn hold(&self, messages: &[Message]) -> ApiResult<()> {
        let body = client::HoldRequest { messages: messages.to_vec() };
        let asks = self.peers.iter().map(|p| {
            let body = &body;
            Box::pin(async move { p.call::<_, client::HoldAnswer>("hold", "/hold", body).await })
        });
        match futures::future::select_ok(asks).await {
            Ok((answer, _)) if answer.held == messages.len() => Ok(()),
            Ok(_) => Err(ApiError::Unavailable("another region did not keep every message; retry".into())),
            Err(_) => Err(ApiError::Unavailable(
                "no other region confirmed the message in time (ack level region); retry".into(),
            )),
        }
    }
}
