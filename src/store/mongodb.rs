//! MongoDB store (official driver) for cluster mode: the durable store behind the Redis sequencer.
//! Needs MongoDB 5.0 or newer; a replica set (one node is enough) for [`Store::append_messages`].
//!
//! # Connection string
//!
//! `mongodb://[user:password@]host[:port][,host...]/[database][?options]`, parsed by the driver.
//!
//! - The database is the URL's path; `chatmesh` when the path is empty.
//! - Write concern comes from the URL (`w=majority`, `w=2`, `wtimeoutMS=...`, `journal=true`). A URL
//!   that gives no `w` gets `w: "majority"` on the client, which every collection and every
//!   transaction inherits: an acknowledged write then survives the loss of the primary.
//! - Read preference comes from the URL (`readPreference=primaryPreferred&maxStalenessSeconds=...`);
//!   the default is `primary`. Reads from secondaries may lag the writes this process just made, so
//!   keep `primary` unless stale reads are acceptable. Transactions (MongoDB requires it) and
//!   `head_seq` (the cluster sequencer seeds its counters from it) always read from the primary,
//!   whatever the URL says.
//! - `serverSelectionTimeoutMS` defaults to 5 s here (the driver's own default is 30 s), so that a
//!   store that is down answers `Unavailable` quickly; `appName` defaults to `chatmesh`.
//!
//! # Documents
//!
//! Times are `i64` Unix milliseconds, ids are strings (`_id` is the user, room and message id).
//! Indexes, created at start (idempotent): `users.username` unique; `messages` unique
//! (`room_id`, `seq`), unique (`room_id`, `sender_id`, `client_msg_id`), unique `_id`;
//! `memberships` unique (`room_id`, `user_id`) and (`user_id`, `room_id`); `rooms` (`visibility`,
//! `created_at`, `_id`). String keys compare bytewise (no collation), as in the other stores.
//!
//! Operational state, not part of backups: `leases` (`_id` the lease name; `holder`, `token`,
//! `expires_at`) and `room_fences` (`_id` the room id; `fences`, an array of `{token, from_seq}`,
//! one per token; `writes`, a counter every fenced write-back of the room bumps, see
//! [`Store::upsert_messages_fenced`]). Both are keyed by `_id` alone.
//!
//! # Atomicity
//!
//! On a replica set (or a sharded cluster) every method that writes more than one document runs in
//! a multi-document transaction (read concern `snapshot`, read preference `primary`), retried on
//! transient errors by the driver: `create_room`, `add_member`, `remove_member`,
//! `append_messages`, `fence_rooms`, `upsert_messages_fenced`. On a standalone server, which has
//! no transactions, `append_messages` answers `Unavailable` (see there), and the membership
//! methods run their writes one after the other: the unique membership index still makes exactly
//! one of two concurrent adds (or removes) count, but a crash between the membership write and
//! the room's counter update leaves `member_count` off by one. `fence_rooms` then records fence
//! by fence, and `upsert_messages_fenced` checks and writes without isolation (see there). A
//! standalone server is for development only.
//!
//! Each lease operation is one single-document write (`findAndModify` / `update`), atomic
//! everywhere.
//!
//! `upsert_messages`, the cluster write-back path, needs no transaction: it is idempotent and
//! order-insensitive, so a batch cut short by a crash is completed by its retry.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use futures::future::BoxFuture;
use futures::{FutureExt, TryStreamExt};
use mongodb::bson::{Bson, Document, doc};
use mongodb::error::{Error as MongoError, ErrorKind, WriteFailure};
use mongodb::options::{
    ClientOptions, IndexOptions, ReadConcern, ReadPreference, ReturnDocument, SelectionCriteria, ServerAddress, Tls,
    WriteConcern,
};
use mongodb::{Client, ClientSession, Collection, Database, IndexModel, SessionCursor};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::append::{self, distinct};
use super::fence;
use super::{
    AppendOutcome, ExportConsistency, ExportSnapshot, FencedMessage, Lease, Member, Membership, NewRoom, NewUser,
    RoomFence, RoomPatch, SendRequest, Store, StoreError, StoreResult, UserPatch, UserRecord,
};
use crate::domain::{Message, Room, RoomId, Timestamp, User, UserId, Visibility};

/// The database when the URL names none.
const DEFAULT_DATABASE: &str = "chatmesh";
/// How long an operation waits for a suitable server before failing (unless the URL says).
const SERVER_SELECTION_TIMEOUT: Duration = Duration::from_secs(5);
/// MongoDB's duplicate-key error code, for every unique index.
const DUPLICATE_KEY: i32 = 11000;
/// Dedupe keys per `$or` lookup in `append_messages`.
const LOOKUP_CHUNK: usize = 200;
/// Attempts of a transaction that failed on a duplicate key (a concurrent writer outside any
/// transaction stored the same key after our snapshot): a fresh snapshot sees it.
const DUPLICATE_KEY_ATTEMPTS: usize = 5;

type MongoResult<T> = mongodb::error::Result<T>;

