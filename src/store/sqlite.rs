//! SQLite store for embedded mode: one file, WAL, `synchronous=FULL` so that a committed batch
//! survives a crash of the process or the machine. Migrations are embedded in the binary. What
//! it does is [`SqlStore`]'s; this file opens the file and says how SQLite spells things.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::Sqlite;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

use super::sql::{Dialect, SqlStore};

pub type SqliteStore = SqlStore<Sqlite>;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// Page cache per connection (KiB) and memory-mapped read window (bytes).
const CACHE_KIB: u64 = 64 * 1024;
const MMAP_BYTES: u64 = 256 * 1024 * 1024;
/// WAL pages (4 KiB) written before a commit checkpoints them into the database file.
const WAL_AUTOCHECKPOINT_PAGES: u64 = 10_000;

impl Dialect for Sqlite {
    /// IMMEDIATE takes the database's one write lock up front, so what a writer reads cannot
    /// move before it commits, and writers never deadlock upgrading a read lock.
    const BEGIN_WRITE: &'static str = "BEGIN IMMEDIATE";
    const LOCK_ROWS: &'static str = "";
    /// In WAL mode a read transaction reads one snapshot until it ends, while writers go on
    /// committing to the WAL.
    const BEGIN_SNAPSHOT: &'static str = "BEGIN DEFERRED";
    /// `MAX` with two arguments is SQLite's scalar maximum.
    const GREATEST: &'static str = "MAX";
    /// CROSS JOIN makes the left table (the keys) the outer loop: SQLite 3.40's planner, left to
    /// choose, scans messages instead.
    const KEYS_JOIN: &'static str = "CROSS JOIN";

    fn rows_affected(done: &Self::QueryResult) -> u64 {
        done.rows_affected()
    }
}

impl SqlStore<Sqlite> {
    /// Opens (creating if missing) the database file and runs the embedded migrations.
    pub async fn open(path: &Path) -> anyhow::Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let opts = SqliteConnectOptions::from_str("sqlite://")?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10))
            // A commit's dedupe lookups and index inserts touch pages all over the message
            // indexes; SQLite's default 2 MiB page cache made them re-read pages through the
            // kernel on every batch. Memory-mapped reads skip the copy for what the cache misses.
            .pragma("cache_size", format!("-{}", CACHE_KIB))
            .pragma("mmap_size", MMAP_BYTES.to_string())
            .pragma("temp_store", "memory")
            // A batch dirties one index page per room it touches, and the same pages again in the
            // next batch: checkpointing after every ~40 MiB of WAL instead of every 4 MiB writes
            // each hot page to the database file once per checkpoint instead of many times.
            .pragma("wal_autocheckpoint", WAL_AUTOCHECKPOINT_PAGES.to_string());
        let pool = SqlitePoolOptions::new().max_connections(4).min_connections(1).connect_with(opts).await?;
        MIGRATOR.run(&pool).await?;
        Ok(Self::new(pool))
    }
}

#[cfg(test)]
mod tests {
    use sqlx::Row;

    use super::*;
    use crate::domain::Timestamp;
    use crate::store::SendRequest;

    fn request(n: u32) -> SendRequest {
        SendRequest {
            message_id: format!("m{n}"),
            room_id: "r".into(),
            sender_id: "u".into(),
            client_msg_id: format!("c{n}"),
            body: "hi".into(),
            created_at: Timestamp(0),
            trace: String::new(),
            membership: 0,
            epoch: None,
        }
    }

    /// A batch's dedupe lookup must cost index probes, not a pass over every stored message.
    #[tokio::test]
    async fn dedupe_lookup_probes_the_index_instead_of_scanning_messages() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("plan.db")).await.unwrap();
        let batch = [request(1), request(2)];
        let sql = format!("EXPLAIN QUERY PLAN {}", SqliteStore::dedupe_lookup(&batch).sql().as_str());
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for r in &batch {
            q = q.bind(&r.room_id).bind(&r.sender_id).bind(&r.client_msg_id);
        }
        let plan: Vec<String> =
            q.fetch_all(&store.pool).await.unwrap().iter().map(|row| row.get::<String, _>("detail")).collect();
        assert!(
            plan.iter().any(|d| d.starts_with("SEARCH m USING INDEX messages_dedupe")),
            "no dedupe-index probe in {plan:?}"
        );
        assert!(!plan.iter().any(|d| d.starts_with("SCAN m")), "messages scanned: {plan:?}");
    }
}
