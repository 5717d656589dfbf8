//! The REST API (API.md §4) and operations endpoints (§6), one file per resource.

mod auth;
pub mod cors;
pub mod extract;
mod internal;
mod messages;
mod ops;
mod regions;
mod rooms;
mod users;

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{Method, Uri};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};

use crate::error::ApiError;
use crate::metrics as m;
use crate::state::AppState;
use crate::telemetry;
use tracing::Instrument;

pub fn router(state: Arc<AppState>) -> Router {
    let api = Router::new()
        .route("/auth/register", post(auth::register))
        .route("/auth/login", post(auth::login))
        .route("/auth/logout", post(auth::logout))
        .route("/users/me", get(users::me).patch(users::update_me))
        .route("/users/me/password", post(users::change_password))
        .route("/users/{id}", get(users::get))
        .route("/rooms", post(rooms::create).get(rooms::list))
        .route("/rooms/{id}", get(rooms::get).patch(rooms::update))
        .route("/rooms/{id}/join", post(rooms::join))
        .route("/rooms/{id}/leave", post(rooms::leave))
        .route("/rooms/{id}/members", post(rooms::add_member).get(rooms::members))
        .route("/rooms/{id}/messages", post(messages::send).get(messages::history))
        .route("/cluster", get(ops::cluster));

    let internal = Router::new()
        .route("/ping", get(internal::ping))
        .route("/regions/lane", get(regions::lane))
        .route("/regions/join", post(regions::join))
        .route("/regions/leave", post(regions::leave))
        .route("/regions/members", post(regions::add_member))
        .route("/regions/messages", post(regions::messages))
        .route("/regions/heads", post(regions::heads))
        .route("/regions/outbox", post(regions::outbox))
        .route("/regions/hold", post(regions::hold))
        .route("/regions/view", post(regions::view))
        .route_layer(middleware::from_fn_with_state(state.clone(), internal::guard));

    Router::new()
        .nest("/api/v1", api)
        .nest("/internal/v1", internal)
        .route("/health/live", get(ops::live))
        .route("/health/ready", get(ops::ready))
        .route("/metrics", get(ops::metrics))
        .merge(crate::web::routes())
        .fallback(not_found)
        .method_not_allowed_fallback(not_found)
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .layer(middleware::map_response(security_headers))
        .with_state(state)
}

/// On every answer: browsers must not guess content types (a JSON error echoing input must never
/// run as a script) nor send our URLs (room ids) to other sites.
async fn security_headers(mut res: Response) -> Response {
    let h = res.headers_mut();
    h.insert(axum::http::header::X_CONTENT_TYPE_OPTIONS, axum::http::HeaderValue::from_static("nosniff"));
    h.insert(axum::http::header::REFERRER_POLICY, axum::http::HeaderValue::from_static("no-referrer"));
    res
}

/// `Strict-Transport-Security` when the listener serves TLS: browsers that saw it once refuse
/// plain HTTP to this host for two years (the value browsers' preload lists ask for), so a network
/// attacker cannot strip TLS from a later visit. Not `includeSubDomains`: other hosts under the
/// same domain are not ours to pin.
pub const HSTS: &str = "max-age=63072000";

/// Adds [`HSTS`] to an answer; layered over the whole router (Socket.IO included) when TLS is on.
pub async fn hsts(mut res: Response) -> Response {
    res.headers_mut().insert(axum::http::header::STRICT_TRANSPORT_SECURITY, axum::http::HeaderValue::from_static(HSTS));
    res
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::NotFound(format!("no route for {method} {}", uri.path()))
}

/// Counts every request by route template (never the raw path: ids would make labels unbounded).
async fn observe(State(_): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_string()).unwrap_or_else(|| {
        if req.uri().path().starts_with("/socket.io") { "/socket.io/".into() } else { "unmatched".into() }
    });
    let method = req.method().clone();
    let started = std::time::Instant::now();
    // The caller's W3C trace context, if it sent one: the request span continues that trace.
    let incoming = req.headers().get("traceparent").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let span = if telemetry::traces_enabled() {
        let span = tracing::info_span!(
            "http request",
            otel.name = %format!("{method} {route}"),
            otel.kind = "server",
            http.request.method = %method,
            http.route = %route,
            http.response.status_code = tracing::field::Empty,
        );
        telemetry::set_remote_parent(&span, &incoming);
        span
    } else {
        tracing::Span::none()
    };
    let res = next.run(req).instrument(span.clone()).await;
    let status = res.status().as_u16().to_string();
    span.record("http.response.status_code", status.as_str());
    metrics::counter!(m::HTTP_REQUESTS, "route" => route.clone(), "status" => status.clone()).increment(1);
    // Probes, scrapes and the Socket.IO transport would drown the request log; they are counted.
    if route != "/socket.io/" && route != "/metrics" && !route.starts_with("/health") {
        let trace = if telemetry::traces_enabled() {
            span.in_scope(telemetry::traceparent)
        } else if !telemetry::trace_id(&incoming).is_empty() {
            incoming
        } else {
            telemetry::traceparent()
        };
        tracing::info!(
            method = %method,
            route = %route,
            status = %status,
            latency_us = started.elapsed().as_micros() as u64,
            trace_id = telemetry::trace_id(&trace),
            "request"
        );
    }
    res
}
