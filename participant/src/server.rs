//! The participant's HTTP routes: the internal protocol calls from the coordinator, account reads, health.
//! Each handler locks the machine, applies its writes, unlocks, waits for the group commit, then answers.

use crate::{books, journal, storage, Node};
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use common::crash;
use common::http::{error_response, now_unix_ms, JsonBody};
use common::ledger::AccountId;
use common::records::PreparedRecord;
use common::store::StoreError;
use common::wire::{
    self, AccountView, AppliedTransfer, CreateAccount, DecideAck, DecideBatch, DecideReply, Join, PrepareBatch,
    PrepareReply, Vote,
};
use protocol::participant::{CreateError, Write};
use serde_json::json;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Metric names of a participant.
pub mod metric {
    pub const VOTES: &str = "ledger_participant_votes_total";
    pub const DECISIONS: &str = "ledger_participant_decisions_total";
    pub const PREPARED: &str = "ledger_participant_prepared_transfers";
    pub const RECOVERY_RESOLVED: &str = "ledger_recovery_in_doubt_resolved_total";

    pub fn describe() {
        metrics::describe_counter!(VOTES, "Prepare votes cast, by vote");
        metrics::describe_counter!(DECISIONS, "Decisions applied, by decision");
        metrics::describe_gauge!(PREPARED, "Prepared transfers awaiting a decision (holding funds)");
        metrics::describe_counter!(RECOVERY_RESOLVED, "In-doubt transfers resolved by asking the coordinator");
    }
}

/// Largest internal request: a batch of up to a few thousand transfers is well under this.
const BODY_BYTES_MAX: usize = 8 * 1024 * 1024;
/// Items in one batch; the coordinator sends far fewer, this only bounds the work one request can ask for.
const BATCH_ITEMS_MAX: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("account already exists")]
    AccountExists,
    #[error("account not found")]
    AccountNotFound,
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("storage unavailable: {0}")]
    Store(#[from] StoreError),
    #[error("stored data unreadable: {0}")]
    Corrupt(String),
    #[error(transparent)]
    SnapshotTooOld(#[from] crate::journal::TooOld),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self {
            ApiError::AccountExists => error_response(StatusCode::CONFLICT, "account_exists", self.to_string()),
            ApiError::AccountNotFound => error_response(StatusCode::NOT_FOUND, "account_not_found", self.to_string()),
            ApiError::Invalid(m) => error_response(StatusCode::BAD_REQUEST, "invalid_request", m),
            ApiError::Store(e) => {
                tracing::error!(error = %e, "storage error");
                error_response(StatusCode::SERVICE_UNAVAILABLE, "storage_unavailable", "storage is unavailable")
            }
            ApiError::Corrupt(e) => {
                tracing::error!(error = %e, "unreadable stored data");
                error_response(StatusCode::SERVICE_UNAVAILABLE, "storage_unavailable", "storage is unavailable")
            }
            ApiError::SnapshotTooOld(e) => error_response(StatusCode::CONFLICT, "snapshot_too_old", e.to_string()),
        }
    }
}

pub fn router(node: Arc<Node>) -> Router {
    // Calls that change money must come from this shard's own cluster.
    let changes = Router::new()
        .route(wire::PATH_ACCOUNTS, post(create_account))
        .route(wire::PATH_PREPARE, post(prepare))
        .route(wire::PATH_DECIDE, post(decide))
        .route(wire::PATH_JOIN, post(join))
        .route(common::stream::PATH_STREAM, get(crate::stream::upgrade))
        .layer(middleware::from_fn_with_state(node.clone(), require_own_cluster));
    let internal = Router::new()
        .route(&format!("{}/{{id}}", wire::PATH_ACCOUNTS), get(get_account))
        .route(wire::PATH_APPLIED, get(applied))
        .route(&format!("{}/{{id}}/entries", wire::PATH_ACCOUNTS), get(books::entries))
        .route(wire::PATH_ACCOUNT_LIST, get(books::accounts))
        .route(wire::PATH_AUDIT, get(books::audit))
        .route(wire::PATH_COMMIT_SEQS, post(books::commit_seqs))
        .route("/internal/in_doubt", get(books::in_doubt))
        .route("/internal/transfers/{id}/force", post(books::force))
        .merge(changes)
        .layer(middleware::from_fn_with_state(node.config.cluster_token.clone(), common::http::require_cluster_token));
    let metrics_handle = common::telemetry::install_metrics();
    metric::describe();
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(move || async move { common::telemetry::render_metrics(&metrics_handle) }))
        .route("/stats", get(stats))
        .merge(internal)
        .fallback(common::http::not_found)
        .method_not_allowed_fallback(common::http::method_not_allowed)
        .layer(DefaultBodyLimit::max(BODY_BYTES_MAX))
        .layer(middleware::from_fn_with_state(node.config.request_timeout, common::http::time_limit))
        .with_state(node)
}

