//! Readiness and the cluster view, one implementation per mode.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::{Value, json};

use crate::breaker::{Breakers, CircuitBreaker, CircuitState};
use crate::cluster::{self, InstanceRecord};
use crate::fanout::redis::RedisFanout;
use crate::metrics as m;
use crate::redis_io::{Keys, Redis};
use crate::store::Store;
use crate::sync::SyncStats;

/// A check that has not answered in this long counts as failed: a dependency that hangs (a cut
/// link, a store whose pool waits for a connection) must not hold the readiness answer past the
/// balancer's check timeout, or a store outage would take every instance out of rotation.
const CHECK_TIMEOUT: Duration = Duration::from_millis(1000);

/// `(ok, latency_ms)` of one dependency check, bounded by [`CHECK_TIMEOUT`].
async fn timed<F: std::future::Future<Output = bool>>(f: F) -> (bool, f64) {
    let started = Instant::now();
    let ok = tokio::time::timeout(CHECK_TIMEOUT, f).await.unwrap_or(false);
    (ok, started.elapsed().as_secs_f64() * 1000.0)
}

/// The readiness check doubles as the breaker's probe: a dependency that answers closes its
/// circuit even when no traffic comes (a not-ready instance gets none from the balancer).
fn probe(b: &CircuitBreaker, ok: bool) {
    if ok {
        b.success();
    } else if b.state() == CircuitState::Closed || b.allow() {
        b.failure();
    }
}

fn circuit_name(b: &CircuitBreaker) -> &'static str {
    match b.state() {
        CircuitState::Closed => "closed",
        CircuitState::Open => "open",
        CircuitState::HalfOpen => "half_open",
    }
}

#[async_trait]
pub trait Ops: Send + Sync + 'static {
    /// Whether this instance can take traffic (draining aside), and the per-dependency checks.
    async fn readiness(&self) -> (bool, Value);
    /// Live instances (this one included, as `me` describes it) and the sync backlog.
    async fn cluster(&self, me: InstanceRecord) -> Value;
    /// Circuit state per dependency this mode uses.
    fn circuits(&self) -> BTreeMap<String, String>;
    /// Refreshes gauges no request updates (called every few seconds).
    async fn refresh_gauges(&self) {}
}

pub struct LocalOps {
    pub store: Arc<dyn Store>,
    pub breakers: Arc<Breakers>,
}

#[async_trait]
impl Ops for LocalOps {
    async fn readiness(&self) -> (bool, Value) {
        let (ok, latency_ms) = timed(async { self.store.ping().await.is_ok() }).await;
        metrics::histogram!(m::DEPENDENCY_LATENCY, "dependency" => "store", "operation" => "ping")
            .record(latency_ms / 1000.0);
        metrics::gauge!(m::DEPENDENCY_UP, "dependency" => "store").set(if ok { 1.0 } else { 0.0 });
        probe(&self.breakers.store, ok);
        let circuit = circuit_name(&self.breakers.store);
        (ok, json!({"store": {"ok": ok, "latency_ms": latency_ms, "circuit": circuit}}))
    }

    async fn cluster(&self, me: InstanceRecord) -> Value {
        json!({"instances": [me], "sync": {"pending": 0, "lag_ms": 0}})
    }

    fn circuits(&self) -> BTreeMap<String, String> {
        BTreeMap::from([("store".to_string(), circuit_name(&self.breakers.store).to_string())])
    }
}

pub struct RedisOps {
    pub store: Arc<dyn Store>,
    pub redis: Redis,
    pub keys: Keys,
    pub fanout: Arc<RedisFanout>,
    pub sync: Arc<SyncStats>,
    pub breakers: Arc<Breakers>,
}

#[async_trait]
impl Ops for RedisOps {
    /// Ready needs Redis and a working fan-out; the store may be down (sends keep being accepted
    /// and wait in Redis), so its check and the sync lag are reported but do not gate.
    async fn readiness(&self) -> (bool, Value) {
        let ((store_ok, store_ms), (redis_ok, redis_ms)) = tokio::join!(
            timed(async { self.store.ping().await.is_ok() }),
            timed(async {
                let mut conn = self.redis.conn().await;
                redis::cmd("PING").query_async::<String>(&mut conn).await.is_ok()
            })
        );
        for (dep, ms) in [("store", store_ms), ("redis", redis_ms)] {
            metrics::histogram!(m::DEPENDENCY_LATENCY, "dependency" => dep, "operation" => "ping").record(ms / 1000.0);
        }
        let fanout_ok = self.fanout.fanout_ok();
        probe(&self.breakers.redis, redis_ok);
        probe(&self.breakers.store, store_ok);
        for (dep, ok) in [("store", store_ok), ("redis", redis_ok), ("fanout", fanout_ok)] {
            metrics::gauge!(m::DEPENDENCY_UP, "dependency" => dep).set(if ok { 1.0 } else { 0.0 });
        }
        let sync_fresh = crate::domain::Timestamp::now().0 - self.sync.refreshed_ms() < 5_000;
        let checks = json!({
            "store": {"ok": store_ok, "latency_ms": store_ms, "circuit": circuit_name(&self.breakers.store)},
            "redis": {"ok": redis_ok, "latency_ms": redis_ms, "fanout": fanout_ok, "circuit": circuit_name(&self.breakers.redis)},
            "sync": {"ok": sync_fresh, "latency_ms": 0.0, "lag_ms": self.sync.lag_ms(), "pending": self.sync.pending()},
        });
        (redis_ok && fanout_ok && !self.breakers.redis.is_open(), checks)
    }

