//! Real dependency processes for integration tests: Redis (single, replica set with Sentinels,
//! Cluster), a private PostgreSQL server and a private SecantusDB (MongoDB-wire) server, each on its
//! own free ports and in its own temp dir, started and killed by the test that owns it.
//!
//! Everything here is blocking (`std::process`): call it directly from a sync test, or through
//! `tokio::task::spawn_blocking` from an async one (and drop the fixture there too, or accept a
//! short blocking drop).
//!
//! Nothing is left behind:
//! - dropping a fixture kills its processes, waits for them, and removes its temp dir;
//! - every process is spawned by one long-lived thread with `PR_SET_PDEATHSIG = SIGKILL`, so it
//!   also dies when the test process dies without unwinding (abort, nextest timeout, SIGKILL);
//! - the temp dirs such a dead test process leaves (`$TMPDIR/chatmesh-fx-<pid>-*`) are removed by
//!   the next fixture that starts.
//!
//! A missing binary is a panic that says what to install, never a skip.

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::collections::hash_map::RandomState;
use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::hash::{BuildHasher, Hasher};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};
use std::{env, thread};

use tempfile::TempDir;

/// How long a server gets to answer after it is spawned.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a one-shot client command (`redis-cli`, `psql`) may run.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(15);
const POLL: Duration = Duration::from_millis(25);
const HOST: &str = "127.0.0.1";
const DIR_PREFIX: &str = "chatmesh-fx-";

mod sys {
    use std::ffi::c_int;

    pub const SIGINT: c_int = 2;
    pub const SIGQUIT: c_int = 3;
    pub const SIGKILL: c_int = 9;
    /// SIGKILL, as `prctl` takes it.
    pub const PDEATH_SIGNAL: std::ffi::c_ulong = 9;
    pub const ESRCH: i32 = 3;
    pub const PR_SET_PDEATHSIG: c_int = 1;

    // std links libc already; these are its plain POSIX/Linux entry points.
    unsafe extern "C" {
        pub safe fn kill(pid: c_int, sig: c_int) -> c_int;
        pub safe fn getppid() -> c_int;
        pub safe fn geteuid() -> u32;
        pub fn prctl(option: c_int, ...) -> c_int;
    }
}

// ---------------------------------------------------------------------------------------------
// Spawning processes that cannot outlive the test
// ---------------------------------------------------------------------------------------------

type SpawnRequest = (Command, mpsc::Sender<io::Result<Child>>);

/// Spawns `cmd` so that the child gets SIGKILL when this test process dies, however it dies.
///
/// `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits, not the process, so
/// every spawn goes through one thread that lives as long as the process (a `spawn_blocking`
/// thread of tokio's pool would exit after 10 s idle and take the server with it).
/// Use it for any process a test starts, e.g. the chatmesh nodes of a cluster test.
pub fn spawn_tied(cmd: Command) -> io::Result<Child> {
    static SPAWNER: OnceLock<mpsc::Sender<SpawnRequest>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        thread::Builder::new()
            .name("fixture-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(spawn_with_parent_death_signal(&mut cmd));
                }
            })
            .expect("start the fixture spawner thread");
        tx
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    spawner.send((cmd, reply_tx)).expect("fixture spawner thread is gone");
    reply_rx.recv().expect("fixture spawner thread is gone")
}

fn spawn_with_parent_death_signal(cmd: &mut Command) -> io::Result<Child> {
    let parent = i32::try_from(std::process::id()).expect("pid fits in pid_t");
    // SAFETY: the closure runs in the forked child before exec and only makes two
    // async-signal-safe syscalls; it allocates nothing. std runs it after setgid/setuid, so the
    // death signal is not reset by a `Command::uid` switch.
    unsafe {
        cmd.pre_exec(move || {
            if sys::prctl(sys::PR_SET_PDEATHSIG, sys::PDEATH_SIGNAL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The test process died between fork and prctl: don't start an orphan.
            if sys::getppid() != parent {
                return Err(io::Error::from_raw_os_error(sys::ESRCH));
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// Runs `cmd` to completion (stdin closed, output captured); kills it after `timeout`.
pub fn run_bounded(mut cmd: Command, timeout: Duration) -> io::Result<Output> {
    let shown = format!("{cmd:?}");
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = spawn_tied(cmd)?;
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = drain(child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let err = drain(child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(io::Error::new(io::ErrorKind::TimedOut, format!("{shown} did not finish within {timeout:?}")));
        }
        thread::sleep(Duration::from_millis(5));
    };
    Ok(Output { status, stdout: out.join().unwrap_or_default(), stderr: err.join().unwrap_or_default() })
}

/// Sends `signal` and waits up to `grace` for the child to exit; SIGKILLs it after that.
fn signal_and_wait(child: &mut Child, signal: i32, grace: Duration) -> Option<ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    if let Ok(pid) = i32::try_from(child.id()) {
        sys::kill(pid, signal);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) => thread::sleep(POLL),
            Err(_) => break,
        }
    }
    let _ = child.kill();
    child.wait().ok()
}

/// Live processes whose working directory is `dir` or inside it (a server `chdir`s to its data
/// dir, and its worker processes inherit that): the leak check for a fixture's processes.
pub fn processes_in(dir: &Path) -> Vec<u32> {
    let dir = dir.to_string_lossy().into_owned();
    let mut found = Vec::new();
    let Ok(entries) = fs::read_dir("/proc") else { return found };
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        if let Ok(cwd) = fs::read_link(entry.path().join("cwd")) {
            let cwd = cwd.to_string_lossy();
            if cwd == dir || cwd.starts_with(&format!("{dir}/")) || cwd.starts_with(&format!("{dir} ")) {
                found.push(pid);
            }
        }
    }
    found
}

/// Whether `pid` is a live (not zombie) process.
pub fn process_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the first field after the parenthesised command name.
        Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => false,
    }
}

// ---------------------------------------------------------------------------------------------
// Binaries, temp dirs, ports
// ---------------------------------------------------------------------------------------------

fn find_on_path(name: &str) -> Option<PathBuf> {
    env::split_paths(&env::var_os("PATH")?).map(|dir| dir.join(name)).find(|p| p.is_file())
}

/// The path of `name`, or a panic saying what to install. Fixtures never skip.
pub fn require_binary(name: &str, package: &str) -> PathBuf {
    find_on_path(name).unwrap_or_else(|| {
        panic!(
            "`{name}` is not installed (not found on PATH); these tests need it: \
             `apt-get install -y {package}` or `scripts/setup.sh --test`"
        )
    })
}

fn redis_server_bin() -> PathBuf {
    require_binary("redis-server", "redis-server")
}

fn redis_cli_bin() -> PathBuf {
    require_binary("redis-cli", "redis-tools")
}

/// A new temp dir `$TMPDIR/chatmesh-fx-<pid>-<kind>-XXXXXX` (canonical path), removed on drop.
fn fixture_dir(kind: &str) -> (TempDir, PathBuf) {
    sweep_stale_fixture_dirs();
    let dir = tempfile::Builder::new()
        .prefix(&format!("{DIR_PREFIX}{}-{kind}-", std::process::id()))
        .tempdir()
        .expect("create a fixture temp dir");
    let path = dir.path().canonicalize().expect("canonicalize the fixture temp dir");
    (dir, path)
}

/// Removes fixture temp dirs left by test processes that no longer exist (killed before their
/// fixtures could drop). Runs once per process, at the first fixture; callable directly too.
pub fn sweep_stale_fixture_dirs() {
    static SWEPT: OnceLock<()> = OnceLock::new();
    SWEPT.get_or_init(|| {
        let _ = remove_stale_fixture_dirs();
    });
}

/// The sweep itself, every time it is called; returns the dirs it removed.
pub fn remove_stale_fixture_dirs() -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let Ok(entries) = fs::read_dir(env::temp_dir()) else { return removed };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(DIR_PREFIX)) else { continue };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else { continue };
        if pid != std::process::id()
            && !Path::new(&format!("/proc/{pid}")).exists()
            && fs::remove_dir_all(entry.path()).is_ok()
        {
            removed.push(entry.path());
        }
    }
    removed
}

