//! Who decides each region's rooms: the lease `home:<region>` in the durable store, the one
//! component every region reaches (issue 17). Its holder is a region name; every instance of
//! that region renews it, and decides the rooms homed in `<region>` only while its last renewal
//! is younger than the lease time minus the drift margin (self-fencing: a region cut off from the
//! store stops acknowledging before another may take its rooms over). Another region takes them
//! over with `chatmesh region takeover` (`takeover`), which acquires the lease under the next
//! fencing token once it expired; a region then decides under a lease only once this region's
//! Redis holds the lease's token as its *marker* — written last by whoever made the epoch ready
//! (the takeover after fencing the rooms and moving their counters; this keeper when it
//! takes its own home's first lease, or takes back its own lapsed lease nobody else held).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use redis::AsyncCommands;

use super::takeover::Takeovers;
use crate::domain::Timestamp;
use crate::error::{ApiError, ApiResult};
use crate::metrics as m;
use crate::redis_io::{Keys, Redis};
use crate::store::{Epoch, Lease};

/// The lease that says who decides the rooms homed in `region`.
pub fn lease_name(region: &str) -> String {
    format!("home:{region}")
}

/// The home region a lease name is about (`home:a` -> `a`).
pub fn home_in(name: &str) -> Option<&str> {
    name.strip_prefix("home:")
}

/// Lease timing: how long a lease lasts and how much earlier than its expiry its holder stops
/// acting under it (clock rates differ; a renewal's answer takes time).
#[derive(Debug, Clone, Copy)]
pub struct LeaseTiming {
    pub ttl: Duration,
    pub margin: Duration,
    /// Automatic takeover: a home lease not renewed for this long (and lapsed past the margin)
    /// is taken over by this region (`None`: only by the operator's command).
    pub takeover_after: Option<Duration>,
}

impl LeaseTiming {
    /// Renewals per lease time: one missed renewal (a slow store) does not lose the lease.
    pub fn renew_every(&self) -> Duration {
        self.ttl / 4
    }

    /// Until when a renewal that started at `started` lets its holder act.
    pub fn valid_until(&self, started: Instant) -> Instant {
        started + self.ttl.saturating_sub(self.margin)
    }
}

struct Held {
    token: i64,
    until: Instant,
}

