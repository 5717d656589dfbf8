//! `fanout`: R rooms of M listening members each. Senders on the first instance send at an
//! open-loop rate (spread over the rooms round robin); every member socket listens on the last
//! instance, so each message crosses instances. Each rate step measures delivered msgs/s,
//! send→deliver latency (the send instant travels in the body) and server CPU per delivery.
//! `--find-max` doubles the rate until p99 exceeds the limit or deliveries fall behind, then
//! measures again at half of the best rate.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::api::{register_users, rest};
use crate::measure::{cpu_all, percentile_ms, self_cpu_seconds};
use crate::sio::{self, Events};

#[derive(clap::Args)]
pub struct Params {
    /// Instance URLs, comma-separated: senders use the first, members the last.
    #[arg(long = "url", value_delimiter = ',', default_value = "http://127.0.0.1:5001")]
    pub urls: Vec<String>,
    #[arg(long, default_value_t = 100)]
    pub rooms: usize,
    #[arg(long, default_value_t = 10)]
    pub members: usize,
    /// Sent msgs/s (all rooms) per step, comma-separated; with --find-max, the first step.
    #[arg(long = "rate", value_delimiter = ',', default_value = "1000")]
    pub rates: Vec<f64>,
    #[arg(long)]
    pub find_max: bool,
    #[arg(long, default_value_t = 5.0)]
    pub p99_limit_ms: f64,
    /// A step whose p99 passes this is saturated: the sweep stops.
    #[arg(long, default_value_t = 50.0)]
    pub saturation_p99_ms: f64,
    #[arg(long, default_value_t = 4.0)]
    pub step_seconds: f64,
    #[arg(long, default_value_t = 8)]
    pub senders: usize,
    #[arg(long, value_delimiter = ',')]
    pub server_pid: Vec<u32>,
}

/// What one `message:new` frame says: (seq, send instant in µs since the run's epoch).
pub fn parse_frame(frame: &str) -> Option<(i64, u64)> {
    fn number_after(s: &str, key: &str) -> Option<u64> {
        let at = s.find(key)? + key.len();
        let digits: &str = &s[at..];
        let end = digits.bytes().position(|b| !b.is_ascii_digit()).unwrap_or(digits.len());
        digits[..end].parse().ok()
    }
    if !crate::track::is_message_new(frame) {
        return None;
    }
    Some((number_after(frame, "\"seq\":")? as i64, number_after(frame, "\"body\":\"t")?))
}

/// Per-socket order check: every socket must see its room's seqs with no gap, repeat or reversal.
#[derive(Default, Clone, Copy, Debug, PartialEq)]
pub struct OrderCheck {
    pub gaps: u64,
    pub duplicates: u64,
    pub reordered: u64,
    /// `message:new` frames whose seq or send instant could not be read.
    pub malformed: u64,
}

impl OrderCheck {
    /// One raw frame for a socket whose last seq is `last`: a `message:new` is checked for order
    /// and its (seq, send instant) returned, or counted as malformed when those cannot be read;
    /// other events give None.
    pub fn observe_frame(&mut self, last: &mut i64, frame: &str) -> Option<(i64, u64)> {
        match parse_frame(frame) {
            Some((seq, sent_us)) => {
                self.observe(last, seq);
                Some((seq, sent_us))
            }
            None => {
                if crate::track::is_message_new(frame) {
                    self.malformed += 1;
                }
                None
            }
        }
    }

    pub fn observe(&mut self, last: &mut i64, seq: i64) {
        if *last > 0 {
            if seq == *last {
                self.duplicates += 1;
            } else if seq < *last {
                self.reordered += 1;
            } else if seq > *last + 1 {
                self.gaps += 1;
            }
        }
        *last = (*last).max(seq);
    }
}

/// The measured part of a step, as send instants (µs since the run's epoch). A delivery counts
/// when its message was sent inside it, whenever it arrives, and a send counts the same way.
/// Counting arrivals while measuring cut off the deliveries of the last messages at the window's
/// end: a 1,000-member room at 2 msgs/s (8 messages a step) read as 94 % delivered, "not kept up".
pub struct Window {
    start: AtomicU64,
    end: AtomicU64,
}

impl Window {
    pub fn closed() -> Self {
        Self { start: AtomicU64::new(u64::MAX), end: AtomicU64::new(u64::MAX) }
    }

