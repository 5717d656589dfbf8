//! One client connection: its outgoing queue, its rooms and the application's data for it.
//!
//! An idle socket is one small struct and, on WebSocket, one task: no channel, no per-socket
//! buffers until something is queued.

use std::any::Any;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, Weak};

use tokio::sync::Notify;

use super::io::IoInner;
use super::packet::Frame;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Polling,
    WebSocket,
}

/// Why a frame was not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum SendError {
    /// The socket's queue is full: it is not reading fast enough.
    Full,
    Closed,
}

pub struct Socket {
    pub id: Arc<str>,
    io: Weak<IoInner>,
    outbox: Mutex<Outbox>,
    /// Wakes whoever writes this socket's frames out (the WebSocket task or a pending poll).
    pub(super) ready: Notify,
    transport: AtomicU8,
    connected: AtomicBool,
    /// A CONNECT is being handled (two at once, say from concurrent polling POSTs, would run the
    /// application's connect twice).
    pub(super) connecting: AtomicBool,
    closed: AtomicBool,
    /// Wakes those waiting for the socket to close ([`Socket::closed`]).
    gone: Notify,
    pub(super) pong: AtomicBool,
    /// A polling POST is being read and handled (only one may be at once).
    pub(super) posting: AtomicBool,
    /// A WebSocket upgrade of this polling session is under way (only one may be).
    pub(super) upgrading: AtomicBool,
    /// A long-poll is waiting on this socket (only one may).
    pub(super) polling: AtomicBool,
    rooms: Mutex<Vec<Arc<str>>>,
    ext: OnceLock<Box<dyn Any + Send + Sync>>,
    capacity: Capacity,
    /// Its place in the session caps, given back when the session closes.
    pub(super) admission: Mutex<Option<super::io::Admission>>,
}

/// How much a socket may have queued before it counts as a slow consumer: frames, and bytes
/// (a few long frames can weigh more than thousands of short ones).
#[derive(Debug, Clone, Copy)]
pub struct Capacity {
    pub frames: usize,
    pub bytes: usize,
}

#[derive(Default)]
struct Outbox {
    frames: VecDeque<Frame>,
    bytes: usize,
    closed: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Socket {
    pub(super) fn new(
        id: Arc<str>,
        io: Weak<IoInner>,
        transport: Transport,
        capacity: Capacity,
        admission: Option<super::io::Admission>,
    ) -> Self {
        Self {
            id,
            io,
            outbox: Mutex::default(),
            ready: Notify::new(),
            transport: AtomicU8::new(transport as u8),
            connected: AtomicBool::new(false),
            connecting: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            gone: Notify::new(),
            pong: AtomicBool::new(false),
            polling: AtomicBool::new(false),
            posting: AtomicBool::new(false),
            upgrading: AtomicBool::new(false),
            rooms: Mutex::default(),
            ext: OnceLock::new(),
            capacity,
            admission: Mutex::new(admission),
        }
    }

    /// A socket built by hand, for tests of code that delivers to sockets.
    #[cfg(test)]
    pub fn detached(id: &str, frames: usize) -> Arc<Self> {
        let capacity = Capacity { frames, bytes: usize::MAX };
        Arc::new(Self::new(id.into(), Weak::new(), Transport::WebSocket, capacity, None))
    }

    pub fn transport(&self) -> Transport {
        if self.transport.load(Ordering::Acquire) == Transport::WebSocket as u8 {
            Transport::WebSocket
        } else {
            Transport::Polling
        }
    }

    pub(super) fn set_transport(&self, t: Transport) {
        self.transport.store(t as u8, Ordering::Release);
    }

    /// Queues an encoded frame. Frames go out in the order they were queued.
    pub fn send(&self, frame: Frame) -> Result<(), SendError> {
        {
            let mut out = lock(&self.outbox);
            if out.closed {
                return Err(SendError::Closed);
            }
            // One frame, however large, always fits an empty queue (a history page can be big).
            let too_heavy = !out.frames.is_empty() && out.bytes.saturating_add(frame.len()) > self.capacity.bytes;
            if out.frames.len() >= self.capacity.frames || too_heavy {
                return Err(SendError::Full);
            }
            out.bytes += frame.len();
            out.frames.push_back(frame);
        }
        self.ready.notify_one();
        Ok(())
    }

    /// Everything queued so far, and whether the socket is closed (then nothing more will come).
    pub(super) fn take(&self, into: &mut Vec<Frame>) -> bool {
        let mut out = lock(&self.outbox);
        into.extend(out.frames.drain(..));
        out.bytes = 0;
        if out.frames.capacity() > 64 {
            // A burst grew the queue: give the memory back rather than keep it per idle socket.
            out.frames.shrink_to(16);
        }
        out.closed
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Whether the namespace accepted the socket and it has not closed since.
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    /// Marks the socket connected; false if it closed meanwhile (then the caller undoes its
    /// connect work: the close did not see the socket connected and left it alone).
    pub(super) fn mark_connected(&self) -> bool {
        self.connected.store(true, Ordering::Release);
        !(self.is_closed() && self.connected.swap(false, Ordering::AcqRel))
    }

    /// Closes the transport. The client sees the connection drop (not a server-side
    /// disconnect), so socket.io-client reconnects by itself and resyncs from its last seq.
    pub fn close(self: &Arc<Self>) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        lock(&self.outbox).closed = true;
        self.ready.notify_one();
        self.gone.notify_waiters();
        let was_connected = self.connected.swap(false, Ordering::AcqRel);
        if let Some(io) = self.io.upgrade() {
            io.forget(self, was_connected);
        }
    }

    /// Resolves once the socket has closed.
    pub async fn closed(&self) {
        let notified = self.gone.notified();
        tokio::pin!(notified);
        // Registered before the check, so a close in between still wakes us.
        notified.as_mut().enable();
        if !self.is_closed() {
            notified.await;
        }
    }

    /// Adds the socket to a room (idempotent).
    pub fn join(self: &Arc<Self>, room: &str) {
        if let Some(io) = self.io.upgrade() {
            io.join(self, room);
        }
    }

    pub fn leave(self: &Arc<Self>, room: &str) {
        if let Some(io) = self.io.upgrade() {
            io.leave(self, room);
        }
    }

    pub fn in_room(&self, room: &str) -> bool {
        lock(&self.rooms).iter().any(|r| &**r == room)
    }

    /// The first of the socket's rooms whose name starts with `prefix`.
    pub fn room_starting_with(&self, prefix: &str) -> Option<Arc<str>> {
        lock(&self.rooms).iter().find(|r| r.starts_with(prefix)).cloned()
    }

    /// How many rooms the socket is in (its own user channel included).
    pub fn room_count(&self) -> usize {
        lock(&self.rooms).len()
    }

    pub(super) fn rooms(&self) -> MutexGuard<'_, Vec<Arc<str>>> {
        lock(&self.rooms)
    }

