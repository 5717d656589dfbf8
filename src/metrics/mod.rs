//! Prometheus metrics (DESIGN.md §7). Names live here so every call site uses the same ones;
//! docs/metrics.md documents each (a test checks the two agree).

pub mod process;

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const MESSAGES_ACCEPTED: &str = "chatmesh_messages_accepted_total";
pub const MESSAGES_DELIVERED: &str = "chatmesh_messages_delivered_total";
pub const MESSAGES_DROPPED_SLOW: &str = "chatmesh_slow_consumers_disconnected_total";
pub const SEND_LATENCY: &str = "chatmesh_send_latency_seconds";
pub const DELIVERY_LATENCY: &str = "chatmesh_delivery_latency_seconds";
pub const COMMIT_BATCH_SIZE: &str = "chatmesh_commit_batch_size";
pub const COMMIT_SECONDS: &str = "chatmesh_commit_seconds";
pub const CONNECTIONS: &str = "chatmesh_connections";
pub const HTTP_REQUESTS: &str = "chatmesh_http_requests_total";
pub const DEPENDENCY_UP: &str = "chatmesh_dependency_up";
pub const RATE_LIMITED: &str = "chatmesh_rate_limited_total";
pub const FORGED_EVENTS: &str = "chatmesh_forged_events_total";
pub const CIRCUIT_OPEN: &str = "chatmesh_circuit_open";
pub const SYNC_PENDING: &str = "chatmesh_sync_pending";
pub const SYNC_LAG: &str = "chatmesh_sync_lag_seconds";
pub const SYNC_ERRORS: &str = "chatmesh_sync_errors_total";
pub const SYNC_STORED: &str = "chatmesh_sync_stored_total";
pub const SYNC_DEAD_LETTERED: &str = "chatmesh_sync_dead_lettered_total";
pub const READY: &str = "chatmesh_ready";
pub const DEPENDENCY_LATENCY: &str = "chatmesh_dependency_latency_seconds";
pub const SOCKET_EVENTS: &str = "chatmesh_socket_events_total";
pub const REDIS_REPLICAS: &str = "chatmesh_redis_connected_replicas";
pub const REDIS_REPLICATION_LAG: &str = "chatmesh_redis_replication_lag_seconds";
pub const REDIS_AOF_ENABLED: &str = "chatmesh_redis_aof_enabled";
/// Multi-region: how far behind a peer region's outbox this region's copy is, per peer.
pub const REPLICATION_LAG: &str = "chatmesh_replication_lag_seconds";
/// Multi-region: entries of a peer's outbox applied here, by peer and kind (message, event).
pub const REPLICATION_APPLIED: &str = "chatmesh_replication_applied_total";
/// Multi-region: replication failures, by peer and reason.
pub const REPLICATION_ERRORS: &str = "chatmesh_replication_errors_total";
/// Multi-region: requests forwarded to a room's home region, by peer, operation and outcome.
pub const REGION_FORWARDED: &str = "chatmesh_region_forwarded_total";
/// Multi-region: latency of requests forwarded to a room's home region, by peer and operation.
pub const REGION_FORWARD_LATENCY: &str = "chatmesh_region_forward_latency_seconds";
/// Multi-region: changes refused because their clock was too far ahead of ours, by peer.
pub const HLC_REFUSED: &str = "chatmesh_hlc_refused_total";
/// Multi-region: the fencing token of each home lease this region holds, by lease name.
pub const LEASE_TOKEN: &str = "chatmesh_lease_token";
/// Multi-region: 1 while this instance decides under the lease (renewed within its validity).
pub const LEASE_HELD: &str = "chatmesh_lease_held";
/// Multi-region: seconds since this instance last renewed the lease.
pub const LEASE_RENEWED_AGE: &str = "chatmesh_lease_renewed_age_seconds";
/// Multi-region: sends refused because the home lease lapsed before they were sequenced.
pub const SENDS_LAPSED: &str = "chatmesh_sends_lapsed_total";
/// Multi-region: messages of an older epoch refused after a takeover, by who refused them.
pub const FENCED_REFUSED: &str = "chatmesh_fenced_refused_total";
/// Multi-region: messages acknowledged at ack level `region` with no other region to hold them.
pub const REGION_ACKS_DEGRADED: &str = "chatmesh_region_acks_degraded_total";
/// Multi-region: takeovers this instance made, by home region and how (command or automatic).
pub const TAKEOVERS: &str = "chatmesh_takeovers_total";
pub const BUILD_INFO: &str = "chatmesh_build_info";
pub const TLS_RELOADS: &str = "chatmesh_tls_reloads_total";
pub const HTTP_TIMEOUTS: &str = "chatmesh_http_timeouts_total";

