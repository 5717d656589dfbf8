//! A minimal Socket.IO v5 / Engine.IO v4 client over WebSocket: just what a load generator needs
//! (auth on connect, events with acks, incoming events, ping/pong), with little per-message work.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, anyhow, bail};
use futures::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message as WsMessage;

type Acks = Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>>;

pub struct Client {
    out: mpsc::UnboundedSender<String>,
    acks: Acks,
    next_ack: AtomicU64,
    /// The reader task; aborted on drop so that dropping a `Client` closes its connection (the
    /// writer ends once every sender is gone, which drops the socket).
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// What the reader hands to the caller for every server event (`42["name", payload]`).
pub type EventSink = mpsc::UnboundedSender<(String, Value)>;

/// Where server events go: parsed, or as the raw frame text (`["name",{...}]`) for callers that
/// pick out a few fields themselves and must not spend the CPU on a full parse.
pub enum Events {
    Parsed(EventSink),
    /// Frames tagged with the caller's connection index.
    Raw(u32, mpsc::UnboundedSender<(u32, String)>),
}

impl Client {
    /// Connects to `base` (http://host:port), authenticates with `token`, and forwards every
    /// server event to `events`.
    pub async fn connect(base: &str, token: &str, events: EventSink) -> anyhow::Result<Self> {
        Self::connect_from(base, token, None, Events::Parsed(events)).await
    }

    /// As [`Client::connect`], from the local address `local` when given (several loopback
    /// source addresses give more than one address's worth of ephemeral ports).
    pub async fn connect_from(
        base: &str,
        token: &str,
        local: Option<std::net::IpAddr>,
        events: Events,
    ) -> anyhow::Result<Self> {
        let ws_url = format!("{}/socket.io/?EIO=4&transport=websocket", base.replacen("http", "ws", 1));
        let authority = base.split("://").nth(1).unwrap_or(base).trim_end_matches('/');
        let server: std::net::SocketAddr = tokio::net::lookup_host(authority)
            .await
            .with_context(|| format!("resolve {authority}"))?
            .next()
            .ok_or_else(|| anyhow!("no address for {authority}"))?;
        let socket = if server.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
        if let Some(ip) = local {
            socket.bind(std::net::SocketAddr::new(ip, 0)).with_context(|| format!("bind {ip}"))?;
        }
        let tcp = socket.connect(server).await.with_context(|| format!("connect {server}"))?;
        tcp.set_nodelay(true)?;
        // Small buffers: the idle scenario holds 100k of these in one process.
        let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
            .read_buffer_size(8 * 1024)
            .write_buffer_size(0);
        let (ws, _) = tokio_tungstenite::client_async_with_config(ws_url.as_str(), tcp, Some(config))
            .await
            .with_context(|| format!("websocket {ws_url}"))?;
        let (mut sink, mut stream) = ws.split();
        let open = next_text(&mut stream).await?;
        if !open.starts_with('0') {
            bail!("expected engine.io open packet, got {open:?}");
        }
        sink.send(WsMessage::text(format!("40{}", serde_json::json!({ "token": token })))).await?;
        let mut connect = next_text(&mut stream).await?;
        while connect == "2" {
            sink.send(WsMessage::text("3")).await?;
            connect = next_text(&mut stream).await?;
        }
        if let Some(err) = connect.strip_prefix("44") {
            bail!("connect_error: {err}");
        }
        if !connect.starts_with("40") {
            bail!("expected socket.io connect, got {connect:?}");
        }
        let (out, mut out_rx) = mpsc::unbounded_channel::<String>();
        tokio::spawn(async move {
            while let Some(frame) = out_rx.recv().await {
                if sink.send(WsMessage::text(frame)).await.is_err() {
                    break;
                }
            }
        });
        let acks: Acks = Arc::default();
        let reader_acks = acks.clone();
        let pong = out.clone();
        let reader = tokio::spawn(async move {
            while let Some(Ok(msg)) = stream.next().await {
                let WsMessage::Text(text) = msg else { continue };
                let text = text.as_str();
                if text == "2" {
                    let _ = pong.send("3".into());
                } else if let Some(rest) = text.strip_prefix("43") {
                    if let Some((id, payload)) = split_ack(rest)
                        && let Some(tx) = reader_acks.lock().await.remove(&id)
                    {
                        let _ = tx.send(payload);
                    }
                } else if let Some(rest) = text.strip_prefix("42") {
                    match &events {
                        Events::Raw(tag, tx) => {
                            let _ = tx.send((*tag, rest.to_string()));
                        }
                        Events::Parsed(tx) => {
                            if let Ok(Value::Array(mut parts)) = serde_json::from_str::<Value>(rest)
                                && parts.len() >= 2
                            {
                                let payload = parts.remove(1);
                                let name = parts[0].as_str().unwrap_or_default().to_string();
                                let _ = tx.send((name, payload));
                            }
                        }
                    }
                } else if text.starts_with('1') || text.starts_with("41") {
                    break;
                }
            }
            // Fail every pending ack: the connection is gone.
            reader_acks.lock().await.clear();
        });
        Ok(Self { out, acks, next_ack: AtomicU64::new(1), reader })
    }

    /// Emits `event` with `payload`; the receiver resolves with the ack's first argument.
    pub async fn emit(&self, event: &str, payload: &Value) -> anyhow::Result<oneshot::Receiver<Value>> {
        let id = self.next_ack.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.acks.lock().await.insert(id, tx);
        let frame = format!("42{id}{}", serde_json::to_string(&serde_json::json!([event, payload]))?);
        self.out.send(frame).map_err(|_| anyhow!("connection closed"))?;
        Ok(rx)
    }

    pub async fn call(&self, event: &str, payload: &Value) -> anyhow::Result<Value> {
        self.emit(event, payload).await?.await.map_err(|_| anyhow!("no ack for {event}: connection closed"))
    }
}

/// `<id>[payload, ...]` → (id, payload).
fn split_ack(rest: &str) -> Option<(u64, Value)> {
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    let id = rest[..digits].parse().ok()?;
    match serde_json::from_str::<Value>(&rest[digits..]).ok()? {
        Value::Array(mut parts) if !parts.is_empty() => Some((id, parts.swap_remove(0))),
        _ => None,
    }
}

async fn next_text<S>(stream: &mut S) -> anyhow::Result<String>
where
    S: StreamExt<Item = Result<WsMessage, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        match stream.next().await {
            Some(Ok(WsMessage::Text(t))) => return Ok(t.as_str().to_string()),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.into()),
            None => bail!("connection closed during handshake"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_acks() {
        let (id, v) = split_ack(r#"17[{"ok":true,"message":{"seq":3}}]"#).unwrap();
        assert_eq!(id, 17);
        assert_eq!(v["message"]["seq"], 3);
        assert!(split_ack("x[]").is_none());
        assert!(split_ack("5[]").is_none());
    }
}
