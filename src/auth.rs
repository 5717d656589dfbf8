//! Passwords (Argon2id) and user tokens (HS256 JWT).

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use argon2::Argon2;
use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use crate::config::Secret;
use crate::error::ApiError;

/// Password hashing (Argon2id), bounded twice: at most one hash per core runs at a time (each
/// takes 19 MiB, and a burst would otherwise take burst x 19 MiB at once, which the allocator then
/// keeps resident, for no gain on a CPU-bound job), and at most `queue` requests wait for a turn.
/// Beyond that a login or registration answers `rate_limited` at once: a burst must not stall every
/// login behind it for seconds, nor hold a connection each.
pub struct Hashing {
    permits: Arc<Semaphore>,
    queue: usize,
    waiting: AtomicUsize,
}

/// How long a refused caller is told to wait.
const QUEUE_FULL_RETRY: Duration = Duration::from_secs(1);

impl Hashing {
    /// One permit per core; `queue` callers may wait for one.
    pub fn new(queue: usize) -> Self {
        Self::with_permits(std::thread::available_parallelism().map_or(1, |n| n.get()), queue)
    }

    fn with_permits(permits: usize, queue: usize) -> Self {
        Self { permits: Arc::new(Semaphore::new(permits)), queue, waiting: AtomicUsize::new(0) }
    }

    /// Runs a hashing job off the async runtime, within both bounds. The permit moves into the
    /// job, so a caller that gives up does not free it while the job still runs.
    async fn run<T: Send + 'static>(&self, job: impl FnOnce() -> T + Send + 'static) -> Result<T, ApiError> {
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.queue {
                    self.waiting.fetch_sub(1, Ordering::AcqRel);
                    metrics::counter!(crate::metrics::RATE_LIMITED, "kind" => "password_hashing").increment(1);
                    return Err(ApiError::RateLimited { retry_after: QUEUE_FULL_RETRY });
                }
                let permit = self.permits.clone().acquire_owned().await;
                self.waiting.fetch_sub(1, Ordering::AcqRel);
                permit.expect("the hashing semaphore is never closed")
            }
        };
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            job()
        })
        .await
        .map_err(|e| ApiError::Unavailable(format!("hashing task failed: {e}")))
    }

    /// Hashes off the async runtime: Argon2id is deliberately slow (tens of ms).
    pub async fn hash_password(&self, password: String) -> Result<String, ApiError> {
        self.run(move || Argon2::default().hash_password(password.as_bytes()).map(|h| h.to_string()))
            .await?
            .map_err(|e| ApiError::Unavailable(format!("hashing failed: {e}")))
    }

    /// Whether `password` matches `hash`; with no hash (no such user) a dummy one is verified, so
    /// that a wrong username takes as long as a wrong password. `rate_limited` past the queue.
    pub async fn verify_password(&self, password: String, hash: Option<String>) -> Result<bool, ApiError> {
        let known = hash.is_some();
        let hash = hash.unwrap_or_else(|| DUMMY_HASH.to_string());
        let ok = self
            .run(move || {
                PasswordHash::new(&hash)
                    .map(|parsed| Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok())
                    .unwrap_or(false)
            })
            .await?;
        Ok(ok && known)
    }
}

/// A hash of a password nobody knows, verified when the user does not exist so that a wrong
/// username takes as long as a wrong password.
const DUMMY_HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$1kqbqQnmYAKQZx3E4fAcN0z0mJ2ppdjm0k5vQ7uBq0Q";

/// Who issues user tokens and for whom: checked on every token, so a token signed with the same
/// key for another purpose (the instance-to-instance tokens of a cluster, say) is not a user token.
const ISSUER: &str = "chatmesh";
const AUDIENCE: &str = "chatmesh-user";

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    iss: String,
    aud: String,
    iat: u64,
    exp: u64,
    /// A ULID: names the token for a logout, and tells its issue time to the millisecond (a
    /// password change revokes what was issued before it, and a login may follow in the same second).
    /// Absent from tokens issued before tokens carried one.
    #[serde(default)]
    jti: String,
}

