//! Logout and password change: the tokens they revoke are refused everywhere a token is taken,
//! with the answer an expired or forged token gets, and stay refused across a restart.

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::helpers::*;

async fn login(app: &TestApp, username: &str, password: &str) -> crate::helpers::Resp {
    app.call(Method::POST, "/api/v1/auth/login", Some(json!({"username": username, "password": password})), None).await
}

async fn me(app: &TestApp, token: &str) -> StatusCode {
    app.call(Method::GET, "/api/v1/users/me", None, Some(token)).await.status
}

#[tokio::test]
async fn logout_revokes_the_presented_token_only_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let spawn = || spawn_with(Spawn { data_dir: Some(dir.path()), ..Spawn::default() });
    let mut app = spawn().await;
    let (_, first) = app.register("logout_1").await;
    let second = login(&app, "logout_1", "password123").await.body["token"].as_str().unwrap().to_string();
    assert_eq!(me(&app, &first).await, StatusCode::OK);

    let r = app.call(Method::POST, "/api/v1/auth/logout", None, Some(&first)).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.body);
    let r = app.call(Method::GET, "/api/v1/users/me", None, Some(&first)).await;
    assert_eq!((r.status, r.code()), (StatusCode::UNAUTHORIZED, "unauthorized"));
    assert_eq!(r.body["error"]["message"], "invalid or expired token", "the answer of any refused token");
    assert_eq!(me(&app, &second).await, StatusCode::OK, "another token of the same user is untouched");

    let r = app.call(Method::POST, "/api/v1/auth/logout", None, Some(&first)).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "a revoked token cannot log out again");
    let r = app.call(Method::POST, "/api/v1/auth/logout", None, None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "no token");

    app.signal("TERM");
    app.wait_exit(std::time::Duration::from_secs(20));
    let app = spawn().await;
    assert_eq!(me(&app, &first).await, StatusCode::UNAUTHORIZED, "still revoked after a restart");
    assert_eq!(me(&app, &second).await, StatusCode::OK);
}

#[tokio::test]
async fn a_password_change_revokes_every_earlier_token() {
    let app = spawn_app().await;
    let (_, first) = app.register("passwd_1").await;
    let second = login(&app, "passwd_1", "password123").await.body["token"].as_str().unwrap().to_string();
    let path = "/api/v1/users/me/password";

    let wrong = json!({"current_password": "not-it-at-all", "new_password": "new password 456"});
    let r = app.call(Method::POST, path, Some(wrong), Some(&first)).await;
    assert_eq!((r.status, r.code()), (StatusCode::UNAUTHORIZED, "invalid_credentials"));
    let weak = json!({"current_password": "password123", "new_password": "short"});
    let r = app.call(Method::POST, path, Some(weak), Some(&first)).await;
    assert_eq!((r.status, r.code()), (StatusCode::BAD_REQUEST, "validation_failed"));
    let r = app.call(Method::POST, path, Some(json!({"new_password": "new password 456"})), Some(&first)).await;
    assert_eq!((r.status, r.code()), (StatusCode::BAD_REQUEST, "validation_failed"), "current_password required");
    assert_eq!(me(&app, &first).await, StatusCode::OK, "refused changes revoke nothing");
    let r =
        app.call(Method::POST, path, Some(json!({"current_password": "password123", "new_password": "x"})), None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "no token");

    let good = json!({"current_password": "password123", "new_password": "new password 456"});
    let r = app.call(Method::POST, path, Some(good), Some(&first)).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.body);
    for t in [&first, &second] {
        assert_eq!(me(&app, t).await, StatusCode::UNAUTHORIZED, "issued before the change");
    }
    assert_eq!(login(&app, "passwd_1", "password123").await.status, StatusCode::UNAUTHORIZED, "old password");
    let r = login(&app, "passwd_1", "new password 456").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    // Issued right after the change (same second, likely): valid.
    assert_eq!(me(&app, r.body["token"].as_str().unwrap()).await, StatusCode::OK);
}
