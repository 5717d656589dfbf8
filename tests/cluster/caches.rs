use std::sync::Arc;
use std::time::{Duration, Instant};

use chatmesh::auth::Tokens;
use chatmesh::cache::{Caches, RedisSharedCache};
use chatmesh::config::Secret;
use chatmesh::domain::{ClientMsgId, MessageBody, RoomId, UserId};
use chatmesh::error::ApiError;
use chatmesh::fanout::local::LocalFanout;
use chatmesh::history::RedisHistory;
use chatmesh::redis_io::{Keys, Redis, RedisUrl};
use chatmesh::revocation::RedisRevocations;
use chatmesh::service::{Backends, ChatService, Limits};
use chatmesh::store::Store;
use chatmesh::throttle::{Budgets, LocalThrottle};
use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::support::procs::RedisServer;
use crate::{TestDatabase, cluster_instance};

/// Changes on one instance evict the other instances' caches within a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_on_one_instance_are_seen_on_another_within_a_second() {
    let redis = RedisServer::start();
    let db = TestDatabase::create();
    let n1 = cluster_instance(redis.url(), db.url(), "c1", vec![]).await;
    let n2 = cluster_instance(redis.url(), db.url(), "c2", vec![]).await;
    let (alice_id, alice) = n1.register("alice").await;
    let (_, bob) = n1.register("bob").await;
    let room = n1.create_room(&alice, "cached", "public").await;
    n2.call(Method::POST, &format!("/api/v1/rooms/{room}/join"), None, Some(&bob)).await;

    // Warm n2's caches: the user, and bob's membership (a send checks it).
    let r = n2.call(Method::GET, &format!("/api/v1/users/{alice_id}"), None, Some(&bob)).await;
    assert_eq!(r.body["display_name"], "alice");
    assert_eq!(n2.send(&bob, &room, "b1", "hi").await.status, StatusCode::CREATED);

    // A rename on n1 is visible on n2 within a second.
    let r =
        n1.call(Method::PATCH, "/api/v1/users/me", Some(json!({"display_name": "Alice Renamed"})), Some(&alice)).await;
    assert_eq!(r.status, StatusCode::OK);
    let started = Instant::now();
    loop {
        let r = n2.call(Method::GET, &format!("/api/v1/users/{alice_id}"), None, Some(&bob)).await;
        if r.body["display_name"] == "Alice Renamed" {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(1), "n2 still serves the old name after 1 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Leaving on n1 ends bob's right to send through n2 at once (no stale cached membership).
    let r = n1.call(Method::POST, &format!("/api/v1/rooms/{room}/leave"), None, Some(&bob)).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = n2.send(&bob, &room, "b-after", "hi").await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "n2 accepted bob's send right after he left on n1: {:?}", r.body);
}

/// One instance's service, wired as `app.rs` wires cluster mode, except that its fan-out carries
/// no cache evictions to other instances (as when the pub/sub message is late or lost).
/// Returns the service and its store.
async fn service_without_evictions(redis_url: &str, db_url: &str, prefix: &str) -> (ChatService, Arc<dyn Store>) {
    let crate::Parts { redis, keys, store, sequencer } =
        crate::parts_with(redis_url, db_url, Keys::new(prefix, 4)).await;
    let fanout = Arc::new(LocalFanout::new(chatmesh::sio::Io::new(chatmesh::sio::Config::default())));
    let l2 = RedisSharedCache { redis: redis.clone(), prefix: prefix.to_string() };
    let svc = ChatService::new(
        Backends {
            store: store.clone(),
            sequencer: Arc::new(sequencer),
            revocations: Arc::new(RedisRevocations { redis: redis.clone(), keys: keys.clone(), wait_replica: None }),
            delivery: fanout.clone(),
            notices: fanout.clone(),
            evictions: fanout,
            history: Arc::new(RedisHistory { store: store.clone(), redis: redis.clone(), keys: keys.clone() }),
            sessions: Arc::new(chatmesh::sessions::RedisRevokedSessions { redis, keys }),
            caches: Arc::new(Caches::new(Arc::new(l2))),
            throttle: Arc::new(LocalThrottle::new(Budgets {
                auth_per_ip_per_min: 1_000,
                login_failures_per_account_per_min: 1_000,
            })),
            regions: Arc::new(chatmesh::region::Regions::single("local")),
            outbox: Arc::new(chatmesh::region::NoOutbox),
        },
        Tokens::new(&Secret::new(crate::SECRET.to_string()), Duration::from_secs(3600)),
        "local".into(),
        Limits {
            send_rate_per_sec: 1_000,
            read_rate_per_sec: 1_000,
            typing_rate_per_sec: 1_000,
            room_change_rate_per_min: 1_000,
            password_hash_queue: 64,
            hlc_max_ahead: Duration::from_millis(500),
        },
    );
    (svc, store)
}

