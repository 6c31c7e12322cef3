//! `participant`: serves one shard of the ledger's accounts. See `participant --help`.

use clap::Parser;
use common::store::Durability;
use common::telemetry::{self, LogFormat};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// One shard of the two-phase-commit ledger: holds its accounts, votes on transfers, and recovers the transfers
/// it was in doubt about after a crash. The coordinator reaches it over HTTP; clients talk to the coordinator.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Which shard this process owns: its position (from 0) in the coordinator's --participants list.
    #[arg(long, env = "LEDGER_SHARD", default_value_t = 0)]
    shard: u32,
    /// Address to listen on.
    #[arg(long, env = "LEDGER_LISTEN", default_value = "127.0.0.1:7101")]
    listen: String,
    /// Directory for this shard's store (created if missing). Restart with the same one to recover.
    #[arg(long, env = "LEDGER_DATA", default_value = "data/participant")]
    data: PathBuf,
    /// Ask the coordinator about a prepared transfer left undecided this long (milliseconds).
    #[arg(long, env = "LEDGER_IN_DOUBT_AFTER_MS", default_value_t = 3_000)]
    in_doubt_after_ms: u64,
    /// Log format on stderr: text or json. Verbosity follows RUST_LOG (default info).
    #[arg(long, env = "LEDGER_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
    /// NOT DURABLE: skip every flush and fsync. Only for measuring what durability costs.
    #[arg(long)]
    no_fsync: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(cli.log_format);
    let listener = match tokio::net::TcpListener::bind(&cli.listen).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(listen = %cli.listen, error = %e, "cannot listen");
            return ExitCode::FAILURE;
        }
    };
    if cli.no_fsync {
        tracing::warn!("--no-fsync: acknowledged writes can be lost; never use this for real money");
    }
    let config = participant::Config {
        shard: cli.shard,
        data_dir: cli.data,
        durability: if cli.no_fsync { Durability::NoFsync } else { Durability::Fsync },
        in_doubt_after: Duration::from_millis(cli.in_doubt_after_ms),
        query_timeout: Duration::from_secs(5),
    };
    match participant::run(listener, config, common::http::shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "participant stopped");
            eprintln!("participant: {e}");
            ExitCode::FAILURE
        }
    }
}
