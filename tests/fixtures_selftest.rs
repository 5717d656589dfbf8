//! Proves the process fixtures in `tests/support/procs.rs` work: each starts real servers, does
//! what the cluster-mode tests will do with them, and leaves no process or temp dir behind.

#[path = "support/mod.rs"]
mod support;

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use support::procs::*;

/// Polls until `done`, panicking with `what` after `timeout`.
fn eventually(timeout: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?}: {what}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// After a fixture dropped: its dir is gone and no process runs in it.
fn assert_cleaned_up(dir: &Path, pids: &[u32]) {
    eventually(Duration::from_secs(5), "fixture processes exit", || {
        pids.iter().all(|&p| !process_alive(p)) && processes_in(dir).is_empty()
    });
    assert!(!dir.exists(), "{} still exists", dir.display());
}

#[test]
fn free_ports_are_distinct_and_bindable() {
    let ports: Vec<u16> = (0..200).map(|_| free_port()).collect();
    let distinct: HashSet<u16> = ports.iter().copied().collect();
    assert_eq!(distinct.len(), ports.len(), "a port was handed out twice");
    for &port in &ports[..20] {
        std::net::TcpListener::bind(("127.0.0.1", port)).unwrap_or_else(|e| panic!("port {port}: {e}"));
    }
}

#[test]
fn redis_starts_answers_dies_and_restarts_empty() {
    let mut redis = RedisServer::start_with(&["--maxmemory", "10mb"]);
    let (port, dir) = (redis.port(), redis.dir().to_path_buf());
    assert_eq!(redis.url(), format!("redis://127.0.0.1:{port}"));
    assert_eq!(redis.cli(&["PING"]), "PONG");
    assert_eq!(redis.cli(&["CONFIG", "GET", "maxmemory"]), "maxmemory\n10485760", "extra args reach the server");
    assert_eq!(redis.cli(&["SET", "k", "v"]), "OK");
    assert_eq!(redis.cli(&["GET", "k"]), "v");

    let first_pid = redis.pid().unwrap();
    redis.kill();
    assert!(!redis.is_running());
    assert!(!process_alive(first_pid));
    let err = redis.try_cli(&["PING"]).expect_err("a killed server does not answer");
    assert!(err.contains("Connection refused"), "{err}");

    redis.restart();
    assert_eq!(redis.port(), port, "restart keeps the port");
    assert_ne!(redis.pid(), Some(first_pid));
    assert_eq!(redis.cli(&["PING"]), "PONG");
    assert_eq!(redis.cli(&["GET", "k"]), "", "no persistence: the key is gone after a restart");
    assert_eq!(redis.cli(&["CONFIG", "GET", "maxmemory"]), "maxmemory\n10485760", "restart keeps the args");

    // restart() on a running server kills it first.
    let pid = redis.pid().unwrap();
    redis.restart();
    assert!(!process_alive(pid));
    assert_eq!(redis.cli(&["PING"]), "PONG");

    let pid = redis.pid().unwrap();
    drop(redis);
    assert_cleaned_up(&dir, &[pid]);
}

#[test]
fn tls_redis_speaks_only_tls_with_the_test_ca_and_leaves_nothing() {
    let ca = support::tls::TestCa::new("fixture selftest CA");
    let cert = ca.issue_local("redis");
    let acl = ca.dir().join("users.acl");
    std::fs::write(&acl, "user default off\nuser fixture on >fixture-pw ~* &* +@all\n").unwrap();
    let access = TlsAccess { ca: ca.ca_file(), user: "fixture".into(), password: "fixture-pw".into() };
    let files = TlsFiles { cert: cert.cert, key: cert.key, ca: ca.ca_file() };
    let redis = TlsRedisServer::start(&files, &acl, access.clone());
    assert_eq!(redis.cli(&["PING"]).unwrap(), "PONG");
    assert_eq!(redis.cli(&["CONFIG", "GET", "port"]).unwrap(), "port\n0", "no plaintext port");
    // Without credentials the default user is off; without TLS the port does not answer.
    let anonymous = TlsAccess { user: "default".into(), password: "x".into(), ..access };
    let answer = anonymous.cli(redis.port(), &["PING"]).unwrap_or_else(|e| e);
    assert!(answer.contains("NOAUTH") || answer.contains("WRONGPASS"), "{answer}");
    let plain = Command::new("redis-cli").args(["-p", &redis.port().to_string(), "PING"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&plain.stdout).contains("PONG"), "plaintext PING answered");
    let (pid, dir, ca_dir) = (redis.pid().unwrap(), redis.dir().to_path_buf(), ca.dir().to_path_buf());
    drop(redis);
    assert_cleaned_up(&dir, &[pid]);
    drop(ca);
    assert!(!ca_dir.exists(), "the CA dir {} is left", ca_dir.display());
}

