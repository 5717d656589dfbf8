//! Circuit breakers around dependencies (Redis, the store): after `threshold` failures in a row the
//! circuit opens and calls fail fast for `cooldown`; then one probe is let through (half-open) and
//! its outcome closes or re-opens the circuit. The state is exported as
//! `chatmesh_circuit_open{dependency}` and folded into readiness.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::metrics as m;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    Closed,
    Open,
    HalfOpen,
}

struct Inner {
    state: CircuitState,
    failures: u32,
    opened_at: Instant,
}

pub struct CircuitBreaker {
    name: &'static str,
    threshold: u32,
    cooldown: Duration,
    // A std mutex: a few field updates, never held across an await.
    inner: Mutex<Inner>,
}

impl CircuitBreaker {
    pub fn new(name: &'static str, threshold: u32, cooldown: Duration) -> Self {
        metrics::gauge!(m::CIRCUIT_OPEN, "dependency" => name).set(0.0);
        Self {
            name,
            threshold: threshold.max(1),
            cooldown,
            inner: Mutex::new(Inner { state: CircuitState::Closed, failures: 0, opened_at: Instant::now() }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish(&self, state: CircuitState) {
        let open = if state == CircuitState::Closed { 0.0 } else { 1.0 };
        metrics::gauge!(m::CIRCUIT_OPEN, "dependency" => self.name).set(open);
    }

    /// Whether a call may go ahead now. While open, false until the cooldown ends; then exactly
    /// one caller gets true (the probe) and the others keep failing fast until it reports.
    pub fn allow(&self) -> bool {
        self.allow_at(Instant::now())
    }

    fn allow_at(&self, now: Instant) -> bool {
        let mut inner = self.lock();
        match inner.state {
            CircuitState::Closed => true,
            CircuitState::HalfOpen => false,
            CircuitState::Open if now.saturating_duration_since(inner.opened_at) >= self.cooldown => {
                inner.state = CircuitState::HalfOpen;
                true
            }
            CircuitState::Open => false,
        }
    }

    pub fn success(&self) {
        let mut inner = self.lock();
        let was = inner.state;
        inner.state = CircuitState::Closed;
        inner.failures = 0;
        if was != CircuitState::Closed {
            tracing::info!(dependency = self.name, "circuit closed");
            self.publish(CircuitState::Closed);
        }
    }

    pub fn failure(&self) {
        self.failure_at(Instant::now());
    }

    fn failure_at(&self, now: Instant) {
        let mut inner = self.lock();
        inner.failures += 1;
        let open = match inner.state {
            CircuitState::HalfOpen => true,
            CircuitState::Closed => inner.failures >= self.threshold,
            CircuitState::Open => false,
        };
        if open {
            inner.state = CircuitState::Open;
            inner.opened_at = now;
            tracing::warn!(dependency = self.name, failures = inner.failures, "circuit opened");
            self.publish(CircuitState::Open);
        }
    }

    pub fn state(&self) -> CircuitState {
        self.lock().state
    }

    pub fn is_open(&self) -> bool {
        self.state() != CircuitState::Closed
    }
}

/// The breakers of one instance.
pub struct Breakers {
    pub redis: CircuitBreaker,
    pub store: CircuitBreaker,
}

impl Default for Breakers {
    fn default() -> Self {
        Self {
            redis: CircuitBreaker::new("redis", 5, Duration::from_secs(1)),
            store: CircuitBreaker::new("store", 5, Duration::from_secs(2)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_fails_fast_probes_and_closes() {
        let b = CircuitBreaker::new("test", 3, Duration::from_secs(1));
        let t0 = Instant::now();
        for _ in 0..2 {
            b.failure_at(t0);
        }
        assert_eq!(b.state(), CircuitState::Closed, "below the threshold");
        b.failure_at(t0);
        assert_eq!(b.state(), CircuitState::Open);
        assert!(!b.allow_at(t0 + Duration::from_millis(500)), "fails fast during the cooldown");
        assert!(b.allow_at(t0 + Duration::from_secs(1)), "one probe after the cooldown");
        assert_eq!(b.state(), CircuitState::HalfOpen);
        assert!(!b.allow_at(t0 + Duration::from_secs(1)), "only one probe at a time");
        b.failure_at(t0 + Duration::from_secs(1));
        assert_eq!(b.state(), CircuitState::Open, "a failed probe re-opens");
        assert!(b.allow_at(t0 + Duration::from_secs(2)));
        b.success();
        assert_eq!(b.state(), CircuitState::Closed);
        assert!(b.allow());
    }

    #[test]
    fn a_success_resets_the_count() {
        let b = CircuitBreaker::new("test2", 2, Duration::from_secs(1));
        b.failure();
        b.success();
        b.failure();
        assert_eq!(b.state(), CircuitState::Closed);
    }
}