    async fn cluster(&self, me: InstanceRecord) -> Value {
        let mut instances = cluster::live_instances(&self.redis, &self.keys).await.unwrap_or_default();
        instances.retain(|i| i.id != me.id);
        instances.push(me);
        instances.sort_by(|a, b| a.id.cmp(&b.id));
        json!({"instances": instances, "sync": {"pending": self.sync.pending(), "lag_ms": self.sync.lag_ms()}})
    }

    fn circuits(&self) -> BTreeMap<String, String> {
        [("redis", &self.breakers.redis), ("store", &self.breakers.store)]
            .into_iter()
            .map(|(name, b)| (name.to_string(), circuit_name(b).to_string()))
            .collect()
    }

    /// Replication and persistence of the Redis primary as it reports them (`INFO`).
    async fn refresh_gauges(&self) {
        let started = Instant::now();
        let info = tokio::time::timeout(CHECK_TIMEOUT, redis_info(&self.redis, &["replication", "persistence"])).await;
        m::dependency_latency("redis", "info", started);
        if let Ok(Ok(text)) = info {
            let (replicas, lag) = parse_replication(&text);
            metrics::gauge!(m::REDIS_REPLICAS).set(replicas as f64);
            metrics::gauge!(m::REDIS_REPLICATION_LAG).set(lag as f64);
            if let Some(aof) = aof_enabled(&text) {
                metrics::gauge!(m::REDIS_AOF_ENABLED).set(if aof { 1.0 } else { 0.0 });
            }
        }
    }
}

/// The primary's `INFO` for `sections`, one text (one command per section: several sections in
/// one INFO needs Redis 7).
async fn redis_info(redis: &Redis, sections: &[&str]) -> redis::RedisResult<String> {
    let mut conn = redis.conn().await;
    let mut pipe = redis::pipe();
    for section in sections {
        pipe.cmd("INFO").arg(*section);
    }
    let texts: Vec<String> = pipe.query_async(&mut conn).await?;
    Ok(texts.concat())
}

/// Says at start when the primary keeps no append-only file: a restart empties it, and messages
/// acknowledged but not yet written back go with it (with Sentinel, a primary restarted empty can
/// even be promoted again and wipe its replica). Operators see it once in the log and always in
/// `chatmesh_redis_aof_enabled`.
pub async fn warn_without_persistence(redis: &Redis) {
    match tokio::time::timeout(CHECK_TIMEOUT, redis_info(redis, &["persistence"])).await {
        Ok(Ok(text)) if aof_enabled(&text) == Some(false) => tracing::warn!(
            "the Redis primary keeps no append-only file (appendonly no): if it restarts, acknowledged \
             messages not yet written back to the store are lost; run it with AOF as deploy/redis/ does"
        ),
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "cannot read Redis INFO persistence"),
        Err(_) => tracing::debug!("Redis INFO persistence timed out"),
    }
}

/// `aof_enabled` from `INFO persistence` (None when the section is missing).
fn aof_enabled(info: &str) -> Option<bool> {
    info.lines().find_map(|l| l.trim().strip_prefix("aof_enabled:")).map(|v| v == "1")
}

/// `(connected replicas, largest replica lag in seconds)` from `INFO replication` of a primary.
fn parse_replication(info: &str) -> (u64, u64) {
    let mut replicas = 0;
    let mut lag = 0;
    for line in info.lines() {
        let line = line.trim();
        if let Some(n) = line.strip_prefix("connected_slaves:") {
            replicas = n.parse().unwrap_or(0);
        } else if line.starts_with("slave") && line.contains(":ip=") {
            let l = line.split(',').find_map(|kv| kv.strip_prefix("lag=")).and_then(|v| v.parse().ok()).unwrap_or(0);
            lag = lag.max(l);
        }
    }
    (replicas, lag)
}

#[cfg(test)]
mod tests {
    use super::{aof_enabled, parse_replication};

    #[test]
    fn persistence_info_gives_aof() {
        assert_eq!(
            aof_enabled("# Persistence\r\nloading:0\r\naof_enabled:1\r\naof_rewrite_in_progress:0\r\n"),
            Some(true)
        );
        assert_eq!(aof_enabled("# Persistence\r\naof_enabled:0\r\n"), Some(false));
        assert_eq!(aof_enabled("# Replication\r\nrole:master\r\n"), None);
    }

    #[test]
    fn replication_info_gives_replicas_and_the_largest_lag() {
        let info = "# Replication\r\nrole:master\r\nconnected_slaves:2\r\n\
                    slave0:ip=127.0.0.1,port=6380,state=online,offset=1234,lag=0\r\n\
                    slave1:ip=127.0.0.1,port=6381,state=online,offset=1200,lag=3\r\nmaster_repl_offset:1234\r\n";
        assert_eq!(parse_replication(info), (2, 3));
        assert_eq!(parse_replication("# Replication\r\nrole:master\r\nconnected_slaves:0\r\n"), (0, 0));
    }
}
