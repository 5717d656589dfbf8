//! The store contract: every `Store` backend must pass these, against a real backend.
//!
//! `contract_suite!(module, factory)` instantiates every case for one backend; the factory returns
//! a fresh, empty store (its own file or database) and a guard that cleans it up on drop.
//!
//! Every case runs for every backend, each on a database of its own: SQLite in a temp dir,
//! PostgreSQL on the machine's server (`support::pg`), MongoDB on a private SecantusDB server, or
//! on the real deployment `CHATMESH_TEST_MONGODB_URL` names (`support::mongo`). One exception:
//! `mongodb::export_is_a_snapshot` needs a real `mongod`, because SecantusDB does not pin snapshot
//! reads (see [`mongo_store_with_snapshot_reads`]): it is an ignored test (listed as skipped in
//! every run), which `scripts/test.sh` runs when the variable is set, and which fails loudly if run
//! without it.

#[allow(dead_code)]
#[path = "support/mod.rs"]
mod support;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chatmesh::domain::{Message, RoomId, Timestamp, UserId, Visibility};
use chatmesh::store::mongodb::MongoStore;
use chatmesh::store::postgres::PostgresStore;
use chatmesh::store::sqlite::SqliteStore;
use chatmesh::store::*;
use support::mongo::{self, TestMongoDatabase};
use support::pg::TestDatabase;
use support::procs::SECANTUS_VERSION;

type Fresh = (Arc<dyn Store>, Box<dyn std::any::Any + Send>);

async fn sqlite_store() -> Fresh {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("contract.db")).await.unwrap();
    (Arc::new(store), Box::new(dir))
}

async fn postgres_store() -> Fresh {
    let db = TestDatabase::create();
    let store = PostgresStore::connect(&db.url())
        .await
        .unwrap_or_else(|e| panic!("PostgresStore::connect to database {}: {e:#}", db.name()));
    (Arc::new(store), Box::new(db))
}

/// A fresh database on SecantusDB, or on the deployment `CHATMESH_TEST_MONGODB_URL` names (it must
/// be a replica set, one member is enough: `append_messages` needs transactions).
async fn mongo_store() -> Fresh {
    // The guard exists before the store: a connect that fails half-way still cleans up.
    let db = tokio::task::spawn_blocking(TestMongoDatabase::create).await.unwrap();
    let store = MongoStore::connect(&db.url())
        .await
        .unwrap_or_else(|e| panic!("MongoStore::connect to database {}: {e:#}", db.name()));
    (Arc::new(store), Box::new(db))
}

/// [`mongo_store`] for `export_is_a_snapshot`: only on a real MongoDB deployment
/// (`CHATMESH_TEST_MONGODB_URL`); without one the case fails rather than pass on SecantusDB.
///
/// SecantusDB advertises a replica set and accepts `readConcern: {level: "snapshot"}` on `find`
/// outside transactions, answering with an `atClusterTime`, but it does not read at that time: a
/// later read in the same snapshot session that sends `atClusterTime` back sees documents
/// committed after it (its `secantus/commands.py` says so: "accept-and-record ... reads are NOT
/// actually pinned"). Our export does what a snapshot session needs (the driver pins the time
/// from the first read and sends it on every page); the server does not honour it. The case's
/// assertions stay as they are; it runs where snapshot reads exist.
async fn mongo_store_with_snapshot_reads() -> Fresh {
    assert!(
        mongo::override_url().is_some(),
        "mongodb::export_is_a_snapshot needs a real mongod replica set: SecantusDB {SECANTUS_VERSION} does not pin \
         snapshot reads to their atClusterTime (a snapshot session sees later commits). Set {} (e.g. \
         mongodb://127.0.0.1:27017/?replicaSet=rs0)",
        mongo::URL_VAR
    );
    mongo_store().await
}

fn as_user(id: &str) -> UserId {
    UserId::from(id)
}

fn as_room(id: &str) -> RoomId {
    RoomId::from(id)
}

fn id(prefix: &str, n: usize) -> String {
    format!("{prefix}{n:020}")
}

async fn user(s: &dyn Store, n: usize) -> String {
    let u = s
        .create_user(NewUser {
            id: id("u", n),
            username: format!("user_{n}"),
            display_name: format!("User {n}"),
            password_hash: "$argon2id$fake".into(),
            created_at: Timestamp(1_000 + n as i64),
        })
        .await
        .unwrap();
    u.id
}

async fn room(s: &dyn Store, n: usize, owner: &str, visibility: Visibility) -> String {
    s.create_room(NewRoom {
        id: id("r", n),
        name: format!("room {n}"),
        topic: String::new(),
        visibility,
        owner_id: owner.to_string(),
        home_region: "local".into(),
        created_at: Timestamp(2_000 + n as i64),
    })
    .await
    .unwrap()
    .id
}

fn req(room: &str, sender: &str, cmid: &str, body: &str) -> SendRequest {
    SendRequest {
        message_id: ulid::Ulid::generate().to_string(),
        room_id: room.into(),
        sender_id: sender.into(),
        client_msg_id: cmid.into(),
        body: body.into(),
        created_at: Timestamp::now(),
        trace: String::new(),
        membership: 0,
        epoch: None,
    }
}

fn accepted(o: &AppendOutcome) -> &Message {
    match o {
        AppendOutcome::Accepted(m) => m,
        other => panic!("expected Accepted, got {other:?}"),
    }
}

pub async fn users_round_trip(s: Arc<dyn Store>) {
    let uid = user(&*s, 1).await;
    let got = s.user(&as_user(&uid)).await.unwrap().unwrap();
    assert_eq!((got.username.as_str(), got.status_text.as_str(), got.created_at), ("user_1", "", Timestamp(1_001)));
    let (cred_user, hash) = s.credentials("user_1").await.unwrap().unwrap();
    assert_eq!((cred_user.id, hash.as_str()), (uid.clone(), "$argon2id$fake"));
    assert!(s.credentials("nobody").await.unwrap().is_none());
    assert!(s.user(&as_user("missing")).await.unwrap().is_none());

    let dup = s
        .create_user(NewUser {
            id: id("u", 99),
            username: "user_1".into(),
            display_name: "x".into(),
            password_hash: "h".into(),
            created_at: Timestamp(5),
        })
        .await;
    assert_eq!(dup.unwrap_err(), StoreError::UsernameTaken);

    let patch = UserPatch { status_text: Some("busy".into()), ..Default::default() };
    let updated = s.update_user(&as_user(&uid), patch, Timestamp(9_999)).await.unwrap();
    assert_eq!((updated.status_text.as_str(), updated.display_name.as_str()), ("busy", "User 1"));
    assert_eq!(updated.updated_at, Timestamp(9_999));
    assert_eq!(s.user(&as_user(&uid)).await.unwrap().unwrap(), updated);
    let missing = s.update_user(&as_user("missing"), UserPatch::default(), Timestamp(1)).await;
    assert_eq!(missing.unwrap_err(), StoreError::NotFound("user"));
}

