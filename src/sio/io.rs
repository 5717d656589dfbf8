//! The server side shared by all sockets: open sessions, room membership, broadcast, shutdown.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, RwLock};
use std::time::Duration;

use futures::future::BoxFuture;
use serde::Serialize;
use serde_json::Value;

use super::packet;
use super::socket::{SendError, Socket, Transport};

/// What the application does with sockets. Events are dispatched synchronously, in arrival order,
/// so the application can note the order before it spawns any work.
pub trait Handler: Send + Sync + 'static {
    /// The client asked to connect with `auth`; `Err(message)` refuses with a `connect_error`.
    fn connect(&self, socket: Arc<Socket>, auth: Option<Value>) -> BoxFuture<'static, Result<(), String>>;
    fn event(&self, socket: &Arc<Socket>, name: String, data: Result<Value, String>, ack: Ack);
    /// Called once for every socket `connect` accepted, when it closes.
    fn disconnect(&self, socket: Arc<Socket>) -> BoxFuture<'static, ()>;
}

/// Answers one event; does nothing if the client asked for no answer.
pub struct Ack {
    pub(super) socket: Arc<Socket>,
    pub(super) id: Option<u64>,
}

impl Ack {
    pub fn send<T: Serialize + ?Sized>(self, body: &T) {
        let Some(id) = self.id else { return };
        let Ok(frame) = packet::ack(id, body) else { return };
        if self.socket.send(frame) == Err(SendError::Full) {
            tracing::warn!(socket = %self.socket.id, "slow consumer: ack queue full, closing");
            self.socket.close();
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub ping_interval: Duration,
    pub ping_timeout: Duration,
    /// Largest packet (WebSocket message or polling body) the transport accepts.
    pub max_payload: usize,
    /// Frames and bytes queued per socket before it counts as a slow consumer.
    pub socket_buffer: super::socket::Capacity,
    /// Engine.IO sessions open at once, in all and from one client address.
    pub max_sessions: usize,
    pub max_sessions_per_peer: usize,
    /// Take the client address from `X-Forwarded-For` (behind a trusted balancer).
    pub trust_forwarded: bool,
    /// How long writing to a WebSocket client may take before the connection is dropped (a
    /// client that stops reading fills the kernel's buffers, then every write waits).
    pub write_timeout: Duration,
    pub ws_read_buffer: usize,
    pub upgrade_timeout: Duration,
    /// How long an Engine.IO session may stay without a Socket.IO CONNECT before it is closed
    /// (an open session costs memory and a task; Socket.IO's own server gives 45 s).
    pub connect_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            ping_interval: Duration::from_secs(25),
            ping_timeout: Duration::from_secs(20),
            max_payload: 1_000_000,
            socket_buffer: super::socket::Capacity { frames: 8192, bytes: 8 << 20 },
            write_timeout: Duration::from_secs(30),
            max_sessions: 1_000_000,
            max_sessions_per_peer: 1_000_000,
            trust_forwarded: false,
            ws_read_buffer: 1024,
            upgrade_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(45),
        }
    }
}

/// The Socket.IO server: a cheap handle, clone it freely.
#[derive(Clone)]
pub struct Io(pub(super) Arc<IoInner>);

pub(super) struct IoInner {
    pub(super) config: Config,
    sessions: Mutex<HashMap<Arc<str>, Arc<Socket>>>,
    rooms: RwLock<HashMap<Arc<str>, Vec<Arc<Socket>>>>,
    handler: OnceLock<Arc<dyn Handler>>,
    /// WebSocket tasks still running (shutdown waits for their close frames to go out).
    pub(super) live_tasks: AtomicUsize,
    /// Engine.IO sessions admitted and not yet dropped, in all and per client address.
    admitted: Mutex<Admitted>,
}

#[derive(Default)]
struct Admitted {
    total: usize,
    per_peer: HashMap<Arc<str>, usize>,
}

