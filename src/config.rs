//! Typed settings, parsed once at start from `CHATMESH_*` environment variables and `serve` flags.
//!
//! Every invalid or unknown setting stops the process with one line naming it (API.md §7).
//! Secrets are kept in [`Secret`] so that `Debug` output never shows them.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Prefixes reserved for test harnesses and tools, not for the server.
const IGNORED_ENV_PREFIXES: &[&str] = &["CHATMESH_TEST_", "CHATMESH_BENCH_"];

#[derive(Parser, Debug)]
#[command(name = "chatmesh", version, about = "Real-time chat backend with gap-free per-room ordering")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

// Parsed once at start: the size of the `Serve` variant costs nothing worth a Box.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve the API, Socket.IO and the web page (the default).
    Serve(ServeArgs),
    /// Write a consistent export of the store (JSON Lines) to a file or stdout.
    Backup(BackupArgs),
    /// Load a backup into a store (any backend), idempotently.
    Restore(RestoreArgs),
    /// Multi-region operations, with the settings of this region's instances (from the
    /// environment, as `serve` reads them).
    Region(RegionArgs),
}

/// `chatmesh region …`.
#[derive(Args, Debug)]
pub struct RegionArgs {
    #[command(subcommand)]
    pub action: RegionAction,
}

#[derive(Subcommand, Debug)]
pub enum RegionAction {
    /// Take over the rooms of a region whose home lease lapsed (docs/regions.md, "Losing a
    /// region"): this region decides them from now on. With --region set to this region, takes
    /// its own rooms back from the region holding them (give back). Prints a JSON report.
    Takeover(TakeoverArgs),
}

#[derive(Args, Debug)]
pub struct TakeoverArgs {
    /// The region whose rooms to take over (this region's own: give back).
    #[arg(long, value_name = "REGION")]
    pub region: String,
    /// The region taking them over: must be this one (CHATMESH_REGION); a guard against running
    /// the command with the wrong region's settings.
    #[arg(long, value_name = "REGION")]
    pub by: Option<String>,
}

/// The durable store, the same setting for `serve`, `backup` and `restore`. Its value is never
/// printed by `--help` (a URL may carry a password).
#[derive(Args, Debug, Clone)]
pub struct StoreArg {
    /// Durable store: sqlite://PATH (created if missing), postgres://... or mongodb://...
    #[arg(
        long,
        env = "CHATMESH_STORE_URL",
        value_name = "CHATMESH_STORE_URL",
        default_value = "sqlite://./data/chatmesh.db",
        hide_env_values = true
    )]
    pub store_url: String,
}

/// `chatmesh backup`: the store to read and where the backup goes. The format is described in
/// [`crate::backup`].
#[derive(Args, Debug, Clone)]
pub struct BackupArgs {
    /// Backup file to write (`-` for stdout), mode 0600 (it holds password hashes). An existing
    /// file is replaced only once the backup is complete.
    #[arg(long, value_name = "FILE")]
    pub out: String,
    #[command(flatten)]
    pub store: StoreArg,
}

