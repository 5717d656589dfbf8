//! The log: JSON lines with the documented fields; never a secret or a message body.

use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::helpers::*;

#[tokio::test]
async fn log_lines_are_json_with_the_documented_fields_and_no_secret_or_body() {
    let jwt_secret = "jwt-secret-that-must-never-be-logged-0123456789";
    let admin = "admin-token-that-must-never-be-logged";
    let app = spawn_with(Spawn {
        env: vec![("CHATMESH_JWT_SECRET", jwt_secret.into()), ("CHATMESH_ADMIN_TOKEN", admin.into())],
        ..Default::default()
    })
    .await;
    let (_, token) = app.register("log_user").await;
    let room = app.create_room(&token, "log-room", "public").await;
    let body = "a body that must never reach the log 7f3a9c";
    let r = app.send(&token, &room, "log-1", body).await;
    assert_eq!(r.status, StatusCode::CREATED);
    let seq = r.body["seq"].as_i64().unwrap();
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let res = app
        .http
        .post(format!("{}/api/v1/rooms/{room}/messages", app.url))
        .bearer_auth(&token)
        .header("traceparent", traceparent)
        .json(&serde_json::json!({"client_msg_id": "log-2", "body": body}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    let _ = app.call(Method::GET, "/api/v1/cluster", None, Some(admin)).await;
    let password = "password123".to_string(); // helpers::register's

    let lines = app.logs_until(|lines| lines.iter().filter(|l| l.contains("\"send\"")).count() >= 2).await;
    assert!(!lines.is_empty());
    let events: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect();
    for (line, v) in lines.iter().zip(&events) {
        for field in ["timestamp", "level", "target", "message"] {
            assert!(v.get(field).is_some(), "{field} missing in {line}");
        }
        for secret in [jwt_secret, admin, password.as_str(), token.as_str(), body] {
            assert!(!line.contains(secret), "a secret or body leaked into the log: {line}");
        }
    }
    let sends: Vec<&Value> = events.iter().filter(|v| v["message"] == "send").collect();
    assert_eq!(sends.len(), 2, "one line per send");
    let first = sends[0];
    assert_eq!(first["room"], room.as_str());
    assert_eq!(first["seq"], seq);
    assert_eq!(first["transport"], "http");
    assert!(first["latency_us"].is_u64());
    let trace_id = first["trace_id"].as_str().unwrap();
    assert_eq!(trace_id.len(), 32, "{first}");
    assert!(trace_id.chars().all(|c| c.is_ascii_hexdigit()));
    assert_ne!(sends[0]["trace_id"], sends[1]["trace_id"]);

    let requests: Vec<&Value> = events.iter().filter(|v| v["message"] == "request").collect();
    let posted: Vec<&&Value> =
        requests.iter().filter(|v| v["route"] == "/api/v1/rooms/{id}/messages" && v["method"] == "POST").collect();
    assert_eq!(posted.len(), 2, "one line per request");
    for v in &posted {
        assert_eq!(v["status"], "201");
        assert!(v["latency_us"].is_u64());
    }
    // A caller's trace context is kept: the request line carries its trace id.
    assert_eq!(posted[1]["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
}

#[tokio::test]
async fn socket_connects_and_disconnects_are_logged() {
    let app = spawn_app().await;
    let (uid, token) = app.register("sock_log").await;
    // An Engine.IO polling handshake then a Socket.IO CONNECT with the token, then close.
    let http = &app.http;
    let open = http.get(format!("{}/socket.io/?EIO=4&transport=polling", app.url)).send().await.unwrap();
    let text = open.text().await.unwrap();
    let sid = serde_json::from_str::<Value>(&text[1..]).unwrap()["sid"].as_str().unwrap().to_string();
    let url = format!("{}/socket.io/?EIO=4&transport=polling&sid={sid}", app.url);
    let connect = format!("40{}", serde_json::json!({"token": token}));
    assert!(http.post(&url).body(connect).send().await.unwrap().status().is_success());
    // The CONNECT answer, possibly after an Engine.IO ping ("2") that was queued first.
    let mut answers = Vec::new();
    while answers.len() < 5 && !answers.iter().any(|a: &String| a.contains("40")) {
        answers.push(http.get(&url).send().await.unwrap().text().await.unwrap());
    }
    assert!(answers.iter().any(|a| a.contains("40")), "the CONNECT answer: {answers:?}");
    let logged = |lines: &[String], message: &str| {
        lines
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .any(|v| v["message"] == message && v["user"] == uid.as_str())
    };
    // The connect handler runs on its own task after the CONNECT answer: a close sent before it
    // ran would end the socket before it was ever counted, so wait for the line first.
    let lines = app.logs_until(|l| logged(l, "socket connected")).await;
    assert!(logged(&lines, "socket connected"), "a connect line");
    assert!(http.post(&url).body("1").send().await.unwrap().status().is_success()); // Engine.IO close
    let lines = app.logs_until(|l| logged(l, "socket disconnected")).await;
    assert!(logged(&lines, "socket disconnected"), "a disconnect line");
}