static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// A TCP port that is free on 127.0.0.1 now and was never handed out before in this process.
///
/// Ports are drawn at random from *below* the kernel's ephemeral range (10000..32768 on a default
/// Linux) rather than from `bind(127.0.0.1:0)`: an ephemeral port can be handed to any outgoing
/// connection's source port (redis-cli, replication links, Sentinel, the node's own reconnect
/// attempts) between our check and the server's bind, or between a `kill()` and a `restart()` on
/// the same port. Cross-process races that remain (another test binary picking the same port) are
/// handled by the fixtures, which retry a first start on a new port when the bind fails.
pub fn free_port() -> u16 {
    let (lo, hi) = port_range();
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..10_000 {
        let port = lo + u16::try_from(random_u64() % u64::from(hi - lo)).unwrap_or(0);
        if !handed_out.contains(&port) && TcpListener::bind((HOST, port)).is_ok() {
            handed_out.insert(port);
            return port;
        }
    }
    // A crowded machine: fall back to whatever the kernel offers.
    loop {
        let port = TcpListener::bind((HOST, 0)).and_then(|l| l.local_addr()).expect("bind 127.0.0.1:0").port();
        if handed_out.insert(port) {
            return port;
        }
    }
}

fn port_range() -> (u16, u16) {
    let ephemeral_low = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|n| n.parse::<u16>().ok()))
        .unwrap_or(32768);
    if ephemeral_low >= 12_000 { (10_000, ephemeral_low) } else { (ephemeral_low.max(1024), 65_535) }
}

fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.write_u32(std::process::id());
    hasher.finish()
}

fn open_log(path: &Path) -> File {
    OpenOptions::new().create(true).append(true).open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

fn read_log_from(path: &Path, offset: u64) -> String {
    let mut text = String::new();
    if let Ok(mut file) = File::open(path) {
        let _ = file.seek(SeekFrom::Start(offset));
        let mut bytes = Vec::new();
        let _ = file.read_to_end(&mut bytes);
        text = String::from_utf8_lossy(&bytes).into_owned();
    }
    text
}

fn log_len(path: &Path) -> u64 {
    fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// The last `lines` lines of a log, for panic messages.
fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

enum StartError {
    /// The port was taken between `free_port()` and the server's bind.
    AddrInUse,
    Failed(String),
}

// ---------------------------------------------------------------------------------------------
// A minimal RESP client (readiness probes and fixture bookkeeping; tests use `cli`)
// ---------------------------------------------------------------------------------------------

/// One Redis reply (RESP2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resp {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<String>),
    Array(Option<Vec<Resp>>),
}

impl Resp {
    /// The text of a simple string or a non-nil bulk string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Resp::Simple(s) | Resp::Bulk(Some(s)) => Some(s),
            _ => None,
        }
    }

    /// The items of a non-nil array.
    pub fn items(&self) -> &[Resp] {
        match self {
            Resp::Array(Some(items)) => items,
            _ => &[],
        }
    }
}

/// Sends `commands` pipelined on one connection to 127.0.0.1:`port` and reads one reply each.
/// Bounded: 500 ms to connect, 2 s per read.
pub fn redis_pipeline(port: u16, commands: &[&[&str]]) -> io::Result<Vec<Resp>> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut request = String::new();
    for args in commands {
        let _ = write!(request, "*{}\r\n", args.len());
        for arg in *args {
            let _ = write!(request, "${}\r\n{arg}\r\n", arg.len());
        }
    }
    (&stream).write_all(request.as_bytes())?;
    let mut reader = BufReader::new(&stream);
    commands.iter().map(|_| read_resp(&mut reader)).collect()
}

/// One command; see [`redis_pipeline`].
pub fn redis_command(port: u16, args: &[&str]) -> io::Result<Resp> {
    Ok(redis_pipeline(port, &[args])?.remove(0))
}

fn read_resp(reader: &mut impl BufRead) -> io::Result<Resp> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("bad RESP: {what}"));
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    let line = line.trim_end_matches(['\r', '\n']);
    let mut chars = line.chars();
    let kind = chars.next().ok_or_else(|| bad("empty line"))?;
    let rest = chars.as_str();
    let number = || rest.parse::<i64>().map_err(|_| bad(line));
    Ok(match kind {
        '+' => Resp::Simple(rest.to_string()),
        '-' => Resp::Error(rest.to_string()),
        ':' => Resp::Int(number()?),
        '$' => match usize::try_from(number()?) {
            Err(_) => Resp::Bulk(None),
            Ok(len) => {
                let mut buf = vec![0; len + 2];
                reader.read_exact(&mut buf)?;
                buf.truncate(len);
                Resp::Bulk(Some(String::from_utf8_lossy(&buf).into_owned()))
            }
        },
        '*' => match usize::try_from(number()?) {
            Err(_) => Resp::Array(None),
            Ok(len) => Resp::Array(Some((0..len).map(|_| read_resp(reader)).collect::<io::Result<_>>()?)),
        },
        _ => return Err(bad(line)),
    })
}

/// The `field:value` lines of an INFO reply.
fn info_field(info: &Resp, field: &str) -> Option<String> {
    info.as_str()?.lines().find_map(|l| l.strip_prefix(field)?.strip_prefix(':').map(|v| v.trim().to_string()))
}

/// `redis-cli -h 127.0.0.1 -p <port> <args>`: stdout without the trailing newline, or stderr.
/// Reply errors (`ERR ...`) come back as `Ok`, as redis-cli prints them on stdout.
fn redis_cli_at(port: u16, cluster: bool, args: &[&str]) -> Result<String, String> {
    let mut cmd = Command::new(redis_cli_bin());
    cmd.args(["-h", HOST, "-p", &port.to_string()]);
    if cluster {
        cmd.arg("-c");
    }
    cmd.args(args);
    let out = run_bounded(cmd, CLIENT_TIMEOUT).map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim_end_matches('\n').to_string())
    } else {
        Err(format!(
            "redis-cli -p {port} {args:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Polls `check` every 100 ms until it returns `Some`, or panics with `what()` after `timeout`.
fn wait_until<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>, what: impl FnOnce() -> String) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?}: {}", what());
        }
        thread::sleep(Duration::from_millis(100));
    }
}

// ---------------------------------------------------------------------------------------------
// One redis-server process (plain, replica, Sentinel or Cluster node)
// ---------------------------------------------------------------------------------------------

struct RedisNode {
    role: &'static str,
    port: u16,
    /// Everything after `redis-server`; the same on every restart.
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
    /// Set for a TLS-only node: probes go through `redis-cli --tls` with these.
    tls: Option<TlsAccess>,
}

impl RedisNode {
    /// Starts a node on a fresh free port; `args_for(port, log)` builds its command line (and may
    /// write a config file). If the port is taken by the time the server binds, tries another.
    fn launch(role: &'static str, dir: &Path, args_for: impl FnMut(u16, &Path) -> Vec<String>) -> RedisNode {
        Self::launch_with(role, dir, None, args_for)
    }

    /// As [`launch`](Self::launch); with `tls`, the node's port is its TLS port and the
    /// readiness probe speaks TLS as that user.
    fn launch_with(
        role: &'static str,
        dir: &Path,
        tls: Option<TlsAccess>,
        mut args_for: impl FnMut(u16, &Path) -> Vec<String>,
    ) -> RedisNode {
        let mut tried = Vec::new();
        for _ in 0..8 {
            let port = free_port();
            let log = dir.join(format!("{role}-{port}.log"));
            let args = args_for(port, &log);
            let mut node = RedisNode { role, port, args, log, child: None, tls: tls.clone() };
            match node.try_start() {
                Ok(()) => return node,
                Err(StartError::AddrInUse) => tried.push(port),
                Err(StartError::Failed(msg)) => panic!("{msg}"),
            }
        }
        panic!("{role}: every port tried was taken before redis-server could bind it: {tried:?}")
    }