pub struct MongoStore {
    client: Client,
    db: Database,
    users: Collection<UserDoc>,
    rooms: Collection<RoomDoc>,
    memberships: Collection<MembershipDoc>,
    messages: Collection<MessageDoc>,
    leases: Collection<LeaseDoc>,
    room_fences: Collection<FenceDoc>,
    /// The deployment is a replica set or a sharded cluster: multi-document transactions work.
    transactions: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct UserDoc {
    #[serde(rename = "_id")]
    id: String,
    username: String,
    display_name: String,
    status_text: String,
    avatar_url: String,
    password_hash: String,
    created_at: i64,
    updated_at: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct RoomDoc {
    #[serde(rename = "_id")]
    id: String,
    name: String,
    topic: String,
    visibility: Visibility,
    owner_id: String,
    home_region: String,
    head_seq: i64,
    member_count: i64,
    created_at: i64,
    updated_at: i64,
}

/// A room's id and head, for reads projected to `head_seq`.
#[derive(Debug, Clone, Deserialize)]
struct HeadDoc {
    #[serde(rename = "_id")]
    id: String,
    #[serde(default)]
    head_seq: i64,
}

/// One membership; `_id` is an ObjectId the server assigns (ignored when read).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct MembershipDoc {
    room_id: String,
    user_id: String,
    joined_at: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct MessageDoc {
    #[serde(rename = "_id")]
    id: String,
    room_id: String,
    seq: i64,
    sender_id: String,
    client_msg_id: String,
    body: String,
    created_at: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct LeaseDoc {
    #[serde(rename = "_id")]
    name: String,
    holder: String,
    token: i64,
    expires_at: i64,
}

/// A room's fences, one per token, in the order they were recorded. `writes` (not read here) is
/// what each fenced write-back of the room bumps.
#[derive(Debug, Clone, Deserialize)]
struct FenceDoc {
    #[serde(rename = "_id")]
    room_id: String,
    #[serde(default)]
    fences: Vec<FenceEntry>,
}

#[derive(Debug, Clone, Deserialize)]
struct FenceEntry {
    token: i64,
    from_seq: i64,
}

impl FenceDoc {
    fn into_fences(self) -> impl Iterator<Item = RoomFence> {
        let room_id = self.room_id;
        self.fences.into_iter().map(move |f| RoomFence {
            room_id: room_id.clone(),
            token: f.token,
            from_seq: f.from_seq,
        })
    }
}

impl From<LeaseDoc> for Lease {
    fn from(d: LeaseDoc) -> Self {
        Lease { name: d.name, holder: d.holder, token: d.token, expires_at: Timestamp(d.expires_at) }
    }
}

impl From<UserDoc> for User {
    fn from(d: UserDoc) -> Self {
        User {
            id: d.id,
            username: d.username,
            display_name: d.display_name,
            status_text: d.status_text,
            avatar_url: d.avatar_url,
            created_at: Timestamp(d.created_at),
            updated_at: Timestamp(d.updated_at),
        }
    }
}

impl From<RoomDoc> for Room {
    fn from(d: RoomDoc) -> Self {
        Room {
            id: d.id,
            name: d.name,
            topic: d.topic,
            visibility: d.visibility,
            owner_id: d.owner_id,
            home_region: d.home_region,
            head_seq: d.head_seq,
            member_count: d.member_count,
            created_at: Timestamp(d.created_at),
            updated_at: Timestamp(d.updated_at),
        }
    }
}

impl From<MessageDoc> for Message {
    fn from(d: MessageDoc) -> Self {
        Message {
            id: d.id,
            room_id: d.room_id,
            seq: d.seq,
            sender_id: d.sender_id,
            client_msg_id: d.client_msg_id,
            body: d.body,
            created_at: Timestamp(d.created_at),
        }
    }
}

impl From<UserRecord> for UserDoc {
    fn from(r: UserRecord) -> Self {
        let User { id, username, display_name, status_text, avatar_url, created_at, updated_at } = r.user;
        let (password_hash, created_at, updated_at) = (r.password_hash, created_at.0, updated_at.0);
        UserDoc { id, username, display_name, status_text, avatar_url, password_hash, created_at, updated_at }
    }
}

impl From<Room> for RoomDoc {
    fn from(r: Room) -> Self {
        let (created_at, updated_at) = (r.created_at.0, r.updated_at.0);
        let Room { id, name, topic, visibility, owner_id, home_region, head_seq, member_count, .. } = r;
        RoomDoc { id, name, topic, visibility, owner_id, home_region, head_seq, member_count, created_at, updated_at }
    }
}

impl From<&Message> for MessageDoc {
    fn from(m: &Message) -> Self {
        MessageDoc {
            id: m.id.clone(),
            room_id: m.room_id.clone(),
            seq: m.seq,
            sender_id: m.sender_id.clone(),
            client_msg_id: m.client_msg_id.clone(),
            body: m.body.clone(),
            created_at: m.created_at.0,
        }
    }
}

fn unavailable(e: MongoError) -> StoreError {
    StoreError::Unavailable(format!("mongodb: {}", e.kind))
}

/// A write that failed on a unique index (any of them), and on nothing else.
fn is_duplicate_key(e: &MongoError) -> bool {
    match &*e.kind {
        ErrorKind::Write(WriteFailure::WriteError(w)) => w.code == DUPLICATE_KEY,
        ErrorKind::Command(c) => c.code == DUPLICATE_KEY,
        ErrorKind::InsertMany(f) => {
            f.write_concern_error.is_none()
                && f.write_errors.as_ref().is_some_and(|w| !w.is_empty() && w.iter().all(|w| w.code == DUPLICATE_KEY))
        }
        _ => false,
    }
}

/// `limit` for the driver; callers answer an empty page for 0 themselves (0 means "no limit" to
/// MongoDB, and `LIMIT 0` means no rows to SQL).
fn limit_of(limit: u32) -> i64 {
    i64::from(limit)
}

/// Drains a cursor opened in `session`.
async fn collect<T>(mut cursor: SessionCursor<T>, session: &mut ClientSession) -> MongoResult<Vec<T>>
where
    T: DeserializeOwned + Send + Sync + Unpin,
{
    cursor.stream(session).try_collect().await
}

/// One export page: `filter`, sorted by `sort`, at most `limit` documents, read in `session`.
async fn find_page<T>(
    coll: &Collection<T>,
    session: &mut ClientSession,
    filter: Document,
    sort: Document,
    limit: u32,
) -> StoreResult<Vec<T>>
where
    T: DeserializeOwned + Send + Sync + Unpin,
{
    if limit == 0 {
        return Ok(Vec::new());
    }
    let cursor =
        coll.find(filter).sort(sort).limit(limit_of(limit)).session(&mut *session).await.map_err(unavailable)?;
    collect(cursor, session).await.map_err(unavailable)
}

/// [`Store::export`] for MongoDB.
///
/// On a replica set or a sharded cluster it reads in a **snapshot session** (`snapshot: true`,
/// MongoDB 5.0+): the first read (made by `export`) picks a cluster time and every page is read
/// at that time, so the pages together are one consistent state and writers are not blocked.
/// MongoDB keeps that history only for `minSnapshotHistoryWindowInSeconds` (300 s by default):
/// an export that takes longer fails with `SnapshotTooOld` (raise that server parameter for
/// very big stores). On a standalone server there are no snapshot reads: each page reads the
/// state as of that page ([`ExportConsistency::BestEffort`]); stop the writers for an exact
/// copy. Either way a restore of the result is idempotent and repairs `member_count`.
pub struct MongoExport {
    session: ClientSession,
    users: Collection<UserDoc>,
    rooms: Collection<RoomDoc>,
    memberships: Collection<MembershipDoc>,
    messages: Collection<MessageDoc>,
    consistency: ExportConsistency,
}

#[async_trait]
impl ExportSnapshot for MongoExport {
    fn consistency(&self) -> ExportConsistency {
        self.consistency
    }

    async fn users_page(&mut self, after: Option<&str>, limit: u32) -> StoreResult<Vec<UserRecord>> {
        let filter = after.map_or_else(Document::new, |id| doc! { "_id": { "$gt": id } });
        let docs = find_page(&self.users, &mut self.session, filter, doc! { "_id": 1 }, limit).await?;
        Ok(docs
            .into_iter()
            .map(|d| {
                let password_hash = d.password_hash.clone();
                UserRecord { user: User::from(d), password_hash }
            })
            .collect())
    }

    async fn rooms_page(&mut self, after: Option<&str>, limit: u32) -> StoreResult<Vec<Room>> {
        let filter = after.map_or_else(Document::new, |id| doc! { "_id": { "$gt": id } });
        let docs = find_page(&self.rooms, &mut self.session, filter, doc! { "_id": 1 }, limit).await?;
        Ok(docs.into_iter().map(Room::from).collect())
    }

    async fn memberships_page(&mut self, after: Option<(&str, &str)>, limit: u32) -> StoreResult<Vec<Membership>> {
        let filter = after.map_or_else(Document::new, |(room, user)| {
            doc! { "$or": [{ "room_id": { "$gt": room } }, { "room_id": room, "user_id": { "$gt": user } }] }
        });
        let sort = doc! { "room_id": 1, "user_id": 1 };
        let docs = find_page(&self.memberships, &mut self.session, filter, sort, limit).await?;
        Ok(docs
            .into_iter()
            .map(|d| Membership { room_id: d.room_id, user_id: d.user_id, joined_at: Timestamp(d.joined_at) })
            .collect())
    }

    async fn messages_page(&mut self, after: Option<(&str, i64)>, limit: u32) -> StoreResult<Vec<Message>> {
        let filter = after.map_or_else(Document::new, |(room, seq)| {
            doc! { "$or": [{ "room_id": { "$gt": room } }, { "room_id": room, "seq": { "$gt": seq } }] }
        });
        let sort = doc! { "room_id": 1, "seq": 1 };
        let docs = find_page(&self.messages, &mut self.session, filter, sort, limit).await?;
        Ok(docs.into_iter().map(Message::from).collect())
    }
}

fn index(keys: Document, name: &str, unique: bool) -> IndexModel {
    IndexModel::builder()
        .keys(keys)
        .options(IndexOptions::builder().name(name.to_string()).unique(unique.then_some(true)).build())
        .build()
}

/// Refuses the URL options that turn certificate checks off (`tlsInsecure`,
/// `tlsAllowInvalidCertificates`; the driver's rustls build has no host-name-only switch): a
/// private CA goes in `tlsCAFile`.
fn check_tls(opts: &ClientOptions) -> anyhow::Result<()> {
    if let Some(Tls::Enabled(tls)) = &opts.tls
        && tls.allow_invalid_certificates == Some(true)
    {
        anyhow::bail!(
            "CHATMESH_STORE_URL turns MongoDB certificate checks off (tlsInsecure / tlsAllowInvalidCertificates); \
             name the CA with tlsCAFile instead"
        );
    }
    if !matches!(opts.tls, Some(Tls::Enabled(_)))
        && opts.hosts.iter().any(|h| !matches!(h, ServerAddress::Tcp { host, .. } if host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())))
    {
        tracing::warn!("MongoDB connection is not encrypted; add tls=true&tlsCAFile=<ca.pem> to CHATMESH_STORE_URL");
    }
    Ok(())
}

fn describe_tls(tls: &Option<Tls>) -> &'static str {
    match tls {
        Some(Tls::Enabled(_)) => "TLS",
        _ => "plaintext",
    }
}

impl MongoStore {
    /// Writes one versioned field (see [`RoomPatch::version`](super::RoomPatch)): with a version,
    /// at once and only where the field's last write is older; without one, into `set` with the
    /// rest of the update.
    async fn set_versioned<T: Send + Sync>(
        &self,
        coll: &Collection<T>,
        id: &str,
        field: &str,
        value: String,
        version: &str,
        set: &mut Document,
    ) -> StoreResult<()> {
        if version.is_empty() {
            set.insert(field, value);
            return Ok(());
        }
        let vfield = format!("{field}_v");
        let older = doc! { "$or": [ { &vfield: { "$lt": version } }, { &vfield: { "$exists": false } } ] };
        let filter = doc! { "_id": id, "$and": [older] };
        coll.update_one(filter, doc! { "$set": { field: value, vfield: version } }).await.map_err(unavailable)?;
        Ok(())
    }