/// `chatmesh restore`: the backup to read and the store to load it into.
#[derive(Args, Debug, Clone)]
pub struct RestoreArgs {
    /// Backup file to read (`-` for stdin).
    #[arg(long = "in", value_name = "FILE")]
    pub input: String,
    #[command(flatten)]
    pub store: StoreArg,
}

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Listen address.
    #[arg(long, env = "CHATMESH_BIND", value_name = "CHATMESH_BIND", default_value = "127.0.0.1:5001")]
    pub bind: SocketAddr,
    /// Unique id of this instance (default: hostname + port).
    #[arg(long, env = "CHATMESH_INSTANCE_ID", value_name = "CHATMESH_INSTANCE_ID")]
    pub instance_id: Option<String>,
    /// Region / instance group name.
    #[arg(long, env = "CHATMESH_REGION", value_name = "CHATMESH_REGION", default_value = "local")]
    pub region: String,
    #[command(flatten)]
    pub store: StoreArg,
    /// Redis URL; unset means embedded single-node mode.
    #[arg(long, env = "CHATMESH_REDIS_URL", value_name = "CHATMESH_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    /// PEM file of the CA that signs the Redis (and Sentinel) certificates, instead of the OS
    /// trust store; only with rediss:// or rediss+sentinel://.
    #[arg(long, env = "CHATMESH_REDIS_CA_FILE", value_name = "CHATMESH_REDIS_CA_FILE")]
    pub redis_ca_file: Option<std::path::PathBuf>,
    /// ACL user for the Sentinels, when they require AUTH (the URL's userinfo is the data nodes').
    #[arg(long, env = "CHATMESH_REDIS_SENTINEL_USERNAME", value_name = "CHATMESH_REDIS_SENTINEL_USERNAME")]
    pub redis_sentinel_username: Option<String>,
    /// Password for the Sentinels, when they require AUTH.
    #[arg(
        long,
        env = "CHATMESH_REDIS_SENTINEL_PASSWORD",
        value_name = "CHATMESH_REDIS_SENTINEL_PASSWORD",
        hide_env_values = true
    )]
    pub redis_sentinel_password: Option<String>,
    /// User-token signing key (embedded mode: generated once into the data dir).
    #[arg(long, env = "CHATMESH_JWT_SECRET", value_name = "CHATMESH_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// Signs instance-to-instance requests (cluster mode).
    #[arg(long, env = "CHATMESH_CLUSTER_SECRET", value_name = "CHATMESH_CLUSTER_SECRET", hide_env_values = true)]
    pub cluster_secret: Option<String>,
    /// Addresses allowed to call /internal/v1 (CIDR list; cluster mode).
    #[arg(
        long,
        env = "CHATMESH_INTERNAL_ALLOW",
        value_name = "CHATMESH_INTERNAL_ALLOW",
        default_value = "127.0.0.0/8,::1/128",
        value_delimiter = ','
    )]
    pub internal_allow: Vec<ipnet::IpNet>,
    /// Guards /api/v1/cluster and admin pages.
    #[arg(long, env = "CHATMESH_ADMIN_TOKEN", value_name = "CHATMESH_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Log format (default: pretty on a terminal, else json).
    #[arg(long, env = "CHATMESH_LOG_FORMAT", value_name = "CHATMESH_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Register + login attempts per client IP per minute.
    #[arg(long, env = "CHATMESH_AUTH_RATE_PER_MIN", value_name = "CHATMESH_AUTH_RATE_PER_MIN", default_value_t = 60,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub auth_rate_per_min: u32,
    /// Failed logins per account per minute, from anywhere (the whole cluster shares the budget);
    /// past it even a right password is answered 429 rate_limited until the bucket refills.
    #[arg(long, env = "CHATMESH_LOGIN_FAILURES_PER_MIN", value_name = "CHATMESH_LOGIN_FAILURES_PER_MIN",
          default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub login_failures_per_min: u32,
    /// Logins and registrations that may wait for a password-hashing slot (one per core); past
    /// it they answer 429 rate_limited at once.
    #[arg(long, env = "CHATMESH_PASSWORD_HASH_QUEUE", value_name = "CHATMESH_PASSWORD_HASH_QUEUE",
          default_value_t = 64, value_parser = clap::value_parser!(u32).range(0..=100_000))]
    pub password_hash_queue: u32,
    /// Sends per user per second, sustained (bursts up to 10x).
    #[arg(long, env = "CHATMESH_SEND_RATE_PER_SEC", value_name = "CHATMESH_SEND_RATE_PER_SEC", default_value_t = 20,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub send_rate_per_sec: u32,
    /// History reads (REST pages, room:sync) and joins (REST, room:join) per user per second,
    /// sustained (bursts up to 10x).
    #[arg(long, env = "CHATMESH_READ_RATE_PER_SEC", value_name = "CHATMESH_READ_RATE_PER_SEC", default_value_t = 50,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub read_rate_per_sec: u32,
    /// Bytes queued for one socket before it counts as a slow consumer and is disconnected (besides
    /// the 8192-packet bound); one packet alone always fits.
    #[arg(long, env = "CHATMESH_SOCKET_BUFFER_BYTES", value_name = "CHATMESH_SOCKET_BUFFER_BYTES",
          default_value_t = 8 << 20, value_parser = clap::value_parser!(u64).range(4096..=1 << 30))]
    pub socket_buffer_bytes: u64,
    /// How long one write to a WebSocket client may take before the connection is dropped.
    #[arg(long, env = "CHATMESH_WRITE_TIMEOUT_MS", value_name = "CHATMESH_WRITE_TIMEOUT_MS",
          default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(100..=600_000))]
    pub write_timeout_ms: u64,
    /// Web origins (`https://app.example.com`, comma-separated) whose pages may call the API and
    /// Socket.IO long-polling from a browser; none by default (same origin only).
    #[arg(long, env = "CHATMESH_CORS_ORIGINS", value_name = "CHATMESH_CORS_ORIGINS", default_value = "")]
    pub cors_origins: String,
    /// How long an Engine.IO session may stay open without a Socket.IO CONNECT.
    #[arg(long, env = "CHATMESH_CONNECT_TIMEOUT_MS", value_name = "CHATMESH_CONNECT_TIMEOUT_MS",
          default_value_t = 45_000, value_parser = clap::value_parser!(u64).range(100..=600_000))]
    pub connect_timeout_ms: u64,
    /// Engine.IO sessions open at once on this instance (a further handshake answers 403).
    #[arg(long, env = "CHATMESH_MAX_SESSIONS", value_name = "CHATMESH_MAX_SESSIONS", default_value_t = 100_000,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_sessions: u32,
    /// Engine.IO sessions open at once from one client address (behind a balancer, set
    /// CHATMESH_TRUST_PROXY so that the address is the client's, not the balancer's).
    #[arg(long, env = "CHATMESH_MAX_SESSIONS_PER_IP", value_name = "CHATMESH_MAX_SESSIONS_PER_IP",
          default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_sessions_per_ip: u32,
    /// Sockets one user may have connected to this instance at once (each further CONNECT is
    /// refused with connect_error "too many connections for this user").
    #[arg(long, env = "CHATMESH_MAX_SOCKETS_PER_USER", value_name = "CHATMESH_MAX_SOCKETS_PER_USER",
          default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_sockets_per_user: u32,
    /// Events of one socket handled at once (clients pipeline sends); past it the event is answered
    /// rate_limited at once, and a socket refused 1024 times in a row is disconnected.
    #[arg(long, env = "CHATMESH_MAX_EVENTS_IN_FLIGHT", value_name = "CHATMESH_MAX_EVENTS_IN_FLIGHT",
          default_value_t = 2048, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_events_in_flight: u32,
    /// History reads (room:join, room:sync) of one socket handled at once; past it rate_limited.
    #[arg(long, env = "CHATMESH_MAX_READS_IN_FLIGHT", value_name = "CHATMESH_MAX_READS_IN_FLIGHT",
          default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_reads_in_flight: u32,
    /// Rooms one socket may be in at once (room:join beyond it answers validation_failed).
    #[arg(long, env = "CHATMESH_MAX_ROOMS_PER_SOCKET", value_name = "CHATMESH_MAX_ROOMS_PER_SOCKET",
          default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_rooms_per_socket: u32,
    /// Room creations, room changes, invitations and leaves per user per minute (burst the same).
    #[arg(long, env = "CHATMESH_ROOM_CHANGE_RATE_PER_MIN", value_name = "CHATMESH_ROOM_CHANGE_RATE_PER_MIN",
          default_value_t = 60, value_parser = clap::value_parser!(u32).range(1..))]
    pub room_change_rate_per_min: u32,
    /// `typing` events per user per second, sustained (bursts up to 10x).
    #[arg(long, env = "CHATMESH_TYPING_RATE_PER_SEC", value_name = "CHATMESH_TYPING_RATE_PER_SEC", default_value_t = 5,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub typing_rate_per_sec: u32,
    /// Request body limit for REST and Socket.IO packets.
    #[arg(long, env = "CHATMESH_MAX_BODY_BYTES", value_name = "CHATMESH_MAX_BODY_BYTES", default_value_t = 65536,
          value_parser = clap::value_parser!(u32).range(1024..=16_777_216))]
    pub max_body_bytes: u32,
    /// Lifetime of user tokens in seconds.
    #[arg(long, env = "CHATMESH_TOKEN_TTL_SECS", value_name = "CHATMESH_TOKEN_TTL_SECS", default_value_t = 86_400,
          value_parser = clap::value_parser!(u64).range(60..=31_536_000))]
    pub token_ttl_secs: u64,
    /// On SIGTERM, how long readiness reports 503 before the listener closes (lets a balancer move traffic).
    #[arg(long, env = "CHATMESH_DRAIN_DELAY_MS", value_name = "CHATMESH_DRAIN_DELAY_MS", default_value_t = 1000)]
    pub drain_delay_ms: u64,
    /// On SIGTERM, the longest wait for in-flight work before exiting.
    #[arg(
        long,
        env = "CHATMESH_SHUTDOWN_TIMEOUT_MS",
        value_name = "CHATMESH_SHUTDOWN_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    pub shutdown_timeout_ms: u64,
    /// Engine.IO heartbeat: the server pings each socket this often.
    #[arg(long, env = "CHATMESH_PING_INTERVAL_MS", value_name = "CHATMESH_PING_INTERVAL_MS", default_value_t = 25_000,
          value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    pub ping_interval_ms: u64,
    /// Engine.IO heartbeat: a socket that has not answered a ping within this long is closed.
    #[arg(long, env = "CHATMESH_PING_TIMEOUT_MS", value_name = "CHATMESH_PING_TIMEOUT_MS", default_value_t = 20_000,
          value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    pub ping_timeout_ms: u64,
    /// PEM certificate chain for TLS on the client listener (with CHATMESH_TLS_KEY_FILE; both or
    /// neither). Re-read on SIGHUP.
    #[arg(long, env = "CHATMESH_TLS_CERT_FILE", value_name = "CHATMESH_TLS_CERT_FILE")]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of CHATMESH_TLS_CERT_FILE. Re-read on SIGHUP.
    #[arg(long, env = "CHATMESH_TLS_KEY_FILE", value_name = "CHATMESH_TLS_KEY_FILE")]
    pub tls_key_file: Option<PathBuf>,
    /// How long a client may take over the TLS handshake before the connection is closed.
    #[arg(long, env = "CHATMESH_TLS_HANDSHAKE_TIMEOUT_MS", value_name = "CHATMESH_TLS_HANDSHAKE_TIMEOUT_MS",
          default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(100..=600_000))]
    pub tls_handshake_timeout_ms: u64,
    /// How long a client may take to send a request line and headers; also how long an idle
    /// keep-alive connection stays open waiting for its next request.
    #[arg(long, env = "CHATMESH_HTTP_HEADER_TIMEOUT_MS", value_name = "CHATMESH_HTTP_HEADER_TIMEOUT_MS",
          default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(100..=600_000))]
    pub http_header_timeout_ms: u64,
    /// How long a client may take to send a request body, counted from the end of its headers.
    #[arg(long, env = "CHATMESH_HTTP_BODY_TIMEOUT_MS", value_name = "CHATMESH_HTTP_BODY_TIMEOUT_MS",
          default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(100..=600_000))]
    pub http_body_timeout_ms: u64,
    /// TCP connections open at once on the client listener; past it a new one is closed at once.
    #[arg(long, env = "CHATMESH_MAX_CONNECTIONS", value_name = "CHATMESH_MAX_CONNECTIONS",
          default_value_t = 200_000, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub max_connections: u32,
    /// TCP connections open at once from one peer address; past it a new one is closed at once.
    /// Not applied with CHATMESH_TRUST_PROXY=true (every peer is then a balancer).
    #[arg(long, env = "CHATMESH_MAX_CONNECTIONS_PER_IP", value_name = "CHATMESH_MAX_CONNECTIONS_PER_IP",
          default_value_t = 2048, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub max_connections_per_ip: u32,
    /// Take the client IP for rate limits from the first X-Forwarded-For address (behind HAProxy).
    #[arg(long, env = "CHATMESH_TRUST_PROXY", value_name = "CHATMESH_TRUST_PROXY", default_value_t = false,
          action = clap::ArgAction::Set)]
    pub trust_proxy: bool,
    /// Cluster mode: when a send is acknowledged — `leader` (the Redis primary ran it) or
    /// `replica` (WAIT 1: a replica has it too; survives losing the primary) or `region` (also
    /// in another region's Redis; survives losing the home region).
    #[arg(long, env = "CHATMESH_ACK_LEVEL", value_name = "CHATMESH_ACK_LEVEL", default_value = "leader")]
    pub ack_level: AckLevel,
    /// Cluster mode: the other regions and where their internal API answers, as
    /// `b=https://lb-b.internal:5443,c=...`; unset means a single region.
    #[arg(long, env = "CHATMESH_PEER_REGIONS", value_name = "CHATMESH_PEER_REGIONS")]
    pub peer_regions: Option<String>,
    /// Regions: how long a request forwarded to a room's home region may take before the answer
    /// is `unavailable` (also the bound on a send at ack level `region`).
    #[arg(long, env = "CHATMESH_REGION_TIMEOUT_MS", value_name = "CHATMESH_REGION_TIMEOUT_MS",
          default_value_t = 2000, value_parser = clap::value_parser!(u64).range(50..=60_000))]
    pub region_timeout_ms: u64,
    /// Regions: PEM file of the CA that signs the peer regions' internal certificates (https
    /// peers), instead of the OS trust store.
    #[arg(long, env = "CHATMESH_REGION_CA_FILE", value_name = "CHATMESH_REGION_CA_FILE")]
    pub region_ca_file: Option<PathBuf>,
    /// Regions: outbox entries kept per shard for the peer regions to pull (a peer away longer
    /// than that fills the rooms' gaps from their home's history instead).
    #[arg(long, env = "CHATMESH_REGION_OUTBOX_LEN", value_name = "CHATMESH_REGION_OUTBOX_LEN",
          default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(100..=10_000_000))]
    pub region_outbox_len: u64,
    /// Regions: how far ahead of this instance's clock a peer's hybrid-logical-clock timestamp
    /// may be before the change is refused (and counted).
    #[arg(long, env = "CHATMESH_HLC_MAX_AHEAD_MS", value_name = "CHATMESH_HLC_MAX_AHEAD_MS",
          default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    pub hlc_max_ahead_ms: u64,
    /// Regions: how long a region's lease on deciding its rooms lasts (renewed every quarter of
    /// it by its instances); another region may take the rooms over only once it expired.
    #[arg(long, env = "CHATMESH_HOME_LEASE_MS", value_name = "CHATMESH_HOME_LEASE_MS",
          default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1_000..=600_000))]
    pub home_lease_ms: u64,
    /// Regions: how much earlier than its lease's expiry an instance stops deciding under it, and
    /// how much longer than the expiry a takeover waits (clocks and their rates differ).
    #[arg(long, env = "CHATMESH_LEASE_DRIFT_MS", value_name = "CHATMESH_LEASE_DRIFT_MS",
          default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(0..=60_000))]
    pub lease_drift_ms: u64,
    /// Regions: automatic takeover. A region's home lease not renewed for this long (and expired
    /// past the drift margin) is taken over by this region; 0 (the default) leaves takeovers to
    /// the operator (`chatmesh region takeover`).
    #[arg(long, env = "CHATMESH_TAKEOVER_AFTER_MS", value_name = "CHATMESH_TAKEOVER_AFTER_MS",
          default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=3_600_000))]
    pub takeover_after_ms: u64,
    /// Cluster mode: how often the retention job (one instance per region at a time) trims every
    /// room's recent history in Redis below what the store holds.
    #[arg(long, env = "CHATMESH_RETENTION_EVERY_MS", value_name = "CHATMESH_RETENTION_EVERY_MS",
          default_value_t = 60_000, value_parser = clap::value_parser!(u64).range(1_000..=86_400_000))]
    pub retention_every_ms: u64,
    /// Cluster mode: prefix of every Redis key and channel (several clusters can share a Redis).
    #[arg(long, env = "CHATMESH_REDIS_PREFIX", value_name = "CHATMESH_REDIS_PREFIX", default_value = "cm")]
    pub redis_prefix: String,
    /// Cluster mode: shards rooms are spread over; fixed for the life of the cluster.
    #[arg(long, env = "CHATMESH_SHARDS", value_name = "CHATMESH_SHARDS", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..=16384))]
    pub shards: u32,
    /// Cluster mode: how long an accepted client_msg_id is remembered (at least 24 h).
    #[arg(long, env = "CHATMESH_DEDUPE_TTL_HOURS", value_name = "CHATMESH_DEDUPE_TTL_HOURS", default_value_t = 24,
          value_parser = clap::value_parser!(u64).range(24..=8760))]
    pub dedupe_ttl_hours: u64,
    /// Cluster mode: write-back entries per shard past which sends answer `unavailable`.
    #[arg(long, env = "CHATMESH_SYNC_BACKLOG_LIMIT", value_name = "CHATMESH_SYNC_BACKLOG_LIMIT", default_value_t = 200_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub sync_backlog_limit: u64,
    /// Cluster mode: write-back entries idle this long on a consumer are taken over by another.
    #[arg(long, env = "CHATMESH_SYNC_CLAIM_IDLE_MS", value_name = "CHATMESH_SYNC_CLAIM_IDLE_MS", default_value_t = 15_000,
          value_parser = clap::value_parser!(u64).range(100..))]
    pub sync_claim_idle_ms: u64,
    /// Cluster mode: after a write-back batch that was not full, how long the worker lets entries
    /// gather before the next read (fewer, larger store transactions at moderate rates; adds at
    /// most this much to the write-back lag). 0: read again at once.
    #[arg(long, env = "CHATMESH_SYNC_LINGER_MS", value_name = "CHATMESH_SYNC_LINGER_MS", default_value_t = 20,
          value_parser = clap::value_parser!(u64).range(0..=1000))]
    pub sync_linger_ms: u64,
    /// Cluster mode: whether this instance runs a write-back worker (at least one instance must;
    /// every instance does by default, and they share the work).
    #[arg(long, env = "CHATMESH_SYNC_WORKER", value_name = "CHATMESH_SYNC_WORKER", default_value_t = true,
          action = clap::ArgAction::Set)]
    pub sync_worker: bool,
}