#[test]
fn two_redis_servers_in_one_test_get_their_own_ports_and_data() {
    let a = RedisServer::start();
    let b = RedisServer::start();
    assert_ne!(a.port(), b.port());
    a.cli(&["SET", "only-in-a", "1"]);
    assert_eq!(b.cli(&["EXISTS", "only-in-a"]), "0");
}

#[tokio::test]
async fn usable_from_async_tests_through_spawn_blocking() {
    let redis = tokio::task::spawn_blocking(RedisServer::start).await.unwrap();
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", redis.port())).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream.write_all(b"PING\r\n").await.unwrap();
    let mut buf = [0u8; 7];
    stream.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"+PONG\r\n");
    let dir = redis.dir().to_path_buf();
    tokio::task::spawn_blocking(move || drop(redis)).await.unwrap();
    assert!(!dir.exists());
}

#[test]
fn replica_set_fails_over_to_the_replica() {
    let mut set = RedisReplicaSet::start();
    let dir = set.dir().to_path_buf();
    let (old_primary, replica) = (set.primary_port(), set.replica_port());
    let sentinels = set.sentinel_ports();
    assert_eq!(sentinels.len(), 3);
    assert_eq!(
        set.sentinel_url(),
        format!(
            "redis+sentinel://127.0.0.1:{},127.0.0.1:{},127.0.0.1:{}/chatmesh",
            sentinels[0], sentinels[1], sentinels[2]
        )
    );
    assert_eq!(set.sentinel_primary_port(), Some(old_primary));
    assert!(set.cli(replica, &["ROLE"]).starts_with("slave"), "the second node replicates");

    assert_eq!(
        set.primary_write_replicated(&["SET", "before", "1"]),
        ("OK".into(), 1),
        "the write reached the replica"
    );

    let started = Instant::now();
    assert_eq!(set.kill_primary(), old_primary);
    let new_primary = set.wait_for_failover(Duration::from_secs(15));
    let took = started.elapsed();
    assert_eq!(new_primary, replica, "Sentinel promoted the replica");
    assert_eq!(set.primary_port(), new_primary);
    assert_eq!(set.sentinel_primary_port(), Some(new_primary));
    assert!(set.cli(new_primary, &["ROLE"]).starts_with("master"));
    assert_eq!(set.primary_cli(&["SET", "after", "2"]), "OK", "the new primary accepts writes");
    assert_eq!(set.primary_cli(&["GET", "before"]), "1", "replicated data survived the failover");
    eprintln!("failover took {took:?}");

    drop(set);
    assert_cleaned_up(&dir, &[]);
}

#[test]
fn durable_replica_set_refuses_writes_without_a_replica() {
    let mut set = RedisReplicaSet::start_with(ReplicaSetOptions {
        master_name: "durable".into(),
        durable: true,
        ..Default::default()
    });
    assert!(set.sentinel_url().ends_with("/durable"));
    assert_eq!(set.primary_cli(&["CONFIG", "GET", "appendonly"]), "appendonly\nyes");
    assert_eq!(set.primary_cli(&["CONFIG", "GET", "min-replicas-to-write"]), "min-replicas-to-write\n1");
    assert_eq!(set.primary_cli(&["SET", "k", "v"]), "OK", "a replica is connected, so writes go through");

    let old_primary = set.kill_primary();
    let new_primary = set.wait_for_failover(Duration::from_secs(15));
    let refused = set.cli(new_primary, &["SET", "k2", "v"]);
    assert!(refused.starts_with("NOREPLICAS"), "the promoted node has no replica yet: {refused}");
    assert_eq!(set.cli(new_primary, &["GET", "k"]), "v");

    // The old primary comes back (with its AOF), Sentinel turns it into a replica of the new one,
    // and writes are accepted again.
    let started = Instant::now();
    set.restart_node(old_primary);
    eventually(Duration::from_secs(25), "the old primary rejoins as a replica and writes go through", || {
        set.cli(new_primary, &["SET", "k2", "v"]) == "OK"
    });
    eprintln!("rejoin took {:?}", started.elapsed());
    assert!(set.cli(old_primary, &["ROLE"]).starts_with("slave"));
    assert_eq!(set.primary_write_replicated(&["SET", "k3", "v"]), ("OK".into(), 1));
    assert_eq!(set.cli(old_primary, &["GET", "k3"]), "v", "the rejoined replica holds an acknowledged write");
}

