//! Budgets against guessing passwords, shared by every instance of a deployment: with N
//! instances behind a balancer, per-instance budgets would give an attacker N times as many
//! guesses. Embedded mode has one instance, so its buckets live in memory ([`LocalThrottle`]);
//! cluster mode keeps them in Redis, one token bucket per key updated by one atomic script
//! ([`RedisThrottle`]).

use std::time::Duration;

use async_trait::async_trait;

use crate::error::{ApiError, ApiResult};
use crate::ratelimit::RateLimiter;
use crate::redis_io::{Keys, Redis};

/// Which budget a key draws on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    /// Registrations and logins from one client IP.
    AuthPerIp,
    /// Failed logins of one account, from anywhere.
    LoginFailuresPerAccount,
}

impl Budget {
    fn name(self) -> &'static str {
        match self {
            Self::AuthPerIp => "auth-ip",
            Self::LoginFailuresPerAccount => "login-fail",
        }
    }
}

/// Per-minute sizes of the budgets; each bucket allows a burst of a whole minute's worth.
#[derive(Debug, Clone, Copy)]
pub struct Budgets {
    pub auth_per_ip_per_min: u32,
    pub login_failures_per_account_per_min: u32,
}

impl Budgets {
    fn per_min(&self, budget: Budget) -> u32 {
        match budget {
            Budget::AuthPerIp => self.auth_per_ip_per_min,
            Budget::LoginFailuresPerAccount => self.login_failures_per_account_per_min,
        }
    }
}

/// Token buckets keyed by budget and key. Both methods answer `rate_limited` (with the wait)
/// when the bucket is empty.
#[async_trait]
pub trait Throttle: Send + Sync + 'static {
    /// Takes a token.
    async fn take(&self, budget: Budget, key: &str) -> ApiResult<()>;
    /// Whether a token is there, taking none (a login checks before it knows whether it failed).
    async fn peek(&self, budget: Budget, key: &str) -> ApiResult<()>;
}

fn limited(budget: Budget, retry_after: Duration) -> ApiError {
    metrics::counter!(crate::metrics::RATE_LIMITED, "kind" => budget.name()).increment(1);
    ApiError::RateLimited { retry_after }
}

/// One instance's buckets, in memory.
pub struct LocalThrottle {
    per_ip: RateLimiter,
    per_account: RateLimiter,
}

impl LocalThrottle {
    pub fn new(budgets: Budgets) -> Self {
        let bucket = |per_min: u32| RateLimiter::new(f64::from(per_min) / 60.0, f64::from(per_min));
        Self {
            per_ip: bucket(budgets.auth_per_ip_per_min),
            per_account: bucket(budgets.login_failures_per_account_per_min),
        }
    }

    fn limiter(&self, budget: Budget) -> &RateLimiter {
        match budget {
            Budget::AuthPerIp => &self.per_ip,
            Budget::LoginFailuresPerAccount => &self.per_account,
        }
    }
}

#[async_trait]
impl Throttle for LocalThrottle {
    async fn take(&self, budget: Budget, key: &str) -> ApiResult<()> {
        self.limiter(budget).check(key).map_err(|wait| limited(budget, wait))
    }

    async fn peek(&self, budget: Budget, key: &str) -> ApiResult<()> {
        self.limiter(budget).peek(key).map_err(|wait| limited(budget, wait))
    }
}

/// The deployment's buckets, in Redis (`throttle.lua`).
pub struct RedisThrottle {
    redis: Redis,
    keys: Keys,
    budgets: Budgets,
    script: redis::Script,
}

impl RedisThrottle {
    pub fn new(redis: Redis, keys: Keys, budgets: Budgets) -> Self {
        Self { redis, keys, budgets, script: redis::Script::new(crate::redis_io::THROTTLE_SCRIPT) }
    }

    async fn bucket(&self, budget: Budget, key: &str, mode: &str) -> ApiResult<()> {
        let per_min = self.budgets.per_min(budget);
        let (ok, wait_ms): (i64, i64) = self
            .script
            .key(self.keys.throttle(budget.name(), key))
            .arg(f64::from(per_min) / 60.0)
            .arg(per_min)
            .arg(mode)
            .invoke_async(&mut self.redis.conn().await)
            .await
            .map_err(|e| {
                // Without the shared budget no guess is counted: refuse rather than let them through.
                tracing::warn!(error = %e, "throttle script failed");
                ApiError::Unavailable("Redis is unavailable; retry".into())
            })?;
        if ok == 1 { Ok(()) } else { Err(limited(budget, Duration::from_millis(wait_ms.max(1) as u64))) }
    }
}

#[async_trait]
impl Throttle for RedisThrottle {
    async fn take(&self, budget: Budget, key: &str) -> ApiResult<()> {
        self.bucket(budget, key, "take").await
    }

    async fn peek(&self, budget: Budget, key: &str) -> ApiResult<()> {
        self.bucket(budget, key, "peek").await
    }
}
