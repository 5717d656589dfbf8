//! The operations of the API, shared by REST and Socket.IO handlers. Handlers parse the wire
//! format; this layer checks permissions and limits and calls the mode's implementations.
//! Nothing here branches on the mode.

use std::sync::Arc;
use std::time::Duration;

use crate::auth::{Hashing, Session, Tokens};
use crate::cache::{Caches, Invalidation};
use crate::domain::*;
use crate::error::{ApiError, ApiResult};
use crate::fanout::{Delivery, Evictions, Notices};
pub use crate::history::Cursor;
use crate::history::History;
use crate::metrics as m;
use crate::ratelimit::RateLimiter;
use crate::region::hlc::Hlc;
use crate::region::{ForwardedSend, Outbox, Peer, Regions, Replicated};
use crate::revocation::Revocations;
use crate::sequencer::{Receipt, SendOutcome, Sequencer};
use crate::sessions::{Ended, RevokedSessions};
use crate::store::{Member, NewRoom, NewUser, RoomPatch, SendRequest, Store, UserPatch};
use crate::telemetry;
use crate::throttle::{Budget, Throttle};
use tracing::Instrument;

/// Page size of history reads when the client gives none, and the most it may ask for.
pub const DEFAULT_PAGE: u32 = 50;
pub const MAX_PAGE: u32 = 500;
/// Public rooms listed by `GET /rooms?scope=public`.
const PUBLIC_ROOMS_LIMIT: u32 = 500;

/// A membership change forwarded to the room's home: `by` is the owner for an invitation.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct MemberChange {
    pub room_id: String,
    pub user_id: String,
    #[serde(default)]
    pub by: Option<String>,
}

/// The answer to a send.
pub struct Sent {
    pub message: Message,
    /// False when the client_msg_id was already accepted (a retry): `message` is the original.
    pub created: bool,
    /// The send's W3C traceparent (logged; carried to the write-back).
    pub trace: String,
}

impl Sent {
    /// Records the send latency and writes the send's log line (never the body). Target
    /// `chatmesh::send`, so `RUST_LOG=info,chatmesh::send=warn` silences it under heavy load.
    pub fn record(&self, transport: &'static str, started: std::time::Instant) {
        let latency = started.elapsed();
        metrics::histogram!(m::SEND_LATENCY).record(latency.as_secs_f64());
        tracing::info!(
            target: "chatmesh::send",
            transport,
            room = %self.message.room_id,
            seq = self.message.seq,
            sender = %self.message.sender_id,
            created = self.created,
            latency_us = latency.as_micros() as u64,
            trace_id = telemetry::trace_id(&self.trace),
            "send"
        );
    }
}

pub struct ChatService {
    store: Arc<dyn Store>,
    sequencer: Arc<dyn Sequencer>,
    revocations: Arc<dyn Revocations>,
    delivery: Arc<dyn Delivery>,
    notices: Arc<dyn Notices>,
    evictions: Arc<dyn Evictions>,
    history: Arc<dyn History>,
    tokens: Tokens,
    hashing: Hashing,
    region: String,
    send_limiter: RateLimiter,
    read_limiter: RateLimiter,
    typing_limiter: RateLimiter,
    change_limiter: RateLimiter,
    throttle: Arc<dyn Throttle>,
    /// L1 caches; evicted here and on every instance through `evictions`.
    caches: Arc<Caches>,
    sessions: Arc<dyn RevokedSessions>,
    regions: Arc<Regions>,
    outbox: Arc<dyn Outbox>,
    /// Versions of profile and room changes (per-field last-writer-wins across regions).
    hlc: Hlc,
}

/// The mode's implementations the service runs on.
pub struct Backends {
    pub store: Arc<dyn Store>,
    pub sequencer: Arc<dyn Sequencer>,
    pub revocations: Arc<dyn Revocations>,
    pub delivery: Arc<dyn Delivery>,
    pub notices: Arc<dyn Notices>,
    pub evictions: Arc<dyn Evictions>,
    pub history: Arc<dyn History>,
    pub caches: Arc<Caches>,
    /// Budgets against password guessing, shared by the deployment.
    pub throttle: Arc<dyn Throttle>,
    /// Tokens revoked by a logout or a password change.
    pub sessions: Arc<dyn RevokedSessions>,
    /// This region and the others (rooms homed elsewhere are decided there).
    pub regions: Arc<Regions>,
    /// What this region decided, for the other regions.
    pub outbox: Arc<dyn Outbox>,
}

