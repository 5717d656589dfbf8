//! The pages for people, served from the binary: the chat page at `/` and the operations page at
//! `/admin`. The browser's Socket.IO client is the npm package's build, copied in by build.rs (nothing is loaded from outside the machine).

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

use crate::error::ApiError;
use crate::state::AppState;

const INDEX: &str = include_str!("../web/index.html");
const APP_JS: &str = include_str!("../web/app.js");
const STYLE: &str = include_str!("../web/style.css");
const ADMIN: &str = include_str!("../web/admin.html");
const ADMIN_JS: &str = include_str!("../web/admin.js");
const ADMIN_CSS: &str = include_str!("../web/admin.css");
const SOCKET_IO: &str = include_str!(concat!(env!("OUT_DIR"), "/socket.io.min.js"));

/// The pages load only what this binary serves (no inline script or style, no other origin), may
/// not be framed (clickjacking) and post forms nowhere else.
const CONTENT_SECURITY_POLICY: &str =
    "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'; object-src 'none'";

fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
            (header::X_FRAME_OPTIONS, "DENY"),
        ],
        body,
    )
}

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/", get(|| async { asset("text/html; charset=utf-8", INDEX) }))
        .route("/assets/app.js", get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }))
        .route("/assets/style.css", get(|| async { asset("text/css; charset=utf-8", STYLE) }))
        // The operations page; its data (/api/v1/cluster) is guarded by CHATMESH_ADMIN_TOKEN.
        // The operations page asks for the admin token itself; in cluster mode without one configured
        // there is nothing it could show.
        .route(
            "/admin",
            get(|State(state): State<Arc<AppState>>| async move {
                match state.admin_allowed(None) {
                    Err(ApiError::Forbidden(why)) => Err(ApiError::Forbidden(why)),
                    _ => Ok(asset("text/html; charset=utf-8", ADMIN)),
                }
            }),
        )
        .route("/assets/admin.js", get(|| async { asset("text/javascript; charset=utf-8", ADMIN_JS) }))
        .route("/assets/admin.css", get(|| async { asset("text/css; charset=utf-8", ADMIN_CSS) }))
        .route("/assets/socket.io.min.js", get(|| async { asset("text/javascript; charset=utf-8", SOCKET_IO) }))
}
