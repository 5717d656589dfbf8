//! chatmesh load generator. `ingest`: S senders over R rooms, each keeping `window` sends in flight
//! (closed loop); reports acked msgs/s, send latency percentiles, deliveries with order checks, and
//! the server's CPU time per ack when `--server-pid` is given. Prints one JSON object on stdout.
//! `fanout`: rooms of M members, sender and members on different instances, open-loop rate steps
//! (fanout.rs). `idle`: N idle connections, server memory per connection (idle.rs).
//! `soak`: C clients in one room sending at a fixed rate through one URL while faults are injected,
//! retrying with the same client_msg_id across reconnects; prints one verdict line (see soak.rs)
//! and exits 1 if anything was lost, duplicated or reordered.

mod api;
mod fanout;
mod floor;
mod idle;
mod measure;
mod pace;
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

/// mimalloc, as in the server: the generator's own CPU per message matters (it shares the machine).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use crate::api::{register_users, rest};
use crate::measure::{cpu_all, percentile_ms as percentile, self_cpu_seconds};
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
        /// Open loop: total sends per second (spread over the senders); 0 = closed loop.
        #[arg(long, default_value_t = 0.0)]
        rate: f64,
        /// PostgreSQL the write-back lands in: samples ack → row-visible lag by polling it.
        #[arg(long)]
        pg_url: Option<String>,
    },
    /// R rooms × M members; sender and members on different instances; delivered msgs/s and
    /// send→deliver latency per open-loop rate step.
    Fanout(fanout::Params),
    /// N idle connections from several loopback source addresses; server RSS per connection.
    Idle(idle::Params),
    /// The kernel's CPU per loopback TCP send of a delivery's size: the floor under any server's
    /// CPU per delivered message on this machine.
    Floor(floor::Params),
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