pub struct Homes {
    own: String,
    /// This instance (the holder of the singleton job leases it takes).
    instance: String,
    /// The store, this region's Redis and the lease timing; also what takeovers and step-downs
    /// run on.
    takeovers: Takeovers,
    /// Every home lease as last read: home region -> holder region.
    holders: RwLock<HashMap<String, Lease>>,
    /// The home leases this region decides under: home region -> token and validity.
    held: RwLock<HashMap<String, Held>>,
    /// When each held lease was last renewed (for the metrics).
    renewed: RwLock<HashMap<String, Instant>>,
    /// Homes a takeover or a step-down runs for on this instance now.
    busy: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl Homes {
    pub fn new(own: &str, instance: &str, takeovers: Takeovers) -> Self {
        Self {
            own: own.to_string(),
            instance: instance.to_string(),
            takeovers,
            holders: RwLock::default(),
            held: RwLock::default(),
            renewed: RwLock::default(),
            busy: Default::default(),
        }
    }

    /// The region that decides the rooms homed in `home`: the holder of its lease (even a lapsed
    /// one: nobody else took it yet), or `home` itself before anyone took a lease on it.
    pub fn holder_of(&self, home: &str) -> String {
        let holders = self.holders.read().unwrap_or_else(|e| e.into_inner());
        holders.get(home).map(|l| l.holder.clone()).unwrap_or_else(|| home.to_string())
    }

    /// The epoch under which this instance may decide the rooms homed in `home` now;
    /// `unavailable` when it may not (its lease lapsed or was taken, or a takeover is not done).
    /// Its `until_ms` is the validity on the wall clock: the sequencer checks it again right
    /// before the send script runs, and the script against Redis's clock.
    pub fn deciding(&self, home: &str) -> ApiResult<Epoch> {
        let held = self.held.read().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        match held.get(home) {
            Some(h) if now < h.until => {
                Ok(Epoch { token: h.token, until_ms: Timestamp::now().0 + (h.until - now).as_millis() as i64 })
            }
            _ => Err(ApiError::Unavailable(format!(
                "this region does not hold the lease on the rooms homed in `{home}` right now (it could not renew it, \
                 or another region took them over); retry"
            ))),
        }
    }

    /// Who decides whose rooms, as last read (for the cluster view and `/admin`): per home, the
    /// region holding its lease, the token, when the lease expires, and whether this instance
    /// decides under it now.
    pub fn view(&self) -> Vec<serde_json::Value> {
        let holders = self.holders.read().unwrap_or_else(|e| e.into_inner());
        let mut homes: Vec<_> = holders
            .iter()
            .map(|(home, l)| {
                serde_json::json!({
                    "home": home,
                    "decided_by": l.holder,
                    "token": l.token,
                    "expires_at": l.expires_at,
                    "deciding_here": self.deciding(home).is_ok(),
                })
            })
            .collect();
        homes.sort_by(|a, b| a["home"].as_str().cmp(&b["home"].as_str()));
        homes
    }

    /// Reads the leases and renews this region's once, then keeps doing so.
    pub async fn start(self: Arc<Self>) {
        self.tick().await;
        tokio::spawn(async move {
            let mut every = tokio::time::interval(self.takeovers.timing.renew_every());
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            every.tick().await;
            loop {
                every.tick().await;
                self.tick().await;
            }
        });
    }

    /// One round, bounded: a store that hangs (a cut link drops packets) must not stop the next
    /// round once it answers again.
    async fn tick(self: &Arc<Self>) {
        match tokio::time::timeout(self.takeovers.timing.ttl, self.round()).await {
            Err(_) => tracing::warn!("the home leases could not be read or renewed in time"),
            Ok(Some(leases)) => self.clone().follow_up(leases),
            Ok(None) => {}
        }
    }

    /// After a round, in the background (they may take a while): step down from homes another
    /// region took over from this one, and (automatic takeover) take over lapsed homes or finish
    /// a takeover of this region that did not complete.
    fn follow_up(self: Arc<Self>, leases: Vec<Lease>) {
        let now = Timestamp::now();
        for lease in leases {
            let Some(home) = home_in(&lease.name).map(str::to_string) else { continue };
            let job = if lease.holder != self.own {
                let unrenewed_ms = now.0 - (lease.expires_at.0 - self.takeovers.timing.ttl.as_millis() as i64);
                let lapsed = now.0 >= lease.expires_at.0 + self.takeovers.timing.margin.as_millis() as i64;
                let due =
                    self.takeovers.timing.takeover_after.is_some_and(|after| unrenewed_ms >= after.as_millis() as i64);
                if lapsed && due { Job::TakeOver } else { Job::StepDown(lease.token) }
            } else if home != self.own && self.takeovers.timing.takeover_after.is_some() && lease.expires_at.0 > now.0 {
                Job::Finish(lease.token)
            } else {
                continue;
            };
            if !self.busy.lock().unwrap_or_else(|e| e.into_inner()).insert(home.clone()) {
                continue;
            }
            let homes = self.clone();
            tokio::spawn(async move {
                homes.run(&home, job).await;
                homes.busy.lock().unwrap_or_else(|e| e.into_inner()).remove(&home);
            });
        }
    }

    async fn run(&self, home: &str, job: Job) {
        let name = lease_name(home);
        match job {
            Job::StepDown(token) => {
                // Only when this region decided under an older epoch (its marker) than the lease's.
                if self.marker(&name).await.is_none_or(|m| m >= token) {
                    return;
                }
                match self.takeovers.step_down(home, token).await {
                    Ok(done) => {
                        tracing::warn!(
                            home,
                            token,
                            rooms = done.rooms,
                            dropped = done.dropped,
                            "another region took over the rooms homed there: stepped down, catching up from it"
                        );
                        let mut conn = self.takeovers.redis.conn().await;
                        let _: redis::RedisResult<()> = conn.del(self.takeovers.keys.home_marker(&name)).await;
                    }
                    Err(e) => tracing::warn!(home, error = %e, "stepping down failed; retried next round"),
                }
            }
            Job::Finish(token) => {
                if self.marker(&name).await == Some(token) {
                    return;
                }
                self.take_over(home, "auto").await;
            }
            Job::TakeOver => self.take_over(home, "auto").await,
        }
    }

    /// A takeover by this region (one at a time: `take_over` holds the singleton lease
    /// `takeover:<home>` in the store).
    async fn take_over(&self, home: &str, how: &'static str) {
        match self.takeovers.take_over(home, &self.own, &self.instance).await {
            Ok(report) if !report.already_done => {
                metrics::counter!(m::TAKEOVERS, "home" => home.to_string(), "how" => how).increment(1);
                tracing::warn!(
                    home,
                    token = report.token,
                    rooms = report.rooms,
                    written_back = report.written_back,
                    dropped_beyond_gap = report.dropped_beyond_gap,
                    landed_past_held = report.landed_past_held,
                    "took over the rooms homed there (automatic takeover)"
                );
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(home, error = %e, "automatic takeover failed; retried next round"),
        }
    }

    async fn round(&self) -> Option<Vec<Lease>> {
        let started = Instant::now();
        // Before anything can fail: the age keeps growing while renewals do not happen.
        for (name, at) in self.renewed.read().unwrap_or_else(|e| e.into_inner()).iter() {
            metrics::gauge!(m::LEASE_RENEWED_AGE, "name" => name.clone()).set(at.elapsed().as_secs_f64());
        }
        let leases = match self.takeovers.store.leases().await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "the home leases could not be read; deciding stops when they lapse");
                return None;
            }
        };
        let now = Timestamp::now();
        // Homes whose region asked for its rooms back (a give-back): their leases lapse.
        let asked_back: Vec<&str> = leases
            .iter()
            .filter(|l| l.expires_at.0 > now.0)
            .filter_map(|l| l.name.strip_prefix("handback:").filter(|home| *home == l.holder))
            .collect();
        let homes: Vec<&Lease> = leases.iter().filter(|l| home_in(&l.name).is_some()).collect();
        {
            let mut holders = self.holders.write().unwrap_or_else(|e| e.into_inner());
            holders.clear();
            for l in &homes {
                holders.insert(home_in(&l.name).unwrap_or_default().to_string(), (*l).clone());
            }
        }
        let mut mine: Vec<Lease> = homes
            .iter()
            .filter(|l| l.holder == self.own)
            .filter(|l| !home_in(&l.name).is_some_and(|h| h != self.own && asked_back.contains(&h)))
            .map(|l| (*l).clone())
            .collect();
        if !homes.iter().any(|l| l.name == lease_name(&self.own)) {
            // This region's rooms were never leased: the first epoch is ours.
            if let Some(l) = self.take(&lease_name(&self.own)).await {
                mine.push(l);
            }
        }
        let mut kept = HashMap::new();
        for lease in mine {
            let Some(home) = home_in(&lease.name).map(str::to_string) else { continue };
            let renewed = if lease.expires_at.0 <= now.0 {
                // Lapsed (the store or every instance of this region was away) and nobody else
                // took it. This region's own home: take it back under a new token. Another
                // region's home it took over: only the takeover command may (its rooms must be
                // fenced before anyone decides them).
                if lease.name != lease_name(&self.own) {
                    tracing::warn!(lease = %lease.name, token = lease.token, "a home lease this region took over lapsed");
                    continue;
                }
                self.take(&lease.name).await
            } else {
                let ttl = self.takeovers.timing.ttl.as_millis() as i64;
                match self.takeovers.store.renew_lease(&lease.name, &self.own, lease.token, ttl, now).await {
                    Ok(Some(l)) => Some(l),
                    Ok(None) => {
                        tracing::warn!(lease = %lease.name, token = lease.token, "a home lease was lost before its renewal");
                        None
                    }
                    Err(e) => {
                        tracing::warn!(lease = %lease.name, error = %e, "a home lease could not be renewed");
                        None
                    }
                }
            };
            let Some(lease) = renewed else { continue };
            metrics::gauge!(m::LEASE_TOKEN, "name" => lease.name.clone()).set(lease.token as f64);
            self.renewed.write().unwrap_or_else(|e| e.into_inner()).insert(lease.name.clone(), Instant::now());
            metrics::gauge!(m::LEASE_RENEWED_AGE, "name" => lease.name.clone()).set(0.0);
            if self.marker(&lease.name).await == Some(lease.token) {
                kept.insert(home, Held { token: lease.token, until: self.takeovers.timing.valid_until(started) });
            }
        }
        let mut held = self.held.write().unwrap_or_else(|e| e.into_inner());
        for home in held.keys().filter(|h| !kept.contains_key(*h)) {
            tracing::warn!(home = %home, "no longer deciding the rooms homed there (lease lost or lapsed)");
        }
        for home in kept.keys().filter(|h| !held.contains_key(*h)) {
            tracing::info!(home = %home, "deciding the rooms homed there");
        }
        for home in held.keys().chain(kept.keys()) {
            let on = kept.contains_key(home);
            metrics::gauge!(m::LEASE_HELD, "name" => lease_name(home)).set(if on { 1.0 } else { 0.0 });
        }
        *held = kept;
        drop(held);
        Some(homes.into_iter().cloned().collect())
    }

    /// Acquires `name` for this region (a first epoch, or its own lapsed lease back) and marks
    /// the epoch ready at once: nobody else decided under it in between.
    async fn take(&self, name: &str) -> Option<Lease> {
        let ttl = self.takeovers.timing.ttl.as_millis() as i64;
        let lease = match self.takeovers.store.acquire_lease(name, &self.own, ttl, Timestamp::now()).await {
            Ok(Some(l)) => l,
            Ok(None) => return None,
            Err(e) => {
                tracing::warn!(lease = name, error = %e, "a home lease could not be acquired");
                return None;
            }
        };
        tracing::info!(lease = name, token = lease.token, "home lease acquired");
        set_marker(&self.takeovers.redis, &self.takeovers.keys, name, lease.token).await.ok()?;
        Some(lease)
    }

    async fn marker(&self, name: &str) -> Option<i64> {
        let mut conn = self.takeovers.redis.conn().await;
        conn.get::<_, Option<i64>>(self.takeovers.keys.home_marker(name)).await.ok().flatten()
    }
}

