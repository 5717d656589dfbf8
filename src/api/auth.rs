//! `POST /auth/register`, `POST /auth/login`, `POST /auth/logout`.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{Value, json};

use super::extract::{AuthSession, ClientIp, JsonBody};
use crate::domain::{DisplayName, Password, Username};
use crate::error::ApiResult;
use crate::state::AppState;

pub async fn register(
    State(state): State<Arc<AppState>>,
    ClientIp(ip): ClientIp,
    JsonBody(input): JsonBody,
) -> ApiResult<(StatusCode, Json<Value>)> {
    state.svc.check_auth_rate(&ip).await?;
    let username = Username::parse(input.req_str("username")?)?;
    let password = Password::parse(input.req_str("password")?)?;
    let display_name = input.opt_str("display_name")?.map(DisplayName::parse).transpose()?;
    let (user, token) = state.svc.register(username, password, display_name).await?;
    Ok((StatusCode::CREATED, Json(json!({"user": user, "token": token}))))
}

pub async fn login(
    State(state): State<Arc<AppState>>,
    ClientIp(ip): ClientIp,
    JsonBody(input): JsonBody,
) -> ApiResult<Json<Value>> {
    state.svc.check_auth_rate(&ip).await?;
    let username = input.req_str("username")?;
    let password = input.req_str("password")?;
    let (user, token) = state.svc.login(username, password.to_string()).await?;
    Ok(Json(json!({"user": user, "token": token})))
}

/// `POST /auth/logout`: 204; the presented token is refused from now on, on every instance, and
/// the sockets connected with it are cut.
pub async fn logout(State(state): State<Arc<AppState>>, AuthSession(session): AuthSession) -> ApiResult<StatusCode> {
    state.svc.logout(&session).await?;
    Ok(StatusCode::NO_CONTENT)
}
