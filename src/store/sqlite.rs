//! SQLite store for embedded mode: one file, WAL, `synchronous=FULL` so that a committed batch
//! survives a crash of the process or the machine. Migrations are embedded in the binary.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row, Sqlite, Transaction};

use super::{
    AppendOutcome, ExportConsistency, ExportSnapshot, Membership, NewRoom, NewUser, RoomPatch, SendRequest, Store,
    StoreError, StoreResult, UserPatch, UserRecord,
};
use crate::domain::{Message, Room, Timestamp, User, Visibility};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

const USER_COLS: &str = "id, username, display_name, status_text, avatar_url, created_at, updated_at";
const ROOM_COLS: &str =
    "id, name, topic, visibility, owner_id, home_region, head_seq, member_count, created_at, updated_at";
/// Rows per lookup statement (3 bound values each) and per insert (7 each): well under SQLite's
/// 32766 bound-variable limit.
const LOOKUP_CHUNK: usize = 500;
const INSERT_CHUNK: usize = 500;
/// Page cache per connection (KiB) and memory-mapped read window (bytes).
const CACHE_KIB: u64 = 64 * 1024;
const MMAP_BYTES: u64 = 256 * 1024 * 1024;
/// WAL pages (4 KiB) written before a commit checkpoints them into the database file.
const WAL_AUTOCHECKPOINT_PAGES: u64 = 10_000;
const MSG_COLS: &str = "id, room_id, seq, sender_id, client_msg_id, body, created_at";

pub struct SqliteStore {
    pool: SqlitePool,
}

fn unavailable(e: sqlx::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
}

fn user_from(row: &SqliteRow) -> Result<User, sqlx::Error> {
    Ok(User {
        id: row.try_get("id")?,
        username: row.try_get("username")?,
        display_name: row.try_get("display_name")?,
        status_text: row.try_get("status_text")?,
        avatar_url: row.try_get("avatar_url")?,
        created_at: Timestamp(row.try_get("created_at")?),
        updated_at: Timestamp(row.try_get("updated_at")?),
    })
}

fn room_from(row: &SqliteRow) -> Result<Room, sqlx::Error> {
    let visibility: String = row.try_get("visibility")?;
    Ok(Room {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        topic: row.try_get("topic")?,
        visibility: Visibility::parse(&visibility).map_err(|e| sqlx::Error::Decode(e.0.into()))?,
        owner_id: row.try_get("owner_id")?,
        home_region: row.try_get("home_region")?,
        head_seq: row.try_get("head_seq")?,
        member_count: row.try_get("member_count")?,
        created_at: Timestamp(row.try_get("created_at")?),
        updated_at: Timestamp(row.try_get("updated_at")?),
    })
}

fn message_from(row: &SqliteRow) -> Result<Message, sqlx::Error> {
    Ok(Message {
        id: row.try_get("id")?,
        room_id: row.try_get("room_id")?,
        seq: row.try_get("seq")?,
        sender_id: row.try_get("sender_id")?,
        client_msg_id: row.try_get("client_msg_id")?,
        body: row.try_get("body")?,
        created_at: Timestamp(row.try_get("created_at")?),
    })
}

fn membership_from(row: &SqliteRow) -> Result<Membership, sqlx::Error> {
    Ok(Membership {
        room_id: row.try_get("room_id")?,
        user_id: row.try_get("user_id")?,
        joined_at: Timestamp(row.try_get("joined_at")?),
    })
}

/// A foreign key failure in an import means the file names a row the store does not have.
fn import_error(e: sqlx::Error, missing: &'static str) -> StoreError {
    match &e {
        sqlx::Error::Database(d) if d.is_foreign_key_violation() => StoreError::NotFound(missing),
        _ => unavailable(e),
    }
}

