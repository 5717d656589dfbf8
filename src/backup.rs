//! `chatmesh backup` and `chatmesh restore`: a consistent, streamed export of a store into one
//! file, and an idempotent load of such a file into any store backend (so the pair also migrates
//! between backends, e.g. SQLite → PostgreSQL).
//!
//! # Format (version 1)
//!
//! [JSON Lines](https://jsonlines.org/): UTF-8, one JSON object per line, each line ended by `\n`
//! (strings are JSON-escaped, so a message body never spans lines).
//!
//! 1. **Header**, the first line:
//!    `{"format":"chatmesh-backup","version":1,"created_at":"2026-01-02T03:04:05.678Z","source":"sqlite","consistency":"snapshot"}`
//!    (`source`: the backend read, `consistency`: `snapshot` or `best-effort`, see
//!    [`ExportConsistency`]).
//! 2. **Records**, one per line, tagged by `kind`, in four sections in this order (the order of
//!    their references, so a restore never inserts a row before what it names), each sorted by
//!    its key:
//!    - `{"kind":"user","id","username","display_name","status_text","avatar_url","password_hash","created_at","updated_at"}` by `id`;
//!    - `{"kind":"room","id","name","topic","visibility","owner_id","home_region","head_seq","member_count","created_at","updated_at"}` by `id`;
//!    - `{"kind":"membership","room_id","user_id","joined_at"}` by (`room_id`, `user_id`);
//!    - `{"kind":"message","id","room_id","seq","sender_id","client_msg_id","body","created_at"}` by (`room_id`, `seq`).
//!
//!    Times are integers: Unix milliseconds, exactly as stored.
//! 3. **Trailer**, the last line: `{"kind":"end","counts":{"users":3,"rooms":3,"memberships":7,"messages":300}}`.
//!    The counts are only known at the end of a streamed export, and they let a restore tell a
//!    complete file from a truncated one.
//!
//! A restore refuses (one-line error, exit 1) a file whose first line is not the header, whose
//! version it does not read, with a line that is not a record, with a record out of section order,
//! with anything after the trailer, or whose trailer is missing or counts other numbers than the
//! file holds. A regular file is checked completely before anything is written to the store; stdin
//! (`-`) cannot be read twice, so it is checked while it is loaded, and a truncated stream is
//! reported after the records before the cut were restored (run the restore again with a complete
//! file: it is idempotent).
//!
//! # Memory
//!
//! Both commands hold at most one page of [`PAGE_SIZE`] records: the backup pages through every
//! table/collection with keyset pagination (see [`ExportSnapshot`]) and writes each page out, the
//! restore reads line by line and writes a batch per page.
//!
//! # Consistency
//!
//! The backup reads every page from one snapshot ([`Store::export`]): a read transaction in WAL
//! mode on SQLite, a `REPEATABLE READ, READ ONLY` transaction on PostgreSQL, a snapshot session on
//! a MongoDB replica set (best effort on a standalone server, where the header says
//! `"consistency":"best-effort"`). Writers are never blocked; a backup of a live server is the
//! state as of the moment it started.
//!
//! # Restore semantics
//!
//! Insert-if-missing, keeping ids, timestamps, password hashes and counters: a row whose key is
//! stored already is kept as it is, so restoring the same file twice gives the same store as
//! restoring it once; a room's `head_seq` is only ever raised (a seq handed out once is never
//! handed out again), and `member_count` is set to the number of stored memberships. Messages go
//! through [`Store::upsert_messages`]. A username taken by another user of the target store stops
//! the restore. The JWT signing key is not part of the store: users keep their passwords, but
//! tokens signed by another key must log in again.
//!
//! Leases and room fences (region takeover, see [`Store::acquire_lease`] and
//! [`Store::fence_rooms`]) are operational state, not data: a backup leaves them out and a
//! restored store has none, so the regions take their leases again (tokens start over at 1 there;
//! fences from before no longer apply).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, anyhow, bail};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};

use crate::config::{BackupArgs, RestoreArgs, StoreUrl};
use crate::domain::{Message, Room, Timestamp};
use crate::store::stored::{StoredMembership, StoredMessage, StoredRoom, StoredUser};
use crate::store::{self, ExportConsistency, ExportSnapshot, Membership, Store, StoreError, UserRecord};

