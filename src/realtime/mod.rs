//! The Socket.IO namespace `/` (API.md §5): handshake auth, connection bookkeeping and the event
//! handlers ([`rooms`]: join/leave/sync, [`messages`]: send/typing).

mod messages;
mod order;
mod rooms;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use socketioxide::SocketIo;
use socketioxide::extract::{AckSender, SocketRef, TryData};
use socketioxide::handler::ConnectHandler;
use socketioxide::layer::SocketIoLayer;

use crate::app::AppState;
use crate::config::Config;
use crate::error::ApiError;
use crate::fanout::user_channel;
use crate::metrics as m;

pub use order::SocketOrder;

/// Packets this much over the body limit still get a clean `payload_too_large` ack; beyond it
/// the transport itself refuses them and closes the connection.
const TRANSPORT_SLACK: usize = 4;
/// Packets buffered per socket before it counts as a slow consumer (see fanout).
const SOCKET_BUFFER: usize = 8192;
/// WebSocket read buffer per socket. tungstenite fills (and so touches) all of it; packets here are
/// small, and a frame larger than the buffer grows it for that frame only.
const WS_READ_BUFFER: usize = 1024;

static CONNECTIONS: AtomicI64 = AtomicI64::new(0);

/// Sockets connected to this instance.
pub fn connection_count() -> i64 {
    CONNECTIONS.load(Ordering::Relaxed)
}

/// Who a socket belongs to; set by the handshake middleware.
#[derive(Clone)]
pub struct Identity {
    pub user_id: String,
}

pub fn build_layer(config: &Config) -> (SocketIoLayer, SocketIo) {
    let transport_limit = (config.max_body_bytes * TRANSPORT_SLACK).max(256 * 1024);
    SocketIo::builder()
        .max_payload(transport_limit as u64)
        .ws_max_message_size(transport_limit)
        .ws_max_frame_size(transport_limit)
        .max_buffer_size(SOCKET_BUFFER)
        .ws_read_buffer_size(WS_READ_BUFFER)
        .ack_timeout(Duration::from_secs(10))
        .build_layer()
}

/// Engine.IO keeps each socket's request head (URI, headers and extensions) for the socket's whole
/// life. As hyper parses them, they are slices of the connection's read buffer (8 KiB or more),
/// which then stays allocated per idle socket; copying out the few bytes they need lets it go.
/// axum's router adds one more slice before any layer runs: the `OriginalUri` extension.
pub async fn detach_request_head(mut req: axum::extract::Request) -> axum::extract::Request {
    if !req.uri().path().starts_with("/socket.io") {
        return req;
    }
    let headers: axum::http::HeaderMap = req
        .headers()
        .iter()
        .map(|(name, value)| {
            let owned = axum::http::HeaderValue::from_bytes(value.as_bytes()).unwrap_or_else(|_| value.clone());
            (name.clone(), owned)
        })
        .collect();
    *req.headers_mut() = headers;
    if let Ok(uri) = axum::http::Uri::try_from(req.uri().to_string()) {
        *req.uri_mut() = uri;
    }
    let original = req.extensions().get::<axum::extract::OriginalUri>().map(|o| o.0.to_string());
    if let Some(Ok(uri)) = original.map(axum::http::Uri::try_from) {
        req.extensions_mut().insert(axum::extract::OriginalUri(uri));
    }
    req
}

pub fn register(io: &SocketIo, state: Arc<AppState>) {
    let auth_state = state.clone();
    let authenticate = move |s: SocketRef, TryData(auth): TryData<Value>| {
        let state = auth_state.clone();
        async move { authenticate(&state, &s, auth.ok()).await }
    };
    let on_connect = move |s: SocketRef| {
        let state = state.clone();
        async move { on_connect(state, s).await }
    };
    io.ns("/", on_connect.with(authenticate));
}

#[derive(Debug)]
struct Unauthorized;

impl std::fmt::Display for Unauthorized {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The exact `connect_error` message API.md §5 promises.
        f.write_str("unauthorized")
    }
}

async fn authenticate(state: &Arc<AppState>, s: &SocketRef, auth: Option<Value>) -> Result<(), Unauthorized> {
    if state.is_draining() {
        return Err(Unauthorized);
    }
    let token = auth.as_ref().and_then(|a| a.get("token")).and_then(Value::as_str).ok_or(Unauthorized)?;
    let user_id = state.svc.authenticate(token).await.map_err(|_| Unauthorized)?;
    // A signed token for a user the store does not know is refused too; while the store is
    // unreachable the signature alone admits the socket (cluster mode keeps serving then).
    if let Ok(None) = state.svc.store.user(&user_id).await {
        return Err(Unauthorized);
    }
    s.join(user_channel(&user_id));
    s.extensions.insert(Identity { user_id });
    s.extensions.insert(Arc::new(SocketOrder::default()));
    // Event handlers are registered here, before the CONNECT packet goes out: the connect handler
    // runs on a spawned task, and a client that emits right after `connect` would otherwise race it
    // and have its first events dropped unanswered.
    rooms::register(s, state);
    messages::register(s, state);
    Ok(())
}