#[test]
fn pg_server_creates_databases_stops_and_starts_again() {
    let mut pg = PgServer::start();
    let (port, dir) = (pg.port(), pg.dir().to_path_buf());
    assert_eq!(pg.url("app"), format!("postgres://postgres@127.0.0.1:{port}/app"));
    pg.create_database("app");
    pg.psql("app", "CREATE TABLE t (x int); INSERT INTO t VALUES (42)").unwrap();
    assert_eq!(pg.psql("app", "SELECT x FROM t").unwrap(), "42");
    assert_eq!(pg.psql("app", "SHOW fsync").unwrap(), "off");

    let first_pid = pg.pid().unwrap();
    pg.stop();
    assert!(!pg.is_running());
    assert!(!process_alive(first_pid));
    let err = pg.psql("app", "SELECT 1").expect_err("a stopped server refuses connections");
    assert!(err.contains("Connection refused") || err.contains("could not connect"), "{err}");

    pg.start_again();
    assert_eq!(pg.port(), port, "same port");
    assert_eq!(pg.psql("app", "SELECT x FROM t").unwrap(), "42", "same data dir");

    // A crash-like stop, then recovery.
    pg.stop_immediate();
    assert!(pg.psql("app", "SELECT 1").is_err());
    pg.start_again();
    assert_eq!(pg.psql("app", "SELECT count(*) FROM t").unwrap(), "1");

    let pid = pg.pid().unwrap();
    drop(pg);
    assert_cleaned_up(&dir, &[pid]);
}

#[test]
fn redis_cluster_forms_and_routes_writes() {
    let cluster = RedisCluster::start();
    let dir = cluster.dir().to_path_buf();
    let ports = cluster.ports();
    assert_eq!(ports.len(), 3);
    assert_eq!(cluster.urls(), ports.iter().map(|p| format!("redis://127.0.0.1:{p}")).collect::<Vec<_>>());
    for i in 0..3 {
        let info = cluster.node_cli(i, &["CLUSTER", "INFO"]);
        assert!(info.contains("cluster_state:ok"), "node {i}: {info}");
        assert!(info.contains("cluster_known_nodes:3"), "node {i}: {info}");
    }
    assert_eq!(cluster.cli(&["SET", "{k}x", "1"]), "OK");
    // Read back through every node: -c follows the MOVED redirect to the slot's owner.
    for i in 0..3 {
        assert_eq!(cluster.node_cli(i, &["GET", "{k}x"]), "1");
    }
    drop(cluster);
    assert_cleaned_up(&dir, &[]);
}

#[test]
fn secantus_answers_as_a_one_member_replica_set_and_leaves_nothing() {
    let server = SecantusServer::start();
    let (port, dir, pid) = (server.port(), server.dir().to_path_buf(), server.pid().unwrap());
    assert_eq!(server.url("app"), format!("mongodb://127.0.0.1:{port}/app?replicaSet=secantus"));
    let url = server.url("app");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let client = mongodb::Client::with_uri_str(&url).await.unwrap();
        let hello = client.database("admin").run_command(mongodb::bson::doc! { "hello": 1 }).await.unwrap();
        assert_eq!(hello.get_str("setName"), Ok("secantus"), "{hello}");
        assert_eq!(hello.get_bool("isWritablePrimary"), Ok(true), "{hello}");
        // A transaction commits (the MongoDB store's multi-document writes need them).
        let coll = client.database("app").collection::<mongodb::bson::Document>("t");
        let mut session = client.start_session().await.unwrap();
        session.start_transaction().await.unwrap();
        coll.insert_one(mongodb::bson::doc! { "_id": 1 }).session(&mut session).await.unwrap();
        session.commit_transaction().await.unwrap();
        // `shutdown` waits for every session of the client to be dropped.
        drop(session);
        assert_eq!(coll.count_documents(mongodb::bson::doc! {}).await.unwrap(), 1);
        client.shutdown().await;
    });
    drop(server);
    assert_cleaned_up(&dir, &[pid]);
}