    /// Attaches the application's data to the socket, once.
    pub fn set_ext<T: Any + Send + Sync>(&self, value: T) {
        let _ = self.ext.set(Box::new(value));
    }

    pub fn ext<T: Any + Send + Sync>(&self) -> Option<&T> {
        self.ext.get().and_then(|b| b.downcast_ref::<T>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_come_out_in_order_and_a_full_queue_refuses() {
        let s = Socket::detached("s", 2);
        s.send(Frame::from_static("a")).unwrap();
        s.send(Frame::from_static("b")).unwrap();
        assert_eq!(s.send(Frame::from_static("c")), Err(SendError::Full));
        let mut out = Vec::new();
        assert!(!s.take(&mut out));
        assert_eq!(out.iter().map(|f| f.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        s.send(Frame::from_static("c")).unwrap();
    }

    #[test]
    fn a_closed_socket_refuses_frames_but_hands_out_what_was_queued() {
        let s = Socket::detached("s", 8);
        s.send(Frame::from_static("last")).unwrap();
        s.close();
        assert_eq!(s.send(Frame::from_static("late")), Err(SendError::Closed));
        let mut out = Vec::new();
        assert!(s.take(&mut out), "closed");
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn connect_racing_close_is_undone_exactly_once() {
        let s = Socket::detached("s", 8);
        s.close();
        assert!(!s.mark_connected(), "closed before connected: the connect must be undone");
        assert!(!s.connected());
    }

    #[test]
    fn the_queue_is_bounded_in_bytes_too_but_takes_one_frame_of_any_size() {
        let capacity = Capacity { frames: 100, bytes: 10 };
        let s = Arc::new(Socket::new("s".into(), Weak::new(), Transport::WebSocket, capacity, None));
        s.send(Frame::from_static("12345678")).unwrap();
        assert_eq!(s.send(Frame::from_static("abc")), Err(SendError::Full), "8 + 3 bytes past a bound of 10");
        s.send(Frame::from_static("ab")).unwrap();
        let mut out = Vec::new();
        s.take(&mut out);
        assert_eq!(out.len(), 2);
        s.send(Frame::from_static("a frame longer than the whole bound")).unwrap();
        assert_eq!(s.send(Frame::from_static("x")), Err(SendError::Full));
    }
}
