//! `ledger-bench`: the throughput benchmark (see `loadgen::bench`). Starts its own cluster from the binaries
//! next to it, drives cross-shard transfers from concurrent clients, and prints one table row per concurrency
//! level. Exits 1 if money was not conserved, 2 if the benchmark itself could not run. Asserts nothing about
//! timing.

use clap::Parser;
use std::process::ExitCode;
use std::time::Duration;

/// Throughput benchmark of the two-phase-commit ledger: a coordinator and two participants on loopback (fresh
/// temp data dirs), C clients sending cross-shard transfers back to back on keep-alive connections. Reports
/// committed transfers/s, aborts, errors, latency percentiles, CPU seconds and fsyncs per committed transfer of
/// each process, then checks that the total money is conserved.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Concurrent clients (one tokio task and one keep-alive connection each).
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Seconds measured per concurrency level.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Seconds of load before each measured window that are not counted.
    #[arg(long, default_value_t = 1)]
    warmup: u64,
    /// Comma-separated client counts, one measured window each, against the same cluster (e.g. 1,16,64,256).
    /// Overrides --clients.
    #[arg(long, value_delimiter = ',')]
    sweep: Vec<usize>,
    /// Accounts created on each of the two shards, each with a balance of 1,000,000.
    #[arg(long, default_value_t = 1_000)]
    accounts_per_shard: usize,
    /// History mode: comma-separated history sizes (e.g. 100000,1000000). Builds each history through the
    /// public API with --clients clients, then prints each node's data dir bytes per committed transfer, its
    /// restart time (SIGKILL, start, /health 200) and its RSS after the restart and after some load.
    #[arg(long, value_delimiter = ',')]
    history: Vec<u64>,
    /// NOT DURABLE: start every node with --no-fsync, to measure what durability costs. Every output line is
    /// labelled.
    #[arg(long)]
    no_fsync: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if !cli.history.is_empty() {
        let mut sizes = cli.history.clone();
        sizes.sort_unstable();
        let config = loadgen::bench::HistoryConfig {
            sizes,
            clients: cli.clients.max(1),
            accounts_per_shard: cli.accounts_per_shard.max(1),
            no_fsync: cli.no_fsync,
        };
        return exit(loadgen::bench::run_history(config).await);
    }
    let levels = if cli.sweep.is_empty() { vec![cli.clients] } else { cli.sweep };
    let config = loadgen::bench::Config {
        levels: levels.into_iter().map(|c| c.max(1)).collect(),
        duration: Duration::from_secs(cli.duration.max(1)),
        warmup: Duration::from_secs(cli.warmup),
        accounts_per_shard: cli.accounts_per_shard.max(1),
        no_fsync: cli.no_fsync,
    };
    exit(loadgen::bench::run(config).await)
}

fn exit(result: Result<bool, loadgen::bench::BenchError>) -> ExitCode {
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("ledger-bench: {e}");
            ExitCode::from(2)
        }
    }
}
