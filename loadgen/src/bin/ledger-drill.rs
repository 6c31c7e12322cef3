//! `ledger-drill`: runs the kill-and-restart drill (see `loadgen::drill`) and prints a one-line summary.
//! Exits 1 on any violation, printing the seed that reproduces the run's schedule.

use clap::Parser;
use std::process::ExitCode;
use std::time::Duration;

/// Bank workload with a nemesis against a real local cluster: random transfers from concurrent clients while
/// processes are SIGKILLed, restarted, paused and resumed; then a heal and a strict check of every transfer.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Seconds of workload under the nemesis.
    #[arg(long, default_value_t = 30)]
    duration: u64,
    /// Concurrent clients.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Accounts the clients move money between.
    #[arg(long, default_value_t = 16)]
    accounts: usize,
    /// Participant processes (shards).
    #[arg(long, default_value_t = 2)]
    participants: usize,
    /// Seed of the clients' and the nemesis's choices (default: from the clock).
    #[arg(long)]
    seed: Option<u64>,
    /// Mean milliseconds between nemesis actions.
    #[arg(long, default_value_t = 3_000)]
    nemesis_interval_ms: u64,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let seed = cli.seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
    });
    let config = loadgen::drill::Config {
        participants: cli.participants.max(1),
        clients: cli.clients.max(1),
        accounts: cli.accounts.max(2),
        duration: Duration::from_secs(cli.duration),
        seed,
        nemesis_interval: Duration::from_millis(cli.nemesis_interval_ms.max(100)),
        ..Default::default()
    };
    eprintln!("drill: seed={seed} (reproduce the schedule with --seed {seed})");
    let report = loadgen::drill::run(config).await;
    for v in &report.violations {
        eprintln!("VIOLATION: {v}");
    }
    println!("{}", report.summary(seed));
    if report.violations.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!("drill failed: rerun with --seed {seed}");
        ExitCode::FAILURE
    }
}
