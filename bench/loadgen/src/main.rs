//! chatmesh load generator. `ingest`: S senders over R rooms, each keeping `window` sends in flight
//! (closed loop); reports acked msgs/s, send latency percentiles, deliveries with order checks, and
//! the server's CPU time per ack when `--server-pid` is given. Prints one JSON object on stdout.
//! `soak`: C clients in one room sending at a fixed rate through one URL while faults are injected,
//! retrying with the same client_msg_id across reconnects; prints one verdict line (see soak.rs)
//! and exits 1 if anything was lost, duplicated or reordered.

mod api;
mod sio;
mod soak;
mod track;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use serde_json::{Value, json};
use tokio::sync::{Mutex, mpsc};

use crate::api::{register_users, rest};
use crate::track::{OrderStats, OrderTracker};

#[derive(Parser)]
#[command(about = "Socket.IO load generator for chatmesh")]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Acked messages per second into R rooms from S senders.
    Ingest {
        /// Instance URLs, comma-separated; senders are spread over them round robin.
        #[arg(long, default_value = "http://127.0.0.1:5001")]
        url: String,
        #[arg(long, default_value_t = 50)]
        senders: usize,
        #[arg(long, default_value_t = 10)]
        rooms: usize,
        /// Sends each sender keeps in flight.
        #[arg(long, default_value_t = 8)]
        window: usize,
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        #[arg(long, default_value_t = 1.0)]
        warmup: f64,
        /// Server processes whose CPU time is sampled (user + system), comma-separated.
        #[arg(long, value_delimiter = ',')]
        server_pid: Vec<u32>,
    },
    /// C clients in one room at a fixed rate, with retries across reconnects; verdict line.
    Soak {
        /// One URL (HAProxy).
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
        #[arg(long, default_value_t = 20)]
        clients: usize,
        /// Sends per second per client.
        #[arg(long, default_value_t = 5.0)]
        rate: f64,
        #[arg(long, default_value_t = 40.0)]
        seconds: f64,
        /// Name printed in the verdict line.
        #[arg(long, default_value = "soak")]
        scenario: String,
        /// Written (with this process's pid) once every client is connected and sending starts.
        #[arg(long)]
        ready_file: Option<String>,
    },
}

fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

fn self_cpu_seconds() -> f64 {
    cpu_seconds(std::process::id()).unwrap_or(0.0)
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx] as f64 / 1000.0
}

