//! Cross-instance fan-out over Redis pub/sub.
//!
//! Messages: the send script PUBLISHes each accepted message on its room's channel, inside the
//! same atomic step that assigned its seq, so every subscriber receives a room's messages in seq
//! order. This instance subscribes to the rooms its sockets joined and emits locally. It also
//! remembers the last seq it delivered per room: a jump (a reconnect of the pub/sub link lost
//! some) is filled from history before the new message, so local sockets never see a gap.
//!
//! Other events (typing, presence, room/user updates, leaves, cache evictions) go over one events
//! channel. The same subscription carries the room channels, so an event is processed before any
//! message sequenced after it was published (this is what makes a leave stop delivery in time);
//! beyond that they carry no ordering promise. A canary published every few seconds on this
//! instance's own channel proves the subscription works; readiness turns red when it stops coming
//! back.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use crate::sio::Io;
use async_trait::async_trait;
use redis::aio::ConnectionManager;
use redis::{AsyncCommands, PushInfo, PushKind, Value};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::{Mutex, mpsc};

use super::local::{deliver_local, emit_typing, stop_delivery};
use super::seal::{Forgery, REPLAY_WINDOW_MS, ReplayGuard, Seal};
use super::{Delivery, Evictions, Notices, end_local_sessions, user_channel};
use crate::cache::{Caches, Invalidation};
use crate::domain::{Message, Room, Timestamp, User};
use crate::error::ApiError;
use crate::history::RedisHistory;
use crate::redis_io::{Keys, Redis};
use crate::sessions::Ended;

/// How often the canary goes out, and how old the last one back may be for the link to count as up.
pub const CANARY_EVERY: Duration = Duration::from_secs(2);
pub const CANARY_STALE_MS: i64 = 7_000;
/// The events-channel name of cache invalidations (not a Socket.IO event).
const INVALIDATE: &str = "cache:invalidate";
/// The events-channel name of a leave (not a Socket.IO event): `{room_id, user_id}`.
const MEMBER_LEFT: &str = "member:left";
/// The events-channel name of revoked sessions (not a Socket.IO event): `{user_id, ended}`.
const SESSIONS_ENDED: &str = "sessions:ended";

#[derive(Serialize, Deserialize)]
struct Event {
    rooms: Vec<String>,
    event: String,
    data: serde_json::Value,
    #[serde(default)]
    except: Option<String>,
}

/// An event as it goes over the events channel: with its origin (this process run), a counter and
/// the time, so that receivers take it once (see [`ReplayGuard`]); all of it under the seal.
#[derive(Serialize)]
struct StampedOut<'a> {
    origin: &'a str,
    n: u64,
    at: i64,
    #[serde(flatten)]
    event: &'a Event,
}

#[derive(Deserialize)]
struct Stamped {
    origin: String,
    n: u64,
    at: i64,
    #[serde(flatten)]
    event: Event,
}

pub struct RedisFanout {
    io: Io,
    redis: Redis,
    keys: Keys,
    instance_id: String,
    pubsub: Mutex<ConnectionManager>,
    /// Where pushes go; kept to rebuild the pub/sub connection after a failover.
    push_tx: mpsc::UnboundedSender<PushInfo>,
    presence_script: redis::Script,
    /// The other regions, whose users online count for presence here.
    peer_regions: Vec<String>,
    watched: Mutex<HashSet<String>>,
    /// Per room being subscribed to, its head before the subscription: the receiver starts the
    /// room's gap check from it (see `watch_room`).
    starts: Arc<std::sync::Mutex<HashMap<String, i64>>>,
    /// Where a room's head is read when this region's Redis has no counter for it.
    store: Arc<dyn crate::store::Store>,
    last_canary_ms: Arc<AtomicI64>,
    seal: Seal,
    /// This process run's name on the events channel: a restart starts its counter anew under a
    /// new origin, which receivers cannot mistake for replays of the last run's events.
    origin: String,
    sent: AtomicU64,
}

/// Who this instance is on the fan-out: its id, the cluster's seal, and the other regions.
pub struct Identity {
    pub instance_id: String,
    pub seal: Seal,
    pub peer_regions: Vec<String>,
}