pub async fn rooms_and_listing(s: Arc<dyn Store>) {
    let a = user(&*s, 1).await;
    let b = user(&*s, 2).await;
    let r1 = room(&*s, 1, &a, Visibility::Public).await;
    let r2 = room(&*s, 2, &a, Visibility::Private).await;
    let r3 = room(&*s, 3, &b, Visibility::Public).await;

    let got = s.room(&as_room(&r1)).await.unwrap().unwrap();
    assert_eq!((got.head_seq, got.member_count, got.owner_id.as_str()), (0, 1, a.as_str()));
    assert!(s.is_member(&as_room(&r1), &as_user(&a)).await.unwrap(), "the owner is the first member");

    let public: Vec<_> = s.public_rooms(10).await.unwrap().into_iter().map(|r| r.id).collect();
    assert_eq!(public, vec![r3.clone(), r1.clone()], "public only, newest first");
    assert_eq!(s.public_rooms(1).await.unwrap().len(), 1);
    let mine: Vec<_> = s.rooms_of_user(&as_user(&a)).await.unwrap().into_iter().map(|r| r.id).collect();
    assert_eq!(mine, vec![r2.clone(), r1.clone()]);

    let patched = s
        .update_room(&as_room(&r1), RoomPatch { topic: Some("t".into()), ..Default::default() }, Timestamp(7_000))
        .await
        .unwrap();
    assert_eq!((patched.name.as_str(), patched.topic.as_str(), patched.updated_at), ("room 1", "t", Timestamp(7_000)));
    assert_eq!(
        s.update_room(&as_room("nope"), RoomPatch::default(), Timestamp(1)).await.unwrap_err(),
        StoreError::NotFound("room")
    );
    assert!(s.room(&as_room("nope")).await.unwrap().is_none());
}

/// Per-field last-writer-wins: a versioned change applies to a field only if its version is
/// greater than that of the field's last write, whatever order the changes arrive in; fields are
/// versioned independently; an unversioned change applies and keeps the field's version.
pub async fn versioned_changes_converge(s: Arc<dyn Store>) {
    let a = user(&*s, 1).await;
    let r = room(&*s, 1, &a, Visibility::Public).await;
    let (v1, v2, v3) = ("0000000000000001-b", "0000000000000002-a", "0000000000000002-b");
    let patch = |name: Option<&str>, topic: Option<&str>, version: &str| RoomPatch {
        name: name.map(str::to_string),
        topic: topic.map(str::to_string),
        version: version.to_string(),
    };
    let room = &as_room(&r);
    // The newer name arrives first; the older one, arriving later, loses.
    let got = s.update_room(room, patch(Some("newer"), None, v2), Timestamp(10)).await.unwrap();
    assert_eq!(got.name, "newer");
    let got = s.update_room(room, patch(Some("older"), Some("topic from v1"), v1), Timestamp(11)).await.unwrap();
    assert_eq!((got.name.as_str(), got.topic.as_str()), ("newer", "topic from v1"), "the topic had no newer write");
    // Same timestamp, another region: the region id breaks the tie.
    let got = s.update_room(room, patch(Some("tie, region b"), None, v3), Timestamp(12)).await.unwrap();
    assert_eq!(got.name, "tie, region b");
    let got = s.update_room(room, patch(Some("tie, region a"), None, v2), Timestamp(13)).await.unwrap();
    assert_eq!(got.name, "tie, region b");
    assert_eq!(s.room(room).await.unwrap().unwrap().name, "tie, region b");
    // Unversioned (single-region) writes apply, and do not reset the field's version.
    let got = s.update_room(room, patch(Some("plain"), None, ""), Timestamp(14)).await.unwrap();
    assert_eq!(got.name, "plain");
    let got = s.update_room(room, patch(Some("old again"), None, v1), Timestamp(15)).await.unwrap();
    assert_eq!(got.name, "plain");

    let user = &as_user(&a);
    let up = |display: &str, version: &str| UserPatch {
        display_name: Some(display.to_string()),
        version: version.to_string(),
        ..Default::default()
    };
    s.update_user(user, up("second", v2), Timestamp(20)).await.unwrap();
    let got = s.update_user(user, up("first", v1), Timestamp(21)).await.unwrap();
    assert_eq!(got.display_name, "second");
    let status = UserPatch { status_text: Some("away".into()), version: v1.into(), ..Default::default() };
    let got = s.update_user(user, status, Timestamp(22)).await.unwrap();
    assert_eq!((got.display_name.as_str(), got.status_text.as_str()), ("second", "away"));
}

pub async fn membership(s: Arc<dyn Store>) {
    let a = user(&*s, 1).await;
    let b = user(&*s, 2).await;
    let c = user(&*s, 3).await;
    let r = room(&*s, 1, &a, Visibility::Public).await;
    assert!(s.add_member(&as_room(&r), &as_user(&b), Timestamp(3_010)).await.unwrap());
    assert!(!s.add_member(&as_room(&r), &as_user(&b), Timestamp(3_011)).await.unwrap(), "adding twice is a no-op");
    assert!(s.add_member(&as_room(&r), &as_user(&c), Timestamp(3_012)).await.unwrap());
    assert_eq!(s.room(&as_room(&r)).await.unwrap().unwrap().member_count, 3);
    let members: Vec<_> = s.members(&as_room(&r), None, 100).await.unwrap().into_iter().map(|m| m.user.id).collect();
    assert_eq!(members, vec![a.clone(), b.clone(), c.clone()], "in join order");
    // Pages: each starts after the last member of the one before.
    let page = |after: Option<(Timestamp, String)>, limit| {
        let (s, r) = (s.clone(), as_room(&r));
        async move {
            let after = after.as_ref().map(|(at, id)| (*at, id.as_str()));
            s.members(&r, after, limit).await.unwrap()
        }
    };
    let first = page(None, 2).await;
    assert_eq!(first.iter().map(|m| m.user.id.clone()).collect::<Vec<_>>(), vec![a.clone(), b.clone()]);
    let last = first.last().unwrap();
    assert_eq!(last.joined_at, Timestamp(3_010), "each with the time it joined");
    let rest = page(Some((last.joined_at, last.user.id.clone())), 2).await;
    assert_eq!(rest.iter().map(|m| m.user.id.clone()).collect::<Vec<_>>(), vec![c.clone()]);
    assert!(page(Some((Timestamp(3_012), c.clone())), 2).await.is_empty(), "after the last member");
    assert_eq!(s.room_ids_of_user(&as_user(&b)).await.unwrap(), vec![r.clone()]);

    assert!(s.remove_member(&as_room(&r), &as_user(&b)).await.unwrap());
    assert!(!s.remove_member(&as_room(&r), &as_user(&b)).await.unwrap());
    assert!(!s.is_member(&as_room(&r), &as_user(&b)).await.unwrap());
    assert_eq!(s.room(&as_room(&r)).await.unwrap().unwrap().member_count, 2);
    assert_eq!(
        s.add_member(&as_room("nope"), &as_user(&b), Timestamp(1)).await.unwrap_err(),
        StoreError::NotFound("room")
    );
}