/// How far a send's acknowledgement waits (cluster mode).
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckLevel {
    /// The Redis primary ran the send script (lost if the primary dies before replicating).
    Leader,
    /// At least one replica has it too (`WAIT 1`): survives the loss of the primary.
    Replica,
    /// As `replica`, and another region's Redis holds it too: survives the loss of the region.
    Region,
}

impl AckLevel {
    /// Whether a replica of the Redis primary must hold a send before its ack.
    pub fn waits_for_replica(self) -> bool {
        matches!(self, Self::Replica | Self::Region)
    }
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

    /// A key for one purpose, derived from this secret (HMAC-SHA256 of the purpose's label): the
    /// secret itself signs nothing, and what one derived key signs passes for nothing signed with
    /// another.
    pub fn derive(&self, label: &[u8]) -> [u8; 32] {
        use hmac::{KeyInit, Mac};
        let mut mac = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(self.0.as_bytes())
            .expect("HMAC takes a key of any length");
        mac.update(label);
        mac.finalize().into_bytes().into()
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
    Postgres { url: String },
    Mongo { url: String },
}

impl StoreUrl {
    pub fn parse(url: &str) -> Result<Self, String> {
        if let Some(rest) = url.strip_prefix("sqlite://") {
            let path = rest.split('?').next().unwrap_or_default();
            if path.is_empty() {
                return Err("sqlite:// needs a file path, e.g. sqlite://./data/chatmesh.db".into());
            }
            return Ok(Self::Sqlite { path: PathBuf::from(path) });
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(Self::Postgres { url: url.to_string() });
        }
        if url.starts_with("mongodb://") || url.starts_with("mongodb+srv://") {
            return Ok(Self::Mongo { url: url.to_string() });
        }
        Err("expected sqlite://PATH, postgres://... or mongodb://...".into())
    }

