//! The `chatmesh` binary: parse settings once, start logging, run the server (or the `backup` /
//! `restore` tool).
//!
//! Exit codes: 0 done, 2 bad arguments or settings, 1 anything else that failed; the reason is one
//! line on stderr, `chatmesh: ...`.

use std::future::Future;
use std::io::IsTerminal;
use std::process::ExitCode;

use chatmesh::app::Application;
use chatmesh::config::{Cli, Command, Config, RegionAction, ServeArgs, StoreUrl, TakeoverArgs, check_unknown_env};
use clap::{Args, FromArgMatches, Parser};

/// mimalloc: the send path makes many small short-lived allocations; glibc malloc spent ~20% of
/// the server's CPU on them under load (perf, bench/run.sh ingest).
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Bad arguments or settings: exit 2.
fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("chatmesh: {msg}");
    ExitCode::from(2)
}

/// A tool that ran and failed: exit 1, with the error chain on one line.
fn failed(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("chatmesh: {}", msg.to_string().replace(['\n', '\r'], " "));
    ExitCode::from(1)
}

/// Runs `backup` or `restore` against the store `store_url` names; logs go to stderr.
fn run_tool<F, Fut>(name: &str, store_url: &str, tool: F) -> ExitCode
where
    F: FnOnce(StoreUrl) -> Fut,
    Fut: Future<Output = anyhow::Result<chatmesh::backup::Counts>>,
{
    let url = match StoreUrl::parse(store_url) {
        Ok(u) => u,
        Err(reason) => return fail(format!("invalid setting CHATMESH_STORE_URL: {reason}")),
    };
    chatmesh::backup::init_logging();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => return failed(format!("cannot start the runtime: {e}")),
    };
    match runtime.block_on(tool(url)) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => failed(format!("{name} failed: {e:#}")),
    }
}

/// The `serve` settings from the environment alone.
fn env_settings() -> Result<ServeArgs, clap::Error> {
    ServeArgs::augment_args(clap::Command::new("chatmesh"))
        .try_get_matches_from(["chatmesh"])
        .and_then(|m| ServeArgs::from_arg_matches(&m))
}

/// `chatmesh region takeover`: the report on stdout as JSON, logs on stderr.
fn takeover(args: TakeoverArgs) -> ExitCode {
    let serve = match env_settings() {
        Ok(a) => a,
        Err(e) => return fail(first_line(&e.to_string())),
    };
    let config = match Config::from_args(serve, false) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let Some(cluster) = config.cluster.clone() else {
        return fail(
            "a takeover needs the settings of a region's instances (CHATMESH_REDIS_URL, CHATMESH_PEER_REGIONS)",
        );
    };
    if args.region != config.region && cluster.peers.iter().all(|p| p.name != args.region) {
        return fail(format!("`{}` is neither this region nor among CHATMESH_PEER_REGIONS", args.region));
    }
    if let Some(by) = &args.by
        && by != &config.region
    {
        return fail(format!("--by {by}, but these settings are region {}'s (CHATMESH_REGION)", config.region));
    }
    chatmesh::backup::init_logging();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => return failed(format!("cannot start the runtime: {e}")),
    };
    let work = async {
        let store = chatmesh::store::open(&config.store).await?;
        let redis = chatmesh::redis_io::Redis::connect(cluster.redis.clone()).await?;
        let keys = chatmesh::redis_io::Keys::new(&cluster.prefix, cluster.shards);
        let actor = format!("command:{}", std::process::id());
        let takeovers = chatmesh::region::takeover::Takeovers {
            store,
            redis,
            keys,
            timing: cluster.leases,
            dedupe_ttl: cluster.dedupe_ttl,
        };
        takeovers.take_over(&args.region, &config.region, &actor).await
    };
    match runtime.block_on(work) {
        Ok(report) => {
            println!("{}", serde_json::to_string(&report).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Err(e) => failed(format!("takeover failed: {e:#}")),
    }
}

fn main() -> ExitCode {
    if let Err(e) = check_unknown_env(std::env::vars().map(|(k, _)| k)) {
        return fail(e);
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => return fail(first_line(&e.to_string())),
    };
    let args = match cli.command {
        Some(Command::Serve(args)) => args,
        Some(Command::Backup(args)) => {
            let url = args.store.store_url.clone();
            return run_tool("backup", &url, |u| chatmesh::backup::backup(args, u));
        }
        Some(Command::Restore(args)) => {
            let url = args.store.store_url.clone();
            return run_tool("restore", &url, |u| chatmesh::backup::restore(args, u));
        }
        Some(Command::Region(args)) => match args.action {
            RegionAction::Takeover(t) => return takeover(t),
        },
        // No subcommand: `serve` with settings from the environment only.
        None => match env_settings() {
            Ok(a) => a,
            Err(e) => return fail(first_line(&e.to_string())),
        },
    };
    let config = match Config::from_args(args, std::io::stdout().is_terminal()) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    // Traces name the instance; without CHATMESH_INSTANCE_ID the process id stands in (the
    // listening address, the usual default, is not known before the bind).
    let trace_instance = config.instance_id.clone().unwrap_or_else(|| format!("pid-{}", std::process::id()));
    let telemetry = chatmesh::telemetry::init(config.log_format, &trace_instance);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => return fail(format!("cannot start the runtime: {e}")),
    };
    let code = runtime.block_on(async move {
        let app = match Application::build(config).await {
            Ok(app) => app,
            Err(e) => return fail(format!("cannot start: {e:#}")),
        };
        match app.run_until_stopped().await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(format!("server error: {e:#}")),
        }
    });
    // Flushes the spans still queued for the collector.
    drop(telemetry);
    code
}

/// The first line of a clap error; when it ends with `:` (e.g. "the following required arguments
/// were not provided:") the next line, which names them, is joined to it.
fn first_line(s: &str) -> String {
    let mut lines = s.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = lines.next().unwrap_or(s).trim_start_matches("error: ");
    match lines.next() {
        Some(next) if first.ends_with(':') => format!("{first} {next}"),
        _ => first.to_string(),
    }
}
