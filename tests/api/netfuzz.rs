//! The network fuzzer: mutated Engine.IO / Socket.IO traffic over both transports (long-polling
//! GET/POST, WebSocket frames, the upgrade between them) thrown at the real binary from valid
//! sessions, then proof that the instance still serves (health, and a fresh user who registers,
//! logs in, joins, sends and receives over both transports) and that its memory stayed bounded.
//!
//! Reproducible: the seed is printed (`CHATMESH_NETFUZZ_SEED` replays it; each worker draws its
//! traffic from its own RNG derived from it, so only the interleaving varies between runs).
//! Bounded: `CHATMESH_NETFUZZ_SECS` (default 30) and `CHATMESH_NETFUZZ_MAX_REQUESTS` (default
//! 20,000 requests and frames).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

use crate::helpers::{Spawn, TestApp, spawn_with};

/// RSS growth allowed across the whole run, measured after the traffic has stopped and the
/// instance has served a fresh client again. Measured here (debug build): +0 and +7.5 MiB after
/// 10 s, +17.6 MiB after 30 s, +16.1 MiB after 60 s: allocator and cache warm-up that levels off,
/// where a leak per session or per packet (thousands of each) would keep growing.
const RSS_BOUND_KIB: u64 = 64 * 1024;
/// Largest packet the transport takes with the default 64 KiB body limit (4x, see realtime).
const MAX_PAYLOAD: usize = 256 * 1024;
const WORKERS: u64 = 4;

type Ws = WebSocketStream<TcpStream>;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutated_engine_io_traffic_leaves_the_instance_serving_with_bounded_memory() {
    let seed = env_u64("CHATMESH_NETFUZZ_SEED", rand::random());
    let secs = env_u64("CHATMESH_NETFUZZ_SECS", 30);
    let max_requests = env_u64("CHATMESH_NETFUZZ_MAX_REQUESTS", 20_000);
    println!(
        "netfuzz: seed {seed} (replay with CHATMESH_NETFUZZ_SEED={seed}), {secs} s, at most {max_requests} requests"
    );
    // The default per-user and per-IP limits (the helper raises them for the other tests): the
    // fuzzer then also drives every refusal path, and the final check shows a fresh user is not
    // shut out by what the fuzzing users did.
    let env = vec![
        ("CHATMESH_AUTH_RATE_PER_MIN", "60".to_string()),
        ("CHATMESH_SEND_RATE_PER_SEC", "20".to_string()),
        ("CHATMESH_ROOM_CHANGE_RATE_PER_MIN", "60".to_string()),
    ];
    let mut app = spawn_with(Spawn { env, ..Default::default() }).await;
    let pid = app.child.id();

    let (owner_id, owner) = app.register("fuzz_owner").await;
    let room = app.create_room(&owner, "fuzzed", "public").await;
    let mut users = vec![(owner_id, owner)];
    for i in 1..WORKERS {
        users.push(app.register(&format!("fuzz_user{i}")).await);
    }
    // A first session of each kind, so that what the runtime allocates once is in the baseline.
    fresh_client_works(&app, &room, "warmup").await;
    let rss_before = rss_kib(pid);

    let stats = Arc::new(Stats::default());
    let deadline = Instant::now() + Duration::from_secs(secs);
    let workers: Vec<_> = users
        .into_iter()
        .enumerate()
        .map(|(i, (user_id, token))| {
            let mut f = Fuzzer {
                rng: StdRng::seed_from_u64(seed.wrapping_add(i as u64)),
                base: app.url.clone(),
                http: reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap(),
                token,
                user_id,
                room: room.clone(),
                stats: stats.clone(),
                n: 0,
            };
            tokio::spawn(async move {
                while Instant::now() < deadline && f.stats.requests.load(Ordering::Relaxed) < max_requests {
                    f.iteration().await;
                }
            })
        })
        .collect();
    for w in workers {
        // A worker's panic is a property that failed (a 5xx, say): surface it with the seed.
        if let Err(e) = w.await {
            panic!("netfuzz worker failed (seed {seed}): {e}");
        }
    }
    let (requests, acks) = (stats.requests.load(Ordering::Relaxed), stats.acks.load(Ordering::Relaxed));
    let (connected, refused) = (stats.connected.load(Ordering::Relaxed), stats.refused.load(Ordering::Relaxed));
    println!(
        "netfuzz: {requests} requests and frames; CONNECT accepted {connected}, refused {refused}; {acks} acks back; \
         HTTP statuses {:?} (0: no answer, as a long-poll cut short)",
        stats.statuses.lock().unwrap()
    );
    assert!(requests > 100 && acks > 10, "too little traffic to mean anything: {requests} requests, {acks} acks");

    assert!(app.child.try_wait().unwrap().is_none(), "chatmesh exited under fuzzing (seed {seed})");
    // Measured right away: sessions the fuzzer left half-open (they close at the CONNECT timeout
    // or the heartbeat, up to 45 s later) still count against the bound.
    fresh_client_works(&app, &room, "after").await;
    // A panic in a connection's task leaves the process serving: only its stderr tells.
    let panics: Vec<String> = app.stderr.lock().unwrap().iter().filter(|l| l.contains("panicked")).cloned().collect();
    assert!(panics.is_empty(), "chatmesh panicked under fuzzing (seed {seed}): {panics:#?}");
    let rss_after = rss_kib(pid);
    let grown = rss_after.saturating_sub(rss_before);
    println!("netfuzz: VmRSS {rss_before} KiB before, {rss_after} KiB after: +{grown} KiB (bound {RSS_BOUND_KIB} KiB)");
    assert!(grown < RSS_BOUND_KIB, "RSS grew by {grown} KiB under fuzzing (seed {seed})");
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS line");
    line.split_whitespace().nth(1).and_then(|n| n.parse().ok()).expect("VmRSS in kB")
}

