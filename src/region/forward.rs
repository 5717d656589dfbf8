//! Sends to rooms homed in another region, forwarded in batches over a few lanes by room (as
//! the Redis sequencer batches them): one batch in flight per lane, so one room's sends reach
//! the home in the order they were queued, while lanes overlap their round trips. A send that
//! waited in a lane past the region timeout is answered `unavailable` without being sent, so
//! every forwarded send is answered within the bound even while the link is cut.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use super::client::PeerClient;
use crate::domain::Message;
use crate::error::{ApiError, ApiResult};
use crate::redis_io::keys::shard_of;

const LANES: usize = 4;
const MAX_BATCH: usize = 256;
const QUEUE: usize = 4_096;

/// One send as the home region receives it: the sender was authenticated by the forwarding
/// instance, which vouches for it with its internal token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ForwardedSend {
    pub user_id: String,
    pub room_id: String,
    pub client_msg_id: String,
    pub body: String,
    #[serde(default)]
    pub trace: String,
}

#[derive(Serialize, Deserialize)]
pub struct SendsRequest {
    pub sends: Vec<ForwardedSend>,
}

/// The home's answer to one forwarded send.
#[derive(Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SendResult {
    Sent { message: Message, created: bool },
    Failed { error: serde_json::Value },
}

impl SendResult {
    pub fn from_result(r: ApiResult<(Message, bool)>) -> Self {
        match r {
            Ok((message, created)) => Self::Sent { message, created },
            Err(e) => Self::Failed { error: e.body()["error"].clone() },
        }
    }

    fn into_result(self) -> ApiResult<(Message, bool)> {
        match self {
            Self::Sent { message, created } => Ok((message, created)),
            Self::Failed { error } => Err(ApiError::from_wire(0, &serde_json::json!({ "error": error }))),
        }
    }
}

#[derive(Serialize, Deserialize)]
pub struct SendsAnswer {
    pub results: Vec<SendResult>,
}

type Reply = oneshot::Sender<ApiResult<(Message, bool)>>;
type Job = (ForwardedSend, Instant, Reply);

/// The send lanes to one peer region.
pub struct SendLanes {
    lanes: Vec<mpsc::Sender<Job>>,
}

impl SendLanes {
    pub fn start(peer: Arc<PeerClient>) -> Self {
        let lanes = (0..LANES)
            .map(|_| {
                let (tx, rx) = mpsc::channel(QUEUE);
                tokio::spawn(lane(peer.clone(), rx));
                tx
            })
            .collect();
        Self { lanes }
    }

    /// Queues a send; once this returns, later sends to the same room are sent after it. The
    /// receiver completes with the home's answer.
    pub async fn submit(&self, send: ForwardedSend) -> ApiResult<oneshot::Receiver<ApiResult<(Message, bool)>>> {
        let (tx, rx) = oneshot::channel();
        let lane = &self.lanes[shard_of(&send.room_id, LANES as u32) as usize];
        lane.send((send, Instant::now(), tx))
            .await
            .map_err(|_| ApiError::Unavailable("forwarding is shutting down".into()))?;
        Ok(rx)
    }
}

async fn lane(peer: Arc<PeerClient>, mut rx: mpsc::Receiver<Job>) {
    let mut jobs: Vec<Job> = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut jobs, MAX_BATCH).await > 0 {
        let now = Instant::now();
        let (live, late): (Vec<Job>, Vec<Job>) =
            std::mem::take(&mut jobs).into_iter().partition(|(_, queued, _)| now < *queued + peer.timeout);
        for (_, _, reply) in late {
            let _ = reply.send(Err(waited_too_long(&peer)));
        }
        if live.is_empty() {
            continue;
        }
        // The oldest send in the batch sets the deadline of the whole request.
        let budget = live.iter().map(|(_, queued, _)| *queued + peer.timeout - now).min().unwrap_or(peer.timeout);
        let (sends, replies): (Vec<ForwardedSend>, Vec<Reply>) = live.into_iter().map(|(s, _, r)| (s, r)).unzip();
        let n = sends.len();
        let answer =
            peer.call_within::<_, SendsAnswer>("send", "/sends", &SendsRequest { sends }, budget.max(MIN_BUDGET)).await;
        match answer {
            Ok(SendsAnswer { results }) if results.len() == n => {
                for (reply, result) in replies.into_iter().zip(results) {
                    let _ = reply.send(result.into_result());
                }
            }
            Ok(_) => {
                for reply in replies {
                    let _ = reply.send(Err(ApiError::Unavailable("the home region answered a partial batch".into())));
                }
            }
            Err(e) => {
                for reply in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }
}

/// Below this, a request could not even cross to a nearby region.
const MIN_BUDGET: Duration = Duration::from_millis(20);

fn waited_too_long(peer: &PeerClient) -> ApiError {
    ApiError::Unavailable(format!("region {} (the room's home) did not answer in time; retry", peer.region))
}
