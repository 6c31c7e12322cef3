//! `ledger-bench`: the throughput benchmark (see `loadgen::bench`), also `ledger bench`. Starts its own cluster
//! from the binaries next to it, drives cross-shard transfers from concurrent clients, and prints one table row
//! per concurrency level. Exits 1 if money was not conserved, 2 if the benchmark itself could not run. Asserts
//! nothing about timing.

use clap::Parser;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(name = "ledger-bench", version, about, long_about = None)]
struct Cli {
    #[command(flatten)]
    args: loadgen::bench::BenchArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    loadgen::bench::run_cli(Cli::parse().args).await
}
