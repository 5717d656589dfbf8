//! The load generator counts what the server did: run `ingest` against a real embedded chatmesh
//! and compare its whole-run totals with the server's own counters, and its order checks with a
//! clean run (the unit tests feed the trackers gaps, repeats and reversals).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

fn chatmesh_binary() -> PathBuf {
    // Built beside this binary by `cargo build --workspace` / `cargo nextest run --workspace`.
    let loadgen = PathBuf::from(env!("CARGO_BIN_EXE_chatmesh-loadgen"));
    let bin = loadgen.with_file_name("chatmesh");
    assert!(bin.exists(), "{} is missing: build the workspace (cargo build --workspace)", bin.display());
    bin
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} not in /metrics"))
}

#[test]
fn ingest_totals_match_the_servers_counters() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Command::new(chatmesh_binary())
        .arg("serve")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("CHATMESH_BIND", "127.0.0.1:0")
        .env("CHATMESH_STORE_URL", format!("sqlite://{}/chatmesh.db", dir.path().display()))
        .env("CHATMESH_LOG_FORMAT", "json")
        .env("CHATMESH_AUTH_RATE_PER_MIN", "100000")
        .env("CHATMESH_SEND_RATE_PER_SEC", "100000")
        .env("CHATMESH_READ_RATE_PER_SEC", "100000")
        .env("CHATMESH_ROOM_CHANGE_RATE_PER_MIN", "100000")
        .env("RUST_LOG", "info,chatmesh::send=warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn chatmesh");
    let stdout = server.stdout.take().unwrap();
    let addr = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .find_map(|l| {
            let v: serde_json::Value = serde_json::from_str(&l).ok()?;
            (v["message"] == "listening").then(|| v["addr"].as_str().unwrap().to_string())
        })
        .expect("chatmesh logged `listening`");
    let url = format!("http://{addr}");
    let out = Command::new(env!("CARGO_BIN_EXE_chatmesh-loadgen"))
        .args(["ingest", "--url", &url, "--senders", "6", "--rooms", "3", "--window", "4"])
        .args(["--seconds", "2", "--warmup", "0.5", "--server-pid", &server.id().to_string()])
        .output()
        .expect("run loadgen");
    assert!(out.status.success(), "loadgen failed: {}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let metrics = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
        .get(format!("{url}/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    let _ = server.kill();
    let _ = server.wait();

    let acked_total = report["acked_total"].as_u64().unwrap();
    let delivered_total = report["delivered_total"].as_u64().unwrap();
    assert!(acked_total > 100, "{report}");
    assert_eq!(acked_total as f64, metric(&metrics, "chatmesh_messages_accepted_total"), "acks vs server");
    // Each room has 2 senders, each socket in its room: every accepted message reaches 2 sockets.
    assert_eq!(delivered_total, acked_total * 2, "{report}");
    assert_eq!(delivered_total as f64, metric(&metrics, "chatmesh_messages_delivered_total"), "deliveries vs server");
    assert!(report["acked"].as_u64().unwrap() <= acked_total);
    assert_eq!(report["order"], serde_json::json!({"gaps": 0, "duplicates": 0, "reordered": 0, "malformed": 0}));
    assert!(report["server_cpu_seconds"].as_f64().unwrap() > 0.0);
}
