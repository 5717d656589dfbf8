//! `floor`: what the kernel alone costs a server per delivery on this machine. One thread sends a
//! frame of a delivery's size to each of N loopback TCP connections in turn (one `send` each, as a
//! server does when every socket gets one message), while tokio tasks read the other ends as the
//! load generator's clients do. The sending thread's CPU per send is the floor under any server's
//! "CPU per delivered message" here: the TCP send, the loopback receive path the kernel runs in
//! the sender's context, and waking the reader.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::AsyncReadExt;

use crate::measure::thread_cpu_seconds;

#[derive(clap::Args)]
pub struct Params {
    /// Connections, each sent one frame per burst (a room's members).
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,
    /// Bytes per send: a `message:new` WebSocket frame of the benchmarks is ~236.
    #[arg(long, default_value_t = 236)]
    pub frame_bytes: usize,
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
}

pub async fn run(p: Params) -> anyhow::Result<Value> {
    anyhow::ensure!(p.connections > 0 && p.frame_bytes > 0, "bad parameters");
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let read = Arc::new(AtomicU64::new(0));
    let mut servers = Vec::with_capacity(p.connections);
    for _ in 0..p.connections {
        let client = tokio::net::TcpStream::connect(addr).await?;
        let (server, _) = listener.accept()?;
        server.set_nodelay(true)?;
        servers.push(server);
        let read = read.clone();
        tokio::spawn(async move {
            let mut client = client;
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = client.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                read.fetch_add(n as u64, Ordering::Relaxed);
            }
        });
    }
    let (frame_bytes, seconds) = (p.frame_bytes, p.seconds);
    let reader_count = read.clone();
    let (sends, cpu, bursts) =
        tokio::task::spawn_blocking(move || sender(servers, frame_bytes, seconds, &reader_count)).await??;
    let mut bursts = bursts;
    bursts.sort_unstable_by(f64::total_cmp);
    let p50_burst_ms = bursts.get(bursts.len() / 2).copied().unwrap_or(0.0);
    Ok(json!({
        "scenario": "floor",
        "connections": p.connections,
        "frame_bytes": p.frame_bytes,
        "sends": sends,
        "sender_cpu_seconds": cpu,
        "cpu_us_per_send": cpu * 1e6 / sends.max(1) as f64,
        "burst_ms_p50": p50_burst_ms,
    }))
}

/// Bursts of one send per connection; before each burst the readers have drained the last one,
/// so every send finds its reader waiting (as a delivery to an idle client does).
fn sender(
    mut servers: Vec<TcpStream>,
    frame_bytes: usize,
    seconds: f64,
    read: &AtomicU64,
) -> anyhow::Result<(u64, f64, Vec<f64>)> {
    let frame = vec![b'x'; frame_bytes];
    let mut sends = 0u64;
    let mut bursts = Vec::new();
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let cpu0 = thread_cpu_seconds();
    while Instant::now() < deadline {
        let started = Instant::now();
        for s in &mut servers {
            s.write_all(&frame)?;
        }
        bursts.push(started.elapsed().as_secs_f64() * 1e3);
        sends += servers.len() as u64;
        let want = sends * frame_bytes as u64;
        let wait_until = Instant::now() + Duration::from_secs(5);
        while read.load(Ordering::Relaxed) < want {
            anyhow::ensure!(Instant::now() < wait_until, "readers fell behind by more than 5 s");
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    Ok((sends, thread_cpu_seconds() - cpu0, bursts))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_send_is_counted_and_read() {
        let v = run(Params { connections: 20, frame_bytes: 100, seconds: 0.2 }).await.unwrap();
        let sends = v["sends"].as_u64().unwrap();
        assert!(sends >= 20 && sends % 20 == 0, "whole bursts only: {sends}");
        assert!(v["cpu_us_per_send"].as_f64().unwrap() >= 0.0);
    }

    #[test]
    fn this_thread_has_cpu_time() {
        // Spin until the counter moves (ticks of 10 ms), bounded in wall time: on a loaded
        // machine 60 ms of wall time can hold less than 20 ms on a core, so no fixed loop will do.
        let t0 = thread_cpu_seconds();
        let until = Instant::now() + Duration::from_secs(10);
        let mut x = 0u64;
        while thread_cpu_seconds() - t0 < 0.02 && Instant::now() < until {
            for _ in 0..100_000 {
                x = x.wrapping_add(std::hint::black_box(1));
            }
        }
        assert!(x > 0);
        assert!(thread_cpu_seconds() - t0 >= 0.02, "10 s of busy loop shows as at least 20 ms of thread CPU time");
    }
}
