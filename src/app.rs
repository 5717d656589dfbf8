//! Wiring: `Application::build` picks the mode's implementations and binds the listener;
//! `run_until_stopped` serves until SIGTERM/SIGINT and then drains.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::listener::Tls;
use crate::sio::Io;
use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;

use crate::auth::{self, Tokens};
use crate::breaker::Breakers;
use crate::cache::{Caches, RedisSharedCache};
use crate::cluster::{self, InstanceRecord};
use crate::config::{AckLevel, ClusterConfig, Config};
use crate::domain::Timestamp;
use crate::fanout::local::LocalFanout;
use crate::fanout::redis::{Identity, RedisFanout};
use crate::fanout::seal::Seal;
use crate::history::{LocalHistory, RedisHistory};
use crate::internal::InternalTokens;
use crate::ops::{LocalOps, Ops, RedisOps};
use crate::presence::LocalPresence;
use crate::redis_io::{Keys, Redis, apply_script};
use crate::region::apply::Applier;
use crate::region::homes::Homes;
use crate::region::replicator::{OutboxServer, Replicator};
use crate::region::takeover::Takeovers;
use crate::region::{HoldElsewhere, NoOutbox, PeerClient, PeersHold, RedisOutbox, Regions};
use crate::revocation::{LocalRevocations, RedisRevocations};
use crate::sequencer::embedded::LocalSequencer;
use crate::sequencer::redis::{RedisSequencer, RedisSequencerConfig};
use crate::service::{Backends, ChatService, Limits};
use crate::sessions::{LocalRevokedSessions, RedisRevokedSessions};
use crate::state::AppState;
use crate::state::RegionApi;
use crate::store::Store;
use crate::sync::SyncStats;
use crate::sync::redis::{SyncConfig, SyncWorker};
use crate::throttle::{Budgets, LocalThrottle, RedisThrottle};
use crate::{api, metrics, realtime};
use anyhow::Context;

/// The implementations of one mode: what the service runs on, and what the instance needs
/// besides.
struct Mode {
    backends: Backends,
    ops: Arc<dyn Ops>,
    heartbeat: Option<(Redis, Keys)>,
    /// With peer regions: what they may ask of this one, and how this one pulls from them.
    regions: Option<(RegionApi, Replication)>,
}

/// What the replicators (one per peer region) run on; started once the state exists.
struct Replication {
    peers: Vec<Arc<PeerClient>>,
    redis: Redis,
    keys: Keys,
}

/// Clients for the peer regions' internal APIs (their CA read once, its file named on error).
fn peer_clients(c: &ClusterConfig, tokens: Arc<InternalTokens>) -> anyhow::Result<Vec<Arc<PeerClient>>> {
    let ca = match &c.region_ca_file {
        None => None,
        Some(path) => {
            Some(std::fs::read(path).with_context(|| format!("reading CHATMESH_REGION_CA_FILE {}", path.display()))?)
        }
    };
    c.peers
        .iter()
        .map(|p| {
            let client = PeerClient::new(&p.name, &p.url, tokens.clone(), c.region_timeout, ca.as_deref());
            let what = || format!("CHATMESH_PEER_REGIONS {} with CHATMESH_REGION_CA_FILE", p.name);
            Ok(Arc::new(client.with_context(what)?))
        })
        .collect()
}

fn embedded_mode(
    store: Arc<dyn Store>,
    io: Io,
    breakers: Arc<Breakers>,
    budgets: Budgets,
    sessions: Arc<LocalRevokedSessions>,
    region: &str,
) -> Mode {
    let fanout = Arc::new(LocalFanout::new(io));
    Mode {
        backends: Backends {
            store: store.clone(),
            sequencer: Arc::new(LocalSequencer::start(store.clone(), fanout.clone(), breakers.clone())),
            revocations: Arc::new(LocalRevocations),
            delivery: fanout.clone(),
            notices: fanout.clone(),
            evictions: fanout,
            history: Arc::new(LocalHistory { store: store.clone() }),
            caches: Arc::new(Caches::default()),
            throttle: Arc::new(LocalThrottle::new(budgets)),
            sessions,
            regions: Arc::new(Regions::single(region)),
            outbox: Arc::new(NoOutbox),
        },
        ops: Arc::new(LocalOps { store, breakers }),
        heartbeat: None,
        regions: None,
    }
}

