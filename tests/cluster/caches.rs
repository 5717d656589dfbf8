use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::support::procs::RedisServer;
use crate::{TestDb, cluster_instance};

/// Changes on one instance evict the other instances' caches within a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_on_one_instance_are_seen_on_another_within_a_second() {
    let redis = RedisServer::start();
    let db = TestDb::create();
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
    let started = Instant::now();
    loop {
        let r = n2.send(&bob, &room, &format!("b-after-{}", started.elapsed().as_millis()), "hi").await;
        if r.status == StatusCode::FORBIDDEN {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(1), "n2 still accepts bob's sends after he left");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