    /// Directory that holds the store and, in embedded mode, the generated JWT secret.
    pub fn data_dir(&self) -> PathBuf {
        match self {
            Self::Sqlite { path } => {
                path.parent().map(PathBuf::from).filter(|p| !p.as_os_str().is_empty()).unwrap_or_else(|| ".".into())
            }
            Self::Postgres { .. } | Self::Mongo { .. } => PathBuf::from("./data"),
        }
    }
}

/// The validated configuration of `chatmesh serve`.
#[derive(Debug, Clone)]
pub struct Config {
    pub bind: SocketAddr,
    /// Origins allowed cross-origin (exact `scheme://host[:port]`, lower-case).
    pub cors_origins: Vec<String>,
    pub instance_id: Option<String>,
    pub region: String,
    pub store: StoreUrl,
    pub jwt_secret: Option<Secret>,
    pub admin_token: Option<Secret>,
    /// CHATMESH_INTERNAL_ALLOW: who may call the instance-to-instance endpoints.
    pub internal_allow: Vec<ipnet::IpNet>,
    pub log_format: LogFormat,
    pub auth_rate_per_min: u32,
    pub login_failures_per_min: u32,
    pub password_hash_queue: usize,
    pub send_rate_per_sec: u32,
    pub read_rate_per_sec: u32,
    pub typing_rate_per_sec: u32,
    pub room_change_rate_per_min: u32,
    pub max_sockets_per_user: usize,
    pub max_rooms_per_socket: usize,
    pub max_sessions: usize,
    pub max_sessions_per_ip: usize,
    pub max_events_in_flight: usize,
    pub max_reads_in_flight: usize,
    pub connect_timeout: Duration,
    pub socket_buffer_bytes: usize,
    pub write_timeout: Duration,
    pub max_body_bytes: usize,
    pub token_ttl: Duration,
    pub drain_delay: Duration,
    pub shutdown_timeout: Duration,
    pub ping_interval: Duration,
    pub ping_timeout: Duration,
    pub trust_proxy: bool,
    /// TLS on the client listener, when both files are set.
    pub tls: Option<TlsFiles>,
    pub listener: ListenerLimits,
    /// Present in cluster mode (CHATMESH_REDIS_URL set).
    pub cluster: Option<ClusterConfig>,
}

/// The certificate chain and key the client listener serves (read at start and on SIGHUP).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// What one client may hold of the client listener (see [`crate::listener`]).
#[derive(Debug, Clone)]
pub struct ListenerLimits {
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub tls_handshake_timeout: Duration,
    pub max_connections: usize,
    /// None behind a trusted balancer: every peer is then a balancer, not a client.
    pub max_connections_per_ip: Option<usize>,
}

#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub redis: crate::redis_io::RedisConfig,
    pub prefix: String,
    pub shards: u32,
    pub ack_level: AckLevel,
    pub dedupe_ttl: Duration,
    pub backlog_limit: u64,
    pub claim_idle: Duration,
    pub sync_linger: Duration,
    pub sync_worker: bool,
    /// CHATMESH_CLUSTER_SECRET: the root of the keys instances trust each other by (pub/sub seals).
    pub secret: Secret,
    /// The other regions (empty: a single region).
    pub peers: Vec<PeerRegion>,
    pub region_timeout: Duration,
    pub region_ca_file: Option<PathBuf>,
    pub region_outbox_len: u64,
    pub hlc_max_ahead: Duration,
    /// How often the retention job runs (CHATMESH_RETENTION_EVERY_MS).
    pub retention_every: Duration,
    /// The home leases (CHATMESH_HOME_LEASE_MS, CHATMESH_LEASE_DRIFT_MS).
    pub leases: crate::region::homes::LeaseTiming,
}

