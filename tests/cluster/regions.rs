//! Two regions on loopback, each with its own Redis and instance, one shared PostgreSQL
//! database, and every request between them through the delaying relay (scripts/relay.py, the
//! link the local cluster uses too), which can cut the link like a partition.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::{Spawn, TestApp, spawn_with};
use crate::support::procs::{RedisServer, free_port, spawn_tied};
use crate::{SECRET, TestDatabase};

/// The link between the regions: one route each way and a control port.
struct Link {
    child: Child,
    /// Where region a reaches b, and where b reaches a.
    to_b: String,
    to_a: String,
    control: String,
    _dir: tempfile::TempDir,
}

impl Link {
    fn start(a_port: u16, b_port: u16, delay_ms: u64) -> Self {
        Self::between(&[&format!("127.0.0.1:{b_port}"), &format!("127.0.0.1:{a_port}")], delay_ms)
    }

    /// A relay with one route per target; `to_b` and `to_a` are the first two routes' listen
    /// addresses (the same one when there is a single target).
    fn between(targets: &[&str], delay_ms: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ready = dir.path().join("ready.json");
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/relay.py");
        let mut cmd = Command::new("python3");
        cmd.arg(script);
        for target in targets {
            cmd.args(["--route", &format!("127.0.0.1:0={target}")]);
        }
        cmd.args(["--delay-ms", &delay_ms.to_string(), "--control", "127.0.0.1:0"]).arg("--ready-file").arg(&ready);
        let child = spawn_tied(cmd).expect("python3 scripts/relay.py (the regions' link) must start");
        let deadline = Instant::now() + Duration::from_secs(10);
        let v: Value = loop {
            if let Ok(text) = std::fs::read_to_string(&ready) {
                break serde_json::from_str(&text).unwrap();
            }
            assert!(Instant::now() < deadline, "scripts/relay.py did not get ready in 10 s");
            std::thread::sleep(Duration::from_millis(20));
        };
        let listen = |i: usize| v["routes"][i]["listen"].as_str().unwrap().to_string();
        let to_a = if targets.len() > 1 { listen(1) } else { listen(0) };
        Self { child, to_b: listen(0), to_a, control: v["control"].as_str().unwrap().to_string(), _dir: dir }
    }

