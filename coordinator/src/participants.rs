//! The coordinator's connections to the participants: a plain HTTP client per participant for the operator
//! calls (accounts, journal, audit, health, the introduction at start-up), and the [`Link`] that keeps the
//! binary stream to each one open for the protocol's hot path (see `common::stream`).

use common::crash;
use common::ledger::{ShardId, TransferId};
use common::stream::{self, Down, StreamError, Up};
use common::wire;
use futures::{SinkExt, StreamExt};
use protocol::msg::{FromShard, ToShard};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Backoff bounds while a participant cannot be introduced to.
const JOIN_RETRY_MIN: Duration = Duration::from_millis(100);
const JOIN_RETRY_MAX: Duration = Duration::from_secs(5);
/// Backoff bounds while a participant's stream cannot be opened.
const LINK_RETRY_MIN: Duration = Duration::from_millis(50);
const LINK_RETRY_MAX: Duration = Duration::from_secs(2);
/// Frames queued for one link's socket. The core's work is bounded by the transfers in flight, so a link this
/// far behind is stuck, and is dropped.
const LINK_QUEUE_FRAMES_MAX: usize = 4_096;
/// Frames sent and not yet answered on one link: a participant answers every frame, in order.
const LINK_UNANSWERED_MAX: usize = LINK_QUEUE_FRAMES_MAX + 64;

pub struct ParticipantClient {
    pub shard: ShardId,
    pub url: String,
    http: reqwest::Client,
}

impl ParticipantClient {
    pub fn new(shard: ShardId, url: String, http: reqwest::Client) -> Self {
        ParticipantClient { shard, url, http }
    }

    /// Introduces this coordinator until the participant accepts: binds it to the cluster id and checks it
    /// owns the shard the participant list says. Runs in the background from start-up.
    pub async fn join(http: reqwest::Client, shard: ShardId, url: String) {
        let mut delay = JOIN_RETRY_MIN;
        loop {
            let reply = http.post(format!("{url}{}", wire::PATH_JOIN)).json(&wire::Join { shard }).send().await;
            match reply {
                Ok(r) if r.status().is_success() => {
                    tracing::info!(shard, %url, "participant joined");
                    return;
                }
                Ok(r) => {
                    let body = r.text().await.unwrap_or_default();
                    tracing::error!(shard, %url, %body, "participant refused to join this cluster");
                }
                Err(error) => tracing::debug!(shard, %url, %error, "participant not reachable yet"),
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(JOIN_RETRY_MAX);
        }
    }

    /// Whether the participant answers `GET /health` with a success within `timeout`.
    pub async fn is_up(&self, timeout: Duration) -> bool {
        let probe = self.http.get(format!("{}/health", self.url)).timeout(timeout).send().await;
        probe.is_ok_and(|r| r.status().is_success())
    }

    /// The plain HTTP client, for account calls and health checks.
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// The shard's audit snapshot, with the commits it applied after journal seq `after_seq`.
    pub async fn audit_snapshot(&self, after_seq: Option<u64>) -> Result<wire::ShardAudit, ShardCallError> {
        let mut url = format!("{}{}", self.url, wire::PATH_AUDIT);
        if let Some(after) = after_seq {
            url.push_str(&format!("?after_seq={after}"));
        }
        let reply = self.http.get(url).send().await.map_err(ShardCallError::unavailable)?;
        if reply.status() == reqwest::StatusCode::CONFLICT {
            return Err(ShardCallError::SnapshotTooOld);
        }
        ShardCallError::json_of(reply).await
    }

    /// The journal seq at which the shard applied each of `ids`, if it did.
    pub async fn commit_seqs(&self, ids: Vec<TransferId>) -> Result<Vec<Option<u64>>, ShardCallError> {
        let url = format!("{}{}", self.url, wire::PATH_COMMIT_SEQS);
        let reply = self.http.post(url).json(&wire::CommitSeqsRequest { ids }).send().await;
        let reply: wire::CommitSeqsReply = ShardCallError::json_of(reply.map_err(ShardCallError::unavailable)?).await?;
        Ok(reply.seqs)
    }
}

/// Why a plain HTTP call to a participant gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum ShardCallError {
    #[error("{0}")]
    Unavailable(String),
    /// Its list of recent commits no longer reaches back to the seq asked about (it restarted): take a new
    /// snapshot.
    #[error("snapshot too old")]
    SnapshotTooOld,
}

impl ShardCallError {
    fn unavailable(error: impl std::fmt::Display) -> Self {
        ShardCallError::Unavailable(error.to_string())
    }

    /// The body of a successful reply; any other status is the shard being unavailable.
    async fn json_of<T: serde::de::DeserializeOwned>(reply: reqwest::Response) -> Result<T, ShardCallError> {
        if !reply.status().is_success() {
            return Err(ShardCallError::Unavailable(format!("answered {}", reply.status())));
        }
        reply.json().await.map_err(ShardCallError::unavailable)
    }
}

/// What kinds of work a frame carries, for the round-trip histograms.
#[derive(Clone, Copy, Debug, Default)]
struct Kinds {
    prepares: bool,
    commits: bool,
    aborts: bool,
}

/// A frame on its way to a participant.
pub struct Outgoing {
    frame: bytes::Bytes,
    kinds: Kinds,
}

impl Outgoing {
    pub fn new(items: Vec<ToShard>) -> Self {
        let mut kinds = Kinds::default();
        for item in &items {
            match item {
                ToShard::Prepare { .. } => kinds.prepares = true,
                ToShard::Decide { decision: wire::Decision::Commit, .. } | ToShard::Capture { .. } => {
                    kinds.commits = true
                }
                ToShard::Decide { .. } => kinds.aborts = true,
                ToShard::Read { .. } => {}
            }
        }
        Outgoing { frame: stream::encode(&Up::Items(items)), kinds }
    }
}

