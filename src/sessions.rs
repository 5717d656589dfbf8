//! Revoked user tokens: a logout revokes the token it presents, a password change every token the
//! user was issued before it. Every authenticated request and socket CONNECT asks here; connected
//! sockets are cut by the fan-out (see `Delivery::end_sessions`).
//!
//! A revocation only has to outlive the token it revokes (tokens expire), so nothing here grows
//! without bound: a revoked token is kept until its `exp`, a user's cut-off for one token lifetime.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};

use crate::auth::Session;
use crate::error::{ApiError, ApiResult};
use crate::redis_io::{Keys, Redis};

/// What a revocation ends: one token, or every token of the user issued up to a moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Ended {
    Token(String),
    IssuedUpTo(i64),
}

impl Ended {
    /// Whether a socket's session is one of those ended.
    pub fn covers(&self, token_id: &str, issued_ms: i64) -> bool {
        match self {
            Ended::Token(id) => !id.is_empty() && id == token_id,
            Ended::IssuedUpTo(ms) => issued_ms <= *ms,
        }
    }
}

#[async_trait]
pub trait RevokedSessions: Send + Sync + 'static {
    /// Whether the token was revoked (logged out, or issued before a password change).
    async fn is_revoked(&self, s: &Session) -> ApiResult<bool>;
    /// Revokes `what` for `user_id`; once this returns, every instance refuses those tokens.
    async fn revoke(&self, user_id: &str, what: &Ended, token_ttl: Duration) -> ApiResult<()>;
}

fn now_secs() -> u64 {
    chrono::Utc::now().timestamp().max(0) as u64
}

/// Embedded mode: in memory, and in a file of the data dir so that a restart (which keeps tokens
/// valid: the signing secret is kept too) does not bring a revoked token back.
pub struct LocalRevokedSessions {
    path: PathBuf,
    state: Mutex<Revoked>,
}

#[derive(Default, Serialize, Deserialize)]
struct Revoked {
    /// Token id → its expiry (Unix s).
    tokens: HashMap<String, u64>,
    /// User id → (cut-off in Unix ms, until when it matters in Unix s).
    users: HashMap<String, (i64, u64)>,
}

impl Revoked {
    fn prune(&mut self, now: u64) {
        self.tokens.retain(|_, exp| *exp >= now);
        self.users.retain(|_, (_, until)| *until >= now);
    }
}

impl LocalRevokedSessions {
    pub fn open(data_dir: &std::path::Path) -> anyhow::Result<Self> {
        let path = data_dir.join("revoked_tokens.json");
        let state = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| anyhow::anyhow!("{} is not readable: {e}", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Revoked::default(),
            Err(e) => anyhow::bail!("cannot read {}: {e}", path.display()),
        };
        Ok(Self { path, state: Mutex::new(state) })
    }

    /// Written whole through a temporary file and a rename: a crash leaves the old or the new list.
    fn persist(&self, state: &Revoked) -> ApiResult<()> {
        let tmp = self.path.with_extension("json.tmp");
        let write = || -> std::io::Result<()> {
            if let Some(dir) = self.path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            std::fs::write(&tmp, serde_json::to_vec(state).unwrap_or_default())?;
            std::fs::File::open(&tmp)?.sync_all()?;
            std::fs::rename(&tmp, &self.path)
        };
        write().map_err(|e| ApiError::Unavailable(format!("could not record the revocation: {e}")))
    }
}

#[async_trait]
impl RevokedSessions for LocalRevokedSessions {
    async fn is_revoked(&self, s: &Session) -> ApiResult<bool> {
        let state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let token = !s.token_id.is_empty() && state.tokens.contains_key(&s.token_id);
        let before = state.users.get(&s.user_id).is_some_and(|(ms, _)| s.issued_ms <= *ms);
        Ok(token || before)
    }