    fn ctl(&self, command: &str) {
        let mut s = TcpStream::connect(&self.control).unwrap();
        writeln!(s, "{command}").unwrap();
        let mut answer = String::new();
        BufReader::new(s).read_line(&mut answer).unwrap();
        assert!(answer.starts_with("ok"), "relay {command}: {answer}");
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct TwoRegions {
    a: TestApp,
    b: TestApp,
    /// b's settings (what `chatmesh region takeover` runs with in b).
    env_b: Vec<(&'static str, String)>,
    a_port: u16,
    link: Link,
    db: TestDatabase,
    redis: (RedisServer, RedisServer),
}

const TIMEOUT_MS: u64 = 1_000;
/// Short home leases, so a takeover test waits seconds, not the default 10 s.
const LEASE_MS: u64 = 2_000;
const DRIFT_MS: u64 = 300;

/// `chatmesh region takeover --region a --by b` with b's settings: (exit code, stdout, stderr).
fn takeover(t: &TwoRegions) -> (Option<i32>, String, String) {
    takeover_with(&t.env_b, "a", "b")
}

/// `chatmesh region takeover --region R --by B` with the settings `env` (B's instance's).
fn takeover_with(env: &[(&'static str, String)], region: &str, by: &str) -> (Option<i32>, String, String) {
    let out = Command::new(crate::helpers::binary())
        .args(["region", "takeover", "--region", region, "--by", by])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().filter(|(k, _)| *k != "CHATMESH_BIND").map(|(k, v)| (*k, v.as_str())))
        .output()
        .expect("run chatmesh region takeover");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// Regions `a` and `b`; `extra_a` adds settings to a's instance.
async fn two_regions(extra_a: Vec<(&'static str, String)>) -> TwoRegions {
    two_regions_with(extra_a, None, vec![]).await
}

/// The host:port of the test PostgreSQL server in a database URL.
fn pg_host(url: &str) -> String {
    let after = url.split_once('@').map(|(_, r)| r).unwrap_or(url);
    after.split('/').next().unwrap_or_default().to_string()
}

/// As `two_regions`, with a's Redis replicated to `a_replica` when given (ack levels past
/// `leader` wait for a replica).
async fn two_regions_with(
    extra_a: Vec<(&'static str, String)>,
    a_replica: Option<&mut Option<RedisServer>>,
    extra_b: Vec<(&'static str, String)>,
) -> TwoRegions {
    let (redis_a, redis_b) = (RedisServer::start(), RedisServer::start());
    if let Some(slot) = a_replica {
        let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &redis_a.port().to_string()]);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !replica.cli(&["INFO", "replication"]).contains("master_link_status:up") {
            assert!(Instant::now() < deadline, "a's replica did not connect");
            std::thread::sleep(Duration::from_millis(50));
        }
        *slot = Some(replica);
    }
    let db = TestDatabase::create();
    let (a_port, b_port) = (free_port(), free_port());
    let link = Link::start(a_port, b_port, 25);
    let instance = |region: &str, port: u16, redis: &RedisServer, peer: String| {
        vec![
            ("CHATMESH_BIND", format!("127.0.0.1:{port}")),
            ("CHATMESH_REDIS_URL", redis.url()),
            ("CHATMESH_STORE_URL", db.url()),
            ("CHATMESH_JWT_SECRET", SECRET.to_string()),
            ("CHATMESH_CLUSTER_SECRET", SECRET.to_string()),
            ("CHATMESH_INSTANCE_ID", format!("{region}1")),
            ("CHATMESH_REGION", region.to_string()),
            ("CHATMESH_PEER_REGIONS", peer),
            ("CHATMESH_REGION_TIMEOUT_MS", TIMEOUT_MS.to_string()),
            ("CHATMESH_ACK_LEVEL", "leader".to_string()),
            ("CHATMESH_HOME_LEASE_MS", LEASE_MS.to_string()),
            ("CHATMESH_LEASE_DRIFT_MS", DRIFT_MS.to_string()),
        ]
    };
    let mut env_a = instance("a", a_port, &redis_a, format!("b=http://{}", link.to_b));
    env_a.extend(extra_a);
    let mut env_b = instance("b", b_port, &redis_b, format!("a=http://{}", link.to_a));
    env_b.extend(extra_b);
    let a = spawn_with(Spawn { env: env_a, ..Default::default() }).await;
    let b = spawn_with(Spawn { env: env_b.clone(), ..Default::default() }).await;
    TwoRegions { a, b, env_b, a_port, link, db, redis: (redis_a, redis_b) }
}

/// Replaces a's instance by one whose store is reached through `store_link` (which can cut a off
/// from the store alone), with b's other settings; answers it and its settings.
async fn a_behind(t: &mut TwoRegions, store_link: &Link, db_host: &str) -> (TestApp, Vec<(&'static str, String)>) {
    let a_url = t.db.url().replacen(db_host, &store_link.to_b, 1);
    t.a.signal("KILL");
    t.a.wait_exit(Duration::from_secs(5));
    let mut env: Vec<(&'static str, String)> = vec![];
    for (k, v) in t.env_b.clone() {
        let v = match k {
            "CHATMESH_BIND" => format!("127.0.0.1:{}", t.a_port),
            "CHATMESH_REDIS_URL" => t.redis.0.url(),
            "CHATMESH_STORE_URL" => a_url.clone(),
            "CHATMESH_INSTANCE_ID" => "a1".to_string(),
            "CHATMESH_REGION" => "a".to_string(),
            "CHATMESH_PEER_REGIONS" => format!("b=http://{}", t.link.to_b),
            "CHATMESH_TAKEOVER_AFTER_MS" => continue,
            _ => v,
        };
        env.push((k, v));
    }
    (spawn_with(Spawn { env: env.clone(), ..Default::default() }).await, env)
}

/// Sends into the room at `app` every 50 ms from the moment a was cut off until one is refused
/// (self-fencing): how many were acknowledged, and when the first was refused.
async fn until_refused(app: &TestApp, token: &str, room: &str, cut: Instant) -> (usize, Duration) {
    let mut acked = 0;
    loop {
        // A request that needs the store (an expired cache entry) waits for it: not an answer.
        let cmid = format!("c{}", cut.elapsed().as_millis());
        let Ok(r) = tokio::time::timeout(Duration::from_secs(1), app.send(token, room, &cmid, "x")).await else {
            assert!(cut.elapsed() < Duration::from_secs(5), "a's sends hang");
            continue;
        };
        let at = cut.elapsed();
        if r.status == StatusCode::CREATED {
            assert!(at < Duration::from_millis(LEASE_MS - DRIFT_MS), "acknowledged {at:?} after the cut");
            acked += 1;
        } else {
            assert_eq!(r.code(), "unavailable", "{:?}", r.body);
            assert!(r.body["error"]["message"].as_str().unwrap_or_default().contains("lease"), "{:?}", r.body);
            return (acked, at);
        }
        assert!(at < Duration::from_secs(5), "a kept deciding its rooms without its lease");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends until `app` acknowledges (`what` within `within`); answers the acknowledged message.
async fn until_acked(app: &TestApp, token: &str, room: &str, cmid: &str, within: Duration, what: &str) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let r = app.send(token, room, cmid, "x").await;
        if r.status == StatusCode::CREATED {
            return r.body;
        }
        assert_eq!(r.code(), "unavailable", "{what}: {:?}", r.body);
        assert!(Instant::now() < deadline, "{what}: never acknowledged: {:?}", r.body);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn join(app: &TestApp, token: &str, room: &str) {
    let r = app.call(Method::POST, &format!("/api/v1/rooms/{room}/join"), None, Some(token)).await;
    assert_eq!(r.status, StatusCode::OK, "join {room}: {:?}", r.body);
}

/// The room's seqs as `app` serves its history (pages of 500 from the start).
async fn seqs(app: &TestApp, token: &str, room: &str) -> Vec<i64> {
    let mut out = Vec::new();
    loop {
        let after = out.last().copied().unwrap_or(0);
        let r = app
            .call(Method::GET, &format!("/api/v1/rooms/{room}/messages?after_seq={after}&limit=500"), None, Some(token))
            .await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
        let page: Vec<i64> =
            r.body["messages"].as_array().unwrap().iter().map(|m| m["seq"].as_i64().unwrap()).collect();
        if page.is_empty() {
            return out;
        }
        out.extend(page);
    }
}

/// Polls until `app` serves exactly 1..=n for the room.
async fn until_history(app: &TestApp, token: &str, room: &str, n: i64, what: &str) {
    let want: Vec<i64> = (1..=n).collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = seqs(app, token, room).await;
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: history is {got:?}, want 1..={n}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn home(r: &Value) -> &str {
    r["home_region"].as_str().unwrap_or_default()
}

/// Senders in both regions write into a room homed in a and one homed in b at once: one gap-free
/// order per room, the same history from both regions, and (once written back) exactly N rows
/// per room in the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_order_per_room_across_regions() {
    let t = two_regions(vec![]).await;
    let (_, alice) = t.a.register("alice").await;
    let (_, bob) = t.b.register("bob").await;
    let room_a = t.a.create_room(&alice, "home-a", "public").await;
    let room_b = t.b.create_room(&bob, "home-b", "public").await;
    let r = t.b.call(Method::GET, &format!("/api/v1/rooms/{room_a}"), None, Some(&bob)).await;
    assert_eq!(home(&r.body), "a", "{:?}", r.body);
    let r = t.a.call(Method::GET, &format!("/api/v1/rooms/{room_b}"), None, Some(&alice)).await;
    assert_eq!(home(&r.body), "b", "{:?}", r.body);
    // Joins answered by the other region are decided by the home.
    join(&t.b, &bob, &room_a).await;
    join(&t.a, &alice, &room_b).await;

    const PER_SENDER: usize = 60;
    let mut tasks = Vec::new();
    for (region, app, token) in [("a", &t.a, &alice), ("b", &t.b, &bob)] {
        for room in [&room_a, &room_b] {
            let (url, token, room) = (app.url.clone(), token.clone(), room.clone());
            tasks.push(tokio::spawn(async move {
                let http = reqwest::Client::new();
                let mut seqs = Vec::new();
                for i in 0..PER_SENDER {
                    let r = http
                        .post(format!("{url}/api/v1/rooms/{room}/messages"))
                        .bearer_auth(&token)
                        .json(&json!({"client_msg_id": format!("{region}-{i}"), "body": format!("{region} {i}")}))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status(), StatusCode::CREATED, "send {i} from {region}");
                    let v: Value = r.json().await.unwrap();
                    seqs.push(v["seq"].as_i64().unwrap());
                }
                seqs
            }));
        }
    }
    for task in tasks {
        let seqs = task.await.unwrap();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "one sender's seqs out of order: {seqs:?}");
    }
    let n = (2 * PER_SENDER) as i64;
    for room in [&room_a, &room_b] {
        until_history(&t.a, &alice, room, n, "region a").await;
        until_history(&t.b, &bob, room, n, "region b").await;
    }
    // What the regions did shows in their metrics: b forwarded sends and joins to a, pulled a's
    // outboxes and knows how far behind it is.
    let metrics = t.b.http.get(format!("{}/metrics", t.b.url)).send().await.unwrap().text().await.unwrap();
    for needle in [
        r#"chatmesh_region_forwarded_total{peer="a",op="send",outcome="ok"}"#,
        r#"chatmesh_region_forwarded_total{peer="a",op="join",outcome="ok"}"#,
        r#"chatmesh_region_forward_latency_seconds_count{peer="a",op="send"}"#,
        r#"chatmesh_replication_applied_total{peer="a",kind="message"}"#,
        r#"chatmesh_replication_lag_seconds{peer_region="a"}"#,
    ] {
        assert!(metrics.contains(needle), "b's /metrics has no {needle}");
    }
    // Only each room's home writes its messages to the store: exactly N rows, none twice.
    let deadline = Instant::now() + Duration::from_secs(20);
    for room in [&room_a, &room_b] {
        loop {
            let rows = t.db.psql(&format!(
                "SELECT count(*), count(DISTINCT seq), coalesce(max(seq), 0) FROM messages WHERE room_id = '{room}'"
            ));
            if rows.trim() == format!("{n}|{n}|{n}") {
                break;
            }
            assert!(Instant::now() < deadline, "store rows for {room}: {rows}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A client_msg_id first sent in one region and retried in the other is one message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_in_the_other_region_is_the_same_message() {
    let t = two_regions(vec![]).await;
    let (_, alice) = t.a.register("alice").await;
    let room_a = t.a.create_room(&alice, "home-a", "public").await;
    let room_b = t.b.create_room(&alice, "home-b", "public").await;
    for (room, first, retry) in
        [(&room_a, &t.a, &t.b), (&room_a, &t.b, &t.a), (&room_b, &t.a, &t.b), (&room_b, &t.b, &t.a)]
    {
        let cmid = ulid::Ulid::generate().to_string();
        let r1 = first.send(&alice, room, &cmid, "once").await;
        assert_eq!(r1.status, StatusCode::CREATED, "{:?}", r1.body);
        let r2 = retry.send(&alice, room, &cmid, "once").await;
        assert!(r2.status.is_success(), "{:?}", r2.body);
        assert_eq!(r2.status, StatusCode::OK, "a retry must not create: {:?}", r2.body);
        assert_eq!((r1.body["id"].clone(), r1.body["seq"].clone()), (r2.body["id"].clone(), r2.body["seq"].clone()));
        let r3 = retry.send(&alice, room, &cmid, "a different body").await;
        assert_eq!(r3.code(), "conflict", "{:?}", r3.body);
    }
}

/// A leave answered in b for a room homed in a stops the user's sends in both regions at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leave_in_the_other_region_stops_sends_everywhere() {
    let t = two_regions(vec![]).await;
    let (_, alice) = t.a.register("alice").await;
    let (_, bob) = t.b.register("bob").await;
    let room = t.a.create_room(&alice, "home-a", "public").await;
    join(&t.b, &bob, &room).await;
    for (i, app) in [&t.a, &t.b].into_iter().enumerate() {
        let r = app.send(&bob, &room, &format!("before-{i}"), "hi").await;
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    }
    let r = t.b.call(Method::POST, &format!("/api/v1/rooms/{room}/leave"), None, Some(&bob)).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{:?}", r.body);
    for (i, app) in [&t.a, &t.b].into_iter().enumerate() {
        let r = app.send(&bob, &room, &format!("after-{i}"), "hi").await;
        assert_eq!(r.code(), "forbidden", "send {i} after the leave: {:?}", r.body);
    }
}

/// The link is cut: sends to the room homed across it answer `unavailable` within the bound,
/// the locally homed room keeps working, and after the heal the other region catches up. Region
/// a writes nothing back to the store, so b can only serve a's room from what it replicated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_link_refuses_remote_rooms_in_time_and_catches_up_after() {
    let t = two_regions(vec![("CHATMESH_SYNC_WORKER", "false".to_string())]).await;
    let (_, alice) = t.a.register("alice").await;
    let room_a = t.a.create_room(&alice, "home-a", "public").await;
    let room_b = t.b.create_room(&alice, "home-b", "public").await;
    for i in 0..3 {
        assert_eq!(t.a.send(&alice, &room_a, &format!("pre-{i}"), "x").await.status, StatusCode::CREATED);
    }
    until_history(&t.b, &alice, &room_a, 3, "b before the cut").await;

    t.link.ctl("cut");
    let started = Instant::now();
    let r = t.b.send(&alice, &room_a, "during-b", "x").await;
    let took = started.elapsed();
    assert_eq!(r.code(), "unavailable", "{:?}", r.body);
    assert!(
        took < Duration::from_millis(TIMEOUT_MS + 500),
        "the refusal took {took:?}, over the {TIMEOUT_MS} ms bound"
    );
    let r = t.a.call(Method::POST, &format!("/api/v1/rooms/{room_b}/join"), None, Some(&alice)).await;
    assert_eq!(r.code(), "unavailable", "a join across the cut: {:?}", r.body);
    // Rooms homed on each side keep working, and reads of the other side's rooms are served.
    for i in 0..5 {
        let r = t.a.send(&alice, &room_a, &format!("during-a-{i}"), "x").await;
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
        let r = t.b.send(&alice, &room_b, &format!("during-b-{i}"), "x").await;
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    }
    // Reads outside the home ask it for the head; cut off, they answer from the replica within
    // the bound (and skip asking for a while after).
    let started = Instant::now();
    assert_eq!(seqs(&t.b, &alice, &room_a).await, vec![1, 2, 3], "b's reads of a's room during the cut");
    let r = t.b.call(Method::GET, &format!("/api/v1/rooms/{room_a}"), None, Some(&alice)).await;
    assert_eq!((r.status, r.body["head_seq"].as_i64()), (StatusCode::OK, Some(3)), "{:?}", r.body);
    let took = started.elapsed();
    assert!(took < Duration::from_millis(TIMEOUT_MS + 500), "b's reads across the cut took {took:?}");
    t.link.ctl("heal");
    until_history(&t.b, &alice, &room_a, 8, "b after the heal").await;
    until_history(&t.a, &alice, &room_b, 5, "a after the heal").await;
    let r = t.b.send(&alice, &room_a, "after-b", "x").await;
    assert_eq!((r.status, r.body["seq"].as_i64()), (StatusCode::CREATED, Some(9)), "{:?}", r.body);
}

/// A message the home lost for good (dead-lettered: in neither its store nor its recent history,
/// and the outbox that carried it trimmed) does not stall the room in the other region: it moves
/// past the hole, as the home's own readers do, and takes what follows into its recent history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hole_in_the_homes_history_does_not_stall_the_room_elsewhere() {
    let t = two_regions(vec![]).await;
    let keys = chatmesh::redis_io::Keys::new("cm", 64);
    let (_, alice) = t.a.register("alice").await;
    let room = t.a.create_room(&alice, "holey", "public").await;
    for i in 1..=2 {
        assert_eq!(t.a.send(&alice, &room, &format!("m{i}"), "x").await.status, StatusCode::CREATED);
    }
    until_history(&t.b, &alice, &room, 2, "b before the cut").await;
    let replicated = |redis: &RedisServer| -> Vec<String> {
        redis
            .cli(&["XRANGE", &keys.history(&room), "-", "+"])
            .lines()
            .filter(|l| l.ends_with("-0"))
            .map(|l| l.trim_end_matches("-0").to_string())
            .collect()
    };
    assert_eq!(replicated(&t.redis.1), ["1", "2"], "b's recent history of the room before the cut");

    t.link.ctl("cut");
    let cut = Instant::now();
    for i in 3..=6 {
        assert_eq!(t.a.send(&alice, &room, &format!("m{i}"), "x").await.status, StatusCode::CREATED);
    }
    let rows = format!("SELECT count(*) FROM messages WHERE room_id = '{room}'");
    let deadline = Instant::now() + Duration::from_secs(20);
    while t.db.psql(&rows).trim() != "6" {
        assert!(Instant::now() < deadline, "a wrote back {} of 6 messages", t.db.psql(&rows).trim());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    t.db.psql(&format!("DELETE FROM messages WHERE room_id = '{room}' AND seq = 4"));
    t.redis.0.cli(&["XDEL", &keys.history(&room), "4-0"]);
    for shard in 0..64 {
        t.redis.0.cli(&["DEL", &keys.outbox(shard)]);
    }
    // Long enough a cut for b to give up the outbox stream it had (idle 5 s): after the heal it
    // reads the outboxes again from its cursor, and finds 3..6 gone from them.
    tokio::time::sleep(Duration::from_secs(7).saturating_sub(cut.elapsed())).await;
    t.link.ctl("heal");
    assert_eq!(t.a.send(&alice, &room, "m7", "x").await.status, StatusCode::CREATED);

    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = replicated(&t.redis.1);
        if got == ["1", "2", "3", "5", "6", "7"] {
            break;
        }
        assert!(Instant::now() < deadline, "b's recent history of the room after the heal: {got:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let text = t.b.http.get(format!("{}/metrics", t.b.url)).send().await.unwrap().text().await.unwrap();
    assert!(
        text.lines().any(|l| l.starts_with("chatmesh_replication_errors_total") && l.contains("reason=\"hole\"")),
        "the hole is counted on b"
    );
}

/// Region a is lost (its instance and its Redis killed): sends to its rooms answer `unavailable`
/// in b; a takeover is refused while a's lease is live, then b takes the rooms over once it
/// expired (plus the drift margin), continues each room from the highest seq it holds (never
/// reusing one), and a's rooms work through b.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_region_is_taken_over_from_what_the_other_holds() {
    let mut t = two_regions(vec![]).await;
    let (_, alice) = t.a.register("alice").await;
    let room = t.a.create_room(&alice, "home-a", "public").await;
    for i in 1..=3 {
        assert_eq!(t.a.send(&alice, &room, &format!("m{i}"), "x").await.status, StatusCode::CREATED);
    }
    until_history(&t.b, &alice, &room, 3, "b before the loss").await;
    let (code, _, err) = takeover(&t);
    assert_eq!(code, Some(1), "a takeover while a renews its lease must fail: {err}");
    assert!(err.contains("is live"), "{err}");

    t.a.signal("KILL");
    t.a.wait_exit(Duration::from_secs(5));
    t.redis.0.kill();
    let r = t.b.send(&alice, &room, "while-lost", "x").await;
    assert_eq!(r.code(), "unavailable", "a send to a lost region's room: {:?}", r.body);

    // The lease lapses LEASE_MS after a's last renewal; the takeover may run DRIFT_MS later.
    let started = Instant::now();
    let report: Value = loop {
        let (code, out, err) = takeover(&t);
        if code == Some(0) {
            break serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("report {out:?}: {e}"));
        }
        assert!(err.contains("is live"), "takeover failed for another reason: {err}");
        assert!(started.elapsed() < Duration::from_secs(10), "the lease never lapsed: {err}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!((report["token"].as_i64(), report["previous_token"].as_i64()), (Some(2), Some(1)), "{report}");
    let fence = report["fences"].as_array().unwrap().iter().find(|f| f["room_id"] == room.as_str()).cloned();
    assert_eq!(fence.map(|f| f["from_seq"].clone()), Some(json!(4)), "{report}");

    // b decides a's rooms once its instance read the lease (every quarter of the lease time).
    let deadline = Instant::now() + Duration::from_secs(5);
    let sent = loop {
        let r = t.b.send(&alice, &room, "after-takeover", "x").await;
        if r.status == StatusCode::CREATED {
            break r;
        }
        assert_eq!(r.code(), "unavailable", "{:?}", r.body);
        assert!(Instant::now() < deadline, "b never decided a's room: {:?}", r.body);
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(sent.body["seq"].as_i64(), Some(4), "the next seq after what b held: {:?}", sent.body);
    // A retry of a message a sequenced (its answer lost with a) is that message, not a new one.
    let retry = t.b.send(&alice, &room, "m3", "x").await;
    assert_eq!((retry.status, retry.body["seq"].as_i64()), (StatusCode::OK, Some(3)), "{:?}", retry.body);
    until_history(&t.b, &alice, &room, 4, "b after the takeover").await;
    // Run again, the takeover is the same one (idempotent: same token, same fence).
    let (code, out, err) = takeover(&t);
    assert_eq!(code, Some(0), "{err}");
    let again: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!((again["token"].clone(), again["already_done"].clone()), (json!(2), json!(true)), "{again}");
    let metrics = t.b.http.get(format!("{}/metrics", t.b.url)).send().await.unwrap().text().await.unwrap();
    assert!(
        metrics.lines().any(|l| l.starts_with("chatmesh_lease_token{") && l.contains("home:a") && l.ends_with(" 2")),
        "b's /metrics shows it holds home:a under token 2"
    );
}

/// Region a cut off from the store cannot renew its home lease: it keeps acknowledging its rooms'
/// sends only while its last renewal is within the lease time minus the drift margin, then
/// answers `unavailable` — before the lease expires, so b can take over without two regions ever
/// deciding at once. After the takeover and the heal, a forwards its room to b.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_cut_from_the_store_stops_deciding_before_its_lease_expires() {
    let db_host = pg_host(&crate::support::pg::admin_url());
    let store_link = Link::between(&[&db_host], 0);
    let mut t = two_regions(vec![]).await;
    let (_, alice) = t.b.register("alice").await;
    let (a, _) = a_behind(&mut t, &store_link, &db_host).await;
    let room = a.create_room(&alice, "home-a", "public").await;
    assert_eq!(a.send(&alice, &room, "m1", "x").await.status, StatusCode::CREATED);

    store_link.ctl("cut");
    let (acked_after_cut, refused_at) = until_refused(&a, &alice, &room, Instant::now()).await;
    assert!(acked_after_cut > 0, "sends need no store: some must be acknowledged right after the cut");
    assert!(refused_at < Duration::from_millis(LEASE_MS - DRIFT_MS + 100), "refused only {refused_at:?} after the cut");
    // From then on a never acknowledges, until it knows who decides.
    for i in 0..5 {
        if let Ok(r) =
            tokio::time::timeout(Duration::from_secs(1), a.send(&alice, &room, &format!("never-{i}"), "x")).await
        {
            assert_eq!(r.code(), "unavailable", "{:?}", r.body);
        }
    }

    let started = Instant::now();
    loop {
        let (code, _, err) = takeover(&t);
        if code == Some(0) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "the takeover never succeeded: {err}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    store_link.ctl("heal");
    // a learns the lease moved to b and forwards its room there; the seq goes on after every
    // message a acknowledged.
    let head = 1 + acked_after_cut;
    let deadline = Instant::now() + Duration::from_secs(10);
    let sent = loop {
        let r = a.send(&alice, &room, "after-heal", "x").await;
        if r.status == StatusCode::CREATED {
            break r;
        }
        assert!(Instant::now() < deadline, "a never forwarded its room to b: {:?}", r.body);
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(sent.body["seq"].as_i64(), Some(head as i64 + 1), "{:?}", sent.body);
    until_history(&t.b, &alice, &room, head as i64 + 1, "b after the takeover").await;
}

/// Region a isolated (cut from b and from the store at once) while its clients keep sending: it
/// acknowledges only within its lease minus the margin; b takes a's rooms over by itself
/// (`CHATMESH_TAKEOVER_AFTER_MS`) and continues after what it held. When the links heal, what a
/// sequenced that b never had is refused everywhere: by the store (a's write-back carries its
/// epoch) and by b (a's outbox entries too), each counted; the store holds b's messages at those
/// seqs. a steps down and forwards to b; then a takes its rooms back (`region takeover --region a
/// --by a`: b lets the lease lapse, a waits until it caught up) and continues after b's last.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_region_is_fenced_taken_over_automatically_and_given_back() {
    let db_host = pg_host(&crate::support::pg::admin_url());
    let store_link = Link::between(&[&db_host], 0);
    let mut t = two_regions_with(vec![], None, vec![("CHATMESH_TAKEOVER_AFTER_MS", LEASE_MS.to_string())]).await;
    let (_, alice) = t.b.register("alice").await;
    let (a, env_a) = a_behind(&mut t, &store_link, &db_host).await;
    let room = a.create_room(&alice, "home-a", "public").await;
    assert_eq!(a.send(&alice, &room, "m1", "x").await.status, StatusCode::CREATED);
    crate::wait_metric(&t.b, r#"chatmesh_replication_applied_total{peer="a",kind="message"} 1"#).await;

    // The link goes first: what a acknowledges now and writes back before the store goes too is
    // kept (b never had it, but the store does).
    t.link.ctl("cut");
    for cmid in ["pre-1", "pre-2"] {
        assert_eq!(a.send(&alice, &room, cmid, "x").await.status, StatusCode::CREATED);
    }
    let stored = || {
        t.db.psql(&format!(
            "SELECT string_agg(seq || ':' || client_msg_id, ',' ORDER BY seq) FROM messages WHERE room_id = '{room}'"
        ))
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while stored().trim() != "1:m1,2:pre-1,3:pre-2" {
        assert!(Instant::now() < deadline, "a's write-back: {:?}", stored());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    store_link.ctl("cut");
    let cut = Instant::now();
    let (stale, _) = until_refused(&a, &alice, &room, cut).await;
    assert!(stale > 0, "a acknowledges (ack level leader) until its lease is too old");

    let b1 = until_acked(&t.b, &alice, &room, "b-1", Duration::from_secs(15), "b after the automatic takeover").await;
    let taken_after = cut.elapsed();
    assert_eq!(b1["seq"].as_i64(), Some(4), "b continues after what the store holds: {b1}");
    assert!(
        taken_after >= Duration::from_millis(LEASE_MS + DRIFT_MS),
        "b decided a's rooms {taken_after:?} after the cut, before a's lease could have expired"
    );
    assert_eq!(t.b.send(&alice, &room, "b-2", "x").await.body["seq"].as_i64(), Some(5));
    crate::wait_metric(&t.b, r#"chatmesh_takeovers_total{home="a",how="auto"} 1"#).await;
    // A retry of what a wrote back before the fence is that message.
    let retry = t.b.send(&alice, &room, "pre-2", "x").await;
    assert_eq!((retry.status, retry.body["seq"].as_i64()), (StatusCode::OK, Some(3)), "{:?}", retry.body);

    t.link.ctl("heal");
    store_link.ctl("heal");
    let stale_line = |by: &str| format!(r#"chatmesh_fenced_refused_total{{by="{by}"}} {stale}"#);
    crate::wait_metric(&a, &stale_line("store")).await;
    crate::wait_metric(&t.b, &stale_line("peer")).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while stored().trim() != "1:m1,2:pre-1,3:pre-2,4:b-1,5:b-2" {
        assert!(Instant::now() < deadline, "the store holds {:?}, want b's messages at 4 and 5", stored());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // a learnt b decides its rooms now: it forwards them there.
    let fwd = until_acked(&a, &alice, &room, "a-fwd", Duration::from_secs(10), "a after the heal").await;
    assert_eq!(fwd["seq"].as_i64(), Some(6), "{fwd}");

    // Give back.
    let (code, out, err) = takeover_with(&env_a, "a", "a");
    if code != Some(0) {
        for l in
            a.logs.lock().unwrap().iter().filter(|l| l.contains("repl") || l.contains("lease") || l.contains("peer"))
        {
            eprintln!("A: {l}");
        }
        for l in t.b.logs.lock().unwrap().iter().filter(|l| !l.contains("\"DEBUG\"")) {
            eprintln!("B: {l}");
        }
    }
    assert_eq!(code, Some(0), "give back: {err}");
    let report: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("report {out:?}: {e}"));
    assert_eq!((report["token"].as_i64(), report["previous_token"].as_i64()), (Some(3), Some(2)), "{report}");
    let back = until_acked(&a, &alice, &room, "a-back", Duration::from_secs(5), "a after the give-back").await;
    assert_eq!(back["seq"].as_i64(), Some(7), "{back}");
    // a decides and serves its room from its own copy again: b's messages, not its stale ones.
    let r =
        a.call(Method::GET, &format!("/api/v1/rooms/{room}/messages?after_seq=0&limit=50"), None, Some(&alice)).await;
    let cmids: Vec<&str> =
        r.body["messages"].as_array().unwrap().iter().map(|m| m["client_msg_id"].as_str().unwrap()).collect();
    assert_eq!(cmids, ["m1", "pre-1", "pre-2", "b-1", "b-2", "a-fwd", "a-back"], "{:?}", r.body);
    until_history(&t.b, &alice, &room, 7, "b after the give-back").await;
}

/// Each region pulls each peer with exactly one instance: the singleton job lease
/// `repl:<region>:<peer>` in the store. With two instances in b, one holds it and pulls (it alone
/// reports the lag); when it dies the other takes the lease over once it lapsed and goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_instance_per_region_pulls_each_peer() {
    let mut t = two_regions(vec![]).await;
    let mut env = t.env_b.clone();
    for (k, v) in env.iter_mut() {
        match *k {
            "CHATMESH_BIND" => *v = format!("127.0.0.1:{}", free_port()),
            "CHATMESH_INSTANCE_ID" => *v = "b2".to_string(),
            _ => {}
        }
    }
    let mut b2 = spawn_with(Spawn { env, ..Default::default() }).await;
    let (_, alice) = t.a.register("alice").await;
    let room = t.a.create_room(&alice, "home-a", "public").await;
    assert_eq!(t.a.send(&alice, &room, "m1", "x").await.status, StatusCode::CREATED);
    let holder = || t.db.psql("SELECT holder FROM leases WHERE name = 'repl:b:a'").trim().to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !["b1", "b2"].contains(&holder().as_str()) {
        assert!(Instant::now() < deadline, "nobody in b holds repl:b:a: {:?}", holder());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let first = holder();
    let (puller, other) = if first == "b1" { (&t.b, &b2) } else { (&b2, &t.b) };
    crate::wait_metric(puller, r#"chatmesh_replication_applied_total{peer="a",kind="message"} 1"#).await;
    let lag = |app: &TestApp| {
        let app = app.http.get(format!("{}/metrics", app.url));
        async move { app.send().await.unwrap().text().await.unwrap().contains("chatmesh_replication_lag_seconds{") }
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while !lag(puller).await {
        assert!(Instant::now() < deadline, "the holder pulls and reports the lag (every second)");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!lag(other).await, "the other instance does not pull");

    if first == "b1" {
        t.b.signal("KILL");
        t.b.wait_exit(Duration::from_secs(5));
    } else {
        b2.signal("KILL");
        b2.wait_exit(Duration::from_secs(5));
    }
    let survivor = if first == "b1" { &b2 } else { &t.b };
    assert_eq!(t.a.send(&alice, &room, "m2", "x").await.status, StatusCode::CREATED);
    crate::wait_metric(survivor, r#"chatmesh_replication_applied_total{peer="a",kind="message"} 1"#).await;
    let next = holder();
    assert!(next != first && ["b1", "b2"].contains(&next.as_str()), "the lease moved from {first} to {next}");
}

/// Ack level `region`: a send is acknowledged only once the other region holds it, so with the
/// link cut the home itself answers `unavailable`; after the heal the retry is the original.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_level_region_needs_the_other_region() {
    let mut replica = None;
    let t = two_regions_with(
        vec![("CHATMESH_ACK_LEVEL", "region".to_string()), ("CHATMESH_SYNC_WORKER", "false".to_string())],
        Some(&mut replica),
        vec![],
    )
    .await;
    let (_, alice) = t.a.register("alice").await;
    let room = t.a.create_room(&alice, "home-a", "public").await;
    let r = t.a.send(&alice, &room, "c1", "x").await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    // Held by b before the ack: b serves it with the link cut and nothing written back by a.
    t.link.ctl("cut");
    let r = t.b.call(Method::GET, &format!("/api/v1/rooms/{room}/messages?after_seq=0"), None, Some(&alice)).await;
    assert_eq!(r.body["messages"][0]["seq"], 1, "{:?}", r.body);
    let r = t.a.send(&alice, &room, "c2", "x").await;
    assert_eq!(r.code(), "unavailable", "acked with no other region holding it: {:?}", r.body);
    t.link.ctl("heal");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = t.a.send(&alice, &room, "c2", "x").await;
        if r.status.is_success() {
            assert_eq!(r.body["seq"], 2, "{:?}", r.body);
            break;
        }
        assert!(Instant::now() < deadline, "no ack after the heal: {:?}", r.body);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Profile and room renames in both regions while the link is cut: after the heal every
/// instance (through its caches) and the store show the values the per-field last-writer-wins
/// rule picks — the later change — whichever region made it and whatever order they arrive in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renames_on_both_sides_of_a_cut_converge_on_the_last_writer() {
    let t = two_regions(vec![]).await;
    let (alice_id, alice) = t.a.register("alice").await;
    let room = t.a.create_room(&alice, "original", "public").await;
    // Fill both regions' caches with the original values.
    for app in [&t.a, &t.b] {
        let r = app.call(Method::GET, &format!("/api/v1/rooms/{room}"), None, Some(&alice)).await;
        assert_eq!(r.body["name"], "original");
        let r = app.call(Method::GET, &format!("/api/v1/users/{alice_id}"), None, Some(&alice)).await;
        assert_eq!(r.body["display_name"], "alice");
    }
    t.link.ctl("cut");
    let rename = |app: &TestApp, name: &'static str| {
        let (app_url, token, room) = (app.url.clone(), alice.clone(), room.clone());
        async move {
            let r = reqwest::Client::new()
                .patch(format!("{app_url}/api/v1/rooms/{room}"))
                .bearer_auth(token)
                .json(&json!({"name": name}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::OK, "rename to {name}");
        }
    };
    let profile = |app: &TestApp, display: &'static str| {
        let (app_url, token) = (app.url.clone(), alice.clone());
        async move {
            let r = reqwest::Client::new()
                .patch(format!("{app_url}/api/v1/users/me"))
                .bearer_auth(token)
                .json(&json!({"display_name": display}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::OK, "display name {display}");
        }
    };
    // The room: a first, then b (b's is the later version). The profile: b first, then a. Each
    // region reads its own change back (its caches hold it) before the other region's lands in
    // the store: only the other's change reaching it (after the heal) can correct them.
    rename(&t.a, "from a").await;
    profile(&t.b, "from b").await;
    let r = t.a.call(Method::GET, &format!("/api/v1/rooms/{room}"), None, Some(&alice)).await;
    assert_eq!(r.body["name"], "from a");
    let u = t.b.call(Method::GET, &format!("/api/v1/users/{alice_id}"), None, Some(&alice)).await;
    assert_eq!(u.body["display_name"], "from b");
    tokio::time::sleep(Duration::from_millis(20)).await;
    rename(&t.b, "from b").await;
    profile(&t.a, "from a").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // (Room objects are answered from the store; users through the caches.)
    let u = t.b.call(Method::GET, &format!("/api/v1/users/{alice_id}"), None, Some(&alice)).await;
    assert_eq!(u.body["display_name"], "from b", "b's cache, with the link cut, still has its own change");
    t.link.ctl("heal");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let mut seen = Vec::new();
        for app in [&t.a, &t.b] {
            let r = app.call(Method::GET, &format!("/api/v1/rooms/{room}"), None, Some(&alice)).await;
            let u = app.call(Method::GET, &format!("/api/v1/users/{alice_id}"), None, Some(&alice)).await;
            seen.push((r.body["name"].clone(), u.body["display_name"].clone()));
        }
        let stored = t.db.psql(&format!(
            "SELECT r.name || '|' || u.display_name FROM rooms r, users u WHERE r.id = '{room}' AND u.id = '{alice_id}'"
        ));
        let want = (json!("from b"), json!("from a"));
        if seen.iter().all(|s| *s == want) && stored.trim() == "from b|from a" {
            break;
        }
        assert!(Instant::now() < deadline, "not converged: instances {seen:?}, store {stored}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
