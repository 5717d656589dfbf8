use reqwest::{Method, StatusCode};

use crate::helpers::*;

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
    let m = parse_samples(&text);
    assert_eq!(value(&m, "chatmesh_messages_accepted_total", &[]), Some(3.0), "{text}");
    assert_eq!(value(&m, "chatmesh_send_latency_seconds_count", &[]), Some(3.0));
    let sent_201 = [("route", "/api/v1/rooms/{id}/messages"), ("status", "201")];
    assert_eq!(value(&m, "chatmesh_http_requests_total", &sent_201), Some(3.0));
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
async fn web_page_and_its_assets_are_served_with_security_headers() {
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
        let header = |name: &str| res.headers().get(name).map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
        let csp = header("content-security-policy");
        for part in ["default-src 'self'", "frame-ancestors 'none'", "object-src 'none'"] {
            assert!(csp.contains(part), "{path}: CSP {csp:?} lacks {part}");
        }
        assert_eq!(header("x-frame-options"), "DENY", "{path}");
        assert_eq!(header("x-content-type-options"), "nosniff", "{path}");
        assert_eq!(header("referrer-policy"), "no-referrer", "{path}");
        assert!(!res.text().await.unwrap().is_empty());
    }
    // Every answer, API errors included, forbids content sniffing.
    for path in ["/api/v1/users/me", "/health/live", "/no/such/route"] {
        let r = app.call(reqwest::Method::GET, path, None, None).await;
        assert_eq!(r.headers.get("x-content-type-options").map(|v| v.to_str().unwrap()), Some("nosniff"), "{path}");
        assert_eq!(r.headers.get("referrer-policy").map(|v| v.to_str().unwrap()), Some("no-referrer"), "{path}");
    }
}

/// One parsed sample: name, labels, value.
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

/// Parses the Prometheus text format strictly enough to catch a malformed line.
fn parse_samples(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {line}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value: {line}"));
        let (name, labels) = match series.split_once('{') {
            None => (series.to_string(), Vec::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').unwrap_or_else(|| panic!("unclosed labels: {line}"));
                let mut labels = Vec::new();
                // Label values here never contain `",`; a template route has braces but no quotes.
                for pair in body.split("\",").filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once("=\"").unwrap_or_else(|| panic!("bad label {pair:?} in {line}"));
                    labels.push((k.to_string(), v.trim_end_matches('"').to_string()));
                }
                (name.to_string(), labels)
            }
        };
        out.push(Sample { name, labels, value });
    }
    out
}

fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| s.name == name && labels.iter().all(|(k, v)| s.labels.iter().any(|(lk, lv)| lk == k && lv == v)))
        .map(|s| s.value)
}

