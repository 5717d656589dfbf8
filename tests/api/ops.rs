use std::collections::HashMap;

use reqwest::{Method, StatusCode};

use crate::helpers::*;

/// Parses Prometheus text into {"name{labels}": value}.
fn parse_metrics(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

#[tokio::test]
async fn health_and_metrics_move_with_traffic() {
    let app = spawn_app().await;
    let r = app.call(Method::GET, "/health/live", None, None).await;
    assert_eq!((r.status, r.body["status"].as_str()), (StatusCode::OK, Some("ok")));
    let r = app.call(Method::GET, "/health/ready", None, None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["status"], "ready");
    assert_eq!(r.body["checks"]["store"]["ok"], true);
    assert!(r.body["checks"]["store"]["latency_ms"].is_number());

    let (_, t) = app.register("alice").await;
    let room = app.create_room(&t, "r", "public").await;
    for i in 0..3 {
        assert_eq!(app.send(&t, &room, &format!("m{i}"), "x").await.status, StatusCode::CREATED);
    }
    let text = app.http.get(format!("{}/metrics", app.url)).send().await.unwrap().text().await.unwrap();
    let m = parse_metrics(&text);
    assert_eq!(m.get("chatmesh_messages_accepted_total"), Some(&3.0), "{text}");
    assert_eq!(m.get("chatmesh_send_latency_seconds_count"), Some(&3.0));
    assert_eq!(m.get(r#"chatmesh_http_requests_total{route="/api/v1/rooms/{id}/messages",status="201"}"#), Some(&3.0));
    assert!(text.contains("chatmesh_messages_delivered_total"));
    assert!(text.contains("chatmesh_connections"));
    // Route labels are templates: no room id ever becomes a label value.
    assert!(!text.contains(&room), "a room id leaked into a label");
}

#[tokio::test]
async fn cluster_view_is_guarded_by_the_admin_token() {
    let app =
        spawn_with(Spawn { env: vec![("CHATMESH_ADMIN_TOKEN", "admin-token-123456".into())], ..Default::default() })
            .await;
    let r = app.call(Method::GET, "/api/v1/cluster", None, None).await;
    assert_eq!((r.status, r.code()), (StatusCode::UNAUTHORIZED, "unauthorized"));
    let r = app.call(Method::GET, "/api/v1/cluster", None, Some("wrong")).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = app.call(Method::GET, "/api/v1/cluster", None, Some("admin-token-123456")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["region"], "local");
    let instances = r.body["instances"].as_array().unwrap();
    assert_eq!(instances.len(), 1);
    assert_eq!(instances[0]["id"], r.body["instance_id"]);
    assert_eq!(instances[0]["ready"], true);
    assert_eq!(r.body["sync"]["pending"], 0);
}

#[tokio::test]
async fn web_page_and_its_assets_are_served() {
    let app = spawn_app().await;
    for (path, ty) in [
        ("/", "text/html"),
        ("/assets/app.js", "text/javascript"),
        ("/assets/style.css", "text/css"),
        ("/assets/socket.io.min.js", "text/javascript"),
    ] {
        let res = app.http.get(format!("{}{path}", app.url)).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{path}");
        assert!(res.headers()["content-type"].to_str().unwrap().starts_with(ty), "{path}");
        assert!(!res.text().await.unwrap().is_empty());
    }
}
