//! `coordinator`: the ledger's public HTTP API and two-phase-commit coordinator. See `coordinator --help`.

use clap::Parser;
use common::store::{Durability, StoreOptions};
use common::telemetry::{self, LogFormat};
use protocol::coordinator_core::CoreConfig;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// The coordinator of the two-phase-commit ledger: serves the public HTTP API (accounts, transfers, health),
/// moves money between shards atomically, and logs every decision so no acknowledged transfer is lost or
/// applied twice across crashes. Start the participants first; shard i is the i-th --participants URL.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Address to listen on for the public API (and for participants' decision queries).
    #[arg(long, env = "LEDGER_LISTEN", default_value = "127.0.0.1:7100")]
    listen: String,
    /// Directory for the decision log (created if missing). Restart with the same one to recover.
    #[arg(long, env = "LEDGER_DATA", default_value = "data/coordinator")]
    data: PathBuf,
    /// Comma-separated participant base URLs, e.g. http://127.0.0.1:7101,http://127.0.0.1:7102. Fixed at first
    /// start: a different count is refused, since accounts would map to other shards.
    #[arg(long, env = "LEDGER_PARTICIPANTS", value_delimiter = ',', required = true)]
    participants: Vec<String>,
    /// URL participants should use to reach this coordinator (default: http://<listen address>).
    #[arg(long, env = "LEDGER_ADVERTISE_URL")]
    advertise_url: Option<String>,
    /// A participant that has not answered Prepare within this many milliseconds aborts the transfer (503).
    #[arg(long, env = "LEDGER_PREPARE_TIMEOUT_MS", default_value_t = CoreConfig::default().prepare_timeout_ms)]
    prepare_timeout_ms: u64,
    /// Accepted so existing command lines keep working; it no longer changes anything. A committed transfer is
    /// answered as soon as its decision is durable, and reads reach a shard on the same ordered stream behind
    /// the commit, so the client's next read sees the new balances without the answer waiting for the shards.
    #[arg(long, env = "LEDGER_COMMIT_ACK_WAIT_MS", default_value_t = 1_000)]
    commit_ack_wait_ms: u64,
    /// Timeout for account reads, account creation and health checks sent to participants (milliseconds).
    #[arg(long, env = "LEDGER_PARTICIPANT_TIMEOUT_MS", default_value_t = 2_000)]
    participant_timeout_ms: u64,
    /// Transfers being decided at once; more are refused with 503 and Retry-After.
    #[arg(long, env = "LEDGER_TRANSFERS_IN_FLIGHT_MAX", default_value_t = CoreConfig::default().transfers_in_flight_max)]
    transfers_in_flight_max: usize,
    /// Transfers in flight below which a new one runs as a parallel commit (its staging fsync beside the
    /// shards' prepare fsyncs: lower latency); from there on it waits for its decision fsync after the votes,
    /// which one burst of transfers shares (less CPU under load). 0: never.
    #[arg(long, env = "LEDGER_PARALLEL_COMMITS_MAX", default_value_t = CoreConfig::default().parallel_commits_max)]
    parallel_commits_max: usize,
    /// Log format on stderr: text or json. Verbosity follows RUST_LOG (default info).
    #[arg(long, env = "LEDGER_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
    /// File holding the cluster secret that every internal call carries (required unless --listen is a
    /// loopback address). The participants must be given the same file.
    #[arg(long, env = "LEDGER_CLUSTER_TOKEN_FILE")]
    cluster_token_file: Option<PathBuf>,
    /// File of client API tokens, one `<name> <admin|client> <token>` per line. When given, every route but
    /// GET /health needs `Authorization: Bearer <token>`; creating accounts needs an admin token.
    #[arg(long, env = "LEDGER_API_TOKENS_FILE")]
    api_tokens_file: Option<PathBuf>,
    /// Connections served at once; more wait until one closes.
    #[arg(long, env = "LEDGER_CONNECTIONS_MAX", default_value_t = 4_096)]
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
        tracing::warn!("--no-fsync: acknowledged transfers can be lost; never use this for real money");
    }
    let cluster_token = cli.cluster_token_file.as_deref().map(common::auth::ClusterToken::read).transpose();
    let api_tokens = cli.api_tokens_file.as_deref().map(common::auth::ApiTokens::read).transpose();
    let (cluster_token, api_tokens) = match (cluster_token, api_tokens) {
        (Ok(c), Ok(a)) => (c, a),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("coordinator: {e}");
            return ExitCode::FAILURE;
        }
    };
    let config = coordinator::Config {
        data_dir: cli.data,
        participants: cli.participants,
        advertise_url: cli.advertise_url,
        store: StoreOptions {
            durability: if cli.no_fsync { Durability::NoFsync } else { Durability::Fsync },
            cache_bytes: cli.cache_mb * 1024 * 1024,
        },
        prepare_timeout: Duration::from_millis(cli.prepare_timeout_ms),
        commit_ack_wait: Duration::from_millis(cli.commit_ack_wait_ms),
        participant_call_timeout: Duration::from_millis(cli.participant_timeout_ms),
        transfers_in_flight_max: cli.transfers_in_flight_max.max(1),
        parallel_commits_max: cli.parallel_commits_max,
        cluster_token,
        api_tokens,
        connections_max: cli.connections_max,
        request_timeout: Duration::from_millis(cli.request_timeout_ms),
    };
    match coordinator::run(listener, config, common::http::shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "coordinator stopped");
            eprintln!("coordinator: {e}");
            ExitCode::FAILURE
        }
    }
}