pub const PROCESS_CPU: &str = "process_cpu_seconds_total";
pub const PROCESS_RSS: &str = "process_resident_memory_bytes";
pub const PROCESS_VSZ: &str = "process_virtual_memory_bytes";
pub const PROCESS_OPEN_FDS: &str = "process_open_fds";
pub const PROCESS_MAX_FDS: &str = "process_max_fds";
pub const PROCESS_THREADS: &str = "process_threads";
pub const PROCESS_START: &str = "process_start_time_seconds";

/// Every metric name this binary exports (docs/metrics.md documents exactly these).
pub const ALL: &[&str] = &[
    MESSAGES_ACCEPTED,
    MESSAGES_DELIVERED,
    MESSAGES_DROPPED_SLOW,
    SEND_LATENCY,
    DELIVERY_LATENCY,
    COMMIT_BATCH_SIZE,
    COMMIT_SECONDS,
    CONNECTIONS,
    HTTP_REQUESTS,
    DEPENDENCY_UP,
    RATE_LIMITED,
    FORGED_EVENTS,
    CIRCUIT_OPEN,
    SYNC_PENDING,
    SYNC_LAG,
    SYNC_ERRORS,
    SYNC_STORED,
    SYNC_DEAD_LETTERED,
    READY,
    DEPENDENCY_LATENCY,
    SOCKET_EVENTS,
    REDIS_REPLICAS,
    REDIS_REPLICATION_LAG,
    REDIS_AOF_ENABLED,
    REPLICATION_LAG,
    REPLICATION_APPLIED,
    REPLICATION_ERRORS,
    REGION_FORWARDED,
    REGION_FORWARD_LATENCY,
    HLC_REFUSED,
    LEASE_TOKEN,
    LEASE_HELD,
    LEASE_RENEWED_AGE,
    SENDS_LAPSED,
    FENCED_REFUSED,
    TAKEOVERS,
    REGION_ACKS_DEGRADED,
    BUILD_INFO,
    TLS_RELOADS,
    HTTP_TIMEOUTS,
    PROCESS_CPU,
    PROCESS_RSS,
    PROCESS_VSZ,
    PROCESS_OPEN_FDS,
    PROCESS_MAX_FDS,
    PROCESS_THREADS,
    PROCESS_START,
];

/// Running totals that the operations page shows per instance (the Prometheus recorder cannot be
/// read back).
pub struct Totals {
    accepted: AtomicU64,
    delivered: AtomicU64,
}

pub static TOTALS: Totals = Totals { accepted: AtomicU64::new(0), delivered: AtomicU64::new(0) };

impl Totals {
    pub fn accepted(&self, n: u64) {
        self.accepted.fetch_add(n, Ordering::Relaxed);
        metrics::counter!(MESSAGES_ACCEPTED).increment(n);
    }

    pub fn delivered(&self, n: u64) {
        self.delivered.fetch_add(n, Ordering::Relaxed);
        metrics::counter!(MESSAGES_DELIVERED).increment(n);
    }

