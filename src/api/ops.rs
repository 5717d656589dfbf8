//! Operations endpoints: liveness, readiness, metrics, cluster view.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use serde_json::{Value, json};

use super::extract::bearer;
use crate::error::ApiResult;
use crate::state::AppState;

pub async fn live() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

pub async fn ready(State(state): State<Arc<AppState>>) -> (StatusCode, Json<Value>) {
    let (ready, checks) = state.check_ready().await;
    let draining = state.is_draining();
    if ready {
        (StatusCode::OK, Json(json!({"status": "ready", "checks": checks})))
    } else {
        let mut body = json!({"status": "not_ready", "checks": checks});
        if draining {
            body["draining"] = json!(true);
        }
        (StatusCode::SERVICE_UNAVAILABLE, Json(body))
    }
}

pub async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], crate::metrics::render(&state.metrics))
}

pub async fn cluster(State(state): State<Arc<AppState>>, parts: Parts) -> ApiResult<Json<Value>> {
    state.admin_allowed(bearer(&parts))?;
    let me = state.instance_record().await;
    let mut view = state.ops.cluster(me).await;
    view["instance_id"] = json!(state.instance_id);
    view["region"] = json!(state.config.region);
    if let Some(api) = &state.regions {
        view["regions"] = json!(crate::region::view::peers(api).await);
        view["homes"] = json!(state.svc.homes_view());
    }
    Ok(Json(view))
}
