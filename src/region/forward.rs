//! Sends to rooms homed in another region, over a few lanes by room: each lane is one WebSocket
//! to the home's internal API (`/internal/v1/regions/lane`), on which the home submits the sends
//! in the order they arrive, so one room's sends (one socket's among them) are sequenced in the
//! order they were queued here, while many batches are in flight at once: a send waits one round
//! trip, not the one before it (one HTTP request per batch made every send behind it wait for
//! that batch's answer: about 1.7 round trips at 50 sends/s). A send not answered within the
//! region timeout is answered `unavailable` here; the home refuses a batch that reaches it after
//! its deadline (a cut link that heals delivers it late). The lane reconnects only when its
//! connection fails or stays silent for 30 s, so batches keep their order through a short cut.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use super::client::PeerClient;
use crate::domain::Message;
use crate::error::{ApiError, ApiResult};
use crate::metrics as m;
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

    pub fn into_result(self) -> ApiResult<(Message, bool)> {
        match self {
            Self::Sent { message, created } => Ok((message, created)),
            Self::Failed { error } => Err(ApiError::from_wire(0, &serde_json::json!({ "error": error }))),
        }
    }
}

type Reply = oneshot::Sender<ApiResult<(Message, bool)>>;
type Job = (ForwardedSend, Instant, Reply);

/// One batch on a lane, and the home's answer to it.
#[derive(Serialize, Deserialize)]
pub struct LaneFrame {
    pub id: u64,
    /// Unix ms after which the home must not submit these sends.
    pub deadline: i64,
    pub sends: Vec<ForwardedSend>,
}

#[derive(Serialize, Deserialize)]
pub struct LaneAnswer {
    pub id: u64,
    pub results: Vec<SendResult>,
}

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

/// Without any frame (answers, pongs) from the home for this long, the lane reconnects.
const SILENT: Duration = Duration::from_secs(30);
const PING_EVERY: Duration = Duration::from_secs(5);

async fn lane(peer: Arc<PeerClient>, mut rx: mpsc::Receiver<Job>) {
    loop {
        match peer.lane().await {
            Ok(ws) => {
                if !run_lane(&peer, ws, &mut rx).await {
                    return;
                }
            }
            Err(e) => {
                tracing::warn!(peer = %peer.region, error = %e, "send lane: cannot connect to the peer region");
                // Nobody waits longer than the bound for a lane that cannot connect.
                while let Ok((_, _, reply)) = rx.try_recv() {
                    let _ = reply.send(Err(waited_too_long(&peer)));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Serves jobs over one connection until it fails (`true`: reconnect) or the queue closes.
async fn run_lane(peer: &PeerClient, ws: super::client::LaneSocket, rx: &mut mpsc::Receiver<Job>) -> bool {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message as Frame;

    let (mut sink, mut stream) = ws.split();
    let mut pending: HashMap<u64, (Instant, Vec<Reply>)> = HashMap::new();
    let mut next_id = 0u64;
    let mut jobs: Vec<Job> = Vec::with_capacity(MAX_BATCH);
    let mut expire = tokio::time::interval(Duration::from_millis(50));
    let mut ping = tokio::time::interval(PING_EVERY);
    let mut heard = Instant::now();
    let fail_all = |pending: &mut HashMap<u64, (Instant, Vec<Reply>)>| {
        for (_, (_, replies)) in pending.drain() {
            for reply in replies {
                let _ = reply.send(Err(waited_too_long(peer)));
            }
        }
    };
    loop {
        tokio::select! {
            n = rx.recv_many(&mut jobs, MAX_BATCH) => {
                if n == 0 {
                    return false;
                }
                let now = Instant::now();
                let (live, late): (Vec<Job>, Vec<Job>) =
                    std::mem::take(&mut jobs).into_iter().partition(|(_, queued, _)| now < *queued + peer.timeout);
                for (_, _, reply) in late {
                    let _ = reply.send(Err(waited_too_long(peer)));
                }
                if live.is_empty() {
                    continue;
                }
                // The oldest send in the batch sets the deadline of the whole batch.
                let budget = live.iter().map(|(_, queued, _)| *queued + peer.timeout - now).min().unwrap_or(peer.timeout);
                let (sends, replies): (Vec<ForwardedSend>, Vec<Reply>) = live.into_iter().map(|(s, _, r)| (s, r)).unzip();
                next_id += 1;
                let frame = LaneFrame {
                    id: next_id,
                    deadline: crate::domain::Timestamp::now().0 + budget.as_millis() as i64,
                    sends,
                };
                pending.insert(next_id, (now + budget, replies));
                let text = serde_json::to_string(&frame).expect("a frame serializes");
                // A send that cannot even be written in time: the connection is stuck.
                if !matches!(tokio::time::timeout(budget, sink.send(Frame::text(text))).await, Ok(Ok(()))) {
                    fail_all(&mut pending);
                    return true;
                }
                metrics::counter!(m::REGION_FORWARDED, "peer" => peer.region.clone(), "op" => "send_batch", "outcome" => "sent").increment(1);
            }
            frame = stream.next() => {
                heard = Instant::now();
                match frame {
                    Some(Ok(Frame::Text(text))) => {
                        let Ok(answer) = serde_json::from_str::<LaneAnswer>(text.as_str()) else { continue };
                        let Some((deadline, replies)) = pending.remove(&answer.id) else { continue };
                        let elapsed = peer.timeout.saturating_sub(deadline.saturating_duration_since(Instant::now()));
                        metrics::histogram!(m::REGION_FORWARD_LATENCY, "peer" => peer.region.clone(), "op" => "send")
                            .record(elapsed.as_secs_f64());
                        if answer.results.len() != replies.len() {
                            for reply in replies {
                                let _ = reply.send(Err(ApiError::Unavailable("the home region answered a partial batch".into())));
                            }
                            continue;
                        }
                        for (reply, result) in replies.into_iter().zip(answer.results) {
                            let outcome = if matches!(result, SendResult::Sent { .. }) { "ok" } else { "refused" };
                            metrics::counter!(m::REGION_FORWARDED, "peer" => peer.region.clone(), "op" => "send", "outcome" => outcome).increment(1);
                            let _ = reply.send(result.into_result());
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => {
                        fail_all(&mut pending);
                        return true;
                    }
                }
            }
            _ = expire.tick() => {
                let now = Instant::now();
                let expired: Vec<u64> = pending.iter().filter(|(_, (d, _))| *d <= now).map(|(id, _)| *id).collect();
                for id in expired {
                    if let Some((_, replies)) = pending.remove(&id) {
                        for reply in replies {
                            metrics::counter!(m::REGION_FORWARDED, "peer" => peer.region.clone(), "op" => "send", "outcome" => "unavailable").increment(1);
                            let _ = reply.send(Err(waited_too_long(peer)));
                        }
                    }
                }
            }
            _ = ping.tick() => {
                if heard.elapsed() > SILENT {
                    tracing::warn!(peer = %peer.region, "send lane: the peer region has been silent for {SILENT:?}; reconnecting");
                    fail_all(&mut pending);
                    return true;
                }
                if !matches!(tokio::time::timeout(PING_EVERY, sink.send(Frame::Ping(Default::default()))).await, Ok(Ok(()))) {
                    fail_all(&mut pending);
                    return true;
                }
            }
        }
    }
}

fn waited_too_long(peer: &PeerClient) -> ApiError {
    ApiError::Unavailable(format!("region {} (the room's home) did not answer in time; retry", peer.region))
}