    fn try_start(&mut self) -> Result<(), StartError> {
        assert!(self.child.is_none(), "{} on port {} is already running", self.role, self.port);
        let offset = log_len(&self.log);
        let log = open_log(&self.log);
        let mut cmd = Command::new(redis_server_bin());
        cmd.args(&self.args).stdin(Stdio::null()).stdout(log.try_clone().expect("dup log fd")).stderr(log);
        let child = spawn_tied(cmd).map_err(|e| StartError::Failed(format!("spawn redis-server: {e}")))?;
        let pid = child.id();
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.child = None;
                let text = read_log_from(&self.log, offset);
                if text.contains("Address already in use") {
                    return Err(StartError::AddrInUse);
                }
                return Err(StartError::Failed(format!(
                    "{} on port {} exited ({status}) before answering PING; {}:\n{}",
                    self.role,
                    self.port,
                    self.log.display(),
                    tail(&text, 40)
                )));
            }
            // INFO proves the server on the port is ours (not one that won the bind race); PING
            // proves it serves commands (a server loading its AOF answers -LOADING).
            let ready = match &self.tls {
                None => redis_pipeline(self.port, &[&["INFO", "server"], &["PING"]]).is_ok_and(|replies| {
                    info_field(&replies[0], "process_id") == Some(pid.to_string())
                        && replies[1] == Resp::Simple("PONG".into())
                }),
                Some(access) => {
                    access
                        .cli(self.port, &["INFO", "server"])
                        .is_ok_and(|info| info.lines().any(|l| l.trim() == format!("process_id:{pid}")))
                        && access.cli(self.port, &["PING"]).as_deref() == Ok("PONG")
                }
            };
            if ready {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(StartError::Failed(format!(
                    "{} on port {} did not answer PING within {START_TIMEOUT:?}; {}:\n{}",
                    self.role,
                    self.port,
                    self.log.display(),
                    tail(&read_log_from(&self.log, offset), 40)
                )));
            }
            thread::sleep(POLL);
        }
    }

    /// Starts the node again on its own port with its own arguments.
    fn start_again(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match self.try_start() {
                Ok(()) => return,
                // Someone holds our port (a client socket's source port, a straggler): wait a bit.
                Err(StartError::AddrInUse) if Instant::now() < deadline => thread::sleep(Duration::from_millis(200)),
                Err(StartError::AddrInUse) => panic!("{} could not bind its port {} again", self.role, self.port),
                Err(StartError::Failed(msg)) => panic!("{msg}"),
            }
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn is_running(&mut self) -> bool {
        match self.child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(None)) => true,
            Some(_) => {
                self.child = None;
                false
            }
            None => false,
        }
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn log_text(&self) -> String {
        read_log_from(&self.log, 0)
    }
}

impl Drop for RedisNode {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `redis-server` arguments for a throwaway data node.
fn redis_args(port: u16, dir: &Path, log: &Path, appendonly: bool) -> Vec<String> {
    let mut args: Vec<String> = [
        "--port",
        &port.to_string(),
        "--bind",
        HOST,
        "--save",
        "",
        "--appendonly",
        if appendonly { "yes" } else { "no" },
        "--dir",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push(dir.display().to_string());
    args.extend(["--daemonize", "no", "--logfile"].map(String::from));
    args.push(log.display().to_string());
    args
}

// ---------------------------------------------------------------------------------------------
// RedisServer
// ---------------------------------------------------------------------------------------------

/// One throwaway `redis-server` (no persistence) on a free port.
pub struct RedisServer {
    node: RedisNode,
    dir_path: PathBuf,
    _dir: TempDir,
}

impl RedisServer {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts with extra `redis-server` arguments (`&["--maxmemory", "10mb"]`); they come last,
    /// so they override the defaults (`--appendonly yes` turns persistence on).
    pub fn start_with(args: &[&str]) -> Self {
        let (dir, dir_path) = fixture_dir("redis");
        let extra: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let node = RedisNode::launch("redis", &dir_path, |port, log| {
            let mut all = redis_args(port, &dir_path, log, false);
            all.extend(extra.iter().cloned());
            all
        });
        RedisServer { node, dir_path, _dir: dir }
    }

    pub fn port(&self) -> u16 {
        self.node.port
    }

    /// `redis://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("redis://{HOST}:{}", self.node.port)
    }

    /// The server's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.node.pid()
    }

    pub fn is_running(&mut self) -> bool {
        self.node.is_running()
    }

    /// SIGKILL, then wait for it. No-op if it is not running.
    pub fn kill(&mut self) {
        self.node.kill();
    }

    /// Kills it if running and starts it again on the same port with the same arguments. Without
    /// persistence (the default) every key is gone afterwards.
    pub fn restart(&mut self) {
        self.node.kill();
        self.node.start_again();
    }

    /// `redis-cli -p <port> <args>`: its stdout, trailing newline removed. Panics if redis-cli
    /// fails (e.g. cannot connect); a reply error comes back as text (`ERR ...`).
    pub fn cli(&self, args: &[&str]) -> String {
        redis_cli_at(self.node.port, false, args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`cli`](Self::cli), but a failing redis-cli is an `Err` (for outage checks).
    pub fn try_cli(&self, args: &[&str]) -> Result<String, String> {
        redis_cli_at(self.node.port, false, args)
    }

    /// The temp dir (`--dir`), removed on drop.
    pub fn dir(&self) -> &Path {
        &self.dir_path
    }

    /// Everything the server logged so far, across restarts.
    pub fn log(&self) -> String {
        self.node.log_text()
    }
}

// ---------------------------------------------------------------------------------------------
// RedisReplicaSet: primary + replica + 3 Sentinels
// ---------------------------------------------------------------------------------------------

/// Settings for [`RedisReplicaSet::start_with`].
#[derive(Debug, Clone)]
pub struct ReplicaSetOptions {
    /// The Sentinel master name (the path of [`RedisReplicaSet::sentinel_url`]).
    pub master_name: String,
    /// `--appendonly yes --min-replicas-to-write 1` on both data nodes: a write is refused
    /// (`NOREPLICAS`) unless a replica is connected. After a failover the promoted node has no
    /// replica until the old primary is back (`restart_node`, then Sentinel makes it a replica).
    pub durable: bool,
    /// More `redis-server` arguments for both data nodes (e.g. `--min-replicas-max-lag 2`).
    pub extra_args: Vec<String>,
}

impl Default for ReplicaSetOptions {
    fn default() -> Self {
        ReplicaSetOptions { master_name: "chatmesh".to_string(), durable: false, extra_args: Vec::new() }
    }
}

/// A primary, one replica (`--replicaof`) and three Sentinels (quorum 2, `down-after-milliseconds
/// 1000`, `failover-timeout 3000`), each on its own free port. `start` returns once the replica is
/// in sync and every Sentinel knows the replica and the two other Sentinels, so a failover can
/// start as soon as the primary goes.
pub struct RedisReplicaSet {
    master_name: String,
    sentinels: Vec<RedisNode>,
    /// The data nodes; index 0 was the primary at start.
    nodes: Vec<RedisNode>,
    /// The primary as far as this fixture knows (updated by `wait_for_failover`).
    primary: u16,
    dir_path: PathBuf,
    _dir: TempDir,
}

impl RedisReplicaSet {
    pub fn start() -> Self {
        Self::start_with(ReplicaSetOptions::default())
    }

