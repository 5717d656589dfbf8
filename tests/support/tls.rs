//! A throwaway certificate authority for TLS tests, made with the `openssl` CLI in a temp dir of
//! its own (removed on drop): [`TestCa::new`], then [`TestCa::issue`] a server certificate for
//! each server. Every test makes its own CA, so a certificate from another test (or another CA
//! made by the same test, for the "wrong CA" cases) is not trusted.
//!
//! Keys are ECDSA P-256 (fast to make; rustls, OpenSSL, PostgreSQL and Python all take them).
//! A missing `openssl` is a panic saying what to install, never a skip.

#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tempfile::TempDir;

use super::procs::{require_binary, run_bounded, sweep_stale_fixture_dirs};

pub struct TestCa {
    dir: TempDir,
    name: String,
}

/// A certificate and its key, as PEM files.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let mut cmd = Command::new(require_binary("openssl", "openssl"));
    cmd.args(args).current_dir(dir);
    let out = run_bounded(cmd, Duration::from_secs(30)).unwrap_or_else(|e| panic!("openssl {args:?}: {e}"));
    assert!(out.status.success(), "openssl {args:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
}

impl TestCa {
    /// A new self-signed CA (`CN=<name>`), valid for two days.
    pub fn new(name: &str) -> Self {
        // Named like the process fixtures' dirs, so that the sweep of dirs left by a killed test
        // process removes this one too.
        sweep_stale_fixture_dirs();
        let dir = tempfile::Builder::new()
            .prefix(&format!("chatmesh-fx-{}-ca-", std::process::id()))
            .tempdir()
            .expect("CA temp dir");
        openssl(
            dir.path(),
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
                "-days",
                "2",
                "-subj",
                &format!("/CN={name}"),
            ],
        );
        TestCa { dir, name: name.to_string() }
    }

    /// The CA certificate (PEM): what clients are told to trust.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A certificate for `name` signed by this CA, valid for `sans` (`"IP:127.0.0.1,DNS:localhost"`),
    /// usable as a server and as a client certificate (a Redis replica presents its own to its
    /// primary).
    pub fn issue(&self, name: &str, sans: &str) -> Issued {
        let dir = self.dir.path();
        let (key, csr, cert, ext) =
            (format!("{name}.key"), format!("{name}.csr"), format!("{name}.crt"), format!("{name}.ext"));
        fs::write(
            dir.join(&ext),
            format!(
                "subjectAltName={sans}\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n\
                 extendedKeyUsage=serverAuth,clientAuth\n"
            ),
        )
        .expect("write the extensions file");
        openssl(
            dir,
            &[
                "req",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                &key,
                "-out",
                &csr,
                "-subj",
                &format!("/CN={name}"),
            ],
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &cert,
                "-days",
                "2",
                "-extfile",
                &ext,
            ],
        );
        Issued { cert: dir.join(cert), key: dir.join(key) }
    }

    /// A certificate for 127.0.0.1 / localhost.
    pub fn issue_local(&self, name: &str) -> Issued {
        self.issue(name, "IP:127.0.0.1,DNS:localhost")
    }
}