pub async fn append_assigns_gap_free_seqs_and_dedupes(s: Arc<dyn Store>) {
    let a = user(&*s, 1).await;
    let b = user(&*s, 2).await;
    let r1 = room(&*s, 1, &a, Visibility::Public).await;
    let r2 = room(&*s, 2, &a, Visibility::Public).await;

    let out = s
        .append_messages(&[
            req(&r1, &a, "c1", "one"),
            req(&r2, &a, "c1", "other room"),
            req(&r1, &a, "c2", "two"),
            req(&r1, &a, "c1", "one"),        // duplicate within the batch
            req(&r1, &a, "c2", "not two"),    // conflict within the batch
            req(&r1, &b, "c1", "b's own c1"), // client_msg_id is per sender
            req("missing", &a, "c9", "lost"),
        ])
        .await
        .unwrap();
    assert_eq!(accepted(&out[0]).seq, 1);
    assert_eq!(accepted(&out[1]).seq, 1, "seqs are per room");
    assert_eq!(accepted(&out[2]).seq, 2);
    assert_eq!(out[3], AppendOutcome::Duplicate(accepted(&out[0]).clone()));
    assert_eq!(out[4], AppendOutcome::Conflict);
    assert_eq!(accepted(&out[5]).seq, 3);
    assert_eq!(out[6], AppendOutcome::RoomMissing);

    // Across batches the original comes back with its id and seq.
    let again = s.append_messages(&[req(&r1, &a, "c2", "two"), req(&r1, &a, "c3", "three")]).await.unwrap();
    assert_eq!(again[0], AppendOutcome::Duplicate(accepted(&out[2]).clone()));
    assert_eq!(accepted(&again[1]).seq, 4);
    assert_eq!(s.head_seq(&as_room(&r1)).await.unwrap(), Some(4));
    assert_eq!(s.head_seq(&as_room(&r2)).await.unwrap(), Some(1));
    assert_eq!(s.head_seq(&as_room("missing")).await.unwrap(), None);
    assert_eq!(s.room(&as_room(&r1)).await.unwrap().unwrap().head_seq, 4);

    let stored = s.messages_after(&as_room(&r1), 0, 100).await.unwrap();
    assert_eq!(stored.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
    assert_eq!(stored[0], *accepted(&out[0]), "stored exactly as acknowledged");
}

pub async fn concurrent_appends_never_share_a_seq(s: Arc<dyn Store>) {
    let a = user(&*s, 1).await;
    let r = room(&*s, 1, &a, Visibility::Public).await;
    let mut tasks = Vec::new();
    for w in 0..8 {
        let (s, r, a) = (s.clone(), r.clone(), a.clone());
        tasks.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for i in 0..25 {
                let out = s.append_messages(&[req(&r, &a, &format!("w{w}-{i}"), "x")]).await.unwrap();
                seqs.push(accepted(&out[0]).seq);
            }
            seqs
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        let seqs = t.await.unwrap();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "one writer's seqs increase");
        all.extend(seqs);
    }
    all.sort();
    assert_eq!(all, (1..=200).collect::<Vec<_>>());
}

pub async fn upsert_is_idempotent(s: Arc<dyn Store>) {
    let a = user(&*s, 1).await;
    let r = room(&*s, 1, &a, Visibility::Public).await;
    let msg = |seq: i64| Message {
        id: format!("m{seq:010}"),
        room_id: r.clone(),
        seq,
        sender_id: a.clone(),
        client_msg_id: format!("c{seq}"),
        body: format!("body {seq}"),
        created_at: Timestamp(seq),
    };
    s.upsert_messages(&[msg(1), msg(2), msg(3)]).await.unwrap();
    s.upsert_messages(&[msg(2), msg(3), msg(4)]).await.unwrap();
    s.upsert_messages(&[msg(4)]).await.unwrap();
    let stored = s.messages_after(&as_room(&r), 0, 100).await.unwrap();
    assert_eq!(stored, vec![msg(1), msg(2), msg(3), msg(4)], "each exactly once");
    assert_eq!(s.head_seq(&as_room(&r)).await.unwrap(), Some(4));
    // An older batch arriving late never lowers the head.
    s.upsert_messages(&[msg(1)]).await.unwrap();
    assert_eq!(s.head_seq(&as_room(&r)).await.unwrap(), Some(4));
    // A sequenced message and a retry of its client_msg_id dedupe as one.
    let out = s.append_messages(&[req(&r, &a, "c2", "body 2")]).await.unwrap();
    assert_eq!(out[0], AppendOutcome::Duplicate(msg(2)));
}

pub async fn paging(s: Arc<dyn Store>) {
    let a = user(&*s, 1).await;
    let r = room(&*s, 1, &a, Visibility::Public).await;
    let batch: Vec<_> = (1..=30).map(|i| req(&r, &a, &format!("c{i}"), &format!("{i}"))).collect();
    s.append_messages(&batch).await.unwrap();
    let seqs = |v: Vec<Message>| v.into_iter().map(|m| m.seq).collect::<Vec<_>>();
    assert_eq!(seqs(s.messages_after(&as_room(&r), 10, 5).await.unwrap()), vec![11, 12, 13, 14, 15]);
    assert_eq!(seqs(s.messages_after(&as_room(&r), 28, 5).await.unwrap()), vec![29, 30]);
    assert_eq!(seqs(s.messages_after(&as_room(&r), 30, 5).await.unwrap()), Vec::<i64>::new());
    assert_eq!(seqs(s.messages_before(&as_room(&r), 11, 3).await.unwrap()), vec![8, 9, 10], "ascending");
    assert_eq!(seqs(s.messages_before(&as_room(&r), 3, 10).await.unwrap()), vec![1, 2]);
    assert_eq!(seqs(s.messages_before(&as_room(&r), i64::MAX, 2).await.unwrap()), vec![29, 30]);
    assert!(s.messages_after(&as_room("nope"), 0, 5).await.unwrap().is_empty());
    let ids: HashSet<_> = s.messages_after(&as_room(&r), 0, 100).await.unwrap().into_iter().map(|m| m.id).collect();
    assert_eq!(ids.len(), 30);
    s.ping().await.unwrap();
}

/// Pages through one kind of an export with `limit`, asserting every page respects it and that a
/// short page is the last; returns every row, in order.
macro_rules! drain_pages {
    ($snap:expr, $method:ident, $limit:expr, $key:expr) => {{
        let limit: u32 = $limit;
        let mut rows = Vec::new();
        let mut after = None;
        loop {
            let cursor = after.as_ref().map($key);
            let page = $snap.$method(cursor, limit).await.unwrap();
            assert!(page.len() <= limit as usize, "{} page of {} rows, limit {limit}", stringify!($method), page.len());
            let full = page.len() == limit as usize;
            if let Some(last) = page.last() {
                after = Some(last.clone());
            }
            rows.extend(page);
            if !full {
                break;
            }
        }
        rows
    }};
}

/// Cursors of each kind, from the last row of a page.
fn user_key(r: &UserRecord) -> &str {
    &r.user.id
}
fn room_key(r: &chatmesh::domain::Room) -> &str {
    &r.id
}
fn membership_key(m: &Membership) -> (&str, &str) {
    (&m.room_id, &m.user_id)
}
fn message_key(m: &Message) -> (&str, i64) {
    (&m.room_id, m.seq)
}

/// Users, rooms (one private), memberships and messages spread over rooms; returns
/// (user ids, room ids, memberships) in key order.
async fn populate(s: &dyn Store) -> (Vec<String>, Vec<String>, Vec<(String, String)>) {
    let mut users = Vec::new();
    for n in 1..=7 {
        users.push(user(s, n).await);
    }
    let rooms = vec![
        room(s, 1, &users[0], Visibility::Public).await,
        room(s, 2, &users[1], Visibility::Private).await,
        room(s, 3, &users[0], Visibility::Public).await,
    ];
    let mut members = vec![(rooms[0].clone(), users[0].clone()), (rooms[1].clone(), users[1].clone())];
    members.push((rooms[2].clone(), users[0].clone()));
    for (i, u) in users.iter().enumerate().skip(2) {
        let r = &rooms[i % 3];
        assert!(s.add_member(&as_room(r), &as_user(u), Timestamp(3_000 + i as i64)).await.unwrap());
        members.push((r.clone(), u.clone()));
    }
    members.sort();
    // 12, 8 and 5 messages, interleaved over rooms in one batch and across batches.
    for (r, n) in [(0, 12), (1, 8), (2, 5)] {
        let batch: Vec<_> = (0..n).map(|i| req(&rooms[r], &users[r], &format!("c{r}-{i}"), &format!("m{i}"))).collect();
        for chunk in batch.chunks(3) {
            s.append_messages(chunk).await.unwrap();
        }
    }
    (users, rooms, members)
}

