//! The `chatmesh` binary: parse settings once, start logging, run the server.

use std::io::IsTerminal;
use std::process::ExitCode;

use chatmesh::app::Application;
use chatmesh::config::{Cli, Command, Config, ServeArgs, check_unknown_env};
use clap::{Args, FromArgMatches, Parser};

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("chatmesh: {msg}");
    ExitCode::from(2)
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
        // No subcommand: `serve` with settings from the environment only.
        None => match ServeArgs::augment_args(clap::Command::new("chatmesh"))
            .try_get_matches_from(["chatmesh"])
            .and_then(|m| ServeArgs::from_arg_matches(&m))
        {
            Ok(a) => a,
            Err(e) => return fail(first_line(&e.to_string())),
        },
    };
    let config = match Config::from_args(args, std::io::stdout().is_terminal()) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    chatmesh::telemetry::init(config.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => return fail(format!("cannot start the runtime: {e}")),
    };
    runtime.block_on(async move {
        let app = match Application::build(config).await {
            Ok(app) => app,
            Err(e) => return fail(format!("cannot start: {e:#}")),
        };
        match app.run_until_stopped().await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(format!("server error: {e:#}")),
        }
    })
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or(s).trim_start_matches("error: ").to_string()
}
