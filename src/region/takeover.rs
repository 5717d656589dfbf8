//! `chatmesh region takeover --region a [--by b]`: region b takes over the rooms homed in a, whose
//! lease lapsed (a is lost, or cut off from the store). Run with the settings of b's instances
//! (its store, its Redis). In order:
//!
//! 1. refuse while a's lease is live, and until its expiry plus the drift margin has passed (a's
//!    instances stopped deciding a margin before the expiry: self-fencing);
//! 2. acquire `home:a` for b: the next fencing token;
//! 3. for every room homed in a: move b's counter to the highest seq a surviving region holds
//!    (b's replicated copy, or the store);
//! 4. fence every room in the store after that seq under the new token: a late write-back of a
//!    message a sequenced there is refused; then move the counter past anything a wrote back
//!    before the fence, write what b holds past the store's head back to the store (under a's
//!    old token: it was sequenced before the takeover), and drop replicated messages b kept
//!    beyond a gap (the messages before them are lost with a);
//! 5. mark the epoch ready in b's Redis: b's instances decide a's rooms from now on, and every
//!    region forwards them to b.
//!
//! Run again after a failure, it finishes the same takeover (same token); run again after it
//! completed, it changes nothing and says so (`already_done`).
//!
//! **Give back** (`--region a --by a`, run with a's settings once a is back): a asks the holder
//! to let the lease lapse (the lease `handback:a`, which the holder's instances honour by no
//! longer renewing `home:a`), waits for the expiry plus the margin and until its replicated copy
//! caught up with the holder past that expiry, then takes the rooms back with the same steps
//! (the next token). **Stepping down** ([`Takeovers::step_down`]): a region that finds its home's lease
//! held by another under a newer token than it decided under drops, per room, what it holds at
//! or past the fence (messages the store and the other regions refuse), so that it takes the new
//! home's messages from there.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use redis::AsyncCommands;
use serde::Serialize;

use super::homes::{LeaseTiming, lease_name, set_marker};
use crate::domain::{Message, RoomId, Timestamp};
use crate::history::{Cursor, RedisHistory};
use crate::redis_io::{Keys, Redis};
use crate::store::{FencedMessage, RoomFence, Store};

/// What a takeover did (printed as JSON by the command).
#[derive(Debug, Serialize)]
pub struct Report {
    pub region: String,
    pub by: String,
    pub token: i64,
    pub previous_token: i64,
    /// The takeover had completed before: nothing was changed.
    pub already_done: bool,
    pub rooms: usize,
    /// Messages b held past the store's head, written back under the old token.
    pub written_back: usize,
    /// Replicated messages dropped because the messages before them never reached b.
    pub dropped_beyond_gap: usize,
    /// Messages a wrote back to the store past what b held (before the fence): kept, and b now
    /// knows them (a retry of one is that message).
    pub landed_past_held: usize,
    /// Per room, the first seq of the new epoch.
    pub fences: Vec<Fence>,
}

#[derive(Debug, Serialize)]
pub struct Fence {
    pub room_id: String,
    pub from_seq: i64,
}

/// Rooms read per page while listing the rooms homed in a region.
const PAGE: u32 = 500;

/// Moves the room's counter (KEYS[1]) to at least the store's head (ARGV[1]) and its epoch floor
/// (KEYS[2], `token:from_seq`) to the new token (ARGV[2]) from the seq after the counter; answers
/// the counter. One script: a replicated message of the old epoch is either applied before it
/// (and counted in the answer) or, at or past the fence, refused after it.
const RAISE: &str = "local c = tonumber(redis.call('GET', KEYS[1]) or '0') \
local h = tonumber(ARGV[1]) \
if h > c then c = h redis.call('SET', KEYS[1], c) end \
local f = redis.call('GET', KEYS[2]) \
local t = f and tonumber(string.match(f, '^(%d+)')) or 0 \
if t < tonumber(ARGV[2]) then redis.call('SET', KEYS[2], ARGV[2] .. ':' .. (c + 1)) end \
return c";

/// What a takeover, a give-back and a step-down work on: the store, this region's Redis, and the
/// settings of its instances.
#[derive(Clone)]
pub struct Takeovers {
    pub store: Arc<dyn Store>,
    pub redis: Redis,
    pub keys: Keys,
    pub timing: LeaseTiming,
    /// How long a message's dedupe key is kept (CHATMESH_DEDUPE_TTL_HOURS): a takeover writes some.
    pub dedupe_ttl: Duration,
}