async fn send(svc: &ChatService, user: &UserId, room: &RoomId, cmid: &str) -> Result<i64, ApiError> {
    let sent = svc
        .send(user, room, ClientMsgId::parse(cmid).unwrap(), MessageBody::parse(&format!("body {cmid}")).unwrap(), ())
        .await?;
    Ok(sent.message.seq)
}

/// A leave answered on one instance holds on every other at once, without waiting for their
/// cache evictions: the send script checks the membership's revocation count, and every other
/// membership check reads it. Rejoining works again, and a send caught between a leave and a
/// rejoin is refused as retryable, storing nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leave_holds_on_other_instances_without_their_cache_evictions() {
    let redis = RedisServer::start();
    let db = TestDatabase::create();
    let prefix = format!("t{}", ulid::Ulid::generate());
    let (n1, store) = service_without_evictions(&redis.url(), &db.url(), &prefix).await;
    let (n2, _) = service_without_evictions(&redis.url(), &db.url(), &prefix).await;
    let (user, room) = crate::seed(&*store).await;
    let (user, room) = (UserId::from(user), RoomId::from(room));

    // n2 caches the membership (L1, and L2 for n1).
    assert_eq!(send(&n2, &user, &room, "c1").await, Ok(1));
    assert_eq!(n2.members(&user, &room, None, 100).await.map(|m| m.len()), Ok(1));
    assert_eq!(send(&n1, &user, &room, "c2").await, Ok(2));

    n1.leave_room(&user, &room).await.unwrap();
    assert_eq!(send(&n2, &user, &room, "c3").await, Err(ApiError::not_member()), "send on n2 after the leave on n1");
    assert_eq!(n2.members(&user, &room, None, 100).await.map(|m| m.len()), Err(ApiError::not_member()));
    assert_eq!(send(&n1, &user, &room, "c4").await, Err(ApiError::not_member()));

    n1.join_room(&user, &room).await.unwrap();
    assert_eq!(send(&n2, &user, &room, "c5").await, Ok(3), "rejoined on n1, sent on n2");

    // Leave and rejoin on n1 while n2 still holds the membership from before the leave.
    n1.leave_room(&user, &room).await.unwrap();
    n1.join_room(&user, &room).await.unwrap();
    let caught = send(&n2, &user, &room, "c6").await;
    assert!(matches!(caught, Err(ApiError::Unavailable(_))), "a send caught by the leave is retryable: {caught:?}");
    assert_eq!(send(&n2, &user, &room, "c6").await, Ok(4), "its retry is accepted with the next seq");
    let page = n1.page(&room, chatmesh::service::Cursor::After(0), 50).await.unwrap();
    let cmids: Vec<&str> = page.messages.iter().map(|m| m.client_msg_id.as_str()).collect();
    assert_eq!(cmids, ["c1", "c2", "c5", "c6"], "refused sends stored nothing");
}

/// With ack level `replica` a leave's bump must reach a replica before the leave answers: refused
/// as retryable on a Redis without replicas, accepted on a primary with one (and readable there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_ack_level_replica_a_revocation_waits_for_a_replica() {
    use chatmesh::revocation::Revocations;
    let keys = Keys::new(&format!("t{}", ulid::Ulid::generate()), 4);
    let alone = RedisServer::start();
    let redis = Redis::connect(RedisUrl::Direct(alone.url())).await.unwrap();
    let r = RedisRevocations { redis, keys: keys.clone(), wait_replica: Some(Duration::from_millis(300)) };
    assert!(matches!(r.revoke("room", "user").await, Err(ApiError::Unavailable(_))), "no replica: not answered");

    let set = crate::support::procs::RedisReplicaSet::start();
    let redis = Redis::connect(RedisUrl::Direct(set.url_of(set.primary_port()))).await.unwrap();
    let r = RedisRevocations { redis, keys: keys.clone(), wait_replica: Some(Duration::from_secs(3)) };
    assert_eq!(r.revoke("room", "user").await, Ok(()));
    assert_eq!(r.count("room", "user").await, Ok(1));
    let on_replica =
        crate::support::procs::redis_command(set.replica_port(), &["GET", &keys.revocations("room", "user")]).unwrap();
    assert_eq!(on_replica.as_str(), Some("1"), "the replica has the bump once the leave answered");
}