    pub fn open(&self, now_us: u64) {
        self.end.store(u64::MAX, Ordering::SeqCst);
        self.start.store(now_us, Ordering::SeqCst);
    }

    pub fn close(&self, now_us: u64) {
        self.end.store(now_us, Ordering::SeqCst);
    }

    /// Whether a message sent at `sent_us` belongs to the window (both ends included).
    pub fn contains(&self, sent_us: u64) -> bool {
        sent_us >= self.start.load(Ordering::SeqCst) && sent_us <= self.end.load(Ordering::SeqCst)
    }
}

struct Shared {
    window: Window,
    delivered: AtomicU64,
    latencies: std::sync::Mutex<Vec<u64>>,
    order: std::sync::Mutex<OrderCheck>,
}

pub async fn run(p: Params) -> anyhow::Result<Value> {
    anyhow::ensure!(!p.urls.is_empty() && p.rooms > 0 && p.members > 0 && p.senders > 0, "bad parameters");
    let http = reqwest::Client::new();
    let first = p.urls[0].clone();
    let last = p.urls[p.urls.len() - 1].clone();
    let run =
        format!("{:x}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() % 0xffffff);
    // A handful of users: the sender owns every room; members are a few users with many sockets.
    let listeners = p.members.min(20);
    let tokens = register_users(&http, &first, &format!("fo{run}"), listeners + 1).await?;
    let mut room_ids = Vec::with_capacity(p.rooms);
    for r in 0..p.rooms {
        let v = rest(&http, &first, "/api/v1/rooms", json!({"name": format!("fanout {run} {r}")}), Some(&tokens[0]))
            .await?;
        room_ids.push(v["id"].as_str().unwrap_or_default().to_string());
    }

    let epoch = Instant::now();
    let shared = Arc::new(Shared {
        window: Window::closed(),
        delivered: AtomicU64::new(0),
        latencies: std::sync::Mutex::new(Vec::new()),
        order: std::sync::Mutex::new(OrderCheck::default()),
    });
    // Members: R × M sockets on the last instance, all feeding one consumer.
    let (tx, mut rx) = mpsc::unbounded_channel::<(u32, String)>();
    let mut members = Vec::with_capacity(p.rooms * p.members);
    for (r, room) in room_ids.iter().enumerate() {
        for m in 0..p.members {
            let idx = (r * p.members + m) as u32;
            let token = &tokens[1 + m % listeners];
            let c = sio::Client::connect_from(&last, token, None, Events::Raw(idx, tx.clone()))
                .await
                .with_context(|| format!("member {idx}"))?;
            let join = c.call("room:join", &json!({"room_id": room})).await?;
            anyhow::ensure!(join["ok"] == true, "room:join: {join}");
            members.push(c);
        }
    }
    drop(tx);
    let consumer = {
        let shared = shared.clone();
        let sockets = members.len();
        tokio::spawn(async move {
            let mut last_seq = vec![0i64; sockets];
            let mut order = OrderCheck::default();
            while let Some((idx, frame)) = rx.recv().await {
                let Some((seq, sent_us)) = order.observe_frame(&mut last_seq[idx as usize], &frame) else { continue };
                if shared.window.contains(sent_us) {
                    shared.delivered.fetch_add(1, Ordering::Relaxed);
                    let latency = (epoch.elapsed().as_micros() as u64).saturating_sub(sent_us);
                    shared.latencies.lock().unwrap().push(latency);
                }
                if seq % 1024 == 0 {
                    *shared.order.lock().unwrap() = order;
                }
            }
            *shared.order.lock().unwrap() = order;
        })
    };
    // Senders on the first instance (they do not join: they receive nothing).
    let mut senders = Vec::with_capacity(p.senders);
    for s in 0..p.senders {
        let (etx, _erx) = mpsc::unbounded_channel();
        let c = sio::Client::connect(&first, &tokens[0], etx).await.with_context(|| format!("sender {s}"))?;
        senders.push(Arc::new(c));
    }

    // Steps go on (doubling with --find-max) until deliveries fall behind or p99 passes the
    // saturation bound; `best` is the highest step within the p99 limit, `sustained` the highest
    // step that kept up at all.
    let mut steps = Vec::new();
    let mut rates = p.rates.clone();
    let (mut best, mut sustained): (Option<Value>, Option<Value>) = (None, None);
    let mut i = 0;
    while i < rates.len() {
        let rate = rates[i];
        let step = measure_step(&p, rate, &senders, &room_ids, &shared, epoch).await?;
        let p99 = step["latency_ms"]["p99"].as_f64().unwrap_or(f64::MAX);
        let kept_up = step["delivered_ratio"].as_f64().unwrap_or(0.0) >= 0.95 && p99 <= p.saturation_p99_ms;
        steps.push(step.clone());
        if kept_up {
            sustained = Some(step.clone());
            if p99 <= p.p99_limit_ms {
                best = Some(step);
            }
        }
        if p.find_max {
            if !kept_up {
                break;
            }
            if i + 1 == rates.len() && rates.len() < 12 {
                rates.push(rate * 2.0);
            }
        }
        i += 1;
    }
    let half = match (&best, p.find_max) {
        (Some(b), true) => {
            // The step that failed may have left queues behind: let them drain first.
            tokio::time::sleep(Duration::from_secs(3)).await;
            let rate = b["rate"].as_f64().unwrap_or(0.0) / 2.0;
            Some(measure_step(&p, rate, &senders, &room_ids, &shared, epoch).await?)
        }
        _ => None,
    };
    drop(senders);
    drop(members);
    let _ = tokio::time::timeout(Duration::from_secs(2), consumer).await;
    let order = *shared.order.lock().unwrap();
    Ok(json!({
        "scenario": "fanout",
        "rooms": p.rooms, "members": p.members, "instances": p.urls.len(),
        "p99_limit_ms": p.p99_limit_ms,
        "steps": steps,
        "best_within_p99": best,
        "sustained": sustained,
        "half_of_best": half,
        "order": {"gaps": order.gaps, "duplicates": order.duplicates, "reordered": order.reordered,
                  "malformed": order.malformed},
    }))
}

async fn measure_step(
    p: &Params,
    rate: f64,
    senders: &[Arc<sio::Client>],
    rooms: &[String],
    shared: &Arc<Shared>,
    epoch: Instant,
) -> anyhow::Result<Value> {
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let rejected = Arc::new(AtomicU64::new(0));
    let per_sender = per_sender_rate(rate, senders.len(), rooms.len());
    let active = senders.len().min(rooms.len());
    let mut tasks = Vec::new();
    for (s, client) in senders.iter().enumerate() {
        let (client, stop, sent, rejected) = (client.clone(), stop.clone(), sent.clone(), rejected.clone());
        let rooms: Vec<String> = rooms.iter().skip(s).step_by(senders.len()).cloned().collect();
        if rooms.is_empty() {
            continue;
        }
        let shared = shared.clone();
        tasks.push(tokio::spawn(async move {
            let mut tick = crate::pace::phased_interval(Duration::from_secs_f64(1.0 / per_sender.max(0.1)), s, active);
            let mut n = 0u64;
            let nonce: u32 = rand_u32();
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                n += 1;
                let room = &rooms[n as usize % rooms.len()];
                let sent_us = epoch.elapsed().as_micros() as u64;
                let body = format!("t{sent_us}");
                let payload = json!({"room_id": room, "client_msg_id": format!("f{nonce:x}-{s}-{n}"), "body": body});
                let Ok(ack) = client.emit("message:send", &payload).await else { break };
                if shared.window.contains(sent_us) {
                    sent.fetch_add(1, Ordering::Relaxed);
                }
                let rejected = rejected.clone();
                tokio::spawn(async move {
                    if !matches!(ack.await, Ok(v) if v["ok"] == true) {
                        rejected.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
        }));
    }
    // Warm up, then measure.
    tokio::time::sleep(Duration::from_secs(1)).await;
    shared.delivered.store(0, Ordering::Relaxed);
    shared.latencies.lock().unwrap().clear();
    let cpu0 = cpu_all(&p.server_pid);
    let self0 = self_cpu_seconds();
    let t0 = Instant::now();
    shared.window.open(epoch.elapsed().as_micros() as u64);
    tokio::time::sleep(Duration::from_secs_f64(p.step_seconds)).await;
    shared.window.close(epoch.elapsed().as_micros() as u64);
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu1 = cpu_all(&p.server_pid);
    let self1 = self_cpu_seconds();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    // Deliveries of messages sent in the window may still be on their way: let them arrive.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let delivered = shared.delivered.load(Ordering::Relaxed);
    let sent = sent.load(Ordering::Relaxed);
    let mut lat = std::mem::take(&mut *shared.latencies.lock().unwrap());
    lat.sort_unstable();
    let server_cpu = match (cpu0, cpu1) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let expected = sent * p.members as u64;
    Ok(json!({
        "rate": rate,
        "seconds": elapsed,
        "sent": sent,
        "rejected": rejected.load(Ordering::Relaxed),
        "delivered": delivered,
        "delivered_per_sec": delivered as f64 / elapsed,
        "delivered_ratio": if expected == 0 { 0.0 } else { delivered as f64 / expected as f64 },
        "latency_ms": {"p50": percentile_ms(&lat, 0.5), "p99": percentile_ms(&lat, 0.99), "p999": percentile_ms(&lat, 0.999)},
        "server_cpu_seconds": server_cpu,
        "server_cpu_us_per_delivery": server_cpu.map(|c| c * 1e6 / delivered.max(1) as f64),
        "loadgen_cpu_seconds": self1 - self0,
    }))
}

/// Sender `s` takes rooms s, s + senders, ...: with more senders than rooms some have none and
/// send nothing, so the step's rate is split over those that do, and the step sends what it is
/// labelled with.
pub fn per_sender_rate(rate: f64, senders: usize, rooms: usize) -> f64 {
    rate / senders.min(rooms).max(1) as f64
}

fn rand_u32() -> u32 {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    (t.subsec_nanos() ^ std::process::id().rotate_left(16)) | 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_give_seq_and_send_instant() {
        let f = r#"["message:new",{"id":"01J","room_id":"r1","seq":42,"sender_id":"u","client_msg_id":"c","body":"t123456","created_at":"2026-01-01T00:00:00.000Z"}]"#;
        assert_eq!(parse_frame(f), Some((42, 123456)));
        assert_eq!(parse_frame(r#"["typing",{"room_id":"r1"}]"#), None);
        assert_eq!(parse_frame(r#"["message:new",{"seq":3,"body":"hello"}]"#), None);
    }

    #[test]
    fn frames_that_cannot_be_read_are_counted_not_skipped() {
        let mut o = OrderCheck::default();
        let mut last = 0;
        let good = |seq: i64| format!(r#"["message:new",{{"seq":{seq},"body":"t5"}}]"#);
        assert_eq!(o.observe_frame(&mut last, &good(1)), Some((1, 5)));
        assert_eq!(o.observe_frame(&mut last, r#"["message:new",{"seq":2,"body":"hello"}]"#), None);
        assert_eq!(o.observe_frame(&mut last, r#"["typing",{"room_id":"r"}]"#), None);
        assert_eq!(o.observe_frame(&mut last, &good(2)), Some((2, 5)));
        assert_eq!(o, OrderCheck { malformed: 1, ..OrderCheck::default() }, "typing is not a delivery");
    }

    #[test]
    fn a_window_holds_the_sends_between_its_ends_and_nothing_before_it_opens() {
        let w = Window::closed();
        assert!(!w.contains(0) && !w.contains(5_000), "closed before the first step");
        w.open(1_000);
        assert!(!w.contains(999));
        assert!(w.contains(1_000) && w.contains(u64::MAX - 1), "open: every later send counts");
        w.close(2_000);
        assert!(w.contains(2_000) && !w.contains(2_001), "a delivery arriving later still counts by its send instant");
        w.open(3_000);
        assert!(!w.contains(1_500), "the last step's late deliveries do not count in the next");
    }

    #[test]
    fn the_rate_is_split_over_senders_that_have_rooms() {
        // 50 senders, 10 rooms: only senders 0..10 get a room; together they must send 400/s.
        assert_eq!(per_sender_rate(400.0, 50, 10) * 10.0, 400.0);
        assert_eq!(per_sender_rate(400.0, 8, 1000) * 8.0, 400.0);
        assert_eq!(per_sender_rate(400.0, 8, 0), 400.0);
    }

    #[test]
    fn order_check_counts_gaps_repeats_and_reversals() {
        let mut o = OrderCheck::default();
        let mut last = 0;
        for seq in [5, 6, 7, 9, 9, 8, 10] {
            o.observe(&mut last, seq);
        }
        assert_eq!(o, OrderCheck { gaps: 1, duplicates: 1, reordered: 1, malformed: 0 });
        let mut clean = OrderCheck::default();
        let mut last = 0;
        for seq in 100..200 {
            clean.observe(&mut last, seq);
        }
        assert_eq!(clean, OrderCheck::default());
    }
}
