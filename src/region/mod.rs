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
pub mod homes;
pub mod outbox;
pub mod replicator;
pub mod takeover;
pub mod view;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::domain::{HistoryPage, Message, Room, RoomId};
use crate::error::{ApiError, ApiResult};
use crate::history::Cursor;
use crate::store::Epoch;
pub use client::PeerClient;
use client::{HeadsAnswer, HeadsRequest};
pub use forward::{ForwardedSend, SendLanes};
pub use outbox::{NoOutbox, Outbox, RedisOutbox, Replicated};
use replicator::MessagesRequest;

/// Another region, as this instance reaches it.
pub struct Peer {
    pub client: Arc<PeerClient>,
    pub sends: SendLanes,
}

/// Rooms asked of a home region per heads request at most (its handler refuses more).
pub const MAX_HEADS: usize = 1_000;

impl Peer {
    /// The heads of rooms homed in this peer, as it answers them (it acknowledges their sends;
    /// this region's copies trail by the replication lag). `None` when it does not answer.
    async fn heads(&self, ids: Vec<String>) -> Option<Vec<i64>> {
        let mut heads = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(MAX_HEADS) {
            let ask = HeadsRequest { rooms: chunk.to_vec() };
            let answer: HeadsAnswer = self.client.read("heads", "/heads", &ask).await.ok()?;
            if answer.heads.len() != chunk.len() {
                return None;
            }
            heads.extend(answer.heads);
        }
        Some(heads)
    }

    /// A page of a room homed in this peer: this region's replica (`here`), unless the home has
    /// acknowledged messages the replica does not hold yet where the page reads, then the home's
    /// page. Cut off from the home, the replica's page as it is (a partition's reads go on from
    /// what was replicated).
    pub async fn page(
        &self,
        room_id: &RoomId,
        cursor: Cursor,
        limit: u32,
        here: impl std::future::Future<Output = ApiResult<HistoryPage>>,
    ) -> ApiResult<HistoryPage> {
        let (local, head) = tokio::join!(here, self.heads(vec![room_id.to_string()]));
        let mut local = local?;
        let Some(head) = head.and_then(|h| h.first().copied()) else { return Ok(local) };
        if head <= local.head_seq {
            return Ok(local);
        }
        let page_is_whole = match cursor {
            Cursor::Before(before) => before <= local.head_seq.saturating_add(1),
            Cursor::After(_) => local.has_more,
            Cursor::Latest => false,
        };
        if !page_is_whole {
            let ask = MessagesRequest::new(room_id.as_str(), cursor, limit);
            if let Ok(mut page) = self.client.read::<_, HistoryPage>("history", "/messages", &ask).await {
                page.head_seq = page.head_seq.max(head);
                return Ok(page);
            }
        }
        // The head is what clients decide from whether they caught up: the home's, even when
        // the rest of the page has to wait for replication.
        local.head_seq = head;
        Ok(local)
    }
}

/// This region and its peers.
pub struct Regions {
    own: String,
    peers: Vec<Peer>,
    /// Who holds each region's home lease (with peers; `None` in tests that need no leases).
    homes: Option<Arc<homes::Homes>>,
}

impl Regions {
    /// A single region: every room is homed here.
    pub fn single(own: &str) -> Self {
        Self { own: own.to_string(), peers: Vec::new(), homes: None }
    }

    pub fn from_clients(own: &str, clients: Vec<Arc<PeerClient>>) -> Self {
        let peers =
            clients.into_iter().map(|client| Peer { sends: SendLanes::start(client.clone()), client }).collect();
        Self { own: own.to_string(), peers, homes: None }
    }

    /// Rooms are decided where their home's lease is held, under its fencing token.
    pub fn with_homes(mut self, homes: Arc<homes::Homes>) -> Self {
        self.homes = Some(homes);
        self
    }

    /// The region deciding the rooms homed in `home_region` now.
    pub fn decider_of(&self, home_region: &str) -> String {
        match &self.homes {
            Some(h) => h.holder_of(home_region),
            None => home_region.to_string(),
        }
    }

