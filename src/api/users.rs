//! `/users/me`, `/users/me/password`, `/users/{id}`.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;

use super::extract::{AuthSession, AuthUser, ClientIp, JsonBody};
use crate::domain::UserId;
use crate::domain::{AvatarUrl, DisplayName, Password, StatusText, User};
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;
use crate::store::UserPatch;

pub async fn me(State(state): State<Arc<AppState>>, AuthUser(uid): AuthUser) -> ApiResult<Json<User>> {
    // A token for a user that does not exist (any more) is not a valid identity.
    state.svc.user(&uid).await.map(Json).map_err(|e| match e {
        ApiError::NotFound(_) => ApiError::Unauthorized("the token's user does not exist".into()),
        e => e,
    })
}

pub async fn update_me(
    State(state): State<Arc<AppState>>,
    AuthUser(uid): AuthUser,
    JsonBody(input): JsonBody,
) -> ApiResult<Json<User>> {
    let patch = UserPatch {
        display_name: input.opt_str("display_name")?.map(DisplayName::parse).transpose()?.map(|v| v.into_inner()),
        status_text: input.opt_str("status_text")?.map(StatusText::parse).transpose()?.map(|v| v.into_inner()),
        avatar_url: input.opt_str("avatar_url")?.map(AvatarUrl::parse).transpose()?.map(|v| v.into_inner()),
        password_hash: None,
        version: String::new(),
    };
    Ok(Json(state.svc.update_me(&uid, patch).await?))
}

pub async fn get(
    State(state): State<Arc<AppState>>,
    AuthUser(_): AuthUser,
    Path(id): Path<UserId>,
) -> ApiResult<Json<User>> {
    Ok(Json(state.svc.user(&id).await?))
}

/// `POST /users/me/password` `{current_password, new_password}`: 204, and every token issued
/// before it (the one presented included) is revoked; sockets connected with them are cut.
pub async fn change_password(
    State(state): State<Arc<AppState>>,
    ClientIp(ip): ClientIp,
    AuthSession(session): AuthSession,
    JsonBody(input): JsonBody,
) -> ApiResult<StatusCode> {
    state.svc.check_auth_rate(&ip).await?;
    let current = input.req_str("current_password")?.to_string();
    let new = Password::parse(input.req_str("new_password")?)?;
    state.svc.change_password(&session, current, new).await?;
    Ok(StatusCode::NO_CONTENT)
}
