//! PostgreSQL store for cluster mode: the durable store behind the Redis sequencer, and a complete
//! `Store` on its own (its `append_messages` sequences in a transaction, like SQLite's).
//! Migrations are embedded in the binary. Same schema semantics as SQLite (times are BIGINT Unix
//! ms, key columns compare bytewise).
//!
//! Lock discipline: the room row lock serializes the writers of one room, which keeps its seqs
//! gap-free. A transaction that writes messages takes its rooms' locks before inserting, in id
//! order (`SELECT ... ORDER BY id FOR UPDATE` when it spans several rooms), so concurrent append
//! and upsert batches never deadlock each other.

use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgPool, PgPoolOptions, PgRow};
use sqlx::{Postgres, QueryBuilder, Row, Transaction};

use super::{
    AppendOutcome, ExportConsistency, ExportSnapshot, Membership, NewRoom, NewUser, RoomPatch, SendRequest, Store,
    StoreError, StoreResult, UserPatch, UserRecord,
};
use crate::domain::{Message, Room, Timestamp, User, Visibility};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// Connections per process. The hot paths (append, upsert, reads) hold one only for a statement
/// or a short transaction.
const MAX_CONNECTIONS: u32 = 10;
/// How long a caller waits for a pooled connection before the store reports `Unavailable`.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

const USER_COLS: &str = "id, username, display_name, status_text, avatar_url, created_at, updated_at";
const ROOM_COLS: &str =
    "id, name, topic, visibility, owner_id, home_region, head_seq, member_count, created_at, updated_at";
const MSG_COLS: &str = "id, room_id, seq, sender_id, client_msg_id, body, created_at";
/// Rows per multi-row insert of an import (at most 10 bound values each): far below PostgreSQL's
/// 65535 bound-parameter limit.
const IMPORT_CHUNK: usize = 1000;

pub struct PostgresStore {
    pool: PgPool,
}

fn unavailable(e: sqlx::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
}

/// `ROOM_COLS` / `USER_COLS` qualified with a table alias, for joins.
fn qualified(cols: &str, alias: &str) -> String {
    cols.split(", ").map(|c| format!("{alias}.{c}")).collect::<Vec<_>>().join(", ")
}