    pub fn start_with(options: ReplicaSetOptions) -> Self {
        let (dir, dir_path) = fixture_dir("sentinel");
        let name = options.master_name.clone();
        assert!(
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
            "master name {name:?}: use [A-Za-z0-9_-]"
        );
        let data_args = |port: u16, log: &Path| {
            let mut args = redis_args(port, &dir_path, log, options.durable);
            // Each node its own AOF dir inside the shared temp dir; a replica's full sync starts at
            // once instead of after the default 5 s wait for more replicas.
            args.extend(["--appenddirname".to_string(), format!("aof-{port}")]);
            args.extend(["--repl-diskless-sync-delay", "0"].map(String::from));
            if options.durable {
                args.extend(["--min-replicas-to-write", "1"].map(String::from));
            }
            args.extend(options.extra_args.iter().cloned());
            args
        };
        let primary = RedisNode::launch("redis-primary", &dir_path, data_args);
        let primary_port = primary.port;
        let replica = RedisNode::launch("redis-replica", &dir_path, |port, log| {
            let mut args = data_args(port, log);
            args.extend(["--replicaof".to_string(), HOST.to_string(), primary_port.to_string()]);
            args
        });
        let replica_port = replica.port;
        wait_until(
            START_TIMEOUT,
            || {
                let info = redis_command(replica_port, &["INFO", "replication"]).ok()?;
                (info_field(&info, "master_link_status").as_deref() == Some("up")).then_some(())
            },
            || {
                format!(
                    "replica {replica_port} never synced with primary {primary_port}:\n{}",
                    tail(&replica.log_text(), 30)
                )
            },
        );

        let mut sentinels = Vec::new();
        for _ in 0..3 {
            sentinels.push(RedisNode::launch("sentinel", &dir_path, |port, log| {
                let conf = dir_path.join(format!("sentinel-{port}.conf"));
                let text = format!(
                    "port {port}\nbind {HOST}\ndaemonize no\ndir {dir}\nlogfile {log}\n\
                     sentinel monitor {name} {HOST} {primary_port} 2\n\
                     sentinel down-after-milliseconds {name} 1000\n\
                     sentinel failover-timeout {name} 3000\n\
                     sentinel parallel-syncs {name} 1\n",
                    dir = dir_path.display(),
                    log = log.display(),
                );
                fs::write(&conf, text).expect("write sentinel.conf");
                vec![conf.display().to_string(), "--sentinel".to_string()]
            }));
        }
        let set = RedisReplicaSet {
            master_name: name,
            sentinels,
            nodes: vec![primary, replica],
            primary: primary_port,
            dir_path,
            _dir: dir,
        };
        for sentinel in &set.sentinels {
            let port = sentinel.port;
            wait_until(
                Duration::from_secs(15),
                || {
                    let fields = sentinel_master_fields(port, &set.master_name)?;
                    (fields.get("num-slaves").map(String::as_str) == Some("1")
                        && fields.get("num-other-sentinels").map(String::as_str) == Some("2"))
                    .then_some(())
                },
                || format!("sentinel {port} never saw the replica and both other Sentinels\n{}", set.sentinel_logs()),
            );
        }
        set
    }

    pub fn master_name(&self) -> &str {
        &self.master_name
    }

    /// `redis+sentinel://127.0.0.1:S1,127.0.0.1:S2,127.0.0.1:S3/<master name>`
    pub fn sentinel_url(&self) -> String {
        let hosts: Vec<String> = self.sentinels.iter().map(|s| format!("{HOST}:{}", s.port)).collect();
        format!("redis+sentinel://{}/{}", hosts.join(","), self.master_name)
    }

    pub fn sentinel_ports(&self) -> Vec<u16> {
        self.sentinels.iter().map(|s| s.port).collect()
    }

    /// The data nodes' ports; the first was the primary at start.
    pub fn node_ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    /// The primary as this fixture knows it: the initial one, or the one `wait_for_failover`
    /// returned last.
    pub fn primary_port(&self) -> u16 {
        self.primary
    }

    /// The first data node that is not the primary.
    pub fn replica_port(&self) -> u16 {
        self.nodes.iter().map(|n| n.port).find(|&p| p != self.primary).expect("a replica")
    }

    /// `redis://127.0.0.1:<port>` of a data node.
    pub fn url_of(&self, port: u16) -> String {
        format!("redis://{HOST}:{port}")
    }

    /// What the Sentinels answer to `SENTINEL get-master-addr-by-name`, if all running ones agree.
    pub fn sentinel_primary_port(&self) -> Option<u16> {
        let mut agreed = None;
        for sentinel in self.sentinels.iter().filter(|s| s.child.is_some()) {
            let reply =
                redis_command(sentinel.port, &["SENTINEL", "get-master-addr-by-name", &self.master_name]).ok()?;
            let port: u16 = reply.items().get(1)?.as_str()?.parse().ok()?;
            if agreed.is_some_and(|p| p != port) {
                return None;
            }
            agreed = Some(port);
        }
        agreed
    }

    /// SIGKILLs the current primary (and waits for it); returns its port.
    pub fn kill_primary(&mut self) -> u16 {
        let port = self.primary;
        self.kill_node(port);
        port
    }

    /// SIGKILLs a data node.
    pub fn kill_node(&mut self, port: u16) {
        self.node_mut(port).kill();
    }

    /// Starts a killed data node again, same port and arguments. A node that was the primary
    /// comes back as a primary (empty unless durable), and the Sentinels turn it into a replica
    /// of the current primary some seconds later.
    pub fn restart_node(&mut self, port: u16) {
        let node = self.node_mut(port);
        node.kill();
        node.start_again();
    }

    /// Waits until every running Sentinel names a primary other than `primary_port()` (the one
    /// killed) and that node reports `role:master`; returns its port and makes it `primary_port()`.
    /// Panics with the Sentinel logs after `timeout`.
    pub fn wait_for_failover(&mut self, timeout: Duration) -> u16 {
        let old = self.primary;
        let new = wait_until(
            timeout,
            || {
                let port = self.sentinel_primary_port().filter(|&p| p != old)?;
                let role = redis_command(port, &["ROLE"]).ok()?;
                (role.items().first()?.as_str()? == "master").then_some(port)
            },
            || format!("no failover away from primary {old}\n{}", self.sentinel_logs()),
        );
        self.primary = new;
        new
    }

    /// `redis-cli -p <port> <args>` against any node of the set (data node or Sentinel).
    pub fn cli(&self, port: u16, args: &[&str]) -> String {
        redis_cli_at(port, false, args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`cli`](Self::cli) against the current primary.
    pub fn primary_cli(&self, args: &[&str]) -> String {
        self.cli(self.primary, args)
    }

    /// Runs a write on the current primary, then `WAIT 1` on the same connection, and returns the
    /// write's reply and how many replicas acknowledged it. WAIT counts acknowledgements of the
    /// calling connection's own writes: on a fresh connection it waits for nothing.
    pub fn primary_write_replicated(&self, args: &[&str]) -> (String, i64) {
        let replies = redis_pipeline(self.primary, &[args, &["WAIT", "1", "1500"]])
            .unwrap_or_else(|e| panic!("{args:?} then WAIT on primary {}: {e}", self.primary));
        let reply = match &replies[0] {
            Resp::Error(e) => e.clone(),
            other => other.as_str().unwrap_or_default().to_string(),
        };
        match replies[1] {
            Resp::Int(acked) => (reply, acked),
            ref other => panic!("WAIT answered {other:?}"),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir_path
    }

    /// The tails of the Sentinels' logs, for failure messages.
    pub fn sentinel_logs(&self) -> String {
        let mut out = String::new();
        for s in &self.sentinels {
            // Sentinels note every config save; the events (+sdown, +switch-master...) are what
            // explains a failover.
            let events: String =
                s.log_text().lines().filter(|l| !l.contains("configuration saved")).collect::<Vec<_>>().join("\n");
            let _ = writeln!(out, "--- sentinel {} ---\n{}", s.port, tail(&events, 60));
        }
        out
    }

    /// The tails of every data node's and Sentinel's log, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for n in &self.nodes {
            let _ = writeln!(out, "--- data node {} ---\n{}", n.port, tail(&n.log_text(), 60));
        }
        out + &self.sentinel_logs()
    }

