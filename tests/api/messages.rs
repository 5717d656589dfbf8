use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::*;

fn seqs(body: &Value) -> Vec<i64> {
    body["messages"].as_array().unwrap().iter().map(|m| m["seq"].as_i64().unwrap()).collect()
}

#[tokio::test]
async fn send_validation_at_every_edge() {
    let app = spawn_app().await;
    let (_, alice) = app.register("alice").await;
    let (_, bob) = app.register("bob").await;
    let room = app.create_room(&alice, "r", "public").await;

    let r = app.send(&alice, &room, "m1", &"€".repeat(4000)).await;
    assert_eq!(r.status, StatusCode::CREATED, "4000 multi-byte scalar values are accepted");
    assert_eq!(r.body["body"].as_str().unwrap().chars().count(), 4000);
    let r = app.send(&alice, &room, "m2", &"€".repeat(4001)).await;
    assert_eq!((r.status, r.code()), (StatusCode::BAD_REQUEST, "validation_failed"));
    let r = app.send(&alice, &room, "m3", &"😀".repeat(4000)).await;
    assert_eq!(r.status, StatusCode::CREATED, "astral characters count once");
    let r = app.send(&alice, &room, "m4", &"😀".repeat(4001)).await;
    assert_eq!(r.code(), "validation_failed");

    let r = app.send(&alice, &room, "m5", "  keep\n\tme  ").await;
    assert_eq!(r.body["body"], "  keep\n\tme  ", "stored verbatim, never trimmed");
    for (cmid, body, why) in [
        ("m6", "", "empty"),
        ("m7", " \n\t ", "only whitespace"),
        ("m8", "bell\u{7}", "BEL"),
        ("m9", "cr\r", "CR"),
        ("m10", "del\u{7f}", "DEL"),
        ("m11", "c1\u{85}", "C1 control"),
        ("bad id", "x", "client_msg_id charset"),
        ("", "x", "empty client_msg_id"),
    ] {
        let r = app.send(&alice, &room, cmid, body).await;
        assert_eq!((r.status, r.code()), (StatusCode::BAD_REQUEST, "validation_failed"), "{why}");
    }
    let long_id = "x".repeat(65);
    let r = app.send(&alice, &room, &long_id, "x").await;
    assert_eq!(r.code(), "validation_failed");
    let r = app.send(&alice, &room, &"x".repeat(64), "x").await;
    assert_eq!(r.status, StatusCode::CREATED);
    let r = app
        .call(Method::POST, &format!("/api/v1/rooms/{room}/messages"), Some(json!({"body": "no id"})), Some(&alice))
        .await;
    assert_eq!(r.code(), "validation_failed");

    // Membership and existence.
    let r = app.send(&bob, &room, "b1", "hi").await;
    assert_eq!((r.status, r.code()), (StatusCode::FORBIDDEN, "forbidden"));
    let r = app.send(&alice, "01NOSUCHROOM0000000000000", "a1", "hi").await;
    assert_eq!((r.status, r.code()), (StatusCode::NOT_FOUND, "not_found"));

    // Nothing rejected took a seq.
    let r = app.call(Method::GET, &format!("/api/v1/rooms/{room}/messages?after_seq=0"), None, Some(&alice)).await;
    assert_eq!(seqs(&r.body), vec![1, 2, 3, 4]);
}