impl RedisFanout {
    pub async fn start(
        io: Io,
        redis: Redis,
        keys: Keys,
        history: Arc<RedisHistory>,
        caches: Arc<Caches>,
        identity: Identity,
    ) -> anyhow::Result<Arc<Self>> {
        let Identity { instance_id, seal, peer_regions } = identity;
        let (tx, rx) = mpsc::unbounded_channel();
        let mut pubsub = redis.pubsub(tx.clone()).await?;
        pubsub.subscribe(keys.events_channel()).await?;
        pubsub.subscribe(keys.canary_channel(&instance_id)).await?;
        let fanout = Arc::new(Self {
            io: io.clone(),
            redis,
            keys: keys.clone(),
            instance_id: instance_id.clone(),
            pubsub: Mutex::new(pubsub),
            push_tx: tx,
            presence_script: redis::Script::new(crate::redis_io::PRESENCE_SCRIPT),
            peer_regions,
            watched: Mutex::default(),
            starts: Arc::default(),
            store: history.store.clone(),
            last_canary_ms: Arc::new(AtomicI64::new(Timestamp::now().0)),
            seal: seal.clone(),
            origin: format!("{instance_id}/{}", ulid::Ulid::generate()),
            sent: AtomicU64::new(0),
        });
        let receiver = Receiver {
            caches,
            io,
            keys,
            history,
            instance_id,
            last_seq: HashMap::new(),
            starts: fanout.starts.clone(),
            last_canary_ms: fanout.last_canary_ms.clone(),
            seal,
            replays: ReplayGuard::default(),
        };
        tokio::spawn(receiver.run(rx));
        tokio::spawn(canary_loop(fanout.clone()));
        tokio::spawn(unwatch_loop(fanout.clone()));
        Ok(fanout)
    }

    /// A fresh pub/sub connection to the current primary, with every subscription renewed. Messages
    /// published meanwhile are recovered by the gap fill on the next message of each room.
    async fn resubscribe(&self) {
        let conn = match self.redis.pubsub(self.push_tx.clone()).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "fan-out: cannot reconnect the subscription yet");
                return;
            }
        };
        let mut channels = vec![self.keys.events_channel(), self.keys.canary_channel(&self.instance_id)];
        channels.extend(self.watched.lock().await.iter().map(|r| self.keys.channel(r)));
        let mut conn = conn;
        for ch in &channels {
            if let Err(e) = conn.subscribe(ch).await {
                tracing::warn!(error = %e, "fan-out: resubscribe failed");
                return;
            }
        }
        *self.pubsub.lock().await = conn;
        tracing::info!(channels = channels.len(), "fan-out: subscription rebuilt");
    }

    /// The room's seq counter in this region's Redis, or (none there) the store's head; `None`
    /// when neither answers (the room's first message then starts the gap check, as before).
    async fn head_before_subscribing(&self, room_id: &str) -> Option<i64> {
        let mut conn = self.redis.conn().await;
        match conn.get::<_, Option<i64>>(self.keys.seq(room_id)).await {
            Ok(Some(head)) => Some(head),
            Ok(None) => self.store.head_seq(&crate::domain::RoomId::from(room_id)).await.ok().flatten(),
            Err(_) => None,
        }
    }

    /// Whether the pub/sub path delivered this instance's canary recently.
    pub fn fanout_ok(&self) -> bool {
        Timestamp::now().0 - self.last_canary_ms.load(Ordering::Relaxed) < CANARY_STALE_MS
    }

    async fn publish_event(&self, ev: Event) {
        if let Err(e) = self.try_publish_event(&ev).await {
            tracing::warn!(error = %e, event = %ev.event, "could not publish an event");
        }
    }

    async fn try_publish_event(&self, ev: &Event) -> redis::RedisResult<()> {
        let stamped = StampedOut {
            origin: &self.origin,
            n: self.sent.fetch_add(1, Ordering::Relaxed) + 1,
            at: Timestamp::now().0,
            event: ev,
        };
        let channel = self.keys.events_channel();
        let payload = self.seal.seal(&channel, &serde_json::to_string(&stamped).unwrap_or_default());
        self.redis.conn().await.publish::<_, _, ()>(channel, payload).await
    }

    /// Records this instance's change and says whether the cluster-wide state changed with it.
    /// Runs the presence script on `set` (this instance's, or a peer region's) against this
    /// region's other live instances and the other peer regions: 0 no change in this region, 2
    /// changed in this region only, 1 changed anywhere.
    async fn presence_changed(&self, set: String, except_region: Option<&str>, user_id: &str, online: bool) -> i64 {
        let mut conn = self.redis.conn().await;
        let others = crate::cluster::live_instance_ids(&mut conn, &self.keys).await.unwrap_or_default();
        let mut invocation = self.presence_script.key(&set);
        let mut own = 0;
        for id in others.iter().filter(|id| except_region.is_some() || **id != self.instance_id) {
            invocation.key(self.keys.presence(id));
            own += 1;
        }
        for region in self.peer_regions.iter().filter(|r| Some(r.as_str()) != except_region) {
            invocation.key(self.keys.region_presence(region));
        }
        invocation.arg(user_id).arg(if online { "1" } else { "0" }).arg(own);
        match invocation.invoke_async::<i64>(&mut conn).await {
            Ok(changed) => changed,
            Err(e) => {
                tracing::warn!(error = %e, "presence: script failed");
                0
            }
        }
    }

    async fn announce_presence(&self, user_id: &str, online: bool, room_ids: &[String]) {
        if room_ids.is_empty() {
            return;
        }
        let state = if online { "online" } else { "offline" };
        let data = serde_json::json!({"user_id": user_id, "state": state});
        self.publish_event(Event { rooms: room_ids.to_vec(), event: "presence".into(), data, except: None }).await;
    }
}

