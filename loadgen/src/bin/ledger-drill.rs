//! `ledger-drill`: the kill-and-restart drill (see `loadgen::drill`), also `ledger drill`. Prints a one-line
//! summary; exits 1 on any violation, printing the seed that reproduces the run's schedule.

use clap::Parser;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(name = "ledger-drill", version, about, long_about = None)]
struct Cli {
    #[command(flatten)]
    args: loadgen::drill::DrillArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    loadgen::drill::run_cli(Cli::parse().args).await
}
