use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::helpers::*;

#[tokio::test]
async fn register_login_and_errors() {
    let app = spawn_app().await;
    let r = app
        .call(
            Method::POST,
            "/api/v1/auth/register",
            Some(json!({"username": "Alice_1", "password": "password123", "display_name": "Alice"})),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(r.body["user"]["username"], "alice_1", "stored lower-case");
    assert_eq!(r.body["user"]["display_name"], "Alice");
    assert!(r.body["user"].get("password_hash").is_none());
    let created = r.body["user"]["created_at"].as_str().unwrap();
    assert!(created.ends_with('Z') && created.len() == 24, "RFC 3339 with millis: {created}");

    // Case-insensitive uniqueness.
    let r = app
        .call(
            Method::POST,
            "/api/v1/auth/register",
            Some(json!({"username": "ALICE_1", "password": "password123"})),
            None,
        )
        .await;
    assert_eq!((r.status, r.code()), (StatusCode::CONFLICT, "conflict"));

    for (body, why) in [
        (json!({"username": "ab", "password": "password123"}), "short username"),
        (json!({"username": "a".repeat(33), "password": "password123"}), "long username"),
        (json!({"username": "bad name", "password": "password123"}), "bad charset"),
        (json!({"username": "bobby", "password": "1234567"}), "7-char password"),
        (json!({"username": "bobby", "password": "x".repeat(129)}), "129-char password"),
        (json!({"username": "bobby", "password": "password123", "display_name": "x".repeat(65)}), "long display_name"),
        (json!({"password": "password123"}), "missing username"),
        (json!({"username": 5, "password": "password123"}), "username not a string"),
        (json!(["not", "an", "object"]), "array body"),
    ] {
        let r = app.call(Method::POST, "/api/v1/auth/register", Some(body), None).await;
        assert_eq!((r.status, r.code()), (StatusCode::BAD_REQUEST, "validation_failed"), "{why}");
    }
    let r = app.raw(Method::POST, "/api/v1/auth/register", b"{not json".to_vec(), None).await;
    assert_eq!((r.status, r.code()), (StatusCode::BAD_REQUEST, "validation_failed"));

    // A cross-site page can post text/plain or a form without a preflight: such bodies are refused
    // even when they hold valid JSON, and nothing is created.
    let valid = br#"{"username": "csrf_victim", "password": "correct horse battery"}"#;
    for ty in ["text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded", "multipart/form-data"] {
        let res = app
            .http
            .post(format!("{}/api/v1/auth/register", app.url))
            .header("content-type", ty)
            .body(valid.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::BAD_REQUEST, "{ty}");
        let body: serde_json::Value = res.json().await.unwrap();
        assert_eq!(body["error"]["code"], "validation_failed", "{ty}: {body}");
    }
    let res = app.http.post(format!("{}/api/v1/auth/register", app.url)).body(valid.to_vec()).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST, "no Content-Type at all");
    let r = app
        .call(
            Method::POST,
            "/api/v1/auth/login",
            Some(json!({"username": "csrf_victim", "password": "correct horse battery"})),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "none of the refused posts registered the user");
    let res = app
        .http
        .post(format!("{}/api/v1/auth/register", app.url))
        .header("content-type", "Application/JSON; charset=utf-8")
        .body(valid.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED, "application/json with parameters, any case");

    // Edges that must pass.
    let r = app
        .call(
            Method::POST,
            "/api/v1/auth/register",
            Some(json!({"username": "a".repeat(32), "password": "x".repeat(128)})),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let r = app
        .call(Method::POST, "/api/v1/auth/register", Some(json!({"username": "abc", "password": "€".repeat(8)})), None)
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "8 multi-byte chars is a valid password: {}", r.body);

    let r = app
        .call(Method::POST, "/api/v1/auth/login", Some(json!({"username": "alice_1", "password": "password123"})), None)
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let token = r.body["token"].as_str().unwrap().to_string();
    let r = app
        .call(Method::POST, "/api/v1/auth/login", Some(json!({"username": "ALICE_1", "password": "password123"})), None)
        .await;
    assert_eq!(r.status, StatusCode::OK, "login is case-insensitive on the username");
    let r = app
        .call(
            Method::POST,
            "/api/v1/auth/login",
            Some(json!({"username": "alice_1", "password": "wrong-password"})),
            None,
        )
        .await;
    assert_eq!((r.status, r.code()), (StatusCode::UNAUTHORIZED, "invalid_credentials"));
    let r = app
        .call(
            Method::POST,
            "/api/v1/auth/login",
            Some(json!({"username": "nobody_here", "password": "password123"})),
            None,
        )
        .await;
    assert_eq!((r.status, r.code()), (StatusCode::UNAUTHORIZED, "invalid_credentials"));

    let r = app.call(Method::GET, "/api/v1/users/me", None, Some(&token)).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["username"], "alice_1");
}