fn user_from(row: &PgRow) -> Result<User, sqlx::Error> {
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

fn room_from(row: &PgRow) -> Result<Room, sqlx::Error> {
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

fn message_from(row: &PgRow) -> Result<Message, sqlx::Error> {
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

fn membership_from(row: &PgRow) -> Result<Membership, sqlx::Error> {
    Ok(Membership {
        room_id: row.try_get("room_id")?,
        user_id: row.try_get("user_id")?,
        joined_at: Timestamp(row.try_get("joined_at")?),
    })
}

fn user_record_from(row: &PgRow) -> Result<UserRecord, sqlx::Error> {
    Ok(UserRecord { user: user_from(row)?, password_hash: row.try_get("password_hash")? })
}

fn decode_all<T>(rows: &[PgRow], from: fn(&PgRow) -> Result<T, sqlx::Error>) -> StoreResult<Vec<T>> {
    rows.iter().map(from).collect::<Result<_, _>>().map_err(unavailable)
}

/// A foreign key failure in an import: the batch names a room or user the store does not have.
fn import_error(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::Database(d) if d.is_foreign_key_violation() => {
            if d.constraint().is_some_and(|c| c.contains("room_id")) {
                StoreError::NotFound("room")
            } else {
                StoreError::NotFound("user")
            }
        }
        _ => unavailable(e),
    }
}

/// [`Store::export`] for PostgreSQL: one `REPEATABLE READ, READ ONLY` transaction on one pooled
/// connection. Its snapshot is taken by its first statement (which `export` runs at once) and
/// every page is read from it; writers are not blocked and their later commits are not seen.
/// While it is open, VACUUM cannot remove row versions newer than its snapshot.
pub struct PostgresExport {
    tx: Transaction<'static, Postgres>,
}

#[async_trait]
impl ExportSnapshot for PostgresExport {
    fn consistency(&self) -> ExportConsistency {
        ExportConsistency::Snapshot
    }

    async fn users_page(&mut self, after: Option<&str>, limit: u32) -> StoreResult<Vec<UserRecord>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let sql = match after {
            Some(_) => format!("SELECT {USER_COLS}, password_hash FROM users WHERE id > $2 ORDER BY id LIMIT $1"),
            None => format!("SELECT {USER_COLS}, password_hash FROM users ORDER BY id LIMIT $1"),
        };
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(i64::from(limit));
        if let Some(id) = after {
            q = q.bind(id);
        }
        let rows = q.fetch_all(&mut *self.tx).await.map_err(unavailable)?;
        decode_all(&rows, user_record_from)
    }

    async fn rooms_page(&mut self, after: Option<&str>, limit: u32) -> StoreResult<Vec<Room>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let sql = match after {
            Some(_) => format!("SELECT {ROOM_COLS} FROM rooms WHERE id > $2 ORDER BY id LIMIT $1"),
            None => format!("SELECT {ROOM_COLS} FROM rooms ORDER BY id LIMIT $1"),
        };
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(i64::from(limit));
        if let Some(id) = after {
            q = q.bind(id);
        }
        let rows = q.fetch_all(&mut *self.tx).await.map_err(unavailable)?;
        decode_all(&rows, room_from)
    }

    async fn memberships_page(&mut self, after: Option<(&str, &str)>, limit: u32) -> StoreResult<Vec<Membership>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let cond = if after.is_some() { "WHERE (room_id, user_id) > ($2, $3)" } else { "" };
        let sql =
            format!("SELECT room_id, user_id, joined_at FROM memberships {cond} ORDER BY room_id, user_id LIMIT $1");
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(i64::from(limit));
        if let Some((room, user)) = after {
            q = q.bind(room).bind(user);
        }
        let rows = q.fetch_all(&mut *self.tx).await.map_err(unavailable)?;
        decode_all(&rows, membership_from)
    }

    async fn messages_page(&mut self, after: Option<(&str, i64)>, limit: u32) -> StoreResult<Vec<Message>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let cond = if after.is_some() { "WHERE (room_id, seq) > ($2, $3)" } else { "" };
        let sql = format!("SELECT {MSG_COLS} FROM messages {cond} ORDER BY room_id, seq LIMIT $1");
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(i64::from(limit));
        if let Some((room, seq)) = after {
            q = q.bind(room).bind(seq);
        }
        let rows = q.fetch_all(&mut *self.tx).await.map_err(unavailable)?;
        decode_all(&rows, message_from)
    }
}

/// The distinct room ids, sorted.
fn distinct_rooms<'a>(ids: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut rooms: Vec<&str> = ids.collect();
    rooms.sort_unstable();
    rooms.dedup();
    rooms
}

