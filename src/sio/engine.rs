//! Engine.IO v4 over HTTP: the handshake, long-polling, WebSocket (direct or upgraded from
//! polling) and the heartbeat, feeding Socket.IO packets to the [`Handler`](super::Handler).
//!
//! A WebSocket connection is one task: it reads the client, writes everything queued for the
//! socket in one flush (many events, one `sendto`), and sends the pings.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::{SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

use super::io::{Ack, Io, IoInner};
use super::packet::{self, Frame, Incoming};
use super::socket::{Socket, Transport};

/// Serves `/socket.io/` (GET and POST). Errors use Engine.IO's own codes and messages.
pub async fn serve(io: Io, req: Request) -> Response {
    let query = Query::parse(req.uri().query().unwrap_or_default());
    if query.eio != Some("4") {
        return error(5, "Unsupported protocol version");
    }
    let transport = match query.transport {
        Some("polling") => Transport::Polling,
        Some("websocket") => Transport::WebSocket,
        _ => return error(0, "Transport unknown"),
    };
    let sid = query.sid.map(str::to_string);
    let inner = io.0.clone();
    match (transport, req.method().clone(), sid) {
        (Transport::WebSocket, Method::GET, sid) => websocket(inner, req, sid),
        (Transport::Polling, Method::GET, None) => handshake(&inner, &req),
        (Transport::Polling, Method::GET, Some(sid)) => poll(&inner, &sid).await,
        (Transport::Polling, Method::POST, Some(sid)) => post(&inner, &sid, req.into_body()).await,
        (Transport::Polling, Method::POST, None) => error(2, "Bad handshake method"),
        _ => error(3, "Bad request"),
    }
}

#[derive(Default)]
struct Query<'a> {
    eio: Option<&'a str>,
    transport: Option<&'a str>,
    sid: Option<&'a str>,
}

impl<'a> Query<'a> {
    fn parse(raw: &'a str) -> Self {
        let mut q = Self::default();
        for pair in raw.split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "EIO" => q.eio = Some(v),
                "transport" => q.transport = Some(v),
                "sid" => q.sid = Some(v),
                _ => {}
            }
        }
        q
    }
}

fn error(code: u8, message: &str) -> Response {
    (StatusCode::BAD_REQUEST, axum::Json(serde_json::json!({"code": code, "message": message}))).into_response()
}

fn text(body: String) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; charset=UTF-8")], body).into_response()
}

fn new_sid() -> Arc<str> {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let bytes: [u8; 20] = rand::random();
    bytes.iter().map(|b| ALPHABET[(b & 63) as usize] as char).collect::<String>().into()
}

fn open_frame(io: &IoInner, sid: &str, upgrades: bool) -> Frame {
    let c = &io.config;
    packet::open(sid, upgrades, c.ping_interval.as_millis() as u64, c.ping_timeout.as_millis() as u64, c.max_payload)
}

/// The client's address: the peer's, or the first `X-Forwarded-For` hop behind a trusted balancer.
fn peer_of(io: &IoInner, req: &Request) -> String {
    if io.config.trust_forwarded
        && let Some(first) = req
            .headers()
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .map(str::trim)
            .filter(|s| !s.is_empty())
    {
        return first.to_string();
    }
    req.extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map_or_else(|| "unknown".to_string(), |c| c.0.ip().to_string())
}

/// A new session within the caps on sessions (in all, and per client address).
fn admit(io: &Arc<IoInner>, req: &Request) -> Option<super::io::Admission> {
    let admission = io.admit(&peer_of(io, req));
    if admission.is_none() {
        metrics::counter!(crate::metrics::RATE_LIMITED, "kind" => "engineio_sessions").increment(1);
    }
    admission
}

/// The answer Engine.IO's reference server gives a refused request.
fn forbidden() -> Response {
    (StatusCode::FORBIDDEN, axum::Json(serde_json::json!({"code": 4, "message": "Forbidden"}))).into_response()
}

