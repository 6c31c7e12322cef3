//! A participant: owns one shard of the accounts, votes on Prepare (holding the debited funds), applies or
//! releases on the decision, and after a crash asks the coordinator about every transfer it is in doubt on.
//!
//! `run` is the whole server; `main.rs` only parses the command line. Tests run it in-process or as a binary.

mod apply;
mod books;
pub mod journal;
mod resolver;
mod server;
pub mod storage;
mod stream;

use common::auth::{AuthConfigError, ClusterToken};
use common::ledger::ShardId;
use common::store::{Store, StoreError, StoreOptions};
use protocol::participant_core::ParticipantCore;
use protocol::resolver::{ResolverConfig, ResolverCore};
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct Config {
    pub shard: ShardId,
    pub data_dir: PathBuf,
    pub store: StoreOptions,
    /// A prepared transfer undecided for this long is asked about (the decision may have been lost).
    pub in_doubt_after: Duration,
    /// Timeout of one decision query to the coordinator.
    pub query_timeout: Duration,
    /// The cluster secret internal calls must carry; `None` only on loopback.
    pub cluster_token: Option<ClusterToken>,
    /// Connections served at once; more wait in the kernel's backlog.
    pub connections_max: usize,
    /// Longest a request may take, body included.
    pub request_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Load(#[from] storage::LoadError),
    #[error("server failed: {0}")]
    Serve(#[from] std::io::Error),
    #[error("cannot build the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
    #[error(transparent)]
    Auth(#[from] AuthConfigError),
}

/// State shared by the request handlers, the streams and the in-doubt resolver.
pub(crate) struct Node {
    pub shard: ShardId,
    pub store: Store,
    /// Every rule of the shard, and its state: the machine, the journal's counters, the resolver, and what
    /// waits for durability. Held only for in-memory work and the store's in-memory apply, never across an
    /// await, so transfers on a hot account wait for each other for microseconds, not for an fsync.
    core: Mutex<ParticipantCore>,
    /// Names each stream connection for the core, which holds its replies apart.
    pub next_link: AtomicU64,
    /// The cluster this shard belongs to: adopted from the first coordinator call, then fixed.
    pub cluster_id: tokio::sync::Mutex<Option<uuid::Uuid>>,
    pub http: reqwest::Client,
    pub config: Config,
}

impl Node {
    pub fn core(&self) -> MutexGuard<'_, ParticipantCore> {
        // A panic while holding the lock means an invariant broke mid-change: memory may no longer match disk.
        self.core.lock().unwrap_or_else(|_| {
            tracing::error!("participant state poisoned by an earlier panic; stopping to recover from disk");
            std::process::abort()
        })
    }
}

/// Opens the store, recovers, serves until `shutdown` resolves, then lets in-flight requests finish.
pub async fn run(
    listener: tokio::net::TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    common::auth::check_listen(listener.local_addr()?, config.cluster_token.as_ref())?;
    let store = {
        let dir = config.data_dir.clone();
        let options = config.store;
        tokio::task::spawn_blocking(move || storage::open(&dir, options))
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))??
    };
    let (machine, journal) = storage::load(&store, config.shard).await?;
    let cluster_id = storage::cluster_id(&store)?;
    let prepared = machine.prepared().count();
    tracing::info!(shard = config.shard, accounts = machine.accounts().count(), prepared, "state recovered");
    let in_doubt_after_ms = u64::try_from(config.in_doubt_after.as_millis()).unwrap_or(u64::MAX);
    let resolver = ResolverCore::new(ResolverConfig::new(in_doubt_after_ms), common::http::now_unix_ms());
    let http = reqwest::Client::builder().timeout(config.query_timeout).build()?;
    let node = Arc::new(Node {
        shard: config.shard,
        store,
        core: Mutex::new(ParticipantCore::new(machine, journal, resolver)),
        next_link: AtomicU64::new(0),
        cluster_id: tokio::sync::Mutex::new(cluster_id),
        http,
        config,
    });
    let resolver = tokio::spawn(resolver::run(node.clone()));
    let app = server::router(node.clone());
    tracing::info!(shard = node.shard, addr = %listener.local_addr()?, "participant ready");
    let listener = common::http::LimitedListener::new(listener, node.config.connections_max);
    let served = axum::serve(listener, app).with_graceful_shutdown(shutdown).await;
    resolver.abort();
    node.store.sync().await.ok();
    served?;
    Ok(())
}
