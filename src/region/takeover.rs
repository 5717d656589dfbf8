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

use std::sync::Arc;

use anyhow::{Context, bail};
use redis::AsyncCommands;
use serde::Serialize;

use super::homes::{LeaseTiming, lease_name, set_marker};
use crate::domain::{RoomId, Timestamp};
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

/// Moves the room's counter to at least the store's head; answers the counter.
const RAISE: &str = "local c = tonumber(redis.call('GET', KEYS[1]) or '0') \
local h = tonumber(ARGV[1]) \
if h > c then c = h redis.call('SET', KEYS[1], c) end \
return c";

pub async fn take_over(
    store: Arc<dyn Store>,
    redis: Redis,
    keys: Keys,
    region: &str,
    by: &str,
    timing: LeaseTiming,
) -> anyhow::Result<Report> {
    if region == by {
        bail!("a region cannot take over its own rooms (it renews its lease by itself)");
    }
    let name = lease_name(region);
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
    let mut snapshot = store.export().await.context("listing the rooms")?;
    let mut after: Option<String> = None;
    loop {
        let page = snapshot.rooms_page(after.as_deref(), PAGE).await.context("listing the rooms")?;
        let Some(last) = page.last() else { break };
        after = Some(last.id.clone());
        for room in page.into_iter().filter(|r| r.home_region == region) {
            let stored = store.head_seq(&RoomId::from(room.id.as_str())).await?.unwrap_or(0);
            let mut conn = redis.conn().await;
            let head: i64 = raise.key(keys.seq(&room.id)).arg(stored).invoke_async(&mut conn).await?;
            rooms.push((room.id, stored, head));
        }
    }
    drop(snapshot);
    let fences: Vec<RoomFence> = rooms
        .iter()
        .map(|(id, _, head)| RoomFence { room_id: id.clone(), token: lease.token, from_seq: head + 1 })
        .collect();
    store.fence_rooms(&fences).await.context("fencing the rooms")?;
    // Then, with no old-epoch write able to land past the fences: continue after anything that
    // landed before them, and write back what only this region holds.
    for ((id, stored, head), fence) in rooms.into_iter().zip(&fences) {
        let room = RoomId::from(id.as_str());
        let landed = store.head_seq(&room).await?.unwrap_or(0);
        let mut conn = redis.conn().await;
        let _: i64 = raise.key(keys.seq(&id)).arg(landed).invoke_async(&mut conn).await?;
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
    set_marker(&redis, &keys, &name, lease.token).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    tracing::info!(lease = %name, token = lease.token, rooms = report.rooms, "takeover done");
    Ok(report)
}
