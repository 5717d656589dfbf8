//! Operations endpoints: liveness, readiness, metrics, cluster view.

use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::extract::State;
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use serde_json::{Value, json};

use super::extract::bearer;
use crate::app::AppState;
use crate::error::{ApiError, ApiResult};
use crate::metrics as m;

pub async fn live() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

pub async fn ready(State(state): State<Arc<AppState>>) -> (StatusCode, Json<Value>) {
    let started = Instant::now();
    let store_ok = state.svc.store.ping().await.is_ok();
    let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
    metrics::gauge!(m::DEPENDENCY_UP, "dependency" => "store").set(if store_ok {
        1.0
    } else {
        0.0
    });
    let checks = json!({"store": {"ok": store_ok, "latency_ms": latency_ms}});
    let draining = state.is_draining();
    if store_ok && !draining {
        (
            StatusCode::OK,
            Json(json!({"status": "ready", "checks": checks})),
        )
    } else {
        let mut body = json!({"status": "not_ready", "checks": checks});
        if draining {
            body["draining"] = json!(true);
        }
        (StatusCode::SERVICE_UNAVAILABLE, Json(body))
    }
}

pub async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

pub async fn cluster(State(state): State<Arc<AppState>>, parts: Parts) -> ApiResult<Json<Value>> {
    if let Some(admin) = &state.config.admin_token
        && bearer(&parts) != Some(admin.expose())
    {
        return Err(ApiError::Unauthorized("admin token required".into()));
    }
    let now = crate::domain::Timestamp::now();
    let store_ok = state.svc.store.ping().await.is_ok();
    let me = json!({
        "id": state.instance_id,
        "region": state.config.region,
        "address": state.config.bind.to_string(),
        "started_at": state.started_at,
        "last_seen": now,
        "connections": crate::realtime::connection_count(),
        "ready": store_ok && !state.is_draining(),
    });
    Ok(Json(json!({
        "instance_id": state.instance_id,
        "region": state.config.region,
        "instances": [me],
        "sync": {"pending": 0, "lag_ms": 0},
    })))
}
