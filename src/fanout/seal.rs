//! Seals what one instance tells the others over Redis pub/sub, so that whoever else can reach
//! Redis cannot speak for an instance: a payload is `hex(HMAC) ++ body`, the MAC over the channel
//! name and the body, under a key derived from `CHATMESH_CLUSTER_SECRET`. Receivers drop and count
//! (`chatmesh_forged_events_total`) anything unsigned, wrongly signed, or replayed.
//!
//! HMAC-SHA1, not SHA-256: chat messages are published by the send script, inside the atomic step
//! that gives them their seq, and Redis's Lua has SHA-1 only (`redis.sha1hex`). HMAC-SHA1 remains
//! a sound MAC (its security does not rest on SHA-1's collision resistance). The key reaches Redis
//! once, inside the script's source (see [`Seal::lua_prelude`]): never in a command's arguments,
//! so it is not in the slow log nor in every send on the wire.
//!
//! Replays: a room's messages carry their seq, and each receiver delivers a seq once (see
//! `fanout::redis`). Other events carry their origin (one id per process run), a counter and the
//! time; [`ReplayGuard`] takes each (origin, counter) once, within [`REPLAY_WINDOW_MS`].

use std::collections::HashMap;

use hmac::{Hmac, KeyInit, Mac};
use sha1::Sha1;

use crate::config::Secret;

/// Hex characters of a seal (HMAC-SHA1).
pub const SEAL_LEN: usize = 40;
/// How old a sealed event (or a chat message reaching a room with no delivery history here) may
/// be: beyond it, it is taken for a replay. Covers clock skew between instances.
pub const REPLAY_WINDOW_MS: i64 = 120_000;
/// Label of what sets the derived key apart from other uses of the cluster secret.
const KEY_LABEL: &[u8] = b"chatmesh pub/sub seal v1";
const BLOCK: usize = 64;

type HmacSha1 = Hmac<Sha1>;

/// Why a payload was dropped (the `reason` label of `chatmesh_forged_events_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forgery {
    Unsigned,
    BadSeal,
    Replayed,
}

impl Forgery {
    pub fn label(self) -> &'static str {
        match self {
            Forgery::Unsigned => "unsigned",
            Forgery::BadSeal => "bad_seal",
            Forgery::Replayed => "replayed",
        }
    }

    /// Counts the drop; the payload's content is not logged (it came from someone we do not trust).
    pub fn count(self, channel: &str) {
        metrics::counter!(crate::metrics::FORGED_EVENTS, "reason" => self.label()).increment(1);
        tracing::warn!(channel, reason = self.label(), "pub/sub payload dropped");
    }
}

/// The pub/sub key of a cluster.
#[derive(Clone)]
pub struct Seal {
    key: [u8; 32],
}

impl Seal {
    /// The key derived from the cluster secret (HMAC-SHA256 of a fixed label): the secret itself
    /// never signs anything, so what it signs elsewhere cannot pass for a pub/sub payload.
    pub fn from_secret(secret: &Secret) -> Self {
        Self { key: secret.derive(KEY_LABEL) }
    }

    fn mac(&self, channel: &str, body: &[u8]) -> HmacSha1 {
        let mut mac = <HmacSha1 as KeyInit>::new_from_slice(&self.key).expect("HMAC takes a key of any length");
        mac.update(channel.as_bytes());
        mac.update(b"\n");
        mac.update(body);
        mac
    }

    /// `body` sealed for `channel`.
    pub fn seal(&self, channel: &str, body: &str) -> String {
        let tag = self.mac(channel, body.as_bytes()).finalize().into_bytes();
        let mut out = String::with_capacity(SEAL_LEN + body.len());
        out.push_str(&hex::encode(tag));
        out.push_str(body);
        out
    }

    /// The body of a payload sealed for `channel` with this key (checked in constant time).
    pub fn open<'a>(&self, channel: &str, payload: &'a str) -> Result<&'a str, Forgery> {
        let (Some(tag), Some(body)) = (payload.get(..SEAL_LEN), payload.get(SEAL_LEN..)) else {
            return Err(Forgery::Unsigned);
        };
        let Ok(tag) = hex::decode(tag) else { return Err(Forgery::Unsigned) };
        self.mac(channel, body.as_bytes()).verify_slice(&tag).map_err(|_| Forgery::BadSeal)?;
        Ok(body)
    }

    /// Lua that defines `seal(channel, body)` for a script: the same HMAC-SHA1, built on
    /// `redis.sha1hex` with the padded keys written into the source as decimal escapes.
    pub fn lua_prelude(&self) -> String {
        let padded = |pad: u8| -> String {
            let mut block = [pad; BLOCK];
            for (b, k) in block.iter_mut().zip(self.key) {
                *b ^= k;
            }
            block.iter().map(|b| format!("\\{b:03}")).collect()
        };
        format!(
            "local SEAL_IPAD = \"{}\"\nlocal SEAL_OPAD = \"{}\"\n\
             local function seal(channel, body)\n  \
               local inner = redis.sha1hex(SEAL_IPAD .. channel .. '\\n' .. body)\n  \
               local raw = (string.gsub(inner, '..', function(h) return string.char(tonumber(h, 16)) end))\n  \
               return redis.sha1hex(SEAL_OPAD .. raw) .. body\n\
             end\n",
            padded(0x36),
            padded(0x5c)
        )
    }
}

/// Each (origin, counter) once. Per origin, a window of the last [`WINDOW`] counters, as IPsec's
/// anti-replay window: events of one origin may arrive slightly out of counter order (they are
/// published from concurrent tasks), which a plain "greater than the last" would drop.
#[derive(Default)]
pub struct ReplayGuard {
    origins: HashMap<String, Window>,
}