/// One admitted session's place in the counts; given back when its socket is dropped.
pub(super) struct Admission {
    io: std::sync::Weak<IoInner>,
    peer: Arc<str>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        let Some(io) = self.io.upgrade() else { return };
        let mut a = lock(&io.admitted);
        a.total = a.total.saturating_sub(1);
        if let Some(n) = a.per_peer.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                a.per_peer.remove(&self.peer);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Io {
    pub fn new(config: Config) -> Self {
        Self(Arc::new(IoInner {
            config,
            sessions: Mutex::default(),
            rooms: RwLock::default(),
            handler: OnceLock::new(),
            live_tasks: AtomicUsize::new(0),
            admitted: Mutex::default(),
        }))
    }

    /// Sets the application's handler; sockets are refused until it is set.
    pub fn set_handler(&self, handler: Arc<dyn Handler>) {
        let _ = self.0.handler.set(handler);
    }

    /// Calls `f` for each socket in `room` (the room's lock is held: `f` must not join or leave).
    pub fn for_each_in(&self, room: &str, mut f: impl FnMut(&Arc<Socket>)) {
        let rooms = self.0.rooms.read().unwrap_or_else(PoisonError::into_inner);
        for s in rooms.get(room).into_iter().flatten() {
            f(s);
        }
    }

    pub fn sockets_in(&self, room: &str) -> Vec<Arc<Socket>> {
        let mut out = Vec::new();
        self.for_each_in(room, |s| out.push(s.clone()));
        out
    }

    pub fn room_is_empty(&self, room: &str) -> bool {
        let rooms = self.0.rooms.read().unwrap_or_else(PoisonError::into_inner);
        rooms.get(room).is_none_or(Vec::is_empty)
    }

    /// `event` to every socket in any of `rooms`, once each; a socket whose queue is full is
    /// closed (a skipped event would be a silent gap). Returns how many sockets got it.
    pub fn broadcast<T: Serialize + ?Sized>(&self, rooms: &[String], event: &str, data: &T) -> usize {
        let Ok(frame) = packet::event(event, data) else { return 0 };
        let mut targets: Vec<Arc<Socket>> = Vec::new();
        for room in rooms {
            self.for_each_in(room, |s| targets.push(s.clone()));
        }
        if rooms.len() > 1 {
            targets.sort_by_key(|s| Arc::as_ptr(s) as usize);
            targets.dedup_by_key(|s| Arc::as_ptr(s) as usize);
        }
        let mut sent = 0;
        for s in targets {
            match s.send(frame.clone()) {
                Ok(()) => sent += 1,
                Err(SendError::Full) => {
                    tracing::warn!(socket = %s.id, event, "slow consumer: queue full, closing");
                    s.close();
                }
                Err(SendError::Closed) => {}
            }
        }
        sent
    }

    /// Closes every socket (their clients reconnect elsewhere) and waits up to a second for the
    /// WebSocket close frames to go out.
    pub async fn close(&self) {
        let all: Vec<Arc<Socket>> = lock(&self.0.sessions).values().cloned().collect();
        for s in all {
            s.close();
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        while self.0.live_tasks.load(Ordering::Acquire) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A socket not attached to any client: for tests of code that delivers to rooms.
    #[cfg(test)]
    pub fn test_socket(&self, id: &str) -> Arc<Socket> {
        self.0.open_session(id.into(), Transport::WebSocket, None)
    }
}

impl IoInner {
    pub(super) fn handler(&self) -> Option<&Arc<dyn Handler>> {
        self.handler.get()
    }

    /// A place for one more session from `peer`, if the caps allow it.
    pub(super) fn admit(self: &Arc<Self>, peer: &str) -> Option<Admission> {
        let mut a = lock(&self.admitted);
        let from_peer = a.per_peer.get(peer).copied().unwrap_or(0);
        if a.total >= self.config.max_sessions || from_peer >= self.config.max_sessions_per_peer {
            return None;
        }
        a.total += 1;
        let peer: Arc<str> = peer.into();
        a.per_peer.insert(peer.clone(), from_peer + 1);
        Some(Admission { io: Arc::downgrade(self), peer })
    }

    pub(super) fn open_session(
        self: &Arc<Self>,
        id: Arc<str>,
        transport: Transport,
        admission: Option<Admission>,
    ) -> Arc<Socket> {
        let s =
            Arc::new(Socket::new(id.clone(), Arc::downgrade(self), transport, self.config.socket_buffer, admission));
        lock(&self.sessions).insert(id, s.clone());
        s
    }

    pub(super) fn session(&self, id: &str) -> Option<Arc<Socket>> {
        lock(&self.sessions).get(id).cloned()
    }

    pub(super) fn join(&self, s: &Arc<Socket>, room: &str) {
        let mut rooms = self.rooms.write().unwrap_or_else(PoisonError::into_inner);
        // Checked under the lock `forget` takes: a socket closing now is never left in a room.
        if s.is_closed() || s.in_room(room) {
            return;
        }
        let key: Arc<str> = match rooms.get_key_value(room) {
            Some((k, _)) => k.clone(),
            None => room.into(),
        };
        rooms.entry(key.clone()).or_default().push(s.clone());
        s.rooms().push(key);
    }

    pub(super) fn leave(&self, s: &Arc<Socket>, room: &str) {
        let mut rooms = self.rooms.write().unwrap_or_else(PoisonError::into_inner);
        s.rooms().retain(|r| &**r != room);
        Self::remove_from(&mut rooms, s, room);
    }

    fn remove_from(rooms: &mut HashMap<Arc<str>, Vec<Arc<Socket>>>, s: &Arc<Socket>, room: &str) {
        if let Some(members) = rooms.get_mut(room) {
            members.retain(|m| !Arc::ptr_eq(m, s));
            if members.is_empty() {
                rooms.remove(room);
            }
        }
    }

    /// Called once by `Socket::close`.
    pub(super) fn forget(&self, s: &Arc<Socket>, was_connected: bool) {
        {
            let mut rooms = self.rooms.write().unwrap_or_else(PoisonError::into_inner);
            let joined: Vec<Arc<str>> = std::mem::take(&mut *s.rooms());
            for room in joined {
                Self::remove_from(&mut rooms, s, &room);
            }
        }
        lock(&self.sessions).remove(&s.id);
        // Tasks may hold the socket a while longer; its place in the caps is free now.
        drop(lock(&s.admission).take());
        if was_connected && let Some(h) = self.handler.get() {
            tokio::spawn(h.disconnect(s.clone()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drained(s: &Socket) -> Vec<String> {
        let mut out = Vec::new();
        s.take(&mut out);
        out.iter().map(|f| f.as_str().to_string()).collect()
    }

    #[tokio::test]
    async fn broadcast_reaches_each_socket_once_and_closed_sockets_leave_their_rooms() {
        let io = Io::new(Config::default());
        let (a, b, c) = (io.test_socket("a"), io.test_socket("b"), io.test_socket("c"));
        a.join("r1");
        a.join("r2");
        a.join("r1");
        b.join("r2");
        c.join("r3");
        let sent = io.broadcast(&["r1".into(), "r2".into()], "e", &1);
        assert_eq!(sent, 2, "a is in both rooms but gets the event once");
        assert_eq!(drained(&a), [r#"42["e",1]"#]);
        assert_eq!(drained(&b), [r#"42["e",1]"#]);
        assert!(drained(&c).is_empty());

        a.close();
        assert_eq!(io.sockets_in("r1").len(), 0);
        assert_eq!(io.sockets_in("r2").len(), 1);
        a.join("r1");
        assert!(io.room_is_empty("r1"), "a closed socket cannot join");
        b.leave("r2");
        assert!(io.room_is_empty("r2"));
        assert_eq!(io.0.sessions.lock().unwrap().len(), 2, "the closed socket's session is gone");
    }

    #[tokio::test]
    async fn a_full_socket_is_closed_by_broadcast() {
        let io = Io::new(Config {
            socket_buffer: super::super::socket::Capacity { frames: 1, bytes: usize::MAX },
            ..Config::default()
        });
        let a = io.test_socket("a");
        a.join("r");
        assert_eq!(io.broadcast(&["r".into()], "e", &1), 1);
        assert_eq!(io.broadcast(&["r".into()], "e", &2), 0);
        assert!(a.is_closed());
        assert!(io.room_is_empty("r"));
    }
}
