//! `chatmesh backup` / `chatmesh restore` against real stores, through the real binary: a SQLite
//! store filled through the REST API is backed up, restored into a fresh PostgreSQL database and
//! into a fresh MongoDB database, and an instance on each answers exactly as the original did.
//!
//! PostgreSQL is the machine's server and MongoDB a private SecantusDB server (or the deployment
//! `CHATMESH_TEST_MONGODB_URL` names); each test gets databases of its own, dropped when done
//! (`tests/support`).

#[allow(dead_code)]
#[path = "api/helpers.rs"]
mod helpers;
#[allow(dead_code)]
#[path = "support/mod.rs"]
mod support;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use helpers::{Spawn, TestApp, binary, spawn_with};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use support::mongo::TestMongoDatabase;
use support::pg::TestDatabase;

/// One signing key for both instances: a token issued before the backup still works after it.
const JWT_SECRET: &str = "backup-test-secret-0123456789abcdef";
const PASSWORD: &str = "password123";

/// The store a backup is restored into: a database of its own, dropped at the end.
enum Target {
    Postgres(TestDatabase),
    MongoDb(TestMongoDatabase),
}

impl Target {
    fn url(&self) -> String {
        match self {
            Target::Postgres(db) => db.url(),
            Target::MongoDb(db) => db.url(),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Target::Postgres(_) => "PostgreSQL",
            Target::MongoDb(_) => "MongoDB",
        }
    }

    /// "users rooms memberships messages", counted in the database itself (not through chatmesh).
    async fn counts(&self) -> String {
        match self {
            Target::Postgres(db) => db.psql(
                "SELECT (SELECT count(*) FROM users) || ' ' || (SELECT count(*) FROM rooms) || ' ' ||
                        (SELECT count(*) FROM memberships) || ' ' || (SELECT count(*) FROM messages)",
            ),
            Target::MongoDb(db) => {
                let mut counts = Vec::new();
                for collection in ["users", "rooms", "memberships", "messages"] {
                    counts.push(db.count(collection).await.to_string());
                }
                counts.join(" ")
            }
        }
    }
}

/// Runs the binary with only PATH (and `stdin` on its standard input); never inherits a
/// `CHATMESH_*` variable of the test environment.
fn chatmesh(args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut cmd = Command::new(binary());
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn chatmesh");
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        let input = input.to_vec();
        std::thread::spawn(move || {
            let _ = pipe.write_all(&input);
        });
    }
    child.wait_with_output().expect("wait for chatmesh")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// Runs the binary and asserts it succeeded.
fn chatmesh_ok(args: &[&str]) -> Output {
    let out = chatmesh(args, None);
    assert!(out.status.success(), "chatmesh {args:?} failed: {}", stderr(&out));
    out
}

/// The lines of a backup after the header (which carries the time it was written).
fn records(backup: &str) -> Vec<String> {
    backup.lines().skip(1).map(str::to_string).collect()
}

fn sqlite_url(dir: &Path) -> String {
    format!("sqlite://{}/chatmesh.db", dir.display())
}

async fn spawn_on(store_url: String, data_dir: Option<&Path>) -> TestApp {
    spawn_with(Spawn {
        env: vec![("CHATMESH_STORE_URL", store_url), ("CHATMESH_JWT_SECRET", JWT_SECRET.to_string())],
        data_dir,
    })
    .await
}

fn stop(mut app: TestApp) {
    app.signal("TERM");
    assert_eq!(app.wait_exit(Duration::from_secs(20)), Some(0), "chatmesh exits 0 on SIGTERM");
}

async fn ok(app: &TestApp, method: Method, path: &str, body: Option<Value>, token: &str) -> Value {
    let r = app.call(method.clone(), path, body, Some(token)).await;
    assert!(r.status.is_success(), "{method} {path}: {} {}", r.status, r.body);
    r.body
}

struct World {
    /// (username, user id, token).
    users: Vec<(String, String, String)>,
    /// (room id, token of a member that may read it).
    rooms: Vec<(String, String)>,
}

