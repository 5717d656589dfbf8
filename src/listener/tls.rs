//! TLS for the client listener: rustls with the certificate and key read from PEM files, read
//! again on SIGHUP.
//!
//! The certificate sits behind a resolver rather than inside the `ServerConfig`: a reload swaps
//! one `Arc` that the next handshake picks up, while connections already open keep the session
//! they negotiated (nothing about them refers to the old certificate any more) and the session
//! cache survives the swap.

use std::path::Path;
use std::sync::{Arc, RwLock};

use anyhow::{Context, bail};
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;

use crate::config::TlsFiles;
use crate::metrics as m;

/// The listener's TLS: an acceptor for new connections and the files to reload from.
pub struct Tls {
    acceptor: TlsAcceptor,
    current: Arc<Current>,
    files: TlsFiles,
    provider: Arc<CryptoProvider>,
}

/// The certificate every new handshake gets. A std lock: it is held only to clone an `Arc`,
/// never across an await.
#[derive(Debug)]
struct Current(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

impl Tls {
    /// Reads both files; any problem (missing, unreadable, not PEM, key not matching the
    /// certificate) is an error naming the file, so the instance does not start.
    pub fn load(files: &TlsFiles) -> anyhow::Result<Self> {
        // ring, chosen explicitly: the process-wide default provider is not ours to set (the
        // database drivers may pick theirs).
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = read_certified_key(files, &provider)?;
        let current = Arc::new(Current(RwLock::new(Arc::new(key))));
        let mut config = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_no_client_auth()
            .with_cert_resolver(current.clone());
        // HTTP/1.1 only: WebSocket upgrades and Engine.IO long-polling are HTTP/1.1 features here.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self { acceptor: TlsAcceptor::from(Arc::new(config)), current, files: files.clone(), provider })
    }

    pub fn acceptor(&self) -> TlsAcceptor {
        self.acceptor.clone()
    }

    /// Reads the files again; on success new handshakes use the new certificate, on failure the
    /// old one stays and the error is returned (counted and logged by the caller).
    pub fn reload(&self) -> anyhow::Result<()> {
        let key = read_certified_key(&self.files, &self.provider)?;
        *self.current.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(key);
        Ok(())
    }

    /// Reloads on every SIGHUP for the life of the process. The handler is installed before this
    /// returns, so a SIGHUP sent once the instance logs `listening` never kills it.
    pub fn reload_on_sighup(self: Arc<Self>) -> anyhow::Result<()> {
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .context("cannot install the SIGHUP handler")?;
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                match self.reload() {
                    Ok(()) => {
                        metrics::counter!(m::TLS_RELOADS, "outcome" => "ok").increment(1);
                        tracing::info!(cert = %self.files.cert.display(), "TLS certificate reloaded");
                    }
                    Err(e) => {
                        metrics::counter!(m::TLS_RELOADS, "outcome" => "error").increment(1);
                        tracing::error!(error = %format!("{e:#}"), "TLS certificate reload failed; still serving the previous one");
                    }
                }
            }
        });
        Ok(())
    }
}

fn read_certified_key(files: &TlsFiles, provider: &CryptoProvider) -> anyhow::Result<CertifiedKey> {
    let certs = read_certs(&files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| anyhow::anyhow!("CHATMESH_TLS_KEY_FILE {}: {e}", files.key.display()))?;
    CertifiedKey::from_der(certs, key, provider).map_err(|e| {
        anyhow::anyhow!(
            "CHATMESH_TLS_KEY_FILE {} does not fit CHATMESH_TLS_CERT_FILE {}: {e}",
            files.key.display(),
            files.cert.display()
        )
    })
}

fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let name = || format!("CHATMESH_TLS_CERT_FILE {}", path.display());
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| anyhow::anyhow!("{}: {e}", name()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("{}: {e}", name()))?;
    if certs.is_empty() {
        bail!("{}: no PEM certificate in it", name());
    }
    Ok(certs)
}
