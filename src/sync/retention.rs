//! The retention job: one instance of a region at a time (the singleton job lease
//! `retention:<region>` in the store) trims every room's recent-history stream in the region's
//! Redis to the last `recent_per_room` messages below what the store holds. The write-back trims
//! each room as it writes it; this catches what that leaves: rooms whose trim failed, and rooms
//! replicated from other regions (otherwise kept up to a fixed length). Nothing not yet in the
//! store is ever trimmed. Dedupe keys need no job: each expires at its TTL.

use std::sync::Arc;
use std::time::Duration;

use crate::domain::{RoomId, Timestamp};
use crate::redis_io::{Keys, Redis};
use crate::store::Store;

/// Keys read per SCAN step.
const SCAN_COUNT: usize = 500;

pub struct Retention {
    pub store: Arc<dyn Store>,
    pub redis: Redis,
    pub keys: Keys,
    /// This region (the lease's name) and this instance (its holder).
    pub region: String,
    pub instance: String,
    /// Messages kept per room below the store's head (as the write-back keeps).
    pub recent_per_room: i64,
    pub every: Duration,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Round {
    /// Another instance of the region holds the job.
    NotHolder,
    /// `rooms` streams were trimmed, by `entries` entries in all.
    Trimmed { rooms: usize, entries: u64 },
}

impl Retention {
    /// One pass over every room's recent history, if this instance holds the job.
    pub async fn run_once(&self) -> anyhow::Result<Round> {
        let name = format!("retention:{}", self.region);
        let ttl = (self.every * 3).as_millis() as i64;
        if self.store.acquire_lease(&name, &self.instance, ttl, Timestamp::now()).await?.is_none() {
            return Ok(Round::NotHolder);
        }
        let pattern = self.keys.history_pattern();
        let mut conn = self.redis.conn().await;
        let (mut cursor, mut rooms, mut entries) = (0u64, 0usize, 0u64);
        loop {
            let (next, found): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(SCAN_COUNT)
                .query_async(&mut conn)
                .await?;
            for key in found {
                let Some(room) = key.split(":room:").nth(1).and_then(|r| r.strip_suffix(":hist")) else { continue };
                let Some(head) = self.store.head_seq(&RoomId::from(room)).await? else { continue };
                let min = head - self.recent_per_room;
                if min <= 1 {
                    continue;
                }
                let trimmed: u64 =
                    redis::cmd("XTRIM").arg(&key).arg("MINID").arg(format!("{min}-0")).query_async(&mut conn).await?;
                if trimmed > 0 {
                    rooms += 1;
                    entries += trimmed;
                }
            }
            cursor = next;
            if cursor == 0 {
                return Ok(Round::Trimmed { rooms, entries });
            }
        }
    }

    /// Runs a pass every `every`, for the life of the process.
    pub fn spawn(self: Arc<Self>) {
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(self.every).await;
                match self.run_once().await {
                    Ok(Round::Trimmed { rooms, entries }) if rooms > 0 => {
                        tracing::info!(rooms, entries, "retention: recent history trimmed")
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "retention pass failed; next one in a while"),
                }
            }
        });
    }
}
