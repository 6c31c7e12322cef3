//! `ledger-fill`: builds history for tests and benchmarks that need a node with a long past or many accounts.
//! `transfers` sends transfers to a running cluster through its public API (see `loadgen::fill`); `accounts`
//! opens accounts straight in a stopped participant's store, through the participant's own storage code.
//! Exits 1 if any transfer failed (an abort is not a failure), 2 if it could not run.

use clap::{Parser, Subcommand};
use common::ledger::{shard_of, AccountId};
use loadgen::fill::{self, Fill};
use std::path::PathBuf;
use std::process::ExitCode;

/// Builds history on a ledger: transfers through the public API, or accounts in a stopped shard's store.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Sends N cross-shard transfers of 1 unit to a running ledger from C concurrent clients, between
    /// accounts it creates (or reuses) named `<prefix>-00000`, `<prefix>-00001`, ... on every shard.
    Transfers {
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
    },
    /// Opens the accounts of shard S among `<prefix>-0000000` ... `<prefix>-<count-1>` (those that the
    /// coordinator would place on S) straight in that participant's data dir. The participant must be
    /// stopped. Accounts that exist are left alone.
    Accounts {
        /// The participant's data dir (its `--data`).
        #[arg(long)]
        data: PathBuf,
        /// The participant's shard (its `--shard`).
        #[arg(long)]
        shard: u32,
        /// The cluster's shard count.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=1024))]
        shards: u32,
        /// Candidate ids, across all shards; about count / shards land on this one.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
        count: u64,
        #[arg(long, default_value = "acct")]
        prefix: String,
        /// Opening balance of each account.
        #[arg(long, default_value_t = 1_000_000)]
        balance: i64,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Transfers { url, token, transfers, clients, shards, accounts_per_shard, prefix, balance, seed } => {
            fill_transfers(url, token, transfers, clients, shards, accounts_per_shard, prefix, balance, seed).await
        }
        Command::Accounts { data, shard, shards, count, prefix, balance } => {
            fill_accounts(data, shard, shards, count, prefix, balance).await
        }
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("ledger-fill: {e}");
            ExitCode::from(2)
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn fill_transfers(
    url: String,
    token: Option<String>,
    transfers: u64,
    clients: usize,
    shards: u32,
    per_shard: u64,
    prefix: String,
    balance: i64,
    seed: u64,
) -> Result<bool, String> {
    let url = url.trim_end_matches('/').to_owned();
    let accounts = fill::pick_accounts(&prefix, shards, per_shard as usize).map_err(|e| e.to_string())?;
    let http = reqwest::Client::new();
    fill::create_accounts(&http, &url, token.as_deref(), &accounts, balance, true).await.map_err(|e| e.to_string())?;
    let config = Fill { url, token, transfers, clients, seed };
    let filled = fill::fill(&config, &accounts).await.map_err(|e| e.to_string())?;
    println!(
        "ledger-fill: {transfers} transfers sent: {} committed, {} aborted, {} failed, in {:.1} s ({:.0} committed/s)",
        filled.committed,
        filled.aborted,
        filled.errors,
        filled.elapsed.as_secs_f64(),
        filled.rate()
    );
    Ok(filled.errors == 0)
}

async fn fill_accounts(
    data: PathBuf,
    shard: u32,
    shards: u32,
    count: u64,
    prefix: String,
    balance: i64,
) -> Result<bool, String> {
    if shard >= shards {
        return Err(format!("--shard {shard} is not below --shards {shards}"));
    }
    if balance < 0 {
        return Err("--balance must not be negative".into());
    }
    AccountId::new(format!("{prefix}-0000000")).map_err(|e| format!("--prefix {prefix:?} makes bad ids: {e}"))?;
    let ids = (0..count).filter_map(|i| {
        let id = AccountId::new(format!("{prefix}-{i:07}")).ok()?;
        (shard_of(&id, shards) == shard).then_some((id, balance))
    });
    let started = std::time::Instant::now();
    let (created, existed) =
        participant::storage::create_accounts_offline(&data, shard, ids).await.map_err(|e| e.to_string())?;
    println!(
        "ledger-fill: shard {shard}: {created} accounts opened, {existed} already there, in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(true)
}