/// The stored messages among `chunk`'s dedupe keys. The keys drive the loop (CROSS JOIN fixes
/// the order), one probe of the dedupe index each. The shorter
/// `(room_id, sender_id, client_msg_id) IN (VALUES ...)` gets index probes from the bundled SQLite
/// but a scan of the whole messages table from SQLite 3.40 (Debian 12's system library).
fn dedupe_lookup(chunk: &[SendRequest]) -> QueryBuilder<Sqlite> {
    let mut q = QueryBuilder::<Sqlite>::new("WITH k(r, s, c) AS (VALUES ");
    let mut sep = q.separated(", ");
    for r in chunk {
        sep.push("(").push_bind_unseparated(&r.room_id).push_unseparated(", ");
        sep.push_bind_unseparated(&r.sender_id).push_unseparated(", ");
        sep.push_bind_unseparated(&r.client_msg_id).push_unseparated(")");
    }
    // The keys' columns (r, s, c) share no name with messages', so MSG_COLS needs no prefix.
    q.push(format!(
        ") SELECT {MSG_COLS} FROM k CROSS JOIN messages AS m \
         ON m.room_id = k.r AND m.sender_id = k.s AND m.client_msg_id = k.c"
    ));
    q
}

/// [`Store::export`] for SQLite: one deferred read transaction on one pooled connection. In WAL
/// mode a read transaction reads one snapshot (the state as of its first read, which `export`
/// makes at once) until it ends, while writers go on committing to the WAL. While it is open,
/// checkpoints cannot move past its snapshot, so the WAL grows by what is written meanwhile.
pub struct SqliteExport {
    tx: Transaction<'static, Sqlite>,
}

fn decode_all<T>(rows: &[SqliteRow], from: fn(&SqliteRow) -> Result<T, sqlx::Error>) -> StoreResult<Vec<T>> {
    rows.iter().map(from).collect::<Result<_, _>>().map_err(unavailable)
}

fn user_record_from(row: &SqliteRow) -> Result<UserRecord, sqlx::Error> {
    Ok(UserRecord { user: user_from(row)?, password_hash: row.try_get("password_hash")? })
}

#[async_trait]
impl ExportSnapshot for SqliteExport {
    fn consistency(&self) -> ExportConsistency {
        ExportConsistency::Snapshot
    }

    async fn users_page(&mut self, after: Option<&str>, limit: u32) -> StoreResult<Vec<UserRecord>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let cond = if after.is_some() { "WHERE id > ?" } else { "" };
        let sql = format!("SELECT {USER_COLS}, password_hash FROM users {cond} ORDER BY id LIMIT ?");
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        if let Some(id) = after {
            q = q.bind(id);
        }
        let rows = q.bind(i64::from(limit)).fetch_all(&mut *self.tx).await.map_err(unavailable)?;
        decode_all(&rows, user_record_from)
    }

    async fn rooms_page(&mut self, after: Option<&str>, limit: u32) -> StoreResult<Vec<Room>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let cond = if after.is_some() { "WHERE id > ?" } else { "" };
        let sql = format!("SELECT {ROOM_COLS} FROM rooms {cond} ORDER BY id LIMIT ?");
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        if let Some(id) = after {
            q = q.bind(id);
        }
        let rows = q.bind(i64::from(limit)).fetch_all(&mut *self.tx).await.map_err(unavailable)?;
        decode_all(&rows, room_from)
    }

    async fn memberships_page(&mut self, after: Option<(&str, &str)>, limit: u32) -> StoreResult<Vec<Membership>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let cond = if after.is_some() { "WHERE (room_id, user_id) > (?, ?)" } else { "" };
        let sql =
            format!("SELECT room_id, user_id, joined_at FROM memberships {cond} ORDER BY room_id, user_id LIMIT ?");
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        if let Some((room, user)) = after {
            q = q.bind(room).bind(user);
        }
        let rows = q.bind(i64::from(limit)).fetch_all(&mut *self.tx).await.map_err(unavailable)?;
        decode_all(&rows, membership_from)
    }

    async fn messages_page(&mut self, after: Option<(&str, i64)>, limit: u32) -> StoreResult<Vec<Message>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let cond = if after.is_some() { "WHERE (room_id, seq) > (?, ?)" } else { "" };
        let sql = format!("SELECT {MSG_COLS} FROM messages {cond} ORDER BY room_id, seq LIMIT ?");
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        if let Some((room, seq)) = after {
            q = q.bind(room).bind(seq);
        }
        let rows = q.bind(i64::from(limit)).fetch_all(&mut *self.tx).await.map_err(unavailable)?;
        decode_all(&rows, message_from)
    }
}