/// A verified user token: whose it is, which one, and its lifetime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub user_id: String,
    /// The token's id (`jti`); empty for a token issued before tokens carried one.
    pub token_id: String,
    /// When it was issued (Unix ms).
    pub issued_ms: i64,
    /// When it expires (Unix seconds).
    pub expires_at: u64,
}

impl Session {
    fn of(c: Claims) -> Self {
        let issued_ms = ulid::Ulid::from_string(&c.jti)
            .map(|u| u.timestamp_ms() as i64)
            .unwrap_or((c.iat as i64).saturating_mul(1000) + 999);
        Self { user_id: c.sub, token_id: c.jti, issued_ms, expires_at: c.exp }
    }
}

/// How far past its `exp` a token is still taken (clock skew between the instances that issue
/// and check it).
pub const LEEWAY_SECS: u64 = 5;

/// Issues and checks user tokens.
pub struct Tokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    ttl: Duration,
}

impl Tokens {
    pub fn new(secret: &Secret, ttl: Duration) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = LEEWAY_SECS;
        validation.set_required_spec_claims(&["exp", "sub", "iss", "aud"]);
        validation.set_issuer(&[ISSUER]);
        validation.set_audience(&[AUDIENCE]);
        Self {
            encoding: EncodingKey::from_secret(secret.expose().as_bytes()),
            decoding: DecodingKey::from_secret(secret.expose().as_bytes()),
            validation,
            ttl,
        }
    }

    /// How long a token lives.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    pub fn issue(&self, user_id: &str) -> Result<String, ApiError> {
        let now = chrono::Utc::now().timestamp().max(0) as u64;
        let claims = Claims {
            sub: user_id.to_string(),
            iss: ISSUER.into(),
            aud: AUDIENCE.into(),
            iat: now,
            exp: now + self.ttl.as_secs(),
            jti: ulid::Ulid::generate().to_string(),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| ApiError::Unavailable(format!("token signing failed: {e}")))
    }

    /// The user id of a valid token. One answer for every reason a token is refused (expired,
    /// forged, malformed, another issuer or audience): telling them apart helps only an attacker.
    pub fn verify(&self, token: &str) -> Result<Session, ApiError> {
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation).map(|d| Session::of(d.claims)).map_err(
            |e| {
                tracing::debug!(reason = %e, "token refused");
                ApiError::Unauthorized("invalid or expired token".into())
            },
        )
    }
}

