//! `soak`: C clients (one user each) in one room, each sending at a fixed rate through one URL
//! (HAProxy) while the caller injects faults. A client retries the SAME `client_msg_id` after an
//! ack timeout or a disconnect (reconnect with backoff, `room:join` with `after_seq`, `room:sync`
//! until `!has_more`), exactly as README.md's client sketch does. At the end every client catches
//! up once more, the full history is read over REST, and [`verdict`] compares what was sent,
//! acknowledged, stored and received.
//!
//! Output: one line on stdout
//! `scenario=<name> sent=N acked=N stored=N delivered_per_client_min=N lost=N duplicated=N
//! reordered=N max_gap_ms=N` and one JSON object with the details on stderr.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::api::{register_users, rest};
use crate::sio;

const ACK_TIMEOUT: Duration = Duration::from_secs(3);
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
const SETTLE: Duration = Duration::from_secs(10);

// ---- the verdict: a pure function over recorded data ---------------------------------------------

/// What one client saw.
#[derive(Debug, Default, Clone)]
pub struct ClientRecord {
    /// `message:new` seqs per connection, in arrival order (one inner list per connection).
    pub live: Vec<Vec<i64>>,
    /// Seqs read by `room:join` / `room:sync` (catch-up), with their client_msg_id.
    pub caught_up: Vec<(i64, String)>,
    /// (seq, client_msg_id) of every `message:new`, for the phantom check.
    pub live_ids: Vec<(i64, String)>,
}

/// Everything the harness recorded.
#[derive(Debug, Default, Clone)]
pub struct Recorded {
    /// Every client_msg_id emitted at least once.
    pub sent: BTreeSet<String>,
    /// client_msg_id → seq of its (first) positive ack.
    pub acked: BTreeMap<String, i64>,
    /// The room's history as REST returned it, in order: (seq, client_msg_id).
    pub history: Vec<(i64, String)>,
    pub clients: Vec<ClientRecord>,
    pub max_gap_ms: u64,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub sent: u64,
    pub acked: u64,
    pub stored: u64,
    pub delivered_per_client_min: u64,
    /// Acked client_msg_ids missing from history.
    pub lost: u64,
    /// client_msg_ids stored more than once.
    pub duplicated: u64,
    /// Clients whose received seqs are not exactly 1..head or that saw a connection's live seqs go
    /// backwards, + 1 if the history is not 1..head in order, + acks whose seq history gives to
    /// another message.
    pub reordered: u64,
    pub max_gap_ms: u64,
    // Details (stderr JSON only).
    pub head: i64,
    pub clients_incomplete: u64,
    pub clients_live_backwards: u64,
    pub history_not_gap_free: bool,
    pub ack_seq_mismatch: u64,
    /// Seqs a client saw (live or caught up) under another client_msg_id than history has.
    pub phantom_seqs: u64,
    pub stored_not_acked: u64,
}

impl Verdict {
    pub fn ok(&self) -> bool {
        self.lost == 0 && self.duplicated == 0 && self.reordered == 0
    }

    pub fn line(&self, scenario: &str) -> String {
        format!(
            "scenario={scenario} sent={} acked={} stored={} delivered_per_client_min={} lost={} duplicated={} reordered={} max_gap_ms={}",
            self.sent,
            self.acked,
            self.stored,
            self.delivered_per_client_min,
            self.lost,
            self.duplicated,
            self.reordered,
            self.max_gap_ms
        )
    }
}

