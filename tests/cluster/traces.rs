//! One trace from send to durable across two instances: the instance that accepts a send (no
//! write-back worker) and the one whose worker stores it, both exporting to a test OTLP/HTTP
//! receiver.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::routing::post;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::procs::RedisServer;
use crate::{TestDatabase, cluster_instance};

/// One exported span: (instance id, trace id, span id, parent span id, name).
#[derive(Debug, Clone)]
struct Span {
    instance: String,
    trace_id: String,
    span_id: String,
    parent: String,
    name: String,
}

/// An OTLP/HTTP receiver (JSON encoding) on a free loopback port; keeps every span it is sent.
async fn otlp_receiver() -> (String, Arc<Mutex<Vec<Span>>>) {
    let spans = Arc::new(Mutex::new(Vec::new()));
    let keep = spans.clone();
    let app = Router::new().route(
        "/v1/traces",
        post(move |body: Bytes| {
            let keep = keep.clone();
            async move {
                let v: Value = serde_json::from_slice(&body).expect("OTLP/JSON export body");
                let mut out = keep.lock().unwrap();
                for rs in v["resourceSpans"].as_array().into_iter().flatten() {
                    let instance = rs["resource"]["attributes"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .find(|a| a["key"] == "service.instance.id")
                        .and_then(|a| a["value"]["stringValue"].as_str())
                        .unwrap_or_default()
                        .to_string();
                    for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                        for s in ss["spans"].as_array().into_iter().flatten() {
                            let field = |k: &str| s[k].as_str().unwrap_or_default().to_lowercase();
                            out.push(Span {
                                instance: instance.clone(),
                                trace_id: field("traceId"),
                                span_id: field("spanId"),
                                parent: field("parentSpanId"),
                                name: field("name"),
                            });
                        }
                    }
                }
                (StatusCode::OK, axum::Json(json!({})))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, spans)
}

#[tokio::test]
async fn one_trace_follows_a_message_from_send_on_one_instance_to_durable_on_another() {
    let (otlp, spans) = otlp_receiver().await;
    let redis = RedisServer::start();
    let db = TestDatabase::create();
    let otel = |extra: Vec<(&'static str, String)>| {
        let mut env = vec![("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.clone()), ("OTEL_BSP_SCHEDULE_DELAY", "200".into())];
        env.extend(extra);
        env
    };
    // a accepts sends but stores nothing; b's worker writes everything back.
    let a =
        cluster_instance(redis.url(), db.url(), "trace-a", otel(vec![("CHATMESH_SYNC_WORKER", "false".into())])).await;
    let b = cluster_instance(redis.url(), db.url(), "trace-b", otel(vec![])).await;

    let (_, token) = a.register("tracer").await;
    let room = a.create_room(&token, "traced", "public").await;
    let trace_id = "5a1d0c0ffee0000000000000000beef1";
    let res = a
        .http
        .post(format!("{}/api/v1/rooms/{room}/messages", a.url))
        .bearer_auth(&token)
        .header("traceparent", format!("00-{trace_id}-1111111111111111-01"))
        .json(&json!({"client_msg_id": "traced-1", "body": "follow me"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);

    // Spans arrive in batches every ~200 ms; the write-back within a second or so.
    let mut ours = Vec::new();
    for _ in 0..100 {
        ours = spans.lock().unwrap().iter().filter(|s| s.trace_id == trace_id).cloned().collect::<Vec<_>>();
        if ours.iter().any(|s| s.name == "message durable") && ours.iter().any(|s| s.name == "redis send script") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let find = |name: &str| {
        ours.iter().find(|s| s.name == name).cloned().unwrap_or_else(|| panic!("no `{name}` span in {ours:#?}"))
    };
    let request = find("post /api/v1/rooms/{id}/messages");
    let script = find("redis send script");
    let durable = find("message durable");
    // send → script on the accepting instance, durable on the other, one parent chain.
    assert_eq!(request.instance, "trace-a");
    assert_eq!(request.parent, "1111111111111111", "the request continues the caller's trace");
    assert_eq!(script.instance, "trace-a");
    assert_eq!(script.parent, request.span_id);
    assert_eq!(durable.instance, "trace-b", "stored by the other instance's worker");
    assert_eq!(durable.parent, script.span_id, "the stream entry carried the script span's context");
    // The stored message is really there.
    let r = b.call(reqwest::Method::GET, &format!("/api/v1/rooms/{room}/messages"), None, Some(&token)).await;
    assert_eq!(r.body["messages"][0]["body"], "follow me");
}
