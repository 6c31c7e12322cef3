//! `ledger-fill`: builds transfer history on a running cluster through its public API (see `loadgen::fill`),
//! for tests and benchmarks that need a node with a long past. Exits 1 if any transfer failed (an abort is
//! not a failure), 2 if it could not run.

use clap::Parser;
use loadgen::fill::{self, Fill};
use std::process::ExitCode;

/// Sends N cross-shard transfers of 1 unit to a running ledger, from C concurrent clients, between accounts
/// it creates (or reuses) named `<prefix>-00000`, `<prefix>-00001`, ... on every shard.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Cli {
    /// The coordinator's base URL.
    #[arg(long, env = "LEDGER_URL", default_value = "http://127.0.0.1:7100")]
    url: String,
    /// A client API token with the admin role (it creates accounts), when the coordinator asks for tokens.
    #[arg(long, env = "LEDGER_TOKEN")]
    token: Option<String>,
    /// Transfers to send.
    #[arg(long)]
    transfers: u64,
    /// Concurrent clients, each with its own keep-alive connection.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// The cluster's shard count (the coordinator's participant count).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(2..=1024))]
    shards: u32,
    /// Accounts on each shard.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    accounts_per_shard: u64,
    /// Account id prefix.
    #[arg(long, default_value = "fill")]
    prefix: String,
    /// Opening balance of each account created.
    #[arg(long, default_value_t = 1_000_000_000)]
    balance: i64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("ledger-fill: {e}");
            ExitCode::from(2)
        }
    }
}

async fn run(cli: Cli) -> Result<bool, fill::FillError> {
    let url = cli.url.trim_end_matches('/').to_owned();
    let accounts = fill::pick_accounts(&cli.prefix, cli.shards, cli.accounts_per_shard as usize)?;
    let http = reqwest::Client::new();
    fill::create_accounts(&http, &url, cli.token.as_deref(), &accounts, cli.balance, true).await?;
    let config = Fill { url, token: cli.token, transfers: cli.transfers, clients: cli.clients, seed: cli.seed };
    let filled = fill::fill(&config, &accounts).await?;
    println!(
        "ledger-fill: {} transfers sent: {} committed, {} aborted, {} failed, in {:.1} s ({:.0} committed/s)",
        cli.transfers,
        filled.committed,
        filled.aborted,
        filled.errors,
        filled.elapsed.as_secs_f64(),
        filled.rate()
    );
    Ok(filled.errors == 0)
}