/// The lease by which a home region asks the holder of its home lease to let it lapse.
pub fn handback_name(region: &str) -> String {
    format!("handback:{region}")
}

/// The ids of the rooms homed in `region`.
pub async fn rooms_homed_in(store: &Arc<dyn Store>, region: &str) -> anyhow::Result<Vec<String>> {
    let mut rooms = Vec::new();
    let mut snapshot = store.export().await.context("listing the rooms")?;
    let mut after: Option<String> = None;
    loop {
        let page = snapshot.rooms_page(after.as_deref(), PAGE).await.context("listing the rooms")?;
        let Some(last) = page.last() else { break };
        after = Some(last.id.clone());
        rooms.extend(page.into_iter().filter(|r| r.home_region == region).map(|r| r.id));
    }
    Ok(rooms)
}

impl Takeovers {
    /// Give back: asks the holder to let `home:<region>` lapse and waits until `region` may take it
    /// back: expired plus the margin, and this region's copy of the holder's outboxes caught up past
    /// the expiry (everything the holder sequenced is here). Bounded by `patience`.
    async fn wait_for_hand_back(&self, region: &str, patience: Duration) -> anyhow::Result<()> {
        let Self { store, redis, keys, timing, .. } = self;
        let name = lease_name(region);
        // Asked once, for longer than the wait: the holder honours it until it expires.
        let ask_ttl = (timing.ttl * 3 + patience).as_millis() as i64;
        store
            .acquire_lease(&handback_name(region), region, ask_ttl, Timestamp::now())
            .await
            .context("asking for the rooms back")?;
        let started = std::time::Instant::now();
        loop {
            let now = Timestamp::now();
            let Some(lease) = store.lease(&name).await.context("reading the lease")? else { return Ok(()) };
            if lease.holder == region {
                return Ok(());
            }
            let lapsed = now.0 >= lease.expires_at.0 + timing.margin.as_millis() as i64;
            let caught_up: Option<i64> =
                redis.conn().await.get(keys.replication_caught_up(&lease.holder)).await.context("reading Redis")?;
            let caught_up = caught_up.is_some_and(|ms| ms >= lease.expires_at.0);
            if lapsed && caught_up {
                return Ok(());
            }
            if started.elapsed() > patience {
                bail!(
                    "region {} still holds {name} (expires at {} ms, lapsed: {lapsed}) or this region has not caught up with \
                 it past the expiry (caught up: {caught_up}); is {} running an older version, or unreachable?",
                    lease.holder,
                    lease.expires_at.0,
                    lease.holder
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    pub async fn take_over(&self, region: &str, by: &str, actor: &str) -> anyhow::Result<Report> {
        let Self { store, timing, .. } = self;
        let job = format!("takeover:{region}");
        let lock_ttl = (timing.ttl * 6 + Duration::from_secs(60)).as_millis() as i64;
        let Some(lock) = store.acquire_lease(&job, actor, lock_ttl, Timestamp::now()).await.context("locking")? else {
            bail!("another takeover of {region}'s rooms is running (lease {job})");
        };
        let result = self.take_over_locked(region, by).await;
        let _ = store.release_lease(&job, actor, lock.token, Timestamp::now()).await;
        result
    }

    async fn take_over_locked(&self, region: &str, by: &str) -> anyhow::Result<Report> {
        let Self { store, redis, keys, timing, dedupe_ttl } = self;
        let name = lease_name(region);
        let giving_back = region == by;
        if giving_back {
            let current = store.lease(&name).await.context("reading the lease")?;
            if let Some(l) = current.filter(|l| l.holder != by) {
                if l.expires_at.0 > Timestamp::now().0 {
                    // Live: ask for it back, and wait until everything its holder sequenced is here.
                    self.wait_for_hand_back(region, timing.ttl * 3 + Duration::from_secs(30)).await?;
                }
                // What this region holds past the fences of the epoch it lost goes first.
                self.step_down(region, l.token).await?;
            }
        }
        let now = Timestamp::now();
        let current = store.lease(&name).await.context("reading the lease")?;
        let mut report = Report {
            region: region.to_string(),
            by: by.to_string(),
            token: 0,
            previous_token: 0,
            already_done: false,
            rooms: 0,
            written_back: 0,
            dropped_beyond_gap: 0,
            landed_past_held: 0,
            fences: Vec::new(),
        };
        if let Some(l) = current.as_ref().filter(|l| l.holder == by) {
            let mut conn = redis.conn().await;
            let marker: Option<i64> = conn.get(keys.home_marker(&name)).await?;
            if marker == Some(l.token) {
                report.token = l.token;
                report.already_done = true;
                return Ok(report);
            }
        }
        let previous_token = match &current {
            Some(l) if l.holder == by => l.token - 1,
            Some(l) => {
                let from = l.expires_at.0 + timing.margin.as_millis() as i64;
                if now.0 < from {
                    bail!(
                        "region {region}'s lease (held by {}, token {}) is live: it expires at {} ms and may be taken over \
                     from {from} ms (expiry + CHATMESH_LEASE_DRIFT_MS), in {} ms",
                        l.holder,
                        l.token,
                        l.expires_at.0,
                        from - now.0
                    );
                }
                l.token
            }
            None => 0,
        };
        let ttl = timing.ttl.as_millis() as i64;
        let lease = store
            .acquire_lease(&name, by, ttl, Timestamp::now())
            .await
            .context("acquiring the lease")?
            .with_context(|| format!("another region acquired {name} first"))?;
        tracing::info!(lease = %name, token = lease.token, "lease acquired; fencing the rooms");

        report.token = lease.token;
        report.previous_token = previous_token;
        let history = RedisHistory { store: store.clone(), redis: redis.clone(), keys: keys.clone() };
        let raise = redis::Script::new(RAISE);
        // First the fence points: each room's highest seq held here or in the store.
        let mut rooms = Vec::new();
        for id in rooms_homed_in(store, region).await? {
            let stored = store.head_seq(&RoomId::from(id.as_str())).await?.unwrap_or(0);
            let mut conn = redis.conn().await;
            // What this region held itself (replicated): the store may hold more, written back by
            // the old home.
            let own: i64 = conn.get::<_, Option<i64>>(keys.seq(&id)).await?.unwrap_or(0);
            let head = raise_room(&raise, &mut conn, keys, &id, stored, lease.token).await?;
            rooms.push((id, stored, head, own));
        }
        let fences: Vec<RoomFence> = rooms
            .iter()
            .map(|(id, _, head, _)| RoomFence { room_id: id.clone(), token: lease.token, from_seq: head + 1 })
            .collect();
        store.fence_rooms(&fences).await.context("fencing the rooms")?;
        // Then, with no old-epoch write able to land past the fences: continue after anything that
        // landed before them, and write back what only this region holds.
        for ((id, stored, head, own), fence) in rooms.into_iter().zip(&fences) {
            let room = RoomId::from(id.as_str());
            let landed = store.head_seq(&room).await?.unwrap_or(0);
            let mut conn = redis.conn().await;
            raise_room(&raise, &mut conn, keys, &id, landed, lease.token).await?;
            // What the old home wrote back past what this region held (before the fence): never
            // replicated here, but kept; a retry of one of them is that message (its dedupe key).
            let mut after = own;
            while after < landed {
                let page = store.messages_after(&room, after, PAGE).await?;
                let Some(last) = page.last().map(|m| m.seq) else { break };
                let mut pipe = redis::pipe();
                for m in page.iter().filter(|m| m.seq <= landed) {
                    let json = serde_json::to_string(m)?;
                    let key = keys.dedupe(&id, &m.sender_id, &m.client_msg_id);
                    pipe.cmd("SET").arg(key).arg(json).arg("EX").arg(dedupe_ttl.as_secs().max(1)).ignore();
                    report.landed_past_held += 1;
                }
                pipe.query_async::<()>(&mut conn).await?;
                after = last;
            }
            let dropped: usize = conn.hlen(keys.replica_pending(&id)).await?;
            let _: () = conn.del(keys.replica_pending(&id)).await?;
            drop(conn);
            let mut tail = Vec::new();
            let mut from = stored;
            while from < head {
                let got = history.recent(&room, Cursor::After(from), PAGE).await?;
                let Some(next) = got.last().map(|m| m.seq) else { break };
                tail.extend(got.into_iter().filter(|m| m.seq <= head));
                from = next;
            }
            let tail: Vec<FencedMessage> =
                tail.into_iter().map(|message| FencedMessage { message, token: previous_token }).collect();
            let refused = store.upsert_messages_fenced(&tail).await?;
            if !refused.is_empty() {
                bail!("the store refused {} of room {id}'s messages: a newer takeover fenced it", refused.len());
            }
            report.rooms += 1;
            report.written_back += tail.len();
            report.dropped_beyond_gap += dropped;
            report.fences.push(Fence { room_id: id, from_seq: fence.from_seq });
        }
        set_marker(redis, keys, &name, lease.token).await.map_err(|e| anyhow::anyhow!("{e}"))?;
        if giving_back && let Ok(Some(ask)) = store.lease(&handback_name(region)).await {
            let _ = store.release_lease(&ask.name, region, ask.token, Timestamp::now()).await;
        }
        tracing::info!(lease = %name, token = lease.token, rooms = report.rooms, "takeover done");
        Ok(report)
    }

    /// This region decided the rooms homed in `home` under an epoch that a takeover (token `token`)
    /// ended: per room, drop what it holds at or past the room's newest fence and move its counter
    /// back below it, so the new home's messages are taken from there (by the replicator, filling the
    /// gap from the new home).
    pub async fn step_down(&self, home: &str, token: i64) -> anyhow::Result<SteppedDown> {
        let Self { store, redis, keys, .. } = self;
        let mut done = SteppedDown::default();
        for id in rooms_homed_in(store, home).await? {
            let room = RoomId::from(id.as_str());
            let fences = store.room_fences(&room).await.context("reading the room's fences")?;
            let Some(fence) = fences.iter().filter(|f| f.token <= token).max_by_key(|f| f.token) else { continue };
            let mut conn = redis.conn().await;
            let stale: redis::streams::StreamRangeReply = conn
                .xrange(keys.history(&id), format!("{}-0", fence.from_seq), "+")
                .await
                .context("reading the room's recent history")?;
            let stale = stale.ids;
            let mut pipe = redis::pipe();
            pipe.atomic();
            for entry in &stale {
                pipe.cmd("XDEL").arg(keys.history(&id)).arg(&entry.id).ignore();
                let msg = entry.get::<String>("m").and_then(|v| serde_json::from_str::<Message>(&v).ok());
                if let Some(m) = msg {
                    pipe.cmd("DEL").arg(keys.dedupe(&id, &m.sender_id, &m.client_msg_id)).ignore();
                }
            }
            let below: i64 = fence.from_seq - 1;
            if !stale.is_empty() {
                // A stream refuses ids at or below the last one it ever took: move that back too, so
                // the new home's messages from the fence on can be applied.
                pipe.cmd("XSETID")
                    .arg(keys.history(&id))
                    .arg(if below > 0 { format!("{below}-0") } else { "0-1".to_string() })
                    .ignore();
            }
            pipe.cmd("DEL").arg(keys.replica_pending(&id)).ignore();
            let counter: Option<i64> = conn.get(keys.seq(&id)).await?;
            if counter.is_some_and(|c| c > below) {
                pipe.cmd("SET").arg(keys.seq(&id)).arg(below).ignore();
            }
            pipe.query_async::<()>(&mut conn).await.context("dropping the room's stale messages")?;
            done.rooms += 1;
            done.dropped += stale.len();
        }
        Ok(done)
    }
}

/// Runs [`RAISE`] for a room: its counter to at least `head`, its epoch floor to `token`.
async fn raise_room(
    raise: &redis::Script,
    conn: &mut redis::aio::ConnectionManager,
    keys: &Keys,
    room: &str,
    head: i64,
    token: i64,
) -> redis::RedisResult<i64> {
    raise.key(keys.seq(room)).key(keys.room_epoch(room)).arg(head).arg(token).invoke_async(conn).await
}

/// What [`step_down`] did.
#[derive(Debug, Default)]
pub struct SteppedDown {
    pub rooms: usize,
    /// Messages this region held at or past a room's fence, dropped (refused everywhere else).
    pub dropped: usize,
}
