//! The client listener: our own accept loop in front of the router, so that what a client may
//! hold of an instance is bounded before any handler runs.
//!
//! - TLS (rustls) when a certificate is configured, reloaded on SIGHUP ([`tls`]).
//! - Connection caps, per peer address and in total, checked at accept: a connection past a cap
//!   is closed at once, before a byte is read.
//! - Slow clients: a TLS handshake timeout, a header-read timeout (which also closes idle
//!   keep-alive connections) and a body-read timeout. None of them runs while a handler holds a
//!   request open, so Engine.IO long-polls (held up to the ping interval) are untouched, and a
//!   WebSocket leaves HTTP altogether once upgraded.
//!
//! Shutdown is the one `axum::serve` had: when `shutdown` resolves, stop accepting, ask every
//! connection to finish its current request and close, and return once they all have (upgraded
//! WebSockets are not waited for; the Socket.IO server closes those itself).

pub mod tls;

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{HeaderValue, Request, Response, header};
use hyper::body::{Bytes, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_service::Service;

use crate::config::ListenerLimits;
use crate::metrics as m;

pub use tls::Tls;

/// Serves `router` on `listener` until `shutdown` resolves and every connection has finished.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    tls: Option<Arc<Tls>>,
    limits: ListenerLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let stop = CancellationToken::new();
    let stopper = stop.clone();
    tokio::spawn(async move {
        shutdown.await;
        stopper.cancel();
    });
    let conns = TaskTracker::new();
    let admission = Arc::new(Admission::new(&limits));
    let limits = Arc::new(limits);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => break,
        };
        let (tcp, peer) = match accepted {
            Ok(conn) => conn,
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                // Out of file descriptors, most likely: retrying at once would spin.
                tracing::error!(error = %e, "accept failed; retrying in 1 s");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let slot = match admission.admit(peer.ip()) {
            Ok(slot) => slot,
            Err(kind) => {
                metrics::counter!(m::RATE_LIMITED, "kind" => kind).increment(1);
                tracing::debug!(%peer, kind, "connection refused");
                drop(tcp);
                continue;
            }
        };
        // Chat packets are small and latency-bound: Nagle's algorithm would hold acks back ~40 ms.
        let _ = tcp.set_nodelay(true);
        let conn = Conn { router: router.clone(), peer, limits: limits.clone(), stop: stop.clone() };
        match &tls {
            None => conns.spawn(conn.serve(Counted { io: tcp, _slot: slot }, false)),
            Some(tls) => conns.spawn(conn.handshake(tls.acceptor(), tcp, slot)),
        };
    }
    drop(listener);
    conns.close();
    conns.wait().await;
}

/// Errors of one incoming connection (it went away before we took it), not of the listener.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    )
}

/// One accepted connection and what serving it needs.
struct Conn {
    router: Router,
    peer: SocketAddr,
    limits: Arc<ListenerLimits>,
    stop: CancellationToken,
}

impl Conn {
    async fn handshake(self, acceptor: tokio_rustls::TlsAcceptor, tcp: TcpStream, slot: Slot) {
        match tokio::time::timeout(self.limits.tls_handshake_timeout, acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => self.serve(Counted { io: tls, _slot: slot }, true).await,
            Ok(Err(e)) => tracing::debug!(peer = %self.peer, error = %e, "TLS handshake failed"),
            Err(_) => {
                metrics::counter!(m::HTTP_TIMEOUTS, "kind" => "tls_handshake").increment(1);
                tracing::debug!(peer = %self.peer, "TLS handshake timed out");
            }
        }
    }

    async fn serve<I>(self, io: I, tls: bool)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Self { router, peer, limits, stop } = self;
        let body_timeout = limits.body_timeout;
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let mut router = router.clone();
            async move {
                let (mut parts, body) = req.into_parts();
                parts.extensions.insert(ConnectInfo(peer));
                // Requests without a body (polls, most reads) go through untouched.
                let (body, timed_out) = if hyper::body::Body::is_end_stream(&body) {
                    (Body::new(body), None)
                } else {
                    let flag = Arc::new(AtomicBool::new(false));
                    (Body::new(TimedBody::new(body, body_timeout, flag.clone())), Some(flag))
                };
                let mut res: Response<Body> = match router.call(Request::from_parts(parts, body)).await {
                    Ok(res) => res,
                    Err(never) => match never {},
                };
                // The rest of a body that timed out is never read: the connection cannot carry
                // another request, so say so and let hyper close it after this answer.
                if timed_out.is_some_and(|t| t.load(Ordering::Relaxed)) {
                    res.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                Ok::<_, Infallible>(res)
            }
        });
        let mut http = hyper::server::conn::http1::Builder::new();
        // hyper starts the header timer when it waits for a request head, including between
        // keep-alive requests, and never while a handler holds a request.
        http.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout);
        let conn = http.serve_connection(TokioIo::new(io), service).with_upgrades();
        tokio::pin!(conn);
        let result = tokio::select! {
            result = conn.as_mut() => result,
            () = stop.cancelled() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        if let Err(e) = result {
            if e.is_timeout() {
                metrics::counter!(m::HTTP_TIMEOUTS, "kind" => "header").increment(1);
            }
            tracing::debug!(%peer, tls, error = %e, "connection ended with an error");
        }
    }
}

