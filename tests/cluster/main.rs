//! Cluster-mode tests against real Redis and PostgreSQL processes: the write-back sync worker
//! driven batch by batch, Redis losing its data, a store outage under load, and the send script on
//! a real Redis Cluster.

#[allow(dead_code)]
#[path = "../support/mod.rs"]
mod support;

#[allow(dead_code)]
#[path = "../api/helpers.rs"]
mod helpers;

mod admin;
mod caches;
mod failover;
mod heads;
mod lanes;
mod outage;
mod persistence;
mod regions;
mod seals;
mod sync;
mod throttle;
mod tls;
mod traces;

use std::sync::Arc;
use std::time::{Duration, Instant};

use chatmesh::domain::{Timestamp, Visibility};
use chatmesh::redis_io::{Keys, Redis, RedisUrl};
use chatmesh::sequencer::Sequencer;
use chatmesh::sequencer::redis::{AckLevel, RedisSequencer, RedisSequencerConfig};
use chatmesh::store::postgres::PostgresStore;
use chatmesh::store::{NewRoom, NewUser, SendRequest, Store};
pub use support::pg::TestDatabase;

const SECRET: &str = "cluster-test-secret-0123456789abcdef";

/// The pub/sub seal of instances started with [`SECRET`].
pub fn test_seal() -> chatmesh::fanout::seal::Seal {
    chatmesh::fanout::seal::Seal::from_secret(&chatmesh::config::Secret::new(SECRET))
}

/// Spawns one cluster-mode instance of the real binary on `redis_url` and `store_url`.
pub async fn cluster_instance(
    redis_url: String,
    store_url: String,
    id: &str,
    extra: Vec<(&'static str, String)>,
) -> helpers::TestApp {
    let mut env = vec![
        ("CHATMESH_REDIS_URL", redis_url),
        ("CHATMESH_STORE_URL", store_url),
        ("CHATMESH_JWT_SECRET", SECRET.into()),
        ("CHATMESH_CLUSTER_SECRET", SECRET.into()),
        ("CHATMESH_INSTANCE_ID", id.into()),
    ];
    env.extend(extra);
    helpers::spawn_with(helpers::Spawn { env, ..Default::default() }).await
}

/// A user and a room in `store`; returns (user id, room id).
pub async fn seed(store: &dyn Store) -> (String, String) {
    let uid = ulid::Ulid::generate().to_string();
    store
        .create_user(NewUser {
            id: uid.clone(),
            username: format!("u{}", &uid[16..]).to_lowercase(),
            display_name: "u".into(),
            password_hash: "x".into(),
            created_at: Timestamp::now(),
        })
        .await
        .unwrap();
    let rid = ulid::Ulid::generate().to_string();
    store
        .create_room(NewRoom {
            id: rid.clone(),
            name: "r".into(),
            topic: String::new(),
            visibility: Visibility::Public,
            owner_id: uid.clone(),
            home_region: "local".into(),
            created_at: Timestamp::now(),
        })
        .await
        .unwrap();
    (uid, rid)
}

pub fn as_user(id: &str) -> chatmesh::domain::UserId {
    chatmesh::domain::UserId::from(id)
}

pub fn as_room(id: &str) -> chatmesh::domain::RoomId {
    chatmesh::domain::RoomId::from(id)
}

pub fn request(room: &str, sender: &str, cmid: &str) -> SendRequest {
    SendRequest {
        message_id: ulid::Ulid::generate().to_string(),
        room_id: room.into(),
        sender_id: sender.into(),
        client_msg_id: cmid.into(),
        body: format!("body {cmid}"),
        created_at: Timestamp::now(),
        trace: String::new(),
        membership: 0,
        epoch: None,
    }
}

/// The library's pieces wired to one Redis and one database, as an instance would have them.
pub struct Parts {
    pub redis: Redis,
    pub keys: Keys,
    pub store: Arc<dyn Store>,
    pub sequencer: RedisSequencer,
}

pub async fn parts(redis_url: &str, db_url: &str) -> Parts {
    parts_with(redis_url, db_url, Keys::new(&format!("t{}", ulid::Ulid::generate()), 4)).await
}

/// As [`parts`], under the given keys (several instances' parts share them).
pub async fn parts_with(redis_url: &str, db_url: &str, keys: Keys) -> Parts {
    let redis = Redis::connect(RedisUrl::Direct(redis_url.to_string())).await.unwrap();
    let store: Arc<dyn Store> = Arc::new(PostgresStore::connect(db_url).await.unwrap());
    let sequencer = RedisSequencer::start(
        redis.clone(),
        keys.clone(),
        store.clone(),
        RedisSequencerConfig {
            ack_level: AckLevel::Leader,
            wait_timeout: std::time::Duration::from_secs(1),
            dedupe_ttl: std::time::Duration::from_secs(86_400),
            backlog_limit: 1_000_000,
            seal: test_seal(),
            outbox_len: None,
            elsewhere: None,
        },
    );
    Parts { redis, keys, store, sequencer }
}

pub async fn send_n(seq: &dyn Sequencer, room: &str, sender: &str, prefix: &str, n: usize) -> Vec<i64> {
    let mut seqs = Vec::new();
    for i in 0..n {
        let out = seq.send(request(room, sender, &format!("{prefix}{i}"))).await.unwrap();
        seqs.push(out.message().seq);
    }
    seqs
}

/// Waits (20 s at most) until `/metrics` has exactly `line`; asks `/health/ready` each time so
/// the checks behind some gauges run.
pub async fn wait_metric(app: &helpers::TestApp, line: &str) {
    let started = Instant::now();
    loop {
        let _ = app.call(reqwest::Method::GET, "/health/ready", None, None).await;
        let text = app.http.get(format!("{}/metrics", app.url)).send().await.unwrap().text().await.unwrap();
        if text.lines().any(|l| l.trim() == line) {
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "metric line {line:?} never appeared");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
