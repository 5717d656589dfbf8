//! The SQL store, written once for SQLite and PostgreSQL: [`SqlStore<D>`] over sqlx's generic
//! [`Database`], where `D` is the backend's sqlx database type and its [`Dialect`] says the few
//! things that differ. Opening a store (file and pragmas, pool) is each backend's own:
//! [`super::sqlite`], [`super::postgres`].
//!
//! Both schemas (migrations/) have the same tables, columns and keys; times are Unix ms in
//! 64-bit integers and key columns compare bytewise. Rows decode into the domain models by their
//! `sqlx::FromRow` derives.
//!
//! Lock discipline (what keeps each room's seqs gap-free): every transaction that writes messages
//! or a room's counters first reads its rooms with [`Dialect::LOCK_ROWS`], in id order, and holds
//! them to commit. On PostgreSQL that is `FOR UPDATE`: writers of one room take turns and
//! concurrent batches never deadlock. On SQLite, `BEGIN IMMEDIATE` already makes every writer
//! wait for the one before. Recording a room's fences takes the same lock, which is what makes a
//! fenced write-back's check and write atomic with respect to a takeover's fence.
//!
//! Leases need no lock: each operation on one is a single conditional statement on its row.

mod dialect;
mod errors;

use async_trait::async_trait;
use sqlx::query_builder::Separated;
use sqlx::{
    ColumnIndex, Database, Decode, Encode, Executor, FromRow, IntoArguments, Pool, QueryBuilder, Transaction, Type,
};

pub use dialect::Dialect;
use errors::{missing, unavailable, username_taken};

use super::append::{self, distinct};
use super::fence;
use super::{
    AppendOutcome, ExportConsistency, ExportSnapshot, FencedMessage, Lease, Member, Membership, NewRoom, NewUser,
    RoomFence, RoomPatch, SendRequest, Store, StoreError, StoreResult, UserPatch, UserRecord,
};
use crate::domain::{Message, Room, RoomId, Timestamp, User, UserId};

const USER_COLS: &str = "id, username, display_name, status_text, avatar_url, created_at, updated_at";
const ROOM_COLS: &str =
    "id, name, topic, visibility, owner_id, home_region, head_seq, member_count, created_at, updated_at";
const MEMBERSHIP_COLS: &str = "room_id, user_id, joined_at";
const MSG_COLS: &str = "id, room_id, seq, sender_id, client_msg_id, body, created_at";
const LEASE_COLS: &str = "name, holder, token, expires_at";
const FENCE_COLS: &str = "room_id, token, from_seq";
/// Rows per multi-row statement (at most 10 bound values each): far below SQLite's 32766 and
/// PostgreSQL's 65535 bound-value limits.
const CHUNK: usize = 500;

/// `col = …, col_v = …, `: the field written only if `value` is given and `version` is newer
/// than the version of its last write (an empty version: written, its version kept).
fn versioned<DB: Database>(q: &mut QueryBuilder<DB>, col: &str, value: Option<String>, version: &str)
where
    for<'a> Option<String>: Encode<'a, DB> + Type<DB>,
{
    let v = Some(version.to_string());
    q.push(format!("{col} = CASE WHEN ")).push_bind(value.clone()).push(" IS NOT NULL AND (").push_bind(v.clone());
    q.push(" = '' OR ").push_bind(v.clone()).push(format!(" > {col}_v) THEN ")).push_bind(value.clone());
    q.push(format!(" ELSE {col} END, {col}_v = CASE WHEN ")).push_bind(value).push(" IS NOT NULL AND ");
    q.push_bind(v.clone()).push(format!(" > {col}_v THEN ")).push_bind(v).push(format!(" ELSE {col}_v END, "));
}

/// `cols` qualified with a table alias, for joins.
fn qualified(cols: &str, alias: &str) -> String {
    cols.split(", ").map(|c| format!("{alias}.{c}")).collect::<Vec<_>>().join(", ")
}

/// The store over a pool of backend `D`.
pub struct SqlStore<D: Database> {
    pub(super) pool: Pool<D>,
}

/// [`Store::export`]: one read-only transaction opened with [`Dialect::BEGIN_SNAPSHOT`] on one
/// pooled connection, its snapshot taken by `export`. SQLite (WAL) cannot checkpoint past it
/// while it is open, so the WAL grows by what is written meanwhile; PostgreSQL's VACUUM cannot
/// remove row versions newer than it.
pub struct SqlExport<D: Database> {
    tx: Transaction<'static, D>,
}

/// A value of a keyset cursor.
enum Key<'a> {
    Text(&'a str),
    Int(i64),
}

impl<D: Database> SqlStore<D> {
    pub(super) fn new(pool: Pool<D>) -> Self {
        Self { pool }
    }
}