    async fn revoke(&self, user_id: &str, what: &Ended, token_ttl: Duration) -> ApiResult<()> {
        let mut state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = now_secs();
        state.prune(now);
        match what {
            Ended::Token(id) => {
                state.tokens.insert(id.clone(), now + token_ttl.as_secs());
            }
            Ended::IssuedUpTo(ms) => {
                state.users.insert(user_id.to_string(), (*ms, now + token_ttl.as_secs()));
            }
        }
        self.persist(&state)
    }
}

/// Cluster mode: in Redis, with the token's remaining life (or one token lifetime) as TTL.
pub struct RedisRevokedSessions {
    pub redis: Redis,
    pub keys: Keys,
}

fn unavailable(e: redis::RedisError) -> ApiError {
    tracing::warn!(error = %e, "revoked tokens unreachable");
    ApiError::Unavailable("Redis is unavailable; retry".into())
}

#[async_trait]
impl RevokedSessions for RedisRevokedSessions {
    async fn is_revoked(&self, s: &Session) -> ApiResult<bool> {
        let token = self.keys.revoked_token(if s.token_id.is_empty() { "-" } else { &s.token_id });
        let (revoked, cutoff): (Option<String>, Option<i64>) =
            self.redis.conn().await.mget(&[token, self.keys.tokens_cutoff(&s.user_id)]).await.map_err(unavailable)?;
        Ok(revoked.is_some() || cutoff.is_some_and(|ms| s.issued_ms <= ms))
    }

    async fn revoke(&self, user_id: &str, what: &Ended, token_ttl: Duration) -> ApiResult<()> {
        // Kept one token lifetime (plus the verifier's leeway): every token it could refuse
        // has expired by then.
        let ttl = token_ttl.as_secs() + 60;
        let mut conn = self.redis.conn().await;
        match what {
            Ended::Token(id) => conn.set_ex::<_, _, ()>(self.keys.revoked_token(id), 1, ttl).await,
            Ended::IssuedUpTo(ms) => conn.set_ex::<_, _, ()>(self.keys.tokens_cutoff(user_id), ms, ttl).await,
        }
        .map_err(unavailable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(user: &str, token: &str, issued_ms: i64) -> Session {
        Session { user_id: user.into(), token_id: token.into(), issued_ms, expires_at: now_secs() + 60 }
    }

    #[tokio::test]
    async fn a_revocation_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let ttl = Duration::from_secs(3600);
        let r = LocalRevokedSessions::open(dir.path()).unwrap();
        let (old, kept, newer) = (session("u1", "t1", 1_000), session("u1", "t2", 2_000), session("u1", "t3", 3_001));
        r.revoke("u1", &Ended::Token("t1".into()), ttl).await.unwrap();
        assert!(r.is_revoked(&old).await.unwrap());
        assert!(!r.is_revoked(&kept).await.unwrap());
        r.revoke("u1", &Ended::IssuedUpTo(3_000), ttl).await.unwrap();
        assert!(r.is_revoked(&kept).await.unwrap(), "issued before the cut-off");
        assert!(!r.is_revoked(&newer).await.unwrap(), "issued after it");
        assert!(!r.is_revoked(&session("u2", "t4", 1)).await.unwrap(), "another user");
        drop(r);
        let again = LocalRevokedSessions::open(dir.path()).unwrap();
        for s in [&old, &kept] {
            assert!(again.is_revoked(s).await.unwrap(), "{s:?} after a restart");
        }
        assert!(!again.is_revoked(&newer).await.unwrap());
    }

    #[test]
    fn what_a_revocation_covers() {
        assert!(Ended::Token("t1".into()).covers("t1", 0));
        assert!(!Ended::Token("t1".into()).covers("t2", 0));
        assert!(!Ended::Token(String::new()).covers("", 0), "an id-less token is not every id-less token");
        assert!(Ended::IssuedUpTo(10).covers("x", 10));
        assert!(!Ended::IssuedUpTo(10).covers("x", 11));
    }
}