pub async fn export_pages_respect_limit_and_resume(s: Arc<dyn Store>) {
    let (users, rooms, members) = populate(&*s).await;
    let mut expected_messages = Vec::new();
    let mut sorted_rooms = rooms.clone();
    sorted_rooms.sort();
    for r in &sorted_rooms {
        expected_messages.extend(s.messages_after(&as_room(r), 0, 100).await.unwrap());
    }
    assert_eq!(expected_messages.len(), 25);

    let mut snap = s.export().await.unwrap();
    for limit in [1, 2, 3, 7, 1000] {
        let got_users = drain_pages!(snap, users_page, limit, user_key);
        assert_eq!(got_users.iter().map(|r| r.user.id.clone()).collect::<Vec<_>>(), users, "limit {limit}");
        for r in &got_users {
            assert_eq!(r.user, s.user(&as_user(&r.user.id)).await.unwrap().unwrap());
            assert_eq!(r.password_hash, "$argon2id$fake");
        }
        let got_rooms = drain_pages!(snap, rooms_page, limit, room_key);
        assert_eq!(got_rooms.iter().map(|r| r.id.clone()).collect::<Vec<_>>(), sorted_rooms, "limit {limit}");
        for r in &got_rooms {
            assert_eq!(*r, s.room(&as_room(&r.id)).await.unwrap().unwrap(), "rooms carry head_seq and member_count");
        }
        let got_members = drain_pages!(snap, memberships_page, limit, membership_key);
        assert_eq!(
            got_members.iter().map(|m| (m.room_id.clone(), m.user_id.clone())).collect::<Vec<_>>(),
            members,
            "limit {limit}"
        );
        let got_messages = drain_pages!(snap, messages_page, limit, message_key);
        assert_eq!(got_messages, expected_messages, "limit {limit}");
    }
    // joined_at is exported as stored: the owners joined when their room was created.
    let page = snap.memberships_page(None, 1000).await.unwrap();
    let owner = page.iter().find(|m| m.room_id == rooms[1] && m.user_id == users[1]).unwrap();
    assert_eq!(owner.joined_at, Timestamp(2_002));

    // Resuming from any cursor gives exactly the rows after it.
    assert_eq!(
        snap.users_page(Some(&users[2]), 2).await.unwrap().into_iter().map(|r| r.user.id).collect::<Vec<_>>(),
        users[3..5].to_vec()
    );
    assert!(snap.users_page(Some(&users[6]), 10).await.unwrap().is_empty());
    let (r, seq) = (&expected_messages[10].room_id, expected_messages[10].seq);
    assert_eq!(snap.messages_page(Some((r, seq)), 4).await.unwrap(), expected_messages[11..15].to_vec());
    let last = expected_messages.last().unwrap();
    assert!(snap.messages_page(Some((&last.room_id, last.seq)), 4).await.unwrap().is_empty());
    let (mr, mu) = (&members[3].0, &members[3].1);
    assert_eq!(snap.memberships_page(Some((mr, mu)), 100).await.unwrap().len(), members.len() - 4);
    assert_eq!(snap.rooms_page(Some(&sorted_rooms[0]), 1).await.unwrap()[0].id, sorted_rooms[1]);
    assert!(snap.users_page(None, 0).await.unwrap().is_empty(), "limit 0 is an empty page");
    assert!(snap.messages_page(None, 0).await.unwrap().is_empty());
}

pub async fn export_is_a_snapshot(s: Arc<dyn Store>) {
    let a = user(&*s, 1).await;
    let r = room(&*s, 1, &a, Visibility::Public).await;
    let batch: Vec<_> = (1..=3).map(|i| req(&r, &a, &format!("c{i}"), "x")).collect();
    s.append_messages(&batch).await.unwrap();
    let before = s.room(&as_room(&r)).await.unwrap().unwrap();

    let mut snap = s.export().await.unwrap();
    // Writes after the export started, committed before its pages are read.
    let b = user(&*s, 2).await;
    assert!(s.add_member(&as_room(&r), &as_user(&b), Timestamp(5_000)).await.unwrap());
    s.append_messages(&[req(&r, &b, "late", "y")]).await.unwrap();
    room(&*s, 2, &b, Visibility::Public).await;
    if snap.consistency() != ExportConsistency::Snapshot {
        eprintln!("this backend exports best effort (no snapshot): snapshot assertions skipped");
        return;
    }
    let users = snap.users_page(None, 100).await.unwrap();
    assert_eq!(users.iter().map(|u| u.user.id.as_str()).collect::<Vec<_>>(), vec![a.as_str()]);
    assert_eq!(snap.rooms_page(None, 100).await.unwrap(), vec![before.clone()], "head_seq and member_count as of then");
    assert_eq!(snap.memberships_page(None, 100).await.unwrap().len(), 1);
    let msgs = snap.messages_page(None, 100).await.unwrap();
    assert_eq!(msgs.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![1, 2, 3]);
    drop(snap);
    // A new export sees them.
    let mut snap = s.export().await.unwrap();
    assert_eq!(snap.users_page(None, 100).await.unwrap().len(), 2);
    assert_eq!(snap.messages_page(None, 100).await.unwrap().len(), 4);
}