// Rust does not carry an impl's where-clauses along with `D: Dialect`, so each generic impl
// below states what it needs of the backend's types; sqlx's SQLite and PostgreSQL have all of it.
impl<D> SqlStore<D>
where
    D: Dialect,
    for<'c> &'c mut D::Connection: Executor<'c, Database = D>,
    for<'a> &'a str: Encode<'a, D> + Type<D> + ColumnIndex<D::Row>,
    for<'a> i64: Encode<'a, D> + Decode<'a, D> + Type<D>,
    for<'a> String: Decode<'a, D> + Type<D>,
    for<'a> Option<String>: Encode<'a, D> + Type<D>,
    usize: ColumnIndex<D::Row>,
    D::Arguments: IntoArguments<D>,
{
    fn insert_users<'r>(rows: impl IntoIterator<Item = &'r UserRecord>, tail: &str) -> QueryBuilder<D> {
        let mut q = QueryBuilder::new(format!("INSERT INTO users ({USER_COLS}, password_hash) "));
        q.push_values(rows, |mut b, r| {
            let u = &r.user;
            b.push_bind(u.id.as_str())
                .push_bind(u.username.as_str())
                .push_bind(u.display_name.as_str())
                .push_bind(u.status_text.as_str())
                .push_bind(u.avatar_url.as_str())
                .push_bind(u.created_at.0)
                .push_bind(u.updated_at.0)
                .push_bind(r.password_hash.as_str());
        });
        q.push(tail);
        q
    }

    fn insert_rooms<'r>(rows: impl IntoIterator<Item = &'r Room>, tail: &str) -> QueryBuilder<D> {
        let mut q = QueryBuilder::new(format!("INSERT INTO rooms ({ROOM_COLS}) "));
        q.push_values(rows, |mut b, r| {
            b.push_bind(r.id.as_str())
                .push_bind(r.name.as_str())
                .push_bind(r.topic.as_str())
                .push_bind(r.visibility.as_str())
                .push_bind(r.owner_id.as_str())
                .push_bind(r.home_region.as_str())
                .push_bind(r.head_seq)
                .push_bind(r.member_count)
                .push_bind(r.created_at.0)
                .push_bind(r.updated_at.0);
        });
        q.push(tail);
        q
    }

    fn insert_memberships<'r>(rows: impl IntoIterator<Item = &'r Membership>, tail: &str) -> QueryBuilder<D> {
        let mut q = QueryBuilder::new(format!("INSERT INTO memberships ({MEMBERSHIP_COLS}) "));
        q.push_values(rows, |mut b, m| {
            b.push_bind(m.room_id.as_str()).push_bind(m.user_id.as_str()).push_bind(m.joined_at.0);
        });
        q.push(tail);
        q
    }

    fn insert_messages<'r>(rows: impl IntoIterator<Item = &'r Message>, tail: &str) -> QueryBuilder<D> {
        let mut q = QueryBuilder::new(format!("INSERT INTO messages ({MSG_COLS}) "));
        q.push_values(rows, |mut b, m| {
            b.push_bind(m.id.as_str())
                .push_bind(m.room_id.as_str())
                .push_bind(m.seq)
                .push_bind(m.sender_id.as_str())
                .push_bind(m.client_msg_id.as_str())
                .push_bind(m.body.as_str())
                .push_bind(m.created_at.0);
        });
        q.push(tail);
        q
    }

    /// Binds `ids`, comma-separated, and closes the list `q` opened.
    fn push_ids(q: &mut QueryBuilder<D>, ids: &[&str]) {
        let mut sep = q.separated(", ");
        for id in ids {
            sep.push_bind(*id);
        }
        q.push(")");
    }

    /// The stored messages among `chunk`'s dedupe keys. The keys drive the loop, one probe of
    /// the dedupe index each: the shorter `(room_id, sender_id, client_msg_id) IN (VALUES ...)`
    /// gets index probes from the bundled SQLite but a scan of the whole messages table from
    /// SQLite 3.40 (Debian 12's system library).
    pub(super) fn dedupe_lookup(chunk: &[SendRequest]) -> QueryBuilder<D> {
        let mut q = QueryBuilder::new("WITH k(r, s, c) AS (VALUES ");
        let mut sep: Separated<'_, D, &str> = q.separated(", ");
        for r in chunk {
            sep.push("(").push_bind_unseparated(r.room_id.as_str()).push_unseparated(", ");
            sep.push_bind_unseparated(r.sender_id.as_str()).push_unseparated(", ");
            sep.push_bind_unseparated(r.client_msg_id.as_str()).push_unseparated(")");
        }
        // The keys' columns (r, s, c) share no name with messages', so MSG_COLS needs no prefix.
        q.push(format!(
            ") SELECT {MSG_COLS} FROM k {} messages AS m \
             ON m.room_id = k.r AND m.sender_id = k.s AND m.client_msg_id = k.c",
            D::KEYS_JOIN
        ));
        q
    }

    /// The heads of `rooms` (sorted, distinct) that exist, their rows locked to commit.
    async fn lock_heads(tx: &mut Transaction<'static, D>, rooms: &[&str]) -> StoreResult<Vec<(String, i64)>> {
        let mut heads = Vec::with_capacity(rooms.len());
        // Chunks of sorted ids lock in one global id order.
        for chunk in rooms.chunks(CHUNK) {
            let mut q = QueryBuilder::new("SELECT id, head_seq FROM rooms WHERE id IN (");
            Self::push_ids(&mut q, chunk);
            q.push(" ORDER BY id").push(D::LOCK_ROWS);
            let rows: Vec<(String, i64)> = q.build_query_as().fetch_all(&mut **tx).await.map_err(unavailable)?;
            heads.extend(rows);
        }
        Ok(heads)
    }

    /// Locks the rows of `rooms` (sorted, distinct) to commit, where the dialect locks rows.
    async fn lock_rooms(tx: &mut Transaction<'static, D>, rooms: &[&str]) -> StoreResult<()> {
        if !D::LOCK_ROWS.is_empty() {
            Self::lock_heads(tx, rooms).await?;
        }
        Ok(())
    }

    /// Sets each room's `head_seq` to `expr`, in which `v.head` is the value given for it: one
    /// statement for many rooms (each statement is a round trip, and a batch may touch hundreds).
    async fn set_heads(tx: &mut Transaction<'static, D>, heads: &[(&str, i64)], expr: &str) -> StoreResult<()> {
        for chunk in heads.chunks(CHUNK) {
            let mut q = QueryBuilder::new("WITH v(id, head) AS (VALUES ");
            let mut sep: Separated<'_, D, &str> = q.separated(", ");
            for (room, head) in chunk {
                sep.push("(").push_bind_unseparated(*room).push_unseparated(", ");
                sep.push_bind_unseparated(*head).push_unseparated(")");
            }
            q.push(format!(") UPDATE rooms SET head_seq = {expr} FROM v WHERE rooms.id = v.id"));
            q.build().execute(&mut **tx).await.map_err(unavailable)?;
        }
        Ok(())
    }

    /// The fences of `rooms` (sorted, distinct), read in `tx`.
    async fn fences_of(tx: &mut Transaction<'static, D>, rooms: &[&str]) -> StoreResult<Vec<RoomFence>> {
        let mut fences = Vec::new();
        for chunk in rooms.chunks(CHUNK) {
            let mut q = QueryBuilder::new(format!("SELECT {FENCE_COLS} FROM room_fences WHERE room_id IN ("));
            Self::push_ids(&mut q, chunk);
            let rows: Vec<RoomFence> = q.build_query_as().fetch_all(&mut **tx).await.map_err(unavailable)?;
            fences.extend(rows);
        }
        Ok(fences)
    }

    /// The write of a write-back: `msgs` (ordered by room and seq, their rooms locked by the
    /// caller) inserted where no stored message has any of their keys, and each room's head
    /// raised to at least its highest seq among them.
    async fn write_back(tx: &mut Transaction<'static, D>, msgs: &[&Message]) -> StoreResult<()> {
        for chunk in msgs.chunks(CHUNK) {
            // Without a conflict target, a row that collides on any unique key (room and seq,
            // message id, dedupe key) is skipped.
            let mut q = Self::insert_messages(chunk.iter().copied(), " ON CONFLICT DO NOTHING");
            q.build().execute(&mut **tx).await.map_err(unavailable)?;
        }
        Self::set_heads(tx, &fence::heads(msgs), &format!("{}(rooms.head_seq, v.head)", D::GREATEST)).await
    }

    /// `SELECT {from} [WHERE ({key}) > (after)] ORDER BY {key} LIMIT limit`.
    fn page<const N: usize>(from: &str, key: &str, after: Option<[Key<'_>; N]>, limit: u32) -> QueryBuilder<D> {
        let mut q = QueryBuilder::new(format!("SELECT {from}"));
        if let Some(after) = after {
            q.push(format!(" WHERE ({key}) > ("));
            let mut sep = q.separated(", ");
            for k in after {
                match k {
                    Key::Text(t) => sep.push_bind(t),
                    Key::Int(i) => sep.push_bind(i),
                };
            }
            q.push(")");
        }
        q.push(format!(" ORDER BY {key} LIMIT ")).push_bind(i64::from(limit));
        q
    }

    async fn fetch_all<T>(&self, mut q: QueryBuilder<D>) -> StoreResult<Vec<T>>
    where
        T: for<'r> FromRow<'r, D::Row> + Send + Unpin,
    {
        q.build_query_as().fetch_all(&self.pool).await.map_err(unavailable)
    }

    async fn fetch_optional<T>(&self, mut q: QueryBuilder<D>) -> StoreResult<Option<T>>
    where
        T: for<'r> FromRow<'r, D::Row> + Send + Unpin,
    {
        q.build_query_as().fetch_optional(&self.pool).await.map_err(unavailable)
    }

    /// `sql` followed by `value` as a bound parameter: the start of the many statements keyed by
    /// one id.
    fn by(sql: String, value: &str) -> QueryBuilder<D> {
        let mut q = QueryBuilder::new(sql);
        q.push_bind(value);
        q
    }

    /// Messages of a room by seq: `cmp` and `order` say which side of `seq` and which way.
    async fn messages(&self, room_id: &str, cmp: &str, seq: i64, order: &str, limit: u32) -> StoreResult<Vec<Message>> {
        let mut q = Self::by(format!("SELECT {MSG_COLS} FROM messages WHERE room_id = "), room_id);
        q.push(format!(" AND seq {cmp} ")).push_bind(seq);
        q.push(format!(" ORDER BY seq {order} LIMIT ")).push_bind(i64::from(limit));
        self.fetch_all(q).await
    }
}