    fn node_mut(&mut self, port: u16) -> &mut RedisNode {
        self.nodes.iter_mut().find(|n| n.port == port).unwrap_or_else(|| panic!("no data node on port {port}"))
    }
}

/// `SENTINEL MASTER <name>` as a field map.
fn sentinel_master_fields(port: u16, name: &str) -> Option<std::collections::HashMap<String, String>> {
    let reply = redis_command(port, &["SENTINEL", "MASTER", name]).ok()?;
    let items = reply.items();
    Some(
        items
            .chunks(2)
            .filter_map(|kv| Some((kv.first()?.as_str()?.to_string(), kv.get(1)?.as_str()?.to_string())))
            .collect(),
    )
}

// ---------------------------------------------------------------------------------------------
// RedisCluster: three primaries, no replicas
// ---------------------------------------------------------------------------------------------

/// A Redis Cluster of three primaries (no replicas) on free ports; each node's cluster bus is on a
/// second free port (`--cluster-port`). `start` returns once every node says `cluster_state:ok`.
pub struct RedisCluster {
    nodes: Vec<RedisNode>,
    dir_path: PathBuf,
    _dir: TempDir,
}

impl RedisCluster {
    pub fn start() -> Self {
        let (dir, dir_path) = fixture_dir("cluster");
        let mut nodes = Vec::new();
        for _ in 0..3 {
            nodes.push(RedisNode::launch("cluster", &dir_path, |port, log| {
                let mut args = redis_args(port, &dir_path, log, false);
                args.extend([
                    "--cluster-enabled".to_string(),
                    "yes".to_string(),
                    "--cluster-config-file".to_string(),
                    dir_path.join(format!("nodes-{port}.conf")).display().to_string(),
                    "--cluster-port".to_string(),
                    free_port().to_string(),
                    "--cluster-node-timeout".to_string(),
                    "2000".to_string(),
                ]);
                args
            }));
        }
        let mut cmd = Command::new(redis_cli_bin());
        cmd.arg("--cluster").arg("create");
        cmd.args(nodes.iter().map(|n| format!("{HOST}:{}", n.port)));
        cmd.args(["--cluster-replicas", "0", "--cluster-yes"]);
        let out =
            run_bounded(cmd, Duration::from_secs(30)).unwrap_or_else(|e| panic!("redis-cli --cluster create: {e}"));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("[OK] All 16384 slots covered"),
            "redis-cli --cluster create failed ({}):\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = RedisCluster { nodes, dir_path, _dir: dir };
        for node in &cluster.nodes {
            let port = node.port;
            wait_until(
                Duration::from_secs(15),
                || {
                    let info = redis_command(port, &["CLUSTER", "INFO"]).ok()?;
                    (info_field(&info, "cluster_state").as_deref() == Some("ok")).then_some(())
                },
                || format!("cluster node {port} never reached cluster_state:ok:\n{}", tail(&node.log_text(), 30)),
            );
        }
        cluster
    }

    /// `redis://127.0.0.1:<port>` of each node.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| format!("redis://{HOST}:{}", n.port)).collect()
    }

    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    /// `redis-cli -c` (follows MOVED/ASK) against the first node.
    pub fn cli(&self, args: &[&str]) -> String {
        self.node_cli(0, args)
    }

    /// `redis-cli -c` against node `index` (0..3).
    pub fn node_cli(&self, index: usize, args: &[&str]) -> String {
        redis_cli_at(self.nodes[index].port, true, args).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn dir(&self) -> &Path {
        &self.dir_path
    }
}

// ---------------------------------------------------------------------------------------------
// PgServer
// ---------------------------------------------------------------------------------------------

/// A private PostgreSQL server (trust auth, user `postgres`, fsync off) in its own temp dir, on a
/// free port, for outage tests. The postmaster is run directly as a child (not through `pg_ctl`),
/// so the fixture has its pid to signal and wait for and the parent-death signal covers it. As
/// root, initdb and the server run as the `postgres` OS user (PostgreSQL refuses root).
pub struct PgServer {
    port: u16,
    bindir: PathBuf,
    data: PathBuf,
    log: PathBuf,
    /// (uid, gid) to run the server as, when we are root.
    owner: Option<(u32, u32)>,
    /// More `-c name=value` settings, on every start.
    settings: Vec<String>,
    child: Option<Child>,
    dir_path: PathBuf,
    _dir: TempDir,
}

impl PgServer {
    /// `initdb` a new cluster and start it on a free port.
    pub fn start() -> Self {
        Self::start_with(|_| {})
    }

    /// A server with TLS on (`ssl=on`, this certificate and key) and `hba` as its whole
    /// `pg_hba.conf` (e.g. `hostssl all all 127.0.0.1/32 trust` + `hostnossl all all 0.0.0.0/0 reject`
    /// to refuse plaintext).
    pub fn start_tls(cert: &Path, key: &Path, hba: &str) -> Self {
        Self::start_with(|server| {
            // PostgreSQL refuses a key another user could read, and it runs as `postgres` here.
            for (from, name, mode) in [(cert, "server.crt", 0o644), (key, "server.key", 0o600)] {
                let to = server.dir_path.join(name);
                fs::copy(from, &to).unwrap_or_else(|e| panic!("copy {} to {}: {e}", from.display(), to.display()));
                fs::set_permissions(&to, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
                if let Some((uid, gid)) = server.owner {
                    std::os::unix::fs::chown(&to, Some(uid), Some(gid)).unwrap();
                }
                server.settings.push(format!(
                    "{}={}",
                    if name.ends_with(".crt") { "ssl_cert_file" } else { "ssl_key_file" },
                    to.display()
                ));
            }
            server.settings.push("ssl=on".to_string());
            fs::write(server.data.join("pg_hba.conf"), hba).expect("write pg_hba.conf");
        })
    }

    /// `initdb`, then `setup` (settings, files in the data dir), then start on a free port.
    fn start_with(setup: impl FnOnce(&mut PgServer)) -> Self {
        let bindir = pg_bindir();
        let (dir, dir_path) = fixture_dir("pg");
        let owner = if sys::geteuid() == 0 { Some(postgres_user()) } else { None };
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&dir_path, Some(uid), Some(gid))
                .unwrap_or_else(|e| panic!("chown {} to postgres: {e}", dir_path.display()));
        }
        let data = dir_path.join("data");
        let log = dir_path.join("postgres.log");
        let mut initdb = Command::new(bindir.join("initdb"));
        initdb
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync"])
            .current_dir(&dir_path);
        if let Some((uid, gid)) = owner {
            initdb.uid(uid).gid(gid);
        }
        let out = run_bounded(initdb, Duration::from_secs(60)).unwrap_or_else(|e| panic!("initdb: {e}"));
        assert!(
            out.status.success(),
            "initdb failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let mut server =
            PgServer { port: 0, bindir, data, log, owner, settings: Vec::new(), child: None, dir_path, _dir: dir };
        setup(&mut server);
        let mut tried = Vec::new();
        for _ in 0..8 {
            server.port = free_port();
            match server.try_start() {
                Ok(()) => return server,
                Err(StartError::AddrInUse) => tried.push(server.port),
                Err(StartError::Failed(msg)) => panic!("{msg}"),
            }
        }
        panic!("postgres: every port tried was taken before it could bind: {tried:?}")
    }

