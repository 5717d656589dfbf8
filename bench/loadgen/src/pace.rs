//! Open-loop pacing shared by the scenarios that send at a target rate.

use std::time::Duration;

use tokio::time::{Instant, Interval, MissedTickBehavior};

/// Where sender `index` of `count` starts within one `period`: the senders' phases spread evenly
/// over it.
pub fn phase_offset(period: Duration, index: usize, count: usize) -> Duration {
    period.mul_f64((index % count.max(1)) as f64 / count.max(1) as f64)
}

/// One tick per `period` for sender `index` of `count`, starting at its phase. Senders started
/// in phase send in bursts of `count` messages at once: at low rates the latency measured would
/// then be that of the bursts (one 1,000-member room and 8 senders: 8,000 frames at once every
/// period), not of the rate the step is labelled with.
pub fn phased_interval(period: Duration, index: usize, count: usize) -> Interval {
    let mut t = tokio::time::interval_at(Instant::now() + phase_offset(period, index, count), period);
    t.set_missed_tick_behavior(MissedTickBehavior::Burst);
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_are_spread_evenly_over_one_period() {
        let period = Duration::from_millis(100);
        let offsets: Vec<u128> = (0..4).map(|i| phase_offset(period, i, 4).as_millis()).collect();
        assert_eq!(offsets, [0, 25, 50, 75]);
        assert!((0..7).all(|i| phase_offset(period, i, 7) < period));
        assert_eq!(phase_offset(period, 3, 0), Duration::ZERO, "no senders: no offset, no panic");
    }

    #[tokio::test]
    async fn the_first_tick_waits_for_the_phase() {
        let start = Instant::now();
        let mut t = phased_interval(Duration::from_millis(40), 1, 2);
        let first = t.tick().await;
        assert!(first >= start + Duration::from_millis(20), "sender 1 of 2 starts half a period late");
    }
}