#[async_trait]
impl<D> Store for SqlStore<D>
where
    D: Dialect,
    for<'c> &'c mut D::Connection: Executor<'c, Database = D>,
    for<'a> &'a str: Encode<'a, D> + Type<D> + ColumnIndex<D::Row>,
    for<'a> i64: Encode<'a, D> + Decode<'a, D> + Type<D>,
    for<'a> String: Decode<'a, D> + Type<D>,
    for<'a> Option<String>: Encode<'a, D> + Type<D>,
    usize: ColumnIndex<D::Row>,
    D::Arguments: IntoArguments<D>,
{
    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map_err(unavailable)?;
        Ok(())
    }

    async fn create_user(&self, u: NewUser) -> StoreResult<User> {
        let record = u.into_record();
        let mut q = Self::insert_users([&record], "");
        q.build().execute(&self.pool).await.map_err(username_taken)?;
        Ok(record.user)
    }

    async fn user(&self, id: &UserId) -> StoreResult<Option<User>> {
        let id = id.as_str();
        self.fetch_optional(Self::by(format!("SELECT {USER_COLS} FROM users WHERE id = "), id)).await
    }

    async fn credentials(&self, username: &str) -> StoreResult<Option<(User, String)>> {
        let q = Self::by(format!("SELECT {USER_COLS}, password_hash FROM users WHERE username = "), username);
        let record: Option<UserRecord> = self.fetch_optional(q).await?;
        Ok(record.map(|r| (r.user, r.password_hash)))
    }

    async fn update_user(&self, id: &UserId, p: UserPatch, now: Timestamp) -> StoreResult<User> {
        let id = id.as_str();
        let mut q = QueryBuilder::new("UPDATE users SET ");
        versioned(&mut q, "display_name", p.display_name, &p.version);
        versioned(&mut q, "status_text", p.status_text, &p.version);
        versioned(&mut q, "avatar_url", p.avatar_url, &p.version);
        q.push("password_hash = COALESCE(").push_bind(p.password_hash);
        q.push(", password_hash), updated_at = ").push_bind(now.0);
        q.push(" WHERE id = ").push_bind(id).push(format!(" RETURNING {USER_COLS}"));
        self.fetch_optional(q).await?.ok_or(StoreError::NotFound("user"))
    }

    async fn create_room(&self, r: NewRoom) -> StoreResult<Room> {
        let room = r.into_room();
        let owner = Membership { room_id: room.id.clone(), user_id: room.owner_id.clone(), joined_at: room.created_at };
        let mut tx = self.pool.begin_with(D::BEGIN_WRITE).await.map_err(unavailable)?;
        Self::insert_rooms([&room], "").build().execute(&mut *tx).await.map_err(unavailable)?;
        Self::insert_memberships([&owner], "").build().execute(&mut *tx).await.map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        Ok(room)
    }

    async fn room(&self, id: &RoomId) -> StoreResult<Option<Room>> {
        let id = id.as_str();
        self.fetch_optional(Self::by(format!("SELECT {ROOM_COLS} FROM rooms WHERE id = "), id)).await
    }

    async fn update_room(&self, id: &RoomId, p: RoomPatch, now: Timestamp) -> StoreResult<Room> {
        let id = id.as_str();
        let mut q = QueryBuilder::new("UPDATE rooms SET ");
        versioned(&mut q, "name", p.name, &p.version);
        versioned(&mut q, "topic", p.topic, &p.version);
        q.push("updated_at = ").push_bind(now.0);
        q.push(" WHERE id = ").push_bind(id).push(format!(" RETURNING {ROOM_COLS}"));
        self.fetch_optional(q).await?.ok_or(StoreError::NotFound("room"))
    }

    async fn rooms_of_user(&self, user_id: &UserId) -> StoreResult<Vec<Room>> {
        let user_id = user_id.as_str();
        let sql = format!(
            "SELECT {} FROM rooms r JOIN memberships m ON m.room_id = r.id WHERE m.user_id = ",
            qualified(ROOM_COLS, "r")
        );
        let mut q = Self::by(sql, user_id);
        q.push(" ORDER BY r.created_at DESC, r.id DESC");
        self.fetch_all(q).await
    }

    async fn public_rooms(&self, limit: u32) -> StoreResult<Vec<Room>> {
        let mut q = QueryBuilder::new(format!(
            "SELECT {ROOM_COLS} FROM rooms WHERE visibility = 'public' ORDER BY created_at DESC, id DESC LIMIT "
        ));
        q.push_bind(i64::from(limit));
        self.fetch_all(q).await
    }

    async fn add_member(&self, room_id: &RoomId, user_id: &UserId, now: Timestamp) -> StoreResult<bool> {
        let room_id = room_id.as_str();
        let user_id = user_id.as_str();
        let mut tx = self.pool.begin_with(D::BEGIN_WRITE).await.map_err(unavailable)?;
        let mut q = Self::by("SELECT id FROM rooms WHERE id = ".into(), room_id);
        let room: Option<(String,)> = q.build_query_as().fetch_optional(&mut *tx).await.map_err(unavailable)?;
        if room.is_none() {
            return Err(StoreError::NotFound("room"));
        }
        // A concurrent insert of the same membership makes this wait for that transaction, then
        // do nothing: exactly one of them counts the member.
        let membership = Membership { room_id: room_id.to_string(), user_id: user_id.to_string(), joined_at: now };
        let mut q = Self::insert_memberships([&membership], " ON CONFLICT (room_id, user_id) DO NOTHING");
        // The room was there a moment ago: a missing referent is the user.
        let added = D::rows_affected(&q.build().execute(&mut *tx).await.map_err(missing("user"))?) == 1;
        if added {
            let mut q = Self::by("UPDATE rooms SET member_count = member_count + 1 WHERE id = ".into(), room_id);
            q.build().execute(&mut *tx).await.map_err(unavailable)?;
        }
        tx.commit().await.map_err(unavailable)?;
        Ok(added)
    }

    async fn remove_member(&self, room_id: &RoomId, user_id: &UserId) -> StoreResult<bool> {
        let room_id = room_id.as_str();
        let user_id = user_id.as_str();
        let mut tx = self.pool.begin_with(D::BEGIN_WRITE).await.map_err(unavailable)?;
        let mut q = Self::by("DELETE FROM memberships WHERE room_id = ".into(), room_id);
        q.push(" AND user_id = ").push_bind(user_id);
        let removed = D::rows_affected(&q.build().execute(&mut *tx).await.map_err(unavailable)?) == 1;
        if removed {
            let mut q = Self::by("UPDATE rooms SET member_count = member_count - 1 WHERE id = ".into(), room_id);
            q.build().execute(&mut *tx).await.map_err(unavailable)?;
        }
        tx.commit().await.map_err(unavailable)?;
        Ok(removed)
    }

    async fn is_member(&self, room_id: &RoomId, user_id: &UserId) -> StoreResult<bool> {
        let room_id = room_id.as_str();
        let user_id = user_id.as_str();
        let mut q = Self::by("SELECT room_id FROM memberships WHERE room_id = ".into(), room_id);
        q.push(" AND user_id = ").push_bind(user_id);
        let found: Option<(String,)> = self.fetch_optional(q).await?;
        Ok(found.is_some())
    }

    async fn members(
        &self,
        room_id: &RoomId,
        after: Option<(Timestamp, &str)>,
        limit: u32,
    ) -> StoreResult<Vec<Member>> {
        let room_id = room_id.as_str();
        let sql = format!(
            "SELECT {}, m.joined_at FROM users u JOIN memberships m ON m.user_id = u.id WHERE m.room_id = ",
            qualified(USER_COLS, "u")
        );
        let mut q = Self::by(sql, room_id);
        if let Some((at, user)) = after {
            q.push(" AND (m.joined_at > ").push_bind(at.0).push(" OR (m.joined_at = ").push_bind(at.0);
            q.push(" AND m.user_id > ").push_bind(user).push("))");
        }
        q.push(" ORDER BY m.joined_at, m.user_id LIMIT ").push_bind(i64::from(limit));
        self.fetch_all(q).await
    }

    async fn room_ids_of_user(&self, user_id: &UserId) -> StoreResult<Vec<String>> {
        let user_id = user_id.as_str();
        let mut q = Self::by("SELECT room_id FROM memberships WHERE user_id = ".into(), user_id);
        q.push(" ORDER BY room_id");
        let ids: Vec<(String,)> = self.fetch_all(q).await?;
        Ok(ids.into_iter().map(|(id,)| id).collect())
    }

    /// A whole batch costs a handful of statements, not a few per message: the rooms' heads
    /// (locked), the dedupe lookups, one multi-row insert and one head update for all rooms.
    async fn append_messages(&self, batch: &[SendRequest]) -> StoreResult<Vec<AppendOutcome>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = self.pool.begin_with(D::BEGIN_WRITE).await.map_err(unavailable)?;
        // Rooms first: once they are locked nobody else inserts into them or moves their heads
        // before this commits, so the dedupe lookup and the heads read here stay true.
        let heads = Self::lock_heads(&mut tx, &distinct(batch.iter().map(|r| r.room_id.as_str()))).await?;
        let mut stored: Vec<Message> = Vec::new();
        for chunk in batch.chunks(CHUNK) {
            let mut q = Self::dedupe_lookup(chunk);
            stored.extend(q.build_query_as::<Message>().fetch_all(&mut *tx).await.map_err(unavailable)?);
        }
        let plan = append::decide(batch, stored, heads);
        for chunk in plan.fresh.chunks(CHUNK) {
            Self::insert_messages(chunk, "").build().execute(&mut *tx).await.map_err(unavailable)?;
        }
        let heads: Vec<(&str, i64)> = plan.heads.iter().map(|h| (h.room_id.as_str(), h.to)).collect();
        Self::set_heads(&mut tx, &heads, "v.head").await?;
        tx.commit().await.map_err(unavailable)?;
        Ok(plan.outcomes)
    }

    async fn upsert_messages(&self, batch: &[Message]) -> StoreResult<()> {
        if batch.is_empty() {
            return Ok(());
        }
        // In (room, seq) order, so that overlapping batches insert keys in the same order.
        let mut msgs: Vec<&Message> = batch.iter().collect();
        msgs.sort_by(|a, b| (a.room_id.as_str(), a.seq).cmp(&(b.room_id.as_str(), b.seq)));
        let rooms = distinct(msgs.iter().map(|m| m.room_id.as_str()));
        let mut tx = self.pool.begin_with(D::BEGIN_WRITE).await.map_err(unavailable)?;
        // Room locks before any insert, in the order append_messages takes them: every insert
        // into a room then happens under its lock (no deadlock with appends or other upserts).
        Self::lock_rooms(&mut tx, &rooms).await?;
        Self::write_back(&mut tx, &msgs).await?;
        tx.commit().await.map_err(unavailable)?;
        Ok(())
    }

    /// The rooms' locks (as in `upsert_messages`), then their fences, then the write of what
    /// they let through, in one transaction: `fence_rooms` takes the same room locks, so no fence
    /// is recorded between the check and the commit.
    async fn upsert_messages_fenced(&self, batch: &[FencedMessage]) -> StoreResult<Vec<(String, i64)>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let rooms = distinct(batch.iter().map(|f| f.message.room_id.as_str()));
        let mut tx = self.pool.begin_with(D::BEGIN_WRITE).await.map_err(unavailable)?;
        Self::lock_rooms(&mut tx, &rooms).await?;
        // Read after the locks: on PostgreSQL (READ COMMITTED) this statement sees every fence
        // committed before it, and none can commit after it until this transaction ends.
        let fences = Self::fences_of(&mut tx, &rooms).await?;
        let (pass, refused) = fence::split(batch, &fences);
        Self::write_back(&mut tx, &pass).await?;
        tx.commit().await.map_err(unavailable)?;
        Ok(refused)
    }

    /// The rooms locked (and found) first, in id order, as every writer of their messages does;
    /// then one insert per chunk that keeps a stored (room, token).
    async fn fence_rooms(&self, fences: &[RoomFence]) -> StoreResult<()> {
        if fences.is_empty() {
            return Ok(());
        }
        let rooms = distinct(fences.iter().map(|f| f.room_id.as_str()));
        let mut sorted: Vec<&RoomFence> = fences.iter().collect();
        sorted.sort_by_key(|f| (f.room_id.as_str(), f.token));
        let mut tx = self.pool.begin_with(D::BEGIN_WRITE).await.map_err(unavailable)?;
        if Self::lock_heads(&mut tx, &rooms).await?.len() != rooms.len() {
            return Err(StoreError::NotFound("room"));
        }
        for chunk in sorted.chunks(CHUNK) {
            let mut q = QueryBuilder::new(format!("INSERT INTO room_fences ({FENCE_COLS}) "));
            q.push_values(chunk, |mut b, f| {
                b.push_bind(f.room_id.as_str()).push_bind(f.token).push_bind(f.from_seq);
            });
            q.push(" ON CONFLICT (room_id, token) DO NOTHING");
            q.build().execute(&mut *tx).await.map_err(missing("room"))?;
        }
        tx.commit().await.map_err(unavailable)
    }

    async fn room_fences(&self, room_id: &RoomId) -> StoreResult<Vec<RoomFence>> {
        let room_id = room_id.as_str();
        let mut q = Self::by(format!("SELECT {FENCE_COLS} FROM room_fences WHERE room_id = "), room_id);
        q.push(" ORDER BY token");
        self.fetch_all(q).await
    }

    async fn messages_after(&self, room_id: &RoomId, after_seq: i64, limit: u32) -> StoreResult<Vec<Message>> {
        let room_id = room_id.as_str();
        self.messages(room_id, ">", after_seq, "", limit).await
    }

    async fn messages_before(&self, room_id: &RoomId, before_seq: i64, limit: u32) -> StoreResult<Vec<Message>> {
        let room_id = room_id.as_str();
        let mut msgs = self.messages(room_id, "<", before_seq, "DESC", limit).await?;
        msgs.reverse();
        Ok(msgs)
    }

    async fn head_seq(&self, room_id: &RoomId) -> StoreResult<Option<i64>> {
        let room_id = room_id.as_str();
        let head: Option<(i64,)> =
            self.fetch_optional(Self::by("SELECT head_seq FROM rooms WHERE id = ".into(), room_id)).await?;
        Ok(head.map(|(h,)| h))
    }

    async fn export(&self) -> StoreResult<Box<dyn ExportSnapshot>> {
        let mut tx = self.pool.begin_with(D::BEGIN_SNAPSHOT).await.map_err(unavailable)?;
        // The snapshot is taken by the first read that touches a table: take it now, so that the
        // export is the state as of this call.
        sqlx::query("SELECT 1 FROM users LIMIT 1").fetch_optional(&mut *tx).await.map_err(unavailable)?;
        Ok(Box::new(SqlExport { tx }))
    }

    async fn import_users(&self, users: &[UserRecord]) -> StoreResult<()> {
        let mut tx = self.pool.begin_with(D::BEGIN_WRITE).await.map_err(unavailable)?;
        for chunk in users.chunks(CHUNK) {
            // Only a stored id is "already there"; a username held by another id still fails.
            let mut q = Self::insert_users(chunk, " ON CONFLICT (id) DO NOTHING");
            q.build().execute(&mut *tx).await.map_err(username_taken)?;
        }
        tx.commit().await.map_err(unavailable)
    }

    async fn import_rooms(&self, rooms: &[Room]) -> StoreResult<()> {
        // Room rows are written in id order, as everywhere else (no deadlock with writers).
        let mut sorted: Vec<&Room> = rooms.iter().collect();
        sorted.sort_by(|a, b| a.id.cmp(&b.id));
        let raise =
            format!(" ON CONFLICT (id) DO UPDATE SET head_seq = {}(rooms.head_seq, excluded.head_seq)", D::GREATEST);
        let mut tx = self.pool.begin_with(D::BEGIN_WRITE).await.map_err(unavailable)?;
        for chunk in sorted.chunks(CHUNK) {
            let mut q = Self::insert_rooms(chunk.iter().copied(), &raise);
            q.build().execute(&mut *tx).await.map_err(missing("user"))?;
        }
        tx.commit().await.map_err(unavailable)
    }

    async fn import_memberships(&self, memberships: &[Membership]) -> StoreResult<()> {
        if memberships.is_empty() {
            return Ok(());
        }
        let rooms = distinct(memberships.iter().map(|m| m.room_id.as_str()));
        let mut tx = self.pool.begin_with(D::BEGIN_WRITE).await.map_err(unavailable)?;
        // The rooms' counters are rewritten below: lock them first, in id order.
        Self::lock_rooms(&mut tx, &rooms).await?;
        for chunk in memberships.chunks(CHUNK) {
            let mut q = Self::insert_memberships(chunk, " ON CONFLICT (room_id, user_id) DO NOTHING");
            q.build().execute(&mut *tx).await.map_err(missing("room or user"))?;
        }
        for chunk in rooms.chunks(CHUNK) {
            let mut q = QueryBuilder::new(
                "UPDATE rooms SET member_count = (SELECT count(*) FROM memberships m WHERE m.room_id = rooms.id)
                 WHERE id IN (",
            );
            Self::push_ids(&mut q, chunk);
            q.build().execute(&mut *tx).await.map_err(unavailable)?;
        }
        tx.commit().await.map_err(unavailable)
    }

    /// One statement: insert the lease, or take over its row where it expired or is the
    /// holder's own (`ON CONFLICT ... DO UPDATE ... WHERE`). Of concurrent acquirers, the first
    /// to write the row wins; the others wait for it (PostgreSQL's row lock, SQLite's one
    /// writer), then find it held and return no row.
    async fn acquire_lease(&self, name: &str, holder: &str, ttl_ms: i64, now: Timestamp) -> StoreResult<Option<Lease>> {
        let mut q = QueryBuilder::new(format!("INSERT INTO leases ({LEASE_COLS}) VALUES ("));
        q.push_bind(name).push(", ").push_bind(holder).push(", 1, ").push_bind(now.0.saturating_add(ttl_ms));
        // SET reads the row as it was: the token moves unless the holder extends its own.
        q.push(
            ") ON CONFLICT (name) DO UPDATE SET token = CASE WHEN leases.holder = excluded.holder \
             AND leases.expires_at > ",
        );
        q.push_bind(now.0).push(" THEN leases.token ELSE leases.token + 1 END, ");
        q.push("holder = excluded.holder, expires_at = excluded.expires_at WHERE leases.expires_at <= ");
        q.push_bind(now.0).push(format!(" OR leases.holder = excluded.holder RETURNING {LEASE_COLS}"));
        self.fetch_optional(q).await
    }

    async fn renew_lease(
        &self,
        name: &str,
        holder: &str,
        token: i64,
        ttl_ms: i64,
        now: Timestamp,
    ) -> StoreResult<Option<Lease>> {
        let mut q = QueryBuilder::new("UPDATE leases SET expires_at = ");
        q.push_bind(now.0.saturating_add(ttl_ms));
        q.push(" WHERE name = ").push_bind(name).push(" AND holder = ").push_bind(holder);
        q.push(" AND token = ").push_bind(token).push(" AND expires_at > ").push_bind(now.0);
        q.push(format!(" RETURNING {LEASE_COLS}"));
        self.fetch_optional(q).await
    }

    async fn release_lease(&self, name: &str, holder: &str, token: i64, now: Timestamp) -> StoreResult<bool> {
        let mut q = QueryBuilder::new("UPDATE leases SET expires_at = ");
        q.push_bind(now.0);
        q.push(" WHERE name = ").push_bind(name).push(" AND holder = ").push_bind(holder);
        q.push(" AND token = ").push_bind(token).push(" AND expires_at > ").push_bind(now.0);
        let done = q.build().execute(&self.pool).await.map_err(unavailable)?;
        Ok(D::rows_affected(&done) == 1)
    }

    async fn lease(&self, name: &str) -> StoreResult<Option<Lease>> {
        self.fetch_optional(Self::by(format!("SELECT {LEASE_COLS} FROM leases WHERE name = "), name)).await
    }

    async fn leases(&self) -> StoreResult<Vec<Lease>> {
        self.fetch_all(QueryBuilder::new(format!("SELECT {LEASE_COLS} FROM leases ORDER BY name"))).await
    }
}

