//! The coordinator: serves the public HTTP API, runs two-phase commit across the participants, and keeps its
//! decisions in a write-ahead log so that it can finish every committed transfer after a crash.
//!
//! `run` is the whole server; `main.rs` only parses the command line.

mod api;
pub use api::{BATCH_BODY_BYTES_MAX, BATCH_ITEMS_MAX};
mod audit;
pub mod engine;
mod metric;
mod participants;
mod rates;
pub mod wal;

use common::auth::{ApiTokens, AuthConfigError, ClusterToken};
use common::store::StoreOptions;
use engine::{Engine, EngineConfig};
use participants::ParticipantClient;
use reqwest::header::{HeaderMap, HeaderValue};
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

/// Idle keep-alive connections kept per participant: enough for the batchers and account calls.
const POOL_IDLE_PER_HOST_MAX: usize = 64;

/// The default of `--parallel-commits-max` (see the core's constant for why).
pub use protocol::coordinator_core::PARALLEL_COMMITS_MAX;

#[derive(Clone, Debug)]
pub struct Config {
    pub data_dir: PathBuf,
    /// Participant base URLs; shard i is the i-th.
    pub participants: Vec<String>,
    /// URL participants use to reach this coordinator; defaults to the listening address.
    pub advertise_url: Option<String>,
    pub store: StoreOptions,
    pub prepare_timeout: Duration,
    /// Accepted for existing command lines; answers no longer wait for the shards' acks (reads travel behind
    /// the commit on the same ordered stream, so a client reads its own writes without waiting).
    pub commit_ack_wait: Duration,
    /// Timeout of account reads, account creation and health checks sent to a participant.
    pub participant_call_timeout: Duration,
    pub transfers_in_flight_max: usize,
    /// Transfers in flight below which a new one is a parallel commit (see `--parallel-commits-max`).
    pub parallel_commits_max: usize,
    /// The cluster secret internal calls carry; `None` only on loopback.
    pub cluster_token: Option<ClusterToken>,
    /// Client API tokens; `None` leaves the public API open (every route but /health needs one otherwise).
    pub api_tokens: Option<ApiTokens>,
    /// Connections served at once; more wait in the kernel's backlog.
    pub connections_max: usize,
    /// Longest a request may take, body included.
    pub request_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("at least one participant URL is required")]
    NoParticipants,
    #[error(transparent)]
    Wal(#[from] wal::WalError),
    #[error("server failed: {0}")]
    Serve(#[from] std::io::Error),
    #[error("cannot build the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
    #[error(transparent)]
    Auth(#[from] AuthConfigError),
    #[error("the cluster token is not a valid HTTP header value")]
    BadToken,
}

/// Opens the log, starts re-delivering unfinished commits, serves until `shutdown`, then drains requests.
pub async fn run(
    listener: tokio::net::TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    if config.participants.is_empty() {
        return Err(StartError::NoParticipants);
    }
    common::auth::check_listen(listener.local_addr()?, config.cluster_token.as_ref())?;
    let shard_count = config.participants.len() as u32;
    let wal = wal::Wal::open(&config.data_dir, config.store, shard_count).await?;
    let local = listener.local_addr()?;
    let advertise_url = config.advertise_url.clone().unwrap_or_else(|| {
        let host = if local.ip().is_unspecified() { "127.0.0.1".to_string() } else { local.ip().to_string() };
        format!("http://{host}:{}", local.port())
    });
    // Every call to a participant carries the cluster's secret and id.
    let mut internal_headers = HeaderMap::new();
    let cluster_id = HeaderValue::from_str(&wal.cluster_id().to_string()).map_err(|_| StartError::BadToken)?;
    internal_headers.insert(common::wire::HEADER_CLUSTER_ID, cluster_id);
    if let Some(token) = &config.cluster_token {
        let mut value = HeaderValue::from_str(token.as_str()).map_err(|_| StartError::BadToken)?;
        value.set_sensitive(true);
        internal_headers.insert(common::wire::HEADER_CLUSTER_TOKEN, value);
    }
    let http = reqwest::Client::builder()
        .default_headers(internal_headers)
        .pool_max_idle_per_host(POOL_IDLE_PER_HOST_MAX)
        .tcp_nodelay(true)
        .build()?;
    let participants = config
        .participants
        .iter()
        .enumerate()
        .map(|(shard, url)| {
            let url = url.trim_end_matches('/').to_string();
            ParticipantClient::new(shard as u32, url, http.clone())
        })
        .collect();
    for (shard, url) in config.participants.iter().enumerate() {
        let url = url.trim_end_matches('/').to_string();
        tokio::spawn(ParticipantClient::join(http.clone(), shard as u32, url));
    }
    let engine_config = EngineConfig {
        shard_count,
        coordinator_url: advertise_url.clone(),
        prepare_timeout: config.prepare_timeout,
        transfers_in_flight_max: config.transfers_in_flight_max,
        parallel_commits_max: config.parallel_commits_max,
        cluster_id: wal.cluster_id().to_string(),
        cluster_token: config.cluster_token.as_ref().map(|t| t.as_str().to_owned()),
    };
    let engine = Engine::start(engine_config, wal, participants)?;
    let probes = tokio::spawn(engine.clone().probe_participants_forever());
    let app = api::router(engine.clone(), &config);
    let cluster_id = engine.wal.cluster_id();
    tracing::info!(addr = %local, advertise = %advertise_url, shards = shard_count, %cluster_id, "coordinator ready");
    let listener = common::http::LimitedListener::new(listener, config.connections_max);
    let served = axum::serve(listener, app).with_graceful_shutdown(shutdown).await;
    probes.abort();
    engine.wal.sync().await.ok();
    served?;
    Ok(())
}