#[test]
fn mongo_test_databases_share_one_server_that_stops_with_the_last() {
    let (a, b) = (support::mongo::TestMongoDatabase::create(), support::mongo::TestMongoDatabase::create());
    assert_ne!(a.name(), b.name());
    let Some(over) = support::mongo::override_url() else {
        assert!(a.on_secantus() && b.on_secantus());
        let host = |url: &str| url.split('/').nth(2).unwrap().to_string();
        assert_eq!(host(&a.url()), host(&b.url()), "one server for the databases that exist together");
        let port: u16 = host(&a.url()).rsplit(':').next().unwrap().parse().unwrap();
        drop(a);
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(), "still serving b");
        drop(b);
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err(), "stopped with the last database");
        return;
    };
    assert!(!a.on_secantus() && a.url().starts_with(over.split('?').next().unwrap().trim_end_matches('/')));
}

/// Run by `fixtures_die_with_the_test_process` in a child test process, which it then SIGKILLs.
#[test]
#[ignore = "helper: started and killed by fixtures_die_with_the_test_process"]
fn orphan_helper() {
    if std::env::var_os("CHATMESH_FIXTURE_ORPHAN_HELPER").is_none() {
        return;
    }
    let redis = RedisServer::start();
    let pg = PgServer::start();
    println!(
        "READY {} {} {} {} {} {}",
        redis.pid().unwrap(),
        redis.port(),
        redis.dir().display(),
        pg.pid().unwrap(),
        pg.port(),
        pg.dir().display()
    );
    thread::sleep(Duration::from_secs(60));
}

#[test]
fn fixtures_die_with_the_test_process() {
    let mut helper = Command::new(std::env::current_exe().unwrap())
        .args(["orphan_helper", "--exact", "--ignored", "--nocapture", "--test-threads", "1"])
        .env("CHATMESH_FIXTURE_ORPHAN_HELPER", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = None;
    for line in BufReader::new(helper.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        // libtest prints "test orphan_helper ... " before the helper's own output.
        if let Some((_, rest)) = line.split_once("READY ") {
            ready = Some(rest.split(' ').map(String::from).collect::<Vec<_>>());
            break;
        }
    }
    let Some(fields) = ready else {
        let status = helper.wait().unwrap();
        panic!("the helper exited ({status}) without starting its fixtures");
    };
    let redis_pid: u32 = fields[0].parse().unwrap();
    let redis_port: u16 = fields[1].parse().unwrap();
    let redis_dir = PathBuf::from(&fields[2]);
    let pg_pid: u32 = fields[3].parse().unwrap();
    let pg_port: u16 = fields[4].parse().unwrap();
    let pg_dir = PathBuf::from(&fields[5]);
    assert!(process_alive(redis_pid) && process_alive(pg_pid));

    // Killed without unwinding: no Drop runs in the helper.
    helper.kill().unwrap();
    helper.wait().unwrap();

    eventually(Duration::from_secs(5), "orphaned fixture processes die", || {
        !process_alive(redis_pid)
            && !process_alive(pg_pid)
            && processes_in(&redis_dir).is_empty()
            && processes_in(&pg_dir).is_empty()
    });
    for port in [redis_port, pg_port] {
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err(), "port {port} still answers");
    }
    // Its temp dirs stay until a sweep (this one, or the first fixture of any test process that
    // starts meanwhile) removes them.
    remove_stale_fixture_dirs();
    assert!(!redis_dir.exists() && !pg_dir.exists(), "the sweep removes a dead test process's dirs");
}