#[derive(Default)]
struct Stats {
    requests: AtomicU64,
    /// Acks that came back: the mutated events reached the handlers, not only the parser.
    acks: AtomicU64,
    /// CONNECTs answered `40` (accepted) and `44` (refused).
    connected: AtomicU64,
    refused: AtomicU64,
    statuses: Mutex<BTreeMap<u16, u64>>,
}

impl Stats {
    fn count(&self, packet: &str) {
        let counter = match packet.get(..2) {
            Some("43") => &self.acks,
            Some("40") => &self.connected,
            Some("44") => &self.refused,
            _ => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

struct Fuzzer {
    rng: StdRng,
    base: String,
    http: reqwest::Client,
    token: String,
    user_id: String,
    room: String,
    stats: Arc<Stats>,
    /// Distinct client_msg_ids.
    n: u64,
}

impl Fuzzer {
    async fn iteration(&mut self) {
        match self.rng.random_range(0..100) {
            0..40 => self.polling().await,
            40..75 => self.websocket(None).await,
            75..88 => self.upgrade().await,
            _ => self.bad_requests().await,
        }
    }

    fn url(&self, query: &str) -> String {
        format!("{}/socket.io/?{query}", self.base)
    }

    /// One HTTP request; any answer is fine but a 5xx (or none at all: the instance is gone).
    async fn request(&self, method: Method, query: &str, body: Option<Vec<u8>>, wait: Duration) -> Option<String> {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let mut req = self.http.request(method.clone(), self.url(query)).timeout(wait);
        if let Some(b) = body {
            req = req.header("content-type", "text/plain;charset=UTF-8").body(b);
        }
        match req.send().await {
            Ok(res) => {
                let status = res.status();
                *self.stats.statuses.lock().unwrap().entry(status.as_u16()).or_default() += 1;
                assert!(!status.is_server_error(), "{method} {query}: {status}");
                let text = res.text().await.ok()?;
                for p in text.split('\x1e') {
                    self.stats.count(p);
                }
                Some(text)
            }
            Err(e) if e.is_connect() => panic!("{method} {query}: the instance is gone: {e}"),
            // A long-poll with nothing to say waits for the next ping (we stop listening first);
            // the server may answer an oversized body and close before reading all of it.
            Err(_) => {
                *self.stats.statuses.lock().unwrap().entry(0).or_default() += 1;
                None
            }
        }
    }

    async fn handshake(&self) -> Option<String> {
        let open = self.request(Method::GET, "EIO=4&transport=polling", None, Duration::from_secs(10)).await?;
        let v: Value = serde_json::from_str(open.strip_prefix('0')?).ok()?;
        v["sid"].as_str().map(str::to_string)
    }

    /// A polling session: CONNECT (sometimes mutated), rounds of mutated POSTs and long-polls,
    /// some overlapping, some oversized, then a close.
    async fn polling(&mut self) {
        let Some(sid) = self.handshake().await else { return };
        let q = format!("EIO=4&transport=polling&sid={sid}");
        let connect = self.connect_packet();
        self.request(Method::POST, &q, Some(connect.into_bytes()), Duration::from_secs(10)).await;
        // The CONNECT's answer (events sent before it are dropped unread).
        self.request(Method::GET, &q, None, Duration::from_secs(2)).await;
        for _ in 0..self.rng.random_range(1..=4) {
            let body = self.polling_body();
            let poll = Duration::from_millis(self.rng.random_range(50..1500));
            match self.rng.random_range(0..10) {
                // Overlapping POSTs (the reference server answers 400 and closes the session).
                0 => {
                    let other = self.polling_body();
                    tokio::join!(
                        self.request(Method::POST, &q, Some(body), Duration::from_secs(10)),
                        self.request(Method::POST, &q, Some(other), Duration::from_secs(10))
                    );
                }
                // Two long-polls at once.
                1 => {
                    tokio::join!(self.request(Method::GET, &q, None, poll), self.request(Method::GET, &q, None, poll));
                }
                // Past the transport's limit.
                2 => {
                    let big = vec![b'4'; MAX_PAYLOAD + self.rng.random_range(1..4096)];
                    self.request(Method::POST, &q, Some(big), Duration::from_secs(10)).await;
                }
                // A POST while a long-poll waits, as clients do.
                3..6 => {
                    tokio::join!(
                        self.request(Method::GET, &q, None, poll),
                        self.request(Method::POST, &q, Some(body), Duration::from_secs(10))
                    );
                }
                _ => {
                    self.request(Method::POST, &q, Some(body), Duration::from_secs(10)).await;
                    self.request(Method::GET, &q, None, poll).await;
                }
            }
        }
        self.request(Method::POST, &q, Some(b"1".to_vec()), Duration::from_secs(10)).await;
    }

    /// A WebSocket session, direct (`sid` None) or the upgrade of a polling one.
    async fn websocket(&mut self, upgraded: Option<Ws>) {
        let mut ws = match upgraded {
            Some(ws) => ws,
            None => {
                let Some(mut ws) = self.ws_open("EIO=4&transport=websocket").await else { return };
                // The open packet.
                let _ = tokio::time::timeout(Duration::from_secs(5), ws.next()).await;
                let connect = self.connect_packet();
                self.ws_send(&mut ws, Message::text(connect)).await;
                // Events before the CONNECT is answered are dropped unread: wait for the answer.
                let answered = async {
                    while let Some(Ok(m)) = ws.next().await {
                        let t = m.to_text().unwrap_or_default();
                        self.stats.count(t);
                        if t.starts_with('4') {
                            return;
                        }
                    }
                };
                let _ = tokio::time::timeout(Duration::from_secs(2), answered).await;
                ws
            }
        };
        for _ in 0..self.rng.random_range(1..=40) {
            let msg = match self.rng.random_range(0..100) {
                0..70 => Message::text(format!("4{}", self.packet())),
                70..78 => Message::text(self.engine_control()),
                // A text frame that is not UTF-8: the connection is the client's to lose, nothing more.
                78..83 => {
                    let mut bytes = format!("4{}", self.packet()).into_bytes();
                    self.break_utf8(&mut bytes);
                    Message::Frame(Frame::message(bytes, OpCode::Data(Data::Text), true))
                }
                83..90 => {
                    let n = self.rng.random_range(0..2048);
                    Message::binary(self.random_bytes(n))
                }
                90..93 => Message::text(format!("42[\"message:send\",\"{}\"]", "x".repeat(MAX_PAYLOAD))),
                // A message in fragments that never ends.
                93..96 => {
                    Message::Frame(Frame::message(format!("4{}", self.packet()), OpCode::Data(Data::Text), false))
                }
                _ => Message::Ping(self.random_bytes(16).into()),
            };
            if !self.ws_send(&mut ws, msg).await {
                return;
            }
            // Read what came back (acks, errors, a close), without waiting long.
            while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_millis(2), ws.next()).await {
                self.stats.count(m.to_text().unwrap_or_default());
            }
        }
        if self.rng.random_bool(0.7) {
            let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
        }
    }

    async fn ws_open(&self, query: &str) -> Option<Ws> {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let authority = self.base.trim_start_matches("http://");
        let tcp = TcpStream::connect(authority).await.expect("the instance is gone");
        let url = format!("ws://{authority}/socket.io/?{query}");
        match tokio::time::timeout(Duration::from_secs(10), tokio_tungstenite::client_async(url.as_str(), tcp)).await {
            Ok(Ok((ws, _))) => Some(ws),
            Ok(Err(tokio_tungstenite::tungstenite::Error::Http(res))) => {
                let status = res.status();
                *self.stats.statuses.lock().unwrap().entry(status.as_u16()).or_default() += 1;
                assert!(!status.is_server_error(), "websocket {query}: {status}");
                None
            }
            // Reset or closed mid-handshake: counted with the requests that got no answer.
            Ok(Err(_)) => {
                *self.stats.statuses.lock().unwrap().entry(0).or_default() += 1;
                None
            }
            Err(_) => panic!("websocket {query}: no answer within 10 s"),
        }
    }

    async fn ws_send(&self, ws: &mut Ws, msg: Message) -> bool {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        matches!(tokio::time::timeout(Duration::from_secs(5), ws.send(msg)).await, Ok(Ok(())))
    }

    /// Polling to WebSocket: the probe exchange, mutated at times, sometimes twice at once.
    async fn upgrade(&mut self) {
        let Some(sid) = self.handshake().await else { return };
        let q = format!("EIO=4&transport=polling&sid={sid}");
        let connect = self.connect_packet();
        self.request(Method::POST, &q, Some(connect.into_bytes()), Duration::from_secs(10)).await;
        let ws_query = format!("EIO=4&transport=websocket&sid={sid}");
        let (first, second) = if self.rng.random_bool(0.2) {
            tokio::join!(self.ws_open(&ws_query), self.ws_open(&ws_query))
        } else {
            (self.ws_open(&ws_query).await, None)
        };
        drop(second);
        let Some(mut ws) = first else { return };
        let probe = if self.rng.random_bool(0.8) { "2probe".to_string() } else { self.engine_control() };
        if !self.ws_send(&mut ws, Message::text(probe)).await {
            return;
        }
        let _ = tokio::time::timeout(Duration::from_millis(500), ws.next()).await;
        let done = if self.rng.random_bool(0.8) { "5".to_string() } else { self.engine_control() };
        // A poll racing the upgrade's end.
        tokio::join!(
            self.ws_send(&mut ws, Message::text(done)),
            self.request(Method::GET, &q, None, Duration::from_millis(300))
        );
        self.websocket(Some(ws)).await;
    }

    /// Requests no client should send: unknown sids, wrong versions and transports, websocket
    /// requests without the upgrade, POSTs without a session.
    async fn bad_requests(&mut self) {
        const SID_CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let sid: String = (0..20).map(|_| *SID_CHARS.choose(&mut self.rng).unwrap() as char).collect();
        let body = self.polling_body();
        let queries = [
            format!("EIO=4&transport=polling&sid={sid}"),
            "EIO=3&transport=polling".to_string(),
            "EIO=4&transport=flash".to_string(),
            "EIO=4&transport=websocket".to_string(),
            "EIO=4&transport=polling&sid=".to_string(),
            "EIO=4&EIO=5&transport=polling&transport=websocket".to_string(),
            format!("EIO=4&transport=polling&sid={}", "s".repeat(4096)),
            "transport=polling".to_string(),
            String::new(),
        ];
        let q = queries.choose(&mut self.rng).unwrap().clone();
        let method = [Method::GET, Method::POST, Method::PUT, Method::DELETE, Method::OPTIONS]
            .choose(&mut self.rng)
            .unwrap()
            .clone();
        let with_body = method == Method::POST || method == Method::PUT;
        self.request(method, &q, with_body.then_some(body), Duration::from_millis(500)).await;
    }

    fn connect_packet(&mut self) -> String {
        let good = format!(r#"40{{"token":"{}"}}"#, self.token);
        match self.rng.random_range(0..10) {
            0 => "40".to_string(),
            1 => r#"40{"token":"eyJhbGciOiJIUzI1NiJ9.e30.forged"}"#.to_string(),
            2 => format!("40/admin,{}", &good[2..]),
            3 => {
                let cut = self.rng.random_range(2..good.len());
                good[..cut].to_string()
            }
            _ => good,
        }
    }

    /// A long-polling body: one to many Engine.IO packets, mutated, at times not UTF-8.
    fn polling_body(&mut self) -> Vec<u8> {
        let count =
            if self.rng.random_bool(0.05) { self.rng.random_range(100..600) } else { self.rng.random_range(1..8) };
        let mut body = String::new();
        for i in 0..count {
            if i > 0 {
                body.push('\x1e');
            }
            if self.rng.random_bool(0.85) {
                body.push('4');
                body.push_str(&self.packet());
            } else {
                body.push_str(&self.engine_control());
            }
        }
        let mut bytes = body.into_bytes();
        if bytes.len() > MAX_PAYLOAD {
            bytes.truncate(MAX_PAYLOAD);
        }
        if self.rng.random_bool(0.05) {
            self.break_utf8(&mut bytes);
        }
        bytes
    }

    fn engine_control(&mut self) -> String {
        ["2", "3", "5", "6", "1", "2probe", "3probe", "7", "", "b", "bAQID", "4", "0", "\x1e", "é"]
            .choose(&mut self.rng)
            .unwrap()
            .to_string()
    }

    /// A Socket.IO packet (what follows the Engine.IO `4`): a valid one, then mutations.
    fn packet(&mut self) -> String {
        self.n += 1;
        let ack = if self.rng.random_bool(0.85) { self.rng.random_range(0..1000).to_string() } else { String::new() };
        let room = &self.room;
        let mut p = match self.rng.random_range(0..9) {
            0 | 1 => format!(
                r#"2{ack}["message:send",{{"room_id":"{room}","client_msg_id":"f{}-{}","body":"fuzz {}"}}]"#,
                self.user_id, self.n, self.n
            ),
            2 => format!(r#"2{ack}["room:join",{{"room_id":"{room}","after_seq":0}}]"#),
            3 => format!(r#"2{ack}["room:sync",{{"room_id":"{room}","after_seq":0,"limit":500}}]"#),
            4 => format!(r#"2{ack}["room:leave",{{"room_id":"{room}"}}]"#),
            5 => format!(r#"2{ack}["typing",{{"room_id":"{room}"}}]"#),
            6 => format!(r#"51-{ack}["message:send",{{"_placeholder":true,"num":0}}]"#),
            7 => format!(r#"3{ack}[{{"ok":true}}]"#),
            _ => "1".to_string(),
        };
        // Two in five intact, so that sessions go on long enough to reach the handlers.
        let mutations = if self.rng.random_bool(0.4) { 0 } else { self.rng.random_range(1..=3) };
        for _ in 0..mutations {
            p = self.mutate(p);
        }
        p
    }

    fn mutate(&mut self, p: String) -> String {
        let at = |p: &str, rng: &mut StdRng| {
            let mut i = rng.random_range(0..=p.len());
            while !p.is_char_boundary(i) {
                i -= 1;
            }
            i
        };
        match self.rng.random_range(0..12) {
            // A bad packet type.
            0 => {
                let t = ["0", "1", "4", "7", "9", "x", "/", "é", "", "22"].choose(&mut self.rng).unwrap();
                format!("{t}{}", p.get(1..).unwrap_or(""))
            }
            // Truncated.
            1 => {
                let i = at(&p, &mut self.rng);
                p[..i].to_string()
            }
            // Huge numbers where numbers go.
            2 => {
                let big = [
                    "1e999999",
                    "18446744073709551616",
                    "-9223372036854775809",
                    "99999999999999999999999999",
                    "-0",
                    "0.5",
                    "NaN",
                ]
                .choose(&mut self.rng)
                .unwrap();
                match p.find(|c: char| c.is_ascii_digit()) {
                    Some(i) if i > 0 => {
                        let end = p[i..].find(|c: char| !c.is_ascii_digit()).map_or(p.len(), |e| i + e);
                        format!("{}{big}{}", &p[..i], &p[end..])
                    }
                    _ => p.replace("0", big),
                }
            }
            // Deep nesting as the payload.
            3 => {
                let depth = *[100, 127, 128, 129, 1000, 20_000].choose(&mut self.rng).unwrap();
                let open = if self.rng.random_bool(0.5) { "[".repeat(depth) } else { r#"{"a":"#.repeat(depth) };
                let close = if open.starts_with('[') { "]".repeat(depth) } else { "}".repeat(depth) };
                format!(r#"2["message:send",{open}1{close}]"#)
            }
            // A namespace nobody serves, or the root one spelled out.
            4 => {
                let ns = ["/admin,", "/,", "/x", "/a/b,", "/\u{1e},"].choose(&mut self.rng).unwrap();
                format!("{}{ns}{}", p.get(..1).unwrap_or(""), p.get(1..).unwrap_or(""))
            }
            // Attachment counts that lie.
            5 => {
                let n = ["0", "1", "7", "65535", "99999999999999999999", "-1", ""].choose(&mut self.rng).unwrap();
                format!("5{n}-{}", p.get(1..).unwrap_or(""))
            }
            // A byte of structure in the wrong place.
            6 => {
                let i = at(&p, &mut self.rng);
                let c = ["\"", "[", "]", "{", "}", ",", ":", "\\", "\u{0}", "é", "😀", "\u{202e}"]
                    .choose(&mut self.rng)
                    .unwrap();
                format!("{}{c}{}", &p[..i], &p[i..])
            }
            // A slice repeated.
            7 => {
                let (i, j) = (at(&p, &mut self.rng), at(&p, &mut self.rng));
                let (i, j) = (i.min(j), i.max(j));
                format!("{}{}{}", &p[..j], &p[i..j], &p[j..])
            }
            // A room that is a user's own channel, or a stranger's.
            8 => p.replace(&self.room, &format!("user:{}", self.user_id)),
            // Long strings: past the body limit, and past the body's length rule.
            9 => {
                let len = *[4001, 70_000, 200_000].choose(&mut self.rng).unwrap();
                p.replacen("fuzz", &"é".repeat(len / 2), 1)
            }
            // Ack ids that do not fit.
            10 => format!("2{}{}", "9".repeat(self.rng.random_range(19..40)), p.get(1..).unwrap_or("")),
            // Another event name, or a name that is not a string.
            _ => {
                let name = [r#""""#, "null", "1", r#""room:join""#, r#""message:new""#, r#""__proto__""#]
                    .choose(&mut self.rng)
                    .unwrap();
                p.replacen(r#""message:send""#, name, 1).replacen(r#""room:join""#, name, 1)
            }
        }
    }

    fn break_utf8(&mut self, bytes: &mut Vec<u8>) {
        let bad: &[u8] = [&[0xff][..], &[0xc3], &[0xed, 0xa0, 0x80], &[0xf4, 0x90, 0x80, 0x80], &[0xe2, 0x82]]
            .choose(&mut self.rng)
            .unwrap();
        let i = self.rng.random_range(0..=bytes.len());
        bytes.splice(i..i, bad.iter().copied());
    }

    fn random_bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.rng.random()).collect()
    }
}

/// A user who never took part registers and logs in over REST, then over WebSocket and over
/// long-polling connects, joins the fuzzed room, sends, and receives what was sent.
async fn fresh_client_works(app: &TestApp, room: &str, tag: &str) {
    let live = app.call(Method::GET, "/health/live", None, None).await;
    assert_eq!(live.status, StatusCode::OK, "live: {}", live.body);
    let ready = app.call(Method::GET, "/health/ready", None, None).await;
    assert_eq!(ready.status, StatusCode::OK, "ready: {}", ready.body);
    let name = format!("fresh_{tag}");
    app.register(&name).await;
    let login = app
        .call(Method::POST, "/api/v1/auth/login", Some(json!({"username": name, "password": "password123"})), None)
        .await;
    assert_eq!(login.status, StatusCode::OK, "login: {}", login.body);
    let token = login.body["token"].as_str().unwrap().to_string();

    let mut poller = Poller::connect(app, &token).await;
    let joined = poller.emit_with_ack(1, "room:join", json!({"room_id": room})).await;
    assert_eq!(joined["ok"], true, "polling room:join: {joined}");

    let mut ws = ws_connect(app, &token).await;
    let joined = ws_emit_with_ack(&mut ws, 1, "room:join", json!({"room_id": room})).await;
    assert_eq!(joined["ok"], true, "websocket room:join: {joined}");
    let body = format!("still serving ({tag})");
    let sent =
        ws_emit_with_ack(&mut ws, 2, "message:send", json!({"room_id": room, "client_msg_id": tag, "body": body}))
            .await;
    assert_eq!(sent["ok"], true, "message:send: {sent}");

    let got = poller.next_event("message:new", |m| m["body"] == body.as_str()).await;
    assert_eq!(got["seq"], sent["message"]["seq"], "the polling socket got the message the WebSocket one sent");
    let _ = ws.close(None).await;
    poller.close().await;
}

async fn ws_connect(app: &TestApp, token: &str) -> Ws {
    let authority = app.url.trim_start_matches("http://");
    let tcp = TcpStream::connect(authority).await.unwrap();
    let url = format!("ws://{authority}/socket.io/?EIO=4&transport=websocket");
    let (mut ws, _) = tokio_tungstenite::client_async(url.as_str(), tcp).await.expect("websocket handshake");
    let open = ws_next_text(&mut ws).await;
    assert!(open.starts_with("0{"), "open packet: {open}");
    ws.send(Message::text(format!(r#"40{{"token":"{token}"}}"#))).await.unwrap();
    let connected = ws_next_text(&mut ws).await;
    assert!(connected.starts_with("40{"), "CONNECT answered {connected}");
    ws
}

async fn ws_next_text(ws: &mut Ws) -> String {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("a frame within 10 s");
        match msg.expect("open connection").expect("frame") {
            Message::Text(t) if t.as_str() == "2" => ws.send(Message::text("3")).await.unwrap(),
            Message::Text(t) => return t.to_string(),
            _ => {}
        }
    }
}

async fn ws_emit_with_ack(ws: &mut Ws, id: u64, event: &str, data: Value) -> Value {
    ws.send(Message::text(format!("42{id}{}", json!([event, data])))).await.unwrap();
    let prefix = format!("43{id}");
    loop {
        let t = ws_next_text(ws).await;
        if let Some(rest) = t.strip_prefix(&prefix).filter(|r| r.starts_with('[')) {
            let args: Vec<Value> = serde_json::from_str(rest).unwrap();
            return args.into_iter().next().unwrap();
        }
    }
}

/// A long-polling Socket.IO client.
struct Poller {
    http: reqwest::Client,
    url: String,
    pending: Vec<String>,
}

impl Poller {
    async fn connect(app: &TestApp, token: &str) -> Self {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(40)).build().unwrap();
        let open = http.get(format!("{}/socket.io/?EIO=4&transport=polling", app.url)).send().await.unwrap();
        assert_eq!(open.status(), StatusCode::OK);
        let open = open.text().await.unwrap();
        let v: Value = serde_json::from_str(&open[1..]).unwrap();
        let url = format!("{}/socket.io/?EIO=4&transport=polling&sid={}", app.url, v["sid"].as_str().unwrap());
        let mut p = Self { http, url, pending: Vec::new() };
        p.post(&format!(r#"40{{"token":"{token}"}}"#)).await;
        let connected = p.next_packet().await;
        assert!(connected.starts_with("40{"), "CONNECT answered {connected}");
        p
    }

    async fn post(&self, body: &str) {
        let res = self.http.post(&self.url).body(body.to_string()).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{body}");
    }

    async fn next_packet(&mut self) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.pending.is_empty() {
            assert!(Instant::now() < deadline, "nothing received over polling within 30 s");
            let res = self.http.get(&self.url).send().await.unwrap();
            assert_eq!(res.status(), StatusCode::OK);
            for p in res.text().await.unwrap().split('\x1e') {
                if p == "2" {
                    self.post("3").await;
                } else {
                    self.pending.push(p.to_string());
                }
            }
        }
        self.pending.remove(0)
    }

    async fn emit_with_ack(&mut self, id: u64, event: &str, data: Value) -> Value {
        self.post(&format!("42{id}{}", json!([event, data]))).await;
        let prefix = format!("43{id}");
        loop {
            let p = self.next_packet().await;
            if let Some(rest) = p.strip_prefix(&prefix).filter(|r| r.starts_with('[')) {
                let args: Vec<Value> = serde_json::from_str(rest).unwrap();
                return args.into_iter().next().unwrap();
            }
        }
    }

    async fn next_event(&mut self, name: &str, want: impl Fn(&Value) -> bool) -> Value {
        loop {
            let p = self.next_packet().await;
            if let Some(rest) = p.strip_prefix("42") {
                let args: Vec<Value> = serde_json::from_str(rest).unwrap();
                if args[0] == name && want(&args[1]) {
                    return args[1].clone();
                }
            }
        }
    }

    async fn close(self) {
        self.post("1").await;
    }
}