/// Users, a public and a private room with invites and leaves, profile and topic edits, and a few
/// hundred messages in three rooms.
async fn populate(app: &TestApp) -> World {
    let mut users = Vec::new();
    for name in ["alice", "bob", "carol", "dave"] {
        let (id, token) = app.register(name).await;
        users.push((name.to_string(), id, token));
    }
    let token = |i: usize| users[i].2.clone();
    ok(
        app,
        Method::PATCH,
        "/api/v1/users/me",
        Some(json!({"status_text": "on call", "display_name": "Alice A."})),
        &token(0),
    )
    .await;
    ok(app, Method::PATCH, "/api/v1/users/me", Some(json!({"avatar_url": "https://example.com/bob.png"})), &token(1))
        .await;

    let general = app.create_room(&token(0), "general", "public").await;
    let random = app.create_room(&token(1), "random", "public").await;
    let secret = app.create_room(&token(0), "secret", "private").await;
    let quiet = app.create_room(&token(3), "quiet", "public").await;
    ok(app, Method::PATCH, &format!("/api/v1/rooms/{general}"), Some(json!({"topic": "everything"})), &token(0)).await;
    for i in [1, 2, 3] {
        ok(app, Method::POST, &format!("/api/v1/rooms/{general}/join"), None, &token(i)).await;
    }
    ok(app, Method::POST, &format!("/api/v1/rooms/{random}/join"), None, &token(3)).await;
    ok(app, Method::POST, &format!("/api/v1/rooms/{random}/join"), None, &token(2)).await;
    ok(app, Method::POST, &format!("/api/v1/rooms/{random}/leave"), None, &token(2)).await;
    // The private room: carol is invited by its owner.
    ok(app, Method::POST, &format!("/api/v1/rooms/{secret}/members"), Some(json!({"user_id": users[2].1})), &token(0))
        .await;

    // 150 + 100 + 60 messages, the three rooms concurrently, each room's senders in turn.
    let plan = [(&general, vec![0, 1, 2, 3], 150), (&random, vec![1, 3], 100), (&secret, vec![0, 2], 60)];
    let sends = plan.iter().map(|(room, senders, n)| {
        let users = &users;
        async move {
            for i in 0..*n {
                let who = senders[i % senders.len()];
                let body = format!("message {i} in {room}\nfrom {}: \"quoted\" ünïcödé", users[who].0);
                let r = app.send(&users[who].2, room, &format!("cm-{i}"), &body).await;
                assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
                assert_eq!(r.body["seq"], json!(i + 1));
            }
        }
    });
    futures::future::join_all(sends).await;

    let rooms = vec![(general, token(0)), (random, token(1)), (secret, token(0)), (quiet, token(3))];
    World { users, rooms }
}