async fn on_connect(state: Arc<AppState>, s: SocketRef) {
    let Some(identity) = s.extensions.get::<Identity>() else {
        let _ = s.disconnect();
        return;
    };
    let uid = identity.user_id.clone();
    let counted = Arc::new(AtomicBool::new(true));
    s.extensions.insert(Counted(counted));
    CONNECTIONS.fetch_add(1, Ordering::Relaxed);
    metrics::gauge!(m::CONNECTIONS).increment(1.0);
    let online = state.presence.connect(&uid);
    tracing::info!(socket = %s.id, user = %uid, transport = ?s.transport_type(), "socket connected");

    let disc_state = state.clone();
    s.on_disconnect(move |s: SocketRef| {
        let state = disc_state.clone();
        async move { on_disconnect(&state, &s).await }
    });
    if !s.connected() {
        // Gone before the disconnect handler was in place: undo the bookkeeping here.
        on_disconnect(&state, &s).await;
        return;
    }
    if online {
        announce_presence(&state, &uid, true).await;
    }
}

/// Set while a socket is counted as connected; whoever clears it first does the disconnect work,
/// so it happens exactly once even when the disconnect races the connect handler.
#[derive(Clone)]
struct Counted(Arc<AtomicBool>);

async fn on_disconnect(state: &AppState, s: &SocketRef) {
    match s.extensions.get::<Counted>() {
        Some(Counted(flag)) if flag.swap(false, Ordering::AcqRel) => {}
        _ => return,
    }
    CONNECTIONS.fetch_sub(1, Ordering::Relaxed);
    metrics::gauge!(m::CONNECTIONS).decrement(1.0);
    let Some(identity) = s.extensions.get::<Identity>() else {
        return;
    };
    tracing::info!(socket = %s.id, user = %identity.user_id, "socket disconnected");
    if state.presence.disconnect(&identity.user_id) {
        announce_presence(state, &identity.user_id, false).await;
    }
}

async fn announce_presence(state: &AppState, user_id: &str, online: bool) {
    match state.svc.store.room_ids_of_user(user_id).await {
        Ok(rooms) => state.svc.fanout.presence(user_id, online, &rooms).await,
        Err(e) => tracing::warn!(error = %e, "presence: could not list rooms"),
    }
}

/// The payload of a client event as a JSON object, refusing oversized packets.
fn payload(
    state: &AppState,
    data: Result<Value, impl std::fmt::Display>,
) -> Result<crate::domain::input::Input, ApiError> {
    let value = data.map_err(|e| ApiError::validation(format!("payload must be a JSON object: {e}")))?;
    // Re-serialized size is within a few bytes of the packet's own: close enough for a limit.
    // Counted, not written out: no buffer per packet.
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    let size = serde_json::to_writer(&mut count, &value).map(|()| count.0).unwrap_or(usize::MAX);
    if size > state.config.max_body_bytes {
        return Err(ApiError::PayloadTooLarge { limit: state.config.max_body_bytes });
    }
    crate::domain::input::Input::from_value(value)
}

/// Sends the ack: `{ok: true, ...fields}` or the error shape, and counts the outcome per event
/// (`event` is one of the fixed event names, `outcome` "ok" or an error code: bounded labels).
fn reply(ack: AckSender, event: &'static str, result: Result<Value, ApiError>) {
    let (body, outcome) = match result {
        Ok(mut v) => {
            v["ok"] = json!(true);
            (v, "ok")
        }
        Err(e) => {
            if matches!(e, ApiError::Unavailable(_)) {
                tracing::warn!(event, code = e.code(), error = %e, "socket event failed");
            }
            (e.ack(), e.code())
        }
    };
    metrics::counter!(crate::metrics::SOCKET_EVENTS, "event" => event, "outcome" => outcome).increment(1);
    let _ = ack.send(&body);
}

/// Sends a typed success ack (`ok: true` is part of `body`), skipping the `Value` tree.
fn reply_ok<T: serde::Serialize>(ack: AckSender, event: &'static str, body: &T) {
    metrics::counter!(crate::metrics::SOCKET_EVENTS, "event" => event, "outcome" => "ok").increment(1);
    let _ = ack.send(body);
}

fn identity(s: &SocketRef) -> Result<Identity, ApiError> {
    s.extensions.get::<Identity>().ok_or_else(|| ApiError::Unauthorized("socket is not authenticated".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{HeaderValue, Uri};
    use bytes::Bytes;

    /// What the socket keeps after the middleware must not point into the connection's buffer.
    #[tokio::test]
    async fn detached_request_head_holds_no_slice_of_the_read_buffer() {
        let buffer = Bytes::from(b"/socket.io/?EIO=4&transport=websocket host.example".to_vec());
        let uri = Uri::from_maybe_shared(buffer.slice(0..37)).unwrap();
        let host = HeaderValue::from_maybe_shared(buffer.slice(38..)).unwrap();
        let mut req = axum::extract::Request::builder().uri(uri.clone()).body(axum::body::Body::empty()).unwrap();
        req.headers_mut().insert("host", host);
        req.extensions_mut().insert(axum::extract::OriginalUri(uri));
        assert!(!buffer.is_unique(), "the request head starts as slices of the buffer");

        let req = detach_request_head(req).await;
        assert!(buffer.is_unique(), "the detached head still refers to the read buffer");
        assert_eq!(req.uri(), "/socket.io/?EIO=4&transport=websocket");
        assert_eq!(req.headers()["host"], "host.example");
        assert_eq!(req.extensions().get::<axum::extract::OriginalUri>().unwrap().0, *req.uri());
    }
}