/// Open connections, counted at accept and released when the connection's socket is dropped
/// (for a WebSocket, when the WebSocket ends, long after its HTTP connection handed it over).
struct Admission {
    max_total: usize,
    max_per_ip: Option<usize>,
    /// A std mutex: held for one map update, never across an await.
    open: Mutex<Open>,
}

#[derive(Default)]
struct Open {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

impl Admission {
    fn new(limits: &ListenerLimits) -> Self {
        Self {
            max_total: limits.max_connections,
            max_per_ip: limits.max_connections_per_ip,
            open: Mutex::new(Open::default()),
        }
    }

    /// A slot for one more connection from `ip`, or the `kind` label of the cap it would pass.
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, &'static str> {
        let ip = canonical(ip);
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if open.total >= self.max_total {
            return Err("connections_total");
        }
        if let Some(max) = self.max_per_ip {
            let n = open.per_ip.entry(ip).or_default();
            if *n >= max {
                return Err("connections_per_ip");
            }
            *n += 1;
        }
        open.total += 1;
        Ok(Slot { admission: self.clone(), ip })
    }
}

/// An IPv4 client on a dual-stack socket arrives as `::ffff:a.b.c.d`: one address, one count.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

struct Slot {
    admission: Arc<Admission>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.admission.open.lock().unwrap_or_else(|e| e.into_inner());
        open.total -= 1;
        if self.admission.max_per_ip.is_some()
            && let std::collections::hash_map::Entry::Occupied(mut n) = open.per_ip.entry(self.ip)
        {
            *n.get_mut() -= 1;
            if *n.get() == 0 {
                n.remove();
            }
        }
    }
}

/// A connection's socket carrying its [`Slot`], so that the count follows the socket wherever
/// hyper hands it (an upgrade moves it out of the HTTP connection).
struct Counted<I> {
    io: I,
    _slot: Slot,
}

impl<I: AsyncRead + Unpin> AsyncRead for Counted<I> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Counted<I> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A request body that must arrive within `limit` of its headers. The clock is checked only
/// while the body is awaited, so a handler that reads late is never cut off by its own delay.
struct TimedBody {
    inner: Incoming,
    deadline: Instant,
    /// Made on the first wait only: most bodies are in the first read.
    sleep: Option<Pin<Box<Sleep>>>,
    timed_out: Arc<AtomicBool>,
}

impl TimedBody {
    fn new(inner: Incoming, limit: Duration, timed_out: Arc<AtomicBool>) -> Self {
        Self { inner, deadline: Instant::now() + limit, sleep: None, timed_out }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive in time")]
struct BodyTimeout;

impl hyper::body::Body for TimedBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => Poll::Ready(frame.map(|f| f.map_err(Into::into))),
            Poll::Pending => {
                let deadline = this.deadline;
                let sleep = this.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if sleep.as_mut().poll(cx).is_ready() {
                    if !this.timed_out.swap(true, Ordering::Relaxed) {
                        metrics::counter!(m::HTTP_TIMEOUTS, "kind" => "body").increment(1);
                    }
                    return Poll::Ready(Some(Err(BodyTimeout.into())));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(total: usize, per_ip: Option<usize>) -> ListenerLimits {
        ListenerLimits {
            header_timeout: Duration::from_secs(1),
            body_timeout: Duration::from_secs(1),
            tls_handshake_timeout: Duration::from_secs(1),
            max_connections: total,
            max_connections_per_ip: per_ip,
        }
    }

    #[test]
    fn caps_count_per_address_and_in_total_and_free_on_drop() {
        let a = Arc::new(Admission::new(&limits(3, Some(2))));
        let one: IpAddr = "10.0.0.1".parse().unwrap();
        let two: IpAddr = "10.0.0.2".parse().unwrap();
        let s1 = a.admit(one).unwrap();
        let _s2 = a.admit(one).unwrap();
        assert_eq!(a.admit(one).err(), Some("connections_per_ip"));
        // The same client over an IPv4-mapped IPv6 address is the same client.
        assert_eq!(a.admit("::ffff:10.0.0.1".parse().unwrap()).err(), Some("connections_per_ip"));
        let _s3 = a.admit(two).unwrap();
        assert_eq!(a.admit(two).err(), Some("connections_total"));
        drop(s1);
        assert!(a.admit(one).is_ok());
        assert!(a.open.lock().unwrap().per_ip.len() <= 2);
    }

    #[test]
    fn without_a_per_address_cap_only_the_total_counts() {
        let a = Arc::new(Admission::new(&limits(2, None)));
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let _s = (a.admit(ip).unwrap(), a.admit(ip).unwrap());
        assert_eq!(a.admit(ip).err(), Some("connections_total"));
        assert!(a.open.lock().unwrap().per_ip.is_empty());
    }
}