/// What a link reports to the core task.
pub(crate) enum LinkEvent {
    Up {
        shard: ShardId,
        generation: u64,
        frames: mpsc::Sender<Outgoing>,
    },
    Down {
        shard: ShardId,
        generation: u64,
    },
    /// A connection attempt failed while no link was up (reported once per outage).
    Failed {
        shard: ShardId,
    },
    Replies {
        shard: ShardId,
        replies: Vec<FromShard>,
    },
}

/// Keeps the stream to one participant open: connects, upgrades, reports the link up to the core task,
/// forwards frames both ways with heartbeats, and on any failure reports the link down and reconnects with
/// backoff.
pub(crate) struct Link<E> {
    pub shard: ShardId,
    pub url: String,
    pub cluster_id: String,
    pub cluster_token: Option<String>,
    pub events: mpsc::Sender<E>,
    /// Work is waiting: retry now rather than at the end of the backoff.
    pub wake: Arc<tokio::sync::Notify>,
}

impl<E: From<LinkEvent> + Send + 'static> Link<E> {
    pub async fn run_forever(self) {
        let address = address_of(&self.url);
        let mut backoff = LINK_RETRY_MIN;
        let mut generation = 0;
        let mut refused_before = false;
        loop {
            match stream::connect(&address, &self.cluster_id, self.cluster_token.as_deref()).await {
                Ok(framed) => {
                    backoff = LINK_RETRY_MIN;
                    refused_before = false;
                    generation += 1;
                    let (frames, frame_rx) = mpsc::channel(LINK_QUEUE_FRAMES_MAX);
                    let up = E::from(LinkEvent::Up { shard: self.shard, generation, frames });
                    if self.events.send(up).await.is_err() {
                        return;
                    }
                    let ended = self.serve(framed, frame_rx).await;
                    tracing::warn!(shard = self.shard, reason = %ended, "stream to participant ended");
                    if self.events.send(E::from(LinkEvent::Down { shard: self.shard, generation })).await.is_err() {
                        return;
                    }
                }
                Err(error) => {
                    match &error {
                        StreamError::Refused(why) if !refused_before => {
                            refused_before = true;
                            tracing::error!(shard = self.shard, url = %self.url, %why, "participant refused the stream");
                        }
                        _ => tracing::debug!(shard = self.shard, %error, "participant stream not open"),
                    }
                    if self.events.send(E::from(LinkEvent::Failed { shard: self.shard })).await.is_err() {
                        return;
                    }
                }
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => backoff = (backoff * 2).min(LINK_RETRY_MAX),
                () = self.wake.notified() => {}
            }
        }
    }

    /// Runs one connection until it fails, the participant falls silent, or the core task drops it.
    async fn serve(
        &self,
        framed: stream::FramedStream<tokio::net::TcpStream>,
        mut frames: mpsc::Receiver<Outgoing>,
    ) -> StreamError {
        let (mut sink, mut source) = framed.split();
        let sent: Arc<Mutex<VecDeque<(Instant, Kinds)>>> = Arc::default();
        let shard_label = self.shard.to_string();
        let writer = {
            let sent = sent.clone();
            async move {
                loop {
                    let next = tokio::time::timeout(stream::HEARTBEAT_INTERVAL, frames.recv()).await;
                    let (frame, kinds) = match next {
                        Err(_) => (stream::encode(&Up::Heartbeat), None),
                        Ok(None) => return StreamError::Closed,
                        Ok(Some(out)) => (out.frame, Some(out.kinds)),
                    };
                    if let Some(kinds) = kinds {
                        let mut sent = sent.lock().unwrap_or_else(|p| p.into_inner());
                        if sent.len() >= LINK_UNANSWERED_MAX {
                            return StreamError::Refused("the participant stopped answering frames".into());
                        }
                        sent.push_back((Instant::now(), kinds));
                    }
                    if let Err(e) = sink.send(frame).await {
                        return StreamError::Io(e);
                    }
                    if kinds.is_some() {
                        crash::point(crash::COORDINATOR_FRAME_SENT);
                    }
                }
            }
        };
        let reader = async {
            loop {
                let next = match tokio::time::timeout(stream::SILENCE_TIMEOUT, source.next()).await {
                    Err(_) => return StreamError::Timeout,
                    Ok(None) => return StreamError::Closed,
                    Ok(Some(Err(e))) => return StreamError::Io(e),
                    Ok(Some(Ok(frame))) => frame,
                };
                let replies = match stream::decode::<Down>(&next) {
                    Err(e) => return e,
                    Ok(Down::Heartbeat) => continue,
                    Ok(Down::Replies(replies)) => replies,
                };
                let answered = sent.lock().unwrap_or_else(|p| p.into_inner()).pop_front();
                if let Some((at, kinds)) = answered {
                    let took = at.elapsed();
                    let label = shard_label.clone();
                    if kinds.prepares {
                        metrics::histogram!(crate::metric::PREPARE_SECONDS, "shard" => label.clone()).record(took);
                    }
                    if kinds.commits {
                        metrics::histogram!(crate::metric::COMMIT_SECONDS, "shard" => label.clone()).record(took);
                    }
                    if kinds.aborts {
                        metrics::histogram!(crate::metric::ABORT_SECONDS, "shard" => label).record(took);
                    }
                }
                if self.events.send(E::from(LinkEvent::Replies { shard: self.shard, replies })).await.is_err() {
                    return StreamError::Closed;
                }
            }
        };
        tokio::select! {
            ended = writer => ended,
            ended = reader => ended,
        }
    }
}

/// The address (host:port) of a participant's base URL.
fn address_of(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    rest.split('/').next().unwrap_or(rest).to_owned()
}