    pub fn accepted_total(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    pub fn delivered_total(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }
}

/// Times one call to a dependency into `chatmesh_dependency_latency_seconds{dependency,operation}`.
pub fn dependency_latency(dependency: &'static str, operation: &'static str, started: std::time::Instant) {
    metrics::histogram!(DEPENDENCY_LATENCY, "dependency" => dependency, "operation" => operation)
        .record(started.elapsed().as_secs_f64());
}

/// The exposition text, with the process figures read just now. They are written directly (the
/// recorder's counters are integers; CPU seconds are not).
pub fn render(handle: &PrometheusHandle) -> String {
    use std::fmt::Write;
    let p = process::read();
    let mut out = handle.render();
    for (name, kind, help, value) in [
        (PROCESS_CPU, "counter", "User and system CPU time of this process in seconds", p.cpu_seconds),
        (PROCESS_RSS, "gauge", "Resident memory of this process in bytes", p.resident_bytes),
        (PROCESS_VSZ, "gauge", "Virtual memory of this process in bytes", p.virtual_bytes),
        (PROCESS_OPEN_FDS, "gauge", "Open file descriptors (sockets included)", p.open_fds),
        (PROCESS_MAX_FDS, "gauge", "Soft limit of open file descriptors", p.max_fds),
        (PROCESS_THREADS, "gauge", "Threads of this process", p.threads),
        (PROCESS_START, "gauge", "Start time of this process since the Unix epoch in seconds", p.start_time_seconds),
    ] {
        let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n\n");
    }
    out
}

/// Sub-millisecond to seconds: a send on loopback takes ~100 µs, a stalled store seconds.
const LATENCY_BUCKETS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the global recorder once per process and returns its handle.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(COMMIT_BATCH_SIZE.into()), BATCH_BUCKETS))
                .expect("static bucket lists are non-empty")
                .install_recorder()
                .expect("the metrics recorder is installed once per process");
            describe();
            // Series exist from the start, so dashboards and rate() see 0 rather than nothing.
            metrics::counter!(MESSAGES_ACCEPTED).increment(0);
            metrics::counter!(MESSAGES_DELIVERED).increment(0);
            metrics::gauge!(CONNECTIONS).set(0.0);
            metrics::gauge!(READY).set(0.0);
            metrics::counter!(SYNC_DEAD_LETTERED).increment(0);
            metrics::counter!(MESSAGES_DROPPED_SLOW).increment(0);
            metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            let upkeep = handle.clone();
            // Histograms are drained into their summaries by upkeep; without it memory grows.
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(5));
                loop {
                    tick.tick().await;
                    upkeep.run_upkeep();
                }
            });
            handle
        })
        .clone()
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(MESSAGES_ACCEPTED, "Messages accepted (acknowledged) by this instance");
    describe_counter!(MESSAGES_DELIVERED, "message:new events handed to local sockets");
    describe_counter!(MESSAGES_DROPPED_SLOW, "Sockets disconnected because their send buffer was full");
    describe_histogram!(SEND_LATENCY, Unit::Seconds, "Time from a send's arrival to its ack");
    describe_histogram!(DELIVERY_LATENCY, Unit::Seconds, "Time from acceptance to emit on this instance");
    describe_histogram!(COMMIT_BATCH_SIZE, "Sends per group-commit transaction");
    describe_histogram!(COMMIT_SECONDS, Unit::Seconds, "Duration of one group-commit transaction, fsync included");
    describe_gauge!(CONNECTIONS, "Connected Socket.IO sockets on this instance");
    describe_counter!(HTTP_REQUESTS, "HTTP requests by route template and status");
    describe_gauge!(DEPENDENCY_UP, "1 when the dependency answered its last check");
    describe_counter!(RATE_LIMITED, "Requests refused by a rate limit, by kind");
    describe_counter!(FORGED_EVENTS, "Pub/sub payloads dropped as unsigned, wrongly sealed or replayed, by reason");
    describe_counter!(TLS_RELOADS, "Certificate reloads on SIGHUP, by outcome (ok, error: the old one kept)");
    describe_counter!(HTTP_TIMEOUTS, "Client connections closed by a listener timeout, by kind");
    describe_gauge!(CIRCUIT_OPEN, "1 while the circuit breaker of a dependency is open or half-open");
    describe_gauge!(SYNC_PENDING, "Write-back entries not yet in the durable store (cluster mode)");
    describe_gauge!(SYNC_LAG, Unit::Seconds, "Age of the oldest write-back entry not yet in the store");
    describe_counter!(SYNC_ERRORS, "Failed sync steps, by kind (store_down, batch_refused, not_replicated)");
    describe_counter!(SYNC_STORED, "Write-back entries made durable by this instance");
    describe_counter!(SYNC_DEAD_LETTERED, "Write-back entries moved to a dead-letter stream");
    describe_gauge!(READY, "1 while this instance reports ready (the last readiness check)");
    describe_histogram!(DEPENDENCY_LATENCY, Unit::Seconds, "Duration of calls to a dependency, by operation");
    describe_counter!(SOCKET_EVENTS, "Socket.IO events answered, by event and outcome (ok or error code)");
    describe_gauge!(REDIS_REPLICAS, "Replicas connected to the Redis primary (cluster mode)");
    describe_gauge!(REDIS_REPLICATION_LAG, Unit::Seconds, "Largest lag of a Redis replica behind the primary");
    describe_gauge!(REDIS_AOF_ENABLED, "1 if the Redis primary keeps an append-only file, 0 if a restart empties it");
    describe_gauge!(REPLICATION_LAG, Unit::Seconds, "Multi-region replication lag per peer region");
    describe_gauge!(LEASE_TOKEN, "Fencing token of each home lease this region holds");
    describe_gauge!(LEASE_HELD, "1 while this instance decides the rooms under the home lease");
    describe_gauge!(LEASE_RENEWED_AGE, Unit::Seconds, "Seconds since this instance last renewed the home lease");
    describe_counter!(SENDS_LAPSED, "Sends refused because the home lease lapsed before they were sequenced");
    describe_counter!(FENCED_REFUSED, "Messages of an older epoch refused after a takeover, by who refused them");
    describe_counter!(TAKEOVERS, "Takeovers of a region's rooms made by this instance, by home region and how");
    describe_counter!(
        REGION_ACKS_DEGRADED,
        "Messages acknowledged at ack level region with no other region to hold them (every peer taken over)"
    );
    describe_gauge!(BUILD_INFO, "1, labelled with the version of this binary");
}