/// Everything the API answers about the world, as JSON, with the given tokens (one per user).
async fn answers(app: &TestApp, world: &World, tokens: &[String]) -> Value {
    let mut out = serde_json::Map::new();
    for (i, (name, id, _)) in world.users.iter().enumerate() {
        out.insert(format!("me/{name}"), ok(app, Method::GET, "/api/v1/users/me", None, &tokens[i]).await);
        out.insert(
            format!("user/{name}"),
            ok(app, Method::GET, &format!("/api/v1/users/{id}"), None, &tokens[0]).await,
        );
        out.insert(format!("joined/{name}"), ok(app, Method::GET, "/api/v1/rooms", None, &tokens[i]).await);
    }
    out.insert("public".into(), ok(app, Method::GET, "/api/v1/rooms?scope=public", None, &tokens[0]).await);
    for (room, owner_token) in &world.rooms {
        // The original token's user, with this instance's token for it.
        let i = world.users.iter().position(|u| &u.2 == owner_token).unwrap();
        let t = &tokens[i];
        out.insert(format!("room/{room}"), ok(app, Method::GET, &format!("/api/v1/rooms/{room}"), None, t).await);
        out.insert(
            format!("members/{room}"),
            ok(app, Method::GET, &format!("/api/v1/rooms/{room}/members"), None, t).await,
        );
        out.insert(
            format!("messages/{room}"),
            ok(app, Method::GET, &format!("/api/v1/rooms/{room}/messages?after_seq=0&limit=500"), None, t).await,
        );
    }
    Value::Object(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_backup_restores_into_postgres_with_identical_answers() {
    sqlite_backup_restores_into(Target::Postgres(TestDatabase::create())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_backup_restores_into_mongodb_with_identical_answers() {
    let db = tokio::task::spawn_blocking(TestMongoDatabase::create).await.unwrap();
    sqlite_backup_restores_into(Target::MongoDb(db)).await;
}

async fn sqlite_backup_restores_into(db: Target) {
    let kind = db.kind();
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_on(sqlite_url(dir.path()), Some(dir.path())).await;
    let world = populate(&app).await;
    let original_tokens: Vec<String> = world.users.iter().map(|u| u.2.clone()).collect();
    let before = answers(&app, &world, &original_tokens).await;
    assert_eq!(before[format!("messages/{}", world.rooms[0].0)]["messages"].as_array().unwrap().len(), 150);
    stop(app);

    // Backup to a file.
    let file = dir.path().join("backup.jsonl");
    let file_s = file.to_str().unwrap();
    let out = chatmesh_ok(&["backup", "--out", file_s, "--store-url", &sqlite_url(dir.path())]);
    assert!(out.stdout.is_empty(), "nothing but the file is written; logs go to stderr");
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&file).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "the backup holds password hashes: owner-only");
    let backup = std::fs::read_to_string(&file).unwrap();
    let lines: Vec<&str> = backup.lines().collect();
    let header: Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!((header["format"].as_str(), header["version"].as_u64()), (Some("chatmesh-backup"), Some(1)));
    assert_eq!((header["source"].as_str(), header["consistency"].as_str()), (Some("sqlite"), Some("snapshot")));
    let trailer: Value = serde_json::from_str(lines.last().unwrap()).unwrap();
    // 4 owners + 3 joins of general + dave in random (carol left) + carol invited to secret.
    assert_eq!(trailer, json!({"kind": "end", "counts": {"users": 4, "rooms": 4, "memberships": 9, "messages": 310}}));
    assert_eq!(lines.len(), 1 + 4 + 4 + 9 + 310 + 1, "one line per record");
    assert!(
        !std::fs::read_dir(dir.path())
            .unwrap()
            .any(|e| { e.unwrap().file_name().to_string_lossy().contains(".partial") })
    );

    // Restore into the fresh database, twice: the second run changes nothing.
    let db_url = db.url();
    chatmesh_ok(&["restore", "--in", file_s, "--store-url", &db_url]);
    let again = dir.path().join("again.jsonl");
    chatmesh_ok(&["backup", "--out", again.to_str().unwrap(), "--store-url", &db_url]);
    let from_target = std::fs::read_to_string(&again).unwrap();
    assert_eq!(records(&from_target), records(&backup), "{kind} holds exactly what SQLite held");
    chatmesh_ok(&["restore", "--in", file_s, "--store-url", &db_url]);
    chatmesh_ok(&["backup", "--out", again.to_str().unwrap(), "--store-url", &db_url]);
    assert_eq!(records(&std::fs::read_to_string(&again).unwrap()), records(&backup), "restore is idempotent");
    assert_eq!(db.counts().await.trim(), "4 4 9 310");

    // An embedded instance on the restored store answers exactly as the SQLite one did.
    let app = spawn_on(db_url.clone(), None).await;
    let mut tokens = Vec::new();
    for (name, id, _) in &world.users {
        let r = app
            .call(Method::POST, "/api/v1/auth/login", Some(json!({"username": name, "password": PASSWORD})), None)
            .await;
        assert_eq!(r.status, StatusCode::OK, "login {name} after restore: {}", r.body);
        assert_eq!(r.body["user"]["id"], json!(id));
        tokens.push(r.body["token"].as_str().unwrap().to_string());
    }
    let wrong = app
        .call(Method::POST, "/api/v1/auth/login", Some(json!({"username": "alice", "password": "nope-nope"})), None)
        .await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    let after = answers(&app, &world, &tokens).await;
    assert_eq!(after, before, "identical API answers after SQLite -> {kind}");
    // Tokens issued before the backup (same signing key) still work.
    assert_eq!(answers(&app, &world, &original_tokens).await, before);

    // Sending continues each room's sequence (each room with one of its members).
    for ((room, _), (sender, head)) in world.rooms.iter().zip([(0, 150), (1, 100), (0, 60), (3, 0)]) {
        let r = app.send(&tokens[sender], room, "after-restore", "hello again").await;
        assert_eq!((r.status, r.body["seq"].clone()), (StatusCode::CREATED, json!(head + 1)), "{}", r.body);
        let page = ok(&app, Method::GET, &format!("/api/v1/rooms/{room}"), None, &tokens[sender]).await;
        assert_eq!(page["head_seq"], json!(head + 1));
    }
    // A resend of a restored client_msg_id is still recognised as a duplicate.
    let general = &world.rooms[0].0;
    let body = format!("message 0 in {general}\nfrom alice: \"quoted\" ünïcödé");
    let dup = app.send(&tokens[0], general, "cm-0", &body).await;
    assert_eq!((dup.status, dup.body["seq"].clone()), (StatusCode::OK, json!(1)), "{}", dup.body);
    stop(app);
    drop(db);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdout_stdin_and_damaged_files() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_on(sqlite_url(dir.path()), Some(dir.path())).await;
    let (_, token) = app.register("erin").await;
    let room = app.create_room(&token, "lobby", "public").await;
    for i in 0..5 {
        assert_eq!(app.send(&token, &room, &format!("c{i}"), "hi").await.status, StatusCode::CREATED);
    }
    let src = sqlite_url(dir.path());

    // A backup of a live server, to stdout: only the backup is on stdout.
    let out = chatmesh_ok(&["backup", "--out", "-", "--store-url", &src]);
    let piped = String::from_utf8(out.stdout).unwrap();
    stop(app);
    assert!(piped.starts_with(r#"{"format":"chatmesh-backup","version":1,"#), "{piped}");
    assert!(
        piped.ends_with("{\"kind\":\"end\",\"counts\":{\"users\":1,\"rooms\":1,\"memberships\":1,\"messages\":5}}\n")
    );
    for line in piped.lines() {
        serde_json::from_str::<Value>(line).unwrap_or_else(|e| panic!("not JSON: {line}: {e}"));
    }
    let file = dir.path().join("b.jsonl");
    chatmesh_ok(&["backup", "--out", file.to_str().unwrap(), "--store-url", &src]);
    assert_eq!(records(&std::fs::read_to_string(&file).unwrap()), records(&piped));

    // Restore from stdin into a new SQLite store, then back it up: the same records.
    let target = dir.path().join("restored");
    let target_url = sqlite_url(&target);
    let out = chatmesh(&["restore", "--in", "-", "--store-url", &target_url], Some(piped.as_bytes()));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(out.stdout.is_empty());
    let out = chatmesh_ok(&["backup", "--out", "-", "--store-url", &target_url]);
    assert_eq!(records(&String::from_utf8(out.stdout).unwrap()), records(&piped));

    // Refused with one line and exit 1, before anything is written to the store.
    let fresh = dir.path().join("fresh");
    let fresh_url = sqlite_url(&fresh);
    let all: Vec<&str> = piped.lines().collect();
    let cases: Vec<(&str, String, &str)> = vec![
        ("truncated", all[..all.len() - 1].join("\n") + "\n", "incomplete backup: no end line"),
        ("cut mid-line", piped[..piped.len() - 20].to_string(), "line 10: not a backup record"),
        ("headerless", all[1..].join("\n") + "\n", "not a chatmesh backup"),
        ("empty", String::new(), "empty input"),
        ("miscounted", all[..all.len() - 2].join("\n") + "\n" + all[all.len() - 1] + "\n", "the end line counts"),
        ("after the end", piped.clone() + all[1] + "\n", "data after the end line"),
        ("out of order", [all[0], all[2], all[1]].join("\n") + "\n" + all[3], "a user record after the room records"),
        ("future version", piped.replacen("\"version\":1", "\"version\":2", 1), "version 2 is not supported"),
    ];
    for (what, content, expected) in cases {
        let bad = dir.path().join("bad.jsonl");
        std::fs::write(&bad, &content).unwrap();
        let out = chatmesh(&["restore", "--in", bad.to_str().unwrap(), "--store-url", &fresh_url], None);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{what}: {err}");
        assert_eq!(err.lines().count(), 1, "{what}: one line, got {err:?}");
        assert!(err.starts_with("chatmesh: restore failed: ") && err.contains(expected), "{what}: {err}");
        assert!(!fresh.exists(), "{what}: a refused file touches no store");
    }
    // From stdin a truncation is only seen at its end; it is still refused.
    let truncated = all[..all.len() - 1].join("\n") + "\n";
    let out = chatmesh(&["restore", "--in", "-", "--store-url", &fresh_url], Some(truncated.as_bytes()));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("incomplete backup"), "{}", stderr(&out));

    // Bad arguments: exit 2, one line.
    for args in [
        vec!["backup"],
        vec!["restore", "--store-url", "sqlite://x.db"],
        vec!["backup", "--out", "-", "--store-url", "mysql://db"],
    ] {
        let out = chatmesh(&args, None);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert_eq!(stderr(&out).lines().count(), 1, "{args:?}: {}", stderr(&out));
    }
    // A SQLite store that does not exist is not silently created and backed up as empty.
    let missing = sqlite_url(&dir.path().join("nope"));
    let out = chatmesh(&["backup", "--out", "-", "--store-url", &missing], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("no SQLite store"), "{}", stderr(&out));
    assert!(out.stdout.is_empty());
}