enum Job {
    /// Another region holds this region's home (or a home it took over before) under this token.
    StepDown(i64),
    /// This region holds the lease but its takeover did not complete (no marker).
    Finish(i64),
    /// The lease lapsed long enough ago: take it over.
    TakeOver,
}

/// Marks the epoch of `token` ready in this region's Redis: its instances decide under it.
pub async fn set_marker(redis: &Redis, keys: &Keys, name: &str, token: i64) -> ApiResult<()> {
    let mut conn = redis.conn().await;
    conn.set::<_, _, ()>(keys.home_marker(name), token).await.map_err(|e| {
        tracing::warn!(lease = name, error = %e, "the home lease marker could not be written");
        ApiError::Unavailable("Redis is unavailable; retry".into())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validity_ends_a_margin_before_the_lease() {
        let t = LeaseTiming { ttl: Duration::from_secs(10), margin: Duration::from_secs(2), takeover_after: None };
        let at = Instant::now();
        assert_eq!(t.valid_until(at) - at, Duration::from_secs(8));
        assert_eq!(t.renew_every(), Duration::from_millis(2500));
        let odd = LeaseTiming { ttl: Duration::from_secs(1), margin: Duration::from_secs(5), takeover_after: None };
        assert_eq!(odd.valid_until(at), at, "a margin past the lease time never lets its holder act");
    }

    #[test]
    fn names() {
        assert_eq!(lease_name("eu-1"), "home:eu-1");
        assert_eq!(home_in("home:eu-1"), Some("eu-1"));
        assert_eq!(home_in("repl:a:b"), None);
    }
}
