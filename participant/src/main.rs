//! `participant`: serves one shard of the ledger's accounts. See `participant --help`.

use clap::Parser;
use common::store::{Durability, StoreOptions};
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
    /// File holding the cluster secret that every internal call must carry (required unless --listen is a
    /// loopback address).
    #[arg(long, env = "LEDGER_CLUSTER_TOKEN_FILE")]
    cluster_token_file: Option<PathBuf>,
    /// Connections served at once; more wait until one closes.
    #[arg(long, env = "LEDGER_CONNECTIONS_MAX", default_value_t = 1_024)]
    connections_max: usize,
    /// Longest a request may take, body included (milliseconds); past it, 408.
    #[arg(long, env = "LEDGER_REQUEST_TIMEOUT_MS", default_value_t = 30_000)]
    request_timeout_ms: u64,
    /// The most of the store kept in memory (MiB). The rest is read from disk (and the OS page cache) when
    /// needed, so a node's memory does not grow with its history.
    #[arg(long, env = "LEDGER_CACHE_MB", default_value_t = common::store::CACHE_BYTES_DEFAULT >> 20, value_parser = clap::value_parser!(u64).range(8..=1_048_576))]
    cache_mb: u64,
    /// NOT DURABLE: skip every flush and fsync. Only for measuring what durability costs.
    #[arg(long)]
    no_fsync: bool,
}

// Most of a transfer's allocations are small and short-lived (frames, sled's node copies, JSON): mimalloc
// serves them with less CPU than glibc's malloc, whose free-list work showed up in every profile.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    let cluster_token = match cli.cluster_token_file.as_deref().map(common::auth::ClusterToken::read).transpose() {
        Ok(token) => token,
        Err(e) => {
            eprintln!("participant: {e}");
            return ExitCode::FAILURE;
        }
    };
    let config = participant::Config {
        shard: cli.shard,
        data_dir: cli.data,
        store: StoreOptions {
            durability: if cli.no_fsync { Durability::NoFsync } else { Durability::Fsync },
            cache_bytes: cli.cache_mb * 1024 * 1024,
        },
        in_doubt_after: Duration::from_millis(cli.in_doubt_after_ms),
        query_timeout: Duration::from_secs(5),
        cluster_token,
        connections_max: cli.connections_max,
        request_timeout: Duration::from_millis(cli.request_timeout_ms),
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
