//! One way to start the real `chatmesh` binary for a test: its own port, its own data dir.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

pub struct TestApp {
    pub url: String,
    pub child: Child,
    /// Every line the instance wrote to stdout (its log), in order.
    pub logs: Arc<Mutex<Vec<String>>>,
    /// Every line it wrote to stderr (also passed through): where a panic in a task shows, while
    /// the process goes on.
    pub stderr: Arc<Mutex<Vec<String>>>,
    _own_dir: Option<tempfile::TempDir>,
    pub http: reqwest::Client,
}

#[derive(Default)]
pub struct Spawn<'a> {
    pub env: Vec<(&'a str, String)>,
    pub data_dir: Option<&'a Path>,
}

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_chatmesh")
}

/// Runs the binary with only `env` set (besides PATH/HOME) and returns (exit code, stderr).
pub fn run_to_exit(env: &[(&str, &str)], args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(binary())
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().copied())
        .output()
        .expect("run chatmesh");
    (out.status.code(), String::from_utf8_lossy(&out.stderr).to_string())
}

pub async fn spawn_app() -> TestApp {
    spawn_with(Spawn::default()).await
}

pub async fn spawn_with(opts: Spawn<'_>) -> TestApp {
    let (own_dir, data_dir) = match opts.data_dir {
        Some(d) => (None, d.to_path_buf()),
        None => {
            let t = tempfile::tempdir().expect("tempdir");
            let p = t.path().to_path_buf();
            (Some(t), p)
        }
    };
    let mut cmd = Command::new(binary());
    cmd.arg("serve")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "info")
        .env("CHATMESH_BIND", "127.0.0.1:0")
        .env("CHATMESH_STORE_URL", format!("sqlite://{}/chatmesh.db", data_dir.display()))
        .env("CHATMESH_LOG_FORMAT", "json")
        .env("CHATMESH_AUTH_RATE_PER_MIN", "100000")
        .env("CHATMESH_SEND_RATE_PER_SEC", "100000")
        .env("CHATMESH_ROOM_CHANGE_RATE_PER_MIN", "100000")
        .env("CHATMESH_DRAIN_DELAY_MS", "0");
    for (k, v) in &opts.env {
        cmd.env(k, v);
    }
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn chatmesh");
    let stdout = child.stdout.take().expect("stdout");
    let stderr = Arc::new(Mutex::new(Vec::new()));
    let (pipe, keep) = (child.stderr.take().expect("stderr"), stderr.clone());
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            eprintln!("{line}");
            keep.lock().unwrap().push(line);
        }
    });
    let (tx, rx) = mpsc::channel();
    let logs = Arc::new(Mutex::new(Vec::new()));
    let keep = logs.clone();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            keep.lock().unwrap().push(line.clone());
            if !sent
                && let Ok(v) = serde_json::from_str::<Value>(&line)
                && v["message"] == "listening"
            {
                let scheme = v["scheme"].as_str().unwrap_or("http").to_string();
                let _ = tx.send(format!("{scheme}://{}", v["addr"].as_str().unwrap_or_default()));
                sent = true;
            }
        }
    });
    let url = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(30)))
        .await
        .unwrap()
        .unwrap_or_else(|_| panic!("chatmesh did not log `listening` within 30 s"));
    TestApp {
        url,
        child,
        logs,
        stderr,
        _own_dir: own_dir,
        http: reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap(),
    }
}

pub struct Resp {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Resp {
    /// The API error code, asserting the error shape of API.md §1.
    pub fn code(&self) -> &str {
        assert!(self.body["error"]["message"].is_string(), "error shape: {}", self.body);
        self.body["error"]["code"].as_str().unwrap_or_else(|| panic!("not an error body: {}", self.body))
    }
}

impl TestApp {
    /// The log lines so far, once `done` holds for them or after 10 s (the log is written as
    /// things happen, a moment after the response).
    pub async fn logs_until(&self, done: impl Fn(&[String]) -> bool) -> Vec<String> {
        for _ in 0..100 {
            let lines = self.logs.lock().unwrap().clone();
            if done(&lines) {
                return lines;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        self.logs.lock().unwrap().clone()
    }

    pub async fn call(&self, method: Method, path: &str, body: Option<Value>, token: Option<&str>) -> Resp {
        let mut req = self.http.request(method, format!("{}{}", self.url, path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let res = req.send().await.expect("request");
        let status = res.status();
        let headers = res.headers().clone();
        let text = res.text().await.unwrap();
        let body =
            if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or(Value::String(text)) };
        Resp { status, headers, body }
    }

    pub async fn raw(&self, method: Method, path: &str, body: Vec<u8>, token: Option<&str>) -> Resp {
        let mut req = self.http.request(method, format!("{}{}", self.url, path)).body(body);
        req = req.header("content-type", "application/json");
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let res = req.send().await.expect("request");
        let status = res.status();
        let headers = res.headers().clone();
        let text = res.text().await.unwrap();
        Resp { status, headers, body: serde_json::from_str(&text).unwrap_or(Value::String(text)) }
    }

    /// Registers `username` and returns (user id, token).
    pub async fn register(&self, username: &str) -> (String, String) {
        let r = self
            .call(
                Method::POST,
                "/api/v1/auth/register",
                Some(json!({"username": username, "password": "password123"})),
                None,
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
        (r.body["user"]["id"].as_str().unwrap().to_string(), r.body["token"].as_str().unwrap().to_string())
    }

    pub async fn create_room(&self, token: &str, name: &str, visibility: &str) -> String {
        let r = self
            .call(Method::POST, "/api/v1/rooms", Some(json!({"name": name, "visibility": visibility})), Some(token))
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
        r.body["id"].as_str().unwrap().to_string()
    }

    pub async fn send(&self, token: &str, room: &str, cmid: &str, body: &str) -> Resp {
        self.call(
            Method::POST,
            &format!("/api/v1/rooms/{room}/messages"),
            Some(json!({"client_msg_id": cmid, "body": body})),
            Some(token),
        )
        .await
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill").args([&format!("-{sig}"), &self.child.id().to_string()]).status().unwrap();
        assert!(ok.success());
    }

    /// Waits for the process to exit and returns its exit code (None if killed by a signal).
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(std::time::Instant::now() < deadline, "chatmesh did not exit within {within:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
