//! `/internal/v1/regions`: what other regions ask of this one, behind the internal guard
//! ([`super::internal::guard`]). Forwarded sends and membership changes for rooms homed here
//! (sends over a WebSocket lane; the calling instance authenticated the user and vouches for it
//! with its token), the outbox
//! stream, history pages for filling gaps, and holding messages for ack level `region`.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use futures::{SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message as Frame;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

use crate::domain::{ClientMsgId, HistoryPage, MessageBody, Room, RoomId, Timestamp, UserId};
use crate::error::{ApiError, ApiResult};
use crate::region::MAX_HEADS;
use crate::region::client::{HeadsAnswer, HeadsRequest, HoldAnswer, HoldRequest};
use crate::region::forward::{LaneAnswer, LaneFrame, SendResult};
use crate::region::replicator::{MessagesRequest, OutboxRequest};
use crate::service::{MAX_PAGE, MemberChange};
use crate::state::AppState;

fn region_api(state: &AppState) -> ApiResult<&crate::state::RegionApi> {
    state.regions.as_ref().ok_or_else(|| ApiError::NotFound("this deployment has no peer regions".into()))
}

/// Forwarded sends per lane frame at most (a lane batches up to 256).
const MAX_SENDS: usize = 1_024;

/// `GET /lane` (WebSocket): a send lane from another region. Frames of forwarded sends are
/// submitted in the order they arrive (so each room's sends keep the order the other region
/// queued them in); each frame's answers go back as soon as its sends are kept, tagged with its id.
pub async fn lane(State(state): State<Arc<AppState>>, mut req: Request) -> Response {
    if let Err(e) = region_api(&state) {
        return e.into_response();
    }
    let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned() else {
        return ApiError::validation("a send lane is a WebSocket").into_response();
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else { return };
        let config = WebSocketConfig::default().max_message_size(Some(state.config.max_body_bytes * 64));
        let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config)).await;
        serve_lane(state, ws).await;
    });
    crate::sio::switching_protocols(key.as_bytes())
}

async fn serve_lane(state: Arc<AppState>, ws: WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>) {
    let (mut sink, mut stream) = ws.split();
    let (tx, mut rx) = mpsc::unbounded_channel::<Frame>();
    let writer = tokio::spawn(async move {
        while let Some(frame) = rx.recv().await {
            if sink.send(frame).await.is_err() {
                break;
            }
        }
    });
    while let Some(Ok(frame)) = stream.next().await {
        match frame {
            Frame::Text(text) => {
                let Ok(frame) = serde_json::from_str::<LaneFrame>(text.as_str()) else { break };
                take_frame(&state, frame, &tx).await;
            }
            Frame::Ping(p) => {
                let _ = tx.send(Frame::Pong(p));
            }
            Frame::Close(_) => break,
            _ => {}
        }
    }
    drop(tx);
    let _ = writer.await;
}

/// Submits one frame's sends in order (before the next frame is read) and answers it once they
/// are kept. A frame past its deadline is refused whole: its sender stopped waiting.
async fn take_frame(state: &Arc<AppState>, frame: LaneFrame, tx: &mpsc::UnboundedSender<Frame>) {
    let answer = |results: Vec<SendResult>| {
        let text = serde_json::to_string(&LaneAnswer { id: frame.id, results }).expect("an answer serializes");
        let _ = tx.send(Frame::text(text));
    };
    let refuse_all =
        |e: ApiError| answer(frame.sends.iter().map(|_| SendResult::from_result(Err(e.clone()))).collect());
    if Timestamp::now().0 > frame.deadline {
        metrics::counter!(crate::metrics::REGION_FORWARDED, "peer" => "lane", "op" => "late", "outcome" => "refused")
            .increment(1);
        return refuse_all(ApiError::Unavailable("the sends arrived after their caller stopped waiting".into()));
    }
    if frame.sends.len() > MAX_SENDS {
        return refuse_all(ApiError::validation(format!("at most {MAX_SENDS} sends per frame")));
    }
    let inflight = match state.admit_send() {
        Ok(t) => t,
        Err(e) => return refuse_all(e),
    };
    let mut receipts = Vec::with_capacity(frame.sends.len());
    for s in &frame.sends {
        let submitted = async {
            let user = UserId::from(s.user_id.as_str());
            let room = RoomId::from(s.room_id.as_str());
            let cmid = ClientMsgId::parse(&s.client_msg_id)?;
            let body = MessageBody::parse(&s.body)?;
            let receipt = state.svc.submit_at_home(&user, &room, cmid, body, &s.trace).await?;
            Ok::<_, ApiError>((receipt, user, room, s.trace.clone()))
        }
        .await;
        receipts.push(submitted);
    }
    let (state, tx, id) = (state.clone(), tx.clone(), frame.id);
    tokio::spawn(async move {
        let _inflight = inflight;
        let mut results = Vec::with_capacity(receipts.len());
        for r in receipts {
            let sent = match r {
                Ok((receipt, user, room, trace)) => {
                    state.svc.settle(receipt, &room, &user, trace).await.map(|sent| (sent.message, sent.created))
                }
                Err(e) => Err(e),
            };
            results.push(SendResult::from_result(sent));
        }
        let text = serde_json::to_string(&LaneAnswer { id, results }).expect("an answer serializes");
        let _ = tx.send(Frame::text(text));
    });
}