    fn try_start(&mut self) -> Result<(), StartError> {
        assert!(self.child.is_none(), "postgres on port {} is already running", self.port);
        let offset = log_len(&self.log);
        let log = open_log(&self.log);
        let mut cmd = Command::new(self.bindir.join("postgres"));
        cmd.arg("-D")
            .arg(&self.data)
            .args(["-p", &self.port.to_string()])
            .arg("-k")
            .arg(&self.dir_path)
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
            .args(["-c", "synchronous_commit=off", "-c", "full_page_writes=off"])
            .args(self.settings.iter().flat_map(|s| ["-c", s.as_str()]))
            .current_dir(&self.dir_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log fd"))
            .stderr(log);
        if let Some((uid, gid)) = self.owner {
            cmd.uid(uid).gid(gid);
        }
        let child = spawn_tied(cmd).map_err(|e| StartError::Failed(format!("spawn postgres: {e}")))?;
        let pid = child.id();
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.child = None;
                let text = read_log_from(&self.log, offset);
                if text.contains("Address already in use") {
                    return Err(StartError::AddrInUse);
                }
                return Err(StartError::Failed(format!(
                    "postgres on port {} exited ({status}) before it was ready; {}:\n{}",
                    self.port,
                    self.log.display(),
                    tail(&text, 40)
                )));
            }
            // postmaster.pid: line 1 the postmaster's pid, line 8 its status ("ready" once it
            // accepts connections); so this is our server and not one that won the port.
            let ready = fs::read_to_string(self.data.join("postmaster.pid")).is_ok_and(|pidfile| {
                let lines: Vec<&str> = pidfile.lines().collect();
                lines.first().map(|l| l.trim()) == Some(pid.to_string().as_str())
                    && lines.get(7).map(|l| l.trim()) == Some("ready")
            });
            if ready && TcpStream::connect((HOST, self.port)).is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                if let Some(mut child) = self.child.take() {
                    signal_and_wait(&mut child, sys::SIGQUIT, Duration::from_secs(5));
                }
                return Err(StartError::Failed(format!(
                    "postgres on port {} was not ready within {START_TIMEOUT:?}; {}:\n{}",
                    self.port,
                    self.log.display(),
                    tail(&read_log_from(&self.log, offset), 40)
                )));
            }
            thread::sleep(POLL);
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `postgres://postgres@127.0.0.1:<port>/<db>`
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@{HOST}:{}/{db}", self.port)
    }

    /// The postmaster's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(None)) => true,
            Some(_) => {
                self.child = None;
                false
            }
            None => false,
        }
    }

    /// `CREATE DATABASE "<name>"` through psql.
    pub fn create_database(&self, name: &str) {
        assert!(
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "database name {name:?}: use [A-Za-z0-9_]"
        );
        self.psql("postgres", &format!("CREATE DATABASE \"{name}\"")).unwrap_or_else(|e| panic!("{e}"));
    }

    /// `psql -h 127.0.0.1 -p <port> -U postgres -d <db> -c <sql>` (unaligned, tuples only, no
    /// psqlrc, stop on error): stdout trimmed, or the error (connection refused, SQL error).
    pub fn psql(&self, db: &str, sql: &str) -> Result<String, String> {
        let mut cmd = Command::new(self.bindir.join("psql"));
        cmd.args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", HOST, "-p", &self.port.to_string()])
            .args(["-U", "postgres", "-d", db, "-c", sql])
            .env("PGCONNECT_TIMEOUT", "3");
        let out = run_bounded(cmd, CLIENT_TIMEOUT).map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(format!(
                "psql -p {} -d {db} -c {sql:?} failed ({}): {}",
                self.port,
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// Fast shutdown (SIGINT: roll back open transactions, disconnect clients, checkpoint), and
    /// wait for it; SIGKILL after 30 s. No-op if it is not running.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal_and_wait(&mut child, sys::SIGINT, Duration::from_secs(30));
        }
    }

    /// Immediate shutdown (SIGQUIT: like a crash, the next start runs recovery), and wait for it.
    pub fn stop_immediate(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal_and_wait(&mut child, sys::SIGQUIT, Duration::from_secs(10));
        }
    }

    /// Starts the stopped server again on the same port and data dir. No-op if it is running.
    pub fn start_again(&mut self) {
        if self.is_running() {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match self.try_start() {
                Ok(()) => return,
                Err(StartError::AddrInUse) if Instant::now() < deadline => thread::sleep(Duration::from_millis(200)),
                Err(StartError::AddrInUse) => panic!("postgres could not bind its port {} again", self.port),
                Err(StartError::Failed(msg)) => panic!("{msg}"),
            }
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir_path
    }

    pub fn log(&self) -> String {
        read_log_from(&self.log, 0)
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop_immediate();
    }
}

/// The PostgreSQL server binaries: `$CHATMESH_PG_BINDIR`, else the dir `initdb` on PATH links to,
/// else the newest `/usr/lib/postgresql/<version>/bin`.
fn pg_bindir() -> PathBuf {
    let has_server = |dir: &Path| ["initdb", "postgres", "psql"].iter().all(|b| dir.join(b).is_file());
    if let Some(dir) = env::var_os("CHATMESH_PG_BINDIR").map(PathBuf::from) {
        assert!(has_server(&dir), "CHATMESH_PG_BINDIR={} has no initdb/postgres/psql", dir.display());
        return dir;
    }
    if let Some(dir) =
        find_on_path("initdb").and_then(|p| p.canonicalize().ok()).and_then(|p| Some(p.parent()?.to_path_buf()))
        && has_server(&dir)
    {
        return dir;
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse::<u32>().ok()?, e.path().join("bin"))))
        .filter(|(_, bin)| has_server(bin))
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).unwrap_or_else(|| {
        panic!(
            "PostgreSQL server binaries (initdb, postgres) not found on PATH or in /usr/lib/postgresql/*/bin: \
             `apt-get install -y postgresql` or `scripts/setup.sh --test`"
        )
    })
}

/// The `postgres` OS user's (uid, gid), from /etc/passwd.
fn postgres_user() -> (u32, u32) {
    let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
    passwd
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields.first() == Some(&"postgres"))
                .then(|| Some((fields.get(2)?.parse().ok()?, fields.get(3)?.parse().ok()?)))?
        })
        .unwrap_or_else(|| {
            panic!(
                "running as root, PgServer needs the `postgres` OS user to run PostgreSQL as \
                 (it comes with `apt-get install -y postgresql`)"
            )
        })
}

// ---------------------------------------------------------------------------------------------
// SecantusServer: a MongoDB-wire server for the MongoDB store tests
// ---------------------------------------------------------------------------------------------

/// The SecantusDB release `scripts/setup.sh --test` installs (PyPI `secantusdb`).
pub const SECANTUS_VERSION: &str = "0.7.0b3";
/// The replica set a SecantusDB server says it is the one member of.
pub const SECANTUS_REPLICA_SET: &str = "secantus";
/// A Python server: slower to start than redis-server, more so on a busy machine.
const SECANTUS_START_TIMEOUT: Duration = Duration::from_secs(30);

/// `secantusd-py`: on PATH, else in the virtualenv `scripts/setup.sh --test` makes
/// (`.tools/venv`), else a panic saying how to install it.
pub fn secantusd_bin() -> PathBuf {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/venv/bin/secantusd-py");
    find_on_path("secantusd-py").or_else(|| venv.is_file().then(|| venv.clone())).unwrap_or_else(|| {
        panic!(
            "`secantusd-py` (SecantusDB {SECANTUS_VERSION}, the MongoDB-wire server the MongoDB tests run) is \
             not installed: not on PATH and not at {}. Install it with `scripts/setup.sh --test` (a virtualenv \
             in .tools/venv with `pip install secantusdb=={SECANTUS_VERSION}`), or set \
             CHATMESH_TEST_MONGODB_URL to a real mongod replica set",
            venv.display()
        )
    })
}

/// A private SecantusDB server (PyPI `secantusdb`: MongoDB wire protocol on WiredTiger) in its own
/// temp dir, on a free port. It answers `hello` as the primary of a one-member replica set named
/// `secantus`, so the official drivers run sessions and transactions against it. It is one node:
/// no elections, no rollback, no secondaries; and its snapshot reads outside transactions are
/// not pinned to their `atClusterTime` (see `tests/store_contract.rs`).
pub struct SecantusServer {
    port: u16,
    /// More command-line flags, on every start (TLS).
    extra_args: Vec<String>,
    bin: PathBuf,
    config: PathBuf,
    data: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    dir_path: PathBuf,
    _dir: TempDir,
}

