//! The operations views of a cluster (`/api/v1/cluster` lists addresses and recent errors,
//! `/admin` shows them) answer only with `CHATMESH_ADMIN_TOKEN` configured and presented.

use reqwest::{Method, StatusCode};

use crate::support::procs::RedisServer;
use crate::{TestDatabase, cluster_instance};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_views_need_a_configured_admin_token() {
    let redis = RedisServer::start();
    let db = TestDatabase::create();
    let open = cluster_instance(redis.url(), db.url(), "a1", vec![]).await;
    let r = open.call(Method::GET, "/api/v1/cluster", None, None).await;
    assert_eq!((r.status, r.code()), (StatusCode::FORBIDDEN, "forbidden"), "no admin token configured: {:?}", r.body);
    assert!(r.body["error"]["message"].as_str().unwrap().contains("CHATMESH_ADMIN_TOKEN"), "{:?}", r.body);
    let r = open.call(Method::GET, "/api/v1/cluster", None, Some("anything")).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "no token can open it then");
    let page = open.http.get(format!("{}/admin", open.url)).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::FORBIDDEN, "/admin without a configured token");

    let token = "admin-token-0123456789abcdef";
    let guarded = cluster_instance(redis.url(), db.url(), "a2", vec![("CHATMESH_ADMIN_TOKEN", token.into())]).await;
    for wrong in [None, Some("admin-token-0123456789abcdee"), Some("admin-token-0123456789abcdef0"), Some("")] {
        let r = guarded.call(Method::GET, "/api/v1/cluster", None, wrong).await;
        assert_eq!((r.status, r.code()), (StatusCode::UNAUTHORIZED, "unauthorized"), "token {wrong:?}");
    }
    let r = guarded.call(Method::GET, "/api/v1/cluster", None, Some(token)).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["instance_id"], "a2");
    let page = guarded.http.get(format!("{}/admin", guarded.url)).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::OK, "the page asks for the token itself");
}