/// Another region: its name and the base URL of its internal API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerRegion {
    pub name: String,
    pub url: String,
}

/// A region name: what `CHATMESH_REGION` and `home_region` hold.
pub fn valid_region_name(name: &str) -> bool {
    (1..=64).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Parses `CHATMESH_PEER_REGIONS` (`b=https://host:port,c=...`).
pub fn parse_peers(value: &str, own: &str) -> Result<Vec<PeerRegion>, String> {
    let mut peers: Vec<PeerRegion> = Vec::new();
    for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (name, url) = item.split_once('=').ok_or_else(|| format!("`{item}` is not region=URL"))?;
        let (name, url) = (name.trim(), url.trim().trim_end_matches('/'));
        if !valid_region_name(name) {
            return Err(format!("`{name}` is not a region name (1..=64 of a-z, 0-9, - and _)"));
        }
        if name == own {
            return Err(format!("`{name}` is this instance's own region (CHATMESH_REGION)"));
        }
        if peers.iter().any(|p| p.name == name) {
            return Err(format!("region `{name}` is listed twice"));
        }
        let parsed = url::Url::parse(url).map_err(|e| format!("`{url}`: {e}"))?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
            return Err(format!("`{url}` must be an http:// or https:// URL with a host"));
        }
        peers.push(PeerRegion { name: name.to_string(), url: url.to_string() });
    }
    if peers.is_empty() {
        return Err("lists no region".into());
    }
    Ok(peers)
}

