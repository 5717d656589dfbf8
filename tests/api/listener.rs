//! The client listener under attack: TLS with a test CA made by the test (openssl CLI), certificate
//! reload on SIGHUP, slow clients (headers, bodies), and the connection caps. Raw sockets where a
//! well-behaved HTTP client would hide what the server does.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use reqwest::{Method, StatusCode};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message;

use crate::helpers::*;
use crate::support::tls::TestCa;

/// A test CA (tests/support/tls.rs) and the server certificates it signs.
struct Pki {
    ca: TestCa,
}

impl Pki {
    fn new() -> Self {
        Self { ca: TestCa::new("chatmesh test CA") }
    }

    fn ca_pem(&self) -> Vec<u8> {
        std::fs::read(self.ca.ca_file()).unwrap()
    }

    /// A server certificate for 127.0.0.1 (a new key each): (cert path, key path).
    fn leaf(&self, serial: u32) -> (PathBuf, PathBuf) {
        let issued = self.ca.issue(&format!("leaf{serial}"), "IP:127.0.0.1,DNS:localhost");
        (issued.cert, issued.key)
    }

    /// Client config trusting this CA only.
    fn client(&self) -> tokio_rustls::TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(&self.ca_pem()) {
            roots.add(c.unwrap()).unwrap();
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }

    /// reqwest trusting this CA and nothing else.
    fn reqwest(&self) -> reqwest::Client {
        reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&self.ca_pem()).unwrap())
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap()
    }
}

fn der_of(cert_pem: &Path) -> Vec<u8> {
    CertificateDer::pem_file_iter(cert_pem).unwrap().next().unwrap().unwrap().to_vec()
}

fn addr_of(app: &TestApp) -> SocketAddr {
    app.url.split("://").nth(1).unwrap().parse().unwrap()
}

async fn tls_spawn(pki: &Pki, cert: &Path, key: &Path, mut env: Vec<(&'static str, String)>) -> TestApp {
    env.push(("CHATMESH_TLS_CERT_FILE", cert.display().to_string()));
    env.push(("CHATMESH_TLS_KEY_FILE", key.display().to_string()));
    let mut app = spawn_with(Spawn { env, ..Default::default() }).await;
    assert!(app.url.starts_with("https://"), "{}", app.url);
    app.http = pki.reqwest();
    app
}

/// A TLS connection to the instance; returns it and the DER of the certificate it was served.
async fn tls_connect(pki: &Pki, addr: SocketAddr) -> (tokio_rustls::client::TlsStream<TcpStream>, Vec<u8>) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = pki.client().connect(ServerName::IpAddress(addr.ip().into()), tcp).await.expect("TLS handshake");
    let cert = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    (tls, cert)
}

/// One HTTP/1.1 GET on an open connection (kept alive); returns (status, head).
async fn get_on<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, path: &str) -> (u16, String) {
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk)).await.expect("answer").unwrap();
        assert!(n > 0, "connection closed before an answer: {:?}", String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let len: usize = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap()))
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0);
        buf.extend_from_slice(&chunk[..n]);
    }
    (head[9..12].parse().unwrap(), head)
}

/// Reads until the peer closes; returns what it sent and how long that took. Panics past `within`.
async fn read_to_close<S: AsyncRead + Unpin>(s: &mut S, within: Duration) -> (Vec<u8>, Duration) {
    let started = Instant::now();
    let mut got = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        match tokio::time::timeout(within.saturating_sub(started.elapsed()), s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (got, started.elapsed()),
            Ok(Ok(n)) => got.extend_from_slice(&chunk[..n]),
            Err(_) => panic!("still open after {within:?}; received {:?}", String::from_utf8_lossy(&got)),
        }
    }
}