fn handshake(io: &Arc<IoInner>, req: &Request) -> Response {
    let Some(admission) = admit(io, req) else { return forbidden() };
    let s = io.open_session(new_sid(), Transport::Polling, Some(admission));
    tokio::spawn(polling_heartbeat(s.clone(), Heartbeat::new(&io.config)));
    text(open_frame(io, &s.id, true).as_str().to_string())
}

/// A long-poll: answers at once with whatever is queued, else waits for the next frame (a ping
/// comes at least every ping interval).
async fn poll(io: &Arc<IoInner>, sid: &str) -> Response {
    let Some(s) = io.session(sid) else { return error(1, "Session ID unknown") };
    if s.transport() != Transport::Polling {
        return error(3, "Bad request");
    }
    let Some(_guard) = OneAtATime::acquire(&s, |s| &s.polling) else {
        // Two polls at once is a protocol violation (Engine.IO closes the session too).
        s.close();
        return error(3, "Bad request");
    };
    let mut frames = Vec::new();
    loop {
        let closed = s.take(&mut frames);
        if !frames.is_empty() || closed {
            let mut body = String::with_capacity(frames.iter().map(|f| f.len() + 1).sum::<usize>() + 1);
            for (i, f) in frames.iter().enumerate() {
                if i > 0 {
                    body.push(packet::SEPARATOR);
                }
                body.push_str(f.as_str());
            }
            if closed {
                if !body.is_empty() {
                    body.push(packet::SEPARATOR);
                }
                body.push_str(packet::CLOSE);
            }
            return text(body);
        }
        s.ready.notified().await;
    }
}

/// Holds one of a socket's one-at-a-time flags (a long-poll, a POST, an upgrade) until dropped.
struct OneAtATime {
    socket: Arc<Socket>,
    flag: fn(&Socket) -> &AtomicBool,
}

impl OneAtATime {
    fn acquire(socket: &Arc<Socket>, flag: fn(&Socket) -> &AtomicBool) -> Option<Self> {
        (!flag(socket).swap(true, Ordering::AcqRel)).then(|| Self { socket: socket.clone(), flag })
    }
}

impl Drop for OneAtATime {
    fn drop(&mut self) {
        (self.flag)(&self.socket).store(false, Ordering::Release);
    }
}

async fn post(io: &Arc<IoInner>, sid: &str, body: Body) -> Response {
    let Some(s) = io.session(sid) else { return error(1, "Session ID unknown") };
    let Some(_guard) = OneAtATime::acquire(&s, |s| &s.posting) else {
        // Overlapping POSTs could reorder one client's packets (Engine.IO closes the session too).
        s.close();
        return error(3, "Bad request");
    };
    let Ok(bytes) = axum::body::to_bytes(body, io.config.max_payload).await else {
        s.close();
        return (StatusCode::PAYLOAD_TOO_LARGE, "payload too large").into_response();
    };
    let Ok(packets) = packet::polling_packets(&bytes) else { return error(3, "Bad request") };
    for p in packets {
        on_packet(io, &s, p).await;
    }
    ([(header::CONTENT_TYPE, "text/html")], "ok").into_response()
}