    /// Connects to `url` (see the module docs for what it may say), finds out whether the
    /// deployment has transactions, and creates the indexes.
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        let mut opts = ClientOptions::parse(url).await?;
        check_tls(&opts)?;
        if opts.write_concern.as_ref().is_none_or(|wc| wc.w.is_none()) {
            let mut wc = opts.write_concern.take().unwrap_or_default();
            wc.w = WriteConcern::majority().w;
            opts.write_concern = Some(wc);
        }
        opts.server_selection_timeout.get_or_insert(SERVER_SELECTION_TIMEOUT);
        opts.app_name.get_or_insert_with(|| "chatmesh".to_string());
        let db_name = opts.default_database.clone().unwrap_or_else(|| DEFAULT_DATABASE.to_string());
        let opts_tls = opts.tls.clone();
        let client = Client::with_options(opts)?;
        let db = client.database(&db_name);

        // A replica set member reports its set's name, a mongos says "isdbgrid"; both run
        // multi-document transactions. A standalone server reports neither.
        // The first round trip: with tls=true a server that does not speak TLS, or whose
        // certificate tlsCAFile does not vouch for, fails here (the driver never falls back).
        let hello = client
            .database("admin")
            .run_command(doc! { "hello": 1 })
            .await
            .with_context(|| format!("connecting to MongoDB ({})", describe_tls(&opts_tls)))?;
        let transactions = hello.get_str("setName").is_ok() || hello.get_str("msg") == Ok("isdbgrid");
        if !transactions {
            tracing::warn!(
                database = %db_name,
                "MongoDB is a standalone server: no transactions, so append_messages (embedded sequencing) \
                 answers unavailable and membership counters are not crash-atomic; use a replica set"
            );
        }

        let store = Self {
            users: db.collection("users"),
            rooms: db.collection("rooms"),
            memberships: db.collection("memberships"),
            messages: db.collection("messages"),
            leases: db.collection("leases"),
            room_fences: db.collection("room_fences"),
            client,
            db,
            transactions,
        };
        store.create_indexes().await?;
        Ok(store)
    }

    async fn create_indexes(&self) -> MongoResult<()> {
        self.users.create_indexes([index(doc! { "username": 1 }, "username_unique", true)]).await?;
        self.rooms
            .create_indexes([index(doc! { "visibility": 1, "created_at": -1, "_id": -1 }, "visibility_created", false)])
            .await?;
        self.memberships
            .create_indexes([
                index(doc! { "room_id": 1, "user_id": 1 }, "room_user_unique", true),
                index(doc! { "user_id": 1, "room_id": 1 }, "user_room", false),
            ])
            .await?;
        // `_id` (the message id) is unique by itself.
        self.messages
            .create_indexes([
                index(doc! { "room_id": 1, "seq": 1 }, "room_seq_unique", true),
                index(doc! { "room_id": 1, "sender_id": 1, "client_msg_id": 1 }, "dedupe_unique", true),
            ])
            .await?;
        Ok(())
    }

