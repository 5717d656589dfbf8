//! `/users/me`, `/users/{id}`.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};

use super::extract::{AuthUser, JsonBody};
use crate::domain::UserId;
use crate::domain::{AvatarUrl, DisplayName, StatusText, User};
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