/// Rate limits from the configuration.
pub struct Limits {
    pub send_rate_per_sec: u32,
    /// History pages and joins per user.
    pub read_rate_per_sec: u32,
    pub typing_rate_per_sec: u32,
    /// Room creations, changes, invitations and leaves per user per minute (burst the same).
    pub room_change_rate_per_min: u32,
    /// Logins and registrations that may wait for a password-hashing slot.
    pub password_hash_queue: usize,
    /// How far ahead of this clock another region's change versions may be.
    pub hlc_max_ahead: Duration,
}

/// A per-user bucket of `rate` a second that allows bursts of ten times that.
fn per_second(rate: u32) -> RateLimiter {
    let rate = f64::from(rate);
    RateLimiter::new(rate, rate * 10.0)
}

pub fn clamp_limit(limit: Option<i64>) -> ApiResult<u32> {
    match limit {
        None => Ok(DEFAULT_PAGE),
        Some(l) if l < 1 => Err(ApiError::validation("limit must be at least 1")),
        Some(l) => Ok(l.min(i64::from(MAX_PAGE)) as u32),
    }
}

impl ChatService {
    pub fn new(backends: Backends, tokens: Tokens, region: String, limits: Limits) -> Self {
        let hlc = Hlc::new(&region, limits.hlc_max_ahead);
        let Backends {
            store,
            sequencer,
            revocations,
            delivery,
            notices,
            evictions,
            history,
            caches,
            throttle,
            sessions,
            regions,
            outbox,
        } = backends;
        let send = f64::from(limits.send_rate_per_sec);
        Self {
            store,
            sequencer,
            revocations,
            delivery,
            notices,
            evictions,
            history,
            tokens,
            hashing: Hashing::new(limits.password_hash_queue),
            region,
            send_limiter: RateLimiter::new(send, send * 10.0),
            read_limiter: per_second(limits.read_rate_per_sec),
            typing_limiter: per_second(limits.typing_rate_per_sec),
            change_limiter: {
                let per_min = f64::from(limits.room_change_rate_per_min);
                RateLimiter::new(per_min / 60.0, per_min)
            },
            throttle,
            caches,
            sessions,
            regions,
            outbox,
            hlc,
        }
    }

    fn limited(kind: &'static str, retry_after: Duration) -> ApiError {
        metrics::counter!(m::RATE_LIMITED, "kind" => kind).increment(1);
        ApiError::RateLimited { retry_after }
    }

    /// One registration or login attempt from `client_ip`, within the deployment's per-IP budget.
    pub async fn check_auth_rate(&self, client_ip: &str) -> ApiResult<()> {
        self.throttle.take(Budget::AuthPerIp, client_ip).await
    }

    // ---- users ----

    pub async fn register(
        &self,
        username: Username,
        password: Password,
        display_name: Option<DisplayName>,
    ) -> ApiResult<(User, String)> {
        let hash = self.hashing.hash_password(password.into_inner()).await?;
        let display_name = display_name.map(DisplayName::into_inner).unwrap_or_else(|| username.to_string());
        let user = self
            .store
            .create_user(NewUser {
                id: new_id(),
                username: username.into_inner(),
                display_name,
                password_hash: hash,
                created_at: Timestamp::now(),
            })
            .await?;
        let token = self.tokens.issue(&user.id)?;
        Ok((user, token))
    }

    pub async fn login(&self, username: &str, password: String) -> ApiResult<(User, String)> {
        // The account's budget of failures, counted whether or not the account exists (the answer
        // must not tell), under the name as it is looked up.
        let account: String = username.to_ascii_lowercase().chars().take(64).collect();
        self.throttle.peek(Budget::LoginFailuresPerAccount, &account).await?;
        // An impossible username is a wrong username: same answer, no hint.
        let found = match Username::parse(username) {
            Ok(u) => self.store.credentials(u.as_str()).await?,
            Err(_) => None,
        };
        let (user, hash) = match found {
            Some((u, h)) => (Some(u), Some(h)),
            None => (None, None),
        };
        if !self.hashing.verify_password(password, hash).await? {
            // This failure may be the last the budget had: the next attempt is refused.
            let _ = self.throttle.take(Budget::LoginFailuresPerAccount, &account).await;
            return Err(ApiError::InvalidCredentials);
        }
        let user = user.ok_or(ApiError::InvalidCredentials)?;
        let token = self.tokens.issue(&user.id)?;
        Ok((user, token))
    }

