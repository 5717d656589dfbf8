//! TLS and authentication to the backends, against real servers that speak only TLS, with a CA
//! each test makes (`support::tls::TestCa`): Redis (alone, and Sentinels + data nodes) behind the
//! ACL users of `deploy/redis/`, PostgreSQL with `hostssl` only, and SecantusDB (MongoDB wire)
//! with TLS. Each case also shows the plaintext way in is closed, and that a URL asking for TLS
//! never ends up in plaintext.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};

use crate::helpers::{self, TestApp};
use crate::support::procs::{
    PgServer, SecantusServer, TlsAccess, TlsFiles, TlsRedisServer, TlsReplicaSet, TlsSetOptions,
};
use crate::support::tls::TestCa;
use crate::{SECRET, TestDatabase, cluster_instance};

const CHATMESH_PASSWORD: &str = "chatmesh-test-pw-5d1f";
const FIXTURE_USER: &str = "fixture";
const FIXTURE_PASSWORD: &str = "fixture-test-pw-77aa";

fn deploy_file(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/redis").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// `deploy/redis/users.acl` as shipped, with test passwords for its CHANGE-ME placeholders, plus a
/// test-only `fixture` user (all commands) through which the fixture probes the server and the
/// test reads `ACL LOG`. chatmesh itself runs as the file's `chatmesh` user.
fn data_acl(dir: &Path) -> PathBuf {
    let mut text = deploy_file("users.acl")
        .replace("CHANGE-ME-chatmesh-password", CHATMESH_PASSWORD)
        .replace("CHANGE-ME-replica-password", "replica-test-pw")
        .replace("CHANGE-ME-sentinel-password", "sentinel-test-pw");
    assert!(!text.contains("CHANGE-ME"), "a placeholder the test does not know in users.acl");
    text.push_str(&format!("user {FIXTURE_USER} on >{FIXTURE_PASSWORD} ~* &* +@all\n"));
    let path = dir.join("users.acl");
    std::fs::write(&path, text).unwrap();
    path
}

fn fixture_access(ca: &TestCa) -> TlsAccess {
    TlsAccess { ca: ca.ca_file(), user: FIXTURE_USER.into(), password: FIXTURE_PASSWORD.into() }
}

/// Starts `chatmesh serve` with `env` (cluster settings) and expects it to refuse to start:
/// returns its stderr. Panics if it starts listening or has not exited within 60 s.
fn start_fails(env: Vec<(&str, String)>) -> String {
    let stderr = start_fails_inner(env);
    eprintln!("refused as expected: {}", stderr.trim());
    stderr
}

fn start_fails_inner(env: Vec<(&str, String)>) -> String {
    let mut cmd = Command::new(helpers::binary());
    cmd.arg("serve")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("CHATMESH_BIND", "127.0.0.1:0")
        .env("CHATMESH_LOG_FORMAT", "json")
        .env("CHATMESH_JWT_SECRET", SECRET)
        .env("CHATMESH_CLUSTER_SECRET", SECRET)
        .envs(env)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn chatmesh");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut stdout = String::new();
            let mut stderr = String::new();
            child.stdout.take().unwrap().read_to_string(&mut stdout).unwrap();
            child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
            assert!(!stdout.contains("\"listening\""), "it started listening:\n{stdout}");
            assert!(!status.success(), "exited 0:\n{stderr}");
            return stderr;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chatmesh neither started nor failed within 60 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Register, create a room, send one message, read it back from the history, and wait until the
/// write-back worker has it in the store: every Redis path of a send (script, stream, pub/sub,
/// the sync worker's group reads, acks and trims) ran as the ACL user.
async fn send_round_trip(app: &TestApp, db: &TestDatabase) {
    let started = Instant::now();
    while app.call(Method::GET, "/health/ready", None, None).await.status != StatusCode::OK {
        assert!(started.elapsed() < Duration::from_secs(20), "never ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, token) = app.register("tlsuser").await;
    let room = app.create_room(&token, "tls", "public").await;
    let r = app.send(&token, &room, "m1", "over TLS").await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let h =
        app.call(Method::GET, &format!("/api/v1/rooms/{room}/messages?after_seq=0&limit=10"), None, Some(&token)).await;
    assert_eq!(h.status, StatusCode::OK, "{}", h.body);
    assert!(h.body.to_string().contains("over TLS"), "{}", h.body);
    let started = Instant::now();
    while db.psql("SELECT count(*) FROM messages") != "1" {
        assert!(started.elapsed() < Duration::from_secs(20), "the message never reached the store");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A raw plaintext `PING` to a TLS port: the bytes the server sends back, if any. A TLS server
/// reads our bytes as a broken handshake and closes (or answers a TLS alert), never `+PONG`.
fn raw_ping(port: u16) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let _ = s.write_all(b"*1\r\n$4\r\nPING\r\n");
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    buf
}

fn denied_commands(log: &str) -> Vec<String> {
    // `ACL LOG` through redis-cli: one line per field; an empty log prints nothing.
    log.lines().filter(|l| !l.trim().is_empty()).map(str::to_string).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_over_tls_with_the_deploy_acl_serves_and_refuses_plaintext() {
    let ca = TestCa::new("chatmesh redis test CA");
    let other_ca = TestCa::new("some other CA");
    let server_cert = ca.issue_local("redis");
    let acl = data_acl(ca.dir());
    let files = TlsFiles { cert: server_cert.cert.clone(), key: server_cert.key.clone(), ca: ca.ca_file() };
    let access = fixture_access(&ca);
    let redis = tokio::task::spawn_blocking(move || TlsRedisServer::start(&files, &acl, access)).await.unwrap();
    let port = redis.port();
    let db = TestDatabase::create();
    let url = format!("rediss://chatmesh:{CHATMESH_PASSWORD}@127.0.0.1:{port}");
    let ca_file = ca.ca_file().display().to_string();

    let app = cluster_instance(url.clone(), db.url(), "tls1", vec![("CHATMESH_REDIS_CA_FILE", ca_file.clone())]).await;
    send_round_trip(&app, &db).await;
    // Every command chatmesh sent was allowed by the shipped ACL (a missing one is logged here).
    let log = redis.cli(&["ACL", "LOG"]).unwrap();
    assert!(denied_commands(&log).is_empty(), "ACL denials for chatmesh:\n{log}");
    let clients = redis.cli(&["CLIENT", "LIST"]).unwrap();
    assert!(clients.lines().any(|l| l.contains("user=chatmesh")), "{clients}");
    assert!(!app.logs.lock().unwrap().iter().any(|l| l.contains(CHATMESH_PASSWORD)), "the password was logged");
    drop(app);

    // The port speaks only TLS: plaintext gets no PONG, and redis-cli without --tls fails.
    let reply = raw_ping(port);
    assert!(!String::from_utf8_lossy(&reply).contains("PONG"), "plaintext PING answered: {reply:?}");
    let plain_cli = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "--user", FIXTURE_USER, "--pass", FIXTURE_PASSWORD])
        .args(["--no-auth-warning", "PING"])
        .output()
        .expect("redis-cli");
    let plain_out =
        String::from_utf8_lossy(&plain_cli.stdout).to_string() + &String::from_utf8_lossy(&plain_cli.stderr);
    assert!(!plain_out.contains("PONG"), "redis-cli without --tls got an answer: {plain_out}");

    let cluster_env = |redis_url: String, extra: Vec<(&'static str, String)>| {
        let mut env = vec![
            ("CHATMESH_REDIS_URL", redis_url),
            ("CHATMESH_STORE_URL", db.url()),
            ("CHATMESH_INSTANCE_ID", "tls-fail".to_string()),
        ];
        env.extend(extra);
        env
    };
    // redis:// (plaintext) to the TLS port: no start.
    let err = start_fails(cluster_env(format!("redis://chatmesh:{CHATMESH_PASSWORD}@127.0.0.1:{port}"), vec![]));
    assert!(err.contains("connecting to Redis at 127.0.0.1") && err.contains("(plaintext)"), "{err}");
    // A certificate the configured CA did not sign: no start.
    let wrong_ca = other_ca.ca_file().display().to_string();
    let err = start_fails(cluster_env(url.clone(), vec![("CHATMESH_REDIS_CA_FILE", wrong_ca)]));
    assert!(err.contains("(TLS)") && err.to_lowercase().contains("certificate"), "{err}");
    // The OS trust store does not know the test CA either.
    let err = start_fails(cluster_env(url.clone(), vec![]));
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    // Right CA, wrong password: refused by the ACL, and the password is not in the message.
    let err = start_fails(cluster_env(
        format!("rediss://chatmesh:not-the-password@127.0.0.1:{port}"),
        vec![("CHATMESH_REDIS_CA_FILE", ca_file.clone())],
    ));
    assert!(err.contains("authentication failed"), "{err}");
    assert!(!err.contains("not-the-password"), "password in the error: {err}");
    // A CA file next to a plaintext URL is a settings error, not a quiet plaintext start.
    let err = start_fails(cluster_env(format!("redis://127.0.0.1:{port}"), vec![("CHATMESH_REDIS_CA_FILE", ca_file)]));
    assert!(err.contains("CHATMESH_REDIS_CA_FILE") && err.contains("not TLS"), "{err}");
    tokio::task::spawn_blocking(move || drop(redis)).await.unwrap();
}

#[tokio::test]
async fn rediss_to_a_plaintext_redis_does_not_start() {
    let redis = tokio::task::spawn_blocking(crate::support::procs::RedisServer::start).await.unwrap();
    let db = TestDatabase::create();
    let err = start_fails(vec![
        ("CHATMESH_REDIS_URL", format!("rediss://127.0.0.1:{}", redis.port())),
        ("CHATMESH_STORE_URL", db.url()),
        ("CHATMESH_INSTANCE_ID", "tls-down".into()),
    ]);
    assert!(err.contains("connecting to Redis at 127.0.0.1") && err.contains("(TLS)"), "{err}");
    tokio::task::spawn_blocking(move || drop(redis)).await.unwrap();
}

/// The Sentinel fixture over TLS with the users of `deploy/redis/`: data nodes behind
/// `users.acl`, Sentinels with the `user` lines and peer credentials of `sentinel.conf`.
fn tls_sentinel_options(ca: &TestCa) -> TlsSetOptions {
    let node = ca.issue_local("redis-node");
    let sentinel_conf: String = deploy_file("sentinel.conf")
        .lines()
        .filter(|l| {
            l.starts_with("user ") || l.starts_with("sentinel sentinel-user") || l.starts_with("sentinel sentinel-pass")
        })
        .map(|l| {
            l.replace("CHANGE-ME-chatmesh-sentinel-password", "chatmesh-sentinel-test-pw")
                .replace("CHANGE-ME-sentinel-peer-password", "peer-test-pw")
                + "\n"
        })
        .collect();
    assert!(!sentinel_conf.contains("CHANGE-ME") && sentinel_conf.contains("user default off"), "{sentinel_conf}");
    TlsSetOptions {
        files: TlsFiles { cert: node.cert, key: node.key, ca: ca.ca_file() },
        aclfile: data_acl(ca.dir()),
        data_access: fixture_access(ca),
        replication: ("replica".into(), "replica-test-pw".into()),
        sentinel_auth: ("sentinel".into(), "sentinel-test-pw".into()),
        sentinel_conf,
        sentinel_access: TlsAccess { ca: ca.ca_file(), user: "sentinel-peer".into(), password: "peer-test-pw".into() },
    }
}

/// chatmesh finds the primary through TLS Sentinels (logging in as the Sentinel user) and talks
/// to it over TLS as the `chatmesh` ACL user: the address the Sentinels give keeps the URL's TLS,
/// CA and credentials (it used to be rebuilt as a bare `redis://host:port`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_over_tls_reaches_the_primary_with_credentials() {
    let ca = TestCa::new("chatmesh sentinel test CA");
    let options = tls_sentinel_options(&ca);
    let set = tokio::task::spawn_blocking(move || TlsReplicaSet::start(options)).await.unwrap();
    let db = TestDatabase::create();
    let url = set.sentinel_url(&format!("chatmesh:{CHATMESH_PASSWORD}"));
    let sentinel_env = vec![
        ("CHATMESH_REDIS_CA_FILE", ca.ca_file().display().to_string()),
        ("CHATMESH_REDIS_SENTINEL_USERNAME", "chatmesh-sentinel".to_string()),
        ("CHATMESH_REDIS_SENTINEL_PASSWORD", "chatmesh-sentinel-test-pw".to_string()),
    ];
    let app = cluster_instance(url.clone(), db.url(), "stls1", sentinel_env.clone()).await;
    send_round_trip(&app, &db).await;
    let primary = set.primary_port();
    let clients = tokio::task::block_in_place(|| set.data_cli(primary, &["CLIENT", "LIST"])).unwrap();
    assert!(clients.lines().any(|l| l.contains("user=chatmesh")), "no chatmesh connection on the primary:\n{clients}");
    let log = tokio::task::block_in_place(|| set.data_cli(primary, &["ACL", "LOG"])).unwrap();
    assert!(denied_commands(&log).is_empty(), "ACL denials on the primary:\n{log}");

    // After a failover the instance follows the Sentinels to the new primary, again over TLS as
    // the chatmesh user (the path that used to rebuild a bare redis://host:port).
    let (_, token) = app.register("afterfailover").await;
    let room = app.create_room(&token, "tls2", "public").await;
    let mut set = set;
    let new = tokio::task::block_in_place(|| set.fail_over(Duration::from_secs(30)));
    let started = Instant::now();
    let mut i = 0;
    loop {
        let r = app.send(&token, &room, &format!("f{i}"), "after failover").await;
        if r.status == StatusCode::CREATED {
            break;
        }
        assert_eq!(r.code(), "unavailable", "{}", r.body);
        assert!(started.elapsed() < Duration::from_secs(60), "sends never recovered after the failover");
        i += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let clients = tokio::task::block_in_place(|| set.data_cli(new, &["CLIENT", "LIST"])).unwrap();
    assert!(
        clients.lines().any(|l| l.contains("user=chatmesh")),
        "no chatmesh connection on the new primary:\n{clients}"
    );
    let log = tokio::task::block_in_place(|| set.data_cli(new, &["ACL", "LOG"])).unwrap();
    assert!(denied_commands(&log).is_empty(), "ACL denials on the new primary:\n{log}");

    let text = app.logs.lock().unwrap().join("\n");
    assert!(!text.contains(CHATMESH_PASSWORD) && !text.contains("chatmesh-sentinel-test-pw"), "a password was logged");
    drop(app);

    // Without the Sentinel credentials the Sentinels refuse chatmesh (default user off).
    let err = start_fails(vec![
        ("CHATMESH_REDIS_URL", url.clone()),
        ("CHATMESH_STORE_URL", db.url()),
        ("CHATMESH_INSTANCE_ID", "stls-fail".into()),
        ("CHATMESH_REDIS_CA_FILE", ca.ca_file().display().to_string()),
    ]);
    assert!(err.contains("sentinels"), "{err}");
    // Plaintext to the TLS Sentinels: no start.
    let err = start_fails(vec![
        ("CHATMESH_REDIS_URL", url.replacen("rediss+sentinel://", "redis+sentinel://", 1)),
        ("CHATMESH_STORE_URL", db.url()),
        ("CHATMESH_INSTANCE_ID", "stls-fail".into()),
        ("CHATMESH_REDIS_SENTINEL_USERNAME", "chatmesh-sentinel".to_string()),
        ("CHATMESH_REDIS_SENTINEL_PASSWORD", "chatmesh-sentinel-test-pw".to_string()),
    ]);
    assert!(err.contains("plaintext"), "{err}");
    tokio::task::spawn_blocking(move || drop(set)).await.unwrap();
}

const HBA_TLS_ONLY: &str = "local all all trust\n\
                            hostssl all all 127.0.0.1/32 trust\n\
                            hostnossl all all 0.0.0.0/0 reject\n";

/// Opens the store `url` names as an instance does (`chatmesh::store::open`: connect, migrate or
/// index) and pings it; the error chain as one string.
async fn store_at(url: &str) -> Result<std::sync::Arc<dyn chatmesh::store::Store>, String> {
    let store_url = chatmesh::config::StoreUrl::parse(url).map_err(|e| e.to_string())?;
    let store = chatmesh::store::open(&store_url).await.map_err(|e| format!("{e:#}"))?;
    store.ping().await.map_err(|e| format!("{e:?}"))?;
    Ok(store)
}

async fn open_store(url: &str) -> Result<(), String> {
    store_at(url).await.map(drop)
}

/// The error opening the store at `url`; panics if it opens.
async fn refused(url: &str) -> String {
    let err = open_store(url).await.expect_err("the store opened");
    eprintln!("refused as expected: {err}");
    err
}

/// PostgreSQL with `ssl=on` and only `hostssl` lines: `verify-full` with the test CA connects
/// (the server's `pg_stat_ssl` shows the session encrypted); plaintext is refused by the server;
/// a root that did not sign the certificate is refused by chatmesh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_verify_full_works_and_plaintext_is_refused() {
    let ca = TestCa::new("chatmesh pg test CA");
    let other_ca = TestCa::new("some other CA");
    let cert = ca.issue_local("postgres");
    let (c, k) = (cert.cert.clone(), cert.key.clone());
    let pg = tokio::task::spawn_blocking(move || {
        let pg = PgServer::start_tls(&c, &k, HBA_TLS_ONLY);
        pg.create_database("chat");
        pg
    })
    .await
    .unwrap();
    let base = pg.url("chat");
    let root = ca.ca_file().display().to_string();

    let store = store_at(&format!("{base}?sslmode=verify-full&sslrootcert={root}")).await.unwrap();
    // The store's connections are encrypted, as the server sees them (psql's own session left out).
    let sessions = |ssl: bool| {
        let sql = format!(
            "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.datname = 'chat' AND s.ssl = {ssl} AND a.pid <> pg_backend_pid()"
        );
        tokio::task::block_in_place(|| pg.psql("chat", &sql)).unwrap().parse::<u32>().unwrap()
    };
    assert!(sessions(true) >= 1, "no TLS session from the store");
    assert_eq!(sessions(false), 0);
    drop(store);
    open_store(&format!("{base}?sslmode=verify-ca&sslrootcert={root}")).await.unwrap();
    open_store(&format!("{base}?sslmode=require")).await.unwrap();

    let err = refused(&format!("{base}?sslmode=disable")).await;
    assert!(err.contains("no encryption") || err.contains("rejects connection"), "{err}");
    // No sslmode means plaintext (stated in the docs), which this server refuses: never a quiet
    // connection without TLS.
    let err = refused(&base).await;
    assert!(err.contains("no encryption") || err.contains("rejects connection"), "{err}");
    let err = refused(&format!("{base}?sslmode=prefer")).await;
    assert!(err.contains("silently fall back"), "{err}");
    let wrong = other_ca.ca_file().display().to_string();
    let err = refused(&format!("{base}?sslmode=verify-full&sslrootcert={wrong}")).await;
    assert!(err.to_lowercase().contains("certificate") || err.contains("UnknownIssuer"), "{err}");
    // `require` with a root checks the chain (as libpq does): the wrong root is refused.
    let err = refused(&format!("{base}?sslmode=require&sslrootcert={wrong}")).await;
    assert!(err.to_lowercase().contains("certificate") || err.contains("UnknownIssuer"), "{err}");
    // verify-full checks the name: a certificate for another host fails.
    tokio::task::spawn_blocking(move || drop(pg)).await.unwrap();

    let elsewhere = ca.issue("elsewhere", "DNS:db.elsewhere.example");
    let pg = tokio::task::spawn_blocking(move || {
        let pg = PgServer::start_tls(&elsewhere.cert, &elsewhere.key, HBA_TLS_ONLY);
        pg.create_database("chat");
        pg
    })
    .await
    .unwrap();
    let base = pg.url("chat");
    let err = refused(&format!("{base}?sslmode=verify-full&sslrootcert={root}")).await;
    assert!(err.to_lowercase().contains("certificate") || err.contains("NotValidForName"), "{err}");
    open_store(&format!("{base}?sslmode=verify-ca&sslrootcert={root}")).await.unwrap();
    tokio::task::spawn_blocking(move || drop(pg)).await.unwrap();
}

/// `sslmode=require` against a server without TLS fails instead of going on in plaintext.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_require_against_a_server_without_tls_fails() {
    let pg = tokio::task::spawn_blocking(|| {
        let pg = PgServer::start();
        pg.create_database("chat");
        pg
    })
    .await
    .unwrap();
    let err = refused(&format!("{}?sslmode=require", pg.url("chat"))).await;
    assert!(err.contains("server does not support TLS"), "{err}");
    open_store(&format!("{}?sslmode=disable", pg.url("chat"))).await.unwrap();
    tokio::task::spawn_blocking(move || drop(pg)).await.unwrap();
}

/// MongoDB (SecantusDB, TLS-only) with `tls=true&tlsCAFile=`: connects; a plaintext URL gets no
/// answer from the TLS port; the wrong CA is refused; `tls=true` against a plaintext server fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongodb_tls_with_a_ca_file_and_no_plaintext() {
    let ca = TestCa::new("chatmesh mongo test CA");
    let other_ca = TestCa::new("some other CA");
    let cert = ca.issue_local("secantus");
    let (c, k) = (cert.cert.clone(), cert.key.clone());
    let server = tokio::task::spawn_blocking(move || SecantusServer::start_tls(&c, &k)).await.unwrap();
    let base = server.url("chat");
    let root = ca.ca_file().display().to_string();

    open_store(&format!("{base}&tls=true&tlsCAFile={root}")).await.unwrap();
    let err = refused(&base).await;
    assert!(err.contains("connecting to MongoDB (plaintext)"), "{err}");
    let wrong = other_ca.ca_file().display().to_string();
    let err = refused(&format!("{base}&tls=true&tlsCAFile={wrong}")).await;
    assert!(err.contains("connecting to MongoDB (TLS)"), "{err}");
    let err = refused(&format!("{base}&tls=true&tlsCAFile={root}&tlsAllowInvalidCertificates=true")).await;
    assert!(err.contains("certificate checks off"), "{err}");
    tokio::task::spawn_blocking(move || drop(server)).await.unwrap();

    let plain = tokio::task::spawn_blocking(SecantusServer::start).await.unwrap();
    let err = refused(&format!("{}&tls=true&tlsCAFile={root}", plain.url("chat"))).await;
    assert!(err.contains("connecting to MongoDB (TLS)"), "{err}");
    tokio::task::spawn_blocking(move || drop(plain)).await.unwrap();
}
