//! `idle`: N authenticated Socket.IO connections that only answer heartbeats, opened from several
//! loopback source addresses (127.0.0.1, .2, …: each has its own ~28k ephemeral ports). Measures
//! the server's resident memory before and after, per connection.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::api::register_users;
use crate::measure::{rss_bytes, self_cpu_seconds};
use crate::sio::{self, Events};

#[derive(clap::Args)]
pub struct Params {
    #[arg(long, default_value = "http://127.0.0.1:5001")]
    pub url: String,
    #[arg(long, default_value_t = 10_000)]
    pub connections: usize,
    /// Loopback source addresses to spread connections over.
    #[arg(long, default_value_t = 4)]
    pub sources: u8,
    /// Connections opening at once.
    #[arg(long, default_value_t = 256)]
    pub parallel: usize,
    /// How long to hold them once all are open (covers a heartbeat when ≥ 25 s).
    #[arg(long, default_value_t = 5.0)]
    pub hold_seconds: f64,
    #[arg(long)]
    pub server_pid: u32,
}

/// The i-th connection's source address: 127.0.0.1 … 127.0.0.<sources>.
pub fn source_of(i: usize, sources: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + (i % sources.max(1) as usize) as u8))
}

pub async fn run(p: Params) -> anyhow::Result<Value> {
    let http = reqwest::Client::new();
    let run =
        format!("{:x}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() % 0xffffff);
    let tokens = register_users(&http, &p.url, &format!("idle{run}"), 4).await?;
    // Let the server settle after registration before the baseline reading.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss0 = rss_bytes(p.server_pid).ok_or_else(|| anyhow::anyhow!("no process {}", p.server_pid))?;
    let (tx, mut rx) = mpsc::unbounded_channel::<(u32, String)>();
    tokio::spawn(async move { while rx.recv().await.is_some() {} });
    let started = Instant::now();
    let self0 = self_cpu_seconds();
    let mut opened = Opened::default();
    // In two halves, with a reading between: memory the server freed before the run (e.g. password
    // hashing during registration) stays resident and is reused by the first connections, so
    // (after - before) / N understates what a connection costs. The second half's growth does not.
    let half = p.connections / 2;
    opened.open(&p, &tokens, &tx, 0..half).await;
    let rss_half = rss_bytes(p.server_pid).ok_or_else(|| anyhow::anyhow!("server {} exited", p.server_pid))?;
    let open_half = opened.clients.len();
    opened.open(&p, &tokens, &tx, half..p.connections).await;
    let Opened { clients, failed, first_error } = opened;
    let connect_seconds = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs_f64(p.hold_seconds)).await;
    // Connections that died while idle (a missed heartbeat closes them) show in the reading.
    let rss1 = rss_bytes(p.server_pid).ok_or_else(|| anyhow::anyhow!("server {} exited", p.server_pid))?;
    let open = clients.len();
    let self1 = self_cpu_seconds();
    drop(clients);
    Ok(json!({
        "scenario": "idle",
        "connections": open,
        "failed": failed,
        "first_error": first_error,
        "sources": p.sources,
        "connect_seconds": connect_seconds,
        "hold_seconds": p.hold_seconds,
        "server_rss_before": rss0,
        "server_rss_after": rss1,
        "server_rss_per_connection": per_connection(rss0, rss1, open),
        "server_rss_half": rss_half,
        "connections_half": open_half,
        "server_rss_per_connection_second_half": per_connection(rss_half, rss1, open - open_half),
        "loadgen_cpu_seconds": self1 - self0,
    }))
}

#[derive(Default)]
struct Opened {
    clients: Vec<sio::Client>,
    failed: usize,
    first_error: Option<String>,
}

impl Opened {
    /// Opens connections `range` (at most `p.parallel` at once) and waits for all of them.
    async fn open(
        &mut self,
        p: &Params,
        tokens: &[String],
        tx: &mpsc::UnboundedSender<(u32, String)>,
        range: std::ops::Range<usize>,
    ) {
        let mut pending = FuturesUnordered::new();
        let mut next = range.start;
        while next < range.end || !pending.is_empty() {
            while next < range.end && pending.len() < p.parallel {
                let (url, token, tx) = (p.url.clone(), tokens[next % tokens.len()].clone(), tx.clone());
                let src = source_of(next, p.sources);
                let idx = next as u32;
                pending.push(
                    async move { sio::Client::connect_from(&url, &token, Some(src), Events::Raw(idx, tx)).await },
                );
                next += 1;
            }
            match pending.next().await {
                Some(Ok(c)) => self.clients.push(c),
                Some(Err(e)) => {
                    self.failed += 1;
                    self.first_error.get_or_insert_with(|| format!("{e:#}"));
                }
                None => {}
            }
        }
    }
}

/// Resident bytes added per connection between two readings (0 without connections).
fn per_connection(before: u64, after: u64, connections: usize) -> f64 {
    if connections == 0 { 0.0 } else { (after as f64 - before as f64) / connections as f64 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_cycle_over_loopback_addresses() {
        let ips: Vec<String> = (0..5).map(|i| source_of(i, 3).to_string()).collect();
        assert_eq!(ips, ["127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.1", "127.0.0.2"]);
        assert_eq!(source_of(7, 1).to_string(), "127.0.0.1");
    }

    #[test]
    fn per_connection_growth() {
        assert_eq!(per_connection(1000, 5000, 4), 1000.0);
        assert_eq!(per_connection(5000, 4000, 2), -500.0);
        assert_eq!(per_connection(1000, 5000, 0), 0.0);
    }
}
