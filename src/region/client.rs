//! Calls to another region's internal API (`/internal/v1/regions`): a fresh internal token on
//! every request, each bounded by `CHATMESH_REGION_TIMEOUT_MS`, and the peer's errors read back
//! as the errors they were there.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::domain::Message;
use crate::error::{ApiError, ApiResult};
use crate::internal::InternalTokens;
use crate::metrics as m;

/// `POST /hold`: messages to keep (ack level `region`).
#[derive(Serialize, Deserialize)]
pub struct HoldRequest {
    pub messages: Vec<Message>,
}

#[derive(Serialize, Deserialize)]
pub struct HoldAnswer {
    pub held: usize,
}

/// `POST /heads`: the home's head of each room (by id; 0 where it has none).
#[derive(Serialize, Deserialize)]
pub struct HeadsRequest {
    pub rooms: Vec<String>,
}

#[derive(Serialize, Deserialize)]
pub struct HeadsAnswer {
    pub heads: Vec<i64>,
}

/// After a read from a peer found it unreachable, reads skip it this long: a cut link would
/// otherwise cost every read of its rooms the region timeout.
const READ_PAUSE: Duration = Duration::from_secs(5);

/// Unix ms after which the caller no longer waits for the answer.
pub const DEADLINE_HEADER: &str = "x-chatmesh-deadline";

pub struct PeerClient {
    pub region: String,
    base: String,
    http: reqwest::Client,
    tokens: Arc<InternalTokens>,
    pub timeout: Duration,
    /// For the send lanes' WebSockets to an https peer.
    tls: Option<Arc<rustls::ClientConfig>>,
    /// Until when reads skip this peer (see [`READ_PAUSE`]).
    reads_paused: std::sync::Mutex<Option<Instant>>,
}

/// Anything a WebSocket can run over (TCP, or TLS over TCP).
pub trait Transport: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Transport for T {}

/// A send lane's connection to a peer region.
pub type LaneSocket = tokio_tungstenite::WebSocketStream<Box<dyn Transport>>;

impl PeerClient {
    /// `ca`: the CA certificates of `CHATMESH_REGION_CA_FILE` (PEM), if set.
    pub fn new(
        region: &str,
        base: &str,
        tokens: Arc<InternalTokens>,
        timeout: Duration,
        ca: Option<&[u8]>,
    ) -> anyhow::Result<Self> {
        let tls = base.starts_with("https://").then(|| lane_tls(ca)).transpose()?;
        let ca = ca.map(reqwest::Certificate::from_pem).transpose()?;
        let mut builder = reqwest::Client::builder()
            .connect_timeout(timeout)
            .tcp_nodelay(true)
            .http1_only()
            .pool_idle_timeout(Duration::from_secs(30));
        if let Some(ca) = ca {
            builder = builder.tls_built_in_root_certs(false).add_root_certificate(ca);
        }
        Ok(Self {
            region: region.to_string(),
            base: base.to_string(),
            http: builder.build()?,
            tokens,
            timeout,
            tls,
            reads_paused: std::sync::Mutex::new(None),
        })
    }

