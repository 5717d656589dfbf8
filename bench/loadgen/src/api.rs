//! REST calls the scenarios share: a POST that rides out rate limits and instances going away,
//! and registering the load's users.

use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::{Value, json};

pub async fn rest(
    http: &reqwest::Client,
    url: &str,
    path: &str,
    body: Value,
    token: Option<&str>,
) -> anyhow::Result<Value> {
    // 429 (auth rate limit) and 5xx (an instance going away) are retried for up to 60 s.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut req = http.post(format!("{url}{path}")).json(&body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let res = req.send().await;
        match res {
            Ok(res) => {
                let status = res.status();
                let retry_after = res
                    .headers()
                    .get("retry-after")
                    .and_then(|h| h.to_str().ok())
                    .and_then(|s| s.parse::<u64>().ok())
                    .unwrap_or(1);
                let v: Value = res.json().await.unwrap_or(Value::Null);
                if status.is_success() {
                    return Ok(v);
                }
                if (status.as_u16() == 429 || status.is_server_error()) && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_secs(retry_after.min(5))).await;
                    continue;
                }
                bail!("{path}: {status} {v}");
            }
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Registers `n` users named `<prefix>_<i>`, a few at a time (Argon2 is slow by design); returns
/// their tokens in order.
pub async fn register_users(http: &reqwest::Client, url: &str, prefix: &str, n: usize) -> anyhow::Result<Vec<String>> {
    let mut tokens = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(8) {
        let futs = chunk.iter().map(|i| {
            let body = json!({"username": format!("{prefix}_{i}"), "password": "loadgen-password"});
            async move {
                let v = rest(http, url, "/api/v1/auth/register", body, None).await?;
                anyhow::Ok(v["token"].as_str().unwrap_or_default().to_string())
            }
        });
        for t in futures::future::join_all(futs).await {
            tokens.push(t?);
        }
    }
    Ok(tokens)
}