impl SqliteStore {
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
        Ok(Self { pool })
    }

    async fn room_in(tx: &mut Transaction<'_, Sqlite>, id: &str) -> Result<Option<Room>, sqlx::Error> {
        let sql = format!("SELECT {ROOM_COLS} FROM rooms WHERE id = ?");
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .fetch_optional(&mut **tx)
            .await?
            .map(|r| room_from(&r))
            .transpose()
    }

    async fn fetch_messages(&self, sql: String, room_id: &str, seq: i64, limit: u32) -> StoreResult<Vec<Message>> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(room_id)
            .bind(seq)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await
            .map_err(unavailable)?;
        rows.iter().map(message_from).collect::<Result<_, _>>().map_err(unavailable)
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map_err(unavailable)?;
        Ok(())
    }

    async fn create_user(&self, u: NewUser) -> StoreResult<User> {
        let res = sqlx::query(
            "INSERT INTO users (id, username, display_name, status_text, avatar_url, password_hash, created_at, updated_at)
             VALUES (?, ?, ?, '', '', ?, ?, ?)",
        )
        .bind(&u.id)
        .bind(&u.username)
        .bind(&u.display_name)
        .bind(&u.password_hash)
        .bind(u.created_at.0)
        .bind(u.created_at.0)
        .execute(&self.pool)
        .await;
        match res {
            Ok(_) => Ok(User {
                id: u.id,
                username: u.username,
                display_name: u.display_name,
                status_text: String::new(),
                avatar_url: String::new(),
                created_at: u.created_at,
                updated_at: u.created_at,
            }),
            Err(e) if is_unique_violation(&e) => Err(StoreError::UsernameTaken),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn user(&self, id: &str) -> StoreResult<Option<User>> {
        let sql = format!("SELECT {USER_COLS} FROM users WHERE id = ?");
        let row =
            sqlx::query(sqlx::AssertSqlSafe(sql)).bind(id).fetch_optional(&self.pool).await.map_err(unavailable)?;
        row.map(|r| user_from(&r)).transpose().map_err(unavailable)
    }

    async fn credentials(&self, username: &str) -> StoreResult<Option<(User, String)>> {
        let sql = format!("SELECT {USER_COLS}, password_hash FROM users WHERE username = ?");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(username)
            .fetch_optional(&self.pool)
            .await
            .map_err(unavailable)?;
        match row {
            None => Ok(None),
            Some(r) => {
                let user = user_from(&r).map_err(unavailable)?;
                let hash: String = r.try_get("password_hash").map_err(unavailable)?;
                Ok(Some((user, hash)))
            }
        }
    }

    async fn update_user(&self, id: &str, p: UserPatch, now: Timestamp) -> StoreResult<User> {
        let sql = format!(
            "UPDATE users SET display_name = COALESCE(?, display_name), status_text = COALESCE(?, status_text),
             avatar_url = COALESCE(?, avatar_url), updated_at = ? WHERE id = ? RETURNING {USER_COLS}"
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(p.display_name)
            .bind(p.status_text)
            .bind(p.avatar_url)
            .bind(now.0)
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(unavailable)?;
        row.map(|r| user_from(&r)).transpose().map_err(unavailable)?.ok_or(StoreError::NotFound("user"))
    }

    async fn create_room(&self, r: NewRoom) -> StoreResult<Room> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await.map_err(unavailable)?;
        sqlx::query(
            "INSERT INTO rooms (id, name, topic, visibility, owner_id, home_region, head_seq, member_count, created_at, updated_at)
             VALUES (?, ?, ?, ?, ?, ?, 0, 1, ?, ?)",
        )
        .bind(&r.id)
        .bind(&r.name)
        .bind(&r.topic)
        .bind(r.visibility.as_str())
        .bind(&r.owner_id)
        .bind(&r.home_region)
        .bind(r.created_at.0)
        .bind(r.created_at.0)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        sqlx::query("INSERT INTO memberships (room_id, user_id, joined_at) VALUES (?, ?, ?)")
            .bind(&r.id)
            .bind(&r.owner_id)
            .bind(r.created_at.0)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        Ok(Room {
            id: r.id,
            name: r.name,
            topic: r.topic,
            visibility: r.visibility,
            owner_id: r.owner_id,
            home_region: r.home_region,
            head_seq: 0,
            member_count: 1,
            created_at: r.created_at,
            updated_at: r.created_at,
        })
    }

    async fn room(&self, id: &str) -> StoreResult<Option<Room>> {
        let sql = format!("SELECT {ROOM_COLS} FROM rooms WHERE id = ?");
        let row =
            sqlx::query(sqlx::AssertSqlSafe(sql)).bind(id).fetch_optional(&self.pool).await.map_err(unavailable)?;
        row.map(|r| room_from(&r)).transpose().map_err(unavailable)
    }

    async fn update_room(&self, id: &str, p: RoomPatch, now: Timestamp) -> StoreResult<Room> {
        let sql = format!(
            "UPDATE rooms SET name = COALESCE(?, name), topic = COALESCE(?, topic), updated_at = ?
             WHERE id = ? RETURNING {ROOM_COLS}"
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(p.name)
            .bind(p.topic)
            .bind(now.0)
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(unavailable)?;
        row.map(|r| room_from(&r)).transpose().map_err(unavailable)?.ok_or(StoreError::NotFound("room"))
    }

    async fn rooms_of_user(&self, user_id: &str) -> StoreResult<Vec<Room>> {
        let sql = format!(
            "SELECT {} FROM rooms r JOIN memberships m ON m.room_id = r.id WHERE m.user_id = ?
             ORDER BY r.created_at DESC, r.id DESC",
            ROOM_COLS.split(", ").map(|c| format!("r.{c}")).collect::<Vec<_>>().join(", ")
        );
        let rows =
            sqlx::query(sqlx::AssertSqlSafe(sql)).bind(user_id).fetch_all(&self.pool).await.map_err(unavailable)?;
        rows.iter().map(room_from).collect::<Result<_, _>>().map_err(unavailable)
    }

    async fn public_rooms(&self, limit: u32) -> StoreResult<Vec<Room>> {
        let sql = format!(
            "SELECT {ROOM_COLS} FROM rooms WHERE visibility = 'public' ORDER BY created_at DESC, id DESC LIMIT ?"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await
            .map_err(unavailable)?;
        rows.iter().map(room_from).collect::<Result<_, _>>().map_err(unavailable)
    }

    async fn add_member(&self, room_id: &str, user_id: &str, now: Timestamp) -> StoreResult<bool> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await.map_err(unavailable)?;
        if Self::room_in(&mut tx, room_id).await.map_err(unavailable)?.is_none() {
            return Err(StoreError::NotFound("room"));
        }
        let added = sqlx::query("INSERT OR IGNORE INTO memberships (room_id, user_id, joined_at) VALUES (?, ?, ?)")
            .bind(room_id)
            .bind(user_id)
            .bind(now.0)
            .execute(&mut *tx)
            .await
            .map_err(|e| match &e {
                sqlx::Error::Database(d) if d.is_foreign_key_violation() => StoreError::NotFound("user"),
                _ => unavailable(e),
            })?
            .rows_affected()
            == 1;
        if added {
            sqlx::query("UPDATE rooms SET member_count = member_count + 1 WHERE id = ?")
                .bind(room_id)
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
        }
        tx.commit().await.map_err(unavailable)?;
        Ok(added)
    }

    async fn remove_member(&self, room_id: &str, user_id: &str) -> StoreResult<bool> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await.map_err(unavailable)?;
        let removed = sqlx::query("DELETE FROM memberships WHERE room_id = ? AND user_id = ?")
            .bind(room_id)
            .bind(user_id)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?
            .rows_affected()
            == 1;
        if removed {
            sqlx::query("UPDATE rooms SET member_count = member_count - 1 WHERE id = ?")
                .bind(room_id)
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
        }
        tx.commit().await.map_err(unavailable)?;
        Ok(removed)
    }

    async fn is_member(&self, room_id: &str, user_id: &str) -> StoreResult<bool> {
        let found = sqlx::query("SELECT 1 FROM memberships WHERE room_id = ? AND user_id = ?")
            .bind(room_id)
            .bind(user_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(found.is_some())
    }

    async fn members(&self, room_id: &str) -> StoreResult<Vec<User>> {
        let sql = format!(
            "SELECT {} FROM users u JOIN memberships m ON m.user_id = u.id WHERE m.room_id = ?
             ORDER BY m.joined_at, u.id",
            USER_COLS.split(", ").map(|c| format!("u.{c}")).collect::<Vec<_>>().join(", ")
        );
        let rows =
            sqlx::query(sqlx::AssertSqlSafe(sql)).bind(room_id).fetch_all(&self.pool).await.map_err(unavailable)?;
        rows.iter().map(user_from).collect::<Result<_, _>>().map_err(unavailable)
    }

    async fn room_ids_of_user(&self, user_id: &str) -> StoreResult<Vec<String>> {
        sqlx::query_scalar("SELECT room_id FROM memberships WHERE user_id = ?")
            .bind(user_id)
            .fetch_all(&self.pool)
            .await
            .map_err(unavailable)
    }

    async fn append_messages(&self, batch: &[SendRequest]) -> StoreResult<Vec<AppendOutcome>> {
        // A whole batch costs a handful of statements, not a few per message: dedupe lookups,
        // room heads, one multi-row insert and one head update per room. IMMEDIATE takes the write
        // lock up front, so the heads read here cannot move before the commit.
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await.map_err(unavailable)?;
        let mut known: HashMap<(String, String, String), Message> = HashMap::new();
        for chunk in batch.chunks(LOOKUP_CHUNK) {
            let mut q = dedupe_lookup(chunk);
            for row in q.build().fetch_all(&mut *tx).await.map_err(unavailable)? {
                let m = message_from(&row).map_err(unavailable)?;
                known.insert((m.room_id.clone(), m.sender_id.clone(), m.client_msg_id.clone()), m);
            }
        }
        let rooms: Vec<&str> = {
            let mut seen = HashSet::new();
            batch.iter().map(|r| r.room_id.as_str()).filter(|r| seen.insert(*r)).collect()
        };
        let mut heads: HashMap<String, i64> = HashMap::new();
        for chunk in rooms.chunks(LOOKUP_CHUNK) {
            let mut q = QueryBuilder::<Sqlite>::new("SELECT id, head_seq FROM rooms WHERE id IN (");
            let mut sep = q.separated(", ");
            for r in chunk {
                sep.push_bind(*r);
            }
            q.push(")");
            for row in q.build().fetch_all(&mut *tx).await.map_err(unavailable)? {
                heads.insert(row.try_get("id").map_err(unavailable)?, row.try_get("head_seq").map_err(unavailable)?);
            }
        }

        let mut out = Vec::with_capacity(batch.len());
        let mut fresh: Vec<Message> = Vec::new();
        let mut touched: HashSet<&str> = HashSet::new();
        for req in batch {
            let key = (req.room_id.clone(), req.sender_id.clone(), req.client_msg_id.clone());
            if let Some(original) = known.get(&key) {
                out.push(if original.body == req.body {
                    AppendOutcome::Duplicate(original.clone())
                } else {
                    AppendOutcome::Conflict
                });
                continue;
            }
            let Some(head) = heads.get_mut(&req.room_id) else {
                out.push(AppendOutcome::RoomMissing);
                continue;
            };
            *head += 1;
            touched.insert(&req.room_id);
            let msg = Message {
                id: req.message_id.clone(),
                room_id: req.room_id.clone(),
                seq: *head,
                sender_id: req.sender_id.clone(),
                client_msg_id: req.client_msg_id.clone(),
                body: req.body.clone(),
                created_at: req.created_at,
            };
            known.insert(key, msg.clone());
            fresh.push(msg.clone());
            out.push(AppendOutcome::Accepted(msg));
        }
        for chunk in fresh.chunks(INSERT_CHUNK) {
            let mut q = QueryBuilder::<Sqlite>::new(
                "INSERT INTO messages (room_id, seq, id, sender_id, client_msg_id, body, created_at) ",
            );
            q.push_values(chunk, |mut b, m| {
                b.push_bind(&m.room_id)
                    .push_bind(m.seq)
                    .push_bind(&m.id)
                    .push_bind(&m.sender_id)
                    .push_bind(&m.client_msg_id)
                    .push_bind(&m.body)
                    .push_bind(m.created_at.0);
            });
            q.build().execute(&mut *tx).await.map_err(unavailable)?;
        }
        // One statement for all the batch's rooms: each statement is a round trip to the
        // connection's worker thread, and a batch may touch hundreds of rooms.
        let touched: Vec<&str> = touched.into_iter().collect();
        for chunk in touched.chunks(LOOKUP_CHUNK) {
            let mut q = QueryBuilder::<Sqlite>::new("WITH v(id, head) AS (VALUES ");
            let mut sep = q.separated(", ");
            for room in chunk {
                sep.push("(").push_bind_unseparated(*room).push_unseparated(", ");
                sep.push_bind_unseparated(heads[*room]).push_unseparated(")");
            }
            q.push(") UPDATE rooms SET head_seq = v.head FROM v WHERE rooms.id = v.id");
            q.build().execute(&mut *tx).await.map_err(unavailable)?;
        }
        tx.commit().await.map_err(unavailable)?;
        Ok(out)
    }

    async fn upsert_messages(&self, batch: &[Message]) -> StoreResult<()> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await.map_err(unavailable)?;
        for m in batch {
            sqlx::query(
                "INSERT INTO messages (room_id, seq, id, sender_id, client_msg_id, body, created_at)
                 VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            )
            .bind(&m.room_id)
            .bind(m.seq)
            .bind(&m.id)
            .bind(&m.sender_id)
            .bind(&m.client_msg_id)
            .bind(&m.body)
            .bind(m.created_at.0)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
            sqlx::query("UPDATE rooms SET head_seq = MAX(head_seq, ?) WHERE id = ?")
                .bind(m.seq)
                .bind(&m.room_id)
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
        }
        tx.commit().await.map_err(unavailable)?;
        Ok(())
    }

    async fn messages_after(&self, room_id: &str, after_seq: i64, limit: u32) -> StoreResult<Vec<Message>> {
        let sql = format!("SELECT {MSG_COLS} FROM messages WHERE room_id = ? AND seq > ? ORDER BY seq LIMIT ?");
        self.fetch_messages(sql, room_id, after_seq, limit).await
    }

    async fn messages_before(&self, room_id: &str, before_seq: i64, limit: u32) -> StoreResult<Vec<Message>> {
        let sql = format!("SELECT {MSG_COLS} FROM messages WHERE room_id = ? AND seq < ? ORDER BY seq DESC LIMIT ?");
        let mut msgs = self.fetch_messages(sql, room_id, before_seq, limit).await?;
        msgs.reverse();
        Ok(msgs)
    }

    async fn head_seq(&self, room_id: &str) -> StoreResult<Option<i64>> {
        sqlx::query_scalar("SELECT head_seq FROM rooms WHERE id = ?")
            .bind(room_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(unavailable)
    }

    async fn export(&self) -> StoreResult<Box<dyn ExportSnapshot>> {
        let mut tx = self.pool.begin_with("BEGIN DEFERRED").await.map_err(unavailable)?;
        // A deferred transaction takes its snapshot at its first read: take it now, so that the
        // export is the state as of this call.
        sqlx::query("SELECT 1 FROM users LIMIT 1").fetch_optional(&mut *tx).await.map_err(unavailable)?;
        Ok(Box::new(SqliteExport { tx }))
    }

    async fn import_users(&self, users: &[UserRecord]) -> StoreResult<()> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await.map_err(unavailable)?;
        for chunk in users.chunks(INSERT_CHUNK) {
            let mut q = QueryBuilder::<Sqlite>::new(
                "INSERT INTO users (id, username, display_name, status_text, avatar_url, password_hash, created_at, updated_at) ",
            );
            q.push_values(chunk, |mut b, r| {
                b.push_bind(&r.user.id)
                    .push_bind(&r.user.username)
                    .push_bind(&r.user.display_name)
                    .push_bind(&r.user.status_text)
                    .push_bind(&r.user.avatar_url)
                    .push_bind(&r.password_hash)
                    .push_bind(r.user.created_at.0)
                    .push_bind(r.user.updated_at.0);
            });
            // Only a stored id is "already there"; a username held by another id still fails.
            q.push(" ON CONFLICT (id) DO NOTHING");
            q.build()
                .execute(&mut *tx)
                .await
                .map_err(|e| if is_unique_violation(&e) { StoreError::UsernameTaken } else { unavailable(e) })?;
        }
        tx.commit().await.map_err(unavailable)
    }

    async fn import_rooms(&self, rooms: &[Room]) -> StoreResult<()> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await.map_err(unavailable)?;
        for chunk in rooms.chunks(INSERT_CHUNK) {
            let mut q = QueryBuilder::<Sqlite>::new(format!("INSERT INTO rooms ({ROOM_COLS}) "));
            q.push_values(chunk, |mut b, r| {
                b.push_bind(&r.id)
                    .push_bind(&r.name)
                    .push_bind(&r.topic)
                    .push_bind(r.visibility.as_str())
                    .push_bind(&r.owner_id)
                    .push_bind(&r.home_region)
                    .push_bind(r.head_seq)
                    .push_bind(r.member_count)
                    .push_bind(r.created_at.0)
                    .push_bind(r.updated_at.0);
            });
            q.push(" ON CONFLICT (id) DO UPDATE SET head_seq = MAX(head_seq, excluded.head_seq)");
            q.build().execute(&mut *tx).await.map_err(|e| import_error(e, "user"))?;
        }
        tx.commit().await.map_err(unavailable)
    }

    async fn import_memberships(&self, memberships: &[Membership]) -> StoreResult<()> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await.map_err(unavailable)?;
        for chunk in memberships.chunks(INSERT_CHUNK) {
            let mut q = QueryBuilder::<Sqlite>::new("INSERT INTO memberships (room_id, user_id, joined_at) ");
            q.push_values(chunk, |mut b, m| {
                b.push_bind(&m.room_id).push_bind(&m.user_id).push_bind(m.joined_at.0);
            });
            q.push(" ON CONFLICT (room_id, user_id) DO NOTHING");
            q.build().execute(&mut *tx).await.map_err(|e| import_error(e, "room or user"))?;
        }
        let rooms: Vec<&str> = {
            let mut seen = HashSet::new();
            memberships.iter().map(|m| m.room_id.as_str()).filter(|r| seen.insert(*r)).collect()
        };
        for chunk in rooms.chunks(LOOKUP_CHUNK) {
            let mut q = QueryBuilder::<Sqlite>::new(
                "UPDATE rooms SET member_count = (SELECT count(*) FROM memberships m WHERE m.room_id = rooms.id)
                 WHERE id IN (",
            );
            let mut sep = q.separated(", ");
            for r in chunk {
                sep.push_bind(*r);
            }
            q.push(")");
            q.build().execute(&mut *tx).await.map_err(unavailable)?;
        }
        tx.commit().await.map_err(unavailable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        }
    }

    /// A batch's dedupe lookup must cost index probes, not a pass over every stored message.
    #[tokio::test]
    async fn dedupe_lookup_probes_the_index_instead_of_scanning_messages() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("plan.db")).await.unwrap();
        let batch = [request(1), request(2)];
        let sql = format!("EXPLAIN QUERY PLAN {}", dedupe_lookup(&batch).sql().as_str());
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