/// A setting that cannot be used; `Display` is the one line printed before exiting.
#[derive(Debug, thiserror::Error)]
#[error("invalid setting {name}: {reason}")]
pub struct ConfigError {
    pub name: String,
    pub reason: String,
}

/// `https://a.example, http://localhost:3000` as origins browsers send them: a scheme, a host,
/// perhaps a port, nothing else.
fn parse_origins(list: &str) -> Result<Vec<String>, String> {
    list.split(',')
        .map(str::trim)
        .filter(|o| !o.is_empty())
        .map(|o| {
            let rest = o.strip_prefix("https://").or_else(|| o.strip_prefix("http://"));
            match rest {
                Some(host) if !host.is_empty() && !host.contains(['/', '?', '#', '@', ' ']) && o != "*" => {
                    Ok(o.to_ascii_lowercase())
                }
                _ => Err(format!("{o:?} is not an origin (scheme://host[:port], no path, no wildcard)")),
            }
        })
        .collect()
}

/// The Redis URL with the settings beside it (CA file, Sentinel credentials).
fn redis_config(args: &ServeArgs, url: &str) -> Result<crate::redis_io::RedisConfig, ConfigError> {
    use crate::redis_io::{RedisConfig, RedisUrl};
    let mut url = RedisUrl::parse(url).map_err(|r| invalid("CHATMESH_REDIS_URL", r))?;
    let sentinel_auth = args.redis_sentinel_username.is_some() || args.redis_sentinel_password.is_some();
    match &mut url {
        RedisUrl::Sentinel(s) => {
            s.sentinel_username = args.redis_sentinel_username.clone();
            s.sentinel_password = args.redis_sentinel_password.clone();
        }
        RedisUrl::Direct(_) if sentinel_auth => {
            return Err(invalid(
                "CHATMESH_REDIS_SENTINEL_PASSWORD",
                "only for a redis+sentinel:// or rediss+sentinel:// CHATMESH_REDIS_URL",
            ));
        }
        RedisUrl::Direct(_) => {}
    }
    let config = RedisConfig { url, ca_file: args.redis_ca_file.clone() };
    config.validate().map_err(|r| invalid("CHATMESH_REDIS_CA_FILE", r))?;
    Ok(config)
}

fn invalid(name: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError { name: name.into(), reason: reason.into() }
}