/// Rejects a call from another cluster's coordinator. The first coordinator to call fixes the cluster id.
async fn require_own_cluster(State(node): State<Arc<Node>>, req: Request, next: Next) -> Response {
    let Some(presented) = common::http::cluster_id_of(req.headers()) else {
        return error_response(
            StatusCode::BAD_REQUEST,
            "missing_cluster_id",
            "internal calls must carry the cluster id",
        );
    };
    {
        let mut adopted = node.cluster_id.lock().await;
        match *adopted {
            Some(id) if id == presented => {}
            Some(id) => {
                tracing::warn!(expected = %id, presented = %presented, "call from another cluster refused");
                let message = format!("this shard belongs to cluster {id}");
                return error_response(StatusCode::FORBIDDEN, "wrong_cluster", message);
            }
            None => {
                if let Err(e) = storage::adopt_cluster_id(&node.store, presented).await {
                    return ApiError::Store(e).into_response();
                }
                tracing::info!(cluster_id = %presented, "joined cluster");
                *adopted = Some(presented);
            }
        }
    }
    next.run(req).await
}

/// A coordinator's introduction: by now the middleware has bound this shard to its cluster; check that the
/// coordinator's participant list puts this process where it belongs.
async fn join(State(node): State<Arc<Node>>, JsonBody(join): JsonBody<Join>) -> Response {
    if join.shard != node.shard {
        let message = format!("this is shard {}, but the coordinator lists it as shard {}", node.shard, join.shard);
        tracing::error!(%message, "coordinator's participant list is out of order");
        return error_response(StatusCode::CONFLICT, "wrong_shard", message);
    }
    Json(json!({"shard": node.shard})).into_response()
}

async fn health(State(node): State<Arc<Node>>) -> Json<serde_json::Value> {
    let prepared = node.machine().prepared().count();
    Json(json!({"status": "ok", "shard": node.shard, "prepared": prepared}))
}

async fn stats(State(node): State<Arc<Node>>) -> Json<serde_json::Value> {
    let s = &node.store.stats;
    // What this node holds in memory, each with its bound: none of them grows with the transfers ever seen.
    let in_memory = {
        let state = node.machine();
        json!({
            "accounts": state.accounts_len(),
            "prepared": state.prepared().count(),
            "finished": state.recent_finished().count(),
            "finished_max": protocol::participant::RECENT_FINISHED_MAX,
            "recent_commits": state.journal.recent_commits_len(),
            "recent_commits_max": journal::RECENT_COMMITS_MAX,
            "deferred_keys": node.store.redo_stats().1,
            "deferred_keys_max": common::redo::WAITING_KEYS_MAX,
        })
    };
    Json(json!({
        "shard": node.shard,
        "fsyncs": s.fsyncs.load(Ordering::Relaxed),
        "flush_waiters": s.waiters.load(Ordering::Relaxed),
        "flush_micros": s.flush_micros.load(Ordering::Relaxed),
        "checkpoints": node.store.redo_stats().0,
        "history_runs": node.store.runs_json(),
        "in_memory": in_memory,
    }))
}

/// Applies writes made under the machine lock. A failed in-memory sled write leaves memory ahead of the store,
/// which only a restart from disk can repair.
pub(crate) fn persist(node: &Node, state: &mut crate::ShardState, writes: &[Write], extra: &journal::Inserts) {
    if let Err(error) = storage::apply(&node.store, writes, extra) {
        tracing::error!(%error, "store write failed: stopping to recover from disk");
        std::process::abort();
    }
    // The store now answers for the decisions just written: the machine may forget the oldest it holds.
    state.machine.writes_applied();
}

async fn create_account(
    State(node): State<Arc<Node>>,
    JsonBody(req): JsonBody<CreateAccount>,
) -> Result<(StatusCode, Json<AccountView>), ApiError> {
    if req.balance < 0 {
        return Err(ApiError::Invalid(format!("balance must be an integer from 0 to {}", i64::MAX)));
    }
    if req.overdraft_limit < 0 {
        return Err(ApiError::Invalid(format!("overdraft_limit must be an integer from 0 to {}", i64::MAX)));
    }
    {
        let mut state = node.machine();
        let mut writes = Vec::new();
        state.create_account_with_limit(req.id.clone(), req.balance, req.overdraft_limit, &mut writes).map_err(
            |e| match e {
                CreateError::Exists => ApiError::AccountExists,
            },
        )?;
        let mut extra = journal::Inserts::default();
        state.journal.opened(&req.id, req.balance, now_unix_ms(), &mut extra);
        persist(&node, &mut state, &writes, &extra);
    }
    node.store.sync().await?;
    crash::point(crash::PARTICIPANT_ACCOUNT_CREATED);
    tracing::info!(account = %req.id, balance = req.balance, "account created");
    let record = common::records::AccountRecord {
        balance: req.balance,
        overdraft_limit: req.overdraft_limit,
        ..Default::default()
    };
    let view = AccountView::of(req.id, &record, node.shard);
    Ok((StatusCode::CREATED, Json(view)))
}

