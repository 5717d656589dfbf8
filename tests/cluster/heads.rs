//! `head_seq` in every answer is at least the seq of every send acknowledged before the request
//! began, on any instance, however far the write-back lags.

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::support::procs::RedisServer;
use crate::{TestDatabase, cluster_instance};

/// Two instances without write-back workers: the store's head stays at 0 however many sends are
/// acknowledged, so any answer built from the store alone shows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_seq_covers_every_acknowledged_send_on_every_instance() {
    let redis = RedisServer::start();
    let db = TestDatabase::create();
    let no_sync = || vec![("CHATMESH_SYNC_WORKER", "false".to_string())];
    let n1 = cluster_instance(redis.url(), db.url(), "h1", no_sync()).await;
    let n2 = cluster_instance(redis.url(), db.url(), "h2", no_sync()).await;
    let (_, alice) = n1.register("alice").await;
    let room = n1.create_room(&alice, "heads", "public").await;
    let other = n1.create_room(&alice, "quiet", "public").await;

    let mut last = 0;
    for (i, at) in [&n1, &n2, &n1].into_iter().enumerate() {
        let r = at.send(&alice, &room, &format!("c{i}"), "hi").await;
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
        last = r.body["seq"].as_i64().unwrap();
    }
    assert_eq!(last, 3);

    for (name, app) in [("n1", &n1), ("n2", &n2)] {
        let r = app.call(Method::GET, &format!("/api/v1/rooms/{room}"), None, Some(&alice)).await;
        assert_eq!(r.body["head_seq"], 3, "GET /rooms/{{id}} on {name}: {:?}", r.body);

        for scope in ["joined", "public"] {
            let r = app.call(Method::GET, &format!("/api/v1/rooms?scope={scope}"), None, Some(&alice)).await;
            let rooms = r.body["rooms"].as_array().unwrap_or_else(|| panic!("{:?}", r.body));
            let head = |id: &str| rooms.iter().find(|x| x["id"] == id).map(|x| x["head_seq"].clone());
            assert_eq!(head(&room), Some(json!(3)), "GET /rooms?scope={scope} on {name}: {:?}", r.body);
            assert_eq!(head(&other), Some(json!(0)), "GET /rooms?scope={scope} on {name}: {:?}", r.body);
        }

        let r = app.call(Method::POST, &format!("/api/v1/rooms/{room}/join"), None, Some(&alice)).await;
        assert_eq!(r.body["head_seq"], 3, "POST /rooms/{{id}}/join on {name}: {:?}", r.body);

        let r = app
            .call(Method::GET, &format!("/api/v1/rooms/{room}/messages?after_seq=1&limit=1"), None, Some(&alice))
            .await;
        assert_eq!(r.body["head_seq"], 3, "history page on {name}: {:?}", r.body);
    }

    let r = n2.call(Method::PATCH, &format!("/api/v1/rooms/{room}"), Some(json!({"topic": "t"})), Some(&alice)).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["head_seq"], 3, "PATCH /rooms/{{id}} on n2: {:?}", r.body);
}
