//! PostgreSQL store for cluster mode: the durable store behind the Redis sequencer, and a complete
//! `Store` on its own (its `append_messages` sequences in a transaction, like SQLite's). What it
//! does is [`SqlStore`]'s (its lock discipline is written there); this file connects the pool
//! and says how PostgreSQL spells things. Migrations are embedded in the binary.

use std::time::Duration;

use anyhow::{Context, bail};
use sqlx::Postgres;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};

use super::sql::{Dialect, SqlStore};

pub type PostgresStore = SqlStore<Postgres>;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// Connections per process. The hot paths (append, upsert, reads) hold one only for a statement
/// or a short transaction.
const MAX_CONNECTIONS: u32 = 10;
/// How long a caller waits for a pooled connection before the store reports `Unavailable`.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

impl Dialect for Postgres {
    /// READ COMMITTED: each statement sees what committed before it, so a writer that waited
    /// for a room's lock then reads what the previous holder wrote.
    const BEGIN_WRITE: &'static str = "BEGIN";
    /// The room row lock serializes the writers of one room, which keeps its seqs gap-free.
    const LOCK_ROWS: &'static str = " FOR UPDATE";
    /// The snapshot of a REPEATABLE READ transaction is taken by its first statement.
    const BEGIN_SNAPSHOT: &'static str = "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY";
    const GREATEST: &'static str = "GREATEST";
    const KEYS_JOIN: &'static str = "JOIN";

    fn rows_affected(done: &Self::QueryResult) -> u64 {
        done.rows_affected()
    }
}

impl SqlStore<Postgres> {
    /// Connects a pool to `url` (`postgres://user[:password]@host[:port]/database`) and runs the
    /// embedded migrations (sqlx serializes concurrent migrators with an advisory lock).
    ///
    /// TLS as the URL's `sslmode` says (see [`connect_options`]); the first connection is made
    /// here, so a server that refuses it (no TLS where TLS is required, a certificate the root
    /// does not vouch for, a `hostnossl ... reject` line) stops the start with the reason.
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        let options = connect_options(url)?;
        let target =
            format!("{}:{} (sslmode={})", options.get_host(), options.get_port(), mode_name(options.get_ssl_mode()));
        if matches!(options.get_ssl_mode(), PgSslMode::Disable) && !is_loopback(options.get_host()) {
            tracing::warn!(
                store = %target,
                "PostgreSQL connection is not encrypted; add sslmode=verify-full&sslrootcert=<ca.pem> to CHATMESH_STORE_URL"
            );
        }
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await
            .with_context(|| format!("connecting to PostgreSQL at {target}"))?;
        MIGRATOR.run(&pool).await?;
        Ok(Self::new(pool))
    }
}

/// How long the server keeps a session that sits idle inside a transaction.
const IDLE_IN_TRANSACTION: &str = "5s";

/// The pool's options from `url`, with chatmesh's TLS policy: nothing that asked for TLS may end
/// up in plaintext, and nothing may fall back silently.
///
/// - `require`, `verify-ca`, `verify-full`: TLS or no connection. `require` with `sslrootcert`
///   checks the chain as `verify-ca` does (as libpq does; sqlx would ignore the root).
/// - `prefer` and `allow` are refused: either may end in plaintext without a word (an attacker in
///   the path only has to answer "no TLS").
/// - No `sslmode` (nor `PGSSLMODE`): `disable`, plaintext as before TLS was compiled in, said
///   out loud at start when the server is not on this host. sqlx's own default is `prefer`.
pub fn connect_options(url: &str) -> anyhow::Result<PgConnectOptions> {
    let options: PgConnectOptions = url.parse().context("CHATMESH_STORE_URL is not a valid postgres:// URL")?;
    // A client cut off mid-transaction (a partitioned region: packets dropped, nothing closed)
    // would keep its row locks until TCP gives up, hours later; the server ends such a session
    // instead, so a takeover or another instance's write-back waits seconds, not hours.
    let options = options.options([("idle_in_transaction_session_timeout", IDLE_IN_TRANSACTION)]);
    let query = url.split_once('?').map_or("", |(_, q)| q);
    let param = |names: &[&str]| {
        query
            .split('&')
            .filter_map(|pair| pair.split_once('='))
            .find(|(k, _)| names.contains(k))
            .map(|(_, v)| v.to_string())
    };
    let url_mode = param(&["sslmode", "ssl-mode"]);
    let env_mode = std::env::var("PGSSLMODE").ok().filter(|m| !m.is_empty());
    // The same sources sqlx reads the root from (it has no getter for it).
    let has_root = param(&["sslrootcert", "ssl-root-cert", "ssl-ca"]).is_some()
        || std::env::var_os("PGSSLROOTCERT").is_some_and(|v| !v.is_empty());
    Ok(match options.get_ssl_mode() {
        PgSslMode::Prefer | PgSslMode::Allow if url_mode.is_none() && env_mode.is_none() => {
            options.ssl_mode(PgSslMode::Disable)
        }
        mode @ (PgSslMode::Prefer | PgSslMode::Allow) => bail!(
            "sslmode={} may silently fall back to plaintext: use sslmode=verify-full (or require / verify-ca) for TLS, \
             or sslmode=disable to say plaintext is meant",
            mode_name(mode)
        ),
        PgSslMode::Require if has_root => options.ssl_mode(PgSslMode::VerifyCa),
        _ => options,
    })
}

fn mode_name(mode: PgSslMode) -> &'static str {
    match mode {
        PgSslMode::Disable => "disable",
        PgSslMode::Allow => "allow",
        PgSslMode::Prefer => "prefer",
        PgSslMode::Require => "require",
        PgSslMode::VerifyCa => "verify-ca",
        PgSslMode::VerifyFull => "verify-full",
    }
}

/// A Unix socket directory or a loopback address: the bytes do not leave the machine.
fn is_loopback(host: &str) -> bool {
    host.starts_with('/')
        || host.eq_ignore_ascii_case("localhost")
        || host.trim_matches(['[', ']']).parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(url: &str) -> Result<&'static str, String> {
        connect_options(url).map(|o| mode_name(o.get_ssl_mode())).map_err(|e| format!("{e:#}"))
    }

    #[test]
    fn sslmode_policy() {
        // PGSSLMODE would change the unset case; the test process does not set it.
        assert!(std::env::var_os("PGSSLMODE").is_none(), "unset PGSSLMODE to run this test");
        assert_eq!(mode("postgres://u@h/db"), Ok("disable"));
        assert_eq!(mode("postgres://u@h/db?sslmode=disable"), Ok("disable"));
        assert_eq!(mode("postgres://u@h/db?sslmode=require"), Ok("require"));
        assert_eq!(mode("postgres://u@h/db?sslmode=require&sslrootcert=/ca.pem"), Ok("verify-ca"));
        assert_eq!(mode("postgres://u@h/db?sslmode=verify-full&sslrootcert=/ca.pem"), Ok("verify-full"));
        for refused in ["prefer", "allow"] {
            let err = mode(&format!("postgres://u@h/db?sslmode={refused}")).unwrap_err();
            assert!(err.contains("silently fall back"), "{err}");
        }
    }

    #[test]
    fn loopback_hosts() {
        assert!(is_loopback("127.0.0.1") && is_loopback("::1") && is_loopback("localhost") && is_loopback("/run/pg"));
        assert!(!is_loopback("db.example") && !is_loopback("10.0.0.5"));
    }
}
