//! Trust between instances: the send script seals exactly as the instances do, and the internal
//! API takes only short-lived internal tokens from allowed addresses.

use reqwest::{Method, StatusCode};

use crate::support::procs::RedisServer;
use crate::{SECRET, TestDatabase, cluster_instance, test_seal};

/// The seal computed in Lua by Redis (what the send script publishes) is the one the instances
/// compute and check in Rust, byte for byte, for bodies of every kind of byte.
#[test]
fn the_lua_seal_is_the_rust_seal() {
    let redis = RedisServer::start();
    let seal = test_seal();
    let script = format!("{}return seal(ARGV[1], ARGV[2])", seal.lua_prelude());
    let long = "x".repeat(70_000);
    for body in ["", "{\"seq\":1}", "é€😀 \\ \" \n \t", long.as_str()] {
        let channel = "cm:{s3}:room:01ABC";
        let lua = redis.cli(&["EVAL", &script, "0", channel, body]);
        assert_eq!(lua.trim_end_matches('\n'), seal.seal(channel, body), "body {:?}", &body[..body.len().min(20)]);
        assert_eq!(seal.open(channel, lua.trim_end_matches('\n')), Ok(body));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_internal_api_takes_internal_tokens_from_allowed_addresses_only() {
    let redis = RedisServer::start();
    let db = TestDatabase::create();
    let n1 = cluster_instance(redis.url(), db.url(), "i1", vec![]).await;
    let secret = chatmesh::config::Secret::new(SECRET.to_string());
    let caller = chatmesh::internal::InternalTokens::new(&secret, "peer-7");
    let ping = "/internal/v1/ping";

    let r = n1.call(Method::GET, ping, None, Some(&caller.issue())).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!((r.body["instance_id"].as_str(), r.body["caller"].as_str()), (Some("i1"), Some("peer-7")));

    let (_, user_token) = n1.register("not_an_instance").await;
    let other_cluster = chatmesh::internal::InternalTokens::new(&chatmesh::config::Secret::new("x".repeat(40)), "n1");
    for (token, why) in [
        (None, "no token"),
        (Some(user_token.as_str()), "a user token"),
        (Some(SECRET), "the cluster secret itself"),
        (Some("garbage"), "garbage"),
    ] {
        let r = n1.call(Method::GET, ping, None, token).await;
        assert_eq!((r.status, r.code()), (StatusCode::UNAUTHORIZED, "unauthorized"), "{why}: {}", r.body);
    }
    let r = n1.call(Method::GET, ping, None, Some(&other_cluster.issue())).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "another cluster's internal token");
    // An internal token is no user token either.
    let r = n1.call(Method::GET, "/api/v1/users/me", None, Some(&caller.issue())).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);

    // From an address outside the allow-list, even a valid token is refused before it is read.
    let n2 =
        cluster_instance(redis.url(), db.url(), "i2", vec![("CHATMESH_INTERNAL_ALLOW", "10.0.0.0/8,fd00::/8".into())])
            .await;
    let r = n2.call(Method::GET, ping, None, Some(&caller.issue())).await;
    assert_eq!((r.status, r.code()), (StatusCode::FORBIDDEN, "forbidden"), "{}", r.body);
}
