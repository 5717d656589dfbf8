//! The Socket.IO namespace `/` (API.md §5): handshake auth, connection bookkeeping and the event
//! handlers ([`rooms`]: join/leave/sync, [`messages`]: send/typing).

mod messages;
mod order;
mod rooms;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};

use futures::FutureExt;
use futures::future::BoxFuture;
use serde_json::{Value, json};

use crate::config::Config;
use crate::domain::{RoomId, UserId};
use crate::error::ApiError;
use crate::fanout::user_channel;
use crate::metrics as m;
use crate::sio::{Ack, Handler, Io, Socket};
use crate::state::AppState;

pub use messages::SendArgs;
pub use order::SocketOrder;
pub use rooms::{JoinArgs, SyncArgs};

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

/// Whose socket it is and the order of its sends; attached when the handshake is accepted.
pub struct Conn {
    pub user_id: UserId,
    order: Arc<SocketOrder>,
    busy: Arc<Busy>,
}

/// A socket's events being handled now (all of them, and the history reads among them), and
/// those refused in a row for it.
#[derive(Default)]
struct Busy {
    now: AtomicUsize,
    reads: AtomicUsize,
    refused_in_a_row: AtomicUsize,
}

/// One event being handled for a socket; the socket's counts drop when this does (the task that
/// handles the event owns it).
pub struct Slot {
    busy: Arc<Busy>,
    read: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.busy.now.fetch_sub(1, Ordering::AcqRel);
        if self.read {
            self.busy.reads.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// The per-socket caps on events being handled at once.
#[derive(Clone, Copy)]
struct InFlightCaps {
    /// Any event (clients pipeline their sends).
    events: usize,
    /// History reads (`room:join`, `room:sync`): each may hold a page of 500 long messages.
    reads: usize,
}

/// A socket whose events are refused this many times in a row is disconnected: it keeps sending
/// past its caps instead of waiting for answers.
const REFUSALS_BEFORE_DISCONNECT: usize = 1024;

impl Busy {
    /// A slot when the caps allow one more event (a history read when `read`); `Err(true)` when
    /// the socket has been refused so often in a row that it should be cut off.
    fn enter(self: &Arc<Self>, caps: InFlightCaps, read: bool) -> Result<Slot, bool> {
        let refuse = |busy: &Self| {
            let refused = busy.refused_in_a_row.fetch_add(1, Ordering::AcqRel) + 1;
            Err(refused > REFUSALS_BEFORE_DISCONNECT)
        };
        if self.now.fetch_add(1, Ordering::AcqRel) >= caps.events {
            self.now.fetch_sub(1, Ordering::AcqRel);
            return refuse(self);
        }
        if read && self.reads.fetch_add(1, Ordering::AcqRel) >= caps.reads {
            self.reads.fetch_sub(1, Ordering::AcqRel);
            self.now.fetch_sub(1, Ordering::AcqRel);
            return refuse(self);
        }
        self.refused_in_a_row.store(0, Ordering::Release);
        Ok(Slot { busy: self.clone(), read })
    }
}

pub fn build_io(config: &Config) -> Io {
    Io::new(crate::sio::Config {
        max_payload: (config.max_body_bytes * TRANSPORT_SLACK).max(256 * 1024),
        socket_buffer: crate::sio::Capacity { frames: SOCKET_BUFFER, bytes: config.socket_buffer_bytes },
        write_timeout: config.write_timeout,
        max_sessions: config.max_sessions,
        max_sessions_per_peer: config.max_sessions_per_ip,
        trust_forwarded: config.trust_proxy,
        ws_read_buffer: WS_READ_BUFFER,
        ping_interval: config.ping_interval,
        ping_timeout: config.ping_timeout,
        connect_timeout: config.connect_timeout,
        ..crate::sio::Config::default()
    })
}

pub fn register(io: &Io, state: Arc<AppState>) {
    io.set_handler(Arc::new(Realtime { state }));
}

struct Realtime {
    state: Arc<AppState>,
}

impl Handler for Realtime {
    fn connect(&self, s: Arc<Socket>, auth: Option<Value>) -> BoxFuture<'static, Result<(), String>> {
        let state = self.state.clone();
        async move {
            // The exact `connect_error` message API.md §5 promises.
            let (session, checked) = authenticate(&state, auth).await.ok_or_else(|| "unauthorized".to_string())?;
            let user_id = UserId::from(session.user_id.as_str());
            let Ok(first) = state.presence.connect(&user_id, state.config.max_sockets_per_user) else {
                metrics::counter!(m::RATE_LIMITED, "kind" => "sockets_per_user").increment(1);
                return Err("too many connections for this user".to_string());
            };
            s.join(&user_channel(&user_id));
            s.join(&crate::fanout::session_channel(&session));
            tokio::spawn(watch_session(state.clone(), s.clone(), session, checked));
            s.set_ext(Conn { user_id: user_id.clone(), order: Arc::default(), busy: Arc::default() });
            CONNECTIONS.fetch_add(1, Ordering::Relaxed);
            metrics::gauge!(m::CONNECTIONS).increment(1.0);
            tracing::info!(socket = %s.id, user = %user_id, transport = ?s.transport(), "socket connected");
            if first {
                tokio::spawn(async move { state.svc.announce_presence(&user_id, true).await });
            }
            Ok(())
        }
        .boxed()
    }

    fn event(&self, s: &Arc<Socket>, name: String, data: Result<Value, String>, ack: Ack) {
        let state = self.state.clone();
        // Each event runs on a task of its own: without a cap, one packet of thousands of events
        // (one polling POST can carry them) would start thousands of history reads at once.
        let caps = InFlightCaps { events: state.config.max_events_in_flight, reads: state.config.max_reads_in_flight };
        let read = matches!(name.as_str(), "room:join" | "room:sync");
        let slot = match s.ext::<Conn>().map(|c| c.busy.enter(caps, read)) {
            Some(Ok(slot)) => slot,
            Some(Err(persistent)) => {
                metrics::counter!(m::RATE_LIMITED, "kind" => "events_in_flight").increment(1);
                if persistent {
                    tracing::warn!(socket = %s.id, "events past the in-flight cap, again and again: disconnecting");
                    s.close();
                }
                let err = ApiError::RateLimited { retry_after: std::time::Duration::from_secs(1) };
                return reply(ack, "in_flight", Err(err));
            }
            None => return reply(ack, "unknown", Err(ApiError::Unauthorized("socket is not authenticated".into()))),
        };
        match name.as_str() {
            "message:send" => messages::on_send(state, s.clone(), data, ack, slot),
            "typing" => messages::on_typing(state, s.clone(), data, ack, slot),
            "room:join" | "room:leave" | "room:sync" => rooms::on_event(state, s.clone(), &name, data, ack, slot),
            _ => reply(ack, "unknown", Err(ApiError::validation(format!("unknown event {name:?}")))),
        }
    }

    fn disconnect(&self, s: Arc<Socket>) -> BoxFuture<'static, ()> {
        let state = self.state.clone();
        async move {
            CONNECTIONS.fetch_sub(1, Ordering::Relaxed);
            metrics::gauge!(m::CONNECTIONS).decrement(1.0);
            let Some(conn) = s.ext::<Conn>() else { return };
            tracing::info!(socket = %s.id, user = %conn.user_id, "socket disconnected");
            if state.presence.disconnect(&conn.user_id) {
                state.svc.announce_presence(&conn.user_id, false).await;
            }
        }
        .boxed()
    }
}