    /// The epoch this instance decides the rooms homed in `home_region` under (none with a
    /// single region); `unavailable` while it may not decide them.
    pub fn deciding(&self, home_region: &str) -> ApiResult<Option<Epoch>> {
        match &self.homes {
            Some(h) if !self.peers.is_empty() => h.deciding(home_region).map(Some),
            _ => Ok(None),
        }
    }

    pub fn name(&self) -> &str {
        &self.own
    }

    /// Who decides whose rooms (see [`homes::Homes::view`]); empty with a single region.
    pub fn homes_view(&self) -> Vec<serde_json::Value> {
        self.homes.as_ref().map(|h| h.view()).unwrap_or_default()
    }

    pub fn has_peers(&self) -> bool {
        !self.peers.is_empty()
    }

    pub fn peers(&self) -> &[Peer] {
        &self.peers
    }

    /// Raises the head of each room decided in a peer to the peer's, asking every peer at once
    /// (API.md: `head_seq` covers every send acknowledged before the request, wherever). Rooms
    /// whose home does not answer keep this region's head.
    pub async fn raise_to_home_heads(&self, rooms: &mut [Room]) {
        let asks = self.peers.iter().filter_map(|peer| {
            let at: Vec<usize> =
                (0..rooms.len()).filter(|&i| self.decider_of(&rooms[i].home_region) == peer.client.region).collect();
            if at.is_empty() {
                return None;
            }
            let ids = at.iter().map(|&i| rooms[i].id.clone()).collect();
            Some(async move { (at, peer.heads(ids).await) })
        });
        for (at, heads) in futures::future::join_all(asks).await {
            for (i, head) in at.into_iter().zip(heads.unwrap_or_default()) {
                rooms[i].head_seq = rooms[i].head_seq.max(head);
            }
        }
    }

    /// Where a room homed in `home_region` is decided (where its home lease is held): `None`
    /// here, else the peer to forward to.
    /// A home that is neither this region nor a peer is refused rather than guessed: deciding
    /// such a room here could give two regions the same seq.
    pub fn home_of(&self, home_region: &str) -> ApiResult<Option<&Peer>> {
        if self.peers.is_empty() {
            return Ok(None);
        }
        let decider = self.decider_of(home_region);
        if decider == self.own {
            return Ok(None);
        }
        match self.peers.iter().find(|p| p.client.region == decider) {
            Some(peer) => Ok(Some(peer)),
            None => Err(ApiError::Unavailable(format!(
                "the region deciding this room (`{decider}`, for its home `{home_region}`) is not among this \
                 deployment's regions (CHATMESH_PEER_REGIONS)"
            ))),
        }
    }
}

/// Gets messages into another region's Redis before they are acknowledged (ack level `region`).
#[async_trait]
pub trait HoldElsewhere: Send + Sync + 'static {
    async fn hold(&self, messages: &[Message]) -> ApiResult<()>;
}

/// Asks every peer at once; the first to confirm is enough. A peer whose own rooms were taken
/// over (another region holds its home lease: it was lost) is not asked; with none left, the
/// messages are acknowledged on this region alone (counted: `chatmesh_region_acks_degraded_total`),
/// since no other region could confirm anything until one comes back.
pub struct PeersHold {
    pub peers: Vec<Arc<PeerClient>>,
    pub timeout: Duration,
    pub homes: Option<Arc<homes::Homes>>,
}

#[async_trait]
impl HoldElsewhere for PeersHold {
    async fn hold(&self, messages: &[Message]) -> ApiResult<()> {
        let body = client::HoldRequest { messages: messages.to_vec() };
        let live: Vec<&Arc<PeerClient>> = self
            .peers
            .iter()
            .filter(|p| self.homes.as_ref().is_none_or(|h| h.holder_of(&p.region) == p.region))
            .collect();
        if live.is_empty() {
            metrics::counter!(crate::metrics::REGION_ACKS_DEGRADED).increment(messages.len() as u64);
            return Ok(());
        }
        let asks = live.into_iter().map(|p| {
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