    pub async fn user(&self, id: &UserId) -> ApiResult<User> {
        let load = async { self.store.user(id).await?.ok_or_else(|| ApiError::NotFound("user not found".into())) };
        self.caches.user(id, load).await
    }

    /// Evicts `what` here and on every other instance.
    async fn changed(&self, what: Invalidation) {
        self.caches.evict(&what).await;
        self.evictions.invalidate(&what).await;
    }

    /// The session of a token: signature and expiry checked, and not revoked. A revoked token
    /// gets the same answer as an expired or forged one.
    pub async fn authenticate(&self, token: &str) -> ApiResult<Session> {
        let session = self.tokens.verify(token)?;
        if self.sessions.is_revoked(&session).await? {
            return Err(ApiError::Unauthorized("invalid or expired token".into()));
        }
        Ok(session)
    }

    /// The session a socket's CONNECT token names, if it may connect: a signed token for a user
    /// the store does not know is refused too, and so is a revoked one. While the store or the
    /// revocation list is unreachable the signature alone admits the socket (cluster mode keeps
    /// serving then); the second value says whether revocation was checked (if not, the caller
    /// checks again later).
    pub async fn authenticate_socket(&self, token: &str) -> Option<(Session, bool)> {
        let session = self.tokens.verify(token).ok()?;
        let user_id = UserId::from(session.user_id.as_str());
        // Independent lookups: one round trip's wait on every CONNECT, not two.
        let (user, revoked) = tokio::join!(self.store.user(&user_id), self.sessions.is_revoked(&session));
        if let Ok(None) = user {
            return None;
        }
        match revoked {
            Ok(true) => None,
            Ok(false) => Some((session, true)),
            Err(_) => Some((session, false)),
        }
    }

    /// Whether a session was revoked since it was checked (`Err` while that cannot be known).
    pub async fn session_revoked(&self, session: &Session) -> ApiResult<bool> {
        self.sessions.is_revoked(session).await
    }

    /// Revokes the session's token (a token without an id: every token of the user issued up to
    /// it) and cuts its sockets.
    pub async fn logout(&self, session: &Session) -> ApiResult<()> {
        let ended = if session.token_id.is_empty() {
            Ended::IssuedUpTo(session.issued_ms)
        } else {
            Ended::Token(session.token_id.clone())
        };
        self.end_sessions(&session.user_id, ended).await
    }

    async fn end_sessions(&self, user_id: &str, ended: Ended) -> ApiResult<()> {
        self.sessions.revoke(user_id, &ended, self.tokens.ttl()).await?;
        self.delivery.end_sessions(user_id, &ended).await;
        // The other regions check tokens against their own Redis: a logout must reach them.
        self.outbox.record(Replicated::SessionsEnded { user_id: user_id.to_string(), ended }).await
    }

    /// Checks the current password (within the account's login-failure budget), stores the new
    /// one, and revokes every token of the user issued until now.
    pub async fn change_password(&self, session: &Session, current: String, new: Password) -> ApiResult<()> {
        let user_id = UserId::from(session.user_id.as_str());
        let user = self.store.user(&user_id).await?.ok_or(ApiError::InvalidCredentials)?;
        let account: String = user.username.to_ascii_lowercase().chars().take(64).collect();
        self.throttle.peek(Budget::LoginFailuresPerAccount, &account).await?;
        let hash = self.store.credentials(&user.username).await?.map(|(_, h)| h);
        if !self.hashing.verify_password(current, hash).await? {
            let _ = self.throttle.take(Budget::LoginFailuresPerAccount, &account).await;
            return Err(ApiError::InvalidCredentials);
        }
        let hash = self.hashing.hash_password(new.into_inner()).await?;
        let patch = UserPatch { password_hash: Some(hash), ..UserPatch::default() };
        self.store.update_user(&user_id, patch, Timestamp::now()).await?;
        self.end_sessions(&session.user_id, Ended::IssuedUpTo(Timestamp::now().0)).await
    }