impl SecantusServer {
    pub fn start() -> Self {
        Self::start_with(Vec::new())
    }

    /// A server that speaks only TLS (`--tls-cert-file`, `--tls-key-file`), no client certificate
    /// asked for.
    pub fn start_tls(cert: &Path, key: &Path) -> Self {
        Self::start_with(vec![
            "--tls-cert-file".to_string(),
            cert.display().to_string(),
            "--tls-key-file".to_string(),
            key.display().to_string(),
        ])
    }

    fn start_with(extra_args: Vec<String>) -> Self {
        let bin = secantusd_bin();
        let (dir, dir_path) = fixture_dir("secantus");
        // An empty config file of our own: no `./secantusd.toml` or `~/.secantus/` of the machine
        // is discovered and read.
        let config = dir_path.join("secantusd.toml");
        fs::write(&config, "").unwrap_or_else(|e| panic!("write {}: {e}", config.display()));
        let data = dir_path.join("data");
        let log = dir_path.join("secantusd.log");
        let mut server =
            SecantusServer { port: 0, extra_args, bin, config, data, log, child: None, dir_path, _dir: dir };
        let mut tried = Vec::new();
        for _ in 0..8 {
            server.port = free_port();
            match server.try_start() {
                Ok(()) => return server,
                Err(StartError::AddrInUse) => tried.push(server.port),
                Err(StartError::Failed(msg)) => panic!("{msg}"),
            }
        }
        panic!("secantusd-py: every port tried was taken before it could bind: {tried:?}")
    }

    fn try_start(&mut self) -> Result<(), StartError> {
        assert!(self.child.is_none(), "secantusd-py on port {} is already running", self.port);
        let offset = log_len(&self.log);
        let log = open_log(&self.log);
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--config")
            .arg(&self.config)
            .args(["--host", HOST, "--port", &self.port.to_string()])
            .arg("--storage-path")
            .arg(&self.data)
            // WiredTiger's cache defaults to 1 GB; test databases are tiny.
            .args(["--cache-size", "128M", "--log-level", "INFO"])
            .args(&self.extra_args)
            .env("PYTHONUNBUFFERED", "1")
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .current_dir(&self.dir_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log fd"))
            .stderr(log);
        let child = spawn_tied(cmd).map_err(|e| StartError::Failed(format!("spawn secantusd-py: {e}")))?;
        self.child = Some(child);
        // Our child's own log line names the port, so the server answering there is ours.
        let listening = format!("listening on {HOST}:{}", self.port);
        let deadline = Instant::now() + SECANTUS_START_TIMEOUT;
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.child = None;
                let text = read_log_from(&self.log, offset);
                if text.contains("Address already in use") {
                    return Err(StartError::AddrInUse);
                }
                return Err(StartError::Failed(format!(
                    "secantusd-py on port {} exited ({status}) before it listened; {}:\n{}",
                    self.port,
                    self.log.display(),
                    tail(&text, 40)
                )));
            }
            if read_log_from(&self.log, offset).contains(&listening) && TcpStream::connect((HOST, self.port)).is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(StartError::Failed(format!(
                    "secantusd-py on port {} did not listen within {SECANTUS_START_TIMEOUT:?}; {}:\n{}",
                    self.port,
                    self.log.display(),
                    tail(&read_log_from(&self.log, offset), 40)
                )));
            }
            thread::sleep(POLL);
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `mongodb://127.0.0.1:<port>/<db>?replicaSet=secantus`
    pub fn url(&self, db: &str) -> String {
        format!("mongodb://{HOST}:{}/{db}?replicaSet={SECANTUS_REPLICA_SET}", self.port)
    }

    /// The server's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(None)) => true,
            Some(_) => {
                self.child = None;
                false
            }
            None => false,
        }
    }

    /// SIGKILL, then wait for it. No-op if it is not running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The temp dir (config, `--storage-path`, log), removed on drop.
    pub fn dir(&self) -> &Path {
        &self.dir_path
    }

    /// Everything the server logged so far.
    pub fn log(&self) -> String {
        read_log_from(&self.log, 0)
    }
}