pub async fn import_keeps_everything_and_is_idempotent(s: Arc<dyn Store>) {
    let rec = |n: usize| UserRecord {
        user: chatmesh::domain::User {
            id: id("u", n),
            username: format!("user_{n}"),
            display_name: format!("User {n}"),
            status_text: format!("status {n}"),
            avatar_url: format!("https://example.com/{n}.png"),
            created_at: Timestamp(1_000 + n as i64),
            updated_at: Timestamp(9_000 + n as i64),
        },
        password_hash: format!("$argon2id$hash{n}"),
    };
    let users = vec![rec(1), rec(2), rec(3)];
    s.import_users(&users).await.unwrap();
    s.import_users(&users).await.unwrap();
    for u in &users {
        assert_eq!(s.user(&as_user(&u.user.id)).await.unwrap().unwrap(), u.user);
        let (cu, hash) = s.credentials(&u.user.username).await.unwrap().unwrap();
        assert_eq!((cu, hash), (u.user.clone(), u.password_hash.clone()));
    }
    // A stored id is kept as it is; a username held by another id is refused.
    let mut changed = rec(1);
    changed.user.display_name = "Someone else".into();
    s.import_users(&[changed]).await.unwrap();
    assert_eq!(s.user(&as_user(&id("u", 1))).await.unwrap().unwrap(), users[0].user);
    let mut thief = rec(4);
    thief.user.username = "user_2".into();
    assert_eq!(s.import_users(&[thief]).await.unwrap_err(), StoreError::UsernameTaken);
    assert!(s.user(&as_user(&id("u", 4))).await.unwrap().is_none());

    let room_rec = |n: usize, owner: usize, head: i64, count: i64| chatmesh::domain::Room {
        id: id("r", n),
        name: format!("room {n}"),
        topic: format!("topic {n}"),
        visibility: if n.is_multiple_of(2) { Visibility::Private } else { Visibility::Public },
        owner_id: id("u", owner),
        home_region: "eu".into(),
        head_seq: head,
        member_count: count,
        created_at: Timestamp(2_000 + n as i64),
        updated_at: Timestamp(8_000 + n as i64),
    };
    let rooms = vec![room_rec(1, 1, 3, 2), room_rec(2, 2, 0, 1)];
    s.import_rooms(&rooms).await.unwrap();
    s.import_rooms(&rooms).await.unwrap();
    for r in &rooms {
        assert_eq!(s.room(&as_room(&r.id)).await.unwrap().unwrap(), *r, "stored exactly, counters included");
    }
    assert!(s.members(&as_room(&rooms[0].id), None, 100).await.unwrap().is_empty(), "rooms come without memberships");
    // head_seq is raised, never lowered; nothing else of a stored room changes.
    s.import_rooms(&[room_rec(1, 1, 1, 2)]).await.unwrap();
    assert_eq!(s.head_seq(&as_room(&rooms[0].id)).await.unwrap(), Some(3));
    s.import_rooms(&[room_rec(2, 2, 6, 9)]).await.unwrap();
    assert_eq!(s.room(&as_room(&rooms[1].id)).await.unwrap().unwrap(), room_rec(2, 2, 6, 1));
    assert!(matches!(s.import_rooms(&[room_rec(3, 99, 0, 1)]).await.unwrap_err(), StoreError::NotFound(_)));
    assert!(s.room(&as_room(&id("r", 3))).await.unwrap().is_none());

    let m =
        |r: usize, u: usize, at: i64| Membership { room_id: id("r", r), user_id: id("u", u), joined_at: Timestamp(at) };
    let members = vec![m(1, 1, 2_001), m(1, 3, 2_500), m(2, 2, 2_002)];
    s.import_memberships(&members).await.unwrap();
    s.import_memberships(&members).await.unwrap();
    let in_r1: Vec<_> =
        s.members(&as_room(&id("r", 1)), None, 100).await.unwrap().into_iter().map(|m| m.user.id).collect();
    assert_eq!(in_r1, vec![id("u", 1), id("u", 3)], "in joined_at order");
    assert_eq!(s.room(&as_room(&id("r", 1))).await.unwrap().unwrap().member_count, 2);
    assert_eq!(s.room(&as_room(&id("r", 2))).await.unwrap().unwrap().member_count, 1);
    // member_count follows the stored memberships, whatever the file said.
    s.import_memberships(&[m(2, 3, 2_600)]).await.unwrap();
    assert_eq!(s.room(&as_room(&id("r", 2))).await.unwrap().unwrap().member_count, 2);
    assert!(s.is_member(&as_room(&id("r", 2)), &as_user(&id("u", 3))).await.unwrap());
    let missing_room = s.import_memberships(&[m(9, 1, 1), m(1, 2, 1)]).await.unwrap_err();
    assert!(matches!(missing_room, StoreError::NotFound(_)), "{missing_room:?}");
    let missing_user = s.import_memberships(&[m(1, 9, 1)]).await.unwrap_err();
    assert!(matches!(missing_user, StoreError::NotFound(_)), "{missing_user:?}");
    assert!(
        !s.is_member(&as_room(&id("r", 1)), &as_user(&id("u", 2))).await.unwrap(),
        "nothing of a refused batch is stored"
    );

    let msg = |seq: i64| Message {
        id: format!("m{seq:010}"),
        room_id: id("r", 1),
        seq,
        sender_id: id("u", 1),
        client_msg_id: format!("c{seq}"),
        body: format!("body {seq}"),
        created_at: Timestamp(4_000 + seq),
    };
    let msgs = vec![msg(1), msg(2), msg(3)];
    s.upsert_messages(&msgs).await.unwrap();
    s.upsert_messages(&msgs).await.unwrap();
    assert_eq!(s.messages_after(&as_room(&id("r", 1)), 0, 10).await.unwrap(), msgs);
    // A send continues after the imported head.
    let out = s.append_messages(&[req(&id("r", 1), &id("u", 1), "next", "next")]).await.unwrap();
    assert_eq!(accepted(&out[0]).seq, 4);

    // What was imported exports unchanged.
    let mut snap = s.export().await.unwrap();
    let exported: Vec<_> = snap.users_page(None, 100).await.unwrap();
    assert_eq!(exported, users);
}

fn at(ms: i64) -> Timestamp {
    Timestamp(ms)
}

fn lease(name: &str, holder: &str, token: i64, expires_at: i64) -> Lease {
    Lease { name: name.into(), holder: holder.into(), token, expires_at: Timestamp(expires_at) }
}

/// Tokens of a name grow by one with every acquisition (a new holder, the same holder after its
/// lease expired, anyone after a release) and stay when the holder extends its unexpired lease.
pub async fn lease_tokens_increase(s: Arc<dyn Store>) {
    let name = "home:eu";
    assert_eq!(s.lease(name).await.unwrap(), None);
    assert_eq!(s.acquire_lease(name, "eu-1", 1_000, at(10_000)).await.unwrap(), Some(lease(name, "eu-1", 1, 11_000)));
    // Held: another is refused and nothing changes.
    assert_eq!(s.acquire_lease(name, "us-1", 1_000, at(10_999)).await.unwrap(), None);
    assert_eq!(s.lease(name).await.unwrap(), Some(lease(name, "eu-1", 1, 11_000)));
    // The holder again, unexpired: extended, same token.
    assert_eq!(s.acquire_lease(name, "eu-1", 1_000, at(10_600)).await.unwrap(), Some(lease(name, "eu-1", 1, 11_600)));
    // Expired (expires_at <= now): another takes it with the next token; the old holder is out.
    assert_eq!(s.acquire_lease(name, "us-1", 2_000, at(11_600)).await.unwrap(), Some(lease(name, "us-1", 2, 13_600)));
    assert_eq!(s.acquire_lease(name, "eu-1", 1_000, at(11_700)).await.unwrap(), None);
    assert_eq!(s.lease(name).await.unwrap(), Some(lease(name, "us-1", 2, 13_600)));
    // The same holder after its own lease expired: a new epoch, a new token.
    assert_eq!(s.acquire_lease(name, "us-1", 1_000, at(13_600)).await.unwrap(), Some(lease(name, "us-1", 3, 14_600)));
    // A release by the wrong holder or with another token changes nothing.
    assert!(!s.release_lease(name, "eu-1", 3, at(14_000)).await.unwrap());
    assert!(!s.release_lease(name, "us-1", 2, at(14_000)).await.unwrap());
    assert_eq!(s.lease(name).await.unwrap(), Some(lease(name, "us-1", 3, 14_600)));
    // Released: expired now, the token kept; the next acquisition (even the same holder's) gets +1.
    assert!(s.release_lease(name, "us-1", 3, at(14_000)).await.unwrap());
    assert_eq!(s.lease(name).await.unwrap(), Some(lease(name, "us-1", 3, 14_000)));
    assert!(!s.release_lease(name, "us-1", 3, at(14_000)).await.unwrap(), "released already");
    assert_eq!(s.acquire_lease(name, "us-1", 1_000, at(14_000)).await.unwrap(), Some(lease(name, "us-1", 4, 15_000)));
    assert!(s.release_lease(name, "us-1", 4, at(14_100)).await.unwrap());
    assert_eq!(s.acquire_lease(name, "eu-1", 1_000, at(14_100)).await.unwrap(), Some(lease(name, "eu-1", 5, 15_100)));
    // Names are independent; a holder that looks like a field path is just a name.
    let odd = "$holder.x";
    assert_eq!(s.acquire_lease("home:us", odd, 500, at(20_000)).await.unwrap(), Some(lease("home:us", odd, 1, 20_500)));
    assert_eq!(s.acquire_lease("home:us", odd, 500, at(20_100)).await.unwrap(), Some(lease("home:us", odd, 1, 20_600)));
    assert_eq!(s.acquire_lease("home:us", "eu-1", 500, at(20_100)).await.unwrap(), None);
    assert_eq!(s.acquire_lease("home:ap", "eu-1", 500, at(1)).await.unwrap(), Some(lease("home:ap", "eu-1", 1, 501)));
    // Every lease, by name, expired or not.
    assert_eq!(
        s.leases().await.unwrap(),
        vec![lease("home:ap", "eu-1", 1, 501), lease(name, "eu-1", 5, 15_100), lease("home:us", odd, 1, 20_600)]
    );
}

