//! The sync worker: one consumer (this instance) of one consumer group over every shard's
//! write-back stream. Read a batch → upsert it into the store (idempotent) → XACK + XDEL → trim the
//! rooms' recent history below what is now durable. Entries of a crashed consumer are reclaimed
//! with XAUTOCLAIM after an idle timeout; an entry that keeps failing goes to the shard's
//! dead-letter stream. Nothing is ever dropped silently.
//!
//! `run_once` does one step and says what happened, so tests can drive the worker batch by batch.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use redis::Value;
use redis::streams::StreamReadReply;

use super::SyncStats;
use crate::breaker::Breakers;
use crate::domain::{Message, Timestamp};
use crate::metrics as m;
use crate::redis_io::{Keys, Redis};
use crate::store::{FencedMessage, Store};
use crate::telemetry;
use tracing::Instrument;

pub const GROUP: &str = "cm-sync";

#[derive(Debug, Clone)]
pub struct SyncConfig {
    pub batch: usize,
    /// Entries pending this long on a consumer are taken over by another.
    pub claim_idle: Duration,
    /// Failed attempts (with the store up) before an entry goes to the dead-letter stream.
    pub max_failures: u32,
    /// Synced messages kept per room in the recent-history stream.
    pub recent_per_room: i64,
    /// With ack level `replica`: replicas that must hold a batch before it is written to the store
    /// (0: no check). A primary restarted empty can take writes for a moment before Sentinel
    /// demotes it; what it took was never acked and is discarded on demotion, so it must not
    /// reach the store either (it did: a retried send then appeared twice in history).
    pub wait_replicas: u32,
    /// After a batch that was not full, the pause before the next read (see `pause_after`).
    pub linger: Duration,
}

impl Default for SyncConfig {
    fn default() -> Self {
        Self {
            batch: 500,
            claim_idle: Duration::from_secs(15),
            max_failures: 5,
            recent_per_room: 1000,
            wait_replicas: 0,
            linger: Duration::from_millis(20),
        }
    }
}

/// One entry read from a write-back stream.
#[derive(Debug, Clone)]
pub struct Entry {
    pub stream: String,
    pub id: String,
    pub message: Option<Message>,
    /// The send's W3C traceparent ('' when the entry has none).
    pub trace: String,
    /// The fencing token of the home lease the message was sequenced under (several regions).
    pub epoch: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncOutcome {
    /// Nothing to do.
    Idle,
    /// `stored` entries are durable and acknowledged; `dead` went to dead-letter.
    Synced { stored: usize, dead: usize },
    /// The store or Redis failed; entries stay pending and are retried.
    Failed(String),
}

pub struct SyncWorker {
    redis: Redis,
    keys: Keys,
    store: Arc<dyn Store>,
    consumer: String,
    config: SyncConfig,
    failures: tokio::sync::Mutex<HashMap<String, u32>>,
    breakers: Arc<Breakers>,
}

fn redis_err(e: redis::RedisError) -> String {
    format!("redis: {e}")
}

impl SyncWorker {
    pub fn new(redis: Redis, keys: Keys, store: Arc<dyn Store>, consumer: String, config: SyncConfig) -> Self {
        Self {
            redis,
            keys,
            store,
            consumer,
            config,
            failures: Default::default(),
            breakers: Arc::new(Breakers::default()),
        }
    }

    /// Shares the instance's breakers (the store circuit gates every batch).
    pub fn with_breakers(mut self, breakers: Arc<Breakers>) -> Self {
        self.breakers = breakers;
        self
    }

