//! Typed settings, parsed once at start from `CHATMESH_*` environment variables and `serve` flags.
//!
//! Every invalid or unknown setting stops the process with one line naming it (API.md §7).
//! Secrets are kept in [`Secret`] so that `Debug` output never shows them.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Environment variables this build understands; any other `CHATMESH_*` variable is a typo
/// that would otherwise be silently ignored.
pub const KNOWN_ENV: &[&str] = &[
    "CHATMESH_BIND",
    "CHATMESH_INSTANCE_ID",
    "CHATMESH_REGION",
    "CHATMESH_STORE_URL",
    "CHATMESH_REDIS_URL",
    "CHATMESH_JWT_SECRET",
    "CHATMESH_CLUSTER_SECRET",
    "CHATMESH_ADMIN_TOKEN",
    "CHATMESH_LOG_FORMAT",
    "CHATMESH_AUTH_RATE_PER_MIN",
    "CHATMESH_SEND_RATE_PER_SEC",
    "CHATMESH_MAX_BODY_BYTES",
    "CHATMESH_TOKEN_TTL_SECS",
    "CHATMESH_DRAIN_DELAY_MS",
    "CHATMESH_SHUTDOWN_TIMEOUT_MS",
    "CHATMESH_TRUST_PROXY",
];

/// Prefixes reserved for test harnesses and tools, not for the server.
const IGNORED_ENV_PREFIXES: &[&str] = &["CHATMESH_TEST_", "CHATMESH_BENCH_"];

#[derive(Parser, Debug)]
#[command(
    name = "chatmesh",
    version,
    about = "Real-time chat backend with gap-free per-room ordering"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve the API, Socket.IO and the web page (the default).
    Serve(ServeArgs),
}

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Listen address.
    #[arg(
        long,
        env = "CHATMESH_BIND",
        value_name = "CHATMESH_BIND",
        default_value = "127.0.0.1:5001"
    )]
    pub bind: SocketAddr,
    /// Unique id of this instance (default: hostname + port).
    #[arg(
        long,
        env = "CHATMESH_INSTANCE_ID",
        value_name = "CHATMESH_INSTANCE_ID"
    )]
    pub instance_id: Option<String>,
    /// Region / instance group name.
    #[arg(
        long,
        env = "CHATMESH_REGION",
        value_name = "CHATMESH_REGION",
        default_value = "local"
    )]
    pub region: String,
    /// Durable store: sqlite://PATH (postgres:// and mongodb:// in cluster builds).
    #[arg(
        long,
        env = "CHATMESH_STORE_URL",
        value_name = "CHATMESH_STORE_URL",
        default_value = "sqlite://./data/chatmesh.db"
    )]
    pub store_url: String,
    /// Redis URL; unset means embedded single-node mode.
    #[arg(long, env = "CHATMESH_REDIS_URL", value_name = "CHATMESH_REDIS_URL")]
    pub redis_url: Option<String>,
    /// User-token signing key (embedded mode: generated once into the data dir).
    #[arg(
        long,
        env = "CHATMESH_JWT_SECRET",
        value_name = "CHATMESH_JWT_SECRET",
        hide_env_values = true
    )]
    pub jwt_secret: Option<String>,
    /// Signs instance-to-instance requests (cluster mode).
    #[arg(
        long,
        env = "CHATMESH_CLUSTER_SECRET",
        value_name = "CHATMESH_CLUSTER_SECRET",
        hide_env_values = true
    )]
    pub cluster_secret: Option<String>,
    /// Guards /api/v1/cluster and admin pages.
    #[arg(
        long,
        env = "CHATMESH_ADMIN_TOKEN",
        value_name = "CHATMESH_ADMIN_TOKEN",
        hide_env_values = true
    )]
    pub admin_token: Option<String>,
    /// Log format (default: pretty on a terminal, else json).
    #[arg(long, env = "CHATMESH_LOG_FORMAT", value_name = "CHATMESH_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Register + login attempts per client IP per minute.
    #[arg(long, env = "CHATMESH_AUTH_RATE_PER_MIN", value_name = "CHATMESH_AUTH_RATE_PER_MIN", default_value_t = 60,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub auth_rate_per_min: u32,
    /// Sends per user per second, sustained (bursts up to 10x).
    #[arg(long, env = "CHATMESH_SEND_RATE_PER_SEC", value_name = "CHATMESH_SEND_RATE_PER_SEC", default_value_t = 20,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub send_rate_per_sec: u32,
    /// Request body limit for REST and Socket.IO packets.
    #[arg(long, env = "CHATMESH_MAX_BODY_BYTES", value_name = "CHATMESH_MAX_BODY_BYTES", default_value_t = 65536,
          value_parser = clap::value_parser!(u32).range(1024..=16_777_216))]
    pub max_body_bytes: u32,
    /// Lifetime of user tokens in seconds.
    #[arg(long, env = "CHATMESH_TOKEN_TTL_SECS", value_name = "CHATMESH_TOKEN_TTL_SECS", default_value_t = 86_400,
          value_parser = clap::value_parser!(u64).range(60..=31_536_000))]
    pub token_ttl_secs: u64,
    /// On SIGTERM, how long readiness reports 503 before the listener closes (lets a balancer move traffic).
    #[arg(
        long,
        env = "CHATMESH_DRAIN_DELAY_MS",
        value_name = "CHATMESH_DRAIN_DELAY_MS",
        default_value_t = 1000
    )]
    pub drain_delay_ms: u64,
    /// On SIGTERM, the longest wait for in-flight work before exiting.
    #[arg(
        long,
        env = "CHATMESH_SHUTDOWN_TIMEOUT_MS",
        value_name = "CHATMESH_SHUTDOWN_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    pub shutdown_timeout_ms: u64,
    /// Take the client IP for rate limits from the first X-Forwarded-For address (behind HAProxy).
    #[arg(long, env = "CHATMESH_TRUST_PROXY", value_name = "CHATMESH_TRUST_PROXY", default_value_t = false,
          action = clap::ArgAction::Set)]
    pub trust_proxy: bool,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Pretty,
}

