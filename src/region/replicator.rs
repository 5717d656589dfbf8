//! Replication between regions. Serving: `POST /internal/v1/regions/outbox` streams this
//! region's outboxes from the caller's cursors, as JSON lines, holding the request open and
//! sending entries as they are appended (a heartbeat line each second without any). Pulling: in
//! each region one instance per peer (a singleton job lease in the store) holds such a stream open,
//! applies what comes idempotently and keeps its cursors in its region's Redis, so a restart or
//! another instance continues where the last one stopped. The lease is `repl:<region>:<peer>`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use axum::body::Bytes;
use futures::StreamExt;
use redis::AsyncCommands;
use redis::streams::StreamReadReply;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use super::apply::{Applied, Applier};
use super::client::PeerClient;
use super::outbox::Replicated;
use crate::domain::{HistoryPage, Timestamp};
use crate::error::{ApiError, ApiResult};
use crate::history::Cursor;
use crate::metrics as m;
use crate::redis_io::{Keys, Redis};
use crate::state::AppState;

/// Entries read from the outboxes per round.
const READ_COUNT: usize = 512;
/// How long a read waits for new entries before the stream sends a heartbeat.
const BLOCK_MS: usize = 1_000;
/// A stream that sends nothing (not even a heartbeat) for this long is dead: reconnect.
const IDLE: Duration = Duration::from_secs(5);
/// The lease on pulling one peer's outboxes, and how often its holder renews it.
const LEASE: Duration = Duration::from_secs(6);
const RENEW_EVERY: Duration = Duration::from_secs(2);
/// Messages asked of the home per page when filling a gap.
const FILL_PAGE: u32 = 500;

/// `POST /outbox`: where the caller stands in each shard's outbox ("0-0" or absent: from the
/// oldest kept).
#[derive(Serialize, Deserialize, Default)]
pub struct OutboxRequest {
    #[serde(default)]
    pub cursors: HashMap<u32, String>,
}

/// `POST /messages`: a page of the room's history from its home: after a seq, or (`before` or
/// `latest` set) before one or the latest.
#[derive(Serialize, Deserialize)]
pub struct MessagesRequest {
    pub room_id: String,
    pub after: i64,
    pub limit: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<i64>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub latest: bool,
}

impl MessagesRequest {
    pub fn new(room_id: &str, cursor: Cursor, limit: u32) -> Self {
        let (after, before, latest) = match cursor {
            Cursor::After(after) => (after, None, false),
            Cursor::Before(before) => (0, Some(before), false),
            Cursor::Latest => (0, None, true),
        };
        Self { room_id: room_id.to_string(), after, limit, before, latest }
    }

    pub fn cursor(&self) -> Cursor {
        match (self.latest, self.before) {
            (true, _) => Cursor::Latest,
            (false, Some(before)) => Cursor::Before(before),
            (false, None) => Cursor::After(self.after),
        }
    }
}

/// One line of the outbox stream.
#[derive(Serialize, Deserialize, Default)]
pub struct Line {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entries: Vec<Entry>,
    /// A heartbeat: the serving region's clock (Unix ms) when it found nothing newer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hb: Option<i64>,
}

#[derive(Serialize, Deserialize)]
pub struct Entry {
    pub id: String,
    /// A message: its room, seq and wire JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub r: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub m: Option<String>,
    /// Any other change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub e: Option<Replicated>,
    /// A message's epoch: the fencing token of the home lease it was sequenced under.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ep: Option<i64>,
}

/// The Unix ms a stream id was made at.
fn id_ms(id: &str) -> i64 {
    id.split('-').next().and_then(|ms| ms.parse().ok()).unwrap_or(0)
}

// ---- serving ---------------------------------------------------------------------------------

/// Serves outbox streams; each open stream holds a connection of its own (its reads block).
pub struct OutboxServer {
    redis: Redis,
    keys: Keys,
    idle: std::sync::Mutex<Vec<Redis>>,
}

struct Pooled {
    server: Arc<OutboxServer>,
    conn: Option<Redis>,
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let Some(c) = self.conn.take() {
            self.server.idle.lock().unwrap_or_else(|p| p.into_inner()).push(c);
        }
    }
}

