//! Cluster membership: each instance heartbeats a record with a TTL into Redis; the live ones are
//! those whose record has not expired.

use std::sync::Arc;
use std::time::Duration;

use redis::AsyncCommands;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};

use crate::domain::Timestamp;
use crate::redis_io::{Keys, Redis};

pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(2);
const RECORD_TTL_SECS: u64 = 10;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstanceRecord {
    pub id: String,
    pub region: String,
    pub address: String,
    pub started_at: Timestamp,
    pub last_seen: Timestamp,
    pub connections: i64,
    pub ready: bool,
    // For the operations page; defaulted so records of older versions still parse.
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub accepted_total: u64,
    #[serde(default)]
    pub delivered_total: u64,
    /// Circuit state per dependency: "closed" | "open" | "half_open".
    #[serde(default)]
    pub circuits: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub recent_errors: Vec<crate::telemetry::ErrorRecord>,
}

pub async fn live_instance_ids(conn: &mut ConnectionManager, keys: &Keys) -> redis::RedisResult<Vec<String>> {
    let prefix_len = keys.instance("").len();
    let mut ids = Vec::new();
    let mut iter: redis::AsyncIter<String> = conn.scan_match(keys.instances_pattern()).await?;
    while let Some(key) = iter.next_item().await {
        ids.push(key?[prefix_len..].to_string());
    }
    ids.sort();
    Ok(ids)
}

pub async fn live_instances(redis: &Redis, keys: &Keys) -> redis::RedisResult<Vec<InstanceRecord>> {
    let mut conn = redis.conn().await;
    let ids = live_instance_ids(&mut conn, keys).await?;
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        let raw: Option<String> = conn.get(keys.instance(&id)).await?;
        if let Some(rec) = raw.and_then(|r| serde_json::from_str(&r).ok()) {
            out.push(rec);
        }
    }
    Ok(out)
}

/// Writes this instance's record every [`HEARTBEAT_EVERY`]; `record` builds the current one.
pub fn spawn_heartbeat<F>(redis: Redis, keys: Keys, record: Arc<F>)
where
    F: Fn() -> futures::future::BoxFuture<'static, InstanceRecord> + Send + Sync + 'static,
{
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(HEARTBEAT_EVERY);
        loop {
            tick.tick().await;
            let rec = record().await;
            let Ok(json) = serde_json::to_string(&rec) else { continue };
            let mut conn = redis.conn().await;
            let res: redis::RedisResult<()> = redis::pipe()
                .set_ex(keys.instance(&rec.id), json, RECORD_TTL_SECS)
                .ignore()
                .expire(keys.presence(&rec.id), (RECORD_TTL_SECS * 3) as i64)
                .ignore()
                .query_async(&mut conn)
                .await;
            if let Err(e) = res {
                tracing::warn!(error = %e, "heartbeat failed");
            }
        }
    });
}