#[allow(clippy::too_many_arguments)]
async fn ingest(
    url: String,
    senders: usize,
    rooms: usize,
    window: usize,
    seconds: f64,
    warmup: f64,
    server_pid: Vec<u32>,
) -> anyhow::Result<Value> {
    anyhow::ensure!(senders >= rooms && rooms > 0, "need senders >= rooms > 0");
    let urls: Vec<String> = url.split(',').map(|u| u.trim().to_string()).filter(|u| !u.is_empty()).collect();
    let url = urls[0].clone();
    let http = reqwest::Client::new();
    let run =
        format!("{:x}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() % 0xffffff);
    let tokens = register_users(&http, &url, &format!("lg{run}"), senders).await?;
    let mut room_ids = Vec::with_capacity(rooms);
    for (r, owner) in tokens.iter().take(rooms).enumerate() {
        let v = rest(&http, &url, "/api/v1/rooms", json!({"name": format!("bench {run} {r}")}), Some(owner)).await?;
        room_ids.push(v["id"].as_str().unwrap_or_default().to_string());
    }

    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let latencies: Arc<Mutex<Vec<u64>>> = Arc::default();
    let mut trackers: Vec<Arc<std::sync::Mutex<OrderTracker>>> = Vec::new();
    let delivered_measured = Arc::new(AtomicU64::new(0));

    let mut tasks = Vec::new();
    for (i, token) in tokens.iter().enumerate() {
        let room = room_ids[i % rooms].clone();
        let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
        let client =
            sio::Client::connect(&urls[i % urls.len()], token, ev_tx).await.with_context(|| format!("sender {i}"))?;
        let join = client.call("room:join", &json!({"room_id": room})).await?;
        anyhow::ensure!(join["ok"] == true, "room:join: {join}");
        // Deliveries: checked for order, counted while measuring.
        let tracker = Arc::new(std::sync::Mutex::new(OrderTracker::default()));
        trackers.push(tracker.clone());
        let (measuring2, delivered2) = (measuring.clone(), delivered_measured.clone());
        tasks.push(tokio::spawn(async move {
            while let Some((name, payload)) = ev_rx.recv().await {
                if name == "message:new" {
                    let room = payload["room_id"].as_str().unwrap_or_default();
                    tracker.lock().unwrap().observe(room, payload["seq"].as_i64().unwrap_or(-1));
                    if measuring2.load(Ordering::Relaxed) {
                        delivered2.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
        let (stop, measuring, acked, errors, latencies) =
            (stop.clone(), measuring.clone(), acked.clone(), errors.clone(), latencies.clone());
        tasks.push(tokio::spawn(async move {
            let client = Arc::new(client);
            let mut in_flight = FuturesUnordered::new();
            let mut n = 0u64;
            let mut local_lat = Vec::new();
            loop {
                while in_flight.len() < window && !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let payload =
                        json!({"room_id": room, "client_msg_id": format!("s{i}-{n}"), "body": format!("load {i} {n}")});
                    let started = Instant::now();
                    let Ok(rx) = client.emit("message:send", &payload).await else { break };
                    in_flight.push(async move { (rx.await, started) });
                }
                let Some((ack, started)) = in_flight.next().await else { break };
                let ok = matches!(&ack, Ok(v) if v["ok"] == true);
                if measuring.load(Ordering::Relaxed) {
                    if ok {
                        acked.fetch_add(1, Ordering::Relaxed);
                        local_lat.push(started.elapsed().as_micros() as u64);
                    } else {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            latencies.lock().await.extend(local_lat);
            drop(client);
        }));
    }

    tokio::time::sleep(Duration::from_secs_f64(warmup)).await;
    let cpu_all = |pids: &[u32]| -> Option<f64> {
        if pids.is_empty() {
            return None;
        }
        pids.iter().map(|p| cpu_seconds(*p)).sum::<Option<f64>>()
    };
    let cpu0 = cpu_all(&server_pid);
    // Write-back lag as /health/ready reports it, sampled while measuring (cluster mode).
    let lag_samples: Arc<Mutex<Vec<u64>>> = Arc::default();
    let sampler = {
        let (lag_samples, http, url, measuring) = (lag_samples.clone(), http.clone(), url.clone(), measuring.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if !measuring.load(Ordering::Relaxed) {
                    continue;
                }
                if let Ok(r) = http.get(format!("{url}/health/ready")).send().await
                    && let Ok(v) = r.json::<Value>().await
                    && let Some(lag) = v["checks"]["sync"]["lag_ms"].as_u64()
                {
                    lag_samples.lock().await.push(lag);
                }
            }
        })
    };
    let self0 = self_cpu_seconds();
    let t0 = Instant::now();
    measuring.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu1 = cpu_all(&server_pid);
    sampler.abort();
    let mut lags = lag_samples.lock().await.clone();
    lags.sort_unstable();
    let lag_p =
        |p: f64| if lags.is_empty() { None } else { Some(lags[((lags.len() - 1) as f64 * p).round() as usize]) };
    let self1 = self_cpu_seconds();
    stop.store(true, Ordering::Relaxed);
    // Let in-flight sends and their deliveries settle, then close everything.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for t in &tasks {
        t.abort();
    }
    let acked = acked.load(Ordering::Relaxed);
    let mut lat = latencies.lock().await.clone();
    lat.sort_unstable();
    let mut order = OrderStats::default();
    for t in &trackers {
        order.add(t.lock().unwrap().stats);
    }
    let server_cpu = match (cpu0, cpu1) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    Ok(json!({
        "scenario": "ingest",
        "senders": senders, "rooms": rooms, "window": window, "seconds": elapsed,
        "acked": acked,
        "acked_per_sec": acked as f64 / elapsed,
        "errors": errors.load(Ordering::Relaxed),
        "latency_ms": {"p50": percentile(&lat, 0.50), "p99": percentile(&lat, 0.99), "p999": percentile(&lat, 0.999)},
        "delivered_per_sec": delivered_measured.load(Ordering::Relaxed) as f64 / elapsed,
        "order": {"gaps": order.gaps, "duplicates": order.duplicates, "reordered": order.reordered},
        "server_cpu_seconds": server_cpu,
        "server_cpu_us_per_ack": server_cpu.map(|c| c * 1e6 / acked.max(1) as f64),
        "loadgen_cpu_seconds": self1 - self0,
        "instances": urls.len(),
        "sync_lag_ms": {"p50": lag_p(0.5), "p99": lag_p(0.99), "max": lag_p(1.0), "samples": lags.len()},
    }))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Scenario::Soak { url, clients, rate, seconds, scenario, ready_file } = cli.scenario {
        let name = scenario.clone();
        let (v, details) = soak::soak(soak::Params { url, clients, rate, seconds, scenario, ready_file }).await?;
        eprintln!("{details}");
        println!("{}", v.line(&name));
        std::process::exit(if v.ok() { 0 } else { 1 });
    }
    let out = match cli.scenario {
        Scenario::Ingest { url, senders, rooms, window, seconds, warmup, server_pid } => {
            ingest(url, senders, rooms, window, seconds, warmup, server_pid).await?
        }
        Scenario::Soak { .. } => unreachable!(),
    };
    println!("{out}");
    Ok(())
}