/// Only the holder, with its current token, before expiry, renews; a refused renewal changes
/// nothing.
pub async fn lease_renewal_needs_the_current_token(s: Arc<dyn Store>) {
    let name = "home:eu";
    assert_eq!(s.renew_lease(name, "eu-1", 1, 1_000, at(0)).await.unwrap(), None, "never taken");
    assert_eq!(s.lease(name).await.unwrap(), None, "a renewal does not create a lease");
    let first = s.acquire_lease(name, "eu-1", 1_000, at(0)).await.unwrap().unwrap();
    assert_eq!(first.token, 1);
    assert_eq!(s.renew_lease(name, "eu-1", 1, 1_000, at(500)).await.unwrap(), Some(lease(name, "eu-1", 1, 1_500)));
    assert_eq!(s.renew_lease(name, "us-1", 1, 1_000, at(600)).await.unwrap(), None, "wrong holder");
    assert_eq!(s.renew_lease(name, "eu-1", 0, 1_000, at(600)).await.unwrap(), None, "stale token");
    assert_eq!(s.renew_lease(name, "eu-1", 2, 1_000, at(600)).await.unwrap(), None, "token from the future");
    assert_eq!(s.lease(name).await.unwrap(), Some(lease(name, "eu-1", 1, 1_500)));
    // At expiry the lease is lost, even if nobody took it: renewing it is refused.
    assert_eq!(s.renew_lease(name, "eu-1", 1, 1_000, at(1_500)).await.unwrap(), None, "expired");
    assert_eq!(s.lease(name).await.unwrap(), Some(lease(name, "eu-1", 1, 1_500)));
    // Taken over: the new holder renews, the old token never again.
    assert_eq!(s.acquire_lease(name, "us-1", 1_000, at(1_600)).await.unwrap(), Some(lease(name, "us-1", 2, 2_600)));
    assert_eq!(s.renew_lease(name, "eu-1", 1, 1_000, at(1_700)).await.unwrap(), None);
    assert_eq!(s.renew_lease(name, "us-1", 2, 1_000, at(1_700)).await.unwrap(), Some(lease(name, "us-1", 2, 2_700)));
    // Taken back by the first holder: its old token is stale there too.
    assert_eq!(s.acquire_lease(name, "eu-1", 1_000, at(2_700)).await.unwrap(), Some(lease(name, "eu-1", 3, 3_700)));
    assert_eq!(s.renew_lease(name, "eu-1", 1, 1_000, at(2_800)).await.unwrap(), None);
    assert_eq!(s.renew_lease(name, "us-1", 2, 1_000, at(2_800)).await.unwrap(), None);
    assert_eq!(s.renew_lease(name, "eu-1", 3, 1_000, at(2_800)).await.unwrap(), Some(lease(name, "eu-1", 3, 3_800)));
    // A released lease is not renewed either.
    assert!(s.release_lease(name, "eu-1", 3, at(2_900)).await.unwrap());
    assert_eq!(s.renew_lease(name, "eu-1", 3, 1_000, at(2_900)).await.unwrap(), None);
    assert_eq!(s.leases().await.unwrap(), vec![lease(name, "eu-1", 3, 2_900)]);
}

/// 16 acquirers of one free lease at the same `now`: exactly one wins, round after round, and
/// each round's winner gets the next token.
pub async fn concurrent_acquirers_one_winner(s: Arc<dyn Store>) {
    const ACQUIRERS: usize = 16;
    let name = "home:contended";
    for round in 0..5_i64 {
        // Each round starts after the last round's lease expired.
        let now = at(round * 10_000);
        let barrier = Arc::new(tokio::sync::Barrier::new(ACQUIRERS));
        let tasks = (0..ACQUIRERS).map(|i| {
            let (s, barrier) = (s.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                s.acquire_lease(name, &format!("holder-{i}"), 5_000, now).await.unwrap()
            })
        });
        let won: Vec<Lease> = futures::future::join_all(tasks).await.into_iter().filter_map(|r| r.unwrap()).collect();
        assert_eq!(won.len(), 1, "round {round}: winners {won:?}");
        let winner = &won[0];
        assert_eq!((winner.token, winner.expires_at), (round + 1, at(round * 10_000 + 5_000)), "round {round}");
        assert_eq!(
            s.lease(name).await.unwrap().as_ref(),
            Some(winner),
            "round {round}: the stored lease is the winner's"
        );
    }
}

/// A message of `room` at `seq`, sequenced under `token` (its id and client_msg_id say which).
fn fenced(room: &str, seq: i64, token: i64) -> FencedMessage {
    let message = Message {
        id: format!("{room}-{seq}-t{token}"),
        room_id: room.into(),
        seq,
        sender_id: id("u", 1),
        client_msg_id: format!("t{token}-{seq}"),
        body: format!("epoch {token}"),
        created_at: Timestamp(seq),
    };
    FencedMessage { message, token }
}

fn fence(room: &str, token: i64, from_seq: i64) -> RoomFence {
    RoomFence { room_id: room.into(), token, from_seq }
}

/// (seq, epoch) of every stored message of `room`, ascending.
async fn epochs(s: &dyn Store, room: &str) -> Vec<(i64, String)> {
    let msgs = s.messages_after(&as_room(room), 0, 1_000).await.unwrap();
    msgs.into_iter().map(|m| (m.seq, m.body)).collect()
}

fn seq_epochs(pairs: &[(i64, i64)]) -> Vec<(i64, String)> {
    pairs.iter().map(|(seq, token)| (*seq, format!("epoch {token}"))).collect()
}

fn refused(room: &str, seqs: &[i64]) -> Vec<(String, i64)> {
    seqs.iter().map(|seq| (room.to_string(), *seq)).collect()
}