    /// `presence` for the user to the rooms they are a member of, on every instance.
    pub async fn announce_presence(&self, user_id: &UserId, online: bool) {
        match self.store.room_ids_of_user(user_id).await {
            Ok(rooms) => {
                if self.notices.presence(user_id, online, &rooms).await {
                    let region = self.regions.name().to_string();
                    self.tell_regions(Replicated::Presence { user_id: user_id.to_string(), online, region }).await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "presence: could not list rooms"),
        }
    }

    /// `typing` from a socket to the room's other sockets (the caller checked it joined the room).
    pub async fn typing(&self, room_id: &RoomId, user_id: &UserId, socket_id: &str) -> ApiResult<()> {
        self.typing_limiter.check(user_id).map_err(|wait| Self::limited("typing", wait))?;
        self.notices.typing(room_id, user_id, socket_id).await;
        self.tell_regions(Replicated::Typing { room_id: room_id.to_string(), user_id: user_id.to_string() }).await;
        Ok(())
    }

    /// One room creation, change, invitation or leave by the user, within
    /// `CHATMESH_ROOM_CHANGE_RATE_PER_MIN` (each writes the store and reaches every instance).
    fn check_change_rate(&self, user_id: &UserId) -> ApiResult<()> {
        self.change_limiter.check(user_id).map_err(|wait| Self::limited("room_change", wait))
    }

    /// One history page or join for the user, within `CHATMESH_READ_RATE_PER_SEC`.
    fn check_read_rate(&self, user_id: &UserId) -> ApiResult<()> {
        self.read_limiter.check(user_id).map_err(|wait| Self::limited("read", wait))
    }

    /// Makes sure every message accepted in the room from now on reaches this instance; call it
    /// after a socket joined the room's delivery group and before it reads history.
    pub async fn watch_room(&self, room_id: &RoomId) -> ApiResult<()> {
        self.delivery.watch_room(room_id).await
    }

    pub async fn update_me(&self, user_id: &UserId, mut patch: UserPatch) -> ApiResult<User> {
        patch.version = self.hlc.version();
        let version = patch.version.clone();
        let user = self.store.update_user(user_id, patch, Timestamp::now()).await?;
        self.changed(Invalidation::User { id: user_id.to_string() }).await;
        self.tell_regions(Replicated::UserChanged { user_id: user_id.to_string(), version }).await;
        let rooms = self.store.room_ids_of_user(user_id).await?;
        self.notices.user_updated(&user, &rooms).await;
        Ok(user)
    }

    // ---- rooms ----

    pub async fn create_room(
        &self,
        owner_id: &UserId,
        name: RoomName,
        topic: Option<Topic>,
        visibility: Visibility,
    ) -> ApiResult<Room> {
        self.check_change_rate(owner_id)?;
        Ok(self
            .store
            .create_room(NewRoom {
                id: new_id(),
                name: name.into_inner(),
                topic: topic.map(Topic::into_inner).unwrap_or_default(),
                visibility,
                owner_id: owner_id.to_string(),
                home_region: self.region.clone(),
                created_at: Timestamp::now(),
            })
            .await?)
    }

    pub async fn joined_rooms(&self, user_id: &UserId) -> ApiResult<Vec<Room>> {
        self.current(self.store.rooms_of_user(user_id).await?).await
    }

    pub async fn public_rooms(&self) -> ApiResult<Vec<Room>> {
        self.current(self.store.public_rooms(PUBLIC_ROOMS_LIMIT).await?).await
    }

    /// Rooms as answered to clients: `head_seq` covers every send acknowledged so far (the
    /// store's may lag the write-back in cluster mode).
    async fn current(&self, mut rooms: Vec<Room>) -> ApiResult<Vec<Room>> {
        self.history.current_heads(&mut rooms).await?;
        self.regions.raise_to_home_heads(&mut rooms).await;
        Ok(rooms)
    }

    async fn current_room(&self, room: Room) -> ApiResult<Room> {
        let mut rooms = [room];
        self.history.current_heads(&mut rooms).await?;
        self.regions.raise_to_home_heads(&mut rooms).await;
        let [room] = rooms;
        Ok(room)
    }

    /// The room as answered to clients: stored fields, current head_seq.
    async fn room_or_404(&self, room_id: &RoomId) -> ApiResult<Room> {
        self.current_room(self.stored_room(room_id).await?).await
    }

    /// The room as stored now (its head_seq may lag acknowledged sends in cluster mode).
    async fn stored_room(&self, room_id: &RoomId) -> ApiResult<Room> {
        self.store.room(room_id).await?.ok_or_else(ApiError::room_not_found)
    }

    /// The room for permission checks (cached: owner, visibility and existence).
    async fn room_meta(&self, room_id: &RoomId) -> ApiResult<Room> {
        self.caches.room(room_id, self.stored_room(room_id)).await
    }

    /// Asks the store, reading the revocation count first. A leave bumps the count after the store
    /// changed, so the count remembered with a "member" answer is never newer than a later leave's:
    /// the leave always makes it stale.
    async fn confirmed_membership(&self, room_id: &RoomId, user_id: &UserId) -> ApiResult<Option<u64>> {
        let count = self.revocations.count(room_id, user_id).await?;
        self.confirm_at(room_id, user_id, count).await
    }

    /// Asks the store and remembers a "member" answer with `count`, read before it.
    async fn confirm_at(&self, room_id: &RoomId, user_id: &UserId, count: u64) -> ApiResult<Option<u64>> {
        if !self.store.is_member(room_id, user_id).await? {
            return Ok(None);
        }
        self.caches.remember_member(room_id, user_id, count).await;
        Ok(Some(count))
    }

    /// The revocation count the user's membership was confirmed at, from the cache when known
    /// (possibly stale: for sends, whose sequencing checks it); `None` when not a member.
    async fn membership_for_send(&self, room_id: &RoomId, user_id: &UserId) -> ApiResult<Option<u64>> {
        if let Some(count) = self.caches.known_member(room_id, user_id).await {
            return Ok(Some(count));
        }
        self.confirmed_membership(room_id, user_id).await
    }

    /// Whether the user is a member now: a leave answered on any instance counts.
    async fn is_member(&self, room_id: &RoomId, user_id: &UserId) -> ApiResult<bool> {
        let cached = self.caches.known_member(room_id, user_id).await;
        let count = self.revocations.count(room_id, user_id).await?;
        match cached {
            Some(c) if c == count => return Ok(true),
            Some(_) => self.caches.forget_member(room_id, user_id).await,
            None => {}
        }
        Ok(self.confirm_at(room_id, user_id, count).await?.is_some())
    }

    /// The answer to a send refused because the sender left the room after it was checked.
    async fn revoked(&self, room_id: &RoomId, user_id: &UserId) -> ApiError {
        self.caches.forget_member(room_id, user_id).await;
        match self.confirmed_membership(room_id, user_id).await {
            Ok(None) => ApiError::not_member(),
            // Left and joined again while the send was under way; nothing was stored.
            Ok(Some(_)) => {
                ApiError::Unavailable("your membership of this room changed while sending; retry the send".into())
            }
            Err(e) => e,
        }
    }

    /// A room the user may see: public, or private with the user a member.
    pub async fn visible_room(&self, user_id: &UserId, room_id: &RoomId) -> ApiResult<Room> {
        let room = self.room_or_404(room_id).await?;
        if room.visibility == Visibility::Private && !self.is_member(room_id, user_id).await? {
            return Err(ApiError::Forbidden("this room is private".into()));
        }
        Ok(room)
    }

    /// Succeeds when the user is a member; `forbidden` when not, `not_found` for an unknown room.
    async fn ensure_member(&self, user_id: &UserId, room_id: &RoomId) -> ApiResult<()> {
        if self.is_member(room_id, user_id).await? {
            return Ok(());
        }
        self.room_meta(room_id).await?;
        Err(ApiError::not_member())
    }

    /// A room the user is a member of.
    pub async fn member_room(&self, user_id: &UserId, room_id: &RoomId) -> ApiResult<Room> {
        self.ensure_member(user_id, room_id).await?;
        self.room_or_404(room_id).await
    }

    pub async fn update_room(&self, user_id: &UserId, room_id: &RoomId, mut patch: RoomPatch) -> ApiResult<Room> {
        self.check_change_rate(user_id)?;
        let room = self.room_meta(room_id).await?;
        if room.owner_id != user_id.as_str() {
            return Err(ApiError::Forbidden("only the owner may change the room".into()));
        }
        patch.version = self.hlc.version();
        let version = patch.version.clone();
        let room = self.current_room(self.store.update_room(room_id, patch, Timestamp::now()).await?).await?;
        self.changed(Invalidation::Room { id: room_id.to_string() }).await;
        self.tell_regions(Replicated::RoomChanged { room_id: room_id.to_string(), version }).await;
        self.notices.room_updated(&room).await;
        Ok(room)
    }

    /// Joins a public room (idempotent); a private room only for existing members.
    pub async fn join_room(&self, user_id: &UserId, room_id: &RoomId) -> ApiResult<Room> {
        self.check_read_rate(user_id)?;
        if let Some(peer) = self.remote_home(room_id).await? {
            let req = MemberChange { room_id: room_id.to_string(), user_id: user_id.to_string(), by: None };
            let room: Room = peer.client.call("join", "/join", &req).await?;
            self.changed(Invalidation::Member { room_id: room_id.to_string(), user_id: user_id.to_string() }).await;
            return Ok(room);
        }
        self.join_at_home(user_id, room_id).await
    }

    /// A join decided here (the room's home), for this region or forwarded by another.
    pub async fn join_at_home(&self, user_id: &UserId, room_id: &RoomId) -> ApiResult<Room> {
        let room = self.room_meta(room_id).await?;
        self.regions.deciding(&room.home_region)?;
        if self.is_member(room_id, user_id).await? {
            return self.room_or_404(room_id).await;
        }
        if room.visibility == Visibility::Private {
            return Err(ApiError::Forbidden("this room is private; ask its owner for an invite".into()));
        }
        self.store.add_member(room_id, user_id, Timestamp::now()).await?;
        self.changed(Invalidation::Member { room_id: room_id.to_string(), user_id: user_id.to_string() }).await;
        self.tell_regions(Replicated::Joined { room_id: room_id.to_string(), user_id: user_id.to_string() }).await;
        self.room_or_404(room_id).await
    }

    pub async fn leave_room(&self, user_id: &UserId, room_id: &RoomId) -> ApiResult<()> {
        self.check_change_rate(user_id)?;
        if let Some(peer) = self.remote_home(room_id).await? {
            let req = MemberChange { room_id: room_id.to_string(), user_id: user_id.to_string(), by: None };
            peer.client.call::<_, serde_json::Value>("leave", "/leave", &req).await?;
            // The home stopped its own delivery and refuses the user's sends from now on; this
            // region's sockets stop here, before the answer (the home's outbox tells the others).
            return self.left_here(room_id, user_id).await;
        }
        self.leave_at_home(user_id, room_id).await
    }

    /// A leave decided here (the room's home).
    pub async fn leave_at_home(&self, user_id: &UserId, room_id: &RoomId) -> ApiResult<()> {
        let room = self.room_meta(room_id).await?;
        self.regions.deciding(&room.home_region)?;
        self.store.remove_member(room_id, user_id).await?;
        self.left_here(room_id, user_id).await?;
        // Not answered as done until every other region will hear of it.
        self.outbox.record(Replicated::Left { room_id: room_id.to_string(), user_id: user_id.to_string() }).await
    }

    /// A leave's effects in this region: cached memberships refused, delivery stopped.
    async fn left_here(&self, room_id: &RoomId, user_id: &UserId) -> ApiResult<()> {
        // Even when the store had no membership: a leave retried after the bump failed must bump.
        self.revocations.revoke(room_id, user_id).await?;
        self.changed(Invalidation::Member { room_id: room_id.to_string(), user_id: user_id.to_string() }).await;
        self.delivery.member_left(room_id, user_id).await
    }

    pub async fn add_member(&self, owner_id: &UserId, room_id: &RoomId, new_member: &UserId) -> ApiResult<()> {
        self.check_change_rate(owner_id)?;
        if let Some(peer) = self.remote_home(room_id).await? {
            let req = MemberChange {
                room_id: room_id.to_string(),
                user_id: new_member.to_string(),
                by: Some(owner_id.to_string()),
            };
            peer.client.call::<_, serde_json::Value>("add_member", "/members", &req).await?;
            self.changed(Invalidation::Member { room_id: room_id.to_string(), user_id: new_member.to_string() }).await;
            return Ok(());
        }
        self.add_member_at_home(owner_id, room_id, new_member).await
    }

    /// An invitation decided here (the room's home).
    pub async fn add_member_at_home(&self, owner_id: &UserId, room_id: &RoomId, new_member: &UserId) -> ApiResult<()> {
        let room = self.room_meta(room_id).await?;
        self.regions.deciding(&room.home_region)?;
        if room.owner_id != owner_id.as_str() {
            return Err(ApiError::Forbidden("only the owner may add members".into()));
        }
        self.user(new_member).await?;
        self.store.add_member(room_id, new_member, Timestamp::now()).await?;
        self.changed(Invalidation::Member { room_id: room_id.to_string(), user_id: new_member.to_string() }).await;
        self.tell_regions(Replicated::Joined { room_id: room_id.to_string(), user_id: new_member.to_string() }).await;
        Ok(())
    }

    /// A page of the room's members (see [`Store::members`]), for a member.
    pub async fn members(
        &self,
        user_id: &UserId,
        room_id: &RoomId,
        after: Option<(Timestamp, &str)>,
        limit: u32,
    ) -> ApiResult<Vec<Member>> {
        self.ensure_member(user_id, room_id).await?;
        Ok(self.store.members(room_id, after, limit).await?)
    }

    // ---- messages ----

    /// Validated send; `created` is false on a retry (the original comes back).
    /// `turn` is held until the send is enqueued, so one socket's sends keep their order.
    pub async fn send<T>(
        &self,
        sender_id: &UserId,
        room_id: &RoomId,
        client_msg_id: ClientMsgId,
        body: MessageBody,
        turn: T,
    ) -> ApiResult<Sent> {
        // One span for the sequencing (the Redis script or the group commit); its context travels
        // with the message to whoever makes it durable.
        let span = if telemetry::traces_enabled() {
            tracing::info_span!("sequence", otel.name = self.sequencer.span_name(), room = room_id.as_str())
        } else {
            tracing::Span::none()
        };
        let trace = span.in_scope(telemetry::traceparent);
        let receipt = {
            let _turn = turn;
            self.send_limiter.check(sender_id).map_err(|wait| Self::limited("send", wait))?;
            if let Some(peer) = self.remote_home(room_id).await? {
                let send = ForwardedSend {
                    user_id: sender_id.to_string(),
                    room_id: room_id.to_string(),
                    client_msg_id: client_msg_id.into_inner(),
                    body: body.into_inner(),
                    trace: trace.clone(),
                };
                let answer = peer.sends.submit(send).await?;
                drop(_turn);
                let (message, created) =
                    answer.await.map_err(|_| ApiError::Unavailable("forwarding stopped".into()))??;
                if created {
                    m::TOTALS.accepted(1);
                }
                return Ok(Sent { message, created, trace });
            }
            self.submit_at_home(sender_id, room_id, client_msg_id, body, &trace).instrument(span.clone()).await?
        };
        self.settle(receipt, room_id, sender_id, trace).instrument(span).await
    }

    /// Queues a send to a room homed here, for this region or forwarded by another (whose
    /// instance applied the sender's rate limit). Sends queued one after another are sequenced
    /// in that order.
    pub async fn submit_at_home(
        &self,
        sender_id: &UserId,
        room_id: &RoomId,
        client_msg_id: ClientMsgId,
        body: MessageBody,
        trace: &str,
    ) -> ApiResult<Receipt> {
        let Some(membership) = self.membership_for_send(room_id, sender_id).await? else {
            self.room_meta(room_id).await?;
            return Err(ApiError::not_member());
        };
        // Self-fencing: only while this region holds the home lease of the room's home,
        // checked last before the sequencer (the membership check may have waited); the
        // sequencer checks the epoch's validity again before its script runs.
        let epoch = if self.regions.has_peers() {
            self.regions.deciding(&self.room_meta(room_id).await?.home_region)?
        } else {
            None
        };
        self.sequencer
            .submit(SendRequest {
                message_id: new_id(),
                room_id: room_id.to_string(),
                sender_id: sender_id.to_string(),
                client_msg_id: client_msg_id.into_inner(),
                body: body.into_inner(),
                created_at: Timestamp::now(),
                trace: trace.to_string(),
                membership,
                epoch,
            })
            .await
    }

    /// The answer to a send once its receipt completes.
    pub async fn settle(
        &self,
        receipt: Receipt,
        room_id: &RoomId,
        sender_id: &UserId,
        trace: String,
    ) -> ApiResult<Sent> {
        let outcome = match receipt.await {
            Err(ApiError::MembershipRevoked) => return Err(self.revoked(room_id, sender_id).await),
            other => other?,
        };
        Ok(match outcome {
            SendOutcome::Accepted(message) => {
                m::TOTALS.accepted(1);
                Sent { message, created: true, trace }
            }
            SendOutcome::Duplicate(message) => Sent { message, created: false, trace },
        })
    }

    /// A page of history for a user who may see the room.
    pub async fn history(
        &self,
        user_id: &UserId,
        room_id: &RoomId,
        cursor: Cursor,
        limit: u32,
    ) -> ApiResult<HistoryPage> {
        self.check_read_rate(user_id)?;
        self.visible_room(user_id, room_id).await?;
        self.page(room_id, cursor, limit).await
    }

    // ---- regions ----

    /// The peer region that decides the room's order and membership, when it is not this one.
    async fn remote_home(&self, room_id: &RoomId) -> ApiResult<Option<&Peer>> {
        if !self.regions.has_peers() {
            return Ok(None);
        }
        let room = self.room_meta(room_id).await?;
        self.regions.home_of(&room.home_region)
    }

    /// Records a change the other regions only need to hear of eventually (their caches expire).
    async fn tell_regions(&self, change: Replicated) {
        if let Err(e) = self.outbox.record(change).await {
            tracing::warn!(error = %e, "a change was not recorded for the other regions (their caches expire)");
        }
    }

    /// Moves this region's clock past another region's change (unless its clock is too far
    /// ahead: then counted and not merged; the store still holds the change, by its version).
    fn observe(&self, version: &str) {
        if let Err(ahead) = self.hlc.observe(version) {
            let peer = crate::region::hlc::parse_version(version).map(|(_, r)| r.to_string()).unwrap_or_default();
            metrics::counter!(m::HLC_REFUSED, "peer" => peer.clone()).increment(1);
            tracing::warn!(peer = %peer, ahead_ms = ahead.ahead_ms, "a region's clock is ahead of ours past CHATMESH_HLC_MAX_AHEAD_MS");
        }
    }

    /// Who decides whose rooms (the cluster view); empty with a single region.
    pub fn homes_view(&self) -> Vec<serde_json::Value> {
        self.regions.homes_view()
    }

    /// Whether `peer` still decides the rooms homed there (nobody took them over): what it
    /// sequences after a takeover must not be taken here.
    pub fn peer_decides_its_rooms(&self, peer: &str) -> bool {
        self.regions.decider_of(peer) == peer
    }

    /// Takes a change another region decided into this one.
    pub async fn apply_replicated(&self, change: Replicated) -> ApiResult<()> {
        match change {
            Replicated::Left { room_id, user_id } => {
                self.left_here(&RoomId::from(room_id.as_str()), &UserId::from(user_id.as_str())).await
            }
            Replicated::Joined { room_id, user_id } => {
                self.changed(Invalidation::Member { room_id, user_id }).await;
                Ok(())
            }
            Replicated::RoomChanged { room_id, version } => {
                self.observe(&version);
                self.changed(Invalidation::Room { id: room_id.clone() }).await;
                let room = self.room_or_404(&RoomId::from(room_id.as_str())).await?;
                self.notices.room_updated(&room).await;
                Ok(())
            }
            Replicated::UserChanged { user_id, version } => {
                self.observe(&version);
                self.changed(Invalidation::User { id: user_id.clone() }).await;
                let id = UserId::from(user_id.as_str());
                let user = self.user(&id).await?;
                let rooms = self.store.room_ids_of_user(&id).await?;
                self.notices.user_updated(&user, &rooms).await;
                Ok(())
            }
            Replicated::Presence { user_id, online, region } => {
                let rooms = self.store.room_ids_of_user(&UserId::from(user_id.as_str())).await?;
                self.notices.presence_elsewhere(&region, &user_id, online, &rooms).await;
                Ok(())
            }
            Replicated::Typing { room_id, user_id } => {
                self.notices.typing(&room_id, &user_id, "").await;
                Ok(())
            }
            Replicated::SessionsEnded { user_id, ended } => {
                self.sessions.revoke(&user_id, &ended, self.tokens.ttl()).await?;
                self.delivery.end_sessions(&user_id, &ended).await;
                Ok(())
            }
        }
    }

    /// A page of history, without permission checks (the caller made them).
    pub async fn page(&self, room_id: &RoomId, cursor: Cursor, limit: u32) -> ApiResult<HistoryPage> {
        let here = self.history.page(room_id, cursor, limit);
        match self.remote_home(room_id).await {
            Ok(Some(home)) => home.page(room_id, cursor, limit, here).await,
            _ => here.await,
        }
    }
}
