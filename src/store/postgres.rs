//! PostgreSQL store for cluster mode: the durable store behind the Redis sequencer, and a complete
//! `Store` on its own (its `append_messages` sequences in a transaction, like SQLite's). What it
//! does is [`SqlStore`]'s (its lock discipline is written there); this file connects the pool
//! and says how PostgreSQL spells things. Migrations are embedded in the binary.

use std::time::Duration;

use sqlx::Postgres;
use sqlx::postgres::PgPoolOptions;

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
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        let pool =
            PgPoolOptions::new().max_connections(MAX_CONNECTIONS).acquire_timeout(ACQUIRE_TIMEOUT).connect(url).await?;
        MIGRATOR.run(&pool).await?;
        Ok(Self::new(pool))
    }
}