    /// Creates the consumer group on every shard stream (idempotent).
    pub async fn ensure_groups(&self) -> redis::RedisResult<()> {
        let mut conn = self.redis.conn().await;
        for stream in self.keys.all_sync_streams() {
            let res: redis::RedisResult<()> = redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(&stream)
                .arg(GROUP)
                .arg("0")
                .arg("MKSTREAM")
                .query_async(&mut conn)
                .await;
            match res {
                Ok(()) => {}
                Err(e) if e.code() == Some("BUSYGROUP") => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Reads up to a batch: this consumer's own pending entries first (a failed batch, or entries
    /// it reclaimed), else new ones, waiting up to `block` for them.
    pub async fn read_batch(&self, block: Duration) -> Result<Vec<Entry>, String> {
        let streams = self.keys.all_sync_streams();
        let mut conn = self.redis.conn().await;
        for (id, blocking) in [("0", false), (">", true)] {
            let mut cmd = redis::cmd("XREADGROUP");
            cmd.arg("GROUP").arg(GROUP).arg(&self.consumer).arg("COUNT").arg(self.config.batch);
            if blocking && !block.is_zero() {
                cmd.arg("BLOCK").arg(block.as_millis() as u64);
            }
            cmd.arg("STREAMS").arg(&streams);
            for _ in &streams {
                cmd.arg(id);
            }
            let reply: Option<StreamReadReply> = cmd.query_async(&mut conn).await.map_err(redis_err)?;
            let entries: Vec<Entry> = reply
                .map(|r| {
                    r.keys
                        .into_iter()
                        .flat_map(|k| {
                            let stream = k.key;
                            k.ids.into_iter().map(move |e| {
                                let message = e.get::<String>("m").and_then(|raw| serde_json::from_str(&raw).ok());
                                let trace = e.get::<String>("t").unwrap_or_default();
                                let epoch = e.get::<String>("ep").and_then(|t| t.parse().ok());
                                Entry { stream: stream.clone(), id: e.id, message, trace, epoch }
                            })
                        })
                        .collect()
                })
                .unwrap_or_default();
            if !entries.is_empty() {
                self.confirm_replicated(&mut conn).await?;
                return Ok(entries);
            }
        }
        Ok(Vec::new())
    }

    /// `WAIT` after the read: replication is ordered, so once a replica has this connection's
    /// last write (the read's own consumer-group update) it has the entries read too. A batch not
    /// confirmed stays pending on this consumer and is read again first next time.
    async fn confirm_replicated(&self, conn: &mut redis::aio::ConnectionManager) -> Result<(), String> {
        if self.config.wait_replicas == 0 {
            return Ok(());
        }
        let confirmed: i64 =
            redis::cmd("WAIT").arg(self.config.wait_replicas).arg(1000).query_async(conn).await.map_err(redis_err)?;
        if confirmed < i64::from(self.config.wait_replicas) {
            metrics::counter!(m::SYNC_ERRORS, "kind" => "not_replicated").increment(1);
            return Err(format!("write-back held: {confirmed} replica(s) confirmed the batch"));
        }
        Ok(())
    }

    /// Makes a batch durable and acknowledges it.
    pub async fn commit_batch(&self, entries: Vec<Entry>) -> SyncOutcome {
        if entries.is_empty() {
            return SyncOutcome::Idle;
        }
        let (good, bad): (Vec<Entry>, Vec<Entry>) = entries.into_iter().partition(|e| e.message.is_some());
        let mut dead = Vec::new();
        dead.extend(bad);
        let mut stored = Vec::new();
        // Traces: one span per batch around the store write, and per message a span that continues
        // the send's trace, so one trace shows the message from send to durable.
        let (batch_span, durable_spans) = if telemetry::traces_enabled() {
            let batch = tracing::info_span!("sync batch", entries = good.len());
            let per_message: Vec<tracing::Span> = good
                .iter()
                .map(|e| {
                    let span = tracing::info_span!(parent: None, "message durable", otel.kind = "consumer", seq = e.message.as_ref().map_or(0, |m| m.seq));
                    telemetry::set_remote_parent(&span, &e.trace);
                    span
                })
                .collect();
            (batch, per_message)
        } else {
            (tracing::Span::none(), Vec::new())
        };
        let write_span = if telemetry::traces_enabled() {
            tracing::info_span!(parent: &batch_span, "store write", otel.name = "store upsert_messages", rows = good.len())
        } else {
            tracing::Span::none()
        };
        let started = std::time::Instant::now();
        let result = self.write(&good).instrument(write_span).await;
        m::dependency_latency("store", "upsert_messages", started);
        drop(durable_spans);
        match result {
            Ok(()) => {
                self.breakers.store.success();
                stored = good;
            }
            Err(e) => {
                if self.store.ping().await.is_err() {
                    self.breakers.store.failure();
                    // The store is down: everything waits in Redis, nothing counts as a failure.
                    metrics::counter!(m::SYNC_ERRORS, "kind" => "store_down").increment(1);
                    return SyncOutcome::Failed(e.to_string());
                }
                // The store is up but refused the batch: find the entries it refuses one by one.
                metrics::counter!(m::SYNC_ERRORS, "kind" => "batch_refused").increment(1);
                let mut failures = self.failures.lock().await;
                for entry in good {
                    match self.write(std::slice::from_ref(&entry)).await {
                        Ok(()) => stored.push(entry),
                        Err(_) => {
                            let n = failures.entry(entry.id.clone()).or_insert(0);
                            *n += 1;
                            if *n >= self.config.max_failures {
                                failures.remove(&entry.id);
                                dead.push(entry);
                            }
                        }
                    }
                }
            }
        }
        if let Err(e) = self.dead_letter(&dead).await {
            return SyncOutcome::Failed(e);
        }
        if let Err(e) = self.ack(&stored).await {
            return SyncOutcome::Failed(e);
        }
        self.trim_recent(&stored).await;
        metrics::counter!(m::SYNC_STORED).increment(stored.len() as u64);
        if tracing::enabled!(target: "chatmesh::sync", tracing::Level::DEBUG) {
            for e in &stored {
                if let Some(msg) = &e.message {
                    let trace_id = telemetry::trace_id(&e.trace);
                    tracing::debug!(target: "chatmesh::sync", room = %msg.room_id, seq = msg.seq, trace_id, "stored");
                }
            }
        }
        SyncOutcome::Synced { stored: stored.len(), dead: dead.len() }
    }

    /// Writes the entries' messages: those sequenced under a home lease with its token (the
    /// store refuses them once a takeover fenced their room past them; refused ones are counted
    /// and logged here, and acknowledged with the rest: they must not come back).
    async fn write(&self, entries: &[Entry]) -> crate::store::StoreResult<()> {
        let (fenced, plain): (Vec<&Entry>, Vec<&Entry>) = entries.iter().partition(|e| e.epoch.is_some());
        let plain: Vec<Message> = plain.iter().filter_map(|e| e.message.clone()).collect();
        if !plain.is_empty() {
            self.store.upsert_messages(&plain).await?;
        }
        let fenced: Vec<FencedMessage> = fenced
            .iter()
            .filter_map(|e| Some(FencedMessage { message: e.message.clone()?, token: e.epoch? }))
            .collect();
        if fenced.is_empty() {
            return Ok(());
        }
        let refused = self.store.upsert_messages_fenced(&fenced).await?;
        if !refused.is_empty() {
            metrics::counter!(m::FENCED_REFUSED, "by" => "store").increment(refused.len() as u64);
            for (room, seq) in &refused {
                tracing::error!(
                    room = %room, seq,
                    "the store refused this message: another region took its room over and continued before it \
                     (sequenced here before the lease lapsed but never replicated; if it was acknowledged, at ack \
                     level leader or replica, it is lost)"
                );
            }
        }
        Ok(())
    }

    async fn ack(&self, entries: &[Entry]) -> Result<(), String> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut by_stream: HashMap<&str, Vec<&str>> = HashMap::new();
        for e in entries {
            by_stream.entry(&e.stream).or_default().push(&e.id);
        }
        let mut pipe = redis::pipe();
        for (stream, ids) in by_stream {
            pipe.cmd("XACK").arg(stream).arg(GROUP).arg(&ids).ignore();
            // Deleting acknowledged entries keeps XLEN equal to the backlog.
            pipe.cmd("XDEL").arg(stream).arg(&ids).ignore();
        }
        let mut conn = self.redis.conn().await;
        pipe.query_async::<()>(&mut conn).await.map_err(redis_err)
    }

    async fn dead_letter(&self, entries: &[Entry]) -> Result<(), String> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut conn = self.redis.conn().await;
        let mut pipe = redis::pipe();
        for e in entries {
            let shard =
                e.stream.split("{s").nth(1).and_then(|s| s.split('}').next()).and_then(|s| s.parse().ok()).unwrap_or(0);
            let raw: Option<String> = e.message.as_ref().and_then(|m| serde_json::to_string(m).ok());
            pipe.cmd("XADD")
                .arg(self.keys.dead_letter(shard))
                .arg("*")
                .arg("source_id")
                .arg(&e.id)
                .arg("m")
                .arg(raw.unwrap_or_else(|| "<unreadable>".into()))
                .ignore();
            pipe.cmd("XACK").arg(&e.stream).arg(GROUP).arg(&e.id).ignore();
            pipe.cmd("XDEL").arg(&e.stream).arg(&e.id).ignore();
        }
        pipe.query_async::<()>(&mut conn).await.map_err(redis_err)?;
        metrics::counter!(m::SYNC_DEAD_LETTERED).increment(entries.len() as u64);
        tracing::error!(count = entries.len(), "write-back entries moved to the dead-letter stream");
        Ok(())
    }

    /// Recent history keeps the last `recent_per_room` synced messages of each room and everything
    /// newer; trimming only below what is durable means no message is ever unreadable.
    async fn trim_recent(&self, stored: &[Entry]) {
        let mut max_seq: HashMap<&str, i64> = HashMap::new();
        for m in stored.iter().filter_map(|e| e.message.as_ref()) {
            let v = max_seq.entry(&m.room_id).or_insert(0);
            *v = (*v).max(m.seq);
        }
        let mut pipe = redis::pipe();
        for (room, seq) in max_seq {
            let min = seq - self.config.recent_per_room;
            if min > 1 {
                pipe.cmd("XTRIM").arg(self.keys.history(room)).arg("MINID").arg("~").arg(format!("{min}-0")).ignore();
            }
        }
        let mut conn = self.redis.conn().await;
        let _ = pipe.query_async::<()>(&mut conn).await;
    }

    /// Takes over entries another consumer has held longer than the idle timeout.
    pub async fn reclaim(&self) -> Result<usize, String> {
        let mut conn = self.redis.conn().await;
        let mut claimed = 0;
        for stream in self.keys.all_sync_streams() {
            let reply: Value = redis::cmd("XAUTOCLAIM")
                .arg(&stream)
                .arg(GROUP)
                .arg(&self.consumer)
                .arg(self.config.claim_idle.as_millis() as u64)
                .arg("0-0")
                .arg("COUNT")
                .arg(self.config.batch)
                .arg("JUSTID")
                .query_async(&mut conn)
                .await
                .map_err(redis_err)?;
            if let Value::Array(parts) = reply
                && let Some(Value::Array(ids)) = parts.get(1)
            {
                claimed += ids.len();
            }
        }
        if claimed > 0 {
            tracing::info!(claimed, "reclaimed write-back entries from an idle consumer");
        }
        Ok(claimed)
    }

    /// One step: read a batch (blocking up to `block`) and commit it.
    pub async fn run_once(&self, block: Duration) -> SyncOutcome {
        if self.breakers.store.is_open() {
            // Entries wait in Redis; after the cooldown one ping finds out whether the store is back.
            if !self.breakers.store.allow() {
                return SyncOutcome::Failed("store circuit open".into());
            }
            if let Err(e) = self.store.ping().await {
                self.breakers.store.failure();
                return SyncOutcome::Failed(e.to_string());
            }
            self.breakers.store.success();
        }
        match self.read_batch(block).await {
            Ok(entries) => self.commit_batch(entries).await,
            Err(e) => SyncOutcome::Failed(e),
        }
    }

    /// Backlog size and the age of its oldest entry.
    pub async fn measure(&self) -> Result<(i64, i64), String> {
        let streams = self.keys.all_sync_streams();
        let mut pipe = redis::pipe();
        for s in &streams {
            pipe.cmd("XLEN").arg(s);
            pipe.cmd("XRANGE").arg(s).arg("-").arg("+").arg("COUNT").arg(1);
        }
        let mut conn = self.redis.conn().await;
        let values: Vec<Value> = pipe.query_async(&mut conn).await.map_err(redis_err)?;
        let now = Timestamp::now().0;
        let mut pending = 0;
        let mut oldest = now;
        for pair in values.chunks(2) {
            if let Value::Int(n) = pair[0] {
                pending += n;
            }
            // XRANGE reply: [[id, [field, value...]]]; the id's first part is its time in ms.
            if let Value::Array(items) = &pair[1]
                && let Some(Value::Array(entry)) = items.first()
                && let Some(Value::BulkString(id)) = entry.first()
                && let Some(ms) =
                    std::str::from_utf8(id).ok().and_then(|s| s.split('-').next()).and_then(|s| s.parse::<i64>().ok())
            {
                oldest = oldest.min(ms);
            }
        }
        Ok((pending, now - oldest))
    }

    /// The worker loop: sync, reclaim now and then, refresh the stats; back off while failing.
    pub async fn run(self: Arc<Self>, stats: Arc<SyncStats>) {
        if let Err(e) = self.ensure_groups().await {
            tracing::warn!(error = %e, "could not create the sync consumer groups yet");
        }
        let me = self.clone();
        let stats_task = stats.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tick.tick().await;
                if let Ok((pending, lag)) = me.measure().await {
                    stats_task.set(pending, lag, Timestamp::now().0);
                    metrics::gauge!(m::SYNC_PENDING).set(pending as f64);
                    metrics::gauge!(m::SYNC_LAG).set(lag as f64 / 1000.0);
                }
            }
        });
        let mut backoff = Duration::from_millis(50);
        let mut last_reclaim = std::time::Instant::now();
        loop {
            if last_reclaim.elapsed() >= self.config.claim_idle / 3 {
                last_reclaim = std::time::Instant::now();
                if let Err(e) = self.reclaim().await {
                    tracing::debug!(error = %e, "reclaim failed");
                }
            }
            match self.run_once(Duration::from_millis(200)).await {
                SyncOutcome::Failed(e) => {
                    tracing::warn!(error = %e, backoff_ms = backoff.as_millis() as u64, "sync step failed");
                    if e.contains("NOGROUP") {
                        let _ = self.ensure_groups().await;
                    } else if e.starts_with("redis") {
                        self.redis.reresolve().await;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
                outcome => {
                    backoff = Duration::from_millis(50);
                    let pause = pause_after(&outcome, self.config.batch, self.config.linger);
                    if !pause.is_zero() {
                        tokio::time::sleep(pause).await;
                    }
                }
            }
        }
    }
}

/// The pause after a successful step. A batch that was not full means the worker has caught up:
/// reading again at once would make every store transaction (and its commit, a WAL flush) carry
/// only the few messages that arrived meanwhile. At 1,600 msgs/s over two instances that cost
/// PostgreSQL ~0.45 of a core; lingering lets a batch gather first. A full batch (a backlog) or an
/// idle read (it already blocked for new entries) goes on at once.
fn pause_after(outcome: &SyncOutcome, batch: usize, linger: Duration) -> Duration {
    match outcome {
        SyncOutcome::Synced { stored, dead } if stored + dead < batch => linger,
        _ => Duration::ZERO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_batch_that_was_not_full_lingers() {
        let linger = Duration::from_millis(20);
        let synced = |stored, dead| SyncOutcome::Synced { stored, dead };
        assert_eq!(pause_after(&synced(3, 0), 500, linger), linger, "caught up: let the next batch gather");
        assert_eq!(pause_after(&synced(499, 1), 500, linger), Duration::ZERO, "a full batch: a backlog, go on");
        assert_eq!(pause_after(&synced(500, 0), 500, linger), Duration::ZERO);
        assert_eq!(pause_after(&SyncOutcome::Idle, 500, linger), Duration::ZERO, "the read already waited");
        assert_eq!(pause_after(&synced(3, 0), 500, Duration::ZERO), Duration::ZERO, "linger 0: off");
    }
}
