//! Redis access for cluster mode: URL forms (`redis://`, `rediss://`, `redis+sentinel://`),
//! a command connection that reconnects with backoff and follows a Sentinel failover, and a
//! pub/sub connection whose pushes feed the fan-out.

pub mod keys;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::sentinel::{SentinelClient, SentinelServerType};
use redis::{Client, PushInfo};
use tokio::sync::{RwLock, mpsc};

pub use keys::Keys;

/// The send script's body; run it as [`send_script`], which defines the `seal` it calls.
pub const SEND_SCRIPT: &str = include_str!("send.lua");

/// The send script for a cluster: its seal function (with the cluster's pub/sub key) and body.
pub fn send_script(seal: &crate::fanout::seal::Seal) -> String {
    format!("{}{SEND_SCRIPT}", seal.lua_prelude())
}
pub const PRESENCE_SCRIPT: &str = include_str!("presence.lua");
pub const THROTTLE_SCRIPT: &str = include_str!("throttle.lua");

/// Where Redis is, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisUrl {
    Direct(String),
    Sentinel { sentinels: Vec<String>, master: String },
}

impl RedisUrl {
    pub fn parse(url: &str) -> Result<Self, String> {
        if let Some(rest) = url.strip_prefix("redis+sentinel://") {
            let (hosts, master) = rest.split_once('/').ok_or("redis+sentinel:// needs /master-name")?;
            let master = master.split('?').next().unwrap_or_default();
            if master.is_empty() || hosts.is_empty() {
                return Err("expected redis+sentinel://host:port[,host:port...]/master-name".into());
            }
            let sentinels = hosts.split(',').map(|h| format!("redis://{h}")).collect();
            return Ok(Self::Sentinel { sentinels, master: master.to_string() });
        }
        if url.starts_with("redis://") || url.starts_with("rediss://") {
            Client::open(url).map_err(|e| e.to_string())?;
            return Ok(Self::Direct(url.to_string()));
        }
        Err("expected redis://, rediss:// or redis+sentinel://".into())
    }
}

/// The client of the current primary, asking the Sentinels when configured.
async fn primary_client(url: &RedisUrl, resp3: bool) -> anyhow::Result<Client> {
    let with_protocol = |u: String| -> String {
        if !resp3 {
            return u;
        }
        let sep = if u.contains('?') { '&' } else { '?' };
        format!("{u}{sep}protocol=resp3")
    };
    match url {
        RedisUrl::Direct(u) => Ok(Client::open(with_protocol(u.clone()))?),
        RedisUrl::Sentinel { sentinels, master } => {
            let mut sc = SentinelClient::build(sentinels.clone(), master.clone(), None, SentinelServerType::Master)
                .context("sentinel client")?;
            let client = sc.async_get_client().await.context("asking the sentinels for the primary")?;
            let info = client.get_connection_info().clone();
            let addr = info.addr().to_string();
            let (host, port) = addr.rsplit_once(':').context("primary address")?;
            Ok(Client::open(with_protocol(format!("redis://{host}:{port}")))?)
        }
    }
}

fn manager_config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(5)))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_secs(2))
}

/// Commands to the current primary. Cheap to clone.
#[derive(Clone)]
pub struct Redis {
    url: RedisUrl,
    conn: Arc<RwLock<ConnectionManager>>,
    /// Address of the primary `conn` talks to.
    primary: Arc<std::sync::Mutex<String>>,
}

fn addr_of(client: &Client) -> String {
    client.get_connection_info().addr().to_string()
}