impl Config {
    pub fn from_args(args: ServeArgs, stdout_is_terminal: bool) -> Result<Self, ConfigError> {
        let store = StoreUrl::parse(&args.store.store_url).map_err(|r| invalid("CHATMESH_STORE_URL", r))?;
        let cluster = match &args.redis_url {
            None => None,
            Some(url) => {
                let redis = redis_config(&args, url)?;
                if matches!(store, StoreUrl::Sqlite { .. }) {
                    return Err(invalid(
                        "CHATMESH_STORE_URL",
                        "cluster mode needs a shared store (postgres:// or mongodb://); a SQLite file cannot be shared by instances on different machines",
                    ));
                }
                if args.jwt_secret.is_none() {
                    return Err(invalid(
                        "CHATMESH_JWT_SECRET",
                        "required in cluster mode (the same on every instance)",
                    ));
                }
                let secret = match &args.cluster_secret {
                    None => return Err(invalid("CHATMESH_CLUSTER_SECRET", "required in cluster mode")),
                    Some(s) if s.len() < 32 => {
                        return Err(invalid("CHATMESH_CLUSTER_SECRET", "must be at least 32 bytes"));
                    }
                    Some(s) => Secret::new(s.clone()),
                };
                if args.redis_prefix.is_empty() || args.redis_prefix.contains(['{', '}', ' ']) {
                    return Err(invalid("CHATMESH_REDIS_PREFIX", "must be non-empty, without braces or spaces"));
                }
                let peers = match &args.peer_regions {
                    None => Vec::new(),
                    Some(v) => parse_peers(v, &args.region).map_err(|r| invalid("CHATMESH_PEER_REGIONS", r))?,
                };
                if args.lease_drift_ms * 2 >= args.home_lease_ms {
                    return Err(invalid(
                        "CHATMESH_LEASE_DRIFT_MS",
                        "must be less than half of CHATMESH_HOME_LEASE_MS (an instance would never decide under its lease)",
                    ));
                }
                if args.takeover_after_ms > 0 && args.takeover_after_ms < args.home_lease_ms {
                    return Err(invalid(
                        "CHATMESH_TAKEOVER_AFTER_MS",
                        "must be 0 (off) or at least CHATMESH_HOME_LEASE_MS (a lease is only taken over once it expired)",
                    ));
                }
                if args.ack_level == AckLevel::Region && peers.is_empty() {
                    return Err(invalid("CHATMESH_ACK_LEVEL", "`region` needs CHATMESH_PEER_REGIONS"));
                }
                Some(ClusterConfig {
                    redis,
                    prefix: args.redis_prefix.clone(),
                    shards: args.shards,
                    ack_level: args.ack_level,
                    dedupe_ttl: Duration::from_secs(args.dedupe_ttl_hours * 3600),
                    backlog_limit: args.sync_backlog_limit,
                    claim_idle: Duration::from_millis(args.sync_claim_idle_ms),
                    sync_linger: Duration::from_millis(args.sync_linger_ms),
                    sync_worker: args.sync_worker,
                    secret,
                    peers,
                    region_timeout: Duration::from_millis(args.region_timeout_ms),
                    region_ca_file: args.region_ca_file.clone(),
                    region_outbox_len: args.region_outbox_len,
                    hlc_max_ahead: Duration::from_millis(args.hlc_max_ahead_ms),
                    retention_every: Duration::from_millis(args.retention_every_ms),
                    leases: crate::region::homes::LeaseTiming {
                        ttl: Duration::from_millis(args.home_lease_ms),
                        margin: Duration::from_millis(args.lease_drift_ms),
                        takeover_after: (args.takeover_after_ms > 0)
                            .then(|| Duration::from_millis(args.takeover_after_ms)),
                    },
                })
            }
        };
        if !valid_region_name(&args.region) {
            return Err(invalid("CHATMESH_REGION", "must be 1..=64 of a-z, A-Z, 0-9, - and _"));
        }
        if args.redis_url.is_none() && args.peer_regions.is_some() {
            return Err(invalid("CHATMESH_PEER_REGIONS", "needs cluster mode (CHATMESH_REDIS_URL)"));
        }
        if let Some(id) = &args.instance_id
            && (id.is_empty() || id.len() > 128)
        {
            return Err(invalid("CHATMESH_INSTANCE_ID", "must be 1..=128 characters"));
        }
        let tls = match (args.tls_cert_file, args.tls_key_file) {
            (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
            (None, None) => None,
            (Some(_), None) => {
                return Err(invalid("CHATMESH_TLS_KEY_FILE", "required when CHATMESH_TLS_CERT_FILE is set"));
            }
            (None, Some(_)) => {
                return Err(invalid("CHATMESH_TLS_CERT_FILE", "required when CHATMESH_TLS_KEY_FILE is set"));
            }
        };
        let non_empty = |name: &str, v: Option<String>, min: usize| -> Result<Option<Secret>, ConfigError> {
            match v {
                Some(s) if s.len() < min => Err(invalid(name, format!("must be at least {min} bytes"))),
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
            admin_token: non_empty("CHATMESH_ADMIN_TOKEN", args.admin_token, 16)?,
            internal_allow: args.internal_allow,
            log_format: args.log_format.unwrap_or(if stdout_is_terminal { LogFormat::Pretty } else { LogFormat::Json }),
            auth_rate_per_min: args.auth_rate_per_min,
            login_failures_per_min: args.login_failures_per_min,
            password_hash_queue: args.password_hash_queue as usize,
            send_rate_per_sec: args.send_rate_per_sec,
            read_rate_per_sec: args.read_rate_per_sec,
            typing_rate_per_sec: args.typing_rate_per_sec,
            room_change_rate_per_min: args.room_change_rate_per_min,
            max_sockets_per_user: args.max_sockets_per_user as usize,
            max_sessions: args.max_sessions as usize,
            max_events_in_flight: args.max_events_in_flight as usize,
            max_reads_in_flight: args.max_reads_in_flight as usize,
            max_sessions_per_ip: args.max_sessions_per_ip as usize,
            connect_timeout: Duration::from_millis(args.connect_timeout_ms),
            socket_buffer_bytes: args.socket_buffer_bytes as usize,
            write_timeout: Duration::from_millis(args.write_timeout_ms),
            max_rooms_per_socket: args.max_rooms_per_socket as usize,
            max_body_bytes: args.max_body_bytes as usize,
            token_ttl: Duration::from_secs(args.token_ttl_secs),
            drain_delay: Duration::from_millis(args.drain_delay_ms),
            shutdown_timeout: Duration::from_millis(args.shutdown_timeout_ms),
            ping_interval: Duration::from_millis(args.ping_interval_ms),
            ping_timeout: Duration::from_millis(args.ping_timeout_ms),
            trust_proxy: args.trust_proxy,
            tls,
            listener: ListenerLimits {
                header_timeout: Duration::from_millis(args.http_header_timeout_ms),
                body_timeout: Duration::from_millis(args.http_body_timeout_ms),
                tls_handshake_timeout: Duration::from_millis(args.tls_handshake_timeout_ms),
                max_connections: args.max_connections as usize,
                max_connections_per_ip: (!args.trust_proxy).then_some(args.max_connections_per_ip as usize),
            },
            cors_origins: parse_origins(&args.cors_origins).map_err(|r| invalid("CHATMESH_CORS_ORIGINS", r))?,
            cluster,
        })
    }
}

/// The environment variables this build understands: every `env = ...` of every subcommand's
/// flags, read from the clap definitions so that a new setting cannot be forgotten here.
pub fn known_env() -> Vec<String> {
    use clap::CommandFactory;
    let cli = Cli::command();
    let mut names: Vec<String> = cli
        .get_subcommands()
        .chain(std::iter::once(&cli))
        .flat_map(|c| c.get_arguments())
        .filter_map(|a| a.get_env().and_then(|e| e.to_str()).map(str::to_string))
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Rejects `CHATMESH_*` variables this build does not know (a typo must not be silently ignored).
pub fn check_unknown_env(vars: impl Iterator<Item = String>) -> Result<(), ConfigError> {
    let known = known_env();
    for name in vars {
        if name.starts_with("CHATMESH_")
            && !known.contains(&name)
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
        let err =
            check_unknown_env(["CHATMESH_BIND".to_string(), "CHATMESH_BINDD".to_string()].into_iter()).unwrap_err();
        assert_eq!(err.to_string(), "invalid setting CHATMESH_BINDD: unknown setting");
        assert!(check_unknown_env(["CHATMESH_TEST_MONGODB_URL".to_string()].into_iter()).is_ok());
    }

    #[test]
    fn known_env_comes_from_every_subcommand() {
        let known = known_env();
        for name in ["CHATMESH_BIND", "CHATMESH_STORE_URL", "CHATMESH_SYNC_WORKER", "CHATMESH_ACK_LEVEL"] {
            assert!(known.contains(&name.to_string()), "{name} missing from {known:?}");
        }
        assert!(known.iter().all(|n| n.starts_with("CHATMESH_")), "{known:?}");
    }

    #[test]
    fn origins_are_exact() {
        assert_eq!(
            parse_origins(" https://App.example.com, http://localhost:3000 ,").unwrap(),
            vec!["https://app.example.com", "http://localhost:3000"]
        );
        assert_eq!(parse_origins("").unwrap(), Vec::<String>::new());
        for bad in ["*", "app.example.com", "https://a.example/path", "ftp://x", "https://"] {
            assert!(parse_origins(bad).is_err(), "{bad}");
        }
    }

    /// `serve` with two regions and `extra` flags, as the binary parses them.
    fn regions_config(extra: &[&str]) -> Result<Config, String> {
        use clap::{Args, FromArgMatches};
        let base = [
            "chatmesh",
            "--redis-url",
            "redis://127.0.0.1:6379",
            "--cluster-secret",
            "0123456789abcdef0123456789abcdef",
            "--region",
            "a",
            "--peer-regions",
            "b=http://127.0.0.1:1",
            "--store-url",
            "postgres://u@127.0.0.1/db",
            "--jwt-secret",
            "0123456789abcdef0123456789abcdef",
        ];
        let m = ServeArgs::augment_args(clap::Command::new("chatmesh"))
            .try_get_matches_from(base.iter().chain(extra))
            .map_err(|e| e.to_string())?;
        let args = ServeArgs::from_arg_matches(&m).map_err(|e| e.to_string())?;
        Config::from_args(args, false).map_err(|e| e.to_string())
    }

    #[test]
    fn automatic_takeover_is_off_by_default_and_never_before_the_lease_expired() {
        let after = |c: Config| c.cluster.map(|c| c.leases.takeover_after);
        assert_eq!(after(regions_config(&[]).unwrap()), Some(None), "off by default");
        assert_eq!(after(regions_config(&["--takeover-after-ms", "0"]).unwrap()), Some(None));
        let at_edge = regions_config(&["--home-lease-ms", "10000", "--takeover-after-ms", "10000"]).unwrap();
        assert_eq!(after(at_edge), Some(Some(Duration::from_secs(10))));
        let early = regions_config(&["--home-lease-ms", "10000", "--takeover-after-ms", "9999"]).unwrap_err();
        assert!(early.contains("CHATMESH_TAKEOVER_AFTER_MS"), "{early}");
        assert!(regions_config(&["--takeover-after-ms", "3600000", "--home-lease-ms", "600000"]).is_ok());
        assert!(regions_config(&["--takeover-after-ms", "3600001"]).is_err(), "beyond an hour");
    }

    #[test]
    fn store_url_forms() {
        assert_eq!(StoreUrl::parse("sqlite://./data/x.db").unwrap(), StoreUrl::Sqlite { path: "./data/x.db".into() });
        assert_eq!(StoreUrl::parse("sqlite://x.db").unwrap().data_dir(), PathBuf::from("."));
        assert!(StoreUrl::parse("sqlite://").is_err());
        assert_eq!(
            StoreUrl::parse("postgres://u@h/db").unwrap(),
            StoreUrl::Postgres { url: "postgres://u@h/db".into() }
        );
        assert!(StoreUrl::parse("mysql://x").is_err());
    }
}