#[tokio::test]
async fn every_documented_metric_is_exported_with_bounded_labels_and_moves_with_traffic() {
    let app = spawn_app().await;
    let scrape = || async {
        let text = app.http.get(format!("{}/metrics", app.url)).send().await.unwrap().text().await.unwrap();
        parse_samples(&text)
    };
    let before = scrape().await;
    let cpu_before = value(&before, "process_cpu_seconds_total", &[]).expect("process CPU exported");

    let (uid, t) = app.register("metrics_user").await;
    let room = app.create_room(&t, "metrics-room", "public").await;
    for i in 0..20 {
        assert_eq!(app.send(&t, &room, &format!("cm-{i}"), "hello").await.status, StatusCode::CREATED);
    }
    let r = app.send(&t, &room, "cm-0", "hello").await; // a retry: not accepted twice
    assert_eq!(r.status, StatusCode::OK);
    let r = app.call(Method::GET, &format!("/api/v1/rooms/{room}/messages?limit=5"), None, Some(&t)).await;
    assert_eq!(r.status, StatusCode::OK);
    let _ = app.call(Method::GET, "/health/ready", None, None).await;
    let after = scrape().await;

    assert_eq!(value(&after, "chatmesh_messages_accepted_total", &[]), Some(20.0));
    assert_eq!(value(&after, "chatmesh_send_latency_seconds_count", &[]), Some(21.0));
    let sent_201 = [("route", "/api/v1/rooms/{id}/messages"), ("status", "201")];
    assert_eq!(value(&after, "chatmesh_http_requests_total", &sent_201), Some(20.0));
    assert_eq!(value(&after, "chatmesh_ready", &[]), Some(1.0));
    assert_eq!(value(&after, "chatmesh_dependency_up", &[("dependency", "store")]), Some(1.0));
    assert_eq!(value(&after, "chatmesh_circuit_open", &[("dependency", "store")]), Some(0.0));
    let commits = value(&after, "chatmesh_dependency_latency_seconds_count", &[("operation", "append_batch")]);
    // 21 sends (one a retry) in at most 21 group commits.
    assert!(commits.is_some_and(|n| (1.0..=21.0).contains(&n)), "group commits: {commits:?}");
    assert!(value(&after, "chatmesh_commit_batch_size_count", &[]).is_some_and(|n| n >= 1.0));
    // Histogram buckets resolve sub-millisecond to seconds.
    let les: Vec<&str> = after
        .iter()
        .filter(|s| s.name == "chatmesh_send_latency_seconds_bucket")
        .filter_map(|s| s.labels.iter().find(|(k, _)| k == "le").map(|(_, v)| v.as_str()))
        .collect();
    for le in ["0.0001", "0.001", "1", "10", "+Inf"] {
        assert!(les.contains(&le), "bucket le={le} missing: {les:?}");
    }
    // Process figures are real.
    assert!(value(&after, "process_resident_memory_bytes", &[]).is_some_and(|v| v > 1e6));
    assert!(value(&after, "process_open_fds", &[]).is_some_and(|v| v >= 5.0));
    assert!(value(&after, "process_max_fds", &[]).is_some_and(|v| v >= 256.0));
    assert!(value(&after, "process_threads", &[]).is_some_and(|v| v >= 2.0));
    assert!(value(&after, "process_cpu_seconds_total", &[]).unwrap() >= cpu_before);
    assert_eq!(value(&after, "chatmesh_build_info", &[("version", env!("CARGO_PKG_VERSION"))]), Some(1.0));

    // Bounded labels: only known label names, and no id of anything in any value.
    let allowed =
        ["route", "status", "dependency", "operation", "event", "outcome", "kind", "le", "version", "quantile"];
    let message_ids: Vec<String> =
        r.body["messages"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap().to_string()).collect();
    for s in &after {
        for (k, v) in &s.labels {
            assert!(allowed.contains(&k.as_str()), "unexpected label {k} on {}", s.name);
            for id in [&room, &uid].into_iter().chain(message_ids.iter()) {
                assert!(!v.contains(id.as_str()), "an id leaked into {}{{{k}={v}}}", s.name);
            }
        }
    }

    // Every metric docs/metrics.md documents is exported (those only some modes or setups emit
    // are listed here), and every exported one is documented.
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/metrics.md")).unwrap();
    let documented: Vec<&str> = doc
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split_once('`').map(|(name, _)| name))
        .collect();
    let exported: std::collections::HashSet<String> = after
        .iter()
        .map(|s| {
            let n = s.name.as_str();
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| n.strip_suffix(suffix))
                .filter(|base| documented.contains(base))
                .unwrap_or(n)
                .to_string()
        })
        .collect();
    let cluster_only = [
        "chatmesh_sync_pending",
        "chatmesh_sync_lag_seconds",
        "chatmesh_sync_errors_total",
        "chatmesh_sync_stored_total",
        "chatmesh_redis_connected_replicas",
        "chatmesh_redis_replication_lag_seconds",
        "chatmesh_redis_aof_enabled",
        // Only with peer regions (tests/cluster/regions.rs checks them there).
        "chatmesh_replication_lag_seconds",
        "chatmesh_replication_applied_total",
        "chatmesh_replication_errors_total",
        "chatmesh_region_forwarded_total",
        "chatmesh_region_forward_latency_seconds",
        "chatmesh_hlc_refused_total",
        "chatmesh_lease_token",
        "chatmesh_lease_held",
        "chatmesh_lease_renewed_age_seconds",
        "chatmesh_sends_lapsed_total",
        "chatmesh_fenced_refused_total",
        "chatmesh_takeovers_total",
        "chatmesh_region_acks_degraded_total",
        "chatmesh_rate_limited_total",
        "chatmesh_socket_events_total",
        // Only once a forged pub/sub payload arrived (cluster mode).
        "chatmesh_forged_events_total",
        // Only with TLS on / once a client was slow.
        "chatmesh_tls_reloads_total",
        "chatmesh_http_timeouts_total",
    ];
    for name in &documented {
        assert!(exported.contains(*name) || cluster_only.contains(name), "{name} is documented but not exported");
    }
    for name in &exported {
        assert!(documented.contains(&name.as_str()), "{name} is exported but not in docs/metrics.md");
    }
    assert_eq!(documented.len(), chatmesh::metrics::ALL.len(), "docs/metrics.md and metrics::ALL differ");
    for name in chatmesh::metrics::ALL {
        assert!(documented.contains(name), "{name} (metrics::ALL) is not documented");
    }
}

