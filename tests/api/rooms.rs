use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::helpers::*;

#[tokio::test]
async fn room_lifecycle_and_permissions() {
    let app = spawn_app().await;
    let (owner_id, owner) = app.register("owner").await;
    let (guest_id, guest) = app.register("guest").await;

    let r =
        app.call(Method::POST, "/api/v1/rooms", Some(json!({"name": "general", "topic": "hi"})), Some(&owner)).await;
    assert_eq!(r.status, StatusCode::CREATED);
    let room = r.body["id"].as_str().unwrap().to_string();
    assert_eq!(r.body["visibility"], "public");
    assert_eq!(r.body["owner_id"], owner_id.as_str());
    assert_eq!(r.body["member_count"], 1);
    assert_eq!(r.body["head_seq"], 0);
    assert_eq!(r.body["home_region"], "local");

    for bad in [
        json!({"name": ""}),
        json!({"name": "n".repeat(81)}),
        json!({"name": "ok", "topic": "t".repeat(513)}),
        json!({"name": "ok", "visibility": "secret"}),
        json!({}),
    ] {
        let r = app.call(Method::POST, "/api/v1/rooms", Some(bad.clone()), Some(&owner)).await;
        assert_eq!((r.status, r.code()), (StatusCode::BAD_REQUEST, "validation_failed"), "{bad}");
    }
    let r = app
        .call(
            Method::POST,
            "/api/v1/rooms",
            Some(json!({"name": "n".repeat(80), "topic": "t".repeat(512)})),
            Some(&owner),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "80/512 are the edges");

    let private = app.create_room(&owner, "secret", "private").await;

    // Listing.
    let r = app.call(Method::GET, "/api/v1/rooms", None, Some(&guest)).await;
    assert_eq!(r.body["rooms"].as_array().unwrap().len(), 0, "joined is the default scope");
    let r = app.call(Method::GET, "/api/v1/rooms?scope=public", None, Some(&guest)).await;
    let public: Vec<_> =
        r.body["rooms"].as_array().unwrap().iter().map(|r| r["id"].as_str().unwrap().to_string()).collect();
    assert!(public.contains(&room) && !public.contains(&private));
    let r = app.call(Method::GET, "/api/v1/rooms?scope=everything", None, Some(&guest)).await;
    assert_eq!((r.status, r.code()), (StatusCode::BAD_REQUEST, "validation_failed"));

    // Visibility.
    let r = app.call(Method::GET, &format!("/api/v1/rooms/{room}"), None, Some(&guest)).await;
    assert_eq!(r.status, StatusCode::OK);
    let r = app.call(Method::GET, &format!("/api/v1/rooms/{private}"), None, Some(&guest)).await;
    assert_eq!((r.status, r.code()), (StatusCode::FORBIDDEN, "forbidden"));
    let r = app.call(Method::GET, "/api/v1/rooms/01NOSUCHROOM0000000000000", None, Some(&guest)).await;
    assert_eq!((r.status, r.code()), (StatusCode::NOT_FOUND, "not_found"));

    // Owner-only changes.
    let r =
        app.call(Method::PATCH, &format!("/api/v1/rooms/{room}"), Some(json!({"name": "hijack"})), Some(&guest)).await;
    assert_eq!((r.status, r.code()), (StatusCode::FORBIDDEN, "forbidden"));
    let r = app
        .call(Method::PATCH, &format!("/api/v1/rooms/{room}"), Some(json!({"topic": "new topic"})), Some(&owner))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!((r.body["topic"].as_str(), r.body["name"].as_str()), (Some("new topic"), Some("general")));
    let r = app.call(Method::PATCH, &format!("/api/v1/rooms/{room}"), Some(json!({"name": ""})), Some(&owner)).await;
    assert_eq!(r.code(), "validation_failed");

    // Members only.
    let r = app.call(Method::GET, &format!("/api/v1/rooms/{room}/members"), None, Some(&guest)).await;
    assert_eq!((r.status, r.code()), (StatusCode::FORBIDDEN, "forbidden"));

    // Join / leave.
    let r = app.call(Method::POST, &format!("/api/v1/rooms/{room}/join"), None, Some(&guest)).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["member_count"], 2);
    let r = app.call(Method::POST, &format!("/api/v1/rooms/{room}/join"), None, Some(&guest)).await;
    assert_eq!(r.body["member_count"], 2, "joining twice is idempotent");
    let r = app.call(Method::GET, &format!("/api/v1/rooms/{room}/members"), None, Some(&guest)).await;
    let ids: Vec<_> =
        r.body["members"].as_array().unwrap().iter().map(|u| u["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(ids, vec![owner_id.clone(), guest_id.clone()]);
    let r = app.call(Method::POST, &format!("/api/v1/rooms/{private}/join"), None, Some(&guest)).await;
    assert_eq!((r.status, r.code()), (StatusCode::FORBIDDEN, "forbidden"));
    let r = app.call(Method::POST, &format!("/api/v1/rooms/{room}/leave"), None, Some(&guest)).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = app.call(Method::GET, &format!("/api/v1/rooms/{room}"), None, Some(&owner)).await;
    assert_eq!(r.body["member_count"], 1);

    // Invites.
    let r = app
        .call(
            Method::POST,
            &format!("/api/v1/rooms/{private}/members"),
            Some(json!({"user_id": owner_id})),
            Some(&guest),
        )
        .await;
    assert_eq!((r.status, r.code()), (StatusCode::FORBIDDEN, "forbidden"));
    let r = app
        .call(
            Method::POST,
            &format!("/api/v1/rooms/{private}/members"),
            Some(json!({"user_id": "01NOSUCHUSER0000000000000"})),
            Some(&owner),
        )
        .await;
    assert_eq!((r.status, r.code()), (StatusCode::NOT_FOUND, "not_found"));
    let r = app.call(Method::POST, &format!("/api/v1/rooms/{private}/members"), Some(json!({})), Some(&owner)).await;
    assert_eq!(r.code(), "validation_failed");
    let r = app
        .call(
            Method::POST,
            &format!("/api/v1/rooms/{private}/members"),
            Some(json!({"user_id": guest_id})),
            Some(&owner),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = app.call(Method::GET, &format!("/api/v1/rooms/{private}"), None, Some(&guest)).await;
    assert_eq!(r.status, StatusCode::OK, "an invited member sees the private room");
    let r = app.call(Method::POST, &format!("/api/v1/rooms/{private}/join"), None, Some(&guest)).await;
    assert_eq!(r.status, StatusCode::OK);
    let r = app.call(Method::GET, "/api/v1/rooms", None, Some(&guest)).await;
    let joined: Vec<_> =
        r.body["rooms"].as_array().unwrap().iter().map(|r| r["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(joined, vec![private.clone()]);
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_in_the_error_shape() {
    let app = spawn_app().await;
    let r = app.call(Method::GET, "/api/v1/nothing", None, None).await;
    assert_eq!((r.status, r.code()), (StatusCode::NOT_FOUND, "not_found"));
    let r = app.call(Method::DELETE, "/api/v1/rooms", None, None).await;
    assert_eq!(r.code(), "not_found");
}

#[tokio::test]
async fn room_creations_and_changes_are_rate_limited_per_user() {
    let app =
        spawn_with(Spawn { env: vec![("CHATMESH_ROOM_CHANGE_RATE_PER_MIN", "3".into())], ..Default::default() }).await;
    let (_, alice) = app.register("rc_alice").await;
    let (bob_id, bob) = app.register("rc_bob").await;
    let room = app.create_room(&alice, "one", "public").await;
    let r = app.call(Method::PATCH, &format!("/api/v1/rooms/{room}"), Some(json!({"topic": "t"})), Some(&alice)).await;
    assert_eq!(r.status, StatusCode::OK);
    let r = app
        .call(Method::POST, &format!("/api/v1/rooms/{room}/members"), Some(json!({"user_id": bob_id})), Some(&alice))
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "the third change of the minute");
    let r = app.call(Method::POST, "/api/v1/rooms", Some(json!({"name": "four"})), Some(&alice)).await;
    assert_eq!((r.status, r.code()), (StatusCode::TOO_MANY_REQUESTS, "rate_limited"), "the fourth");
    assert!(r.headers.contains_key("retry-after"));
    // Bob's budget is his own; his leave is a change too.
    let r = app.call(Method::POST, "/api/v1/rooms", Some(json!({"name": "bob's"})), Some(&bob)).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let r = app.call(Method::POST, &format!("/api/v1/rooms/{room}/leave"), None, Some(&bob)).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn member_lists_come_in_pages() {
    let app = spawn_app().await;
    let (_, owner) = app.register("pages_owner").await;
    let room = app.create_room(&owner, "big", "public").await;
    let mut expected = vec![];
    for i in 0..4 {
        let (id, token) = app.register(&format!("pages_m{i}")).await;
        let r = app.call(Method::POST, &format!("/api/v1/rooms/{room}/join"), None, Some(&token)).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        expected.push(id);
    }
    let members = format!("/api/v1/rooms/{room}/members");
    let all = app.call(Method::GET, &members, None, Some(&owner)).await;
    assert_eq!(all.body["members"].as_array().unwrap().len(), 5, "{}", all.body);
    assert_eq!(all.body["next_after"], serde_json::Value::Null, "one page holds them all");

    let mut seen = vec![];
    let mut after: Option<String> = None;
    for _ in 0..5 {
        let q = after.as_ref().map(|a| format!("&after={a}")).unwrap_or_default();
        let r = app.call(Method::GET, &format!("{members}?limit=2{q}"), None, Some(&owner)).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        let page = r.body["members"].as_array().unwrap();
        assert!(page.len() <= 2);
        seen.extend(page.iter().map(|u| u["id"].as_str().unwrap().to_string()));
        match r.body["next_after"].as_str() {
            Some(next) => after = Some(next.to_string()),
            None => break,
        }
    }
    assert_eq!(seen.len(), 5, "every member once: {seen:?}");
    assert_eq!(&seen[1..], &expected[..], "in join order, the owner first");

    for (q, why) in [
        ("limit=0", "zero"),
        ("limit=1001", "over the cap"),
        ("limit=x", "not a number"),
        ("after=nonsense", "bad cursor"),
    ] {
        let r = app.call(Method::GET, &format!("{members}?{q}"), None, Some(&owner)).await;
        assert_eq!((r.status, r.code()), (StatusCode::BAD_REQUEST, "validation_failed"), "{why}: {}", r.body);
    }
    let r = app.call(Method::GET, &format!("{members}?limit=1000"), None, Some(&owner)).await;
    assert_eq!(r.status, StatusCode::OK, "the cap itself");
}
