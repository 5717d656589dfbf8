//! A hybrid logical clock: Unix ms in the high bits, a counter in the low 16, never going back
//! and always past every timestamp it has observed — so a change made after seeing another gets
//! a greater timestamp even when this machine's clock is a little behind the other's. A version
//! is the timestamp as 16 hex digits and the writing region (`0189abcd…0001-b`): ordered as
//! text, it orders by time, then by region id, so two regions never tie.
//!
//! Observed timestamps more than `max_ahead` past this machine's clock are refused (not merged,
//! and counted): a region with a clock running far ahead cannot drag the others' clocks, and so
//! every later change everywhere, along with it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::domain::Timestamp;

const LOGICAL_BITS: u32 = 16;

pub struct Hlc {
    last: AtomicU64,
    region: String,
    max_ahead_ms: u64,
}

/// An observed timestamp too far ahead of this clock.
#[derive(Debug, PartialEq, Eq)]
pub struct TooFarAhead {
    pub ahead_ms: u64,
}

fn wall() -> u64 {
    (Timestamp::now().0.max(0) as u64) << LOGICAL_BITS
}

/// The timestamp and region of a version; `None` if it is not one.
pub fn parse_version(version: &str) -> Option<(u64, &str)> {
    let (ts, region) = version.split_at_checked(16)?;
    let region = region.strip_prefix('-')?;
    Some((u64::from_str_radix(ts, 16).ok()?, region))
}

impl Hlc {
    pub fn new(region: &str, max_ahead: Duration) -> Self {
        Self { last: AtomicU64::new(0), region: region.to_string(), max_ahead_ms: max_ahead.as_millis() as u64 }
    }

    /// A timestamp greater than every one this clock gave or observed.
    pub fn now(&self) -> u64 {
        let mut last = self.last.load(Ordering::Relaxed);
        loop {
            let next = wall().max(last + 1);
            match self.last.compare_exchange_weak(last, next, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return next,
                Err(seen) => last = seen,
            }
        }
    }

    /// The version of a change made here now.
    pub fn version(&self) -> String {
        format!("{:016x}-{}", self.now(), self.region)
    }

    /// Takes another region's version into account: later changes here get greater ones.
    /// Unparseable versions are ignored.
    pub fn observe(&self, version: &str) -> Result<(), TooFarAhead> {
        let Some((ts, _)) = parse_version(version) else { return Ok(()) };
        let (theirs, ours) = (ts >> LOGICAL_BITS, wall() >> LOGICAL_BITS);
        if theirs > ours + self.max_ahead_ms {
            return Err(TooFarAhead { ahead_ms: theirs - ours });
        }
        self.last.fetch_max(ts, Ordering::AcqRel);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_order_by_time_then_region() {
        let a = Hlc::new("a", Duration::from_millis(500));
        let b = Hlc::new("b", Duration::from_millis(500));
        let v1 = a.version();
        let v2 = b.version();
        let v3 = a.version();
        assert!(v1 < v3, "{v1} {v3}");
        // The same timestamp from two regions: the region id breaks the tie.
        let (t, _) = parse_version(&v2).unwrap();
        assert!(format!("{t:016x}-a") < format!("{t:016x}-b"));
        assert_eq!(parse_version(&v1).map(|(_, r)| r), Some("a"));
        assert_eq!(parse_version("nonsense"), None);
    }

    #[test]
    fn a_change_after_seeing_another_is_newer_even_with_a_slow_clock() {
        let here = Hlc::new("a", Duration::from_millis(500));
        // Another region's change 300 ms ahead of this clock (within the bound).
        let ahead = ((Timestamp::now().0 as u64 + 300) << LOGICAL_BITS) | 7;
        let theirs = format!("{ahead:016x}-b");
        here.observe(&theirs).unwrap();
        let mine = here.version();
        assert!(mine > theirs, "{mine} must order after {theirs}");
    }

    #[test]
    fn timestamps_too_far_ahead_are_refused_and_not_merged() {
        let here = Hlc::new("a", Duration::from_millis(500));
        let far = (Timestamp::now().0 as u64 + 60_000) << LOGICAL_BITS;
        let theirs = format!("{far:016x}-b");
        let err = here.observe(&theirs).unwrap_err();
        assert!(err.ahead_ms >= 59_000, "{err:?}");
        assert!(here.version() < theirs, "the refused timestamp moved this clock");
    }
}
