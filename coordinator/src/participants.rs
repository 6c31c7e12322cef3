//! Clients for the participants. Prepares and decisions are queued per participant and sent in batches: a
//! batcher task takes everything waiting, sends it as one HTTP request, and hands each caller its own answer.
//! With a bounded number of requests in flight per participant, batches grow by themselves under load.

use common::crash;
use common::ledger::ShardId;
use common::wire::{
    self, DecideAck, DecideBatch, DecideItem, DecideReply, Decision, PrepareBatch, PrepareItem, PrepareReply, Vote,
};
use serde::{de::DeserializeOwned, Serialize};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, Semaphore};

/// Items in one request: bounds a request's size and a participant's time under its lock.
const BATCH_ITEMS_MAX: usize = 512;
/// Requests in flight to one participant per kind: enough to keep it busy while the previous batch fsyncs.
const INFLIGHT_BATCHES_MAX: usize = 4;
/// Callers that may queue for one participant before `call` waits for room.
const QUEUE_MAX: usize = 16_384;
/// Backoff bounds while a participant cannot be introduced to.
const JOIN_RETRY_MIN: Duration = Duration::from_millis(100);
const JOIN_RETRY_MAX: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    #[error("participant unreachable or failed: {0}")]
    Failed(String),
}

/// One kind of batched call.
trait BatchKind: Send + 'static {
    type Item: Serialize + Send + 'static;
    type Answer: Send + 'static;
    type Request: Serialize + Send;
    type Reply: DeserializeOwned;
    const PATH: &'static str;
    fn request(items: Vec<Self::Item>) -> Self::Request;
    fn answers(reply: Self::Reply) -> Vec<Self::Answer>;
    /// The crash point to reach once this batch's answer has arrived.
    fn crash_point(items: &[Self::Item]) -> Option<&'static str>;
}

struct Prepare;
impl BatchKind for Prepare {
    /// The item and the name of the API token that submitted it.
    type Item = (PrepareItem, Option<String>);
    type Answer = Vote;
    type Request = PrepareBatch;
    type Reply = PrepareReply;
    const PATH: &'static str = wire::PATH_PREPARE;
    fn request(items: Vec<(PrepareItem, Option<String>)>) -> PrepareBatch {
        let (items, actors) = items.into_iter().unzip();
        PrepareBatch { items, actors }
    }
    fn answers(reply: PrepareReply) -> Vec<Vote> {
        reply.votes
    }
    fn crash_point(_items: &[(PrepareItem, Option<String>)]) -> Option<&'static str> {
        Some(crash::COORDINATOR_PREPARE_SENT)
    }
}

struct Decide;
impl BatchKind for Decide {
    type Item = DecideItem;
    type Answer = DecideAck;
    type Request = DecideBatch;
    type Reply = DecideReply;
    const PATH: &'static str = wire::PATH_DECIDE;
    fn request(items: Vec<DecideItem>) -> DecideBatch {
        DecideBatch { items }
    }
    fn answers(reply: DecideReply) -> Vec<DecideAck> {
        reply.acks
    }
    fn crash_point(items: &[DecideItem]) -> Option<&'static str> {
        items.iter().any(|i| i.decision == Decision::Commit).then_some(crash::COORDINATOR_COMMIT_SENT)
    }
}

type Job<K> = (<K as BatchKind>::Item, oneshot::Sender<Result<<K as BatchKind>::Answer, CallError>>);

pub struct ParticipantClient {
    pub shard: ShardId,
    pub url: String,
    http: reqwest::Client,
    prepares: mpsc::Sender<Job<Prepare>>,
    decisions: mpsc::Sender<Job<Decide>>,
}

impl ParticipantClient {
    pub fn new(shard: ShardId, url: String, http: reqwest::Client, call_timeout: Duration) -> Self {
        let (prepares, prepare_rx) = mpsc::channel(QUEUE_MAX);
        let (decisions, decide_rx) = mpsc::channel(QUEUE_MAX);
        tokio::spawn(batcher::<Prepare>(http.clone(), url.clone(), call_timeout, prepare_rx));
        tokio::spawn(batcher::<Decide>(http.clone(), url.clone(), call_timeout, decide_rx));
        ParticipantClient { shard, url, http, prepares, decisions }
    }

    pub async fn prepare(&self, item: PrepareItem, actor: Option<String>) -> Result<Vote, CallError> {
        call::<Prepare>(&self.prepares, (item, actor)).await
    }

    pub async fn decide(&self, item: DecideItem) -> Result<DecideAck, CallError> {
        call::<Decide>(&self.decisions, item).await
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

    /// The plain (unbatched) HTTP client, for account calls and health checks.
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }
}

async fn call<K: BatchKind>(queue: &mpsc::Sender<Job<K>>, item: K::Item) -> Result<K::Answer, CallError> {
    let (tx, rx) = oneshot::channel();
    queue.send((item, tx)).await.map_err(|_| CallError::Failed("client stopped".into()))?;
    rx.await.map_err(|_| CallError::Failed("batch dropped".into()))?
}

async fn batcher<K: BatchKind>(
    http: reqwest::Client,
    url: String,
    call_timeout: Duration,
    mut rx: mpsc::Receiver<Job<K>>,
) {
    let slots = Arc::new(Semaphore::new(INFLIGHT_BATCHES_MAX));
    let endpoint = format!("{url}{}", K::PATH);
    while let Some(first) = rx.recv().await {
        // Waiting for a slot before draining lets the batch grow while earlier requests are in flight.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut jobs = vec![first];
        while jobs.len() < BATCH_ITEMS_MAX {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        let http = http.clone();
        let endpoint = endpoint.clone();
        tokio::spawn(async move {
            let (items, replies): (Vec<K::Item>, Vec<_>) = jobs.into_iter().unzip();
            let crash_point = K::crash_point(&items);
            let result = send::<K>(&http, &endpoint, call_timeout, K::request(items)).await;
            drop(slot);
            match result {
                Ok(answers) if answers.len() == replies.len() => {
                    if let Some(point) = crash_point {
                        crash::point(point);
                    }
                    for (reply, answer) in replies.into_iter().zip(answers) {
                        let _ = reply.send(Ok(answer));
                    }
                }
                Ok(answers) => {
                    let error = CallError::Failed(format!("{} answers for {} items", answers.len(), replies.len()));
                    replies.into_iter().for_each(|r| drop(r.send(Err(error.clone()))));
                }
                Err(error) => replies.into_iter().for_each(|r| drop(r.send(Err(error.clone())))),
            }
        });
    }
}

async fn send<K: BatchKind>(
    http: &reqwest::Client,
    endpoint: &str,
    call_timeout: Duration,
    body: K::Request,
) -> Result<Vec<K::Answer>, CallError> {
    let reply = http
        .post(endpoint)
        .timeout(call_timeout)
        .json(&body)
        .send()
        .await
        .map_err(|e| CallError::Failed(e.to_string()))?;
    if !reply.status().is_success() {
        return Err(CallError::Failed(format!("{endpoint} answered {}", reply.status())));
    }
    let reply: K::Reply = reply.json().await.map_err(|e| CallError::Failed(e.to_string()))?;
    Ok(K::answers(reply))
}
