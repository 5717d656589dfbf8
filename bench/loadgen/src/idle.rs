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
    let mut clients = Vec::with_capacity(p.connections);
    let mut failed = 0usize;
    let mut first_error = None;
    let mut pending = FuturesUnordered::new();
    let mut next = 0usize;
    while next < p.connections || !pending.is_empty() {
        while next < p.connections && pending.len() < p.parallel {
            let (url, token, tx) = (p.url.clone(), tokens[next % tokens.len()].clone(), tx.clone());
            let src = source_of(next, p.sources);
            let idx = next as u32;
            pending.push(async move { sio::Client::connect_from(&url, &token, Some(src), Events::Raw(idx, tx)).await });
            next += 1;
        }
        match pending.next().await {
            Some(Ok(c)) => clients.push(c),
            Some(Err(e)) => {
                failed += 1;
                first_error.get_or_insert_with(|| format!("{e:#}"));
            }
            None => {}
        }
    }
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
        "server_rss_per_connection": if open == 0 { 0.0 } else { (rss1 as f64 - rss0 as f64) / open as f64 },
        "loadgen_cpu_seconds": self1 - self0,
    }))
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
}