fn websocket(io: Arc<IoInner>, mut req: Request, sid: Option<String>) -> Response {
    let upgrade = req.headers().get(header::UPGRADE).and_then(|v| v.to_str().ok());
    let key = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned();
    let (Some(upgrade), Some(key)) = (upgrade, key) else { return error(3, "Bad request") };
    if !upgrade.eq_ignore_ascii_case("websocket") {
        return error(3, "Bad request");
    }
    let existing = match sid {
        Some(sid) => match io.session(&sid) {
            Some(s) if s.transport() == Transport::Polling => match OneAtATime::acquire(&s, |s| &s.upgrading) {
                Some(guard) => Some((s, guard)),
                // A second upgrade while one is under way.
                None => return error(3, "Bad request"),
            },
            _ => return error(1, "Session ID unknown"),
        },
        None => None,
    };
    // A new session (not an upgrade) takes its place in the caps before the 101 goes out.
    let admission = match existing {
        Some(_) => None,
        None => match admit(&io, &req) {
            Some(a) => Some(a),
            None => return forbidden(),
        },
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else { return };
        let config = WebSocketConfig::default()
            .read_buffer_size(io.config.ws_read_buffer)
            .max_message_size(Some(io.config.max_payload))
            .max_frame_size(Some(io.config.max_payload));
        let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config)).await;
        match existing {
            Some((s, _upgrading)) => upgrade_from_polling(io, s, ws).await,
            None => {
                let s = io.open_session(new_sid(), Transport::WebSocket, admission);
                let _ = s.send(open_frame(&io, &s.id, false));
                run(io, s, ws).await;
            }
        }
    });
    switching_protocols(key.as_bytes())
}

/// The `101 Switching Protocols` answer to a WebSocket upgrade whose `Sec-WebSocket-Key` is
/// `key` (the caller takes the upgraded connection with `hyper::upgrade::on`).
pub fn switching_protocols(key: &[u8]) -> Response {
    let mut res = Response::new(Body::empty());
    *res.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = res.headers_mut();
    headers.insert(header::CONNECTION, axum::http::HeaderValue::from_static("Upgrade"));
    headers.insert(header::UPGRADE, axum::http::HeaderValue::from_static("websocket"));
    // An accept key is base64: always a valid header value.
    if let Ok(accept) = axum::http::HeaderValue::from_str(&derive_accept_key(key)) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    res
}

type Ws = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

/// The probe exchange: `2probe` / `3probe`, a noop to release the pending poll, then `5`.
async fn upgrade_from_polling(io: Arc<IoInner>, s: Arc<Socket>, mut ws: Ws) {
    async fn expect(ws: &mut Ws, want: &str) -> bool {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => return t.as_str() == want,
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                _ => return false,
            }
        }
    }
    let handshake = async {
        expect(&mut ws, "2probe").await
            && ws.send(Message::text("3probe")).await.is_ok()
            && s.send(Frame::from_static(packet::NOOP)).is_ok()
            && expect(&mut ws, "5").await
    };
    match tokio::time::timeout(io.config.upgrade_timeout, handshake).await {
        Ok(true) => {
            s.set_transport(Transport::WebSocket);
            run(io, s, ws).await;
        }
        // The session goes on over polling.
        _ => tracing::debug!(socket = %s.id, "websocket upgrade abandoned"),
    }
}

/// Counts a WebSocket task while it runs (shutdown waits for them).
struct LiveTask(Arc<IoInner>);

impl Drop for LiveTask {
    fn drop(&mut self) {
        self.0.live_tasks.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Serves one socket over WebSocket until either side closes it.
async fn run(io: Arc<IoInner>, s: Arc<Socket>, mut ws: Ws) {
    io.live_tasks.fetch_add(1, Ordering::AcqRel);
    let _live = LiveTask(io.clone());
    let mut hb = Heartbeat::new(&io.config);
    let beat = tokio::time::sleep_until(hb.next);
    tokio::pin!(beat);
    let mut frames: Vec<Frame> = Vec::new();
    'conn: loop {
        let closed = s.take(&mut frames);
        if !frames.is_empty() {
            // One deadline for the whole write: feeding can block too once tungstenite's buffer
            // is past its limit and the client does not read.
            let write = async {
                for f in frames.drain(..) {
                    ws.feed(Message::Text(f)).await?;
                }
                ws.flush().await
            };
            if !matches!(tokio::time::timeout(io.config.write_timeout, write).await, Ok(Ok(()))) {
                tracing::warn!(socket = %s.id, "websocket write failed or timed out; closing");
                break 'conn;
            }
            if frames.capacity() > 64 {
                frames = Vec::new();
            }
        }
        if closed {
            let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
            break;
        }
        tokio::select! {
            biased;
            _ = s.ready.notified() => {}
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(t))) => on_packet(&io, &s, t.as_str()).await,
                // tungstenite queued the pong; it goes out with the next flush.
                Some(Ok(Message::Ping(_))) => {
                    let _ = ws.flush().await;
                }
                // Binary attachments are not served: their placeholders fail validation.
                Some(Ok(Message::Binary(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Close(_)) | Err(_)) | None => break,
            },
            () = &mut beat => {
                match hb.beat(&s, Instant::now()) {
                    Beat::Ping => {
                        let _ = s.send(Frame::from_static(packet::PING));
                    }
                    Beat::Dead => break,
                    Beat::Wait => {}
                }
                beat.as_mut().reset(hb.next);
            }
        }
    }
    s.close();
}