async fn metric(app: &TestApp, http: &reqwest::Client, line_prefix: &str) -> f64 {
    let text = http.get(format!("{}/metrics", app.url)).send().await.unwrap().text().await.unwrap();
    text.lines()
        .find(|l| l.starts_with(line_prefix))
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_rest_and_socketio_with_hsts_and_nothing_in_plaintext() {
    let pki = Pki::new();
    let (cert, key) = pki.leaf(1);
    let app = tls_spawn(&pki, &cert, &key, vec![("CHATMESH_TLS_HANDSHAKE_TIMEOUT_MS", "1000".into())]).await;

    let r = app.http.get(format!("{}/health/live", app.url)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["strict-transport-security"], "max-age=63072000");
    // A REST body over TLS, and the token it gives back.
    let (_, token) = app.register("tls_alice").await;
    let me = app.call(Method::GET, "/api/v1/users/me", None, Some(&token)).await;
    assert_eq!(me.status, StatusCode::OK);
    assert_eq!(me.headers["strict-transport-security"], "max-age=63072000");
    // The Engine.IO handshake (long-polling) and an error answer carry it too.
    let open = app.http.get(format!("{}/socket.io/?EIO=4&transport=polling", app.url)).send().await.unwrap();
    assert_eq!(open.status(), StatusCode::OK);
    assert_eq!(open.headers()["strict-transport-security"], "max-age=63072000");
    assert!(open.text().await.unwrap().starts_with("0{"));
    let missing = app.call(Method::GET, "/nope", None, None).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert!(missing.headers.contains_key("strict-transport-security"));

    // A client that does not trust the test CA is refused: the certificate really is checked.
    let stranger = reqwest::Client::builder().use_rustls_tls().build().unwrap();
    assert!(stranger.get(format!("{}/health/live", app.url)).send().await.is_err());

    // Plain HTTP to the TLS port gets no HTTP answer, and the connection ends.
    let mut tcp = TcpStream::connect(addr_of(&app)).await.unwrap();
    tcp.write_all(b"GET /health/live HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
    let (got, _) = read_to_close(&mut tcp, Duration::from_secs(5)).await;
    assert!(!got.starts_with(b"HTTP/"), "plaintext answered: {:?}", String::from_utf8_lossy(&got));

    // A handshake that starts and never finishes is dropped at the handshake timeout.
    let mut stalled = TcpStream::connect(addr_of(&app)).await.unwrap();
    stalled.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
    let (_, took) = read_to_close(&mut stalled, Duration::from_secs(5)).await;
    eprintln!("stalled TLS handshake dropped after {took:?} (timeout 1 s)");
    assert!(took >= Duration::from_millis(900) && took < Duration::from_millis(2500), "{took:?}");
    assert_eq!(metric(&app, &app.http, "chatmesh_http_timeouts_total{kind=\"tls_handshake\"}").await, 1.0);

    // A WebSocket (Engine.IO) over TLS: the upgrade goes through the TLS stream.
    let (tls, _) = tls_connect(&pki, addr_of(&app)).await;
    let url = format!("wss://{}/socket.io/?EIO=4&transport=websocket", addr_of(&app));
    let (mut ws, res) = tokio_tungstenite::client_async(url, tls).await.expect("wss upgrade");
    assert_eq!(res.status(), 101);
    let first = ws.next().await.unwrap().unwrap();
    assert!(first.to_text().unwrap().starts_with("0{"), "{first:?}");
    ws.send(Message::text(format!("40{}", serde_json::json!({"token": token})))).await.unwrap();
    let connected = ws.next().await.unwrap().unwrap();
    assert!(connected.to_text().unwrap().starts_with("40{"), "{connected:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_tls_there_is_no_hsts() {
    let app = spawn_app().await;
    assert!(app.url.starts_with("http://"));
    for path in ["/health/live", "/socket.io/?EIO=4&transport=polling", "/"] {
        let r = app.http.get(format!("{}{path}", app.url)).send().await.unwrap();
        assert!(r.status().is_success(), "{path}: {}", r.status());
        assert!(!r.headers().contains_key("strict-transport-security"), "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_settings_are_both_or_neither_and_unusable_files_stop_the_start() {
    let pki = Pki::new();
    let (cert, key) = pki.leaf(1);
    let (_, other_key) = pki.leaf(2);
    let data = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}/c.db", data.path().display());
    let garbage = data.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    let (cert, key, other_key, garbage) = (
        cert.display().to_string(),
        key.display().to_string(),
        other_key.display().to_string(),
        garbage.display().to_string(),
    );
    let run = |tls: &[(&str, &str)]| {
        let mut env = vec![("CHATMESH_BIND", "127.0.0.1:0"), ("CHATMESH_STORE_URL", store.as_str())];
        env.extend_from_slice(tls);
        run_to_exit(&env, &["serve"])
    };
    let (code, err) = run(&[("CHATMESH_TLS_CERT_FILE", &cert)]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("invalid setting CHATMESH_TLS_KEY_FILE: required when CHATMESH_TLS_CERT_FILE is set"),
        "{err}"
    );
    let (code, err) = run(&[("CHATMESH_TLS_KEY_FILE", &key)]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("invalid setting CHATMESH_TLS_CERT_FILE"), "{err}");
    let (code, err) = run(&[("CHATMESH_TLS_CERT_FILE", "/nonexistent/cert.pem"), ("CHATMESH_TLS_KEY_FILE", &key)]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("CHATMESH_TLS_CERT_FILE /nonexistent/cert.pem"), "{err}");
    let (code, err) = run(&[("CHATMESH_TLS_CERT_FILE", &garbage), ("CHATMESH_TLS_KEY_FILE", &key)]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("no PEM certificate"), "{err}");
    let (code, err) = run(&[("CHATMESH_TLS_CERT_FILE", &cert), ("CHATMESH_TLS_KEY_FILE", &garbage)]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains(&format!("CHATMESH_TLS_KEY_FILE {garbage}")), "{err}");
    let (code, err) = run(&[("CHATMESH_TLS_CERT_FILE", &cert), ("CHATMESH_TLS_KEY_FILE", &other_key)]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("does not fit"), "{err}");
}

#[test]
fn listener_settings_outside_their_range_stop_the_start() {
    for (name, bad) in [
        ("CHATMESH_HTTP_HEADER_TIMEOUT_MS", "99"),
        ("CHATMESH_HTTP_HEADER_TIMEOUT_MS", "600001"),
        ("CHATMESH_HTTP_BODY_TIMEOUT_MS", "99"),
        ("CHATMESH_TLS_HANDSHAKE_TIMEOUT_MS", "600001"),
        ("CHATMESH_MAX_CONNECTIONS", "0"),
        ("CHATMESH_MAX_CONNECTIONS_PER_IP", "0"),
        ("CHATMESH_MAX_CONNECTIONS_PER_IP", "10000001"),
    ] {
        let (code, err) = run_to_exit(&[(name, bad)], &["serve"]);
        assert_eq!(code, Some(2), "{name}={bad}: {err}");
        assert!(err.contains(name), "{name}={bad}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_certificate_keeping_open_connections_and_a_bad_file_keeps_the_old_one() {
    let pki = Pki::new();
    let (cert1, key1) = pki.leaf(1);
    let (cert2, key2) = pki.leaf(2);
    let live = tempfile::tempdir().unwrap();
    let (cert, key) = (live.path().join("server.pem"), live.path().join("server.key"));
    std::fs::copy(&cert1, &cert).unwrap();
    std::fs::copy(&key1, &key).unwrap();
    let app = tls_spawn(&pki, &cert, &key, vec![]).await;
    let addr = addr_of(&app);

    let (mut before, served) = tls_connect(&pki, addr).await;
    assert_eq!(served, der_of(&cert1));
    assert_eq!(get_on(&mut before, "/health/live").await.0, 200);
    // A WebSocket opened before the reload, too.
    let (tls, _) = tls_connect(&pki, addr).await;
    let (mut ws, _) =
        tokio_tungstenite::client_async(format!("wss://{addr}/socket.io/?EIO=4&transport=websocket"), tls)
            .await
            .unwrap();
    assert!(ws.next().await.unwrap().unwrap().to_text().unwrap().starts_with("0{"));

    std::fs::copy(&key2, &key).unwrap();
    std::fs::copy(&cert2, &cert).unwrap();
    app.signal("HUP");
    let logs = app.logs_until(|l| l.iter().any(|l| l.contains("TLS certificate reloaded"))).await;
    assert!(logs.iter().any(|l| l.contains("TLS certificate reloaded")), "{logs:#?}");

    // Connections from before carry on; a new one is served the new certificate.
    assert_eq!(get_on(&mut before, "/health/live").await.0, 200);
    // No token: the answer is a connect_error, but it comes over the WebSocket opened before.
    ws.send(Message::text("40")).await.unwrap();
    let reply = ws.next().await.unwrap().unwrap();
    assert!(reply.to_text().unwrap().starts_with("44{"), "{reply:?}");
    let (mut after, served) = tls_connect(&pki, addr).await;
    assert_eq!(served, der_of(&cert2), "a new connection gets the reloaded certificate");
    assert_eq!(get_on(&mut after, "/health/live").await.0, 200);

    // A broken file: the error is logged and counted, the previous certificate keeps serving.
    std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n").unwrap();
    app.signal("HUP");
    let logs = app.logs_until(|l| l.iter().any(|l| l.contains("reload failed"))).await;
    let line = logs.iter().find(|l| l.contains("reload failed")).unwrap_or_else(|| panic!("{logs:#?}"));
    assert!(line.contains("\"level\":\"ERROR\""), "{line}");
    let (mut third, served) = tls_connect(&pki, addr).await;
    assert_eq!(served, der_of(&cert2), "the last good certificate is still served");
    assert_eq!(get_on(&mut third, "/health/live").await.0, 200);
    assert_eq!(get_on(&mut before, "/health/live").await.0, 200);
    assert_eq!(metric(&app, &app.http, "chatmesh_tls_reloads_total{outcome=\"ok\"}").await, 1.0);
    assert_eq!(metric(&app, &app.http, "chatmesh_tls_reloads_total{outcome=\"error\"}").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_headers_are_cut_at_the_header_timeout_while_others_are_served() {
    let app =
        spawn_with(Spawn { env: vec![("CHATMESH_HTTP_HEADER_TIMEOUT_MS", "1500".into())], ..Default::default() }).await;
    let addr = addr_of(&app);
    // A header line every 200 ms: never idle, never done.
    let mut slow = TcpStream::connect(addr).await.unwrap();
    let started = Instant::now();
    slow.write_all(b"GET /health/live HTTP/1.1\r\nHost: localhost\r\n").await.unwrap();
    let trickle = tokio::spawn(async move {
        let mut i = 0;
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            i += 1;
            if slow.write_all(format!("X-Slow-{i}: still coming\r\n").as_bytes()).await.is_err() {
                return (slow, started.elapsed());
            }
            let mut probe = [0u8; 512];
            match tokio::time::timeout(Duration::from_millis(1), slow.read(&mut probe)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return (slow, started.elapsed()),
                Ok(Ok(n)) => {
                    assert!(probe[..n].starts_with(b"HTTP/1.1 408"), "{:?}", String::from_utf8_lossy(&probe[..n]))
                }
                Err(_) => {}
            }
            assert!(i < 50, "the slow client was never cut off");
        }
    });
    // Meanwhile a normal client is served at once.
    let quick = Instant::now();
    let r = app.http.get(format!("{}/health/live", app.url)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(quick.elapsed() < Duration::from_secs(1));
    let (_, cut_after) = trickle.await.unwrap();
    eprintln!("slowloris client cut after {cut_after:?} (header timeout 1.5 s)");
    assert!(cut_after >= Duration::from_millis(1400), "cut too early: {cut_after:?}");
    assert!(cut_after < Duration::from_millis(3500), "cut too late: {cut_after:?}");

    // An idle keep-alive connection is closed after the same time.
    let mut idle = TcpStream::connect(addr).await.unwrap();
    assert_eq!(get_on(&mut idle, "/health/live").await.0, 200);
    let (_, idle_for) = read_to_close(&mut idle, Duration::from_secs(5)).await;
    eprintln!("idle keep-alive connection closed after {idle_for:?}");
    assert!(idle_for >= Duration::from_millis(1400) && idle_for < Duration::from_millis(3000), "{idle_for:?}");
    assert!(metric(&app, &app.http, "chatmesh_http_timeouts_total{kind=\"header\"}").await >= 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_body_is_cut_at_the_body_timeout() {
    let app =
        spawn_with(Spawn { env: vec![("CHATMESH_HTTP_BODY_TIMEOUT_MS", "1000".into())], ..Default::default() }).await;
    let mut slow = TcpStream::connect(addr_of(&app)).await.unwrap();
    slow.write_all(
        b"POST /api/v1/auth/register HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
          Content-Length: 100\r\n\r\n{\"username\":",
    )
    .await
    .unwrap();
    let (got, took) = read_to_close(&mut slow, Duration::from_secs(5)).await;
    let answer = String::from_utf8_lossy(&got);
    eprintln!("slow body answered and closed after {took:?} (body timeout 1 s): {:?}", answer.lines().next());
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.to_ascii_lowercase().contains("connection: close"), "{answer}");
    assert!(took >= Duration::from_millis(900) && took < Duration::from_millis(2500), "{took:?}");
    // A body that arrives in time is served as always.
    app.register("body_in_time").await;
    assert_eq!(metric(&app, &app.http, "chatmesh_http_timeouts_total{kind=\"body\"}").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_polls_and_websockets_outlive_the_header_timeout() {
    let app = spawn_with(Spawn {
        env: vec![
            ("CHATMESH_HTTP_HEADER_TIMEOUT_MS", "1000".into()),
            ("CHATMESH_PING_INTERVAL_MS", "2500".into()),
            ("CHATMESH_PING_TIMEOUT_MS", "2000".into()),
        ],
        ..Default::default()
    })
    .await;
    let addr = addr_of(&app);
    // Long-polling: the GET is held until the server's ping, 2.5 s, past the 1 s header timeout.
    let open = app.http.get(format!("{}/socket.io/?EIO=4&transport=polling", app.url)).send().await.unwrap();
    let open = open.text().await.unwrap();
    let sid = serde_json::from_str::<serde_json::Value>(&open[1..]).unwrap()["sid"].as_str().unwrap().to_string();
    let mut poll = TcpStream::connect(addr).await.unwrap();
    let held = Instant::now();
    let (status, _) = get_on(&mut poll, &format!("/socket.io/?EIO=4&transport=polling&sid={sid}")).await;
    assert_eq!(status, 200);
    assert!(held.elapsed() >= Duration::from_millis(2000), "the poll was not held: {:?}", held.elapsed());
    eprintln!("long-poll held {:?} with a 1 s header timeout", held.elapsed());

    // WebSocket: held 6 s (two ping rounds), then still answering.
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{addr}/socket.io/?EIO=4&transport=websocket"), tcp)
        .await
        .unwrap();
    let opened = Instant::now();
    let mut pings = 0;
    while opened.elapsed() < Duration::from_secs(6) {
        let msg = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.expect("frame").unwrap().unwrap();
        if msg.to_text().unwrap() == "2" {
            pings += 1;
            ws.send(Message::text("3")).await.unwrap();
        }
    }
    assert!(pings >= 2, "{pings} pings");
    eprintln!("WebSocket open {:?}, {pings} pings answered, with a 1 s header timeout", opened.elapsed());
    ws.send(Message::text("40")).await.unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.unwrap().unwrap().unwrap();
    // No token: the namespace answers with a connect_error, over the same, still open WebSocket.
    assert!(reply.to_text().unwrap().starts_with("4"), "{reply:?}");
}

/// A TCP connection from a chosen loopback address (Linux routes all of 127/8 to lo).
async fn connect_from(source: &str, addr: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(format!("{source}:0").parse().unwrap()).unwrap();
    s.connect(addr).await.unwrap()
}

/// Whether the server serves this connection (true) or closed it at once (false).
async fn served(s: &mut TcpStream) -> bool {
    if s.write_all(b"GET /health/live HTTP/1.1\r\nHost: localhost\r\n\r\n").await.is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.expect("an answer or a close") {
        Ok(n) if n > 0 => {
            assert!(buf.starts_with(b"HTTP/1.1 200"));
            // Drain the rest of the small answer so that the next request starts clean.
            tokio::time::sleep(Duration::from_millis(20)).await;
            let _ = tokio::time::timeout(Duration::from_millis(50), s.read(&mut [0u8; 4096])).await;
            true
        }
        _ => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_per_ip_and_total_caps_are_closed_at_once() {
    let app = spawn_with(Spawn {
        env: vec![("CHATMESH_MAX_CONNECTIONS_PER_IP", "3".into()), ("CHATMESH_MAX_CONNECTIONS", "5".into())],
        ..Default::default()
    })
    .await;
    let addr = addr_of(&app);
    let mut from_1 = Vec::new();
    for _ in 0..3 {
        let mut c = connect_from("127.0.0.1", addr).await;
        assert!(served(&mut c).await);
        from_1.push(c);
    }
    // The fourth from the same address: closed before it is read.
    let mut fourth = connect_from("127.0.0.1", addr).await;
    let (got, took) = read_to_close(&mut fourth, Duration::from_secs(2)).await;
    eprintln!("connection past the per-IP cap closed after {took:?}, {} bytes sent to it", got.len());
    assert!(got.is_empty() && took < Duration::from_millis(500), "{got:?} after {took:?}");
    // Another address is not affected by that one's cap...
    let mut from_2 = Vec::new();
    for _ in 0..2 {
        let mut c = connect_from("127.0.0.2", addr).await;
        assert!(served(&mut c).await);
        from_2.push(c);
    }
    // ...until the instance holds its total.
    let mut sixth = connect_from("127.0.0.3", addr).await;
    assert!(!served(&mut sixth).await, "the total cap let a sixth connection in");
    // The connections already open are still served.
    assert!(served(&mut from_1[0]).await && served(&mut from_2[1]).await);

    // Closing one frees its place (the server sees the close a moment later; tries before that
    // are refused and counted too).
    drop(from_1.pop());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut again = None;
    for _ in 0..50 {
        let mut c = connect_from("127.0.0.1", addr).await;
        if served(&mut c).await {
            again = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut again = again.expect("a place freed by a close is given again");
    // Counted by kind (read over a connection already admitted: the instance is full).
    again.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await.unwrap();
    let (text, _) = read_to_close(&mut again, Duration::from_secs(5)).await;
    let text = String::from_utf8_lossy(&text);
    for kind in ["connections_per_ip", "connections_total"] {
        let prefix = format!("chatmesh_rate_limited_total{{kind=\"{kind}\"}} ");
        let n: f64 =
            text.lines().find_map(|l| l.strip_prefix(&prefix)).unwrap_or_else(|| panic!("{text}")).parse().unwrap();
        assert!(n >= 1.0, "{kind}: {n}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_trusted_balancer_the_per_ip_cap_does_not_cap_the_balancer() {
    let app = spawn_with(Spawn {
        env: vec![("CHATMESH_MAX_CONNECTIONS_PER_IP", "2".into()), ("CHATMESH_TRUST_PROXY", "true".into())],
        ..Default::default()
    })
    .await;
    let mut open = Vec::new();
    for _ in 0..6 {
        let mut c = connect_from("127.0.0.1", addr_of(&app)).await;
        assert!(served(&mut c).await, "connection {} from the balancer's address refused", open.len() + 1);
        open.push(c);
    }
}
