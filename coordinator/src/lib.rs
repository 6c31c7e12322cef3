//! The coordinator: serves the public HTTP API, runs two-phase commit across the participants, and keeps its
//! decisions in a write-ahead log so that it can finish every committed transfer after a crash.
//!
//! `run` is the whole server; `main.rs` only parses the command line.

mod api;
pub mod engine;
mod participants;
pub mod wal;

use common::store::Durability;
use engine::{Engine, EngineConfig};
use participants::ParticipantClient;
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

/// Idle keep-alive connections kept per participant: enough for the batchers and account calls.
const POOL_IDLE_PER_HOST_MAX: usize = 64;

#[derive(Clone, Debug)]
pub struct Config {
    pub data_dir: PathBuf,
    /// Participant base URLs; shard i is the i-th.
    pub participants: Vec<String>,
    /// URL participants use to reach this coordinator; defaults to the listening address.
    pub advertise_url: Option<String>,
    pub durability: Durability,
    pub prepare_timeout: Duration,
    pub commit_ack_wait: Duration,
    /// Timeout of account reads, account creation and health checks sent to a participant.
    pub participant_call_timeout: Duration,
    pub transfers_in_flight_max: usize,
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
    let shard_count = config.participants.len() as u32;
    let wal = wal::Wal::open(&config.data_dir, config.durability, shard_count).await?;
    let local = listener.local_addr()?;
    let advertise_url = config.advertise_url.clone().unwrap_or_else(|| {
        let host = if local.ip().is_unspecified() { "127.0.0.1".to_string() } else { local.ip().to_string() };
        format!("http://{host}:{}", local.port())
    });
    let http = reqwest::Client::builder().pool_max_idle_per_host(POOL_IDLE_PER_HOST_MAX).tcp_nodelay(true).build()?;
    let participants = config
        .participants
        .iter()
        .enumerate()
        .map(|(shard, url)| {
            let url = url.trim_end_matches('/').to_string();
            ParticipantClient::new(shard as u32, url, http.clone(), config.prepare_timeout)
        })
        .collect();
    let engine_config = EngineConfig {
        shard_count,
        coordinator_url: advertise_url.clone(),
        prepare_timeout: config.prepare_timeout,
        commit_ack_wait: config.commit_ack_wait,
        transfers_in_flight_max: config.transfers_in_flight_max,
    };
    let engine = Engine::recover(engine_config, wal, participants)?;
    let redelivery = tokio::spawn(engine.clone().redeliver_forever());
    let app = api::router(engine.clone(), config.participant_call_timeout);
    tracing::info!(addr = %local, advertise = %advertise_url, shards = shard_count, "coordinator ready");
    let served = axum::serve(listener, app).with_graceful_shutdown(shutdown).await;
    redelivery.abort();
    engine.wal.sync().await.ok();
    served?;
    Ok(())
}