async fn get_account(State(node): State<Arc<Node>>, Path(id): Path<String>) -> Result<Json<AccountView>, ApiError> {
    let id = AccountId::new(id).map_err(|e| ApiError::Invalid(e.to_string()))?;
    let record = node.machine().account(&id).ok_or(ApiError::AccountNotFound)?;
    Ok(Json(AccountView::of(id, &record, node.shard)))
}

async fn prepare(
    State(node): State<Arc<Node>>,
    JsonBody(batch): JsonBody<PrepareBatch>,
) -> Result<Json<PrepareReply>, ApiError> {
    crash::point(crash::PARTICIPANT_PREPARE_RECEIVED);
    if batch.items.len() > BATCH_ITEMS_MAX {
        return Err(ApiError::Invalid(format!("at most {BATCH_ITEMS_MAX} items per batch")));
    }
    if batch.items.iter().any(|item| item.postings.is_empty()) {
        return Err(ApiError::Invalid("every prepare item needs at least one posting".into()));
    }
    let now = now_unix_ms();
    let votes: Vec<Vote> = {
        let mut machine = node.machine();
        let mut writes = Vec::with_capacity(batch.items.len() * 3);
        // Who asked is kept in each prepared record, for its journal entries at commit.
        let made_by = batch.made_by.iter().cloned().chain(std::iter::repeat(None));
        let log = storage::Decisions(&node.store);
        let votes: Vec<Vote> = batch
            .items
            .iter()
            .zip(made_by)
            .map(|(item, made_by)| machine.prepare_by(item, made_by, now, &log, &mut writes))
            .collect();
        let mut extra = journal::Inserts::default();
        journal_holds(&mut machine, &writes, now, &mut extra);
        persist(&node, &mut machine, &writes, &extra);
        metrics::gauge!(metric::PREPARED).set(machine.prepared().count() as f64);
        votes
    };
    for (item, vote) in batch.items.iter().zip(&votes) {
        tracing::debug_span!("transfer", transfer_id = %item.id).in_scope(|| tracing::debug!(?vote, "prepare"));
        let label = match vote {
            Vote::Yes => "yes",
            Vote::No { .. } => "no",
        };
        metrics::counter!(metric::VOTES, "vote" => label).increment(1);
    }
    // Always wait: a repeated Prepare may be answering YES for a write that is not yet flushed.
    node.store.sync().await?;
    crash::point(crash::PARTICIPANT_PREPARE_FLUSHED);
    Ok(Json(PrepareReply { votes }))
}

async fn decide(
    State(node): State<Arc<Node>>,
    JsonBody(batch): JsonBody<DecideBatch>,
) -> Result<Json<DecideReply>, ApiError> {
    crash::point(crash::PARTICIPANT_DECIDE_RECEIVED);
    if batch.items.len() > BATCH_ITEMS_MAX {
        return Err(ApiError::Invalid(format!("at most {BATCH_ITEMS_MAX} items per batch")));
    }
    let acks = apply_decisions(&node, batch.items.iter().map(|i| (i.id, i.decision)), None).await?;
    crash::point(crash::PARTICIPANT_DECIDE_APPLIED);
    Ok(Json(DecideReply { acks }))
}

/// Applies decisions (from the coordinator's phase two, the in-doubt resolver, or an operator's heuristic
/// decision when `operator` is given), journals them, and makes them durable.
pub(crate) async fn apply_decisions(
    node: &Node,
    decisions: impl Iterator<Item = (uuid::Uuid, wire::Decision)>,
    operator: Option<&str>,
) -> Result<Vec<DecideAck>, StoreError> {
    let now = now_unix_ms();
    let acks: Vec<DecideAck> = {
        let mut machine = node.machine();
        let mut writes = Vec::new();
        let mut extra = journal::Inserts::default();
        let acks = decisions
            .map(|(id, decision)| {
                let (ack, settled) = machine.settle(id, decision, &storage::Decisions(&node.store), &mut writes);
                if let (DecideAck::Done, Some(record)) = (ack, settled) {
                    journal_decision(&mut machine, id, decision, &record, operator, now, &mut extra);
                }
                let span = tracing::info_span!("transfer", transfer_id = %id);
                let _entered = span.enter();
                if ack == DecideAck::Refused {
                    tracing::error!(?decision, "decision contradicts this shard's state: refused");
                } else {
                    tracing::debug!(?decision, "decided");
                    let label = if decision == wire::Decision::Commit { "commit" } else { "abort" };
                    metrics::counter!(metric::DECISIONS, "decision" => label).increment(1);
                }
                ack
            })
            .collect();
        persist(node, &mut machine, &writes, &extra);
        metrics::gauge!(metric::PREPARED).set(machine.prepared().count() as f64);
        acks
    };
    node.store.sync().await?;
    Ok(acks)
}