const WINDOW: u64 = 1024;

struct Window {
    highest: u64,
    /// Bit i: counter `highest - i` was taken.
    seen: [u64; (WINDOW / 64) as usize],
    last_ms: i64,
}

impl ReplayGuard {
    /// Whether an event stamped (origin, n, at_ms) is fresh; takes it if so. `now_ms` is this
    /// instance's clock.
    pub fn take(&mut self, origin: &str, n: u64, at_ms: i64, now_ms: i64) -> bool {
        if (now_ms - at_ms).abs() > REPLAY_WINDOW_MS {
            return false;
        }
        // Origins unheard of for longer than the window could only send stale events: forget them
        // (the sweep runs when a new origin appears, so the map grows only with real restarts).
        if !self.origins.contains_key(origin) {
            self.origins.retain(|_, w| now_ms - w.last_ms <= 2 * REPLAY_WINDOW_MS);
        }
        let w = self.origins.entry(origin.to_string()).or_insert(Window { highest: 0, seen: [0; 16], last_ms: now_ms });
        w.last_ms = now_ms;
        if n > w.highest {
            w.shift(n - w.highest);
            w.highest = n;
            w.mark(0);
            return true;
        }
        let back = w.highest - n;
        if back >= WINDOW || w.is_marked(back) {
            return false;
        }
        w.mark(back);
        true
    }
}

impl Window {
    fn mark(&mut self, back: u64) {
        self.seen[(back / 64) as usize] |= 1 << (back % 64);
    }
    fn is_marked(&self, back: u64) -> bool {
        self.seen[(back / 64) as usize] & (1 << (back % 64)) != 0
    }
    /// Moves the window up by `by` counters.
    fn shift(&mut self, by: u64) {
        if by >= WINDOW {
            self.seen = [0; 16];
            return;
        }
        let (words, bits) = ((by / 64) as usize, (by % 64) as u32);
        let old = self.seen;
        for i in 0..self.seen.len() {
            let hi = i.checked_sub(words).map_or(0, |j| old[j] << bits);
            let lo = if bits == 0 { 0 } else { i.checked_sub(words + 1).map_or(0, |j| old[j] >> (64 - bits)) };
            self.seen[i] = hi | lo;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seal() -> Seal {
        Seal::from_secret(&Secret::new("s".repeat(32)))
    }

    #[test]
    fn a_sealed_payload_opens_only_on_its_channel_and_unchanged() {
        let s = seal();
        let p = s.seal("cm:room:a", r#"{"seq":1}"#);
        assert_eq!(s.open("cm:room:a", &p), Ok(r#"{"seq":1}"#));
        assert_eq!(s.open("cm:room:b", &p), Err(Forgery::BadSeal), "moved to another channel");
        let tampered = p.replace("\"seq\":1", "\"seq\":2");
        assert_eq!(s.open("cm:room:a", &tampered), Err(Forgery::BadSeal));
        assert_eq!(s.open("cm:room:a", r#"{"seq":1}"#), Err(Forgery::Unsigned));
        assert_eq!(s.open("cm:room:a", ""), Err(Forgery::Unsigned));
        let other = Seal::from_secret(&Secret::new("t".repeat(32)));
        assert_eq!(other.open("cm:room:a", &p), Err(Forgery::BadSeal), "another cluster's key");
    }

    #[test]
    fn a_multibyte_boundary_is_not_a_panic() {
        let s = seal();
        let p = "é".repeat(30);
        assert_eq!(s.open("c", &p), Err(Forgery::Unsigned));
    }

    #[test]
    fn the_lua_prelude_writes_every_key_byte() {
        let lua = seal().lua_prelude();
        assert_eq!(lua.matches("\\").count(), 2 * BLOCK + 1, "two 64-byte pads and one newline escape");
        assert!(lua.contains("local function seal(channel, body)"));
    }

    #[test]
    fn each_counter_once_even_out_of_order() {
        let mut g = ReplayGuard::default();
        let now = 1_000_000;
        assert!(g.take("a", 1, now, now));
        assert!(g.take("a", 3, now, now));
        assert!(g.take("a", 2, now, now), "late but unseen");
        assert!(!g.take("a", 2, now, now), "replayed");
        assert!(!g.take("a", 3, now, now), "replayed");
        assert!(g.take("b", 2, now, now), "another origin has its own counters");
        assert!(g.take("a", 3 + 100, now, now));
        assert!(g.take("a", 50, now, now), "within the window");
        assert!(!g.take("a", 50, now, now));
        assert!(!g.take("a", 1, now, now), "still remembered after a shift");
        assert!(g.take("a", 5000, now, now));
        assert!(!g.take("a", 5000 - WINDOW, now, now), "older than the window");
        assert!(g.take("a", 5000 - WINDOW + 1, now, now));
    }

    #[test]
    fn stale_or_future_events_are_refused() {
        let mut g = ReplayGuard::default();
        let now = 10_000_000;
        assert!(!g.take("a", 1, now - REPLAY_WINDOW_MS - 1, now));
        assert!(!g.take("a", 2, now + REPLAY_WINDOW_MS + 1, now));
        assert!(g.take("a", 3, now - REPLAY_WINDOW_MS + 1, now));
    }

    #[test]
    fn shifting_keeps_bits_across_words() {
        let mut g = ReplayGuard::default();
        let now = 1;
        for n in 1..=200 {
            assert!(g.take("a", n, now, now));
        }
        for n in 1..=200 {
            assert!(!g.take("a", n, now, now), "counter {n} replayed");
        }
        assert!(g.take("a", 270, now, now));
        for n in 201..270 {
            assert!(g.take("a", n, now, now), "counter {n} skipped before, fresh now");
        }
    }
}