#[tokio::test]
async fn body_size_limit_is_413() {
    let app = spawn_app().await;
    let (_, alice) = app.register("alice").await;
    let room = app.create_room(&alice, "r", "public").await;
    let path = format!("/api/v1/rooms/{room}/messages");
    // Exactly 64 KiB of JSON passes the limit (and then fails validation on the body length).
    let pad = 65536 - r#"{"client_msg_id":"p","body":""}"#.len();
    let at_limit = format!(r#"{{"client_msg_id":"p","body":"{}"}}"#, "a".repeat(pad));
    assert_eq!(at_limit.len(), 65536);
    let r = app.raw(Method::POST, &path, at_limit.into_bytes(), Some(&alice)).await;
    assert_eq!((r.status, r.code()), (StatusCode::BAD_REQUEST, "validation_failed"));
    let over = format!(r#"{{"client_msg_id":"p","body":"{}"}}"#, "a".repeat(pad + 1));
    let r = app.raw(Method::POST, &path, over.into_bytes(), Some(&alice)).await;
    assert_eq!((r.status, r.code()), (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"));

    let small = spawn_with(Spawn { env: vec![("CHATMESH_MAX_BODY_BYTES", "2048".into())], ..Default::default() }).await;
    let (_, t) = small.register("alice").await;
    let room = small.create_room(&t, "r", "public").await;
    let r = small.send(&t, &room, "big", &"b".repeat(3000)).await;
    assert_eq!((r.status, r.code()), (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"), "the limit is configurable");
}

#[tokio::test]
async fn idempotent_retry_and_conflict() {
    let app = spawn_app().await;
    let (_, alice) = app.register("alice").await;
    let (_, bob) = app.register("bob").await;
    let room = app.create_room(&alice, "r", "public").await;
    app.call(Method::POST, &format!("/api/v1/rooms/{room}/join"), None, Some(&bob)).await;

    let first = app.send(&alice, &room, "same", "hello").await;
    assert_eq!(first.status, StatusCode::CREATED);
    let retry = app.send(&alice, &room, "same", "hello").await;
    assert_eq!(retry.status, StatusCode::OK, "a retry answers 200 with the original");
    assert_eq!(retry.body, first.body);
    let conflict = app.send(&alice, &room, "same", "different").await;
    assert_eq!((conflict.status, conflict.code()), (StatusCode::CONFLICT, "conflict"));
    // client_msg_id is unique per (sender, room): bob may use the same one.
    let bobs = app.send(&bob, &room, "same", "hello").await;
    assert_eq!(bobs.status, StatusCode::CREATED);
    assert_eq!(bobs.body["seq"], 2);
    let r = app.call(Method::GET, &format!("/api/v1/rooms/{room}/messages"), None, Some(&alice)).await;
    assert_eq!(seqs(&r.body), vec![1, 2]);
}

#[tokio::test]
async fn history_paging() {
    let app = spawn_app().await;
    let (_, alice) = app.register("alice").await;
    let (_, bob) = app.register("bob").await;
    let room = app.create_room(&alice, "r", "public").await;
    let private = app.create_room(&alice, "p", "private").await;
    let n = 520;
    let sends: Vec<_> = (1..=n)
        .map(|i| {
            let app = &app;
            let alice = alice.clone();
            let room = room.clone();
            async move { app.send(&alice, &room, &format!("c{i}"), &format!("message {i}")).await.status }
        })
        .collect();
    for status in futures::future::join_all(sends).await {
        assert_eq!(status, StatusCode::CREATED);
    }
    let get = |q: String| {
        let app = &app;
        let alice = alice.clone();
        let room = room.clone();
        async move { app.call(Method::GET, &format!("/api/v1/rooms/{room}/messages{q}"), None, Some(&alice)).await }
    };
    let r = get(String::new()).await;
    assert_eq!(seqs(&r.body), (471..=520).collect::<Vec<_>>(), "latest 50 by default, ascending");
    assert_eq!((r.body["has_more"].as_bool(), r.body["head_seq"].as_i64()), (Some(true), Some(520)));
    let r = get("?after_seq=0&limit=1000".into()).await;
    assert_eq!(seqs(&r.body), (1..=500).collect::<Vec<_>>(), "limit clamps to 500");
    assert_eq!(r.body["has_more"], true);
    let r = get("?after_seq=500&limit=500".into()).await;
    assert_eq!(seqs(&r.body), (501..=520).collect::<Vec<_>>());
    assert_eq!(r.body["has_more"], false);
    let r = get("?after_seq=520".into()).await;
    assert_eq!((seqs(&r.body).len(), r.body["has_more"].as_bool()), (0, Some(false)));
    let r = get("?before_seq=11&limit=5".into()).await;
    assert_eq!(seqs(&r.body), vec![6, 7, 8, 9, 10]);
    assert_eq!(r.body["has_more"], true);
    let r = get("?before_seq=6&limit=5".into()).await;
    assert_eq!(seqs(&r.body), vec![1, 2, 3, 4, 5]);
    assert_eq!(r.body["has_more"], false, "nothing older than seq 1");
    let r = get("?limit=520".into()).await;
    assert_eq!(seqs(&r.body), (21..=520).collect::<Vec<_>>());
    for bad in ["?after_seq=1&before_seq=5", "?limit=0", "?after_seq=-1", "?after_seq=abc", "?limit=x"] {
        let r = get(bad.into()).await;
        assert_eq!((r.status, r.code()), (StatusCode::BAD_REQUEST, "validation_failed"), "{bad}");
    }
    // The bodies are what was sent.
    let r = get("?after_seq=99&limit=1".into()).await;
    let m = &r.body["messages"][0];
    assert_eq!(m["seq"], 100);
    assert_eq!(m["body"].as_str().unwrap(), format!("message {}", &m["client_msg_id"].as_str().unwrap()[1..]));
    // Public history is readable by any user, private only by members.
    let r = app.call(Method::GET, &format!("/api/v1/rooms/{room}/messages"), None, Some(&bob)).await;
    assert_eq!(r.status, StatusCode::OK);
    let r = app.call(Method::GET, &format!("/api/v1/rooms/{private}/messages"), None, Some(&bob)).await;
    assert_eq!((r.status, r.code()), (StatusCode::FORBIDDEN, "forbidden"));
}

#[tokio::test]
async fn sends_are_rate_limited_per_user() {
    let app = spawn_with(Spawn { env: vec![("CHATMESH_SEND_RATE_PER_SEC", "1".into())], ..Default::default() }).await;
    let (_, alice) = app.register("alice").await;
    let (_, bob) = app.register("bob").await;
    let room = app.create_room(&alice, "r", "public").await;
    app.call(Method::POST, &format!("/api/v1/rooms/{room}/join"), None, Some(&bob)).await;
    // Burst is 10x the sustained rate.
    for i in 0..10 {
        let r = app.send(&alice, &room, &format!("a{i}"), "x").await;
        assert_eq!(r.status, StatusCode::CREATED, "burst send {i}");
    }
    let r = app.send(&alice, &room, "a10", "x").await;
    assert_eq!((r.status, r.code()), (StatusCode::TOO_MANY_REQUESTS, "rate_limited"));
    assert!(r.headers.contains_key("retry-after"));
    let r = app.send(&bob, &room, "b0", "x").await;
    assert_eq!(r.status, StatusCode::CREATED, "the limit is per user");
    let r = app.call(Method::GET, &format!("/api/v1/rooms/{room}/messages?after_seq=0"), None, Some(&alice)).await;
    assert_eq!(seqs(&r.body), (1..=11).collect::<Vec<_>>(), "a refused send takes no seq");
}
