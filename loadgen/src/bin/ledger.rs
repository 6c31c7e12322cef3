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
    ///
    /// One coordinator and N participants on loopback, run from the binaries next to this one (or in
    /// LEDGER_BIN_DIR), each with its store at ./data/<node>, its log at ./data/<node>.log and its pid at
    /// ./data/<node>.pid. Nodes are named coordinator, p0, p1, ... The coordinator listens at LEDGER_BASE_PORT
    /// (default 7100), pI at base + 1 + I. The first `up` fixes the layout in ./data/cluster.json and a secret
    /// shared by every node in ./data/cluster.token (mode 600). LEDGER_* variables set at the first `up` (for
    /// example LEDGER_IN_DOUBT_AFTER_MS=500) reach every node and are remembered for `start`; LEDGER_CRASH_AT
    /// is never remembered: `LEDGER_CRASH_AT=participant.prepare.flushed ledger cluster start p0` arms it for
    /// that run. LEDGER_START_TIMEOUT_S (default 30) bounds the wait for /health, LEDGER_STOP_TIMEOUT_S
    /// (default 20) the wait for an exit after SIGTERM, after which the node gets SIGKILL (which loses nothing:
    /// every acknowledged write is already durable).
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
