//! `/rooms`, `/rooms/{id}`, join/leave and members.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use serde_json::{Value, json};

use super::extract::{AuthUser, JsonBody};
use crate::domain::{Room, RoomName, Timestamp, Topic, Visibility};
use crate::domain::{RoomId, UserId};
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;
use crate::store::{Member, RoomPatch};

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
        version: String::new(),
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

/// `GET /rooms/{id}/members?limit=&after=`: a page of members in join order; `next_after` is the
/// `after` of the next page (null on the last).
pub async fn members(
    State(state): State<Arc<AppState>>,
    AuthUser(uid): AuthUser,
    Path(id): Path<RoomId>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let limit = match super::messages::int_param(&q, "limit")? {
        None => DEFAULT_MEMBERS_PAGE,
        Some(l) if (1..=i64::from(MAX_MEMBERS_PAGE)).contains(&l) => l as u32,
        Some(_) => return Err(ApiError::validation(format!("limit must be 1..={MAX_MEMBERS_PAGE}"))),
    };
    let after = q.get("after").map(|c| MemberCursor::parse(c)).transpose()?;
    let page = state.svc.members(&uid, &id, after.as_ref().map(MemberCursor::key), limit).await?;
    let next = (page.len() == limit as usize).then(|| page.last().map(MemberCursor::of)).flatten();
    let members: Vec<_> = page.into_iter().map(|m| m.user).collect();
    Ok(Json(json!({ "members": members, "next_after": next })))
}

/// Members per page when the request names no `limit`, and the most it may name.
const DEFAULT_MEMBERS_PAGE: u32 = 100;
const MAX_MEMBERS_PAGE: u32 = 1000;

/// Where a page of members starts: `<joined_at ms>.<user id>` of the last member of the page before.
struct MemberCursor(Timestamp, String);

impl MemberCursor {
    fn of(m: &Member) -> String {
        format!("{}.{}", m.joined_at.0, m.user.id)
    }

    fn parse(s: &str) -> ApiResult<Self> {
        s.split_once('.')
            .and_then(|(at, id)| Some(Self(Timestamp(at.parse().ok()?), id.to_string())))
            .filter(|c| !c.1.is_empty() && c.1.len() <= 64)
            .ok_or_else(|| ApiError::validation("after must be the next_after of a members page"))
    }

    fn key(&self) -> (Timestamp, &str) {
        (self.0, &self.1)
    }
}
