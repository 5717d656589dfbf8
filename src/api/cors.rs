//! Cross-origin requests: refused unless the page's origin is listed in `CHATMESH_CORS_ORIGINS`.
//!
//! A browser page from another origin may read answers (REST, Socket.IO long-polling) only when
//! the server says so. Nothing is said by default; a listed origin gets its own name back (never
//! `*`), and its preflights are answered for the methods and headers the API uses. Tokens travel in
//! the `Authorization` header or the Socket.IO CONNECT payload, never in cookies, so credentials
//! are not allowed either way.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;
use crate::state::AppState;

const ALLOW_METHODS: &str = "GET, POST, PATCH, OPTIONS";
const ALLOW_HEADERS: &str = "authorization, content-type";
/// How long a browser may keep a preflight's answer.
const MAX_AGE_SECS: &str = "600";

pub async fn cors(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let origin = req.headers().get(header::ORIGIN).and_then(|o| o.to_str().ok()).map(str::to_ascii_lowercase);
    let allowed = origin.as_deref().filter(|o| state.config.cors_origins.iter().any(|a| a == o)).map(str::to_string);
    let preflight =
        req.method() == Method::OPTIONS && req.headers().contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    if preflight {
        let Some(origin) = allowed else {
            return ApiError::Forbidden("cross-origin requests from this origin are not allowed".into())
                .into_response();
        };
        let mut res = StatusCode::NO_CONTENT.into_response();
        allow(&mut res, &origin);
        let h = res.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static(ALLOW_METHODS));
        h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, HeaderValue::from_static(ALLOW_HEADERS));
        h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static(MAX_AGE_SECS));
        return res;
    }
    let mut res = next.run(req).await;
    if let Some(origin) = allowed {
        allow(&mut res, &origin);
    }
    res
}

fn allow(res: &mut Response, origin: &str) {
    let h = res.headers_mut();
    if let Ok(v) = HeaderValue::from_str(origin) {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, v);
    }
    // Caches must not hand one origin's answer to another.
    h.append(header::VARY, HeaderValue::from_static("origin"));
}
