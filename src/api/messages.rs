//! `POST /rooms/{id}/messages`, `GET /rooms/{id}/messages`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;

use super::extract::{AuthUser, JsonBody};
use crate::domain::RoomId;
use crate::domain::input::parse_seq;
use crate::domain::{ClientMsgId, HistoryPage, Message, MessageBody};
use crate::error::{ApiError, ApiResult};
use crate::service::{Cursor, clamp_limit};
use crate::state::AppState;

pub async fn send(
    State(state): State<Arc<AppState>>,
    AuthUser(uid): AuthUser,
    Path(room_id): Path<RoomId>,
    JsonBody(input): JsonBody,
) -> ApiResult<(StatusCode, Json<Message>)> {
    let started = Instant::now();
    let _inflight = state.admit_send()?;
    let client_msg_id = ClientMsgId::parse(input.req_str("client_msg_id")?)?;
    let body = MessageBody::parse(input.req_str("body")?)?;
    let sent = state.svc.send(&uid, &room_id, client_msg_id, body, ()).await?;
    sent.record("http", started);
    let status = if sent.created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(sent.message)))
}

pub(super) fn int_param(q: &HashMap<String, String>, name: &str) -> ApiResult<Option<i64>> {
    q.get(name)
        .map(|v| v.parse::<i64>().map_err(|_| ApiError::validation(format!("{name} must be an integer"))))
        .transpose()
}

pub async fn history(
    State(state): State<Arc<AppState>>,
    AuthUser(uid): AuthUser,
    Path(room_id): Path<RoomId>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<HistoryPage>> {
    let after = int_param(&q, "after_seq")?.map(|v| parse_seq("after_seq", v)).transpose()?;
    let before = int_param(&q, "before_seq")?.map(|v| parse_seq("before_seq", v)).transpose()?;
    let cursor = match (after, before) {
        (Some(_), Some(_)) => {
            return Err(ApiError::validation("give after_seq or before_seq, not both"));
        }
        (Some(a), None) => Cursor::After(a),
        (None, Some(b)) => Cursor::Before(b),
        (None, None) => Cursor::Latest,
    };
    let limit = clamp_limit(int_param(&q, "limit")?)?;
    Ok(Json(state.svc.history(&uid, &room_id, cursor, limit).await?))
}
