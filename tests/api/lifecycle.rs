use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::helpers::*;

async fn all_messages(app: &TestApp, token: &str, room: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let r = app
            .call(Method::GET, &format!("/api/v1/rooms/{room}/messages?after_seq={after}&limit=500"), None, Some(token))
            .await;
        assert_eq!(r.status, StatusCode::OK);
        let msgs = r.body["messages"].as_array().unwrap().clone();
        after = msgs.last().map(|m| m["seq"].as_i64().unwrap()).unwrap_or(after);
        out.extend(msgs);
        if r.body["has_more"] != true {
            return out;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_then_exits_zero_and_data_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut app =
        spawn_with(Spawn { env: vec![("CHATMESH_DRAIN_DELAY_MS", "1500".into())], data_dir: Some(dir.path()) }).await;
    let (uid, token) = app.register("alice").await;
    let room = app.create_room(&token, "r", "public").await;
    for i in 0..5 {
        assert_eq!(app.send(&token, &room, &format!("m{i}"), "kept").await.status, StatusCode::CREATED);
    }
    app.signal("TERM");
    // During the drain delay readiness says 503 while the process still serves.
    let mut saw_503 = false;
    for _ in 0..50 {
        let r = app.call(Method::GET, "/health/ready", None, None).await;
        if r.status == StatusCode::SERVICE_UNAVAILABLE {
            assert_eq!(r.body["status"], "not_ready");
            saw_503 = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(saw_503, "readiness never turned 503 during the drain");
    let code = tokio::task::block_in_place(|| app.wait_exit(Duration::from_secs(20)));
    assert_eq!(code, Some(0));

    let app = spawn_with(Spawn { data_dir: Some(dir.path()), ..Default::default() }).await;
    let r = app.call(Method::GET, "/api/v1/users/me", None, Some(&token)).await;
    assert_eq!(r.status, StatusCode::OK, "the token from before the restart is still valid");
    assert_eq!(r.body["id"], uid.as_str());
    let r = app
        .call(
            Method::POST,
            "/api/v1/auth/login",
            Some(serde_json::json!({"username": "alice", "password": "password123"})),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let msgs = all_messages(&app, &token, &room).await;
    assert_eq!(msgs.len(), 5);
    let r = app.send(&token, &room, "after-restart", "next").await;
    assert_eq!(r.body["seq"], 6, "seqs continue after a restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_acknowledged_message() {
    let dir = tempfile::tempdir().unwrap();
    let mut app = spawn_with(Spawn { data_dir: Some(dir.path()), ..Default::default() }).await;
    let (_, token) = app.register("alice").await;
    let room = app.create_room(&token, "r", "public").await;
    let acked = Arc::new(std::sync::Mutex::new(HashMap::<String, (i64, String)>::new()));
    let client = app.http.clone();
    let url = app.url.clone();
    // 8 concurrent senders hammer the room until the process dies under them.
    let mut senders = Vec::new();
    for w in 0..8 {
        let (client, url, token, room, acked) =
            (client.clone(), url.clone(), token.clone(), room.clone(), acked.clone());
        senders.push(tokio::spawn(async move {
            for i in 0.. {
                let cmid = format!("w{w}-{i}");
                let res = client
                    .post(format!("{url}/api/v1/rooms/{room}/messages"))
                    .bearer_auth(&token)
                    .json(&serde_json::json!({"client_msg_id": cmid, "body": format!("body {cmid}")}))
                    .send()
                    .await;
                let Ok(res) = res else { return };
                if res.status() != StatusCode::CREATED {
                    return;
                }
                let Ok(v) = res.json::<Value>().await else {
                    return;
                };
                acked.lock().unwrap().insert(v["id"].as_str().unwrap().to_string(), (v["seq"].as_i64().unwrap(), cmid));
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    app.signal("KILL");
    let code = tokio::task::block_in_place(|| app.wait_exit(Duration::from_secs(10)));
    assert_eq!(code, None, "killed by a signal");
    for s in senders {
        s.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > 50, "the burst should have acked a good number of sends, got {}", acked.len());

    let app = spawn_with(Spawn { data_dir: Some(dir.path()), ..Default::default() }).await;
    let stored = all_messages(&app, &token, &room).await;
    let seqs: Vec<i64> = stored.iter().map(|m| m["seq"].as_i64().unwrap()).collect();
    assert_eq!(seqs, (1..=seqs.len() as i64).collect::<Vec<_>>(), "gap-free after the crash");
    let by_id: HashMap<_, _> = stored.iter().map(|m| (m["id"].as_str().unwrap().to_string(), m)).collect();
    for (id, (seq, cmid)) in &acked {
        let m = by_id.get(id).unwrap_or_else(|| panic!("acked message {id} (seq {seq}) lost"));
        assert_eq!(m["seq"].as_i64().unwrap(), *seq);
        assert_eq!(m["client_msg_id"].as_str().unwrap(), cmid);
    }
}