#[tokio::test]
async fn the_operations_page_and_its_assets_are_served() {
    let app = spawn_app().await;
    for (path, ty, needle) in [
        ("/admin", "text/html", "/assets/admin.js"),
        ("/assets/admin.js", "text/javascript", "/api/v1/cluster"),
        ("/assets/admin.css", "text/css", "{"),
    ] {
        let res = app.http.get(format!("{}{path}", app.url)).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{path}");
        assert!(res.headers()["content-type"].to_str().unwrap().starts_with(ty), "{path}");
        assert!(res.text().await.unwrap().contains(needle), "{path} lacks {needle}");
    }
}

#[tokio::test]
async fn the_cluster_view_describes_this_instance_for_the_operations_page() {
    let app = spawn_app().await;
    let (_, t) = app.register("view_user").await;
    let room = app.create_room(&t, "view-room", "public").await;
    for i in 0..3 {
        assert_eq!(app.send(&t, &room, &format!("v-{i}"), "x").await.status, StatusCode::CREATED);
    }
    let r = app.call(Method::GET, "/api/v1/cluster", None, None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let me = &r.body["instances"][0];
    assert_eq!(me["accepted_total"], 3, "{me}");
    assert_eq!(me["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(me["circuits"]["store"], "closed");
    assert!(me["recent_errors"].is_array());
    assert!(me["delivered_total"].is_u64());
}

#[tokio::test]
async fn cross_origin_requests_are_refused_unless_the_origin_is_listed() {
    let preflight = |app: &TestApp, origin: &'static str, path: &'static str| {
        app.http
            .request(Method::OPTIONS, format!("{}{path}", app.url))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "content-type, authorization")
            .send()
    };
    let acao = |res: &reqwest::Response| {
        res.headers().get("access-control-allow-origin").map(|v| v.to_str().unwrap().to_string())
    };

    // Closed by default: no preflight passes, no answer is readable cross-origin.
    let closed = spawn_app().await;
    let res = preflight(&closed, "https://app.example", "/api/v1/auth/login").await.unwrap();
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    assert_eq!(acao(&res), None);
    let res = closed
        .http
        .get(format!("{}/health/live", closed.url))
        .header("origin", "https://app.example")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(acao(&res), None, "no Access-Control-Allow-Origin by default");

    let open = spawn_with(Spawn {
        env: vec![("CHATMESH_CORS_ORIGINS", "https://app.example, http://localhost:3000".into())],
        ..Default::default()
    })
    .await;
    for path in ["/api/v1/auth/login", "/socket.io/?EIO=4&transport=polling"] {
        let res = preflight(&open, "https://App.Example", path).await.unwrap();
        assert_eq!(res.status(), StatusCode::NO_CONTENT, "{path}");
        assert_eq!(acao(&res).as_deref(), Some("https://app.example"), "{path}: its own origin, never *");
        let headers = res.headers()["access-control-allow-headers"].to_str().unwrap().to_string();
        assert!(headers.contains("authorization") && headers.contains("content-type"), "{headers}");
        assert!(res.headers().get("access-control-allow-credentials").is_none(), "tokens are not cookies");
    }
    let res = preflight(&open, "https://evil.example", "/api/v1/auth/login").await.unwrap();
    assert_eq!(res.status(), StatusCode::FORBIDDEN, "an origin not on the list");
    let res = open
        .http
        .post(format!("{}/api/v1/auth/register", open.url))
        .header("origin", "http://localhost:3000")
        .json(&serde_json::json!({"username": "cors_user", "password": "correct horse battery"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(acao(&res).as_deref(), Some("http://localhost:3000"));
    assert!(res.headers().get_all("vary").iter().any(|v| v.to_str().unwrap().contains("origin")));
    let res = open
        .http
        .get(format!("{}/health/live", open.url))
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(acao(&res), None, "a listed origin opens nothing to the others");

    let (code, stderr) = run_to_exit(&[("CHATMESH_CORS_ORIGINS", "*")], &["serve"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("CHATMESH_CORS_ORIGINS"), "{stderr}");
}