impl PostgresStore {
    /// Connects a pool to `url` (`postgres://user[:password]@host[:port]/database`) and runs the
    /// embedded migrations (sqlx serializes concurrent migrators with an advisory lock).
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        let pool =
            PgPoolOptions::new().max_connections(MAX_CONNECTIONS).acquire_timeout(ACQUIRE_TIMEOUT).connect(url).await?;
        MIGRATOR.run(&pool).await?;
        Ok(Self { pool })
    }

    /// Locks the rows of `rooms` in id order: a transaction holding one room lock and waiting for
    /// another is how deadlocks start, and one global order rules them out.
    async fn lock_rooms(tx: &mut Transaction<'_, Postgres>, rooms: &[&str]) -> StoreResult<()> {
        sqlx::query("SELECT id FROM rooms WHERE id = ANY($1) ORDER BY id FOR UPDATE")
            .bind(rooms)
            .fetch_all(&mut **tx)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// The stored message with this dedupe key, compared with the request's body.
    async fn dedupe_in(tx: &mut Transaction<'_, Postgres>, req: &SendRequest) -> StoreResult<Option<AppendOutcome>> {
        let sql =
            format!("SELECT {MSG_COLS} FROM messages WHERE room_id = $1 AND sender_id = $2 AND client_msg_id = $3");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(&req.room_id)
            .bind(&req.sender_id)
            .bind(&req.client_msg_id)
            .fetch_optional(&mut **tx)
            .await
            .map_err(unavailable)?;
        let Some(row) = row else { return Ok(None) };
        let original = message_from(&row).map_err(unavailable)?;
        Ok(Some(if original.body == req.body { AppendOutcome::Duplicate(original) } else { AppendOutcome::Conflict }))
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
impl Store for PostgresStore {
    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map_err(unavailable)?;
        Ok(())
    }

    async fn create_user(&self, u: NewUser) -> StoreResult<User> {
        let res = sqlx::query(
            "INSERT INTO users (id, username, display_name, status_text, avatar_url, password_hash, created_at, updated_at)
             VALUES ($1, $2, $3, '', '', $4, $5, $5)",
        )
        .bind(&u.id)
        .bind(&u.username)
        .bind(&u.display_name)
        .bind(&u.password_hash)
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
        let sql = format!("SELECT {USER_COLS} FROM users WHERE id = $1");
        let row =
            sqlx::query(sqlx::AssertSqlSafe(sql)).bind(id).fetch_optional(&self.pool).await.map_err(unavailable)?;
        row.map(|r| user_from(&r)).transpose().map_err(unavailable)
    }

    async fn credentials(&self, username: &str) -> StoreResult<Option<(User, String)>> {
        let sql = format!("SELECT {USER_COLS}, password_hash FROM users WHERE username = $1");
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
            "UPDATE users SET display_name = COALESCE($1, display_name), status_text = COALESCE($2, status_text),
             avatar_url = COALESCE($3, avatar_url), updated_at = $4 WHERE id = $5 RETURNING {USER_COLS}"
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
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        sqlx::query(
            "INSERT INTO rooms (id, name, topic, visibility, owner_id, home_region, head_seq, member_count, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, 0, 1, $7, $7)",
        )
        .bind(&r.id)
        .bind(&r.name)
        .bind(&r.topic)
        .bind(r.visibility.as_str())
        .bind(&r.owner_id)
        .bind(&r.home_region)
        .bind(r.created_at.0)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        sqlx::query("INSERT INTO memberships (room_id, user_id, joined_at) VALUES ($1, $2, $3)")
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
        let sql = format!("SELECT {ROOM_COLS} FROM rooms WHERE id = $1");
        let row =
            sqlx::query(sqlx::AssertSqlSafe(sql)).bind(id).fetch_optional(&self.pool).await.map_err(unavailable)?;
        row.map(|r| room_from(&r)).transpose().map_err(unavailable)
    }

    async fn update_room(&self, id: &str, p: RoomPatch, now: Timestamp) -> StoreResult<Room> {
        let sql = format!(
            "UPDATE rooms SET name = COALESCE($1, name), topic = COALESCE($2, topic), updated_at = $3
             WHERE id = $4 RETURNING {ROOM_COLS}"
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
            "SELECT {} FROM rooms r JOIN memberships m ON m.room_id = r.id WHERE m.user_id = $1
             ORDER BY r.created_at DESC, r.id DESC",
            qualified(ROOM_COLS, "r")
        );
        let rows =
            sqlx::query(sqlx::AssertSqlSafe(sql)).bind(user_id).fetch_all(&self.pool).await.map_err(unavailable)?;
        rows.iter().map(room_from).collect::<Result<_, _>>().map_err(unavailable)
    }

    async fn public_rooms(&self, limit: u32) -> StoreResult<Vec<Room>> {
        let sql = format!(
            "SELECT {ROOM_COLS} FROM rooms WHERE visibility = 'public' ORDER BY created_at DESC, id DESC LIMIT $1"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await
            .map_err(unavailable)?;
        rows.iter().map(room_from).collect::<Result<_, _>>().map_err(unavailable)
    }

    async fn add_member(&self, room_id: &str, user_id: &str, now: Timestamp) -> StoreResult<bool> {
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        let room = sqlx::query("SELECT 1 FROM rooms WHERE id = $1")
            .bind(room_id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(unavailable)?;
        if room.is_none() {
            return Err(StoreError::NotFound("room"));
        }
        // A concurrent insert of the same membership makes this wait for that transaction, then
        // do nothing: exactly one of them counts the member.
        let added = sqlx::query(
            "INSERT INTO memberships (room_id, user_id, joined_at) VALUES ($1, $2, $3)
             ON CONFLICT (room_id, user_id) DO NOTHING",
        )
        .bind(room_id)
        .bind(user_id)
        .bind(now.0)
        .execute(&mut *tx)
        .await
        .map_err(|e| match &e {
            sqlx::Error::Database(d) if d.is_foreign_key_violation() => {
                if d.constraint() == Some("memberships_room_id_fkey") {
                    StoreError::NotFound("room")
                } else {
                    StoreError::NotFound("user")
                }
            }
            _ => unavailable(e),
        })?
        .rows_affected()
            == 1;
        if added {
            sqlx::query("UPDATE rooms SET member_count = member_count + 1 WHERE id = $1")
                .bind(room_id)
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
        }
        tx.commit().await.map_err(unavailable)?;
        Ok(added)
    }

    async fn remove_member(&self, room_id: &str, user_id: &str) -> StoreResult<bool> {
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        let removed = sqlx::query("DELETE FROM memberships WHERE room_id = $1 AND user_id = $2")
            .bind(room_id)
            .bind(user_id)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?
            .rows_affected()
            == 1;
        if removed {
            sqlx::query("UPDATE rooms SET member_count = member_count - 1 WHERE id = $1")
                .bind(room_id)
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
        }
        tx.commit().await.map_err(unavailable)?;
        Ok(removed)
    }

    async fn is_member(&self, room_id: &str, user_id: &str) -> StoreResult<bool> {
        let found = sqlx::query("SELECT 1 FROM memberships WHERE room_id = $1 AND user_id = $2")
            .bind(room_id)
            .bind(user_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(found.is_some())
    }

    async fn members(&self, room_id: &str) -> StoreResult<Vec<User>> {
        let sql = format!(
            "SELECT {} FROM users u JOIN memberships m ON m.user_id = u.id WHERE m.room_id = $1
             ORDER BY m.joined_at, u.id",
            qualified(USER_COLS, "u")
        );
        let rows =
            sqlx::query(sqlx::AssertSqlSafe(sql)).bind(room_id).fetch_all(&self.pool).await.map_err(unavailable)?;
        rows.iter().map(user_from).collect::<Result<_, _>>().map_err(unavailable)
    }

    async fn room_ids_of_user(&self, user_id: &str) -> StoreResult<Vec<String>> {
        sqlx::query_scalar("SELECT room_id FROM memberships WHERE user_id = $1 ORDER BY room_id")
            .bind(user_id)
            .fetch_all(&self.pool)
            .await
            .map_err(unavailable)
    }

    async fn append_messages(&self, batch: &[SendRequest]) -> StoreResult<Vec<AppendOutcome>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        let rooms = distinct_rooms(batch.iter().map(|r| r.room_id.as_str()));
        if rooms.len() > 1 {
            Self::lock_rooms(&mut tx, &rooms).await?;
        }
        // (With one room, the UPDATE that bumps head_seq below takes the lock before any insert.)
        let mut out = Vec::with_capacity(batch.len());
        for req in batch {
            if let Some(outcome) = Self::dedupe_in(&mut tx, req).await? {
                out.push(outcome);
                continue;
            }
            // The row lock taken here (or by lock_rooms) is held to commit: writers of one room
            // take turns, so each sees the previous one's head and seqs stay gap-free.
            let seq: Option<i64> =
                sqlx::query_scalar("UPDATE rooms SET head_seq = head_seq + 1 WHERE id = $1 RETURNING head_seq")
                    .bind(&req.room_id)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(unavailable)?;
            let Some(seq) = seq else {
                out.push(AppendOutcome::RoomMissing);
                continue;
            };
            // DO NOTHING rather than an error: an error would abort the whole transaction.
            let inserted = sqlx::query(
                "INSERT INTO messages (room_id, seq, id, sender_id, client_msg_id, body, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
            )
            .bind(&req.room_id)
            .bind(seq)
            .bind(&req.message_id)
            .bind(&req.sender_id)
            .bind(&req.client_msg_id)
            .bind(&req.body)
            .bind(req.created_at.0)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?
            .rows_affected()
                == 1;
            if !inserted {
                // Someone stored this dedupe key between our lookup and our lock (a concurrent
                // retry of the same send, committed while we waited for the room). We still hold
                // the room lock, so nobody moved the head since we bumped it: give the seq back
                // and answer with what is stored.
                sqlx::query("UPDATE rooms SET head_seq = head_seq - 1 WHERE id = $1")
                    .bind(&req.room_id)
                    .execute(&mut *tx)
                    .await
                    .map_err(unavailable)?;
                match Self::dedupe_in(&mut tx, req).await? {
                    Some(outcome) => {
                        out.push(outcome);
                        continue;
                    }
                    None => {
                        return Err(StoreError::Unavailable(format!(
                            "message {} (room {}, seq {seq}) collides with a stored message",
                            req.message_id, req.room_id
                        )));
                    }
                }
            }
            out.push(AppendOutcome::Accepted(Message {
                id: req.message_id.clone(),
                room_id: req.room_id.clone(),
                seq,
                sender_id: req.sender_id.clone(),
                client_msg_id: req.client_msg_id.clone(),
                body: req.body.clone(),
                created_at: req.created_at,
            }));
        }
        tx.commit().await.map_err(unavailable)?;
        Ok(out)
    }

    async fn upsert_messages(&self, batch: &[Message]) -> StoreResult<()> {
        if batch.is_empty() {
            return Ok(());
        }
        // One INSERT for the whole batch (columns as arrays, UNNEST), in (room, seq) order so that
        // overlapping batches insert keys in the same order.
        let mut msgs: Vec<&Message> = batch.iter().collect();
        msgs.sort_by(|a, b| (a.room_id.as_str(), a.seq).cmp(&(b.room_id.as_str(), b.seq)));
        let mut room_ids = Vec::with_capacity(msgs.len());
        let mut seqs = Vec::with_capacity(msgs.len());
        let mut ids = Vec::with_capacity(msgs.len());
        let mut senders = Vec::with_capacity(msgs.len());
        let mut client_msg_ids = Vec::with_capacity(msgs.len());
        let mut bodies = Vec::with_capacity(msgs.len());
        let mut created = Vec::with_capacity(msgs.len());
        // Highest seq per room; msgs is sorted, so the last one of each room wins.
        let mut heads: Vec<(&str, i64)> = Vec::new();
        for m in &msgs {
            room_ids.push(m.room_id.as_str());
            seqs.push(m.seq);
            ids.push(m.id.as_str());
            senders.push(m.sender_id.as_str());
            client_msg_ids.push(m.client_msg_id.as_str());
            bodies.push(m.body.as_str());
            created.push(m.created_at.0);
            match heads.last_mut() {
                Some((room, head)) if *room == m.room_id => *head = (*head).max(m.seq),
                _ => heads.push((m.room_id.as_str(), m.seq)),
            }
        }
        let (head_rooms, head_seqs): (Vec<&str>, Vec<i64>) = heads.into_iter().unzip();

        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        // Room locks first, in the order append_messages takes them, and before any insert: every
        // insert into a room then happens under its lock, so no two writers wait on each other's
        // uncommitted rows while holding a room (no deadlock with appends or other upserts).
        Self::lock_rooms(&mut tx, &head_rooms).await?;
        // ON CONFLICT without a target skips a row that collides on any unique key: the primary
        // key (room_id, seq), the message id, or the dedupe key.
        sqlx::query(
            "INSERT INTO messages (room_id, seq, id, sender_id, client_msg_id, body, created_at)
             SELECT * FROM UNNEST($1::text[], $2::int8[], $3::text[], $4::text[], $5::text[], $6::text[], $7::int8[])
             ON CONFLICT DO NOTHING",
        )
        .bind(&room_ids)
        .bind(&seqs)
        .bind(&ids)
        .bind(&senders)
        .bind(&client_msg_ids)
        .bind(&bodies)
        .bind(&created)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        sqlx::query(
            "UPDATE rooms r SET head_seq = GREATEST(r.head_seq, h.seq)
             FROM UNNEST($1::text[], $2::int8[]) AS h (room_id, seq)
             WHERE r.id = h.room_id",
        )
        .bind(&head_rooms)
        .bind(&head_seqs)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        Ok(())
    }

    async fn messages_after(&self, room_id: &str, after_seq: i64, limit: u32) -> StoreResult<Vec<Message>> {
        let sql = format!("SELECT {MSG_COLS} FROM messages WHERE room_id = $1 AND seq > $2 ORDER BY seq LIMIT $3");
        self.fetch_messages(sql, room_id, after_seq, limit).await
    }

    async fn messages_before(&self, room_id: &str, before_seq: i64, limit: u32) -> StoreResult<Vec<Message>> {
        let sql = format!("SELECT {MSG_COLS} FROM messages WHERE room_id = $1 AND seq < $2 ORDER BY seq DESC LIMIT $3");
        let mut msgs = self.fetch_messages(sql, room_id, before_seq, limit).await?;
        msgs.reverse();
        Ok(msgs)
    }

    async fn head_seq(&self, room_id: &str) -> StoreResult<Option<i64>> {
        sqlx::query_scalar("SELECT head_seq FROM rooms WHERE id = $1")
            .bind(room_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(unavailable)
    }

    async fn export(&self) -> StoreResult<Box<dyn ExportSnapshot>> {
        let mut tx =
            self.pool.begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY").await.map_err(unavailable)?;
        // The snapshot of a REPEATABLE READ transaction is taken by its first statement.
        sqlx::query("SELECT 1").execute(&mut *tx).await.map_err(unavailable)?;
        Ok(Box::new(PostgresExport { tx }))
    }

    async fn import_users(&self, users: &[UserRecord]) -> StoreResult<()> {
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        for chunk in users.chunks(IMPORT_CHUNK) {
            let mut q = QueryBuilder::<Postgres>::new(
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
        let mut sorted: Vec<&Room> = rooms.iter().collect();
        // Room rows are locked in id order, as everywhere else (no deadlock with writers).
        sorted.sort_by(|a, b| a.id.cmp(&b.id));
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        for chunk in sorted.chunks(IMPORT_CHUNK) {
            let mut q = QueryBuilder::<Postgres>::new(format!("INSERT INTO rooms ({ROOM_COLS}) "));
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
            q.push(" ON CONFLICT (id) DO UPDATE SET head_seq = GREATEST(rooms.head_seq, EXCLUDED.head_seq)");
            q.build().execute(&mut *tx).await.map_err(import_error)?;
        }
        tx.commit().await.map_err(unavailable)
    }

    async fn import_memberships(&self, memberships: &[Membership]) -> StoreResult<()> {
        if memberships.is_empty() {
            return Ok(());
        }
        let rooms = distinct_rooms(memberships.iter().map(|m| m.room_id.as_str()));
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        // The rooms' counters are rewritten below: lock them first, in id order.
        Self::lock_rooms(&mut tx, &rooms).await?;
        for chunk in memberships.chunks(IMPORT_CHUNK) {
            let mut q = QueryBuilder::<Postgres>::new("INSERT INTO memberships (room_id, user_id, joined_at) ");
            q.push_values(chunk, |mut b, m| {
                b.push_bind(&m.room_id).push_bind(&m.user_id).push_bind(m.joined_at.0);
            });
            q.push(" ON CONFLICT (room_id, user_id) DO NOTHING");
            q.build().execute(&mut *tx).await.map_err(import_error)?;
        }
        sqlx::query(
            "UPDATE rooms r SET member_count = (SELECT count(*) FROM memberships m WHERE m.room_id = r.id)
             WHERE r.id = ANY($1)",
        )
        .bind(&rooms)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)
    }
}
