//! `ledger`: one command for people who run the ledger. Each subcommand talks only to the public HTTP API, or
//! starts the real `coordinator` and `participant` binaries (found next to this one, or in `LEDGER_BIN_DIR`).

use clap::{Parser, Subcommand};
use loadgen::cli::{client, demo, local};
use std::process::ExitCode;

/// Run, use and test a two-phase-commit ledger: a local cluster, a client of its HTTP API, a guided tour, the
/// benchmark and the kill-and-restart drill.
#[derive(Parser, Debug)]
#[command(name = "ledger", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// A local cluster under ./data: up, down, status, kill, start, logs, reset.
    Cluster(local::ClusterArgs),
    #[command(flatten)]
    Client(client::ClientCommand),
    /// A tour of the public API against a running cluster; exits 1 if any answer differs from the expected one.
    Demo(demo::DemoArgs),
    /// The throughput benchmark, on a cluster of its own.
    Bench(loadgen::bench::BenchArgs),
    /// The kill-and-restart drill, on a cluster of its own.
    Drill(loadgen::drill::DrillArgs),
}

#[tokio::main]
async fn main() -> ExitCode {
    // SAFETY: at the start of main, before any other thread exists. A closed pipe (`ledger ... | head`) then
    // ends this process quietly, as it does any other command-line tool, instead of a panic on the next print.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    match Cli::parse().command {
        Command::Cluster(args) => local::run(args).await,
        Command::Client(command) => client::run(command).await,
        Command::Demo(args) => demo::run(args).await,
        Command::Bench(args) => loadgen::bench::run_cli(args).await,
        Command::Drill(args) => loadgen::drill::run_cli(args).await,
    }
}