impl Drop for SecantusServer {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------------------------
// TLS-only Redis: one server, or a replica set with Sentinels, all behind ACL users
// ---------------------------------------------------------------------------------------------

/// How a fixture (and a test) reaches a TLS-only Redis node: `redis-cli --tls`, trusting `ca`,
/// logged in as `user`.
#[derive(Debug, Clone)]
pub struct TlsAccess {
    pub ca: PathBuf,
    pub user: String,
    pub password: String,
}

impl TlsAccess {
    /// `redis-cli --tls --cacert <ca> --user <user> --pass <password> -p <port> <args>`: stdout
    /// without the trailing newline (reply errors too, as redis-cli prints them), or why it failed.
    pub fn cli(&self, port: u16, args: &[&str]) -> Result<String, String> {
        let mut cmd = Command::new(redis_cli_bin());
        cmd.args(["--tls", "--cacert"])
            .arg(&self.ca)
            .args(["-h", HOST, "-p", &port.to_string(), "--user", &self.user, "--pass", &self.password])
            .arg("--no-auth-warning")
            .args(args);
        let out = run_bounded(cmd, CLIENT_TIMEOUT).map_err(|e| e.to_string())?;
        let stdout = String::from_utf8_lossy(&out.stdout).trim_end_matches('\n').to_string();
        if out.status.success() && !stdout.starts_with("Could not connect") {
            Ok(stdout)
        } else {
            Err(format!(
                "redis-cli --tls -p {port} {args:?} failed ({}): {stdout}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }
}

/// The certificate files a TLS node serves with (`tls-cert-file`, `tls-key-file`) and the CA it
/// trusts (`tls-ca-cert-file`, for its replication and Sentinel links).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// `redis-server` arguments that close the plaintext port and open `port` as TLS, clients
/// authenticating with ACL passwords rather than certificates.
fn tls_args(port: u16, files: &TlsFiles) -> Vec<String> {
    let mut args: Vec<String> = ["--port", "0", "--tls-port"].map(String::from).to_vec();
    args.push(port.to_string());
    for (flag, path) in
        [("--tls-cert-file", &files.cert), ("--tls-key-file", &files.key), ("--tls-ca-cert-file", &files.ca)]
    {
        args.push(flag.to_string());
        args.push(path.display().to_string());
    }
    args.extend(["--tls-auth-clients", "no", "--protected-mode", "yes"].map(String::from));
    args
}

/// One TLS-only `redis-server` (no persistence) on a free port, with the ACL users of `aclfile`.
pub struct TlsRedisServer {
    node: RedisNode,
    access: TlsAccess,
    dir_path: PathBuf,
    _dir: TempDir,
}

impl TlsRedisServer {
    /// `access` must be a user of `aclfile` allowed `INFO` and `PING` (the readiness probe).
    pub fn start(files: &TlsFiles, aclfile: &Path, access: TlsAccess) -> Self {
        let (dir, dir_path) = fixture_dir("redis-tls");
        let node = RedisNode::launch_with("redis-tls", &dir_path, Some(access.clone()), |port, log| {
            let mut args = redis_args(port, &dir_path, log, false);
            args.extend(tls_args(port, files));
            args.extend(["--aclfile".to_string(), aclfile.display().to_string()]);
            args
        });
        TlsRedisServer { node, access, dir_path, _dir: dir }
    }

    /// The TLS port (the only one open).
    pub fn port(&self) -> u16 {
        self.node.port
    }

    /// `redis-cli --tls` as the fixture's user.
    pub fn cli(&self, args: &[&str]) -> Result<String, String> {
        self.access.cli(self.node.port, args)
    }

    /// The server's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.node.pid()
    }

    pub fn dir(&self) -> &Path {
        &self.dir_path
    }

    pub fn log(&self) -> String {
        self.node.log_text()
    }
}

/// Settings for [`TlsReplicaSet::start`].
#[derive(Debug, Clone)]
pub struct TlsSetOptions {
    pub files: TlsFiles,
    /// The data nodes' ACL file.
    pub aclfile: PathBuf,
    /// A user of `aclfile` the fixture probes the data nodes as (INFO, PING, ROLE).
    pub data_access: TlsAccess,
    /// The user the replica logs in to its primary as (`masteruser`/`masterauth`).
    pub replication: (String, String),
    /// The user the Sentinels log in to the data nodes as (`sentinel auth-user/auth-pass`).
    pub sentinel_auth: (String, String),
    /// Lines for each Sentinel's config besides the monitor: its `user` lines and
    /// `sentinel sentinel-user/sentinel-pass` for the other Sentinels.
    pub sentinel_conf: String,
    /// A Sentinel user the fixture probes the Sentinels as (INFO, PING, SENTINEL MASTER).
    pub sentinel_access: TlsAccess,
}

/// As [`RedisReplicaSet`], all TLS-only and behind ACL users: a primary, one replica (replicating
/// over TLS) and three Sentinels (TLS to clients, to each other and to the data nodes). Master
/// name `chatmesh`. `start` returns once the replica is in sync and every Sentinel knows the
/// replica and the two other Sentinels.
pub struct TlsReplicaSet {
    sentinels: Vec<RedisNode>,
    nodes: Vec<RedisNode>,
    options: TlsSetOptions,
    dir_path: PathBuf,
    _dir: TempDir,
}

pub const TLS_MASTER_NAME: &str = "chatmesh";

impl TlsReplicaSet {
    pub fn start(options: TlsSetOptions) -> Self {
        let (dir, dir_path) = fixture_dir("sentinel-tls");
        let o = &options;
        let data_args = |port: u16, log: &Path| {
            let mut args = redis_args(port, &dir_path, log, false);
            args.extend(tls_args(port, &o.files));
            args.extend(["--aclfile".to_string(), o.aclfile.display().to_string()]);
            args.extend(["--tls-replication", "yes", "--repl-diskless-sync-delay", "0"].map(String::from));
            args.extend([
                "--masteruser".to_string(),
                o.replication.0.clone(),
                "--masterauth".to_string(),
                o.replication.1.clone(),
            ]);
            args.extend(["--appenddirname".to_string(), format!("aof-{port}")]);
            args
        };
        let primary = RedisNode::launch_with("redis-tls-primary", &dir_path, Some(o.data_access.clone()), data_args);
        let primary_port = primary.port;
        let replica =
            RedisNode::launch_with("redis-tls-replica", &dir_path, Some(o.data_access.clone()), |port, log| {
                let mut args = data_args(port, log);
                args.extend(["--replicaof".to_string(), HOST.to_string(), primary_port.to_string()]);
                args
            });
        let replica_port = replica.port;
        wait_until(
            START_TIMEOUT,
            || {
                let info = o.data_access.cli(replica_port, &["INFO", "replication"]).ok()?;
                info.lines().any(|l| l.trim() == "master_link_status:up").then_some(())
            },
            || {
                format!(
                    "replica {replica_port} never synced over TLS with {primary_port}:\n{}",
                    tail(&replica.log_text(), 30)
                )
            },
        );
        let mut sentinels = Vec::new();
        for _ in 0..3 {
            sentinels.push(RedisNode::launch_with(
                "sentinel-tls",
                &dir_path,
                Some(o.sentinel_access.clone()),
                |port, log| {
                    let conf = dir_path.join(format!("sentinel-{port}.conf"));
                    let f = &o.files;
                    let text = format!(
                        "port 0\ntls-port {port}\ntls-cert-file {cert}\ntls-key-file {key}\ntls-ca-cert-file {ca}\n\
                     tls-auth-clients no\ntls-replication yes\nbind {HOST}\nprotected-mode yes\ndaemonize no\n\
                     dir {dir}\nlogfile {log}\n{extra}\n\
                     sentinel monitor {TLS_MASTER_NAME} {HOST} {primary_port} 2\n\
                     sentinel auth-user {TLS_MASTER_NAME} {auth_user}\n\
                     sentinel auth-pass {TLS_MASTER_NAME} {auth_pass}\n\
                     sentinel down-after-milliseconds {TLS_MASTER_NAME} 1000\n\
                     sentinel failover-timeout {TLS_MASTER_NAME} 3000\n\
                     sentinel parallel-syncs {TLS_MASTER_NAME} 1\n",
                        cert = f.cert.display(),
                        key = f.key.display(),
                        ca = f.ca.display(),
                        dir = dir_path.display(),
                        log = log.display(),
                        extra = o.sentinel_conf,
                        auth_user = o.sentinel_auth.0,
                        auth_pass = o.sentinel_auth.1,
                    );
                    fs::write(&conf, text).expect("write sentinel.conf");
                    vec![conf.display().to_string(), "--sentinel".to_string()]
                },
            ));
        }
        let set = TlsReplicaSet { sentinels, nodes: vec![primary, replica], options, dir_path, _dir: dir };
        for sentinel in &set.sentinels {
            let port = sentinel.port;
            wait_until(
                Duration::from_secs(20),
                || {
                    let text = set.options.sentinel_access.cli(port, &["SENTINEL", "MASTER", TLS_MASTER_NAME]).ok()?;
                    let lines: Vec<&str> = text.lines().collect();
                    let field = |name: &str| lines.chunks(2).find(|kv| kv[0] == name).and_then(|kv| kv.get(1).copied());
                    (field("num-slaves") == Some("1") && field("num-other-sentinels") == Some("2")).then_some(())
                },
                || format!("sentinel {port} never saw the replica and both other Sentinels over TLS\n{}", set.logs()),
            );
        }
        set
    }

    /// `rediss+sentinel://<userinfo>@127.0.0.1:S1,...,127.0.0.1:S3/chatmesh`; `userinfo` empty for
    /// none.
    pub fn sentinel_url(&self, userinfo: &str) -> String {
        let hosts: Vec<String> = self.sentinels.iter().map(|s| format!("{HOST}:{}", s.port)).collect();
        let at = if userinfo.is_empty() { String::new() } else { format!("{userinfo}@") };
        format!("rediss+sentinel://{at}{}/{TLS_MASTER_NAME}", hosts.join(","))
    }

    pub fn sentinel_ports(&self) -> Vec<u16> {
        self.sentinels.iter().map(|s| s.port).collect()
    }

    /// The data node that was the primary at start.
    pub fn primary_port(&self) -> u16 {
        self.nodes[0].port
    }

    pub fn replica_port(&self) -> u16 {
        self.nodes[1].port
    }

    /// SIGKILLs the data node that was the primary at start, then waits until every Sentinel
    /// names the other one and it says `role:master`; returns the new primary's port.
    pub fn fail_over(&mut self, timeout: Duration) -> u16 {
        let old = self.nodes[0].port;
        self.nodes[0].kill();
        let new = self.nodes[1].port;
        wait_until(
            timeout,
            || {
                for s in &self.sentinels {
                    let reply = self
                        .options
                        .sentinel_access
                        .cli(s.port, &["SENTINEL", "get-master-addr-by-name", TLS_MASTER_NAME])
                        .ok()?;
                    (reply.lines().nth(1) == Some(new.to_string().as_str())).then_some(())?;
                }
                let role = self.options.data_access.cli(new, &["ROLE"]).ok()?;
                (role.lines().next() == Some("master")).then_some(())
            },
            || format!("no failover from {old} to {new}\n{}", self.logs()),
        );
        new
    }

    /// `redis-cli --tls` to a data node as `data_access`.
    pub fn data_cli(&self, port: u16, args: &[&str]) -> Result<String, String> {
        self.options.data_access.cli(port, args)
    }

    pub fn dir(&self) -> &Path {
        &self.dir_path
    }

    /// The tails of every node's log, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for n in self.nodes.iter().chain(&self.sentinels) {
            let _ = writeln!(out, "--- {} {} ---\n{}", n.role, n.port, tail(&n.log_text(), 40));
        }
        out
    }
}