/// One Engine.IO packet from the client, whichever transport carried it.
async fn on_packet(io: &Arc<IoInner>, s: &Arc<Socket>, text: &str) {
    match text.as_bytes().first() {
        Some(b'4') => on_message(io, s, &text[1..]).await,
        Some(b'3') => s.pong.store(true, Ordering::Release),
        Some(b'1') => s.close(),
        // Pings from the client (Engine.IO v3 habits), upgrades, noops, binary: nothing to do.
        _ => {}
    }
}

async fn on_message(io: &Arc<IoInner>, s: &Arc<Socket>, text: &str) {
    let Some(handler) = io.handler() else { return };
    match packet::parse(text) {
        Incoming::Connect { namespace, .. } if namespace != "/" => {
            let _ = s.send(packet::connect_error(namespace, "Invalid namespace"));
        }
        Incoming::Connect { auth, .. } => {
            if s.connected() || s.connecting.swap(true, Ordering::AcqRel) {
                return;
            }
            let outcome = handler.connect(s.clone(), auth).await;
            s.connecting.store(false, Ordering::Release);
            match outcome {
                Ok(()) => {
                    if s.mark_connected() {
                        let _ = s.send(packet::connected(&s.id));
                    } else {
                        handler.disconnect(s.clone()).await;
                    }
                }
                Err(message) => {
                    let _ = s.send(packet::connect_error("/", &message));
                }
            }
        }
        Incoming::Disconnect { namespace: "/" } => s.close(),
        Incoming::Event { namespace: "/", ack, name, data, .. } if s.connected() => {
            handler.event(s, name, data, Ack { socket: s.clone(), id: ack });
        }
        Incoming::Ignored(why) => tracing::debug!(socket = %s.id, why, "packet ignored"),
        _ => tracing::debug!(socket = %s.id, "packet for another namespace or before connect ignored"),
    }
}

enum Beat {
    Ping,
    Wait,
    Dead,
}

/// Engine.IO v4's heartbeat: the server pings every interval; no pong within the timeout closes.
/// It also closes a session that has not sent a Socket.IO CONNECT within the connect timeout.
struct Heartbeat {
    interval: Duration,
    timeout: Duration,
    /// When to wake up next: the ping schedule or the CONNECT deadline, whichever comes first.
    next: Instant,
    /// When the next ping (or the check of the last one's pong) is due.
    due: Instant,
    pinged_at: Option<Instant>,
    /// Until the socket has connected: when it must have.
    connect_by: Option<Instant>,
}

impl Heartbeat {
    fn new(c: &super::io::Config) -> Self {
        Self::starting_at(c, Instant::now())
    }

    fn starting_at(c: &super::io::Config, now: Instant) -> Self {
        let due = now + c.ping_interval;
        let connect_by = now + c.connect_timeout;
        Self {
            interval: c.ping_interval,
            timeout: c.ping_timeout,
            next: due.min(connect_by),
            due,
            pinged_at: None,
            connect_by: Some(connect_by),
        }
    }

