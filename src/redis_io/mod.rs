//! Redis access for cluster mode: URL forms (`redis://`, `rediss://`, `redis+sentinel://`,
//! `rediss+sentinel://`), a command connection that reconnects with backoff and follows a
//! Sentinel failover, and a pub/sub connection whose pushes feed the fan-out. TLS (rustls) and ACL
//! credentials apply to every connection, the primary a Sentinel names included; a TLS URL never
//! falls back to plaintext.

pub mod keys;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::sentinel::{SentinelClientBuilder, SentinelServerType};
use redis::{Client, ConnectionAddr, IntoConnectionInfo, ProtocolVersion, PushInfo, TlsCertificates, TlsMode};
use tokio::sync::{RwLock, mpsc};

pub use keys::Keys;

/// The send script's body; run it as [`send_script`], which defines the `seal` it calls.
pub const SEND_SCRIPT: &str = include_str!("send.lua");

/// The send script for a cluster: its seal function (with the cluster's pub/sub key) and body.
pub fn send_script(seal: &crate::fanout::seal::Seal) -> String {
    format!("{}{SEND_SCRIPT}", seal.lua_prelude())
}
/// Applies a message replicated from its room's home region; run it as [`apply_script`].
pub const APPLY_SCRIPT: &str = include_str!("apply.lua");

pub fn apply_script(seal: &crate::fanout::seal::Seal) -> String {
    format!("{}{APPLY_SCRIPT}", seal.lua_prelude())
}
pub const PRESENCE_SCRIPT: &str = include_str!("presence.lua");
pub const THROTTLE_SCRIPT: &str = include_str!("throttle.lua");

/// Where Redis is, as configured. `Debug` never prints a password.
#[derive(Clone, PartialEq, Eq)]
pub enum RedisUrl {
    /// `redis://` or `rediss://` (TLS), credentials and db as the URL says.
    Direct(String),
    /// `redis+sentinel://` or `rediss+sentinel://` (TLS to the Sentinels and the data nodes).
    Sentinel(SentinelUrl),
}

/// A Sentinel deployment: `redis[s]+sentinel://[user[:password]@]host:port[,host:port...]/master`.
/// The userinfo is the data nodes' (the ACL user chatmesh runs its commands as); the Sentinels'
/// own credentials, when they require AUTH, come from separate settings because they usually
/// differ (a Sentinel ACL user needs only `SENTINEL`/`ROLE`/`PING`).
#[derive(Clone, PartialEq, Eq)]
pub struct SentinelUrl {
    pub sentinels: Vec<(String, u16)>,
    pub master: String,
    pub tls: bool,
    pub username: Option<String>,
    pub password: Option<String>,
    pub sentinel_username: Option<String>,
    pub sentinel_password: Option<String>,
}

impl std::fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Direct(u) => f.debug_tuple("Direct").field(&redact(u)).finish(),
            Self::Sentinel(s) => f.debug_tuple("Sentinel").field(s).finish(),
        }
    }
}

impl std::fmt::Debug for SentinelUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SentinelUrl")
            .field("sentinels", &self.sentinels)
            .field("master", &self.master)
            .field("tls", &self.tls)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("sentinel_username", &self.sentinel_username)
            .field("sentinel_password", &self.sentinel_password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// `url` with the password of its userinfo replaced, for logs and errors.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            let shown = if userinfo.contains(':') { format!("{user}:***") } else { user.to_string() };
            format!("{scheme}://{shown}@{hosts}{tail}")
        }
        None => url.to_string(),
    }
}

