//! `/internal/v1/regions`: what other regions ask of this one, behind the internal guard
//! ([`super::internal::guard`]). Forwarded sends and membership changes for rooms homed here
//! (the calling instance authenticated the user and vouches for it with its token), the outbox
//! stream, history pages for filling gaps, and holding messages for ack level `region`.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::domain::{ClientMsgId, HistoryPage, MessageBody, Room, RoomId, UserId};
use crate::error::{ApiError, ApiResult};
use crate::region::client::{HoldAnswer, HoldRequest};
use crate::region::forward::{SendResult, SendsAnswer, SendsRequest};
use crate::region::replicator::{MessagesRequest, OutboxRequest};
use crate::service::{Cursor, MAX_PAGE, MemberChange};
use crate::state::AppState;

/// Forwarded sends per request at most (a lane batches up to 256).
const MAX_SENDS: usize = 1_024;

fn region_api(state: &AppState) -> ApiResult<&crate::state::RegionApi> {
    state.regions.as_ref().ok_or_else(|| ApiError::NotFound("this deployment has no peer regions".into()))
}

/// `POST /sends`: forwarded sends, sequenced in the order given; one answer each, in order.
pub async fn sends(State(state): State<Arc<AppState>>, Json(req): Json<SendsRequest>) -> ApiResult<Json<SendsAnswer>> {
    region_api(&state)?;
    if req.sends.len() > MAX_SENDS {
        return Err(ApiError::validation(format!("at most {MAX_SENDS} sends per request")));
    }
    let _inflight = state.admit_send()?;
    let mut receipts = Vec::with_capacity(req.sends.len());
    for s in req.sends {
        let submitted = async {
            let user = UserId::from(s.user_id.as_str());
            let room = RoomId::from(s.room_id.as_str());
            let cmid = ClientMsgId::parse(&s.client_msg_id)?;
            let body = MessageBody::parse(&s.body)?;
            let receipt = state.svc.submit_at_home(&user, &room, cmid, body, &s.trace).await?;
            Ok::<_, ApiError>((receipt, user, room, s.trace))
        }
        .await;
        receipts.push(submitted);
    }
    let mut results = Vec::with_capacity(receipts.len());
    for r in receipts {
        let answer = match r {
            Ok((receipt, user, room, trace)) => {
                state.svc.settle(receipt, &room, &user, trace).await.map(|sent| (sent.message, sent.created))
            }
            Err(e) => Err(e),
        };
        results.push(SendResult::from_result(answer));
    }
    Ok(Json(SendsAnswer { results }))
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
    Ok(Json(state.svc.page(&RoomId::from(req.room_id.as_str()), Cursor::After(req.after), limit).await?))
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
