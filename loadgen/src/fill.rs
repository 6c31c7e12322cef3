//! Builds transfer history quickly through the public API (`ledger-fill`, the history benchmark and the
//! history test): C clients, each with its own keep-alive connection, send N cross-shard transfers in all,
//! each between a random account on one shard and one on another, amount 1, random direction, fresh UUID.
//! Going through the public API means the history is exactly what real clients leave: every record the
//! nodes write for a transfer is written the same way.

use crate::drill::Rng;
use crate::http1::Http1Client;
use common::ledger::{shard_of, AccountId};
use futures::stream::{self, StreamExt};
use serde_json::{json, Value};
use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One request's timeout: the coordinator answers within its own 30 s request timeout.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Account creations in flight at once: enough for group commit to batch them.
const CREATE_CONCURRENCY: usize = 64;
/// Transfers kept (id and body) so a caller can replay them as duplicates.
pub const SAMPLE_MAX: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum FillError {
    #[error("bad generated account id {0}")]
    BadAccount(String),
    #[error("creating account {id}: {detail}")]
    Create { id: String, detail: String },
    #[error("at least two shards with accounts are needed for cross-shard transfers")]
    OneShard,
    #[error("client for {0}: {1}")]
    Client(String, String),
}

/// `per_shard` ids on each of `shards` shards, found by walking `<prefix>-00000`, `<prefix>-00001`, ... through
/// the hash the coordinator places accounts with.
pub fn pick_accounts(prefix: &str, shards: u32, per_shard: usize) -> Result<Vec<Vec<String>>, FillError> {
    let mut by_shard: Vec<Vec<String>> = (0..shards).map(|_| Vec::with_capacity(per_shard)).collect();
    let mut i = 0u64;
    while by_shard.iter().any(|ids| ids.len() < per_shard) {
        let id = format!("{prefix}-{i:05}");
        let account = AccountId::new(&id).map_err(|_| FillError::BadAccount(id.clone()))?;
        let ids = &mut by_shard[shard_of(&account, shards) as usize];
        if ids.len() < per_shard {
            ids.push(id);
        }
        i += 1;
    }
    Ok(by_shard)
}

/// Creates every account with `balance` through `POST <url>/accounts`, checking each landed on the shard it
/// was picked for. An account that already exists counts as created when `reuse` is set.
pub async fn create_accounts(
    http: &reqwest::Client,
    url: &str,
    token: Option<&str>,
    accounts: &[Vec<String>],
    balance: i64,
    reuse: bool,
) -> Result<(), FillError> {
    let all = accounts.iter().enumerate().flat_map(|(shard, ids)| ids.iter().map(move |id| (shard, id)));
    let results: Vec<Result<(), FillError>> = stream::iter(all)
        .map(|(shard, id)| async move {
            let failed = |detail: String| FillError::Create { id: id.clone(), detail };
            let mut request = http.post(format!("{url}/accounts")).json(&json!({"id": id, "balance": balance}));
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            let reply = request.send().await.map_err(|e| failed(e.to_string()))?;
            let status = reply.status().as_u16();
            let body: Value = reply.json().await.unwrap_or(Value::Null);
            if status == 409 && reuse {
                return Ok(());
            }
            if status != 201 {
                return Err(failed(format!("{status} {body}")));
            }
            if body["shard"].as_u64() != Some(shard as u64) {
                return Err(failed(format!("meant for shard {shard}, but the coordinator says {body}")));
            }
            Ok(())
        })
        .buffer_unordered(CREATE_CONCURRENCY)
        .collect()
        .await;
    results.into_iter().collect()
}

#[derive(Clone, Debug)]
pub struct Fill {
    /// The coordinator's base URL.
    pub url: String,
    /// A client API token, when the coordinator asks for one.
    pub token: Option<String>,
    pub transfers: u64,
    pub clients: usize,
    pub seed: u64,
}

#[derive(Debug, Default)]
pub struct Filled {
    pub committed: u64,
    pub aborted: u64,
    /// Transport failures and answers that were neither committed nor aborted.
    pub errors: u64,
    pub elapsed: Duration,
    /// Up to [`SAMPLE_MAX`] committed transfers: id and body as sent.
    pub sample: Vec<(uuid::Uuid, Value)>,
}

impl Filled {
    pub fn rate(&self) -> f64 {
        self.committed as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn merge(&mut self, other: Filled) {
        self.committed += other.committed;
        self.aborted += other.aborted;
        self.errors += other.errors;
        let room = SAMPLE_MAX.saturating_sub(self.sample.len());
        self.sample.extend(other.sample.into_iter().take(room));
    }
}

/// Sends `fill.transfers` transfers between the accounts of `accounts` (ids by shard) and counts the answers.
pub async fn fill(fill: &Fill, accounts: &[Vec<String>]) -> Result<Filled, FillError> {
    let shards: Vec<Vec<String>> = accounts.iter().filter(|ids| !ids.is_empty()).cloned().collect();
    if shards.len() < 2 {
        return Err(FillError::OneShard);
    }
    let shards = Arc::new(shards);
    let started = Instant::now();
    let clients = fill.clients.max(1) as u64;
    let mut tasks = Vec::with_capacity(clients as usize);
    for c in 0..clients {
        // The first `transfers % clients` clients send one more.
        let count = fill.transfers / clients + u64::from(c < fill.transfers % clients);
        let mut http = Http1Client::new(&format!("{}/transfers", fill.url), REQUEST_TIMEOUT)
            .map_err(|e| FillError::Client(fill.url.clone(), e.to_string()))?;
        if let Some(token) = &fill.token {
            http = http.with_bearer(token);
        }
        let rng = Rng::new(fill.seed.wrapping_mul(1_000_003).wrapping_add(c));
        tasks.push(tokio::spawn(client(http, shards.clone(), rng, count)));
    }
    let mut total = Filled::default();
    for task in tasks {
        match task.await {
            Ok(part) => total.merge(part),
            Err(e) => return Err(FillError::Client(fill.url.clone(), format!("a client task failed: {e}"))),
        }
    }
    total.elapsed = started.elapsed();
    Ok(total)
}

async fn client(mut http: Http1Client, shards: Arc<Vec<Vec<String>>>, mut rng: Rng, count: u64) -> Filled {
    let mut out = Filled::default();
    let mut body = Vec::with_capacity(256);
    for _ in 0..count {
        let s = rng.below(shards.len() as u64) as usize;
        let t = (s + 1 + rng.below(shards.len() as u64 - 1) as usize) % shards.len();
        let from = &shards[s][rng.below(shards[s].len() as u64) as usize];
        let to = &shards[t][rng.below(shards[t].len() as u64) as usize];
        let id = uuid::Uuid::new_v4();
        body.clear();
        // Account ids are [A-Za-z0-9_-], so they need no JSON escaping; writing to a Vec cannot fail.
        let _ = write!(body, r#"{{"from":"{from}","to":"{to}","amount":1,"id":"{id}"}}"#);
        let status = match http.post_json(&body).await {
            Ok((_, reply)) => {
                serde_json::from_slice::<Value>(reply).ok().and_then(|v| v["status"].as_str().map(str::to_owned))
            }
            Err(_) => None,
        };
        match status.as_deref() {
            Some("committed") => {
                out.committed += 1;
                if out.sample.len() < SAMPLE_MAX {
                    out.sample.push((id, json!({"id": id, "from": from, "to": to, "amount": 1})));
                }
            }
            Some("aborted") => out.aborted += 1,
            _ => out.errors += 1,
        }
    }
    out
}
