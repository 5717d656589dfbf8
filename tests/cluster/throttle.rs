//! Budgets against password guessing hold for the whole cluster: two instances share one
//! per-IP budget and one per-account budget of failed logins (in Redis), so a client spreading
//! its guesses over the instances gets no more of them.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::TestApp;
use crate::support::procs::RedisServer;
use crate::{TestDatabase, cluster_instance};

async fn login(app: &TestApp, from_ip: &str, username: &str, password: &str) -> (StatusCode, Value) {
    let res = app
        .http
        .post(format!("{}/api/v1/auth/login", app.url))
        .header("x-forwarded-for", from_ip)
        .json(&json!({"username": username, "password": password}))
        .send()
        .await
        .unwrap();
    let status = res.status();
    (status, res.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_budgets_are_shared_by_every_instance() {
    let redis = RedisServer::start();
    let db = TestDatabase::create();
    let env = || {
        vec![
            ("CHATMESH_TRUST_PROXY", "true".to_string()),
            ("CHATMESH_AUTH_RATE_PER_MIN", "6".to_string()),
            ("CHATMESH_LOGIN_FAILURES_PER_MIN", "3".to_string()),
        ]
    };
    let n1 = cluster_instance(redis.url(), db.url(), "t1", env()).await;
    let n2 = cluster_instance(redis.url(), db.url(), "t2", env()).await;
    // The harness registers from 127.0.0.1 (one attempt each of 127.0.0.1's six).
    n1.register("victim").await;
    n1.register("bystander").await;

    // Per account: three failures spread over both instances and three addresses...
    for (i, app) in [&n1, &n2, &n1].into_iter().enumerate() {
        let (status, body) = login(app, &format!("10.9.0.{i}"), "victim", "wrong password!").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "failure {i}: {body}");
    }
    // ...and the account is closed everywhere, even to the right password, from a fresh address.
    for app in [&n2, &n1] {
        let (status, body) = login(app, "10.9.1.1", "victim", "password123").await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
        assert_eq!(body["error"]["code"], "rate_limited");
    }
    let (status, body) = login(&n2, "10.9.1.2", "bystander", "password123").await;
    assert_eq!(status, StatusCode::OK, "another account keeps its budget: {body}");

    // Per address: six attempts whichever instance gets them, then 429 on both.
    for i in 0..6 {
        let app = if i % 2 == 0 { &n1 } else { &n2 };
        let (status, body) = login(app, "10.9.2.2", "bystander", "password123").await;
        assert_eq!(status, StatusCode::OK, "attempt {i} from one address: {body}");
    }
    for app in [&n1, &n2] {
        let (status, body) = login(app, "10.9.2.2", "bystander", "password123").await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "a seventh attempt from the same address: {body}");
    }
}
