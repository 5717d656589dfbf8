use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::cluster_instance;
use crate::helpers::TestApp;
use crate::support::procs::{PgServer, RedisServer};

async fn ready(app: &TestApp) -> Value {
    app.call(Method::GET, "/health/ready", None, None).await.body
}

/// The store the test started itself is stopped for 20 s under load: sends keep being acked, the
/// lag grows and is reported, and after the restart everything drains exactly once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_outage_keeps_accepting_and_drains_exactly_once_in_order() {
    let redis = RedisServer::start();
    let mut pg = PgServer::start();
    pg.create_database("chatmesh");
    let store_url = pg.url("chatmesh");
    let prefix = format!("o{}", ulid::Ulid::generate());
    let apps = vec![
        cluster_instance(redis.url(), store_url.clone(), "n1", vec![("CHATMESH_REDIS_PREFIX", prefix.clone())]).await,
        cluster_instance(redis.url(), store_url.clone(), "n2", vec![("CHATMESH_REDIS_PREFIX", prefix.clone())]).await,
    ];
    for app in &apps {
        for _ in 0..100 {
            if app.call(Method::GET, "/health/ready", None, None).await.status == StatusCode::OK {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let (_, token) = apps[0].register("outage").await;
    let room = apps[0].create_room(&token, "outage", "public").await;

    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(std::sync::Mutex::new(HashMap::<String, i64>::new()));
    let urls: Vec<String> = apps.iter().map(|a| a.url.clone()).collect();
    let sender = {
        let (stop, acked, token, room) = (stop.clone(), acked.clone(), token.clone(), room.clone());
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut failures = 0u32;
            for i in 0u64.. {
                if stop.load(Ordering::Relaxed) {
                    return failures;
                }
                let url = &urls[(i % 2) as usize];
                let res = client
                    .post(format!("{url}/api/v1/rooms/{room}/messages"))
                    .bearer_auth(&token)
                    .json(&serde_json::json!({"client_msg_id": format!("o{i}"), "body": format!("outage {i}")}))
                    .send()
                    .await;
                match res {
                    Ok(r) if r.status() == StatusCode::CREATED => {
                        let v: Value = r.json().await.unwrap();
                        acked.lock().unwrap().insert(v["id"].as_str().unwrap().to_string(), v["seq"].as_i64().unwrap());
                    }
                    _ => failures += 1,
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            failures
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before_outage = acked.lock().unwrap().len();

    tokio::task::block_in_place(|| pg.stop());
    let outage_started = Instant::now();
    let mut max_pending = 0;
    let mut max_lag = 0;
    while outage_started.elapsed() < Duration::from_secs(20) {
        let r = apps[0].call(Method::GET, "/health/ready", None, None).await;
        assert_eq!(r.status, StatusCode::OK, "an instance stays ready while only the store is down: {}", r.body);
        assert_eq!(r.body["checks"]["store"]["ok"], false);
        max_pending = max_pending.max(r.body["checks"]["sync"]["pending"].as_i64().unwrap_or(0));
        max_lag = max_lag.max(r.body["checks"]["sync"]["lag_ms"].as_i64().unwrap_or(0));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let during = acked.lock().unwrap().len() - before_outage;
    assert!(during > 100, "sends kept being acknowledged during the outage (got {during})");
    assert!(max_pending > 100, "the backlog is reported (max pending {max_pending})");
    assert!(max_lag > 10_000, "the lag is reported (max lag {max_lag} ms)");

    tokio::task::block_in_place(|| pg.start_again());
    // Drained: the oldest entry waiting is fresh again (new sends keep arriving meanwhile).
    let drain_started = Instant::now();
    loop {
        let body = ready(&apps[1]).await;
        if body["checks"]["store"]["ok"] == true
            && body["checks"]["sync"]["lag_ms"].as_i64().unwrap_or(i64::MAX) < 1_000
        {
            break;
        }
        assert!(drain_started.elapsed() < Duration::from_secs(60), "the backlog did not drain: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let drained_in = drain_started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let failures = sender.await.unwrap();
    let settle = Instant::now();
    loop {
        let body = ready(&apps[0]).await;
        if body["checks"]["sync"]["pending"] == 0 {
            break;
        }
        assert!(settle.elapsed() < Duration::from_secs(20), "the last entries did not sync: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let acked = acked.lock().unwrap().clone();
    let rows = tokio::task::block_in_place(|| {
        pg.psql("chatmesh", &format!("SELECT id, seq FROM messages WHERE room_id = '{room}' ORDER BY seq")).unwrap()
    });
    let stored: Vec<(String, i64)> = rows
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (id, seq) = l.split_once('|').unwrap();
            (id.to_string(), seq.parse().unwrap())
        })
        .collect();
    let seqs: Vec<i64> = stored.iter().map(|(_, s)| *s).collect();
    assert_eq!(seqs, (1..=seqs.len() as i64).collect::<Vec<_>>(), "in order, gap-free, once each");
    for (id, seq) in &acked {
        assert!(stored.contains(&(id.clone(), *seq)), "acked message {id} (seq {seq}) not stored");
    }
    assert_eq!(
        stored.len(),
        acked.len(),
        "nothing stored that was not acked (failures seen by the sender: {failures})"
    );
    eprintln!(
        "store outage: {} acked ({} during 20 s outage), max pending {max_pending}, max lag {max_lag} ms, drained in {:?}",
        acked.len(),
        during,
        drained_in
    );
}