/// Records per export page and per restore batch: what bounds the memory of both commands.
pub const PAGE_SIZE: u32 = 1000;
/// The `format` of the header line.
pub const FORMAT: &str = "chatmesh-backup";
/// The format version this build writes and reads.
pub const VERSION: u32 = 1;

/// Sends log lines to stderr: with `--out -` stdout is the backup itself.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .compact()
        .try_init();
}

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    format: String,
    version: u32,
    #[serde(default)]
    created_at: String,
    #[serde(default)]
    source: String,
    #[serde(default)]
    consistency: String,
}

/// Records per kind; the trailer's payload.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub users: u64,
    pub rooms: u64,
    pub memberships: u64,
    pub messages: u64,
}

impl Counts {
    fn total(&self) -> u64 {
        self.users + self.rooms + self.memberships + self.messages
    }
}

impl std::fmt::Display for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} users, {} rooms, {} memberships, {} messages",
            self.users, self.rooms, self.memberships, self.messages
        )
    }
}

/// One line after the header. The records are the models as stored ([`crate::store::stored`]):
/// times in ms, unknown fields refused.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Record {
    User(StoredUser),
    Room(StoredRoom),
    Membership(StoredMembership),
    Message(StoredMessage),
    End { counts: Counts },
}

fn backend_name(url: &StoreUrl) -> &'static str {
    match url {
        StoreUrl::Sqlite { .. } => "sqlite",
        StoreUrl::Postgres { .. } => "postgres",
        StoreUrl::Mongo { .. } => "mongodb",
    }
}

/// Opens the store, with a message that names the backend but never the URL (it may hold a
/// password).
async fn open_store(url: &StoreUrl) -> anyhow::Result<std::sync::Arc<dyn Store>> {
    store::open(url).await.with_context(|| format!("cannot open the {} store", backend_name(url)))
}

// ---------------------------------------------------------------------------------------------
// backup

/// Where the backup goes: stdout, or a temporary file next to the destination (mode 0600: it
/// holds password hashes) that is renamed over it only once the backup is complete, so an
/// existing backup is never left half-written.
struct Output {
    writer: BufWriter<Box<dyn AsyncWrite + Unpin + Send>>,
    file: Option<PendingFile>,
    line: Vec<u8>,
}

/// The temporary file of an `--out FILE` backup; removed on drop unless renamed into place.
struct PendingFile {
    tmp: PathBuf,
    dest: PathBuf,
    handle: Option<tokio::fs::File>,
    done: bool,
}

impl Drop for PendingFile {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

impl Output {
    async fn open(out: &str) -> anyhow::Result<Self> {
        if out == "-" {
            let stdout: Box<dyn AsyncWrite + Unpin + Send> = Box::new(tokio::io::stdout());
            return Ok(Self { writer: BufWriter::with_capacity(1 << 16, stdout), file: None, line: Vec::new() });
        }
        let dest = PathBuf::from(out);
        let name = dest.file_name().ok_or_else(|| anyhow!("--out {out}: not a file name"))?;
        let mut tmp_name = name.to_os_string();
        tmp_name.push(format!(".partial-{}", std::process::id()));
        let tmp = dest.with_file_name(tmp_name);
        // Owner-only: the backup holds password hashes.
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .await
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        let pending = PendingFile { tmp, dest, handle: Some(file.try_clone().await?), done: false };
        let boxed: Box<dyn AsyncWrite + Unpin + Send> = Box::new(file);
        Ok(Self { writer: BufWriter::with_capacity(1 << 16, boxed), file: Some(pending), line: Vec::new() })
    }

    async fn write<T: Serialize>(&mut self, value: &T) -> anyhow::Result<()> {
        self.line.clear();
        serde_json::to_writer(&mut self.line, value)?;
        self.line.push(b'\n');
        self.writer.write_all(&self.line).await.context("cannot write the backup")
    }

