//! Key and channel names. Every key one script touches carries its room's shard hash tag
//! (`{sN}`), so the same scripts run unchanged on one Redis or on Redis Cluster.

/// Shards rooms are spread over (fixed at cluster creation).
pub const DEFAULT_SHARDS: u32 = 64;

/// FNV-1a: stable across processes and versions (std's hasher is randomly seeded).
pub fn shard_of(room_id: &str, shards: u32) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in room_id.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h % shards.max(1)
}

#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
    pub shards: u32,
}

impl Keys {
    pub fn new(prefix: &str, shards: u32) -> Self {
        Self { prefix: prefix.to_string(), shards }
    }

    fn tag(&self, room_id: &str) -> String {
        format!("{}:{{s{}}}", self.prefix, shard_of(room_id, self.shards))
    }

    pub fn seq(&self, room_id: &str) -> String {
        format!("{}:room:{room_id}:seq", self.tag(room_id))
    }
    /// Matches every room's history stream (SCAN).
    pub fn history_pattern(&self) -> String {
        format!("{}:*:room:*:hist", self.prefix)
    }
    pub fn history(&self, room_id: &str) -> String {
        format!("{}:room:{room_id}:hist", self.tag(room_id))
    }
    pub fn dedupe(&self, room_id: &str, sender_id: &str, client_msg_id: &str) -> String {
        format!("{}{sender_id}:{client_msg_id}", self.dedupe_prefix(room_id))
    }
    /// What every dedupe key of the room starts with (the apply script appends sender and id).
    pub fn dedupe_prefix(&self, room_id: &str) -> String {
        format!("{}:room:{room_id}:dd:", self.tag(room_id))
    }
    /// How often the user's membership of the room was revoked (see `revocation`).
    pub fn revocations(&self, room_id: &str, user_id: &str) -> String {
        format!("{}:room:{room_id}:left:{user_id}", self.tag(room_id))
    }
    /// The room's fan-out channel.
    /// A logged-out token (by its `jti`), kept until it would have expired.
    pub fn revoked_token(&self, token_id: &str) -> String {
        format!("{}:tok:revoked:{token_id}", self.prefix)
    }
    /// The user's tokens issued up to this moment (Unix ms) are revoked (a password change).
    pub fn tokens_cutoff(&self, user_id: &str) -> String {
        format!("{}:tok:before:{user_id}", self.prefix)
    }
    /// A throttle bucket (`budget` names which budget, `key` whose).
    pub fn throttle(&self, budget: &str, key: &str) -> String {
        format!("{}:throttle:{budget}:{key}", self.prefix)
    }

    /// Messages replicated from the room's home region that arrived before the one before them
    /// (seq -> message JSON), applied once the gap is filled.
    pub fn replica_pending(&self, room_id: &str) -> String {
        format!("{}:room:{room_id}:pending", self.tag(room_id))
    }
    /// The room's epoch floor, `token:from_seq`: the newest takeover of its home this region
    /// made; replicated messages of an older epoch at or past `from_seq` are refused
    /// (region::takeover).
    pub fn room_epoch(&self, room_id: &str) -> String {
        format!("{}:room:{room_id}:epoch", self.tag(room_id))
    }
    /// The outbox of a shard: what this region decided, for the other regions to pull.
    pub fn outbox(&self, shard: u32) -> String {
        format!("{}:{{s{shard}}}:outbox", self.prefix)
    }
    pub fn outbox_of(&self, id: &str) -> String {
        self.outbox(shard_of(id, self.shards))
    }
    /// How far this region applied a peer region's outboxes (hash: shard -> stream id).
    pub fn replication_cursor(&self, peer: &str) -> String {
        format!("{}:repl:{peer}:cursor", self.prefix)
    }
    /// Up to when (Unix ms) this region holds everything the peer region appended.
    /// The fencing token of the home lease `name` this region's instances decide under: set
    /// once the epoch is ready (region::homes).
    pub fn home_marker(&self, name: &str) -> String {
        format!("{}:lease-ready:{name}", self.prefix)
    }
    pub fn replication_caught_up(&self, peer: &str) -> String {
        format!("{}:repl:{peer}:caught_up", self.prefix)
    }

    pub fn channel(&self, room_id: &str) -> String {
        format!("{}:room:{room_id}", self.tag(room_id))
    }
    /// The write-back stream of the room's shard.
    pub fn sync_stream_of(&self, room_id: &str) -> String {
        self.sync_stream(shard_of(room_id, self.shards))
    }
    pub fn sync_stream(&self, shard: u32) -> String {
        format!("{}:{{s{shard}}}:sync", self.prefix)
    }
    pub fn dead_letter(&self, shard: u32) -> String {
        format!("{}:{{s{shard}}}:sync:dead", self.prefix)
    }
    pub fn all_sync_streams(&self) -> Vec<String> {
        (0..self.shards).map(|s| self.sync_stream(s)).collect()
    }
    /// Non-message events (typing, presence, room/user updates, cache invalidations).
    pub fn events_channel(&self) -> String {
        format!("{}:events", self.prefix)
    }
    pub fn instance(&self, id: &str) -> String {
        format!("{}:instance:{id}", self.prefix)
    }
    pub fn instances_pattern(&self) -> String {
        format!("{}:instance:*", self.prefix)
    }
    /// Users with a socket on `instance_id`; every presence set shares one hash tag so one
    /// script can read them all.
    pub fn presence(&self, instance_id: &str) -> String {
        format!("{}:{{presence}}:{instance_id}", self.prefix)
    }
    /// Users a peer region reported online (same hash tag as the instances' presence sets).
    pub fn region_presence(&self, region: &str) -> String {
        format!("{}:{{presence}}:@region:{region}", self.prefix)
    }
    pub fn canary_channel(&self, instance_id: &str) -> String {
        format!("{}:canary:{instance_id}", self.prefix)
    }
    /// Is `channel` a room fan-out channel? Returns the room id.
    pub fn room_of_channel<'a>(&self, channel: &'a str) -> Option<&'a str> {
        let rest = channel.strip_prefix(&self.prefix)?.strip_prefix(":{s")?;
        let (_, rest) = rest.split_once("}:room:")?;
        (!rest.contains(':')).then_some(rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_a_room_share_one_hash_tag() {
        let k = Keys::new("cm", 64);
        let room = "01JROOM";
        let tag = format!("{{s{}}}", shard_of(room, 64));
        for key in [
            k.seq(room),
            k.history(room),
            k.dedupe(room, "u", "c"),
            k.channel(room),
            k.sync_stream_of(room),
            k.outbox_of(room),
            k.replica_pending(room),
        ] {
            assert!(key.contains(&tag), "{key}");
        }
        assert_eq!(k.room_of_channel(&k.channel(room)), Some(room));
        assert_eq!(k.room_of_channel(&k.events_channel()), None);
        assert_eq!(k.room_of_channel(&k.seq(room)), None);
    }

    #[test]
    fn shards_are_stable_and_spread() {
        assert_eq!(shard_of("abc", 64), shard_of("abc", 64));
        let used: std::collections::HashSet<_> = (0..1000).map(|i| shard_of(&format!("room{i}"), 64)).collect();
        assert!(used.len() > 50);
    }
}
