//! `/rooms`, `/rooms/{id}`, join/leave and members.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use serde_json::{Value, json};

use super::extract::{AuthUser, JsonBody};
use crate::domain::{Room, RoomName, Topic, Visibility};
use crate::domain::{RoomId, UserId};
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;
use crate::store::RoomPatch;

pub async fn create(
    State(state): State<Arc<AppState>>,
    AuthUser(uid): AuthUser,
    JsonBody(input): JsonBody,
) -> ApiResult<(StatusCode, Json<Room>)> {
    let name = RoomName::parse(input.req_str("name")?)?;
    let topic = input.opt_str("topic")?.map(Topic::parse).transpose()?;
    let visibility = input.opt_str("visibility")?.map(Visibility::parse).transpose()?.unwrap_or(Visibility::Public);
    Ok((StatusCode::CREATED, Json(state.svc.create_room(&uid, name, topic, visibility).await?)))
}

pub async fn list(
    State(state): State<Arc<AppState>>,
    AuthUser(uid): AuthUser,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let rooms = match q.get("scope").map(String::as_str) {
        None | Some("joined") => state.svc.joined_rooms(&uid).await?,
        Some("public") => state.svc.public_rooms().await?,
        Some(_) => {
            return Err(ApiError::validation("scope must be \"joined\" or \"public\""));
        }
    };
    Ok(Json(json!({ "rooms": rooms })))
}

pub async fn get(
    State(state): State<Arc<AppState>>,
    AuthUser(uid): AuthUser,
    Path(id): Path<RoomId>,
) -> ApiResult<Json<Room>> {
    Ok(Json(state.svc.visible_room(&uid, &id).await?))
}

pub async fn update(
    State(state): State<Arc<AppState>>,
    AuthUser(uid): AuthUser,
    Path(id): Path<RoomId>,
    JsonBody(input): JsonBody,
) -> ApiResult<Json<Room>> {
    let patch = RoomPatch {
        name: input.opt_str("name")?.map(RoomName::parse).transpose()?.map(|v| v.into_inner()),
        topic: input.opt_str("topic")?.map(Topic::parse).transpose()?.map(|v| v.into_inner()),
    };
    Ok(Json(state.svc.update_room(&uid, &id, patch).await?))
}

pub async fn join(
    State(state): State<Arc<AppState>>,
    AuthUser(uid): AuthUser,
    Path(id): Path<RoomId>,
) -> ApiResult<Json<Room>> {
    Ok(Json(state.svc.join_room(&uid, &id).await?))
}

pub async fn leave(
    State(state): State<Arc<AppState>>,
    AuthUser(uid): AuthUser,
    Path(id): Path<RoomId>,
) -> ApiResult<StatusCode> {
    state.svc.leave_room(&uid, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn add_member(
    State(state): State<Arc<AppState>>,
    AuthUser(uid): AuthUser,
    Path(id): Path<RoomId>,
    JsonBody(input): JsonBody,
) -> ApiResult<StatusCode> {
    let user_id = UserId::from(input.req_str("user_id")?);
    state.svc.add_member(&uid, &id, &user_id).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn members(
    State(state): State<Arc<AppState>>,
    AuthUser(uid): AuthUser,
    Path(id): Path<RoomId>,
) -> ApiResult<Json<Value>> {
    let members = state.svc.members(&uid, &id).await?;
    Ok(Json(json!({ "members": members })))
}