async fn cluster_mode(
    c: &ClusterConfig,
    redis: Redis,
    store: Arc<dyn Store>,
    io: Io,
    breakers: Arc<Breakers>,
    (instance_id, region): (&str, &str),
    budgets: Budgets,
) -> anyhow::Result<Mode> {
    let l2 = RedisSharedCache { redis: redis.clone(), prefix: c.prefix.clone() };
    let caches = Arc::new(Caches::new(Arc::new(l2)));
    crate::ops::warn_without_persistence(&redis).await;
    let keys = Keys::new(&c.prefix, c.shards);
    let seal = Seal::from_secret(&c.secret);
    let peers = peer_clients(c, Arc::new(InternalTokens::new(&c.secret, instance_id)))?;
    let history = Arc::new(RedisHistory { store: store.clone(), redis: redis.clone(), keys: keys.clone() });
    let regions = if peers.is_empty() {
        None
    } else {
        let api = RegionApi {
            outbox: Arc::new(OutboxServer::new(redis.clone(), keys.clone())),
            applier: Arc::new(Applier {
                redis: redis.clone(),
                keys: keys.clone(),
                store: store.clone(),
                script: redis::Script::new(&apply_script(&seal)),
                dedupe_ttl: c.dedupe_ttl,
            }),
            peers: peers.clone(),
            history: history.clone(),
            redis: redis.clone(),
            keys: keys.clone(),
        };
        Some((api, Replication { peers: peers.clone(), redis: redis.clone(), keys: keys.clone() }))
    };
    // Who decides each region's rooms (issue 17): read by routing, the self-fencing gate and the
    // hold of ack level `region`.
    let homes = (!peers.is_empty()).then(|| {
        let takeovers = Takeovers {
            store: store.clone(),
            redis: redis.clone(),
            keys: keys.clone(),
            timing: c.leases,
            dedupe_ttl: c.dedupe_ttl,
        };
        Arc::new(Homes::new(region, instance_id, takeovers))
    });
    let elsewhere: Option<Arc<dyn HoldElsewhere>> = (c.ack_level == AckLevel::Region).then(|| {
        Arc::new(PeersHold { peers: peers.clone(), timeout: c.region_timeout, homes: homes.clone() })
            as Arc<dyn HoldElsewhere>
    });
    let fanout = RedisFanout::start(
        io,
        redis.clone(),
        keys.clone(),
        history.clone(),
        caches.clone(),
        Identity {
            instance_id: instance_id.to_string(),
            seal: seal.clone(),
            peer_regions: c.peers.iter().map(|p| p.name.clone()).collect(),
        },
    )
    .await?;
    let sequencer = RedisSequencer::start_with(
        redis.clone(),
        keys.clone(),
        store.clone(),
        RedisSequencerConfig {
            ack_level: c.ack_level,
            wait_timeout: Duration::from_secs(1),
            dedupe_ttl: c.dedupe_ttl,
            backlog_limit: c.backlog_limit,
            seal,
            outbox_len: regions.is_some().then_some(c.region_outbox_len),
            elsewhere,
        },
        breakers.clone(),
    );
    let stats = Arc::new(SyncStats::default());
    let worker = Arc::new(
        SyncWorker::new(
            redis.dedicated().await?,
            keys.clone(),
            store.clone(),
            instance_id.to_string(),
            SyncConfig {
                claim_idle: c.claim_idle,
                linger: c.sync_linger,
                wait_replicas: u32::from(c.ack_level.waits_for_replica()),
                ..SyncConfig::default()
            },
        )
        .with_breakers(breakers.clone()),
    );
    if c.sync_worker {
        tokio::spawn(worker.run(stats.clone()));
    }
    Arc::new(crate::sync::retention::Retention {
        store: store.clone(),
        redis: redis.clone(),
        keys: keys.clone(),
        region: region.to_string(),
        instance: instance_id.to_string(),
        recent_per_room: SyncConfig::default().recent_per_room,
        every: c.retention_every,
    })
    .spawn();
    Ok(Mode {
        backends: Backends {
            store: store.clone(),
            sequencer: Arc::new(sequencer),
            revocations: Arc::new(RedisRevocations {
                redis: redis.clone(),
                keys: keys.clone(),
                wait_replica: c.ack_level.waits_for_replica().then_some(Duration::from_secs(1)),
            }),
            delivery: fanout.clone(),
            notices: fanout.clone(),
            evictions: fanout.clone(),
            history,
            caches,
            throttle: Arc::new(RedisThrottle::new(redis.clone(), keys.clone(), budgets)),
            sessions: Arc::new(RedisRevokedSessions { redis: redis.clone(), keys: keys.clone() }),
            regions: Arc::new(match homes {
                None => Regions::single(region),
                Some(homes) => {
                    homes.clone().start().await;
                    Regions::from_clients(region, peers).with_homes(homes)
                }
            }),
            outbox: if regions.is_some() {
                Arc::new(RedisOutbox { redis: redis.clone(), keys: keys.clone(), len: c.region_outbox_len })
            } else {
                Arc::new(NoOutbox)
            },
        },
        ops: Arc::new(RedisOps { store, redis: redis.clone(), keys: keys.clone(), fanout, sync: stats, breakers }),
        heartbeat: Some((redis, keys)),
        regions,
    })
}

/// Keeps the gauges that no request updates fresh (readiness without a balancer polling it,
/// Redis replication), so alerts see them even when nobody asks.
fn spawn_gauges(state: Arc<AppState>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            state.check_ready().await;
            state.ops.refresh_gauges().await;
        }
    });
}