/// A string that never prints itself.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// Where the durable state lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    Sqlite { path: PathBuf },
}

impl StoreUrl {
    pub fn parse(url: &str) -> Result<Self, String> {
        if let Some(rest) = url.strip_prefix("sqlite://") {
            let path = rest.split('?').next().unwrap_or_default();
            if path.is_empty() {
                return Err("sqlite:// needs a file path, e.g. sqlite://./data/chatmesh.db".into());
            }
            return Ok(Self::Sqlite {
                path: PathBuf::from(path),
            });
        }
        if url.starts_with("postgres://")
            || url.starts_with("postgresql://")
            || url.starts_with("mongodb://")
        {
            return Err("this build serves embedded mode only; PostgreSQL and MongoDB stores come with cluster mode".into());
        }
        Err("expected sqlite://PATH".into())
    }

    /// Directory that holds the store and, in embedded mode, the generated JWT secret.
    pub fn data_dir(&self) -> PathBuf {
        match self {
            Self::Sqlite { path } => path
                .parent()
                .map(PathBuf::from)
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or_else(|| ".".into()),
        }
    }
}

/// The validated configuration of `chatmesh serve`.
#[derive(Debug, Clone)]
pub struct Config {
    pub bind: SocketAddr,
    pub instance_id: Option<String>,
    pub region: String,
    pub store: StoreUrl,
    pub jwt_secret: Option<Secret>,
    pub cluster_secret: Option<Secret>,
    pub admin_token: Option<Secret>,
    pub log_format: LogFormat,
    pub auth_rate_per_min: u32,
    pub send_rate_per_sec: u32,
    pub max_body_bytes: usize,
    pub token_ttl: Duration,
    pub drain_delay: Duration,
    pub shutdown_timeout: Duration,
    pub trust_proxy: bool,
}