#[tokio::test]
async fn tokens_are_checked() {
    let app = spawn_app().await;
    let other = spawn_app().await;
    let (_, foreign_token) = other.register("mallory").await;
    let r = app.call(Method::GET, "/api/v1/users/me", None, None).await;
    assert_eq!((r.status, r.code()), (StatusCode::UNAUTHORIZED, "unauthorized"));
    let r = app.call(Method::GET, "/api/v1/users/me", None, Some("not.a.jwt")).await;
    assert_eq!((r.status, r.code()), (StatusCode::UNAUTHORIZED, "unauthorized"));
    let r = app.call(Method::GET, "/api/v1/users/me", None, Some(&foreign_token)).await;
    assert_eq!((r.status, r.code()), (StatusCode::UNAUTHORIZED, "unauthorized"), "signed with another secret");
    for (m, p) in [(Method::GET, "/api/v1/rooms"), (Method::POST, "/api/v1/rooms"), (Method::GET, "/api/v1/users/x")] {
        let r = app.call(m, p, Some(json!({})), None).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{p}");
    }
}

#[tokio::test]
async fn profile_updates_and_limits() {
    let app = spawn_app().await;
    let (id, token) = app.register("carol").await;
    let patch = |body| app.call(Method::PATCH, "/api/v1/users/me", Some(body), Some(&token));
    let r = patch(
        json!({"display_name": "Carol C", "status_text": "s".repeat(140), "avatar_url": "https://img.example/c.png"}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["display_name"], "Carol C");
    assert_eq!(r.body["avatar_url"], "https://img.example/c.png");
    assert_ne!(r.body["updated_at"], r.body["created_at"]);
    for bad in [
        json!({"status_text": "s".repeat(141)}),
        json!({"display_name": ""}),
        json!({"display_name": "d".repeat(65)}),
        json!({"avatar_url": "ftp://x/y"}),
        json!({"avatar_url": "a".repeat(513)}),
        json!({"display_name": 7}),
    ] {
        let r = patch(bad.clone()).await;
        assert_eq!((r.status, r.code()), (StatusCode::BAD_REQUEST, "validation_failed"), "{bad}");
    }
    let r = patch(json!({"avatar_url": ""})).await;
    assert_eq!(r.body["avatar_url"], "", "empty string clears the avatar");
    assert_eq!(r.body["display_name"], "Carol C", "absent fields are kept");

    let r = app.call(Method::GET, &format!("/api/v1/users/{id}"), None, Some(&token)).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["status_text"], "s".repeat(140));
    let r = app.call(Method::GET, "/api/v1/users/01NOSUCHUSER0000000000000", None, Some(&token)).await;
    assert_eq!((r.status, r.code()), (StatusCode::NOT_FOUND, "not_found"));
}

#[tokio::test]
async fn failed_logins_are_limited_per_account_from_any_address() {
    let app = spawn_with(Spawn {
        env: vec![("CHATMESH_LOGIN_FAILURES_PER_MIN", "2".into()), ("CHATMESH_TRUST_PROXY", "true".into())],
        ..Default::default()
    })
    .await;
    app.register("erin").await;
    let login = |ip: &'static str, password: &'static str| {
        app.http
            .post(format!("{}/api/v1/auth/login", app.url))
            .header("x-forwarded-for", ip)
            .json(&json!({"username": "Erin", "password": password}))
            .send()
    };
    // Right passwords cost nothing.
    for _ in 0..3 {
        assert_eq!(login("10.1.0.1", "password123").await.unwrap().status(), StatusCode::OK);
    }
    assert_eq!(login("10.1.0.2", "wrong-password").await.unwrap().status(), StatusCode::UNAUTHORIZED);
    assert_eq!(login("10.1.0.3", "wrong-password").await.unwrap().status(), StatusCode::UNAUTHORIZED);
    let res = login("10.1.0.4", "password123").await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS, "past two failures even the right password waits");
    assert!(res.headers().contains_key("retry-after"));
    // Unknown accounts have budgets too, and answer the same way.
    for _ in 0..2 {
        let r = app
            .call(Method::POST, "/api/v1/auth/login", Some(json!({"username": "nobody_here", "password": "x"})), None)
            .await;
        assert_eq!((r.status, r.code()), (StatusCode::UNAUTHORIZED, "invalid_credentials"));
    }
    let r = app
        .call(Method::POST, "/api/v1/auth/login", Some(json!({"username": "nobody_here", "password": "x"})), None)
        .await;
    assert_eq!((r.status, r.code()), (StatusCode::TOO_MANY_REQUESTS, "rate_limited"));
}

#[tokio::test]
async fn auth_attempts_are_rate_limited_per_ip() {
    let app = spawn_with(Spawn { env: vec![("CHATMESH_AUTH_RATE_PER_MIN", "3".into())], ..Default::default() }).await;
    app.register("dave").await;
    for _ in 0..2 {
        let r = app
            .call(
                Method::POST,
                "/api/v1/auth/login",
                Some(json!({"username": "dave", "password": "password123"})),
                None,
            )
            .await;
        assert_eq!(r.status, StatusCode::OK);
    }
    let r = app
        .call(Method::POST, "/api/v1/auth/login", Some(json!({"username": "dave", "password": "password123"})), None)
        .await;
    assert_eq!((r.status, r.code()), (StatusCode::TOO_MANY_REQUESTS, "rate_limited"));
    let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=20).contains(&retry), "Retry-After {retry}");
}