fn text(v: &redis::Value) -> Option<String> {
    match v {
        redis::Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        redis::Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

impl OutboxServer {
    pub fn new(redis: Redis, keys: Keys) -> Self {
        Self { redis, keys, idle: std::sync::Mutex::new(Vec::new()) }
    }

    async fn connection(self: &Arc<Self>) -> ApiResult<Pooled> {
        let pooled = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let conn = match pooled {
            Some(c) => c,
            None => self.redis.dedicated().await.map_err(|e| {
                tracing::warn!(error = %e, "outbox stream: no Redis connection");
                ApiError::Unavailable("Redis is unavailable; retry".into())
            })?,
        };
        Ok(Pooled { server: self.clone(), conn: Some(conn) })
    }

    /// The body of an outbox stream from `cursors`.
    pub async fn stream(
        self: Arc<Self>,
        cursors: HashMap<u32, String>,
    ) -> ApiResult<impl futures::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static> {
        let shards = self.keys.shards;
        let keys: Vec<String> = (0..shards).map(|s| self.keys.outbox(s)).collect();
        let shard_of_key: HashMap<String, u32> = keys.iter().cloned().zip(0..shards).collect();
        let ids: Vec<String> = (0..shards).map(|s| cursors.get(&s).cloned().unwrap_or_else(|| "0-0".into())).collect();
        let pooled = self.connection().await?;
        let state = (pooled, keys, shard_of_key, ids);
        Ok(futures::stream::unfold(Some(state), |state| async move {
            let (pooled, keys, shard_of_key, mut ids) = state?;
            let mut conn = pooled.conn.as_ref().expect("held until dropped").conn().await;
            let opts = redis::streams::StreamReadOptions::default().count(READ_COUNT).block(BLOCK_MS);
            let read: redis::RedisResult<Option<StreamReadReply>> = conn.xread_options(&keys, &ids, &opts).await;
            let reply = match read {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "outbox stream: read failed");
                    return Some((Err(std::io::Error::other(e.to_string())), None));
                }
            };
            let mut out = String::new();
            match reply {
                None => {
                    let line = Line { hb: Some(Timestamp::now().0), ..Line::default() };
                    out.push_str(&serde_json::to_string(&line).expect("serializes"));
                    out.push('\n');
                }
                Some(reply) => {
                    for key in reply.keys {
                        let Some(&shard) = shard_of_key.get(&key.key) else { continue };
                        let mut entries = Vec::with_capacity(key.ids.len());
                        for sid in key.ids {
                            let field = |name: &str| sid.map.get(name).and_then(text);
                            entries.push(Entry {
                                r: field("r"),
                                s: field("s").and_then(|s| s.parse().ok()),
                                m: field("m"),
                                e: field("e").and_then(|e| serde_json::from_str(&e).ok()),
                                ep: field("ep").and_then(|t| t.parse().ok()),
                                id: sid.id.clone(),
                            });
                            ids[shard as usize] = sid.id;
                        }
                        let line = Line { shard: Some(shard), entries, hb: None };
                        out.push_str(&serde_json::to_string(&line).expect("serializes"));
                        out.push('\n');
                    }
                }
            }
            Some((Ok(Bytes::from(out)), Some((pooled, keys, shard_of_key, ids))))
        }))
    }
}

/// How far behind `peer` this region is, as its replicator last noted (seconds; `None` when no
/// instance has pulled from it in the last minute).
pub async fn lag_of(redis: &Redis, keys: &Keys, peer: &str) -> Option<f64> {
    let mut conn = redis.conn().await;
    let caught_up: Option<i64> = conn.get(keys.replication_caught_up(peer)).await.ok()?;
    caught_up.map(|ms| (Timestamp::now().0 - ms).max(0) as f64 / 1000.0)
}

// ---- pulling ---------------------------------------------------------------------------------

/// Pulls one peer region's outboxes into this region.
pub struct Replicator {
    pub peer: Arc<PeerClient>,
    pub redis: Redis,
    pub keys: Keys,
    pub applier: Arc<Applier>,
    pub instance_id: String,
    pub state: Arc<AppState>,
    /// Up to when (Unix ms) this region is known to have everything the peer appended.
    caught_up_ms: AtomicI64,
    leading: AtomicBool,
    stream_lock: Mutex<()>,
}

impl Replicator {
    pub fn new(
        peer: Arc<PeerClient>,
        redis: Redis,
        keys: Keys,
        applier: Arc<Applier>,
        instance_id: String,
        state: Arc<AppState>,
    ) -> Self {
        Self {
            peer,
            redis,
            keys,
            applier,
            instance_id,
            state,
            caught_up_ms: AtomicI64::new(Timestamp::now().0),
            leading: AtomicBool::new(false),
            stream_lock: Mutex::new(()),
        }
    }