/// A setting that cannot be used; `Display` is the one line printed before exiting.
#[derive(Debug, thiserror::Error)]
#[error("invalid setting {name}: {reason}")]
pub struct ConfigError {
    pub name: String,
    pub reason: String,
}

fn invalid(name: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        name: name.into(),
        reason: reason.into(),
    }
}

impl Config {
    pub fn from_args(args: ServeArgs, stdout_is_terminal: bool) -> Result<Self, ConfigError> {
        let store =
            StoreUrl::parse(&args.store_url).map_err(|r| invalid("CHATMESH_STORE_URL", r))?;
        if args.redis_url.is_some() {
            return Err(invalid(
                "CHATMESH_REDIS_URL",
                "cluster mode is not available in this build; unset it to run embedded",
            ));
        }
        if args.region.is_empty() || args.region.len() > 64 {
            return Err(invalid("CHATMESH_REGION", "must be 1..=64 characters"));
        }
        if let Some(id) = &args.instance_id
            && (id.is_empty() || id.len() > 128)
        {
            return Err(invalid(
                "CHATMESH_INSTANCE_ID",
                "must be 1..=128 characters",
            ));
        }
        let non_empty =
            |name: &str, v: Option<String>, min: usize| -> Result<Option<Secret>, ConfigError> {
                match v {
                    Some(s) if s.len() < min => {
                        Err(invalid(name, format!("must be at least {min} bytes")))
                    }
                    Some(s) => Ok(Some(Secret::new(s))),
                    None => Ok(None),
                }
            };
        Ok(Self {
            bind: args.bind,
            instance_id: args.instance_id,
            region: args.region,
            store,
            jwt_secret: non_empty("CHATMESH_JWT_SECRET", args.jwt_secret, 32)?,
            cluster_secret: non_empty("CHATMESH_CLUSTER_SECRET", args.cluster_secret, 32)?,
            admin_token: non_empty("CHATMESH_ADMIN_TOKEN", args.admin_token, 16)?,
            log_format: args.log_format.unwrap_or(if stdout_is_terminal {
                LogFormat::Pretty
            } else {
                LogFormat::Json
            }),
            auth_rate_per_min: args.auth_rate_per_min,
            send_rate_per_sec: args.send_rate_per_sec,
            max_body_bytes: args.max_body_bytes as usize,
            token_ttl: Duration::from_secs(args.token_ttl_secs),
            drain_delay: Duration::from_millis(args.drain_delay_ms),
            shutdown_timeout: Duration::from_millis(args.shutdown_timeout_ms),
            trust_proxy: args.trust_proxy,
        })
    }
}

/// Rejects `CHATMESH_*` variables this build does not know (a typo must not be silently ignored).
pub fn check_unknown_env(vars: impl Iterator<Item = String>) -> Result<(), ConfigError> {
    for name in vars {
        if name.starts_with("CHATMESH_")
            && !KNOWN_ENV.contains(&name.as_str())
            && !IGNORED_ENV_PREFIXES.iter().any(|p| name.starts_with(p))
        {
            return Err(invalid(&name, "unknown setting"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_env_is_named() {
        let err = check_unknown_env(
            ["CHATMESH_BIND".to_string(), "CHATMESH_BINDD".to_string()].into_iter(),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid setting CHATMESH_BINDD: unknown setting"
        );
        assert!(check_unknown_env(["CHATMESH_TEST_MONGODB_URL".to_string()].into_iter()).is_ok());
    }

    #[test]
    fn store_url_forms() {
        assert_eq!(
            StoreUrl::parse("sqlite://./data/x.db").unwrap(),
            StoreUrl::Sqlite {
                path: "./data/x.db".into()
            }
        );
        assert_eq!(
            StoreUrl::parse("sqlite://x.db").unwrap().data_dir(),
            PathBuf::from(".")
        );
        assert!(StoreUrl::parse("sqlite://").is_err());
        assert!(StoreUrl::parse("mysql://x").is_err());
    }
}
