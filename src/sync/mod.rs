//! Write-back sync: moving acknowledged messages from the cluster's Redis Streams into the durable
//! store. Embedded mode has nothing to sync (the sequencer writes the store directly).

pub mod redis;
pub mod retention;

use std::sync::atomic::{AtomicI64, Ordering};

/// Backlog figures, refreshed by the worker and read by readiness, metrics and `/api/v1/cluster`.
#[derive(Default)]
pub struct SyncStats {
    pending: AtomicI64,
    lag_ms: AtomicI64,
    /// When the figures were last refreshed (ms since epoch); 0 = never.
    refreshed_ms: AtomicI64,
}

impl SyncStats {
    pub fn pending(&self) -> i64 {
        self.pending.load(Ordering::Relaxed)
    }
    pub fn lag_ms(&self) -> i64 {
        self.lag_ms.load(Ordering::Relaxed)
    }
    pub fn refreshed_ms(&self) -> i64 {
        self.refreshed_ms.load(Ordering::Relaxed)
    }
    pub fn set(&self, pending: i64, lag_ms: i64, now_ms: i64) {
        self.pending.store(pending, Ordering::Relaxed);
        self.lag_ms.store(lag_ms, Ordering::Relaxed);
        self.refreshed_ms.store(now_ms, Ordering::Relaxed);
    }
}