/// `POST /join`: a join of a room homed here.
pub async fn join(State(state): State<Arc<AppState>>, Json(req): Json<MemberChange>) -> ApiResult<Json<Room>> {
    region_api(&state)?;
    let room = state.svc.join_at_home(&UserId::from(req.user_id.as_str()), &RoomId::from(req.room_id.as_str())).await?;
    Ok(Json(room))
}

/// `POST /leave`: a leave of a room homed here.
pub async fn leave(State(state): State<Arc<AppState>>, Json(req): Json<MemberChange>) -> ApiResult<Json<Value>> {
    region_api(&state)?;
    state.svc.leave_at_home(&UserId::from(req.user_id.as_str()), &RoomId::from(req.room_id.as_str())).await?;
    Ok(Json(json!({"ok": true})))
}

/// `POST /members`: the owner (`by`) adds a member to a room homed here.
pub async fn add_member(State(state): State<Arc<AppState>>, Json(req): Json<MemberChange>) -> ApiResult<Json<Value>> {
    region_api(&state)?;
    let owner = req.by.as_deref().ok_or_else(|| ApiError::validation("by (the owner) is required"))?;
    state
        .svc
        .add_member_at_home(
            &UserId::from(owner),
            &RoomId::from(req.room_id.as_str()),
            &UserId::from(req.user_id.as_str()),
        )
        .await?;
    Ok(Json(json!({"ok": true})))
}

/// `POST /messages`: a page of a room's history after a seq (filling a replication gap).
pub async fn messages(
    State(state): State<Arc<AppState>>,
    Json(req): Json<MessagesRequest>,
) -> ApiResult<Json<HistoryPage>> {
    region_api(&state)?;
    let limit = req.limit.clamp(1, MAX_PAGE);
    Ok(Json(state.svc.page(&RoomId::from(req.room_id.as_str()), req.cursor(), limit).await?))
}

/// `POST /heads`: this region's head of each room (the home's, for the rooms homed here).
pub async fn heads(State(state): State<Arc<AppState>>, Json(req): Json<HeadsRequest>) -> ApiResult<Json<HeadsAnswer>> {
    let api = region_api(&state)?;
    if req.rooms.len() > MAX_HEADS {
        return Err(ApiError::validation(format!("at most {MAX_HEADS} rooms per heads request")));
    }
    let ids: Vec<RoomId> = req.rooms.iter().map(|id| RoomId::from(id.as_str())).collect();
    Ok(Json(HeadsAnswer { heads: api.history.heads(&ids).await? }))
}

/// `POST /outbox`: this region's outboxes from the caller's cursors, streamed as JSON lines.
pub async fn outbox(State(state): State<Arc<AppState>>, Json(req): Json<OutboxRequest>) -> ApiResult<Response> {
    let api = region_api(&state)?;
    let stream = api.outbox.clone().stream(req.cursors).await?;
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], Body::from_stream(stream)).into_response())
}

/// `POST /hold`: keeps messages of rooms homed in the caller's region (ack level `region`).
pub async fn hold(State(state): State<Arc<AppState>>, Json(req): Json<HoldRequest>) -> ApiResult<Json<HoldAnswer>> {
    let api = region_api(&state)?;
    let mut held = 0;
    for m in &req.messages {
        api.applier.apply_message(m).await?;
        held += 1;
    }
    Ok(Json(HoldAnswer { held }))
}

/// `POST /view`: this region's live instances (for the other regions' cluster views).
pub async fn view(State(state): State<Arc<AppState>>) -> ApiResult<Json<Value>> {
    region_api(&state)?;
    let me = state.instance_record().await;
    let view = state.ops.cluster(me).await;
    Ok(Json(json!({"region": state.config.region, "instances": view["instances"]})))
}
