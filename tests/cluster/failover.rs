use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};

use crate::helpers::TestApp;
use crate::support::procs::{RedisReplicaSet, ReplicaSetOptions};
use crate::{TestDatabase, cluster_instance, wait_metric};

async fn wait_ready(app: &TestApp, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        if app.call(Method::GET, "/health/ready", None, None).await.status == StatusCode::OK {
            return started.elapsed();
        }
        assert!(started.elapsed() < within, "not ready within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sentinel promotes the replica; with ack level `replica` every acknowledged message survives,
/// the instance follows the new primary by itself and readiness comes back.
///
/// The data nodes run as `deploy/redis/` configures them (AOF, `min-replicas-to-write 1`). With
/// persistence off the old primary would come back empty, and a second, spurious failover (one
/// Sentinel losing sight of the new primary for `down-after-milliseconds` under load: CI, and 1 of
/// 5 whole-suite runs here)
/// promotes that empty node and wipes the only copy on the other: acknowledged messages not yet
/// written back are gone. That is a double loss no client can survive; the README says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_keeps_every_acknowledged_message() {
    let mut set = tokio::task::spawn_blocking(|| {
        RedisReplicaSet::start_with(ReplicaSetOptions { durable: true, ..ReplicaSetOptions::default() })
    })
    .await
    .unwrap();
    let db = TestDatabase::create();
    let app =
        cluster_instance(set.sentinel_url(), db.url(), "f1", vec![("CHATMESH_ACK_LEVEL", "replica".into())]).await;
    wait_ready(&app, Duration::from_secs(20)).await;
    let (_, token) = app.register("failover").await;
    let room = app.create_room(&token, "failover", "public").await;

    let mut acked = Vec::new();
    for i in 0..20 {
        let r = app.send(&token, &room, &format!("pre{i}"), "before failover").await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
        acked.push((r.body["id"].as_str().unwrap().to_string(), r.body["seq"].as_i64().unwrap()));
    }
    let old = set.primary_port();
    tokio::task::block_in_place(|| set.kill_primary());
    let new = tokio::task::block_in_place(|| set.wait_for_failover(Duration::from_secs(30)));
    assert_ne!(old, new);
    // Ack level `replica` needs a replica: the old primary comes back (with its AOF) and Sentinel
    // turns it into the new primary's replica. Until then sends answer `unavailable` (never a
    // false ack; the new primary also refuses writes with NOREPLICAS).
    tokio::task::block_in_place(|| set.restart_node(old));

    // Sends fail (unavailable) for a moment, then go to the new primary.
    let started = Instant::now();
    let mut i = 0;
    while acked.len() < 40 {
        let r = app.send(&token, &room, &format!("post{i}"), "after failover").await;
        if r.status == StatusCode::CREATED || r.status == StatusCode::OK {
            acked.push((r.body["id"].as_str().unwrap().to_string(), r.body["seq"].as_i64().unwrap()));
            i += 1;
        } else {
            assert_eq!(r.code(), "unavailable", "only `unavailable` while the primary moves");
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "sends never recovered after the failover: {}",
                r.body
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let recovered_in = wait_ready(&app, Duration::from_secs(60)).await;

    let r = app
        .call(Method::GET, &format!("/api/v1/rooms/{room}/messages?after_seq=0&limit=500"), None, Some(&token))
        .await;
    let seqs: Vec<i64> = r.body["messages"].as_array().unwrap().iter().map(|m| m["seq"].as_i64().unwrap()).collect();
    let cmids: Vec<&str> =
        r.body["messages"].as_array().unwrap().iter().map(|m| m["client_msg_id"].as_str().unwrap_or("?")).collect();
    if seqs != (1..=40).collect::<Vec<_>>() {
        let log = app.logs.lock().unwrap().join("\n");
        panic!(
            "not gap-free across the failover, or acked messages lost: seqs {seqs:?}, client ids {cmids:?}\n\
             --- instance log ---\n{log}\n{}",
            set.logs()
        );
    }
    for (id, seq) in &acked {
        assert_eq!(r.body["messages"][(*seq - 1) as usize]["id"], id.as_str());
    }
    eprintln!("sentinel failover: sends recovered after {:?}, ready again {:?} later", started.elapsed(), recovered_in);
}

/// When the fan-out path is lost, readiness turns red (the balancer stops sending traffic here);
/// when Redis is back the instance re-subscribes and turns ready by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_fanout_path() {
    let mut redis = crate::support::procs::RedisServer::start();
    let db = TestDatabase::create();
    let app = cluster_instance(redis.url(), db.url(), "r1", vec![]).await;
    wait_ready(&app, Duration::from_secs(20)).await;
    tokio::task::block_in_place(|| redis.kill());
    let started = Instant::now();
    loop {
        let r = app.call(Method::GET, "/health/ready", None, None).await;
        if r.status == StatusCode::SERVICE_UNAVAILABLE {
            assert_eq!(r.body["status"], "not_ready");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(15), "still ready 15 s after Redis died: {}", r.body);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let red_after = started.elapsed();
    // Repeated failures open the Redis circuit, exported as a metric and in the checks.
    wait_metric(&app, r#"chatmesh_circuit_open{dependency="redis"} 1"#).await;
    let r = app.call(Method::GET, "/health/ready", None, None).await;
    assert_ne!(r.body["checks"]["redis"]["circuit"], "closed", "{}", r.body);
    tokio::task::block_in_place(|| redis.restart());
    let back = wait_ready(&app, Duration::from_secs(30)).await;
    wait_metric(&app, r#"chatmesh_circuit_open{dependency="redis"} 0"#).await;
    let (_, token) = app.register("after").await;
    let room = app.create_room(&token, "after", "public").await;
    assert_eq!(app.send(&token, &room, "a1", "works again").await.status, StatusCode::CREATED);
    eprintln!("readiness: red {red_after:?} after Redis died, ready {back:?} after it came back");
}