    /// Called once `next` is reached.
    fn beat(&mut self, s: &Socket, now: Instant) -> Beat {
        if let Some(by) = self.connect_by {
            if s.connected() {
                self.connect_by = None;
            } else if now >= by {
                return Beat::Dead;
            }
        }
        let beat = if now < self.due {
            Beat::Wait
        } else {
            match self.pinged_at.take() {
                Some(at) if s.pong.swap(false, Ordering::AcqRel) => {
                    self.due = (at + self.interval).max(now);
                    Beat::Wait
                }
                Some(_) => Beat::Dead,
                None => {
                    s.pong.store(false, Ordering::Release);
                    self.pinged_at = Some(now);
                    self.due = now + self.timeout.min(self.interval);
                    Beat::Ping
                }
            }
        };
        self.next = self.connect_by.map_or(self.due, |by| self.due.min(by));
        beat
    }
}

/// The heartbeat of a socket on long-polling; ends once the socket upgrades (the WebSocket task
/// takes over) or closes.
async fn polling_heartbeat(s: Arc<Socket>, mut hb: Heartbeat) {
    loop {
        tokio::time::sleep_until(hb.next).await;
        if s.is_closed() || s.transport() == Transport::WebSocket {
            return;
        }
        match hb.beat(&s, Instant::now()) {
            Beat::Ping => {
                let _ = s.send(Frame::from_static(packet::PING));
            }
            Beat::Dead => {
                s.close();
                return;
            }
            Beat::Wait => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_takes_the_three_keys_engine_io_uses() {
        let q = Query::parse("EIO=4&transport=polling&t=PZx1&sid=abc");
        assert_eq!((q.eio, q.transport, q.sid), (Some("4"), Some("polling"), Some("abc")));
        let q = Query::parse("");
        assert_eq!((q.eio, q.transport, q.sid), (None, None, None));
    }

    #[test]
    fn heartbeat_pings_every_interval_and_declares_a_silent_client_dead() {
        let config = super::super::io::Config {
            ping_interval: Duration::from_secs(25),
            ping_timeout: Duration::from_secs(20),
            connect_timeout: Duration::from_secs(1_000),
            ..Default::default()
        };
        let s = Socket::detached("s", 8);
        let start = Instant::now();
        let at = |secs| start + Duration::from_secs(secs);
        let mut hb = Heartbeat::starting_at(&config, start);
        assert_eq!(hb.next, at(25));
        assert!(matches!(hb.beat(&s, at(25)), Beat::Ping));
        assert_eq!(hb.next, at(45), "the pong is checked after the timeout");
        s.pong.store(true, Ordering::Release);
        assert!(matches!(hb.beat(&s, at(45)), Beat::Wait));
        assert_eq!(hb.next, at(50), "the next ping is one interval after the last");
        assert!(matches!(hb.beat(&s, at(50)), Beat::Ping));
        assert!(matches!(hb.beat(&s, at(70)), Beat::Dead), "no pong within the timeout");
    }

    #[test]
    fn a_session_without_connect_dies_at_the_connect_timeout() {
        let config = super::super::io::Config {
            ping_interval: Duration::from_secs(25),
            ping_timeout: Duration::from_secs(20),
            connect_timeout: Duration::from_secs(3),
            ..Default::default()
        };
        let s = Socket::detached("s", 8);
        let start = Instant::now();
        let at = |secs| start + Duration::from_secs(secs);
        let mut hb = Heartbeat::starting_at(&config, start);
        assert_eq!(hb.next, at(3), "woken at the CONNECT deadline, before the first ping");
        assert!(matches!(hb.beat(&s, at(2)), Beat::Wait));
        assert_eq!(hb.next, at(3));
        assert!(matches!(hb.beat(&s, at(3)), Beat::Dead), "no CONNECT within the timeout");
    }
}