pub struct Application {
    listener: TcpListener,
    router: axum::Router,
    io: Io,
    state: Arc<AppState>,
    tls: Option<Arc<Tls>>,
}

impl Application {
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        let metrics = metrics::install();
        // First: a certificate that cannot be used stops the start, naming its file, before
        // anything else is opened.
        let tls = config.tls.as_ref().map(Tls::load).transpose()?.map(Arc::new);
        if let Some(tls) = &tls {
            tls.clone().reload_on_sighup()?;
        }
        let store = crate::store::open(&config.store).await?;
        let secret = match &config.jwt_secret {
            Some(s) => s.clone(),
            None => auth::load_or_create_secret(&config.store.data_dir())?,
        };
        let listener = TcpListener::bind(config.bind).await?;
        let addr = listener.local_addr()?;
        let instance_id = config.instance_id.clone().unwrap_or_else(|| default_instance_id(addr));
        let io = realtime::build_io(&config);

        let breakers = Arc::new(Breakers::default());
        let budgets = Budgets {
            auth_per_ip_per_min: config.auth_rate_per_min,
            login_failures_per_account_per_min: config.login_failures_per_min,
        };
        let internal = config.cluster.as_ref().map(|c| crate::internal::InternalTokens::new(&c.secret, &instance_id));
        let mode = match &config.cluster {
            None => {
                let sessions = Arc::new(LocalRevokedSessions::open(&config.store.data_dir())?);
                embedded_mode(store, io.clone(), breakers.clone(), budgets, sessions, &config.region)
            }
            Some(cluster) => {
                let redis = Redis::connect(cluster.redis.clone()).await?;
                cluster_mode(
                    cluster,
                    redis,
                    store,
                    io.clone(),
                    breakers.clone(),
                    (&instance_id, &config.region),
                    budgets,
                )
                .await?
            }
        };
        let svc = ChatService::new(
            mode.backends,
            Tokens::new(&secret, config.token_ttl),
            config.region.clone(),
            Limits {
                send_rate_per_sec: config.send_rate_per_sec,
                read_rate_per_sec: config.read_rate_per_sec,
                typing_rate_per_sec: config.typing_rate_per_sec,
                room_change_rate_per_min: config.room_change_rate_per_min,
                password_hash_queue: config.password_hash_queue,
                hlc_max_ahead: config
                    .cluster
                    .as_ref()
                    .map(|c| c.hlc_max_ahead)
                    .unwrap_or(std::time::Duration::from_millis(500)),
            },
        );
        let (region_api, replication) = match mode.regions {
            Some((api, replication)) => (Some(api), Some(replication)),
            None => (None, None),
        };
        let applier = region_api.as_ref().map(|a| a.applier.clone());
        let state = Arc::new(AppState {
            svc,
            config,
            instance_id,
            listen_addr: addr,
            started_at: Timestamp::now(),
            metrics,
            presence: LocalPresence::default(),
            draining: AtomicBool::new(false),
            inflight: TaskTracker::new(),
            ops: mode.ops,
            internal,
            regions: region_api,
        });
        if let (Some(r), Some(applier)) = (replication, applier) {
            for peer in r.peers {
                let replicator = Replicator::new(
                    peer,
                    r.redis.clone(),
                    r.keys.clone(),
                    applier.clone(),
                    state.instance_id.clone(),
                    state.clone(),
                );
                Arc::new(replicator).spawn();
            }
        }
        if let Some((redis, keys)) = mode.heartbeat {
            let hb_state = state.clone();
            cluster::spawn_heartbeat(
                redis,
                keys,
                Arc::new(move || {
                    let st = hb_state.clone();
                    Box::pin(async move { st.instance_record().await })
                        as futures::future::BoxFuture<'static, InstanceRecord>
                }),
            );
        }
        spawn_gauges(state.clone());
        realtime::register(&io, state.clone());
        let mut router = api::router(state.clone())
            .merge(crate::sio::router(io.clone()))
            .layer(axum::middleware::from_fn_with_state(state.clone(), api::cors::cors));
        if tls.is_some() {
            router = router.layer(axum::middleware::map_response(api::hsts));
        }
        Ok(Self { listener, router, io, state, tls })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("a bound listener has an address")
    }

    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let Self { listener, router, io, state, tls } = self;
        let mode = if state.config.cluster.is_some() { "cluster" } else { "embedded" };
        let scheme = if tls.is_some() { "https" } else { "http" };
        tracing::info!(addr = %listener.local_addr()?, scheme, instance_id = %state.instance_id, mode, "listening");
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
            let _ = tokio::time::timeout(drain_state.config.shutdown_timeout, drain_state.inflight.wait()).await;
            drain_io.close().await;
            let _ = closed_tx.send(());
        };
        let server = crate::listener::serve(listener, router, tls, state.config.listener.clone(), shutdown);
        // Long-polling requests can hold the server open: bound the wait after sockets are closed.
        let timeout = state.config.shutdown_timeout;
        tokio::select! {
            () = server => {},
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