    /// Flushes; for a file also fsyncs it and renames it over the destination.
    async fn finish(mut self) -> anyhow::Result<()> {
        self.writer.flush().await.context("cannot write the backup")?;
        if let Some(mut pending) = self.file.take() {
            if let Some(handle) = pending.handle.take() {
                handle.sync_all().await.context("cannot sync the backup file")?;
            }
            tokio::fs::rename(&pending.tmp, &pending.dest)
                .await
                .with_context(|| format!("cannot move the backup into place at {}", pending.dest.display()))?;
            pending.done = true;
        }
        Ok(())
    }
}

/// A page of the export, with what went wrong named.
fn export_error(kind: &str) -> impl FnOnce(StoreError) -> anyhow::Error + '_ {
    move |e| anyhow!("reading {kind}: {e}")
}

/// `chatmesh backup`: streams the store `url` names into `args.out` (see the module docs).
pub async fn backup(args: BackupArgs, url: StoreUrl) -> anyhow::Result<Counts> {
    let started = Instant::now();
    if let StoreUrl::Sqlite { path } = &url
        && !path.is_file()
    {
        // Opening would create an empty store, and its backup would look like a real one.
        bail!("no SQLite store at {}", path.display());
    }
    let store = open_store(&url).await?;
    let mut snap = store.export().await.map_err(|e| anyhow!("cannot start the export: {e}"))?;
    let consistency = snap.consistency();
    if consistency == ExportConsistency::BestEffort {
        tracing::warn!(
            "the store cannot read a snapshot (a standalone MongoDB server): the backup is best effort, \
             writes made while it runs may be partly in it"
        );
    }
    let mut out = Output::open(&args.out).await?;
    out.write(&Header {
        format: FORMAT.to_string(),
        version: VERSION,
        created_at: Timestamp::now().to_rfc3339(),
        source: backend_name(&url).to_string(),
        consistency: consistency.as_str().to_string(),
    })
    .await?;
    let counts = export_all(&mut *snap, &mut out).await?;
    out.write(&Record::End { counts }).await?;
    out.finish().await?;
    drop(snap);
    tracing::info!(
        users = counts.users,
        rooms = counts.rooms,
        memberships = counts.memberships,
        messages = counts.messages,
        consistency = consistency.as_str(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "backup written to {}",
        if args.out == "-" { "stdout" } else { &args.out }
    );
    Ok(counts)
}

async fn export_all(snap: &mut dyn ExportSnapshot, out: &mut Output) -> anyhow::Result<Counts> {
    let mut counts = Counts::default();

    let mut after: Option<String> = None;
    loop {
        let page = snap.users_page(after.as_deref(), PAGE_SIZE).await.map_err(export_error("users"))?;
        let full = page.len() == PAGE_SIZE as usize;
        for r in page {
            after = Some(r.user.id.clone());
            out.write(&Record::User(r.into())).await?;
            counts.users += 1;
        }
        if !full {
            break;
        }
    }

    let mut after: Option<String> = None;
    loop {
        let page = snap.rooms_page(after.as_deref(), PAGE_SIZE).await.map_err(export_error("rooms"))?;
        let full = page.len() == PAGE_SIZE as usize;
        for r in page {
            after = Some(r.id.clone());
            out.write(&Record::Room(r.into())).await?;
            counts.rooms += 1;
        }
        if !full {
            break;
        }
    }

    let mut after: Option<(String, String)> = None;
    loop {
        let cursor = after.as_ref().map(|(r, u)| (r.as_str(), u.as_str()));
        let page = snap.memberships_page(cursor, PAGE_SIZE).await.map_err(export_error("memberships"))?;
        let full = page.len() == PAGE_SIZE as usize;
        for m in page {
            after = Some((m.room_id.clone(), m.user_id.clone()));
            out.write(&Record::Membership(m.into())).await?;
            counts.memberships += 1;
        }
        if !full {
            break;
        }
    }

    let mut after: Option<(String, i64)> = None;
    loop {
        let cursor = after.as_ref().map(|(r, s)| (r.as_str(), *s));
        let page = snap.messages_page(cursor, PAGE_SIZE).await.map_err(export_error("messages"))?;
        let full = page.len() == PAGE_SIZE as usize;
        for m in page {
            after = Some((m.room_id.clone(), m.seq));
            out.write(&Record::Message(m.into())).await?;
            counts.messages += 1;
        }
        if !full {
            break;
        }
    }
    Ok(counts)
}

// ---------------------------------------------------------------------------------------------
// restore

/// Reads a backup line by line and checks its structure: header first, sections in order,
/// trailer last and matching.
struct Reader {
    input: Box<dyn AsyncBufRead + Unpin + Send>,
    /// How the input is named in errors: the path, or `stdin`.
    name: String,
    line_no: u64,
    buf: String,
    /// The section of the last record (0 users .. 3 messages).
    section: usize,
    counts: Counts,
    end: Option<Counts>,
}

const SECTIONS: [&str; 4] = ["user", "room", "membership", "message"];

impl Reader {
    async fn open(input: &str) -> anyhow::Result<Self> {
        let (reader, name): (Box<dyn AsyncBufRead + Unpin + Send>, String) = if input == "-" {
            (Box::new(BufReader::with_capacity(1 << 16, tokio::io::stdin())), "stdin".to_string())
        } else {
            let file = tokio::fs::File::open(Path::new(input)).await.with_context(|| format!("cannot open {input}"))?;
            (Box::new(BufReader::with_capacity(1 << 16, file)), input.to_string())
        };
        Ok(Self {
            input: reader,
            name,
            line_no: 0,
            buf: String::new(),
            section: 0,
            counts: Counts::default(),
            end: None,
        })
    }

    /// Reads the next line into `buf`; `false` at the end of the input.
    async fn read_line(&mut self) -> anyhow::Result<bool> {
        self.buf.clear();
        let n = self.input.read_line(&mut self.buf).await.with_context(|| format!("{}: cannot read", self.name))?;
        if n == 0 {
            return Ok(false);
        }
        self.line_no += 1;
        Ok(true)
    }

    /// The line last read, without its line end.
    fn line(&self) -> &str {
        self.buf.trim_end_matches(['\n', '\r'])
    }

    /// Reads and checks the header line.
    async fn header(&mut self) -> anyhow::Result<Header> {
        let name = self.name.clone();
        if !self.read_line().await? {
            bail!("{name}: empty input, not a chatmesh backup");
        }
        let header: Header =
            serde_json::from_str(self.line()).ok().filter(|h: &Header| h.format == FORMAT).ok_or_else(|| {
                anyhow!("{name}: not a chatmesh backup (line 1 is not a {{\"format\":\"{FORMAT}\",...}} header)")
            })?;
        if header.version != VERSION {
            bail!("{name}: backup version {} is not supported (this build reads version {VERSION})", header.version);
        }
        Ok(header)
    }

    /// The next record (the trailer is checked and kept, never returned), `None` at the end of
    /// the input after the trailer.
    async fn next_record(&mut self) -> anyhow::Result<Option<Record>> {
        let name = self.name.clone();
        loop {
            if !self.read_line().await? {
                return match self.end {
                    Some(_) => Ok(None),
                    None => bail!(
                        "{name}: incomplete backup: no end line after {} records ({}); the backup is truncated",
                        self.counts.total(),
                        self.counts
                    ),
                };
            }
            let line_no = self.line_no;
            if self.end.is_some() {
                bail!("{name}: line {line_no}: data after the end line");
            }
            let record: Record = serde_json::from_str(self.line())
                .map_err(|e| anyhow!("{name}: line {line_no}: not a backup record: {e}"))?;
            let section = match &record {
                Record::User(_) => 0,
                Record::Room(_) => 1,
                Record::Membership(_) => 2,
                Record::Message(_) => 3,
                Record::End { counts } => {
                    if *counts != self.counts {
                        bail!(
                            "{name}: incomplete backup: the end line counts {counts} but the file holds {}",
                            self.counts
                        );
                    }
                    self.end = Some(*counts);
                    continue;
                }
            };
            if section < self.section {
                bail!(
                    "{name}: line {line_no}: a {} record after the {} records (the order is users, rooms, memberships, messages)",
                    SECTIONS[section],
                    SECTIONS[self.section]
                );
            }
            self.section = section;
            match section {
                0 => self.counts.users += 1,
                1 => self.counts.rooms += 1,
                2 => self.counts.memberships += 1,
                _ => self.counts.messages += 1,
            }
            return Ok(Some(record));
        }
    }
}

/// Records waiting to be written, at most [`PAGE_SIZE`] of one kind (sections come in order, so
/// only one of these is ever non-empty).
#[derive(Default)]
struct Batches {
    users: Vec<UserRecord>,
    rooms: Vec<Room>,
    memberships: Vec<Membership>,
    messages: Vec<Message>,
}

impl Batches {
    fn len(&self) -> usize {
        self.users.len() + self.rooms.len() + self.memberships.len() + self.messages.len()
    }

    /// Writes every pending record, in section order; `line` is the last input line they hold.
    async fn flush(&mut self, store: &dyn Store, line: u64) -> anyhow::Result<()> {
        let at = |what: &str, e: StoreError| match e {
            StoreError::UsernameTaken => anyhow!(
                "restoring {what} (up to line {line}): a username of the backup belongs to another user of the store"
            ),
            StoreError::NotFound(missing) => anyhow!(
                "restoring {what} (up to line {line}): the backup names a {missing} that is neither in it nor in the store"
            ),
            e => anyhow!("restoring {what} (up to line {line}): {e}"),
        };
        if !self.users.is_empty() {
            store.import_users(&self.users).await.map_err(|e| at("users", e))?;
            self.users.clear();
        }
        if !self.rooms.is_empty() {
            store.import_rooms(&self.rooms).await.map_err(|e| at("rooms", e))?;
            self.rooms.clear();
        }
        if !self.memberships.is_empty() {
            store.import_memberships(&self.memberships).await.map_err(|e| at("memberships", e))?;
            self.memberships.clear();
        }
        if !self.messages.is_empty() {
            store.upsert_messages(&self.messages).await.map_err(|e| at("messages", e))?;
            self.messages.clear();
        }
        Ok(())
    }
}

/// Reads the whole input and checks it, writing nothing; the counts of a complete backup.
async fn verify(input: &str) -> anyhow::Result<Counts> {
    let mut reader = Reader::open(input).await?;
    reader.header().await?;
    while reader.next_record().await?.is_some() {}
    Ok(reader.counts)
}

/// `chatmesh restore`: loads `args.input` into the store `url` names (see the module docs).
pub async fn restore(args: RestoreArgs, url: StoreUrl) -> anyhow::Result<Counts> {
    let started = Instant::now();
    let from_stdin = args.input == "-";
    if !from_stdin {
        // A file can be read twice: refuse a damaged one before touching the store.
        verify(&args.input).await?;
    }
    let mut reader = Reader::open(&args.input).await?;
    let header = reader.header().await?;
    if header.consistency == ExportConsistency::BestEffort.as_str() {
        tracing::warn!("this backup was read without a snapshot (best effort): counters are set right on restore");
    }
    let store = open_store(&url).await?;
    let mut batches = Batches::default();
    let mut section = 0;
    let res: anyhow::Result<()> = async {
        while let Some(record) = reader.next_record().await? {
            // A new section: everything before it is written first (its rows are referenced).
            if reader.section != section {
                batches.flush(&*store, reader.line_no - 1).await?;
                section = reader.section;
            }
            match record {
                Record::User(l) => batches.users.push(l.into()),
                Record::Room(l) => batches.rooms.push(l.into()),
                Record::Membership(l) => batches.memberships.push(l.into()),
                Record::Message(l) => batches.messages.push(l.into()),
                Record::End { .. } => unreachable!("the reader keeps the end line"),
            }
            if batches.len() >= PAGE_SIZE as usize {
                batches.flush(&*store, reader.line_no).await?;
            }
        }
        batches.flush(&*store, reader.line_no).await
    }
    .await;
    if let Err(e) = res {
        if from_stdin && reader.counts.total() > 0 {
            bail!(
                "{e:#}; the records before it may have been restored (restore is idempotent: run it again with a complete backup)"
            );
        }
        return Err(e);
    }
    let counts = reader.counts;
    tracing::info!(
        users = counts.users,
        rooms = counts.rooms,
        memberships = counts.memberships,
        messages = counts.messages,
        source = %header.source,
        backup_created_at = %header.created_at,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "restored {} into the {} store",
        reader.name,
        backend_name(&url)
    );
    Ok(counts)
}