/// A fence refuses older epochs at and above its seq, nothing below it, nothing of its own epoch
/// or newer; refused messages leave no trace; repeats change nothing.
pub async fn fences_refuse_older_epochs(s: Arc<dyn Store>) {
    let a = user(&*s, 1).await;
    let r = room(&*s, 1, &a, Visibility::Public).await;
    let other = room(&*s, 2, &a, Visibility::Public).await;
    let batch: Vec<_> = (1..=3).map(|seq| fenced(&r, seq, 1)).collect();
    assert_eq!(s.upsert_messages_fenced(&batch).await.unwrap(), vec![], "no fence yet");
    assert_eq!(s.head_seq(&as_room(&r)).await.unwrap(), Some(3));
    assert_eq!(s.room_fences(&as_room(&r)).await.unwrap(), vec![]);

    s.fence_rooms(&[fence(&r, 2, 5)]).await.unwrap();
    // Recorded again, even with another from_seq: the first stands.
    s.fence_rooms(&[fence(&r, 2, 5)]).await.unwrap();
    s.fence_rooms(&[fence(&r, 2, 9)]).await.unwrap();
    assert_eq!(s.room_fences(&as_room(&r)).await.unwrap(), vec![fence(&r, 2, 5)]);
    assert_eq!(s.room_fences(&as_room(&other)).await.unwrap(), vec![], "fences are per room");

    // Epoch 1's late write-back: below the fence written, at and above refused.
    let late = [fenced(&r, 6, 1), fenced(&r, 4, 1), fenced(&r, 5, 1)];
    assert_eq!(s.upsert_messages_fenced(&late).await.unwrap(), refused(&r, &[5, 6]));
    assert_eq!(epochs(&*s, &r).await, seq_epochs(&[(1, 1), (2, 1), (3, 1), (4, 1)]));
    assert_eq!(s.head_seq(&as_room(&r)).await.unwrap(), Some(4), "refused messages do not move the head");
    // Epoch 2 at and above the fence, and a newer epoch still, are written.
    assert_eq!(s.upsert_messages_fenced(&[fenced(&r, 5, 2), fenced(&r, 6, 2)]).await.unwrap(), vec![]);
    assert_eq!(s.upsert_messages_fenced(&[fenced(&r, 7, 3)]).await.unwrap(), vec![]);
    let expected = seq_epochs(&[(1, 1), (2, 1), (3, 1), (4, 1), (5, 2), (6, 2), (7, 3)]);
    assert_eq!(epochs(&*s, &r).await, expected);
    assert_eq!(s.head_seq(&as_room(&r)).await.unwrap(), Some(7));

    // Idempotent: the same batches again change nothing and answer the same.
    assert_eq!(s.upsert_messages_fenced(&[fenced(&r, 5, 2), fenced(&r, 6, 2)]).await.unwrap(), vec![]);
    assert_eq!(s.upsert_messages_fenced(&late).await.unwrap(), refused(&r, &[5, 6]));
    // Refused however far ahead, with the head untouched; a duplicate in the batch is reported once.
    let ahead = [fenced(&r, 50, 1), fenced(&r, 50, 1), fenced(&other, 50, 1)];
    assert_eq!(s.upsert_messages_fenced(&ahead).await.unwrap(), refused(&r, &[50]));
    assert_eq!(epochs(&*s, &r).await, expected);
    assert_eq!(s.head_seq(&as_room(&r)).await.unwrap(), Some(7));
    // A room without fences takes every epoch, with head_seq kept as upsert_messages keeps it.
    assert_eq!(epochs(&*s, &other).await, seq_epochs(&[(50, 1)]));
    assert_eq!(s.head_seq(&as_room(&other)).await.unwrap(), Some(50));
    // A fenced write-back dedupes with plain write-backs and sequenced sends, as upsert_messages does.
    let plain = fenced(&other, 51, 1).message;
    s.upsert_messages(std::slice::from_ref(&plain)).await.unwrap();
    let mut same_key = fenced(&other, 52, 1);
    same_key.message.client_msg_id = plain.client_msg_id.clone();
    assert_eq!(s.upsert_messages_fenced(&[fenced(&other, 51, 9), same_key]).await.unwrap(), vec![]);
    assert_eq!(epochs(&*s, &other).await, seq_epochs(&[(50, 1), (51, 1)]), "one message per (room, seq) and key");
    assert!(s.head_seq(&as_room(&other)).await.unwrap() >= Some(51), "the head covers what is stored");

    // A fence of a room the store does not have: refused, and nothing of the batch recorded.
    let err = s.fence_rooms(&[fence(&other, 4, 1), fence("r-missing", 4, 1)]).await.unwrap_err();
    assert_eq!(err, StoreError::NotFound("room"));
    assert_eq!(s.room_fences(&as_room(&other)).await.unwrap(), vec![]);
    assert_eq!(s.room_fences(&as_room("r-missing")).await.unwrap(), vec![]);
    s.fence_rooms(&[]).await.unwrap();
    assert_eq!(s.upsert_messages_fenced(&[]).await.unwrap(), vec![]);
}

/// Two takeovers, a → b → a (tokens 1, 2, 3): each fence holds for the epochs before it.
pub async fn fence_chain_of_takeovers(s: Arc<dyn Store>) {
    let a = user(&*s, 1).await;
    let r = room(&*s, 1, &a, Visibility::Public).await;
    let write = |batch: Vec<FencedMessage>| {
        let s = s.clone();
        async move { s.upsert_messages_fenced(&batch).await.unwrap() }
    };
    // Region a, token 1: seqs 1–3.
    assert_eq!(write((1..=3).map(|seq| fenced(&r, seq, 1)).collect()).await, vec![]);
    // b takes over (token 2) from seq 4 and writes 4; a's late 4 is refused.
    s.fence_rooms(&[fence(&r, 2, 4)]).await.unwrap();
    assert_eq!(write(vec![fenced(&r, 4, 2)]).await, vec![]);
    assert_eq!(write(vec![fenced(&r, 4, 1)]).await, refused(&r, &[4]));
    // a takes it back (token 3) from seq 6. b's late 5 is below that fence and of b's own epoch:
    // written. b's 6 and 7 are refused, and a's first epoch stays refused from 4 on.
    s.fence_rooms(&[fence(&r, 3, 6)]).await.unwrap();
    assert_eq!(write(vec![fenced(&r, 7, 2), fenced(&r, 5, 2), fenced(&r, 6, 2)]).await, refused(&r, &[6, 7]));
    assert_eq!(write(vec![fenced(&r, 5, 1), fenced(&r, 6, 1), fenced(&r, 3, 1)]).await, refused(&r, &[5, 6]));
    // a's new epoch writes from 6 on.
    assert_eq!(write(vec![fenced(&r, 6, 3), fenced(&r, 7, 3)]).await, vec![]);
    let expected = seq_epochs(&[(1, 1), (2, 1), (3, 1), (4, 2), (5, 2), (6, 3), (7, 3)]);
    assert_eq!(epochs(&*s, &r).await, expected);
    assert_eq!(s.head_seq(&as_room(&r)).await.unwrap(), Some(7));
    // Late write-backs of every older epoch, again: nothing changes.
    assert_eq!(write(vec![fenced(&r, 8, 2), fenced(&r, 8, 1)]).await, refused(&r, &[8]));
    assert_eq!(epochs(&*s, &r).await, expected);
    // Fences come back ascending by token, however they were recorded; repeats change nothing.
    s.fence_rooms(&[fence(&r, 3, 100), fence(&r, 2, 100)]).await.unwrap();
    assert_eq!(s.room_fences(&as_room(&r)).await.unwrap(), vec![fence(&r, 2, 4), fence(&r, 3, 6)]);
    let r2 = room(&*s, 2, &a, Visibility::Public).await;
    // Within one batch too, the first fence of a token stands.
    s.fence_rooms(&[fence(&r2, 7, 30), fence(&r2, 5, 10), fence(&r2, 6, 20), fence(&r2, 5, 11)]).await.unwrap();
    assert_eq!(
        s.room_fences(&as_room(&r2)).await.unwrap(),
        vec![fence(&r2, 5, 10), fence(&r2, 6, 20), fence(&r2, 7, 30)]
    );
}