/// Ends the socket when its token expires, and, if its token could not be checked against the
/// revocation list at CONNECT (Redis unreachable), checks again until it can.
async fn watch_session(state: Arc<AppState>, s: Arc<Socket>, session: crate::auth::Session, mut checked: bool) {
    // Cut when the token stops being taken (the check compares whole seconds: past `exp` + leeway
    // means the second after), so the client's reconnect is refused.
    let until = session.expires_at + crate::auth::LEEWAY_SECS + 1;
    let left = until.saturating_sub(chrono::Utc::now().timestamp().max(0) as u64);
    let expiry = tokio::time::sleep(std::time::Duration::from_secs(left));
    tokio::pin!(expiry);
    loop {
        let recheck = async {
            if checked {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(SESSION_RECHECK).await;
        };
        tokio::select! {
            () = s.closed() => return,
            () = &mut expiry => {
                tracing::info!(socket = %s.id, "token expired: disconnecting");
                s.close();
                return;
            }
            () = recheck => match state.svc.session_revoked(&session).await {
                Ok(true) => {
                    tracing::info!(socket = %s.id, "token revoked: disconnecting");
                    s.close();
                    return;
                }
                Ok(false) => checked = true,
                Err(_) => {}
            },
        }
    }
}

/// How often a socket admitted without a revocation check is checked again.
const SESSION_RECHECK: std::time::Duration = std::time::Duration::from_secs(5);

async fn authenticate(state: &AppState, auth: Option<Value>) -> Option<(crate::auth::Session, bool)> {
    if state.is_draining() {
        return None;
    }
    let token = auth.as_ref().and_then(|a| a.get("token")).and_then(Value::as_str)?;
    state.svc.authenticate_socket(token).await
}

/// The payload of a client event as a JSON object, refusing oversized packets.
fn payload(
    state: &AppState,
    data: Result<Value, impl std::fmt::Display>,
) -> Result<crate::domain::input::Input, ApiError> {
    decode_payload(data, state.config.max_body_bytes)
}

/// The payload of a client event as a JSON object, refusing one over `max_body_bytes`.
pub fn decode_payload(
    data: Result<Value, impl std::fmt::Display>,
    max_body_bytes: usize,
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
    if size > max_body_bytes {
        return Err(ApiError::PayloadTooLarge { limit: max_body_bytes });
    }
    crate::domain::input::Input::from_value(value)
}

/// Sends the ack: `{ok: true, ...fields}` or the error shape, and counts the outcome per event
/// (`event` is one of the fixed event names, `outcome` "ok" or an error code: bounded labels).
fn reply(ack: Ack, event: &'static str, result: Result<Value, ApiError>) {
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
    ack.send(&body);
}

/// Sends a typed success ack (`ok: true` is part of `body`), skipping the `Value` tree.
fn reply_ok<T: serde::Serialize>(ack: Ack, event: &'static str, body: &T) {
    metrics::counter!(crate::metrics::SOCKET_EVENTS, "event" => event, "outcome" => "ok").increment(1);
    ack.send(body);
}

/// The `room_id` of a client event. chatmesh's internal channels are not rooms: a socket that
/// could leave its own user channel would keep receiving a room after a REST leave.
pub fn room_arg(input: &crate::domain::input::Input) -> Result<RoomId, ApiError> {
    let room_id = input.req_str("room_id")?;
    if crate::fanout::is_internal_channel(room_id) {
        return Err(ApiError::validation("room_id must be a room id"));
    }
    Ok(RoomId::from(room_id))
}

fn identity(s: &Socket) -> Result<&Conn, ApiError> {
    s.ext::<Conn>().ok_or_else(|| ApiError::Unauthorized("socket is not authenticated".into()))
}