async fn canary_loop(f: Arc<RedisFanout>) {
    let mut tick = tokio::time::interval(CANARY_EVERY);
    loop {
        tick.tick().await;
        let mut conn = f.redis.conn().await;
        let channel = f.keys.canary_channel(&f.instance_id);
        let canary = f.seal.seal(&channel, &Timestamp::now().0.to_string());
        if let Err(e) = conn.publish::<_, _, ()>(channel, canary).await
            && crate::redis_io::is_failover_error(&e)
        {
            f.redis.reresolve().await;
        }
        if !f.fanout_ok() {
            // The subscription is dead (the primary moved, or the link broke beyond what the
            // manager repairs): readiness is already red; build a new one where Redis is now.
            f.resubscribe().await;
        }
    }
}

/// Drops subscriptions of rooms no local socket is in any more.
async fn unwatch_loop(f: Arc<RedisFanout>) {
    let mut tick = tokio::time::interval(Duration::from_secs(30));
    loop {
        tick.tick().await;
        let idle: Vec<String> = {
            let watched = f.watched.lock().await;
            watched.iter().filter(|room| f.io.room_is_empty(room)).cloned().collect()
        };
        for room in idle {
            let mut pubsub = f.pubsub.lock().await;
            if f.io.room_is_empty(&room) && pubsub.unsubscribe(f.keys.channel(&room)).await.is_ok() {
                f.watched.lock().await.remove(&room);
            }
        }
    }
}

struct Receiver {
    io: Io,
    caches: Arc<Caches>,
    keys: Keys,
    history: Arc<RedisHistory>,
    instance_id: String,
    last_seq: HashMap<String, i64>,
    starts: Arc<std::sync::Mutex<HashMap<String, i64>>>,
    last_canary_ms: Arc<AtomicI64>,
    seal: Seal,
    replays: ReplayGuard,
}

