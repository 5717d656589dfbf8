//! The one way a Rust test gets a PostgreSQL database: [`TestDatabase::create`] makes a fresh,
//! empty one on the machine's server and dropping it drops the database (and its connections).
//!
//! The server is the one `CHATMESH_TEST_POSTGRES_URL` names (an admin URL whose role may
//! `CREATE DATABASE`), by default `postgres://postgres@127.0.0.1:5432/postgres`. Tests that stop
//! and start PostgreSQL use a private server instead ([`super::procs::PgServer`]).
//!
//! Blocking (`psql` through [`super::procs::run_bounded`]): a few milliseconds, fine to call from
//! an async test.

#![allow(dead_code)]

use std::process::Command;
use std::time::Duration;

use super::procs::{require_binary, run_bounded};

/// The variable that names the admin URL.
pub const ADMIN_URL_VAR: &str = "CHATMESH_TEST_POSTGRES_URL";
const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
const PSQL_TIMEOUT: Duration = Duration::from_secs(30);

/// The admin URL: `CHATMESH_TEST_POSTGRES_URL`, else the machine's server as `postgres`.
pub fn admin_url() -> String {
    std::env::var(ADMIN_URL_VAR).ok().filter(|u| !u.trim().is_empty()).unwrap_or_else(|| DEFAULT_ADMIN_URL.to_string())
}

/// `url` with its database (the path) replaced by `db`; query parameters kept. Works for
/// `postgres://` and `mongodb://` URLs alike.
pub fn with_database(url: &str, db: &str) -> String {
    let (base, query) = url.split_once('?').map_or((url, None), |(b, q)| (b, Some(q)));
    let authority = base.find("://").map_or(0, |i| i + 3);
    let base = base[authority..].find('/').map_or(base, |i| &base[..authority + i]);
    match query {
        Some(q) => format!("{base}/{db}?{q}"),
        None => format!("{base}/{db}"),
    }
}

/// `psql <url> -c <sql>` (no psqlrc, unaligned, tuples only, stop on error): stdout trimmed, or
/// the error.
pub fn psql(url: &str, sql: &str) -> Result<String, String> {
    let mut cmd = Command::new(require_binary("psql", "postgresql-client"));
    cmd.args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-d", url, "-c", sql]).env("PGCONNECT_TIMEOUT", "5");
    let out = run_bounded(cmd, PSQL_TIMEOUT).map_err(|e| format!("psql -c {sql:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!("psql -c {sql:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// A database of its own for one test, dropped (`WITH (FORCE)`) when this is dropped.
pub struct TestDatabase {
    name: String,
    url: String,
    admin_url: String,
}

impl TestDatabase {
    /// `CREATE DATABASE chatmesh_test_<ulid>`; panics, saying how to get a server, if there is none.
    pub fn create() -> Self {
        let admin_url = admin_url();
        let name = format!("chatmesh_test_{}", ulid::Ulid::generate().to_string().to_lowercase());
        psql(&admin_url, &format!(r#"CREATE DATABASE "{name}""#)).unwrap_or_else(|e| {
            panic!(
                "could not create a test database on {admin_url}: {e}\n\
                 These tests need a real PostgreSQL (they are never skipped): start the machine's with \
                 `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start` \
                 (`scripts/setup.sh --test` does), or set {ADMIN_URL_VAR} to an admin URL that may CREATE DATABASE."
            )
        });
        let url = with_database(&admin_url, &name);
        TestDatabase { name, url, admin_url }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The database's URL (the admin URL's credentials and parameters, this database's name).
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// Runs `sql` on this database; panics on an error.
    pub fn psql(&self, sql: &str) -> String {
        psql(&self.url, sql).unwrap_or_else(|e| panic!("database {}: {e}", self.name))
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if let Err(e) = psql(&self.admin_url, &format!(r#"DROP DATABASE IF EXISTS "{}" WITH (FORCE)"#, self.name)) {
            eprintln!("could not drop test database {}: {e}", self.name);
        }
    }
}