pub fn verdict(r: &Recorded) -> Verdict {
    let mut v = Verdict {
        sent: r.sent.len() as u64,
        acked: r.acked.len() as u64,
        stored: r.history.len() as u64,
        max_gap_ms: r.max_gap_ms,
        ..Default::default()
    };
    // History: seqs exactly 1, 2, ..., n in the order returned.
    v.history_not_gap_free = r.history.iter().enumerate().any(|(i, (seq, _))| *seq != i as i64 + 1);
    v.head = r.history.iter().map(|(s, _)| *s).max().unwrap_or(0);
    let mut by_id: HashMap<&str, Vec<i64>> = HashMap::new();
    for (seq, id) in &r.history {
        by_id.entry(id.as_str()).or_default().push(*seq);
    }
    let by_seq: HashMap<i64, &str> = r.history.iter().map(|(s, id)| (*s, id.as_str())).collect();
    v.duplicated = by_id.values().filter(|seqs| seqs.len() > 1).count() as u64;
    for (id, seq) in &r.acked {
        match by_id.get(id.as_str()) {
            None => v.lost += 1,
            Some(seqs) if !seqs.contains(seq) => v.ack_seq_mismatch += 1,
            Some(_) => {}
        }
    }
    v.stored_not_acked = by_id.keys().filter(|id| !r.acked.contains_key(**id)).count() as u64;
    // Clients.
    let expected: BTreeSet<i64> = (1..=v.head).collect();
    let mut min_delivered: Option<u64> = None;
    for c in &r.clients {
        let mut got: BTreeSet<i64> = c.caught_up.iter().map(|(s, _)| *s).collect();
        got.extend(c.live.iter().flatten().copied());
        let n = got.len() as u64;
        min_delivered = Some(min_delivered.map_or(n, |m| m.min(n)));
        let incomplete = got != expected;
        let backwards = c.live.iter().any(|conn| conn.windows(2).any(|w| w[1] <= w[0]));
        v.clients_incomplete += incomplete as u64;
        v.clients_live_backwards += backwards as u64;
        if incomplete || backwards {
            v.reordered += 1;
        }
        v.phantom_seqs += c
            .live_ids
            .iter()
            .chain(c.caught_up.iter())
            .filter(|(s, id)| by_seq.get(s).is_some_and(|h| *h != id.as_str()))
            .map(|(s, _)| *s)
            .collect::<BTreeSet<_>>()
            .len() as u64;
    }
    v.delivered_per_client_min = min_delivered.unwrap_or(0);
    v.reordered += v.history_not_gap_free as u64 + v.ack_seq_mismatch;
    v
}

// ---- the harness ---------------------------------------------------------------------------------

pub struct Params {
    pub url: String,
    pub clients: usize,
    pub rate: f64,
    pub seconds: f64,
    pub scenario: String,
    pub ready_file: Option<String>,
}

/// One client's shared state: the record plus the seqs it holds (for `after_seq`).
#[derive(Default)]
struct ClientState {
    rec: ClientRecord,
    seen: BTreeSet<i64>,
}

impl ClientState {
    /// The highest n such that 1..=n were all seen: where a catch-up resumes.
    fn contiguous(&self) -> i64 {
        let mut n = 0;
        for s in &self.seen {
            if *s == n + 1 {
                n = *s;
            } else if *s > n + 1 {
                break;
            }
        }
        n
    }
}

type Shared = Arc<Mutex<ClientState>>;

/// A live connection: the Socket.IO client plus a flag the event task clears when it closes.
struct Conn {
    client: sio::Client,
    alive: Arc<AtomicBool>,
}

async fn call(conn: &Conn, event: &str, payload: &Value) -> anyhow::Result<Value> {
    let rx = conn.client.emit(event, payload).await?;
    match tokio::time::timeout(CALL_TIMEOUT, rx).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(_)) => bail!("{event}: connection closed"),
        Err(_) => bail!("{event}: no ack in {CALL_TIMEOUT:?}"),
    }
}

fn absorb(state: &Shared, msgs: &Value) -> i64 {
    let mut st = state.lock().unwrap();
    let mut n = 0;
    for m in msgs.as_array().into_iter().flatten() {
        let seq = m["seq"].as_i64().unwrap_or(-1);
        st.rec.caught_up.push((seq, m["client_msg_id"].as_str().unwrap_or_default().to_string()));
        st.seen.insert(seq);
        n += 1;
    }
    n
}

/// `room:sync` from the contiguous prefix until `!has_more`.
async fn catch_up(conn: &Conn, room: &str, state: &Shared) -> anyhow::Result<()> {
    loop {
        let after = state.lock().unwrap().contiguous();
        let r = call(conn, "room:sync", &json!({"room_id": room, "after_seq": after, "limit": 500})).await?;
        anyhow::ensure!(r["ok"] == true, "room:sync: {r}");
        let n = absorb(state, &r["messages"]);
        if r["has_more"] != true || n == 0 {
            return Ok(());
        }
    }
}