fn bulk(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

impl Receiver {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<PushInfo>) {
        while let Some(push) = rx.recv().await {
            match push.kind {
                PushKind::Message => {
                    let (Some(channel), Some(payload)) =
                        (push.data.first().and_then(bulk), push.data.get(1).and_then(bulk))
                    else {
                        continue;
                    };
                    self.on_message(&channel, payload).await;
                }
                PushKind::Subscribe => {
                    // Confirmed before any message of the room: from here a jump past the head
                    // read before subscribing is filled (several instances publish a room's
                    // messages once held elsewhere, not always in seq order).
                    if let Some(room) =
                        push.data.first().and_then(bulk).as_deref().and_then(|c| self.keys.room_of_channel(c))
                        && let Some(head) = self.starts.lock().unwrap_or_else(|e| e.into_inner()).remove(room)
                    {
                        self.last_seq.entry(room.to_string()).or_insert(head);
                    }
                }
                PushKind::Unsubscribe => {
                    // The confirmation comes in order with the channel's messages: nothing of the
                    // room arrives after it until a new subscription, whose first message must not
                    // look like a jump from what was delivered before the room went idle here.
                    if let Some(room) =
                        push.data.first().and_then(bulk).as_deref().and_then(|c| self.keys.room_of_channel(c))
                    {
                        self.last_seq.remove(room);
                    }
                }
                PushKind::Disconnection => {
                    tracing::warn!("fan-out subscription lost; the connection manager will resubscribe");
                }
                _ => {}
            }
        }
    }

    async fn on_message(&mut self, channel: &str, mut payload: String) {
        if let Err(forgery) = self.seal.open(channel, &payload) {
            forgery.count(channel);
            return;
        }
        // In place: a room's payload is delivered as it is, and may be long.
        payload.drain(..super::seal::SEAL_LEN);
        let now = Timestamp::now().0;
        if let Some(room) = self.keys.room_of_channel(channel) {
            let room = room.to_string();
            self.on_room_message(&room, payload).await;
        } else if channel == self.keys.events_channel() {
            let Ok(Stamped { origin, n, at, event }) = serde_json::from_str::<Stamped>(&payload) else { return };
            if !self.replays.take(&origin, n, at, now) {
                Forgery::Replayed.count(channel);
                return;
            }
            self.on_event(event).await;
        } else if channel == self.keys.canary_channel(&self.instance_id) {
            // The canary's own time, not its arrival: a canary replayed later proves nothing.
            if let Ok(at) = payload.parse::<i64>()
                && (now - at).abs() <= REPLAY_WINDOW_MS
            {
                self.last_canary_ms.fetch_max(at, Ordering::Relaxed);
            }
        }
    }

    async fn on_room_message(&mut self, room: &str, payload: String) {
        #[derive(Deserialize)]
        struct SeqOnly {
            seq: i64,
            created_at: Option<crate::domain::Timestamp>,
        }
        let Ok(SeqOnly { seq, created_at }) = serde_json::from_str::<SeqOnly>(&payload) else { return };
        let last = self.last_seq.get(room).copied();
        if last.is_none() && created_at.is_some_and(|at| Timestamp::now().0 - at.0 > REPLAY_WINDOW_MS) {
            // The first message since this instance subscribed to the room is published after
            // the subscription, so it is new: an old one is a copy of earlier traffic.
            Forgery::Replayed.count(&self.keys.channel(room));
            return;
        }
        if let Some(last) = last {
            if seq <= last {
                return; // already delivered (a gap fill got there first)
            }
            if seq > last + 1 {
                self.fill_gap(room, last + 1, seq - 1).await;
            }
        }
        if let Ok(raw) = RawValue::from_string(payload) {
            deliver_local(&self.io, room, seq, &raw);
        }
        if let Some(at) = created_at {
            // From the accepting instance's clock: across hosts this includes their clock skew.
            let ms = (crate::domain::Timestamp::now().0 - at.0).max(0);
            metrics::histogram!(crate::metrics::DELIVERY_LATENCY).record(ms as f64 / 1000.0);
        }
        self.last_seq.insert(room.to_string(), seq);
    }

    async fn fill_gap(&mut self, room: &str, from: i64, to: i64) {
        tracing::warn!(room, from, to, "fan-out gap: filling from history");
        match self.history.range(&crate::domain::RoomId::from(room), from, to).await {
            Ok(msgs) => {
                for m in msgs {
                    if let Ok(raw) = serde_json::value::to_raw_value(&m) {
                        deliver_local(&self.io, room, m.seq, &raw);
                    }
                }
            }
            Err(e) => {
                // Cannot repair: cut the room's sockets so their clients resync by themselves.
                tracing::warn!(error = %e, room, "gap fill failed; disconnecting the room's sockets");
                for s in self.io.sockets_in(room) {
                    s.close();
                }
            }
        }
    }

    async fn on_event(&self, ev: Event) {
        if ev.event == INVALIDATE {
            if let Ok(what) = serde_json::from_value::<Invalidation>(ev.data) {
                self.caches.evict_local(&what).await;
            }
            return;
        }
        if ev.event == MEMBER_LEFT {
            let field = |k: &str| ev.data[k].as_str().unwrap_or_default().to_string();
            stop_delivery(&self.io, &field("room_id"), &field("user_id"));
            return;
        }
        if ev.event == SESSIONS_ENDED {
            let user = ev.data["user_id"].as_str().unwrap_or_default();
            if let Ok(ended) = serde_json::from_value::<Ended>(ev.data["ended"].clone()) {
                end_local_sessions(&self.io, user, &ended);
            }
            return;
        }
        if ev.event == "typing" {
            let room = ev.rooms.first().cloned().unwrap_or_default();
            let user = ev.data["user_id"].as_str().unwrap_or_default();
            emit_typing(&self.io, &room, user, ev.except.as_deref().unwrap_or_default()).await;
            return;
        }
        if ev.rooms.is_empty() {
            return;
        }
        self.io.broadcast(&ev.rooms, &ev.event, &ev.data);
    }
}