impl RedisUrl {
    pub fn parse(url: &str) -> Result<Self, String> {
        let sentinel = url
            .strip_prefix("redis+sentinel://")
            .map(|rest| (false, rest))
            .or_else(|| url.strip_prefix("rediss+sentinel://").map(|rest| (true, rest)));
        if let Some((tls, rest)) = sentinel {
            let (authority, master) = rest.split_once('/').ok_or("redis+sentinel:// needs /master-name")?;
            let master = master.split(['?', '#']).next().unwrap_or_default();
            let (userinfo, hosts) = match authority.rsplit_once('@') {
                Some((u, h)) => (Some(u), h),
                None => (None, authority),
            };
            if master.is_empty() || hosts.is_empty() {
                return Err("expected redis[s]+sentinel://[user:password@]host:port[,host:port...]/master-name".into());
            }
            let sentinels = hosts
                .split(',')
                .map(|h| {
                    let (host, port) =
                        h.rsplit_once(':').ok_or_else(|| format!("sentinel {h:?}: expected host:port"))?;
                    let port = port.parse::<u16>().map_err(|_| format!("sentinel {h:?}: bad port"))?;
                    if host.is_empty() {
                        return Err(format!("sentinel {h:?}: empty host"));
                    }
                    Ok((host.trim_start_matches('[').trim_end_matches(']').to_string(), port))
                })
                .collect::<Result<Vec<_>, String>>()?;
            // The userinfo is decoded by redis's own URL parser, as it would be in a redis:// URL
            // (percent-encoded passwords work the same in both forms).
            let (username, password) = match userinfo {
                None => (None, None),
                Some(userinfo) => {
                    let (host, port) = &sentinels[0];
                    let info = format!("redis://{userinfo}@{host}:{port}")
                        .into_connection_info()
                        .map_err(|e| format!("credentials of the sentinel URL: {e}"))?;
                    let redis = info.redis_settings();
                    (redis.username().map(str::to_string), redis.password().map(str::to_string))
                }
            };
            return Ok(Self::Sentinel(SentinelUrl {
                sentinels,
                master: master.to_string(),
                tls,
                username,
                password,
                sentinel_username: None,
                sentinel_password: None,
            }));
        }
        if url.starts_with("redis://") || url.starts_with("rediss://") {
            let info = url.into_connection_info().map_err(|e| e.to_string())?;
            // `rediss://...#insecure` turns certificate checks off: that is a downgrade we refuse
            // (a private CA goes in CHATMESH_REDIS_CA_FILE instead).
            if let ConnectionAddr::TcpTls { insecure: true, .. } = info.addr() {
                return Err("rediss://...#insecure (no certificate check) is not allowed; name the CA in CHATMESH_REDIS_CA_FILE".into());
            }
            return Ok(Self::Direct(url.to_string()));
        }
        Err("expected redis://, rediss://, redis+sentinel:// or rediss+sentinel://".into())
    }

    /// Whether every connection this URL makes is TLS.
    pub fn is_tls(&self) -> bool {
        match self {
            Self::Direct(u) => u.starts_with("rediss://"),
            Self::Sentinel(s) => s.tls,
        }
    }
}

/// How to reach Redis: the URL plus what is configured beside it. `connect` takes anything that
/// turns into one, so a bare [`RedisUrl`] still works.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisConfig {
    pub url: RedisUrl,
    /// PEM file of the CA(s) that sign the Redis servers' (and Sentinels') certificates, instead
    /// of the OS trust store. Read at every (re)connection, so a rotated file is picked up.
    pub ca_file: Option<PathBuf>,
}

impl From<RedisUrl> for RedisConfig {
    fn from(url: RedisUrl) -> Self {
        Self { url, ca_file: None }
    }
}

impl RedisConfig {
    /// Checks what can be checked before connecting: a CA file only with a TLS URL (a CA next to
    /// a plaintext URL would look like TLS is on when it is not), and a readable PEM with at
    /// least one certificate.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(path) = &self.ca_file {
            if !self.url.is_tls() {
                return Err(format!(
                    "{} is set but the Redis URL is not TLS: use rediss:// or rediss+sentinel://",
                    path.display()
                ));
            }
            read_ca(path).map_err(|e| format!("{e:#}"))?;
        }
        Ok(())
    }

    fn certificates(&self) -> anyhow::Result<Option<TlsCertificates>> {
        let Some(path) = &self.ca_file else { return Ok(None) };
        Ok(Some(TlsCertificates { client_tls: None, root_cert: Some(read_ca(path)?) }))
    }
}

fn read_ca(path: &Path) -> anyhow::Result<Vec<u8>> {
    let pem = std::fs::read(path).with_context(|| format!("reading the Redis CA file {}", path.display()))?;
    let count = rustls::pki_types::pem::PemObject::pem_slice_iter(&pem)
        .collect::<Result<Vec<rustls::pki_types::CertificateDer<'_>>, _>>()
        .with_context(|| format!("the Redis CA file {} is not valid PEM", path.display()))?
        .len();
    if count == 0 {
        bail!("the Redis CA file {} holds no certificate", path.display());
    }
    Ok(pem)
}

