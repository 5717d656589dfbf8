//! What every handler shares: the service, the settings, this instance's identity and its
//! drain state. Its own module so that `api/` and `realtime/` need nothing from the wiring in
//! [`app`](crate::app).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::task::TaskTracker;
use tokio_util::task::task_tracker::TaskTrackerToken;

use crate::cluster::InstanceRecord;
use crate::config::Config;
use crate::domain::Timestamp;
use crate::error::{ApiError, ApiResult};
use crate::ops::Ops;
use crate::presence::LocalPresence;
use crate::service::ChatService;
use crate::{metrics, realtime};

/// Equal bytes, in a time that depends on the lengths only (a token compared byte by byte with an
/// early exit tells an attacker how many leading bytes were right).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// Everything a handler may need; shared as `Arc<AppState>`.
pub struct AppState {
    pub svc: ChatService,
    pub config: Config,
    pub instance_id: String,
    /// The address actually bound (CHATMESH_BIND may say port 0).
    pub listen_addr: SocketAddr,
    pub started_at: Timestamp,
    pub metrics: PrometheusHandle,
    pub presence: LocalPresence,
    /// Set on SIGTERM: readiness turns 503 so the balancer moves traffic away.
    pub draining: AtomicBool,
    /// In-flight sends; shutdown waits for them so an acked send is never cut off.
    pub inflight: TaskTracker,
    /// Readiness and the cluster view of this mode.
    pub ops: Arc<dyn Ops>,
    /// Internal tokens (cluster mode): issued to call other instances, checked on `/internal/v1`.
    pub internal: Option<crate::internal::InternalTokens>,
    /// What other regions may ask of this one (only with peer regions).
    pub regions: Option<RegionApi>,
}

/// The pieces the `/internal/v1/regions` endpoints serve from.
pub struct RegionApi {
    pub outbox: Arc<crate::region::replicator::OutboxServer>,
    pub applier: Arc<crate::region::apply::Applier>,
    pub peers: Vec<Arc<crate::region::PeerClient>>,
    /// This region's heads of the rooms homed here, for the other regions.
    pub history: Arc<crate::history::RedisHistory>,
    /// Where the replicators note how far they are (for the cluster view).
    pub redis: crate::redis_io::Redis,
    pub keys: crate::redis_io::Keys,
}

impl AppState {
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Admits one send, REST or Socket.IO: shutdown waits for the token to drop, so an admitted
    /// send is finished and acknowledged before the process exits. Past the drain the send is
    /// answered `unavailable` at once rather than left waiting on a closing connection.
    pub fn admit_send(&self) -> ApiResult<TaskTrackerToken> {
        if self.inflight.is_closed() {
            return Err(ApiError::Unavailable("this instance is shutting down; reconnect and retry".into()));
        }
        Ok(self.inflight.token())
    }

    /// Runs the readiness checks; the answer (draining included) is also `chatmesh_ready`.
    pub async fn check_ready(&self) -> (bool, serde_json::Value) {
        let (ok, checks) = self.ops.readiness().await;
        let ready = ok && !self.is_draining();
        ::metrics::gauge!(metrics::READY).set(if ready { 1.0 } else { 0.0 });
        (ready, checks)
    }

    /// Whether a request may see the operations views (`/api/v1/cluster`, `/admin`): with
    /// `CHATMESH_ADMIN_TOKEN` set, only with it as bearer token (compared in constant time); without
    /// one, in embedded mode only (a cluster's view lists addresses and recent errors).
    pub fn admin_allowed(&self, bearer: Option<&str>) -> ApiResult<()> {
        match &self.config.admin_token {
            Some(token) if bearer.is_some_and(|b| constant_time_eq(b.as_bytes(), token.expose().as_bytes())) => Ok(()),
            Some(_) => Err(ApiError::Unauthorized("admin token required".into())),
            None if self.config.cluster.is_some() => {
                Err(ApiError::Forbidden("set CHATMESH_ADMIN_TOKEN to use the operations views in cluster mode".into()))
            }
            None => Ok(()),
        }
    }

    /// This instance as `/api/v1/cluster` and the heartbeat describe it.
    pub async fn instance_record(&self) -> InstanceRecord {
        let (ready, _) = self.check_ready().await;
        InstanceRecord {
            id: self.instance_id.clone(),
            region: self.config.region.clone(),
            address: self.listen_addr.to_string(),
            started_at: self.started_at,
            last_seen: Timestamp::now(),
            connections: realtime::connection_count(),
            ready,
            version: env!("CARGO_PKG_VERSION").to_string(),
            accepted_total: metrics::TOTALS.accepted_total(),
            delivered_total: metrics::TOTALS.delivered_total(),
            circuits: self.ops.circuits(),
            recent_errors: crate::telemetry::recent_errors(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_eq(b"admin-token", b"admin-token"));
        assert!(!constant_time_eq(b"admin-token", b"admin-tokem"));
        assert!(!constant_time_eq(b"admin-token", b"admin-toke"));
        assert!(!constant_time_eq(b"", b"x"));
    }
}
