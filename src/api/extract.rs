//! Request extractors: the authenticated user, the JSON body (with the size limit mapped to 413),
//! and the client IP for rate limits.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;

use crate::auth::Session;
use crate::domain::UserId;
use crate::domain::input::Input;
use crate::error::ApiError;
use crate::state::AppState;

/// The user id of a valid `Authorization: Bearer` token.
pub struct AuthUser(pub UserId);

pub fn bearer(parts: &Parts) -> Option<&str> {
    parts.headers.get(AUTHORIZATION)?.to_str().ok()?.strip_prefix("Bearer ").map(str::trim)
}

impl FromRequestParts<Arc<AppState>> for AuthUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self, ApiError> {
        let AuthSession(session) = AuthSession::from_request_parts(parts, state).await?;
        Ok(Self(UserId::from(session.user_id)))
    }
}

/// The session of a valid, unrevoked `Authorization: Bearer` token (logout, password change).
pub struct AuthSession(pub Session);

impl FromRequestParts<Arc<AppState>> for AuthSession {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self, ApiError> {
        let token = bearer(parts).ok_or_else(|| ApiError::Unauthorized("missing bearer token".into()))?;
        Ok(Self(state.svc.authenticate(token).await?))
    }
}

/// A JSON object body sent as `application/json`. Oversized bodies are 413, anything else 400.
pub struct JsonBody(pub Input);

/// Whether the request says its body is JSON. A browser sends a cross-site form or `text/plain`
/// post without asking the server first; only `application/json` needs a CORS preflight, so
/// refusing the rest keeps a hostile page from registering or logging in its visitors.
fn is_json(req: &Request) -> bool {
    req.headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"))
}

impl FromRequest<Arc<AppState>> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &Arc<AppState>) -> Result<Self, ApiError> {
        if !is_json(&req) {
            return Err(ApiError::validation("the body must be sent as Content-Type: application/json"));
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|rej| {
            if rej.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge { limit: state.config.max_body_bytes }
            } else {
                ApiError::validation(format!("could not read the body: {rej}"))
            }
        })?;
        let value: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| ApiError::validation(format!("malformed JSON: {e}")))?;
        Ok(Self(Input::from_value(value)?))
    }
}

/// The client's IP: the peer address, or the first `X-Forwarded-For` hop behind a trusted proxy.
pub struct ClientIp(pub String);

impl FromRequestParts<Arc<AppState>> for ClientIp {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self, ApiError> {
        if state.config.trust_proxy
            && let Some(first) = parts
                .headers
                .get("x-forwarded-for")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.split(',').next())
                .map(str::trim)
                .filter(|s| !s.is_empty())
        {
            return Ok(Self(first.to_string()));
        }
        let peer = parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip().to_string());
        Ok(Self(peer.unwrap_or_else(|| "unknown".into())))
    }
}