    /// Runs `body` atomically: in a transaction when the deployment has them (the driver retries
    /// transient errors, e.g. a write conflict with a concurrent transaction, with backoff), else
    /// once in a plain session. A transaction that fails on a duplicate key is run again from the
    /// start a few times: a writer outside any transaction may have stored that key after our
    /// snapshot, and a fresh snapshot sees it.
    async fn atomically<C, R, F>(&self, mut ctx: C, mut body: F) -> MongoResult<R>
    where
        C: Send,
        R: Send,
        F: for<'b> FnMut(&'b mut ClientSession, &'b mut C) -> BoxFuture<'b, MongoResult<R>> + Send,
    {
        let mut session = self.client.start_session().await?;
        let mut attempt = 1;
        loop {
            let res = if self.transactions {
                session
                    .start_transaction()
                    .read_concern(ReadConcern::snapshot())
                    .selection_criteria(SelectionCriteria::ReadPreference(ReadPreference::Primary))
                    .and_run(&mut ctx, |s, ctx| body(s, ctx))
                    .await
            } else {
                body(&mut session, &mut ctx).await
            };
            match res {
                Err(e) if self.transactions && attempt < DUPLICATE_KEY_ATTEMPTS && is_duplicate_key(&e) => attempt += 1,
                res => return res,
            }
        }
    }

    async fn find_messages(&self, filter: Document, sort: Document, limit: u32) -> StoreResult<Vec<Message>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let cursor = self.messages.find(filter).sort(sort).limit(limit_of(limit)).await.map_err(unavailable)?;
        let docs: Vec<MessageDoc> = cursor.try_collect().await.map_err(unavailable)?;
        Ok(docs.into_iter().map(Message::from).collect())
    }

    async fn create_room_in(&self, s: &mut ClientSession, doc: &RoomDoc) -> MongoResult<()> {
        self.rooms.insert_one(doc).session(&mut *s).await?;
        let owner = MembershipDoc { room_id: doc.id.clone(), user_id: doc.owner_id.clone(), joined_at: doc.created_at };
        self.memberships.insert_one(owner).session(&mut *s).await?;
        Ok(())
    }

    async fn add_member_in(
        &self,
        s: &mut ClientSession,
        room_id: &str,
        user_id: &str,
        now: Timestamp,
    ) -> MongoResult<StoreResult<bool>> {
        if self.rooms.find_one(doc! { "_id": room_id }).session(&mut *s).await?.is_none() {
            return Ok(Err(StoreError::NotFound("room")));
        }
        if self.users.find_one(doc! { "_id": user_id }).session(&mut *s).await?.is_none() {
            return Ok(Err(StoreError::NotFound("user")));
        }
        // An upsert rather than an insert: inside a transaction a duplicate-key error would abort
        // it, and "already a member" is an ordinary answer here.
        let res = self
            .memberships
            .update_one(
                doc! { "room_id": room_id, "user_id": user_id },
                // An inserted document gets room_id and user_id from the filter's equalities.
                doc! { "$setOnInsert": { "joined_at": now.0 } },
            )
            .upsert(true)
            .session(&mut *s)
            .await;
        let added = match res {
            Ok(r) => r.upserted_id.is_some(),
            // Outside a transaction two concurrent upserts of one membership may race on the
            // unique index; the loser finds the member there.
            Err(e) if !self.transactions && is_duplicate_key(&e) => false,
            Err(e) => return Err(e),
        };
        if added {
            self.rooms
                .update_one(doc! { "_id": room_id }, doc! { "$inc": { "member_count": 1_i64 } })
                .session(&mut *s)
                .await?;
        }
        Ok(Ok(added))
    }

    async fn remove_member_in(&self, s: &mut ClientSession, room_id: &str, user_id: &str) -> MongoResult<bool> {
        let removed = self
            .memberships
            .delete_one(doc! { "room_id": room_id, "user_id": user_id })
            .session(&mut *s)
            .await?
            .deleted_count
            == 1;
        if removed {
            self.rooms
                .update_one(doc! { "_id": room_id }, doc! { "$inc": { "member_count": -1_i64 } })
                .session(&mut *s)
                .await?;
        }
        Ok(removed)
    }

    /// One attempt of `append_messages`, inside a transaction: read the stored dedupe keys and the
    /// room heads from the transaction's snapshot, decide every outcome ([`append::decide`]),
    /// then move the heads and insert the new messages. Two transactions that sequence the same
    /// room both write its room document, so one of them fails on a write conflict and is run
    /// again on a fresh snapshot: seqs stay gap-free and no two messages share one.
    async fn append_in(&self, s: &mut ClientSession, batch: &[SendRequest]) -> MongoResult<Vec<AppendOutcome>> {
        let mut keys: Vec<(&str, &str, &str)> =
            batch.iter().map(|r| (r.room_id.as_str(), r.sender_id.as_str(), r.client_msg_id.as_str())).collect();
        keys.sort_unstable();
        keys.dedup();
        let mut stored: Vec<Message> = Vec::new();
        for chunk in keys.chunks(LOOKUP_CHUNK) {
            let any: Vec<Document> = chunk
                .iter()
                .map(|(room, sender, cmid)| doc! { "room_id": *room, "sender_id": *sender, "client_msg_id": *cmid })
                .collect();
            let cursor = self.messages.find(doc! { "$or": any }).session(&mut *s).await?;
            stored.extend(collect(cursor, s).await?.into_iter().map(Message::from));
        }

        let room_ids = distinct(batch.iter().map(|r| r.room_id.as_str()));
        let heads_coll = self.rooms.clone_with_type::<HeadDoc>();
        let cursor = heads_coll
            .find(doc! { "_id": { "$in": &room_ids } })
            .projection(doc! { "head_seq": 1 })
            .session(&mut *s)
            .await?;
        let heads = collect(cursor, s).await?.into_iter().map(|h| (h.id, h.head_seq));
        let plan = append::decide(batch, stored, heads);

        // Heads first, in id order: a conflicting sequencer of the same room fails here, before
        // any insert. The filter on the old head makes a lost race an error, never silently ignored.
        for h in &plan.heads {
            let res = self
                .rooms
                .update_one(doc! { "_id": &h.room_id, "head_seq": h.from }, doc! { "$set": { "head_seq": h.to } })
                .session(&mut *s)
                .await?;
            if res.matched_count != 1 {
                return Err(MongoError::custom(format!("room {} moved during append_messages", h.room_id)));
            }
        }
        if !plan.fresh.is_empty() {
            let fresh: Vec<MessageDoc> = plan.fresh.iter().map(MessageDoc::from).collect();
            self.messages.insert_many(&fresh).ordered(true).session(&mut *s).await?;
        }
        Ok(plan.outcomes)
    }

    /// One attempt of `fence_rooms` (fences sorted by room and token): every room checked first,
    /// then each fence pushed into its room's fence document unless one of its token is there
    /// (the filter says so, which keeps a concurrent push of the same token from doubling it).
    /// In a transaction a concurrent fence or fenced write-back of the room writes the same
    /// document: one of the two fails on a write conflict and runs again on a fresh snapshot.
    async fn fence_in(&self, s: &mut ClientSession, fences: &[RoomFence]) -> MongoResult<StoreResult<()>> {
        let rooms = distinct(fences.iter().map(|f| f.room_id.as_str()));
        let known = self.rooms.count_documents(doc! { "_id": { "$in": &rooms } }).session(&mut *s).await?;
        if known != rooms.len() as u64 {
            return Ok(Err(StoreError::NotFound("room")));
        }
        let mut stored: Option<(String, HashSet<i64>)> = None;
        for f in fences {
            if stored.as_ref().is_none_or(|(room, _)| *room != f.room_id) {
                let d = self.room_fences.find_one(doc! { "_id": &f.room_id }).session(&mut *s).await?;
                let tokens = d.map(|d| d.fences.iter().map(|e| e.token).collect()).unwrap_or_default();
                stored = Some((f.room_id.clone(), tokens));
            }
            if stored.as_ref().is_some_and(|(_, tokens)| tokens.contains(&f.token)) {
                continue;
            }
            let res = self
                .room_fences
                .update_one(
                    doc! { "_id": &f.room_id, "fences.token": { "$ne": f.token } },
                    doc! { "$push": { "fences": { "token": f.token, "from_seq": f.from_seq } } },
                )
                .upsert(true)
                .session(&mut *s)
                .await;
            match res {
                Ok(_) => {}
                // The document holds this token already (recorded since it was read): the upsert's
                // insert collided with it. In a transaction that aborted it, and it runs again.
                Err(e) if !self.transactions && is_duplicate_key(&e) => {}
                Err(e) => return Err(e),
            }
            // A second fence of this token later in the batch is a repeat.
            if let Some((_, tokens)) = stored.as_mut() {
                tokens.insert(f.token);
            }
        }
        Ok(Ok(()))
    }

    /// The fences of `rooms`, read without writing (for a standalone server).
    async fn fences_of(&self, rooms: &[&str]) -> StoreResult<Vec<RoomFence>> {
        let cursor = self.room_fences.find(doc! { "_id": { "$in": rooms } }).await.map_err(unavailable)?;
        let docs: Vec<FenceDoc> = cursor.try_collect().await.map_err(unavailable)?;
        Ok(docs.into_iter().flat_map(FenceDoc::into_fences).collect())
    }

    /// One attempt of `upsert_messages_fenced`, inside a transaction: first, for each room in id
    /// order, bump the `writes` of its fence document (created if missing) and read its fences
    /// from what that returns; then decide ([`fence::split`]) and write what passes, as
    /// `upsert_messages` would. Writing the fence document is what makes the check hold until
    /// commit: a `fence_rooms` of the room writes the same document, so under snapshot isolation
    /// one of the two transactions fails on a write conflict and runs again after the other
    /// (a read alone would let a fence commit between this check and this commit).
    async fn upsert_fenced_in(
        &self,
        s: &mut ClientSession,
        batch: &[FencedMessage],
    ) -> MongoResult<Vec<(String, i64)>> {
        let rooms = distinct(batch.iter().map(|f| f.message.room_id.as_str()));
        let mut fences = Vec::new();
        for room in rooms {
            let d = self
                .room_fences
                .find_one_and_update(doc! { "_id": room }, doc! { "$inc": { "writes": 1_i64 } })
                .upsert(true)
                .return_document(ReturnDocument::After)
                .session(&mut *s)
                .await?;
            fences.extend(d.into_iter().flat_map(FenceDoc::into_fences));
        }
        let (pass, refused) = fence::split(batch, &fences);
        // Only what is not stored: in a transaction a duplicate key aborts the whole of it.
        let fresh = self.unstored(s, &pass).await?;
        if !fresh.is_empty() {
            self.messages.insert_many(&fresh).ordered(true).session(&mut *s).await?;
        }
        for (room, head) in fence::heads(&pass) {
            self.rooms
                .update_one(doc! { "_id": room }, doc! { "$max": { "head_seq": Bson::Int64(head) } })
                .session(&mut *s)
                .await?;
        }
        Ok(refused)
    }

    /// The messages of `msgs` that share no key (id, (room, seq), dedupe key) with a stored
    /// message nor with one before them in `msgs`: what an unordered insert of `msgs` would store.
    async fn unstored(&self, s: &mut ClientSession, msgs: &[&Message]) -> MongoResult<Vec<MessageDoc>> {
        let mut ids: HashSet<String> = HashSet::new();
        let mut slots: HashSet<(String, i64)> = HashSet::new();
        let mut keys: HashSet<(String, String, String)> = HashSet::new();
        for chunk in msgs.chunks(LOOKUP_CHUNK) {
            let mut any = Vec::with_capacity(chunk.len() * 3);
            for m in chunk {
                any.push(doc! { "_id": &m.id });
                any.push(doc! { "room_id": &m.room_id, "seq": m.seq });
                any.push(doc! { "room_id": &m.room_id, "sender_id": &m.sender_id, "client_msg_id": &m.client_msg_id });
            }
            let cursor = self.messages.find(doc! { "$or": any }).session(&mut *s).await?;
            for d in collect(cursor, s).await? {
                ids.insert(d.id);
                slots.insert((d.room_id.clone(), d.seq));
                keys.insert((d.room_id, d.sender_id, d.client_msg_id));
            }
        }
        let mut fresh = Vec::new();
        for m in msgs {
            let slot = (m.room_id.clone(), m.seq);
            let key = (m.room_id.clone(), m.sender_id.clone(), m.client_msg_id.clone());
            if ids.contains(&m.id) || slots.contains(&slot) || keys.contains(&key) {
                continue;
            }
            ids.insert(m.id.clone());
            slots.insert(slot);
            keys.insert(key);
            fresh.push(MessageDoc::from(*m));
        }
        Ok(fresh)
    }
}