/// Embedded mode: the signing secret is generated once and kept (0600) in the data dir, so tokens
/// stay valid across restarts.
pub fn load_or_create_secret(data_dir: &Path) -> anyhow::Result<Secret> {
    use rand::RngCore;
    std::fs::create_dir_all(data_dir)?;
    let path = data_dir.join("jwt_secret");
    if let Ok(s) = std::fs::read_to_string(&path) {
        let s = s.trim().to_string();
        anyhow::ensure!(s.len() >= 32, "{} is shorter than 32 bytes", path.display());
        return Ok(Secret::new(s));
    }
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let secret = hex::encode(bytes);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(&path)?;
    f.write_all(secret.as_bytes())?;
    f.sync_all()?;
    Ok(Secret::new(secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hashing_waits_while_every_core_is_hashing() {
        let h = Arc::new(Hashing::with_permits(2, 8));
        let busy = h.permits.clone().acquire_many_owned(2).await.unwrap();
        let waiting = tokio::spawn({
            let h = h.clone();
            async move { h.hash_password("correct horse".into()).await }
        });
        // An unbounded hash takes tens of ms here; this one must not start while the permits are out.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!waiting.is_finished(), "a hash ran while every permit was held");
        drop(busy);
        let hash = tokio::time::timeout(Duration::from_secs(30), waiting).await.unwrap().unwrap().unwrap();
        assert_eq!(h.verify_password("correct horse".into(), Some(hash)).await, Ok(true));
    }

    #[tokio::test]
    async fn past_the_queue_a_hash_is_refused_at_once() {
        let h = Arc::new(Hashing::with_permits(1, 2));
        let busy = h.permits.clone().acquire_owned().await.unwrap();
        // Exactly `queue` callers may wait...
        let mut waiters = Vec::new();
        for _ in 0..2 {
            let h = h.clone();
            waiters.push(tokio::spawn(async move { h.hash_password("correct horse".into()).await }));
        }
        while h.waiting.load(Ordering::Acquire) < 2 {
            tokio::task::yield_now().await;
        }
        // ...the next one is told to come back, without waiting.
        let refused = tokio::time::timeout(Duration::from_millis(500), h.verify_password("x".into(), None)).await;
        assert_eq!(refused.expect("answered at once"), Err(ApiError::RateLimited { retry_after: QUEUE_FULL_RETRY }));
        drop(busy);
        for w in waiters {
            assert!(w.await.unwrap().unwrap().starts_with("$argon2id$"));
        }
        assert_eq!(h.waiting.load(Ordering::Acquire), 0);
        // With the queue drained, hashing works again.
        assert_eq!(h.verify_password("x".into(), None).await, Ok(false));
    }

    #[test]
    fn token_round_trip_and_tamper() {
        let t = Tokens::new(&Secret::new("x".repeat(32)), Duration::from_secs(60));
        let tok = t.issue("user1").unwrap();
        let session = t.verify(&tok).unwrap();
        assert_eq!(session.user_id, "user1");
        assert_eq!(session.token_id.len(), 26, "a ULID");
        let now_ms = chrono::Utc::now().timestamp_millis();
        assert!((now_ms - session.issued_ms).abs() < 5_000, "issued just now, to the ms: {}", session.issued_ms);
        assert_ne!(t.verify(&t.issue("user1").unwrap()).unwrap().token_id, session.token_id, "each token its own id");
        let other = Tokens::new(&Secret::new("y".repeat(32)), Duration::from_secs(60));
        assert!(other.verify(&tok).is_err());
        assert!(t.verify("garbage").is_err());
    }

    #[test]
    fn expired_forged_and_foreign_tokens_get_one_answer() {
        let secret = Secret::new("x".repeat(32));
        let t = Tokens::new(&secret, Duration::from_secs(60));
        let key = EncodingKey::from_secret(secret.expose().as_bytes());
        let now = chrono::Utc::now().timestamp() as u64;
        let sign = |iss: &str, aud: &str, exp: u64| {
            let c = Claims { sub: "u1".into(), iss: iss.into(), aud: aud.into(), iat: now, exp, jti: String::new() };
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), &c, &key).unwrap()
        };
        let legacy = t.verify(&sign(ISSUER, AUDIENCE, now + 60)).unwrap();
        assert_eq!(
            (legacy.user_id.as_str(), legacy.issued_ms),
            ("u1", now as i64 * 1000 + 999),
            "no jti: the end of its iat second"
        );
        let expired = t.verify(&sign(ISSUER, AUDIENCE, now - 3600)).unwrap_err();
        let other_audience = t.verify(&sign(ISSUER, "internal", now + 60)).unwrap_err();
        let other_issuer = t.verify(&sign("someone-else", AUDIENCE, now + 60)).unwrap_err();
        let forged = Tokens::new(&Secret::new("y".repeat(32)), Duration::from_secs(60)).issue("u1").unwrap();
        let forged = t.verify(&forged).unwrap_err();
        for e in [&other_audience, &other_issuer, &forged] {
            assert_eq!(e, &expired, "every refusal reads the same");
        }
        assert_eq!(expired.to_string(), "invalid or expired token");
    }

    #[tokio::test]
    async fn password_hash_verifies() {
        let hashing = Hashing::new(4);
        let h = hashing.hash_password("correct horse".into()).await.unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert_eq!(hashing.verify_password("correct horse".into(), Some(h.clone())).await, Ok(true));
        assert_eq!(hashing.verify_password("wrong horse".into(), Some(h)).await, Ok(false));
        assert_eq!(hashing.verify_password("anything".into(), None).await, Ok(false));
    }

    #[test]
    fn secret_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_create_secret(dir.path()).unwrap();
        let b = load_or_create_secret(dir.path()).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.expose().len(), 64);
    }
}
