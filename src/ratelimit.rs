//! Keyed token buckets: per-user send rate, per-IP auth attempts.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

struct Bucket {
    tokens: f64,
    last: Instant,
}

/// `rate` tokens per second refill, up to `burst`. Idle keys are swept so memory stays bounded by
/// the number of recently active keys.
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    // A std mutex: the critical section is a few float operations and never awaits.
    buckets: Mutex<HashMap<String, Bucket>>,
    last_sweep: Mutex<Instant>,
}

impl RateLimiter {
    pub fn new(rate_per_sec: f64, burst: f64) -> Self {
        Self {
            rate: rate_per_sec,
            burst: burst.max(1.0),
            buckets: Mutex::new(HashMap::new()),
            last_sweep: Mutex::new(Instant::now()),
        }
    }

    /// Takes one token for `key`; `Err(wait)` says how long until one is available.
    pub fn check(&self, key: &str) -> Result<(), Duration> {
        self.check_at(key, Instant::now())
    }

    /// Whether `key` has a token, without taking it; `Err(wait)` as [`check`](Self::check).
    pub fn peek(&self, key: &str) -> Result<(), Duration> {
        self.peek_at(key, Instant::now())
    }

    fn check_at(&self, key: &str, now: Instant) -> Result<(), Duration> {
        self.at(key, now, true)
    }

    fn peek_at(&self, key: &str, now: Instant) -> Result<(), Duration> {
        self.at(key, now, false)
    }

    fn at(&self, key: &str, now: Instant, take: bool) -> Result<(), Duration> {
        self.maybe_sweep(now);
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let b = buckets.entry(key.to_string()).or_insert(Bucket { tokens: self.burst, last: now });
        let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.rate).min(self.burst);
        b.last = now;
        if b.tokens >= 1.0 {
            if take {
                b.tokens -= 1.0;
            }
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / self.rate))
        }
    }

    fn maybe_sweep(&self, now: Instant) {
        let mut last = self.last_sweep.lock().unwrap_or_else(|p| p.into_inner());
        if now.saturating_duration_since(*last) < Duration::from_secs(60) {
            return;
        }
        *last = now;
        // A bucket idle long enough to be full again is the same as no bucket.
        let full_after = self.burst / self.rate;
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        buckets.retain(|_, b| now.saturating_duration_since(b.last).as_secs_f64() < full_after);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refill() {
        let l = RateLimiter::new(2.0, 4.0);
        let t0 = Instant::now();
        for _ in 0..4 {
            assert!(l.check_at("a", t0).is_ok());
        }
        let wait = l.check_at("a", t0).unwrap_err();
        assert!(wait <= Duration::from_millis(500) && wait > Duration::from_millis(400), "{wait:?}");
        assert!(l.check_at("b", t0).is_ok(), "keys are independent");
        assert!(l.check_at("a", t0 + Duration::from_millis(500)).is_ok());
        assert!(l.check_at("a", t0 + Duration::from_millis(500)).is_err());
    }

    #[test]
    fn peeking_takes_nothing() {
        let l = RateLimiter::new(1.0, 2.0);
        let t0 = Instant::now();
        for _ in 0..5 {
            assert!(l.peek_at("a", t0).is_ok());
        }
        assert!(l.check_at("a", t0).is_ok());
        assert!(l.check_at("a", t0).is_ok());
        assert!(l.peek_at("a", t0).is_err(), "both tokens taken");
    }
}