#[async_trait]
impl<D> ExportSnapshot for SqlExport<D>
where
    D: Dialect,
    for<'c> &'c mut D::Connection: Executor<'c, Database = D>,
    for<'a> &'a str: Encode<'a, D> + Type<D> + ColumnIndex<D::Row>,
    for<'a> i64: Encode<'a, D> + Decode<'a, D> + Type<D>,
    for<'a> String: Decode<'a, D> + Type<D>,
    for<'a> Option<String>: Encode<'a, D> + Type<D>,
    usize: ColumnIndex<D::Row>,
    D::Arguments: IntoArguments<D>,
{
    fn consistency(&self) -> ExportConsistency {
        ExportConsistency::Snapshot
    }

    async fn users_page(&mut self, after: Option<&str>, limit: u32) -> StoreResult<Vec<UserRecord>> {
        let after = after.map(|id| [Key::Text(id)]);
        let q = SqlStore::page(&format!("{USER_COLS}, password_hash FROM users"), "id", after, limit);
        self.fetch(q, limit).await
    }

    async fn rooms_page(&mut self, after: Option<&str>, limit: u32) -> StoreResult<Vec<Room>> {
        let after = after.map(|id| [Key::Text(id)]);
        let q = SqlStore::page(&format!("{ROOM_COLS} FROM rooms"), "id", after, limit);
        self.fetch(q, limit).await
    }

    async fn memberships_page(&mut self, after: Option<(&str, &str)>, limit: u32) -> StoreResult<Vec<Membership>> {
        let after = after.map(|(room, user)| [Key::Text(room), Key::Text(user)]);
        let q = SqlStore::page(&format!("{MEMBERSHIP_COLS} FROM memberships"), "room_id, user_id", after, limit);
        self.fetch(q, limit).await
    }

    async fn messages_page(&mut self, after: Option<(&str, i64)>, limit: u32) -> StoreResult<Vec<Message>> {
        let after = after.map(|(room, seq)| [Key::Text(room), Key::Int(seq)]);
        let q = SqlStore::page(&format!("{MSG_COLS} FROM messages"), "room_id, seq", after, limit);
        self.fetch(q, limit).await
    }
}

impl<D> SqlExport<D>
where
    D: Dialect,
    for<'c> &'c mut D::Connection: Executor<'c, Database = D>,
    D::Arguments: IntoArguments<D>,
{
    /// One page read in the export's transaction; none for `limit` 0.
    async fn fetch<T>(&mut self, mut q: QueryBuilder<D>, limit: u32) -> StoreResult<Vec<T>>
    where
        T: for<'r> FromRow<'r, D::Row> + Send + Unpin,
    {
        if limit == 0 {
            return Ok(Vec::new());
        }
        q.build_query_as().fetch_all(&mut *self.tx).await.map_err(unavailable)
    }
}
