//! Wiring: `Application::build` picks the mode's implementations and binds the listener;
//! `run_until_stopped` serves until SIGTERM/SIGINT and then drains.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use metrics_exporter_prometheus::PrometheusHandle;
use socketioxide::SocketIo;
use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;

use crate::auth::{self, Tokens};
use crate::config::{Config, StoreUrl};
use crate::domain::Timestamp;
use crate::fanout::Fanout;
use crate::fanout::local::LocalFanout;
use crate::presence::LocalPresence;
use crate::sequencer::Sequencer;
use crate::sequencer::embedded::GroupCommitSequencer;
use crate::service::ChatService;
use crate::store::Store;
use crate::store::sqlite::SqliteStore;
use crate::{api, metrics, realtime};

/// Everything a handler may need; shared as `Arc<AppState>`.
pub struct AppState {
    pub svc: ChatService,
    pub config: Config,
    pub instance_id: String,
    pub started_at: Timestamp,
    pub metrics: PrometheusHandle,
    pub presence: LocalPresence,
    /// Set on SIGTERM: readiness turns 503 so the balancer moves traffic away.
    pub draining: AtomicBool,
    /// In-flight sends; shutdown waits for them so an acked send is never cut off.
    pub inflight: TaskTracker,
}

impl AppState {
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
}

pub struct Application {
    listener: TcpListener,
    router: axum::Router,
    io: SocketIo,
    state: Arc<AppState>,
}

impl Application {
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        let metrics = metrics::install();
        let store: Arc<dyn Store> = match &config.store {
            StoreUrl::Sqlite { path } => Arc::new(SqliteStore::open(path).await?),
        };
        let secret = match &config.jwt_secret {
            Some(s) => s.clone(),
            None => auth::load_or_create_secret(&config.store.data_dir())?,
        };
        let listener = TcpListener::bind(config.bind).await?;
        let addr = listener.local_addr()?;
        let instance_id = config
            .instance_id
            .clone()
            .unwrap_or_else(|| default_instance_id(addr));

        let (sio_layer, io) = realtime::build_layer(&config);
        let fanout: Arc<dyn Fanout> = Arc::new(LocalFanout::new(io.clone()));
        let sequencer: Arc<dyn Sequencer> =
            Arc::new(GroupCommitSequencer::start(store.clone(), fanout.clone()));
        let svc = ChatService::new(
            store,
            sequencer,
            fanout,
            Tokens::new(&secret, config.token_ttl),
            config.region.clone(),
            config.send_rate_per_sec,
            config.auth_rate_per_min,
        );
        let state = Arc::new(AppState {
            svc,
            config,
            instance_id,
            started_at: Timestamp::now(),
            metrics,
            presence: LocalPresence::default(),
            draining: AtomicBool::new(false),
            inflight: TaskTracker::new(),
        });
        realtime::register(&io, state.clone());
        let router = api::router(state.clone()).layer(sio_layer);
        Ok(Self {
            listener,
            router,
            io,
            state,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let Self {
            listener,
            router,
            io,
            state,
        } = self;
        tracing::info!(addr = %listener.local_addr()?, instance_id = %state.instance_id, mode = "embedded", "listening");
        let (closed_tx, closed_rx) = tokio::sync::oneshot::channel::<()>();
        let drain_state = state.clone();
        let drain_io = io.clone();
        let shutdown = async move {
            shutdown_signal().await;
            tracing::info!("shutdown requested: draining");
            drain_state.draining.store(true, Ordering::Relaxed);
            tokio::time::sleep(drain_state.config.drain_delay).await;
            // Let in-flight sends finish so every ack already promised is delivered.
            drain_state.inflight.close();
            let _ = tokio::time::timeout(
                drain_state.config.shutdown_timeout,
                drain_state.inflight.wait(),
            )
            .await;
            drain_io.close().await;
            let _ = closed_tx.send(());
        };
        let server = axum::serve(
            listener,
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(shutdown);
        // Long-polling requests can hold the server open: bound the wait after sockets are closed.
        let timeout = state.config.shutdown_timeout;
        tokio::select! {
            res = server => res?,
            _ = async { let _ = closed_rx.await; tokio::time::sleep(timeout).await } => {
                tracing::warn!("connections still open after the shutdown timeout; exiting");
            }
        }
        tracing::info!("stopped");
        Ok(())
    }
}

fn default_instance_id(addr: SocketAddr) -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    format!("{host}:{}", addr.port())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