impl Redis {
    pub async fn connect(url: RedisUrl) -> anyhow::Result<Self> {
        let client = primary_client(&url, false).await?;
        let conn =
            tokio::time::timeout(Duration::from_secs(10), client.get_connection_manager_with_config(manager_config()))
                .await
                .context("connecting to Redis timed out")??;
        let redis =
            Self { url, conn: Arc::new(RwLock::new(conn)), primary: Arc::new(std::sync::Mutex::new(addr_of(&client))) };
        if matches!(redis.url, RedisUrl::Sentinel { .. }) {
            // A demoted primary can keep answering reads (and refuse writes) for a long while:
            // follow the Sentinels' word instead of waiting for errors.
            let watcher = redis.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tick.tick().await;
                    watcher.follow_primary(false).await;
                }
            });
        }
        Ok(redis)
    }

    /// Another handle with its own connection, for blocking commands (XREADGROUP BLOCK) that
    /// would otherwise hold up every command queued behind them on the shared one.
    pub async fn dedicated(&self) -> anyhow::Result<Self> {
        Self::connect(self.url.clone()).await
    }

    /// A handle on the connection (multiplexed: clones share one socket and keep call order).
    pub async fn conn(&self) -> ConnectionManager {
        self.conn.read().await.clone()
    }

    /// After an error that may mean the primary moved (connection refused, READONLY): ask the
    /// Sentinels again and swap the connection. A no-op for a direct URL (the manager reconnects).
    pub async fn reresolve(&self) {
        self.follow_primary(true).await;
    }

    /// Asks the Sentinels where the primary is and reconnects there when it moved (or always,
    /// with `force`).
    async fn follow_primary(&self, force: bool) {
        if !matches!(self.url, RedisUrl::Sentinel { .. }) {
            return;
        }
        match primary_client(&self.url, false).await {
            Ok(client) if !force && addr_of(&client) == *self.primary.lock().unwrap_or_else(|p| p.into_inner()) => {}
            Ok(client) => match client.get_connection_manager_with_config(manager_config()).await {
                Ok(conn) => {
                    *self.conn.write().await = conn;
                    *self.primary.lock().unwrap_or_else(|p| p.into_inner()) = addr_of(&client);
                    tracing::info!(primary = %addr_of(&client), "redis: connected to the primary named by the sentinels");
                }
                Err(e) => tracing::warn!(error = %e, "redis: new primary not reachable yet"),
            },
            Err(e) => tracing::warn!(error = %e, "redis: sentinels did not name a primary"),
        }
    }

    pub fn url(&self) -> &RedisUrl {
        &self.url
    }

    /// A separate RESP3 connection for pub/sub: pushes (messages, disconnections) go to `tx`,
    /// and subscriptions are renewed by the manager after a reconnect.
    pub async fn pubsub(&self, tx: mpsc::UnboundedSender<PushInfo>) -> anyhow::Result<ConnectionManager> {
        let client = primary_client(&self.url, true).await?;
        let config = manager_config().set_push_sender(tx).set_automatic_resubscription();
        let conn = tokio::time::timeout(Duration::from_secs(10), client.get_connection_manager_with_config(config))
            .await
            .context("connecting the pub/sub connection timed out")??;
        Ok(conn)
    }
}

/// Whether an error suggests the primary is elsewhere now.
pub fn is_failover_error(e: &redis::RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_refusal()
        || e.is_connection_dropped()
        || e.code() == Some("READONLY")
        // `WAIT` on a node that was just demoted.
        || e.to_string().contains("replica instances")
}

pub fn check_url(url: &str) -> anyhow::Result<RedisUrl> {
    match RedisUrl::parse(url) {
        Ok(u) => Ok(u),
        Err(e) => bail!(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_forms() {
        assert_eq!(
            RedisUrl::parse("redis://127.0.0.1:6379").unwrap(),
            RedisUrl::Direct("redis://127.0.0.1:6379".into())
        );
        assert_eq!(
            RedisUrl::parse("redis+sentinel://a:1,b:2/mymaster").unwrap(),
            RedisUrl::Sentinel {
                sentinels: vec!["redis://a:1".into(), "redis://b:2".into()],
                master: "mymaster".into()
            }
        );
        assert!(RedisUrl::parse("redis+sentinel://a:1").is_err());
        assert!(RedisUrl::parse("http://x").is_err());
    }
}