#[allow(clippy::too_many_arguments)]
async fn ingest(
    url: String,
    senders: usize,
    rooms: usize,
    window: usize,
    seconds: f64,
    warmup: f64,
    server_pid: Vec<u32>,
    rate: f64,
    pg_url: Option<String>,
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
    // Whole-run totals (warm-up and drain included): what the server must agree with.
    let acked_all = Arc::new(AtomicU64::new(0));
    let delivered_all = Arc::new(AtomicU64::new(0));
    let mut senders_done = Vec::new();
    // Sending starts once every socket has joined its room, so every message reaches them all.
    let (go_tx, go_rx) = tokio::sync::watch::channel(false);

    // The latest ack seen while measuring, for the write-back lag probe.
    let last_ack: Arc<std::sync::Mutex<Option<(String, i64, Instant)>>> = Arc::default();
    let mut tasks = Vec::new();
    for (i, token) in tokens.iter().enumerate() {
        let room = room_ids[i % rooms].clone();
        let (ev_tx, mut ev_rx) = mpsc::unbounded_channel::<(u32, String)>();
        let client = sio::Client::connect_from(&urls[i % urls.len()], token, None, sio::Events::Raw(i as u32, ev_tx))
            .await
            .with_context(|| format!("sender {i}"))?;
        let join = client.call("room:join", &json!({"room_id": room})).await?;
        anyhow::ensure!(join["ok"] == true, "room:join: {join}");
        // Deliveries: checked for order, counted while measuring.
        let tracker = Arc::new(std::sync::Mutex::new(OrderTracker::default()));
        trackers.push(tracker.clone());
        let (measuring2, delivered2, delivered_all) =
            (measuring.clone(), delivered_measured.clone(), delivered_all.clone());
        tasks.push(tokio::spawn(async move {
            while let Some((_, frame)) = ev_rx.recv().await {
                if track::is_message_new(&frame) {
                    delivered_all.fetch_add(1, Ordering::Relaxed);
                    tracker.lock().unwrap().observe_frame(&frame);
                    if measuring2.load(Ordering::Relaxed) {
                        delivered2.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
        let (stop, measuring, acked, errors, latencies, last_ack, acked_all) = (
            stop.clone(),
            measuring.clone(),
            acked.clone(),
            errors.clone(),
            latencies.clone(),
            last_ack.clone(),
            acked_all.clone(),
        );
        // Open loop: one send per tick whatever the acks do; closed loop: `window` in flight.
        let period = (rate > 0.0).then(|| Duration::from_secs_f64(senders as f64 / rate));
        let mut go = go_rx.clone();
        senders_done.push(tokio::spawn(async move {
            let _ = go.wait_for(|started| *started).await;
            // Started once all are connected (no burst for ticks missed meanwhile), out of phase.
            let mut tick = period.map(|p| pace::phased_interval(p, i, senders));
            let client = Arc::new(client);
            let mut in_flight = FuturesUnordered::new();
            let mut n = 0u64;
            let mut local_lat = Vec::new();
            loop {
                let stopping = stop.load(Ordering::Relaxed);
                let mut send_now = 0;
                let ack = match &mut tick {
                    None => {
                        send_now = if stopping { 0 } else { window.saturating_sub(in_flight.len()) };
                        None
                    }
                    Some(t) if !stopping => tokio::select! {
                        _ = t.tick() => { send_now = 1; None }
                        Some(done) = in_flight.next(), if !in_flight.is_empty() => Some(done),
                    },
                    Some(_) => None,
                };
                for _ in 0..send_now {
                    n += 1;
                    let payload =
                        json!({"room_id": room, "client_msg_id": format!("s{i}-{n}"), "body": format!("load {i} {n}")});
                    let started = Instant::now();
                    let Ok(rx) = client.emit("message:send", &payload).await else { break };
                    in_flight.push(async move { (rx.await, started) });
                }
                let ack = match ack {
                    Some(a) => a,
                    None if tick.is_some() && !stopping => continue,
                    None => match in_flight.next().await {
                        Some(a) => a,
                        None => break,
                    },
                };
                let (ack, started) = ack;
                let ok = matches!(&ack, Ok(v) if v["ok"] == true);
                if ok {
                    acked_all.fetch_add(1, Ordering::Relaxed);
                }
                if measuring.load(Ordering::Relaxed) {
                    if ok {
                        acked.fetch_add(1, Ordering::Relaxed);
                        local_lat.push(started.elapsed().as_micros() as u64);
                        if let Ok(v) = &ack
                            && let Some(seq) = v["message"]["seq"].as_i64()
                            && let Ok(mut slot) = last_ack.try_lock()
                        {
                            *slot = Some((room.clone(), seq, Instant::now()));
                        }
                    } else {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            latencies.lock().await.extend(local_lat);
            // Kept open until every delivery has arrived (the caller drops it).
            client
        }));
    }

    go_tx.send_replace(true);
    tokio::time::sleep(Duration::from_secs_f64(warmup)).await;
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
    // Ack → row visible in PostgreSQL, one sampled message at a time (works for any backend that
    // writes the `messages` table, the Node baseline included).
    let pg_lags: Arc<Mutex<Vec<u64>>> = Arc::default();
    let pg_probe = match &pg_url {
        Some(pg) => {
            let pool = sqlx::postgres::PgPoolOptions::new().max_connections(1).connect(pg).await.context("pg_url")?;
            let (pg_lags, measuring, last_ack) = (pg_lags.clone(), measuring.clone(), last_ack.clone());
            Some(tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    if !measuring.load(Ordering::Relaxed) {
                        continue;
                    }
                    let Some((room, seq, acked_at)) = last_ack.lock().unwrap().take() else { continue };
                    loop {
                        let found: Option<i64> =
                            sqlx::query_scalar("SELECT seq FROM messages WHERE room_id = $1 AND seq = $2")
                                .bind(&room)
                                .bind(seq)
                                .fetch_optional(&pool)
                                .await
                                .ok()
                                .flatten();
                        if found.is_some() {
                            pg_lags.lock().await.push(acked_at.elapsed().as_micros() as u64);
                            break;
                        }
                        if acked_at.elapsed() > Duration::from_secs(60) {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                }
            }))
        }
        None => None,
    };
    let self0 = self_cpu_seconds();
    let t0 = Instant::now();
    measuring.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu1 = cpu_all(&server_pid);
    sampler.abort();
    if let Some(p) = pg_probe {
        // Let the last sampled message land, then stop.
        tokio::time::sleep(Duration::from_millis(300)).await;
        p.abort();
    }
    let mut pg = pg_lags.lock().await.clone();
    pg.sort_unstable();
    let mut lags = lag_samples.lock().await.clone();
    lags.sort_unstable();
    let lag_p =
        |p: f64| if lags.is_empty() { None } else { Some(lags[((lags.len() - 1) as f64 * p).round() as usize]) };
    let self1 = self_cpu_seconds();
    stop.store(true, Ordering::Relaxed);
    // Every send still in flight gets its ack; then deliveries settle (no new one for 300 ms).
    let open_clients = tokio::time::timeout(Duration::from_secs(15), futures::future::join_all(senders_done)).await;
    let mut seen = u64::MAX;
    for _ in 0..100 {
        let now = delivered_all.load(Ordering::Relaxed);
        if now == seen {
            break;
        }
        seen = now;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    drop(open_clients);
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
        "acked_total": acked_all.load(Ordering::Relaxed),
        "delivered_total": delivered_all.load(Ordering::Relaxed),
        "acked_per_sec": acked as f64 / elapsed,
        "errors": errors.load(Ordering::Relaxed),
        "latency_ms": {"p50": percentile(&lat, 0.50), "p99": percentile(&lat, 0.99), "p999": percentile(&lat, 0.999)},
        "delivered_per_sec": delivered_measured.load(Ordering::Relaxed) as f64 / elapsed,
        "order": {"gaps": order.gaps, "duplicates": order.duplicates, "reordered": order.reordered,
                  "malformed": order.malformed},
        "server_cpu_seconds": server_cpu,
        "server_cpu_us_per_ack": server_cpu.map(|c| c * 1e6 / acked.max(1) as f64),
        "loadgen_cpu_seconds": self1 - self0,
        "instances": urls.len(),
        "sync_lag_ms": {"p50": lag_p(0.5), "p99": lag_p(0.99), "max": lag_p(1.0), "samples": lags.len()},
        "rate": rate,
        "pg_visible_lag_ms": if pg.is_empty() { Value::Null } else {
            json!({"p50": percentile(&pg, 0.5), "p99": percentile(&pg, 0.99), "max": percentile(&pg, 1.0), "samples": pg.len()})
        },
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
        Scenario::Ingest { url, senders, rooms, window, seconds, warmup, server_pid, rate, pg_url } => {
            ingest(url, senders, rooms, window, seconds, warmup, server_pid, rate, pg_url).await?
        }
        Scenario::Fanout(p) => fanout::run(p).await?,
        Scenario::Idle(p) => idle::run(p).await?,
        Scenario::Floor(p) => floor::run(p).await?,
        Scenario::Soak { .. } => unreachable!(),
    };
    println!("{out}");
    Ok(())
}