#[async_trait]
impl Store for MongoStore {
    async fn ping(&self) -> StoreResult<()> {
        self.db.run_command(doc! { "ping": 1 }).await.map_err(unavailable)?;
        Ok(())
    }

    async fn create_user(&self, u: NewUser) -> StoreResult<User> {
        let d = UserDoc::from(u.into_record());
        match self.users.insert_one(&d).await {
            Ok(_) => Ok(User::from(d)),
            Err(e) if is_duplicate_key(&e) => Err(StoreError::UsernameTaken),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn user(&self, id: &UserId) -> StoreResult<Option<User>> {
        let id = id.as_str();
        let d = self.users.find_one(doc! { "_id": id }).await.map_err(unavailable)?;
        Ok(d.map(User::from))
    }

    async fn credentials(&self, username: &str) -> StoreResult<Option<(User, String)>> {
        let d = self.users.find_one(doc! { "username": username }).await.map_err(unavailable)?;
        Ok(d.map(|d| {
            let hash = d.password_hash.clone();
            (User::from(d), hash)
        }))
    }

    async fn update_user(&self, id: &UserId, p: UserPatch, now: Timestamp) -> StoreResult<User> {
        let id = id.as_str();
        let mut set = doc! { "updated_at": now.0 };
        for (field, value) in
            [("display_name", p.display_name), ("status_text", p.status_text), ("avatar_url", p.avatar_url)]
        {
            if let Some(value) = value {
                self.set_versioned(&self.users, id, field, value, &p.version, &mut set).await?;
            }
        }
        if let Some(v) = p.password_hash {
            set.insert("password_hash", v);
        }
        let d = self
            .users
            .find_one_and_update(doc! { "_id": id }, doc! { "$set": set })
            .return_document(ReturnDocument::After)
            .await
            .map_err(unavailable)?;
        d.map(User::from).ok_or(StoreError::NotFound("user"))
    }

    async fn create_room(&self, r: NewRoom) -> StoreResult<Room> {
        let d = RoomDoc::from(r.into_room());
        self.atomically((self, &d), |s, (this, d)| this.create_room_in(s, d).boxed()).await.map_err(unavailable)?;
        Ok(Room::from(d))
    }

    async fn room(&self, id: &RoomId) -> StoreResult<Option<Room>> {
        let id = id.as_str();
        let d = self.rooms.find_one(doc! { "_id": id }).await.map_err(unavailable)?;
        Ok(d.map(Room::from))
    }

    async fn update_room(&self, id: &RoomId, p: RoomPatch, now: Timestamp) -> StoreResult<Room> {
        let id = id.as_str();
        let mut set = doc! { "updated_at": now.0 };
        for (field, value) in [("name", p.name), ("topic", p.topic)] {
            if let Some(value) = value {
                self.set_versioned(&self.rooms, id, field, value, &p.version, &mut set).await?;
            }
        }
        let d = self
            .rooms
            .find_one_and_update(doc! { "_id": id }, doc! { "$set": set })
            .return_document(ReturnDocument::After)
            .await
            .map_err(unavailable)?;
        d.map(Room::from).ok_or(StoreError::NotFound("room"))
    }

    async fn rooms_of_user(&self, user_id: &UserId) -> StoreResult<Vec<Room>> {
        let ids = self.room_ids_of_user(user_id).await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let cursor = self
            .rooms
            .find(doc! { "_id": { "$in": ids } })
            .sort(doc! { "created_at": -1, "_id": -1 })
            .await
            .map_err(unavailable)?;
        let docs: Vec<RoomDoc> = cursor.try_collect().await.map_err(unavailable)?;
        Ok(docs.into_iter().map(Room::from).collect())
    }

    async fn public_rooms(&self, limit: u32) -> StoreResult<Vec<Room>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let cursor = self
            .rooms
            .find(doc! { "visibility": Visibility::Public.as_str() })
            .sort(doc! { "created_at": -1, "_id": -1 })
            .limit(limit_of(limit))
            .await
            .map_err(unavailable)?;
        let docs: Vec<RoomDoc> = cursor.try_collect().await.map_err(unavailable)?;
        Ok(docs.into_iter().map(Room::from).collect())
    }

    async fn add_member(&self, room_id: &RoomId, user_id: &UserId, now: Timestamp) -> StoreResult<bool> {
        let room_id = room_id.as_str();
        let user_id = user_id.as_str();
        self.atomically((self, room_id, user_id, now), |s, (this, room_id, user_id, now)| {
            this.add_member_in(s, room_id, user_id, *now).boxed()
        })
        .await
        .map_err(unavailable)?
    }

    async fn remove_member(&self, room_id: &RoomId, user_id: &UserId) -> StoreResult<bool> {
        let room_id = room_id.as_str();
        let user_id = user_id.as_str();
        self.atomically((self, room_id, user_id), |s, (this, room_id, user_id)| {
            this.remove_member_in(s, room_id, user_id).boxed()
        })
        .await
        .map_err(unavailable)
    }

    async fn is_member(&self, room_id: &RoomId, user_id: &UserId) -> StoreResult<bool> {
        let room_id = room_id.as_str();
        let user_id = user_id.as_str();
        let found =
            self.memberships.find_one(doc! { "room_id": room_id, "user_id": user_id }).await.map_err(unavailable)?;
        Ok(found.is_some())
    }

    async fn members(
        &self,
        room_id: &RoomId,
        after: Option<(Timestamp, &str)>,
        limit: u32,
    ) -> StoreResult<Vec<Member>> {
        let room_id = room_id.as_str();
        let filter = match after {
            None => doc! { "room_id": room_id },
            Some((at, user)) => doc! { "room_id": room_id, "$or": [
                { "joined_at": { "$gt": at.0 } },
                { "joined_at": at.0, "user_id": { "$gt": user } },
            ] },
        };
        let cursor = self
            .memberships
            .find(filter)
            .sort(doc! { "joined_at": 1, "user_id": 1 })
            .limit(i64::from(limit))
            .await
            .map_err(unavailable)?;
        let joined: Vec<MembershipDoc> = cursor.try_collect().await.map_err(unavailable)?;
        if joined.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<&str> = joined.iter().map(|m| m.user_id.as_str()).collect();
        let cursor = self.users.find(doc! { "_id": { "$in": &ids } }).await.map_err(unavailable)?;
        let docs: Vec<UserDoc> = cursor.try_collect().await.map_err(unavailable)?;
        let mut by_id: HashMap<String, User> = docs.into_iter().map(|d| (d.id.clone(), User::from(d))).collect();
        // In join order; a membership whose user is gone is left out, as the SQL join does.
        Ok(joined
            .iter()
            .filter_map(|m| by_id.remove(&m.user_id).map(|user| Member { user, joined_at: Timestamp(m.joined_at) }))
            .collect())
    }

    async fn room_ids_of_user(&self, user_id: &UserId) -> StoreResult<Vec<String>> {
        let user_id = user_id.as_str();
        let cursor = self
            .memberships
            .find(doc! { "user_id": user_id })
            .sort(doc! { "room_id": 1 })
            .await
            .map_err(unavailable)?;
        let docs: Vec<MembershipDoc> = cursor.try_collect().await.map_err(unavailable)?;
        Ok(docs.into_iter().map(|m| m.room_id).collect())
    }

    /// Sequences in ONE multi-document transaction (see `append_in`), so either every outcome is
    /// durable (with the client's write concern, `majority` by default) or none is.
    ///
    /// A standalone server has no transactions, and without one there is no gap-free way: a seq
    /// taken with `find_one_and_update($inc head_seq)` cannot be given back when the insert then
    /// fails on the dedupe index (a concurrent retry of the same send), nor when the process dies
    /// between the two writes. So on a standalone server this answers
    /// `Unavailable("append_messages needs a replica set")`; a one-node replica set is enough.
    /// Cluster mode does not call this (the Redis sequencer does, and writes back through
    /// `upsert_messages`).
    async fn append_messages(&self, batch: &[SendRequest]) -> StoreResult<Vec<AppendOutcome>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        if !self.transactions {
            return Err(StoreError::Unavailable("append_messages needs a replica set".to_string()));
        }
        self.atomically((self, batch), |s, (this, batch)| this.append_in(s, batch).boxed()).await.map_err(unavailable)
    }