/// rustls picks its crypto from a process-wide provider when the caller does not pass one (the
/// redis crate does not); with more than one provider compiled in it cannot choose and panics.
/// Naming ring (which every TLS client here already uses) removes the ambiguity; a provider
/// installed earlier by someone else is kept.
fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Where a connection goes, for errors and logs: host:port and whether it is TLS, never the
/// credentials.
fn describe(url: &RedisUrl) -> String {
    match url {
        RedisUrl::Direct(u) => match u.as_str().into_connection_info() {
            Ok(info) => match info.addr() {
                ConnectionAddr::Tcp(h, p) => format!("{h}:{p} (plaintext)"),
                ConnectionAddr::TcpTls { host, port, .. } => format!("{host}:{port} (TLS)"),
                other => format!("{other:?}"),
            },
            Err(_) => redact(u),
        },
        RedisUrl::Sentinel(s) => {
            let hosts: Vec<String> = s.sentinels.iter().map(|(h, p)| format!("{h}:{p}")).collect();
            format!("sentinels {} master {} ({})", hosts.join(","), s.master, if s.tls { "TLS" } else { "plaintext" })
        }
    }
}

/// The client of the current primary, asking the Sentinels when configured. Credentials, TLS and
/// the CA apply to the primary as to the Sentinels: the Sentinels only say where it is.
async fn primary_client(config: &RedisConfig, resp3: bool) -> anyhow::Result<Client> {
    install_crypto_provider();
    let certs = config.certificates()?;
    match &config.url {
        RedisUrl::Direct(u) => {
            let mut info = u.as_str().into_connection_info()?;
            if resp3 {
                let redis = info.redis_settings().clone().set_protocol(ProtocolVersion::RESP3);
                info = info.set_redis_settings(redis);
            }
            Ok(match certs {
                Some(certs) => Client::build_with_tls(info, certs)?,
                None => Client::open(info)?,
            })
        }
        RedisUrl::Sentinel(s) => {
            let addrs = s.sentinels.iter().map(|(host, port)| {
                if s.tls {
                    ConnectionAddr::TcpTls { host: host.clone(), port: *port, insecure: false, tls_params: None }
                } else {
                    ConnectionAddr::Tcp(host.clone(), *port)
                }
            });
            let mut builder = SentinelClientBuilder::new(addrs, &s.master, SentinelServerType::Master)?;
            if s.tls {
                builder = builder
                    .set_client_to_sentinel_tls_mode(TlsMode::Secure)
                    .set_client_to_redis_tls_mode(TlsMode::Secure);
                if let Some(certs) = certs {
                    builder = builder
                        .set_client_to_sentinel_certificates(certs.clone())
                        .set_client_to_redis_certificates(certs);
                }
            }
            if let Some(user) = &s.username {
                builder = builder.set_client_to_redis_username(user);
            }
            if let Some(password) = &s.password {
                builder = builder.set_client_to_redis_password(password);
            }
            if let Some(user) = &s.sentinel_username {
                builder = builder.set_client_to_sentinel_username(user);
            }
            if let Some(password) = &s.sentinel_password {
                builder = builder.set_client_to_sentinel_password(password);
            }
            if resp3 {
                builder = builder.set_client_to_redis_protocol(ProtocolVersion::RESP3);
            }
            let mut sc = builder.build().context("sentinel client")?;
            // The client the Sentinels' answer builds carries the data-node TLS mode, CA and
            // credentials set above (and the crate checked that node's ROLE with them).
            sc.async_get_client().await.context("asking the sentinels for the primary")
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
    config: RedisConfig,
    conn: Arc<RwLock<ConnectionManager>>,
    /// Address of the primary `conn` talks to.
    primary: Arc<std::sync::Mutex<String>>,
}

fn addr_of(client: &Client) -> String {
    client.get_connection_info().addr().to_string()
}

impl Redis {
    /// Connects (TLS, CA and credentials as configured) and checks the connection with a round
    /// trip. A TLS URL never falls back to plaintext: a server that does not speak TLS, or whose
    /// certificate the CA does not vouch for, is an error here.
    pub async fn connect(config: impl Into<RedisConfig>) -> anyhow::Result<Self> {
        let config = config.into();
        let target = describe(&config.url);
        let client =
            primary_client(&config, false).await.with_context(|| format!("connecting to Redis at {target}"))?;
        let conn =
            tokio::time::timeout(Duration::from_secs(10), client.get_connection_manager_with_config(manager_config()))
                .await
                .with_context(|| format!("connecting to Redis at {target} timed out"))?
                .with_context(|| format!("connecting to Redis at {target}"))?;
        let mut probe = conn.clone();
        redis::cmd("PING")
            .query_async::<String>(&mut probe)
            .await
            .with_context(|| format!("first command (PING) to Redis at {target}"))?;
        let redis = Self {
            config,
            conn: Arc::new(RwLock::new(conn)),
            primary: Arc::new(std::sync::Mutex::new(addr_of(&client))),
        };
        if matches!(redis.config.url, RedisUrl::Sentinel(_)) {
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
        Self::connect(self.config.clone()).await
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
        if !matches!(self.config.url, RedisUrl::Sentinel(_)) {
            return;
        }
        match primary_client(&self.config, false).await {
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
        &self.config.url
    }

    /// A separate RESP3 connection for pub/sub: pushes (messages, disconnections) go to `tx`,
    /// and subscriptions are renewed by the manager after a reconnect.
    pub async fn pubsub(&self, tx: mpsc::UnboundedSender<PushInfo>) -> anyhow::Result<ConnectionManager> {
        let client = primary_client(&self.config, true)
            .await
            .with_context(|| format!("connecting the pub/sub connection to {}", describe(&self.config.url)))?;
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

    fn sentinel(url: &str) -> SentinelUrl {
        match RedisUrl::parse(url).unwrap() {
            RedisUrl::Sentinel(s) => s,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn url_forms() {
        assert_eq!(
            RedisUrl::parse("redis://127.0.0.1:6379").unwrap(),
            RedisUrl::Direct("redis://127.0.0.1:6379".into())
        );
        let s = sentinel("redis+sentinel://a:1,b:2/mymaster");
        assert_eq!(s.sentinels, vec![("a".to_string(), 1), ("b".to_string(), 2)]);
        assert_eq!(
            (s.master.as_str(), s.tls, s.username.as_deref(), s.password.as_deref()),
            ("mymaster", false, None, None)
        );
        assert!(RedisUrl::parse("redis+sentinel://a:1").is_err());
        assert!(RedisUrl::parse("redis+sentinel://a/m").is_err());
        assert!(RedisUrl::parse("http://x").is_err());
    }

    #[test]
    fn sentinel_url_carries_tls_and_the_data_nodes_credentials() {
        let s = sentinel("rediss+sentinel://chatmesh:p%40ss%3Aw@s1:26379,s2:26380/cm");
        assert!(s.tls);
        assert_eq!(s.username.as_deref(), Some("chatmesh"));
        assert_eq!(s.password.as_deref(), Some("p@ss:w"));
        assert_eq!(s.sentinels, vec![("s1".to_string(), 26379), ("s2".to_string(), 26380)]);
        let only_password = sentinel("redis+sentinel://:secret@h:1/m");
        assert_eq!((only_password.username, only_password.password.as_deref()), (None, Some("secret")));
        assert!(RedisUrl::parse("rediss+sentinel://h:1/m").unwrap().is_tls());
    }

    #[test]
    fn passwords_stay_out_of_debug_and_redacted_urls() {
        let url = RedisUrl::parse("rediss://chatmesh:hunter2@h:6380/0").unwrap();
        assert!(!format!("{url:?}").contains("hunter2"));
        let mut s = sentinel("redis+sentinel://u:hunter2@h:1/m");
        s.sentinel_password = Some("hunter3".into());
        let shown = format!("{:?}", RedisUrl::Sentinel(s));
        assert!(!shown.contains("hunter2") && !shown.contains("hunter3"), "{shown}");
        assert_eq!(redact("redis://u:pw@h:1/0"), "redis://u:***@h:1/0");
        assert_eq!(redact("redis://h:1"), "redis://h:1");
    }

    #[test]
    fn no_insecure_tls_and_no_ca_next_to_plaintext() {
        assert!(RedisUrl::parse("rediss://h:1/#insecure").is_err());
        let plain =
            RedisConfig { url: RedisUrl::parse("redis://h:1").unwrap(), ca_file: Some("/nonexistent.pem".into()) };
        assert!(plain.validate().unwrap_err().contains("not TLS"));
        let missing =
            RedisConfig { url: RedisUrl::parse("rediss://h:1").unwrap(), ca_file: Some("/nonexistent.pem".into()) };
        assert!(missing.validate().unwrap_err().contains("/nonexistent.pem"));
    }
}