    /// Opens a send lane: a WebSocket to `/internal/v1/regions/lane`, within the region timeout.
    pub async fn lane(&self) -> Result<LaneSocket, String> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let url = url::Url::parse(&self.base).map_err(|e| e.to_string())?;
        let host = url.host_str().ok_or("no host")?.to_string();
        let port = url.port_or_known_default().ok_or("no port")?;
        let connect = async {
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await.map_err(|e| e.to_string())?;
            tcp.set_nodelay(true).map_err(|e| e.to_string())?;
            let stream: Box<dyn Transport> = match &self.tls {
                None => Box::new(tcp),
                Some(config) => {
                    let name = rustls::pki_types::ServerName::try_from(host.clone()).map_err(|e| e.to_string())?;
                    let tls = tokio_rustls::TlsConnector::from(config.clone())
                        .connect(name, tcp)
                        .await
                        .map_err(|e| e.to_string())?;
                    Box::new(tls)
                }
            };
            let scheme = if self.tls.is_some() { "wss" } else { "ws" };
            let mut request = format!("{scheme}://{host}:{port}/internal/v1/regions/lane")
                .into_client_request()
                .map_err(|e| e.to_string())?;
            let bearer = format!("Bearer {}", self.tokens.issue());
            request.headers_mut().insert(
                reqwest::header::AUTHORIZATION,
                bearer.parse().map_err(|e: reqwest::header::InvalidHeaderValue| e.to_string())?,
            );
            let (ws, _) = tokio_tungstenite::client_async(request, stream).await.map_err(|e| e.to_string())?;
            Ok::<_, String>(ws)
        };
        tokio::time::timeout(self.timeout, connect).await.map_err(|_| "timed out".to_string())?
    }

    fn url(&self, path: &str) -> String {
        format!("{}/internal/v1/regions{path}", self.base)
    }

    /// One request, answered within the region timeout.
    pub async fn call<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        op: &'static str,
        path: &str,
        body: &B,
    ) -> ApiResult<T> {
        let timeout = self.timeout;
        let started = Instant::now();
        let result = async {
            // The home does nothing with a request that reaches it after this instance stopped
            // waiting (a cut link that heals delivers it late): an `unavailable` answered here
            // must not turn into a message sequenced there (up to the regions' clock skew).
            let deadline = crate::domain::Timestamp::now().0 + timeout.as_millis() as i64;
            let res = self
                .http
                .post(self.url(path))
                .bearer_auth(self.tokens.issue())
                .header(DEADLINE_HEADER, deadline)
                .json(body)
                .timeout(timeout)
                .send()
                .await
                .map_err(|e| self.unreachable(op, e))?;
            let status = res.status();
            let bytes = res.bytes().await.map_err(|e| self.unreachable(op, e))?;
            if status.is_success() {
                serde_json::from_slice(&bytes).map_err(|e| {
                    tracing::warn!(peer = %self.region, op, error = %e, "unreadable answer from a peer region");
                    ApiError::Unavailable(format!("region {} answered something unreadable; retry", self.region))
                })
            } else {
                let v = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
                Err(ApiError::from_wire(status.as_u16(), &v))
            }
        }
        .await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(ApiError::Unavailable(_)) => "unavailable",
            Err(_) => "refused",
        };
        let peer = self.region.clone();
        metrics::counter!(m::REGION_FORWARDED, "peer" => peer.clone(), "op" => op, "outcome" => outcome).increment(1);
        metrics::histogram!(m::REGION_FORWARD_LATENCY, "peer" => peer, "op" => op)
            .record(started.elapsed().as_secs_f64());
        result
    }

    /// A read that the caller can do without (it falls back to what this region has): like
    /// [`Self::call`], but answered `unavailable` at once for a while after the peer was found
    /// unreachable.
    pub async fn read<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        op: &'static str,
        path: &str,
        body: &B,
    ) -> ApiResult<T> {
        let paused = |until: &Option<Instant>| until.is_some_and(|t| Instant::now() < t);
        if paused(&self.reads_paused.lock().unwrap_or_else(|e| e.into_inner())) {
            return Err(ApiError::Unavailable(format!("region {} was unreachable moments ago", self.region)));
        }
        let result = self.call(op, path, body).await;
        if matches!(result, Err(ApiError::Unavailable(_))) {
            *self.reads_paused.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now() + READ_PAUSE);
        }
        result
    }

    fn unreachable(&self, op: &str, e: reqwest::Error) -> ApiError {
        tracing::warn!(peer = %self.region, op, error = %e, "peer region unreachable");
        ApiError::Unavailable(format!("region {} (the room's home) did not answer in time; retry", self.region))
    }

    /// A long-lived streamed answer (the outbox): the headers within the region timeout, the
    /// body as it comes.
    pub async fn open_stream<B: Serialize + ?Sized>(&self, path: &str, body: &B) -> ApiResult<reqwest::Response> {
        let send = self.http.post(self.url(path)).bearer_auth(self.tokens.issue()).json(body).send();
        let res = tokio::time::timeout(self.timeout, send)
            .await
            .map_err(|_| ApiError::Unavailable(format!("region {} did not answer in time", self.region)))?
            .map_err(|e| self.unreachable("outbox", e))?;
        if !res.status().is_success() {
            let status = res.status().as_u16();
            let v = res.json::<serde_json::Value>().await.unwrap_or(serde_json::Value::Null);
            return Err(ApiError::from_wire(status, &v));
        }
        Ok(res)
    }
}

/// The TLS client configuration of the send lanes: the CA file's certificates, or the web PKI.
fn lane_tls(ca: Option<&[u8]>) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(pem) => {
            for cert in CertificateDer::pem_slice_iter(pem) {
                roots.add(cert?)?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}