    /// One unordered bulk insert (`ordered: false`): every message is tried, and one that collides
    /// with a stored message on any unique index (`_id` = message id, (room, seq), or the dedupe
    /// key) leaves the stored one as it is; those duplicate-key errors (code 11000) are ignored,
    /// and any other error (or a write concern error) fails the call. Then each room's
    /// head_seq is raised with `$max` to the highest seq of the batch, which never lowers it.
    /// Both steps are idempotent, so a batch can be repeated (whole, in part, or after a crash
    /// between the steps) until it succeeds. On a replica set the driver also retries each step
    /// once after a network error (retryable writes).
    async fn upsert_messages(&self, batch: &[Message]) -> StoreResult<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let docs: Vec<MessageDoc> = batch.iter().map(MessageDoc::from).collect();
        match self.messages.insert_many(&docs).ordered(false).await {
            Ok(_) => {}
            Err(e) if is_duplicate_key(&e) => {}
            Err(e) => return Err(unavailable(e)),
        }
        let mut heads: HashMap<&str, i64> = HashMap::new();
        for m in batch {
            let head = heads.entry(m.room_id.as_str()).or_insert(m.seq);
            *head = (*head).max(m.seq);
        }
        let mut heads: Vec<(&str, i64)> = heads.into_iter().collect();
        heads.sort_unstable();
        for (room, seq) in heads {
            self.rooms
                .update_one(doc! { "_id": room }, doc! { "$max": { "head_seq": Bson::Int64(seq) } })
                .await
                .map_err(unavailable)?;
        }
        Ok(())
    }

    /// On a replica set, one transaction (see `upsert_fenced_in`): atomic with respect to
    /// `fence_rooms`. On a standalone server, which has no transactions, the fences are read and
    /// then what passes goes through `upsert_messages`: a fence recorded between that read and
    /// the insert does not stop the batch (the window is one round trip plus the insert), so a
    /// takeover on a standalone server may keep a late message of the old epoch.
    async fn upsert_messages_fenced(&self, batch: &[FencedMessage]) -> StoreResult<Vec<(String, i64)>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        if self.transactions {
            return self
                .atomically((self, batch), |s, (this, batch)| this.upsert_fenced_in(s, batch).boxed())
                .await
                .map_err(unavailable);
        }
        let rooms = distinct(batch.iter().map(|f| f.message.room_id.as_str()));
        let fences = self.fences_of(&rooms).await?;
        let (pass, refused) = fence::split(batch, &fences);
        let pass: Vec<Message> = pass.into_iter().cloned().collect();
        self.upsert_messages(&pass).await?;
        Ok(refused)
    }

    async fn fence_rooms(&self, fences: &[RoomFence]) -> StoreResult<()> {
        if fences.is_empty() {
            return Ok(());
        }
        let mut sorted = fences.to_vec();
        sorted.sort_by(|a, b| (a.room_id.as_str(), a.token).cmp(&(b.room_id.as_str(), b.token)));
        self.atomically((self, sorted.as_slice()), |s, (this, fences)| this.fence_in(s, fences).boxed())
            .await
            .map_err(unavailable)?
    }

    async fn room_fences(&self, room_id: &RoomId) -> StoreResult<Vec<RoomFence>> {
        let mut fences = self.fences_of(&[room_id.as_str()]).await?;
        fences.sort_by_key(|f| f.token);
        Ok(fences)
    }

    async fn messages_after(&self, room_id: &RoomId, after_seq: i64, limit: u32) -> StoreResult<Vec<Message>> {
        let room_id = room_id.as_str();
        self.find_messages(doc! { "room_id": room_id, "seq": { "$gt": after_seq } }, doc! { "seq": 1 }, limit).await
    }

    async fn messages_before(&self, room_id: &RoomId, before_seq: i64, limit: u32) -> StoreResult<Vec<Message>> {
        let room_id = room_id.as_str();
        let mut msgs = self
            .find_messages(doc! { "room_id": room_id, "seq": { "$lt": before_seq } }, doc! { "seq": -1 }, limit)
            .await?;
        msgs.reverse();
        Ok(msgs)
    }

    /// Always read from the primary, whatever the URL's read preference: the cluster sequencer
    /// seeds a room's counter from this, and a head read from a lagging secondary would hand out
    /// a seq twice.
    async fn head_seq(&self, room_id: &RoomId) -> StoreResult<Option<i64>> {
        let room_id = room_id.as_str();
        let d = self
            .rooms
            .clone_with_type::<HeadDoc>()
            .find_one(doc! { "_id": room_id })
            .projection(doc! { "head_seq": 1 })
            .selection_criteria(SelectionCriteria::ReadPreference(ReadPreference::Primary))
            .await
            .map_err(unavailable)?;
        Ok(d.map(|d| d.head_seq))
    }

    async fn export(&self) -> StoreResult<Box<dyn ExportSnapshot>> {
        let (mut session, consistency) = if self.transactions {
            let s = self.client.start_session().snapshot(true).await.map_err(unavailable)?;
            (s, ExportConsistency::Snapshot)
        } else {
            (self.client.start_session().await.map_err(unavailable)?, ExportConsistency::BestEffort)
        };
        // A snapshot session takes its cluster time at its first read: take it now.
        self.users.find_one(doc! {}).session(&mut session).await.map_err(unavailable)?;
        Ok(Box::new(MongoExport {
            session,
            users: self.users.clone(),
            rooms: self.rooms.clone(),
            memberships: self.memberships.clone(),
            messages: self.messages.clone(),
            consistency,
        }))
    }

    /// One unordered bulk insert. A document that fails on a unique index is kept out; if its id
    /// is stored, that is the "already there" case, else its username belongs to another user
    /// (`UsernameTaken`; the other users of the batch are stored).
    async fn import_users(&self, users: &[UserRecord]) -> StoreResult<()> {
        if users.is_empty() {
            return Ok(());
        }
        let docs: Vec<UserDoc> = users.iter().cloned().map(UserDoc::from).collect();
        let e = match self.users.insert_many(&docs).ordered(false).await {
            Ok(_) => return Ok(()),
            Err(e) if is_duplicate_key(&e) => e,
            Err(e) => return Err(unavailable(e)),
        };
        let failed: Vec<&str> = match &*e.kind {
            ErrorKind::InsertMany(f) => {
                f.write_errors.iter().flatten().filter_map(|w| docs.get(w.index)).map(|d| d.id.as_str()).collect()
            }
            _ => docs.iter().map(|d| d.id.as_str()).collect(),
        };
        let failed = distinct(failed.into_iter());
        let stored = self.users.count_documents(doc! { "_id": { "$in": &failed } }).await.map_err(unavailable)?;
        if stored == failed.len() as u64 { Ok(()) } else { Err(StoreError::UsernameTaken) }
    }

    /// One upsert per room: `$setOnInsert` of every field but `head_seq`, and `$max` of
    /// `head_seq` (which sets it on insert and only ever raises it on a stored room).
    async fn import_rooms(&self, rooms: &[Room]) -> StoreResult<()> {
        if rooms.is_empty() {
            return Ok(());
        }
        let owners = distinct(rooms.iter().map(|r| r.owner_id.as_str()));
        let known = self.users.count_documents(doc! { "_id": { "$in": &owners } }).await.map_err(unavailable)?;
        if known != owners.len() as u64 {
            return Err(StoreError::NotFound("user"));
        }
        for r in rooms {
            self.rooms
                .update_one(
                    doc! { "_id": &r.id },
                    doc! {
                        "$setOnInsert": {
                            "name": &r.name,
                            "topic": &r.topic,
                            "visibility": r.visibility.as_str(),
                            "owner_id": &r.owner_id,
                            "home_region": &r.home_region,
                            "member_count": r.member_count,
                            "created_at": r.created_at.0,
                            "updated_at": r.updated_at.0,
                        },
                        "$max": { "head_seq": r.head_seq },
                    },
                )
                .upsert(true)
                .await
                .map_err(unavailable)?;
        }
        Ok(())
    }

    /// Checks that every room and user named exists, inserts the memberships unordered (one that
    /// is stored fails on the unique (room_id, user_id) index and is kept out), then recounts the
    /// rooms' members. Without a transaction: a crash half-way leaves counters that the next
    /// import of the same batch sets right.
    async fn import_memberships(&self, memberships: &[Membership]) -> StoreResult<()> {
        if memberships.is_empty() {
            return Ok(());
        }
        let rooms = distinct(memberships.iter().map(|m| m.room_id.as_str()));
        let users = distinct(memberships.iter().map(|m| m.user_id.as_str()));
        let known = self.rooms.count_documents(doc! { "_id": { "$in": &rooms } }).await.map_err(unavailable)?;
        if known != rooms.len() as u64 {
            return Err(StoreError::NotFound("room"));
        }
        let known = self.users.count_documents(doc! { "_id": { "$in": &users } }).await.map_err(unavailable)?;
        if known != users.len() as u64 {
            return Err(StoreError::NotFound("user"));
        }
        let docs: Vec<MembershipDoc> = memberships
            .iter()
            .map(|m| MembershipDoc { room_id: m.room_id.clone(), user_id: m.user_id.clone(), joined_at: m.joined_at.0 })
            .collect();
        match self.memberships.insert_many(&docs).ordered(false).await {
            Ok(_) => {}
            Err(e) if is_duplicate_key(&e) => {}
            Err(e) => return Err(unavailable(e)),
        }
        let cursor = self
            .memberships
            .aggregate([
                doc! { "$match": { "room_id": { "$in": &rooms } } },
                doc! { "$group": { "_id": "$room_id", "n": { "$sum": 1 } } },
            ])
            .await
            .map_err(unavailable)?;
        let counts: Vec<Document> = cursor.try_collect().await.map_err(unavailable)?;
        let mut counts: HashMap<String, i64> = counts
            .into_iter()
            .filter_map(|d| {
                let n = d.get("n").and_then(|n| n.as_i64().or_else(|| n.as_i32().map(i64::from)))?;
                Some((d.get_str("_id").ok()?.to_string(), n))
            })
            .collect();
        for room in rooms {
            let n = counts.remove(room).unwrap_or(0);
            self.rooms
                .update_one(doc! { "_id": room }, doc! { "$set": { "member_count": n } })
                .await
                .map_err(unavailable)?;
        }
        Ok(())
    }

    /// One `findAndModify` with upsert: the filter matches the lease where it expired or is the
    /// holder's own, and the pipeline update moves the token unless the holder extends its own
    /// unexpired lease. A lease held by another does not match, so the upsert tries to insert a
    /// second document with its name and fails on the `_id` index: not acquired. Of concurrent
    /// acquirers of a free lease, exactly one writes it; the others then find it held.
    async fn acquire_lease(&self, name: &str, holder: &str, ttl_ms: i64, now: Timestamp) -> StoreResult<Option<Lease>> {
        let filter = doc! { "_id": name, "$or": [{ "expires_at": { "$lte": now.0 } }, { "holder": holder }] };
        // `$literal`: a holder spelled like `$field` is a name, not a path.
        let own = doc! { "$and": [
            { "$eq": ["$holder", { "$literal": holder }] },
            { "$gt": ["$expires_at", Bson::Int64(now.0)] },
        ] };
        let next = doc! { "$add": [{ "$ifNull": ["$token", Bson::Int64(0)] }, Bson::Int64(1)] };
        let update = vec![doc! { "$set": {
            "token": { "$cond": [own, "$token", next] },
            "holder": { "$literal": holder },
            "expires_at": Bson::Int64(now.0.saturating_add(ttl_ms)),
        } }];
        let res =
            self.leases.find_one_and_update(filter, update).upsert(true).return_document(ReturnDocument::After).await;
        match res {
            Ok(d) => Ok(d.map(Lease::from)),
            Err(e) if is_duplicate_key(&e) => Ok(None),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn renew_lease(
        &self,
        name: &str,
        holder: &str,
        token: i64,
        ttl_ms: i64,
        now: Timestamp,
    ) -> StoreResult<Option<Lease>> {
        let filter = doc! { "_id": name, "holder": holder, "token": token, "expires_at": { "$gt": now.0 } };
        let update = doc! { "$set": { "expires_at": now.0.saturating_add(ttl_ms) } };
        let d = self
            .leases
            .find_one_and_update(filter, update)
            .return_document(ReturnDocument::After)
            .await
            .map_err(unavailable)?;
        Ok(d.map(Lease::from))
    }

    async fn release_lease(&self, name: &str, holder: &str, token: i64, now: Timestamp) -> StoreResult<bool> {
        let filter = doc! { "_id": name, "holder": holder, "token": token, "expires_at": { "$gt": now.0 } };
        let res =
            self.leases.update_one(filter, doc! { "$set": { "expires_at": now.0 } }).await.map_err(unavailable)?;
        Ok(res.matched_count == 1)
    }

    async fn lease(&self, name: &str) -> StoreResult<Option<Lease>> {
        let d = self.leases.find_one(doc! { "_id": name }).await.map_err(unavailable)?;
        Ok(d.map(Lease::from))
    }

    async fn leases(&self) -> StoreResult<Vec<Lease>> {
        let cursor = self.leases.find(doc! {}).sort(doc! { "_id": 1 }).await.map_err(unavailable)?;
        let docs: Vec<LeaseDoc> = cursor.try_collect().await.map_err(unavailable)?;
        Ok(docs.into_iter().map(Lease::from).collect())
    }
}