/// Connects, joins with `after_seq` and syncs; one attempt.
async fn open(url: &str, token: &str, room: &str, state: &Shared, reconnects: &AtomicU64) -> anyhow::Result<Conn> {
    let (tx, mut rx) = mpsc::unbounded_channel::<(String, Value)>();
    let client = sio::Client::connect(url, token, tx).await?;
    let alive = Arc::new(AtomicBool::new(true));
    let conn_idx = {
        let mut st = state.lock().unwrap();
        st.rec.live.push(Vec::new());
        st.rec.live.len() - 1
    };
    if conn_idx > 0 {
        reconnects.fetch_add(1, Ordering::Relaxed);
    }
    {
        let (state, alive, room) = (state.clone(), alive.clone(), room.to_string());
        tokio::spawn(async move {
            while let Some((name, p)) = rx.recv().await {
                if name == "message:new" && p["room_id"] == room.as_str() {
                    let seq = p["seq"].as_i64().unwrap_or(-1);
                    let mut st = state.lock().unwrap();
                    st.rec.live[conn_idx].push(seq);
                    st.rec.live_ids.push((seq, p["client_msg_id"].as_str().unwrap_or_default().to_string()));
                    st.seen.insert(seq);
                }
            }
            alive.store(false, Ordering::Relaxed);
        });
    }
    let conn = Conn { client, alive };
    let after = state.lock().unwrap().contiguous();
    let r = call(&conn, "room:join", &json!({"room_id": room, "after_seq": after})).await?;
    anyhow::ensure!(r["ok"] == true, "room:join: {r}");
    absorb(state, &r["messages"]);
    if r["has_more"] == true {
        catch_up(&conn, room, state).await?;
    }
    Ok(conn)
}