/// A takeover's fence (two rooms) and the old epoch's write-back (both rooms) run at once, many
/// times. Each time the write-back saw both fences or neither, what it reported refused is not
/// stored and the rest is, and nothing the fences refuse appears in the store after
/// `fence_rooms` returned (a late write that checked before the fence and wrote after it would).
pub async fn fence_races_fenced_write_back(s: Arc<dyn Store>) {
    const ROUNDS: usize = 24;
    let a = user(&*s, 1).await;
    let (mut before, mut after) = (0, 0);
    for round in 0..ROUNDS {
        let rooms = [
            room(&*s, 2 * round + 1, &a, Visibility::Public).await,
            room(&*s, 2 * round + 2, &a, Visibility::Public).await,
        ];
        let early: Vec<_> = rooms.iter().flat_map(|r| (1..=2).map(|seq| fenced(r, seq, 1))).collect();
        assert_eq!(s.upsert_messages_fenced(&early).await.unwrap(), vec![]);
        // From seq 3 on, the rooms are the new epoch's (token 2).
        let fences: Vec<_> = rooms.iter().map(|r| fence(r, 2, 3)).collect();
        let late: Vec<_> = rooms.iter().flat_map(|r| (2..=4).map(|seq| fenced(r, seq, 1))).collect();
        let all_late: Vec<(String, i64)> = rooms.iter().flat_map(|r| refused(r, &[3, 4])).collect();

        let barrier = Arc::new(tokio::sync::Barrier::new(2));
        let fencer = {
            let (s, barrier, rooms) = (s.clone(), barrier.clone(), rooms.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                s.fence_rooms(&fences).await.unwrap();
                // What is stored at the fence's seqs once the fence is in place.
                let mut seen = Vec::new();
                for r in &rooms {
                    seen.push(epochs(&*s, r).await);
                }
                seen
            })
        };
        // Even rounds start both at once; odd rounds hold the write-back back by 0–5 ms, so that
        // on a slower backend too the two meet at every point of each other.
        let stagger = Duration::from_millis(if round % 2 == 1 { (round as u64 / 2) % 6 } else { 0 });
        let writer = {
            let (s, barrier) = (s.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                // (Even a zero sleep waits for the timer's next tick.)
                if !stagger.is_zero() {
                    tokio::time::sleep(stagger).await;
                }
                s.upsert_messages_fenced(&late).await.unwrap()
            })
        };
        let (seen, got) = (fencer.await.unwrap(), writer.await.unwrap());

        let saw_fences = !got.is_empty();
        assert!(got.is_empty() || got == all_late, "round {round}: a torn outcome: refused {got:?}");
        let expected =
            if saw_fences { seq_epochs(&[(1, 1), (2, 1)]) } else { seq_epochs(&[(1, 1), (2, 1), (3, 1), (4, 1)]) };
        for (i, r) in rooms.iter().enumerate() {
            let stored = epochs(&*s, r).await;
            assert_eq!(stored, expected, "round {round}, room {i}: refused {got:?}");
            assert_eq!(seen[i], stored, "round {round}, room {i}: stored after fence_rooms returned");
            assert_eq!(s.head_seq(&as_room(r)).await.unwrap(), Some(expected.len() as i64), "round {round}");
        }
        // Now the fence is in place: the old epoch's retry is refused, the new epoch writes.
        let retry: Vec<_> = rooms.iter().flat_map(|r| (2..=4).map(|seq| fenced(r, seq, 1))).collect();
        assert_eq!(s.upsert_messages_fenced(&retry).await.unwrap(), all_late, "round {round}");
        let new_epoch: Vec<_> = rooms.iter().flat_map(|r| (3..=4).map(|seq| fenced(r, seq, 2))).collect();
        assert_eq!(s.upsert_messages_fenced(&new_epoch).await.unwrap(), vec![], "round {round}");
        let third = if saw_fences { 2 } else { 1 };
        for r in &rooms {
            assert_eq!(epochs(&*s, r).await, seq_epochs(&[(1, 1), (2, 1), (3, third), (4, third)]), "round {round}");
        }
        if saw_fences { after += 1 } else { before += 1 }
    }
    eprintln!("{ROUNDS} rounds: the write-back ran before the fence {before} times, after it {after} times");
}

macro_rules! contract_suite {
    ($backend:ident, $factory:path) => {
        mod $backend {
            use super::*;
            contract_suite!(@cases $factory; export_is_a_snapshot);
            contract_suite!(@shared $factory);
        }
    };
    // `$snapshot` makes the store for `export_is_a_snapshot`, a case ignored (shown as skipped)
    // unless asked for, for `$why`.
    ($backend:ident, $factory:path, snapshot: $snapshot:path, ignore: $why:literal) => {
        mod $backend {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            #[ignore = $why]
            async fn export_is_a_snapshot() {
                let (store, _guard) = $snapshot().await;
                super::export_is_a_snapshot(store).await;
            }
            contract_suite!(@shared $factory);
        }
    };
    (@shared $factory:path) => {
        contract_suite!(@cases $factory;
            users_round_trip, rooms_and_listing, versioned_changes_converge, membership,
            append_assigns_gap_free_seqs_and_dedupes, concurrent_appends_never_share_a_seq,
            upsert_is_idempotent, paging, export_pages_respect_limit_and_resume,
            import_keeps_everything_and_is_idempotent, lease_tokens_increase,
            lease_renewal_needs_the_current_token, concurrent_acquirers_one_winner,
            fences_refuse_older_epochs, fence_chain_of_takeovers, fence_races_fenced_write_back);
    };
    (@cases $factory:path; $($case:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let (store, _guard) = $factory().await;
                super::$case(store).await;
            }
        )*
    };
}

contract_suite!(sqlite, sqlite_store);
contract_suite!(postgres, postgres_store);
contract_suite!(
    mongodb,
    mongo_store,
    snapshot: mongo_store_with_snapshot_reads,
    ignore: "needs a real mongod (CHATMESH_TEST_MONGODB_URL): SecantusDB does not pin snapshot reads"
);

#[test]
fn mongo_urls_keep_options_and_auth_source() {
    assert_eq!(
        mongo::url_for("mongodb://127.0.0.1:27017/?replicaSet=rs0", "t1"),
        "mongodb://127.0.0.1:27017/t1?replicaSet=rs0"
    );
    assert_eq!(mongo::url_for("mongodb://h1,h2:27018", "t1"), "mongodb://h1,h2:27018/t1");
    assert_eq!(
        mongo::url_for("mongodb://u:p@h1/app?w=majority", "t1"),
        "mongodb://u:p@h1/t1?w=majority&authSource=app"
    );
    assert_eq!(mongo::url_for("mongodb://u:p@h1", "t1"), "mongodb://u:p@h1/t1?authSource=admin");
    assert_eq!(mongo::url_for("mongodb://u:p@h1/?authSource=x", "t1"), "mongodb://u:p@h1/t1?authSource=x");
}