    pub fn spawn(self: Arc<Self>) {
        let lag = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                if lag.leading.load(Ordering::Relaxed) {
                    let caught_up = lag.caught_up_ms.load(Ordering::Relaxed);
                    let behind = (Timestamp::now().0 - caught_up).max(0);
                    metrics::gauge!(m::REPLICATION_LAG, "peer_region" => lag.peer.region.clone())
                        .set(behind as f64 / 1000.0);
                    // For the cluster view on every instance of the region.
                    let mut conn = lag.redis.conn().await;
                    let key = lag.keys.replication_caught_up(&lag.peer.region);
                    let _: redis::RedisResult<()> = conn.set_ex(key, caught_up, 60).await;
                }
            }
        });
        tokio::spawn(self.run());
    }

    async fn run(self: Arc<Self>) {
        loop {
            if !self.hold_lease().await {
                self.leading.store(false, Ordering::Relaxed);
                tokio::time::sleep(RENEW_EVERY).await;
                continue;
            }
            if !self.leading.swap(true, Ordering::Relaxed) {
                tracing::info!(peer = %self.peer.region, "pulling the peer region's outboxes");
            }
            let _one = self.stream_lock.lock().await;
            if let Err(e) = self.pull().await {
                metrics::counter!(m::REPLICATION_ERRORS, "peer" => self.peer.region.clone(), "reason" => e.0)
                    .increment(1);
                tracing::warn!(peer = %self.peer.region, reason = e.0, error = %e.1, "replication stream ended");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }

    /// The singleton job lease `repl:<this region>:<peer>` in the store (issue 17): exactly one
    /// instance of the region pulls each peer; its holder extends it while it pulls, another
    /// takes it once it lapsed (the holder died or lost the store).
    async fn hold_lease(&self) -> bool {
        let name = format!("repl:{}:{}", self.state.config.region, self.peer.region);
        let ttl = LEASE.as_millis() as i64;
        matches!(self.applier.store.acquire_lease(&name, &self.instance_id, ttl, Timestamp::now()).await, Ok(Some(_)))
    }

    async fn pull(&self) -> Result<(), (&'static str, String)> {
        let mut conn = self.redis.conn().await;
        let cursor_key = self.keys.replication_cursor(&self.peer.region);
        let stored: HashMap<u32, String> = conn.hgetall(&cursor_key).await.map_err(|e| ("redis", e.to_string()))?;
        let res = self
            .peer
            .open_stream("/outbox", &OutboxRequest { cursors: stored })
            .await
            .map_err(|e| ("connect", e.to_string()))?;
        let mut body = res.bytes_stream();
        let mut buf: Vec<u8> = Vec::new();
        let mut renew = tokio::time::interval(RENEW_EVERY);
        renew.tick().await;
        // Counted from the last bytes received, not per wait: the lease renewal below ends a
        // wait every 2 s, and a hung stream (a cut link drops packets, nothing closes) would
        // otherwise never look idle.
        let mut heard = tokio::time::Instant::now();
        loop {
            tokio::select! {
                chunk = tokio::time::timeout_at(heard + IDLE, body.next()) => {
                    heard = tokio::time::Instant::now();
                    let chunk = match chunk {
                        Err(_) => return Err(("idle", format!("nothing from region {} for {IDLE:?}", self.peer.region))),
                        Ok(None) => return Err(("closed", "the peer closed the stream".into())),
                        Ok(Some(Err(e))) => return Err(("read", e.to_string())),
                        Ok(Some(Ok(c))) => c,
                    };
                    buf.extend_from_slice(&chunk);
                    while let Some(end) = buf.iter().position(|b| *b == b'\n') {
                        let line: Vec<u8> = buf.drain(..=end).collect();
                        let line: Line = serde_json::from_slice(&line).map_err(|e| ("decode", e.to_string()))?;
                        self.take(line, &cursor_key).await?;
                    }
                }
                _ = renew.tick() => {
                    if !self.hold_lease().await {
                        return Err(("lease", "another instance holds the lease now".into()));
                    }
                }
            }
        }
    }

    async fn take(&self, line: Line, cursor_key: &str) -> Result<(), (&'static str, String)> {
        if let Some(hb) = line.hb {
            // Caught up as of the peer's clock when it found nothing newer.
            self.caught_up_ms.store(hb, Ordering::Relaxed);
            return Ok(());
        }
        let Some(shard) = line.shard else { return Ok(()) };
        let mut last = None;
        for entry in line.entries {
            self.apply(&entry).await.map_err(|e| ("apply", e.to_string()))?;
            self.caught_up_ms.store(id_ms(&entry.id), Ordering::Relaxed);
            last = Some(entry.id);
        }
        if let Some(id) = last {
            let mut conn = self.redis.conn().await;
            conn.hset::<_, _, _, ()>(cursor_key, shard, id).await.map_err(|e| ("redis", e.to_string()))?;
        }
        Ok(())
    }

    async fn apply(&self, entry: &Entry) -> ApiResult<()> {
        let peer = self.peer.region.clone();
        if let (Some(room), Some(seq), Some(json)) = (&entry.r, entry.s, &entry.m) {
            if entry.ep.is_none() && !self.state.svc.peer_decides_its_rooms(&peer) {
                // Without its epoch (an older peer): another region took the peer's rooms over,
                // and what the peer sequenced is either held already or from after its lease.
                metrics::counter!(m::REPLICATION_ERRORS, "peer" => peer, "reason" => "fenced").increment(1);
                return Ok(());
            }
            match self.applier.apply(room, seq, json, entry.ep).await? {
                Applied::Gap(applied) => self.fill(room, applied, seq).await?,
                Applied::Fenced(token) => {
                    // Sequenced under an epoch this region's takeover of the room ended: split
                    // brain, refused (the store refuses its write-back too).
                    metrics::counter!(m::FENCED_REFUSED, "by" => "peer").increment(1);
                    tracing::error!(peer = %peer, room, seq, epoch = entry.ep, fenced_by = token, "refused a message of a fenced epoch");
                    return Ok(());
                }
                Applied::Ok(_) | Applied::Duplicate(_) => {}
            }
            metrics::counter!(m::REPLICATION_APPLIED, "peer" => peer, "kind" => "message").increment(1);
        } else if let Some(change) = &entry.e {
            if let Err(e) = self.state.svc.apply_replicated(change.clone()).await {
                // A change whose effect failed here (the store was briefly unreachable, say) is
                // not worth stopping the room's messages for: counted, logged, skipped.
                metrics::counter!(m::REPLICATION_ERRORS, "peer" => peer.clone(), "reason" => "change").increment(1);
                tracing::warn!(peer = %peer, error = %e, change = ?change, "a replicated change could not be applied");
            }
            metrics::counter!(m::REPLICATION_APPLIED, "peer" => peer, "kind" => "change").increment(1);
        }
        Ok(())
    }

    /// Fills the room's messages after `applied` and before `upto` from its home (the outbox
    /// was trimmed past them, or this region started after they were appended).
    async fn fill(&self, room: &str, mut applied: i64, upto: i64) -> ApiResult<()> {
        while applied < upto - 1 {
            let req = MessagesRequest::new(room, Cursor::After(applied), FILL_PAGE);
            let page: HistoryPage = self.peer.call("history", "/messages", &req).await?;
            let before = applied;
            for msg in &page.messages {
                match self.applier.apply_message(msg).await? {
                    Applied::Ok(n) | Applied::Duplicate(n) => applied = applied.max(n),
                    Applied::Gap(_) | Applied::Fenced(_) => {}
                }
            }
            if applied == before {
                metrics::counter!(m::REPLICATION_ERRORS, "peer" => self.peer.region.clone(), "reason" => "hole")
                    .increment(1);
                // The home's own history (read again there until it has no hole, or served with
                // one) skips from `applied` to its first message: a dead-lettered message, gone
                // there too. Waiting for it would stall the room here for good: move past it, as
                // the home's readers do, and take what follows.
                let Some(first) = page.messages.first().map(|m| m.seq) else {
                    tracing::warn!(room, after = applied, upto, "the home region has no messages to fill this gap");
                    break;
                };
                tracing::warn!(room, after = applied, first, "the home region has a hole there too: skipped");
                if !self.applier.skip(room, applied, first - 1).await? {
                    break;
                }
                applied = first - 1;
                for msg in &page.messages {
                    if let Applied::Ok(n) | Applied::Duplicate(n) = self.applier.apply_message(msg).await? {
                        applied = applied.max(n);
                    }
                }
            }
        }
        Ok(())
    }
}