/// Reconnect loop with backoff (100 ms doubling to 2 s) until `deadline`.
async fn connect_retrying(
    url: &str,
    token: &str,
    room: &str,
    state: &Shared,
    reconnects: &AtomicU64,
    deadline: Instant,
) -> Option<Conn> {
    let mut backoff = Duration::from_millis(100);
    loop {
        if let Ok(Ok(c)) =
            tokio::time::timeout(Duration::from_secs(10), open(url, token, room, state, reconnects)).await
        {
            return Some(c);
        }
        if Instant::now() + backoff > deadline {
            return None;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

async fn history(http: &reqwest::Client, url: &str, room: &str, token: &str) -> anyhow::Result<Vec<(i64, String)>> {
    let mut out = Vec::new();
    let mut after = 0i64;
    let mut failures = 0;
    loop {
        let res = http
            .get(format!("{url}/api/v1/rooms/{room}/messages?after_seq={after}&limit=500"))
            .bearer_auth(token)
            .send()
            .await;
        let page: Value = match res {
            Ok(r) if r.status().is_success() => r.json().await?,
            other => {
                failures += 1;
                if failures > 20 {
                    bail!("history read failed: {other:?}");
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        let msgs = page["messages"].as_array().cloned().unwrap_or_default();
        for m in &msgs {
            out.push((m["seq"].as_i64().unwrap_or(-1), m["client_msg_id"].as_str().unwrap_or_default().to_string()));
        }
        // Page on the seq of the last message; `after_seq` pages by seq, not by count.
        match msgs.last().and_then(|m| m["seq"].as_i64()) {
            Some(last) if page["has_more"] == true => after = last,
            _ => return Ok(out),
        }
    }
}

struct Counters {
    acked: Mutex<BTreeMap<String, i64>>,
    sent: Mutex<BTreeSet<String>>,
    max_gap_ms: AtomicU64,
    reconnects: AtomicU64,
    timeouts: AtomicU64,
    retried_errors: AtomicU64,
    rejected: Mutex<Vec<String>>,
}

#[allow(clippy::too_many_arguments)]
async fn run_client(
    i: usize,
    url: String,
    token: String,
    room: String,
    rate: f64,
    state: Shared,
    counters: Arc<Counters>,
    sending_until: Instant,
    settle_until: Instant,
    first: Option<Conn>,
) {
    let mut conn = first;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let mut next_tick = Instant::now();
    let mut queue: std::collections::VecDeque<String> = Default::default();
    let mut n = 0u64;
    let mut last_ack = Instant::now();
    let note_gap = |last: Instant| {
        counters.max_gap_ms.fetch_max(last.elapsed().as_millis() as u64, Ordering::Relaxed);
    };
    // The id at the head of the queue once emitted: it is retried until acked or settle ends.
    let mut head_emitted = false;
    loop {
        let now = Instant::now();
        while now < sending_until && next_tick <= now {
            n += 1;
            queue.push_back(format!("c{i}-{n}"));
            next_tick += interval;
        }
        if now >= sending_until && !head_emitted {
            break; // never-emitted ids are not sent after the end
        }
        if now >= settle_until {
            note_gap(last_ack);
            break;
        }
        let Some(id) = queue.front().cloned() else {
            tokio::time::sleep(next_tick.saturating_duration_since(now)).await;
            continue;
        };
        // A usable connection, else reconnect (same id afterwards).
        let usable = conn.as_ref().is_some_and(|c| c.alive.load(Ordering::Relaxed));
        if !usable {
            drop(conn.take());
            conn = connect_retrying(&url, &token, &room, &state, &counters.reconnects, settle_until).await;
            if conn.is_none() {
                note_gap(last_ack);
                break;
            }
            continue;
        }
        let c = conn.as_ref().unwrap();
        let payload = json!({"room_id": room, "client_msg_id": id, "body": format!("soak {id}")});
        counters.sent.lock().unwrap().insert(id.clone());
        head_emitted = true;
        let ack = match c.client.emit("message:send", &payload).await {
            Ok(rx) => match tokio::time::timeout(ACK_TIMEOUT, rx).await {
                Ok(Ok(v)) => Ok(Ok(v)),
                Ok(Err(_)) => Ok(Err(())),
                Err(_) => Err(()),
            },
            Err(_) => Ok(Err(())),
        };
        match ack {
            Ok(Ok(v)) if v["ok"] == true => {
                let seq = v["message"]["seq"].as_i64().unwrap_or(-1);
                counters.acked.lock().unwrap().entry(id).or_insert(seq);
                note_gap(last_ack);
                last_ack = Instant::now();
                queue.pop_front();
                head_emitted = false;
            }
            Ok(Ok(v)) => {
                let code = v["error"]["code"].as_str().unwrap_or_default();
                if code == "rate_limited" || code == "unavailable" || code == "internal" || code == "timeout" {
                    counters.retried_errors.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                } else {
                    counters.rejected.lock().unwrap().push(format!("{id}: {v}"));
                    queue.pop_front();
                    head_emitted = false;
                }
            }
            Ok(Err(_)) => {
                // Disconnected while waiting: reconnect, then the same id again.
                conn = None;
            }
            Err(_) => {
                // No ack in 3 s: drop this connection, reconnect, retry the same id.
                counters.timeouts.fetch_add(1, Ordering::Relaxed);
                conn = None;
            }
        }
    }
    // Final catch-up on a live connection.
    let final_deadline = Instant::now() + Duration::from_secs(15);
    for _ in 0..5 {
        let usable = conn.as_ref().is_some_and(|c| c.alive.load(Ordering::Relaxed));
        if !usable {
            conn = connect_retrying(&url, &token, &room, &state, &counters.reconnects, final_deadline).await;
        }
        if let Some(c) = &conn
            && catch_up(c, &room, &state).await.is_ok()
        {
            break;
        }
        conn = None;
    }
    drop(conn);
}

pub async fn soak(p: Params) -> anyhow::Result<(Verdict, Value)> {
    anyhow::ensure!(p.clients > 0 && p.rate > 0.0, "need clients > 0 and rate > 0");
    let url = p.url.trim_end_matches('/').to_string();
    let http = reqwest::Client::new();
    let run =
        format!("{:x}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() % 0xffffff);
    let tokens = register_users(&http, &url, &format!("sk{run}"), p.clients).await.context("register")?;
    let room = rest(&http, &url, "/api/v1/rooms", json!({"name": format!("soak {run}")}), Some(&tokens[0])).await?;
    let room = room["id"].as_str().unwrap_or_default().to_string();
    anyhow::ensure!(!room.is_empty(), "room create returned no id");

    let counters = Arc::new(Counters {
        acked: Default::default(),
        sent: Default::default(),
        max_gap_ms: AtomicU64::new(0),
        reconnects: AtomicU64::new(0),
        timeouts: AtomicU64::new(0),
        retried_errors: AtomicU64::new(0),
        rejected: Default::default(),
    });
    let states: Vec<Shared> = (0..p.clients).map(|_| Shared::default()).collect();
    let barrier = Arc::new(tokio::sync::Barrier::new(p.clients + 1));
    let (dl_tx, dl_rx) = tokio::sync::watch::channel::<Option<(Instant, Instant)>>(None);
    let mut tasks = Vec::new();
    for (i, token) in tokens.iter().enumerate() {
        let (url, token, room, state, counters, barrier) =
            (url.clone(), token.clone(), room.clone(), states[i].clone(), counters.clone(), barrier.clone());
        let mut dl_rx = dl_rx.clone();
        let rate = p.rate;
        tasks.push(tokio::spawn(async move {
            // Everyone connects and joins before the clock starts.
            let first = connect_retrying(
                &url,
                &token,
                &room,
                &state,
                &counters.reconnects,
                Instant::now() + Duration::from_secs(60),
            )
            .await;
            barrier.wait().await;
            let Ok(d) = dl_rx.wait_for(|d| d.is_some()).await.map(|d| d.unwrap()) else { return };
            run_client(i, url, token, room, rate, state, counters, d.0, d.1, first).await;
        }));
    }
    barrier.wait().await;
    let t0 = Instant::now();
    let sending_until = t0 + Duration::from_secs_f64(p.seconds);
    let settle_until = sending_until + SETTLE;
    dl_tx.send(Some((sending_until, settle_until))).ok();
    if let Some(f) = &p.ready_file {
        std::fs::write(f, format!("{}\n", std::process::id())).with_context(|| format!("write {f}"))?;
    }
    eprintln!("soak: {} clients connected, sending for {} s", p.clients, p.seconds);
    for t in tasks {
        let _ = t.await;
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let hist = history(&http, &url, &room, &tokens[0]).await?;
    let rec = Recorded {
        sent: counters.sent.lock().unwrap().clone(),
        acked: counters.acked.lock().unwrap().clone(),
        history: hist,
        clients: states.iter().map(|s| s.lock().unwrap().rec.clone()).collect(),
        max_gap_ms: counters.max_gap_ms.load(Ordering::Relaxed),
    };
    let v = verdict(&rec);
    let rejected = counters.rejected.lock().unwrap().clone();
    let details = json!({
        "scenario": p.scenario, "room_id": room, "clients": p.clients, "rate": p.rate,
        "seconds": p.seconds, "elapsed_s": elapsed,
        "sent": v.sent, "acked": v.acked, "stored": v.stored, "head": v.head,
        "lost": v.lost, "duplicated": v.duplicated, "reordered": v.reordered,
        "clients_incomplete": v.clients_incomplete, "clients_live_backwards": v.clients_live_backwards,
        "history_not_gap_free": v.history_not_gap_free, "ack_seq_mismatch": v.ack_seq_mismatch,
        "phantom_seqs": v.phantom_seqs, "stored_not_acked": v.stored_not_acked,
        "delivered_per_client_min": v.delivered_per_client_min, "max_gap_ms": v.max_gap_ms,
        "reconnects": counters.reconnects.load(Ordering::Relaxed),
        "ack_timeouts": counters.timeouts.load(Ordering::Relaxed),
        "retried_error_acks": counters.retried_errors.load(Ordering::Relaxed),
        "rejected": rejected.len(), "rejected_examples": rejected.iter().take(5).collect::<Vec<_>>(),
        "unacked_sent": v.sent.saturating_sub(v.acked),
    });
    Ok((v, details))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hist(ids: &[&str]) -> Vec<(i64, String)> {
        ids.iter().enumerate().map(|(i, id)| (i as i64 + 1, id.to_string())).collect()
    }

    fn client_all(n: i64) -> ClientRecord {
        ClientRecord { live: vec![(1..=n).collect()], ..Default::default() }
    }

    fn clean() -> Recorded {
        let history = hist(&["a1", "b1", "a2", "b2"]);
        Recorded {
            sent: ["a1", "a2", "b1", "b2", "b3"].iter().map(|s| s.to_string()).collect(),
            acked: history.iter().map(|(s, id)| (id.clone(), *s)).collect(),
            history,
            clients: vec![client_all(4), client_all(4)],
            max_gap_ms: 42,
        }
    }

    #[test]
    fn clean_run_counts() {
        let v = verdict(&clean());
        assert!(v.ok(), "{v:?}");
        assert_eq!((v.sent, v.acked, v.stored, v.delivered_per_client_min, v.max_gap_ms), (5, 4, 4, 4, 42));
        assert_eq!(
            v.line("x"),
            "scenario=x sent=5 acked=4 stored=4 delivered_per_client_min=4 lost=0 duplicated=0 reordered=0 max_gap_ms=42"
        );
    }

    #[test]
    fn lost_ack() {
        let mut r = clean();
        r.acked.insert("b3".into(), 5);
        let v = verdict(&r);
        assert_eq!(v.lost, 1);
        assert!(!v.ok());
    }

    #[test]
    fn stored_but_unacked_is_fine() {
        let mut r = clean();
        r.acked.remove("b2");
        let v = verdict(&r);
        assert!(v.ok(), "{v:?}");
        assert_eq!((v.acked, v.stored_not_acked), (3, 1));
    }

    #[test]
    fn duplicate_in_history() {
        let mut r = clean();
        r.history = hist(&["a1", "b1", "a2", "b2", "a2"]);
        r.clients = vec![client_all(5), client_all(5)];
        let v = verdict(&r);
        assert_eq!((v.duplicated, v.lost, v.reordered), (1, 0, 0));
    }

    #[test]
    fn history_gap_is_reordered() {
        let mut r = clean();
        r.history.remove(1); // seqs 1, 3, 4
        r.acked.remove("b1");
        r.clients = vec![ClientRecord { live: vec![vec![1, 3, 4]], ..Default::default() }];
        let v = verdict(&r);
        assert!(v.history_not_gap_free);
        // The client saw exactly what exists but not 1..head: counted as well.
        assert_eq!(v.reordered, 2);
    }

    #[test]
    fn client_missing_a_seq_or_going_backwards() {
        let mut r = clean();
        r.clients[0] = ClientRecord { live: vec![vec![1, 2, 4]], ..Default::default() };
        let v = verdict(&r);
        assert_eq!((v.reordered, v.delivered_per_client_min, v.clients_incomplete), (1, 3, 1));

        let mut r = clean();
        r.clients[1] = ClientRecord { live: vec![vec![1, 3, 2, 4]], ..Default::default() };
        let v = verdict(&r);
        assert_eq!((v.reordered, v.clients_live_backwards, v.delivered_per_client_min), (1, 1, 4));
    }

    #[test]
    fn reconnect_and_catch_up_merge_dedupe_by_seq() {
        let mut r = clean();
        // Connection 1 saw 1, 2; connection 2 saw 4 live before the join returned 2..4 (3 dup).
        r.clients[0] = ClientRecord {
            live: vec![vec![1, 2], vec![4]],
            caught_up: vec![(3, "a2".into()), (4, "b2".into())],
            ..Default::default()
        };
        let v = verdict(&r);
        assert!(v.ok(), "{v:?}");
        assert_eq!(v.delivered_per_client_min, 4);
    }

    #[test]
    fn ack_with_wrong_seq_and_phantom() {
        let mut r = clean();
        r.acked.insert("a2".into(), 4);
        let v = verdict(&r);
        assert_eq!((v.ack_seq_mismatch, v.reordered), (1, 1));

        let mut r = clean();
        r.clients[0].live_ids = vec![(3, "zz".into())];
        let v = verdict(&r);
        assert_eq!(v.phantom_seqs, 1);
        assert!(v.ok());
    }

    #[test]
    fn no_clients_no_history() {
        let v = verdict(&Recorded::default());
        assert!(v.ok());
        assert_eq!(v.delivered_per_client_min, 0);
    }

    #[test]
    fn contiguous_prefix() {
        let mut s = ClientState::default();
        assert_eq!(s.contiguous(), 0);
        s.seen.extend([1, 2, 3, 5, 6]);
        assert_eq!(s.contiguous(), 3);
        s.seen.insert(4);
        assert_eq!(s.contiguous(), 6);
    }
}
