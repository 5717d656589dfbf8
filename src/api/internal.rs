//! `/internal/v1`: what instances ask each other. Every request must come from an address in
//! `CHATMESH_INTERNAL_ALLOW` (the TCP peer: a forwarded-for header is a claim, not an address) and
//! carry an internal token (see [`internal`](crate::internal)); embedded mode has no such API.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Json;
use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use serde_json::{Value, json};

use super::extract::bearer;
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

/// The calling instance, as its token names it.
#[derive(Clone)]
pub struct Caller(pub String);

/// Refuses anything but an allowed address with a valid internal token.
pub async fn guard(State(state): State<Arc<AppState>>, mut req: Request, next: Next) -> ApiResult<Response> {
    let Some(tokens) = &state.internal else {
        return Err(ApiError::NotFound("no internal API in embedded mode".into()));
    };
    let peer = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip());
    if !peer.is_some_and(|ip| state.config.internal_allow.iter().any(|net| net.contains(&ip))) {
        tracing::warn!(peer = ?peer, "internal API call from an address outside CHATMESH_INTERNAL_ALLOW");
        return Err(ApiError::Forbidden("this address may not call the internal API".into()));
    }
    let (mut parts, body) = req.into_parts();
    let token = bearer(&parts).ok_or_else(|| ApiError::Unauthorized("invalid internal token".into()))?;
    let caller = tokens.verify(token)?;
    let deadline = parts.headers.get(crate::region::client::DEADLINE_HEADER);
    if let Some(deadline) = deadline.and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<i64>().ok())
        && crate::domain::Timestamp::now().0 > deadline
    {
        metrics::counter!(crate::metrics::REGION_FORWARDED, "peer" => caller, "op" => "late", "outcome" => "refused")
            .increment(1);
        return Err(ApiError::Unavailable("the request arrived after its caller stopped waiting".into()));
    }
    parts.extensions.insert(Caller(caller));
    req = Request::from_parts(parts, body);
    Ok(next.run(req).await)
}

/// `GET /internal/v1/ping`: who answers, and whom it believes called.
pub async fn ping(
    State(state): State<Arc<AppState>>,
    axum::Extension(Caller(caller)): axum::Extension<Caller>,
) -> Json<Value> {
    Json(json!({"instance_id": state.instance_id, "region": state.config.region, "caller": caller}))
}