#[async_trait]
impl Delivery for RedisFanout {
    async fn publish_message(&self, _msg: &Message) {
        // The send script publishes in the same atomic step as sequencing.
    }

    async fn watch_room(&self, room_id: &str) -> Result<(), ApiError> {
        // Under the subscription's lock: the idle sweep may be dropping this very room, and must
        // either finish before we look or see the caller's socket in the room.
        let mut pubsub = self.pubsub.lock().await;
        if self.watched.lock().await.contains(room_id) {
            return Ok(());
        }
        // The room's head before subscribing: what is published after the subscription and at or
        // below it was in history before the caller reads it (the caller reads after this).
        if let Some(head) = self.head_before_subscribing(room_id).await {
            self.starts.lock().unwrap_or_else(|e| e.into_inner()).insert(room_id.to_string(), head);
        }
        pubsub.subscribe(self.keys.channel(room_id)).await.map_err(|e| {
            tracing::warn!(error = %e, "subscribe failed");
            ApiError::Unavailable("Redis is unavailable; retry".into())
        })?;
        self.watched.lock().await.insert(room_id.to_string());
        Ok(())
    }

    async fn member_left(&self, room_id: &str, user_id: &str) -> Result<(), ApiError> {
        // One Redis connection carries an instance's events and room messages, in publish order:
        // every instance, this one included, processes this before any message sequenced after it.
        let data = serde_json::json!({"room_id": room_id, "user_id": user_id});
        let ev = Event { rooms: Vec::new(), event: MEMBER_LEFT.into(), data, except: None };
        self.try_publish_event(&ev).await.map_err(|e| {
            tracing::warn!(error = %e, "could not publish a leave");
            ApiError::Unavailable("Redis is unavailable; retry the leave".into())
        })
    }

    async fn end_sessions(&self, user_id: &str, ended: &Ended) {
        // This instance's own sockets at once; the others' when the event reaches them.
        end_local_sessions(&self.io, user_id, ended);
        let data = serde_json::json!({"user_id": user_id, "ended": ended});
        self.publish_event(Event { rooms: Vec::new(), event: SESSIONS_ENDED.into(), data, except: None }).await;
    }
}

#[async_trait]
impl Notices for RedisFanout {
    async fn room_updated(&self, room: &Room) {
        let data = serde_json::to_value(room).unwrap_or_default();
        self.publish_event(Event { rooms: vec![room.id.clone()], event: "room:updated".into(), data, except: None })
            .await;
    }

    async fn user_updated(&self, user: &User, room_ids: &[String]) {
        let mut rooms = room_ids.to_vec();
        rooms.push(user_channel(&user.id));
        let data = serde_json::to_value(user).unwrap_or_default();
        self.publish_event(Event { rooms, event: "user:updated".into(), data, except: None }).await;
    }

    async fn presence(&self, user_id: &str, online: bool, room_ids: &[String]) -> bool {
        // Sockets of one user on two instances: only the first to come and the last to go count;
        // across regions, only the first anywhere and the last anywhere are announced.
        let set = self.keys.presence(&self.instance_id);
        match self.presence_changed(set, None, user_id, online).await {
            1 => {
                self.announce_presence(user_id, online, room_ids).await;
                true
            }
            2 => true,
            _ => false,
        }
    }

    async fn presence_elsewhere(&self, region: &str, user_id: &str, online: bool, room_ids: &[String]) {
        let set = self.keys.region_presence(region);
        if self.presence_changed(set, Some(region), user_id, online).await == 1 {
            self.announce_presence(user_id, online, room_ids).await;
        }
    }

    async fn typing(&self, room_id: &str, user_id: &str, except_socket: &str) {
        let data = serde_json::json!({"room_id": room_id, "user_id": user_id});
        self.publish_event(Event {
            rooms: vec![room_id.to_string()],
            event: "typing".into(),
            data,
            except: Some(except_socket.to_string()),
        })
        .await;
    }
}

#[async_trait]
impl Evictions for RedisFanout {
    async fn invalidate(&self, what: &Invalidation) {
        let data = serde_json::to_value(what).unwrap_or_default();
        self.publish_event(Event { rooms: Vec::new(), event: INVALIDATE.into(), data, except: None }).await;
    }
}