/// The journal side of a decision just applied to a prepared transfer: an entry per posting (commit), or per
/// account with amount 0 (a heuristic abort, so the operator's act is on record); heuristic decisions also get
/// their own record for the audit.
#[allow(clippy::too_many_arguments)]
pub(crate) fn journal_decision(
    state: &mut crate::ShardState,
    id: uuid::Uuid,
    decision: wire::Decision,
    record: &PreparedRecord,
    operator: Option<&str>,
    now: u64,
    extra: &mut journal::Inserts,
) {
    let postings = &record.postings;
    let hold = record.transfer.hold_seconds().is_some();
    let kind = match (operator, decision) {
        (None, wire::Decision::Commit) if hold => journal::EntryKind::Capture,
        (None, wire::Decision::Abort) if hold => journal::EntryKind::Release,
        (None, wire::Decision::Commit) => journal::EntryKind::Posting,
        (None, wire::Decision::Abort) => return,
        (Some(_), wire::Decision::Commit) => journal::EntryKind::HeuristicCommit,
        (Some(_), wire::Decision::Abort) => journal::EntryKind::HeuristicAbort,
    };
    // A commit of several legs names each entry's leg.
    let legs = match kind {
        journal::EntryKind::Posting if record.transfer.single().is_none() => record.transfer.legs_of_postings(postings),
        _ => Vec::new(),
    };
    // The decision is applied: walk back from each account's balance now, so that an account posted twice shows
    // its balance after each posting.
    let mut balance: HashMap<&AccountId, i64> = HashMap::new();
    let mut lines: Vec<(journal::EntryKind, AccountId, i64, i64)> = postings
        .iter()
        .enumerate()
        .rev()
        .map(|(index, p)| {
            let amount = if decision == wire::Decision::Commit { p.delta } else { 0 };
            let now = balance.entry(&p.account).or_insert_with(|| state.account(&p.account).map_or(0, |a| a.balance));
            let after = *now;
            *now = now.saturating_sub(amount);
            let leg = legs.get(index).copied().flatten().and_then(|leg| u8::try_from(leg).ok());
            let kind = leg.map_or(kind, |leg| journal::EntryKind::LegPosting { leg });
            (kind, p.account.clone(), amount, after)
        })
        .collect();
    lines.reverse();
    state.journal.applied(id, &lines, operator.or(record.made_by.as_deref()), now, extra);
    if let Some(operator) = operator {
        let record = journal::HeuristicRecord { decision, operator: operator.to_owned(), at_unix_ms: now };
        extra.keys.push((journal::prefixed(journal::HEURISTIC, id.as_bytes()), Some(common::records::encode(&record))));
    }
}

/// The journal side of new prepared records: a hold granted here gets an entry per posting (what it reserves
/// or promises; the balance is unchanged). A transfer's prepare is not journaled: only its outcome is.
pub(crate) fn journal_holds(state: &mut crate::ShardState, writes: &[Write], now: u64, extra: &mut journal::Inserts) {
    for write in writes {
        let Write::Prepared(id, record) = write else { continue };
        if record.transfer.hold_seconds().is_none() {
            continue;
        }
        let lines: Vec<(journal::EntryKind, AccountId, i64, i64)> = record
            .postings
            .iter()
            .map(|p| {
                let balance = state.account(&p.account).map_or(0, |a| a.balance);
                (journal::EntryKind::Hold, p.account.clone(), p.delta, balance)
            })
            .collect();
        state.journal.applied(*id, &lines, record.made_by.as_deref(), now, extra);
    }
}

/// Every transfer finished here, read from the store (for tests and drills: the list grows with history).
async fn applied(State(node): State<Arc<Node>>) -> Result<Json<Vec<AppliedTransfer>>, ApiError> {
    let finished = storage::finished(&node.store)?;
    Ok(Json(finished.into_iter().map(|(id, decision)| AppliedTransfer { id, decision }).collect()))
}
