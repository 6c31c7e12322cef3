//! Routes about the books rather than the protocol: an account's journal, the snapshot the coordinator's audit
//! is built from, the participant's own view of its transfers in doubt, and the operator's last resort — forcing
//! a prepared transfer's outcome when the coordinator's data is gone for good (a heuristic decision).

use crate::apply::{persist, sync};
use crate::journal::{self, JournalEntry};
use crate::server::ApiError;
use crate::{resolver, storage, Node};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use common::http::{error_response, now_unix_ms, JsonBody};
use common::ledger::AccountId;
use common::wire::{
    AccountList, AccountView, CommitSeqsReply, CommitSeqsRequest, DecideAck, Decision, DecisionQueryItem,
    HeuristicView, QueryAnswer, ShardAudit,
};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

/// Longest page of journal entries.
const ENTRIES_LIMIT_MAX: usize = 1_000;
/// Page length when the query gives none.
const PAGE_LIMIT_DEFAULT: usize = 50;
/// Longest page of accounts (the coordinator asks each shard for one more than its own longest page).
const ACCOUNTS_LIMIT_MAX: usize = 10_000;
/// Ids per commit-sequence lookup: bounds one audit request.
const COMMIT_SEQ_IDS_MAX: usize = 100_000;
/// Up to this many accounts, an audit checks every account's holds against the prepared transfers (a few
/// milliseconds under the state lock); past it, it checks their sums, kept as the accounts change, so that an
/// audit of a million accounts does not stall the shard's transfers.
const AUDIT_PER_ACCOUNT_MAX: usize = 100_000;

impl From<storage::LoadError> for ApiError {
    fn from(e: storage::LoadError) -> Self {
        match e {
            storage::LoadError::Store(e) => ApiError::Store(e),
            other => ApiError::Corrupt(other.to_string()),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntriesQuery {
    limit: Option<usize>,
    /// The cursor: return entries older than this sequence number.
    after: Option<u64>,
}

/// A page length from the query: `PAGE_LIMIT_DEFAULT` when absent, else 1 to `max`.
fn page_limit(requested: Option<usize>, max: usize) -> Result<usize, ApiError> {
    match requested.unwrap_or(PAGE_LIMIT_DEFAULT) {
        n if (1..=max).contains(&n) => Ok(n),
        _ => Err(ApiError::Invalid(format!("limit must be from 1 to {max}"))),
    }
}

pub async fn entries(
    State(node): State<Arc<Node>>,
    Path(id): Path<String>,
    query: Result<Query<EntriesQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::Invalid(e.body_text()))?;
    let id = AccountId::new(id).map_err(|e| ApiError::Invalid(e.to_string()))?;
    let limit = page_limit(query.limit, ENTRIES_LIMIT_MAX)?;
    if node.core().machine().account(&id).is_none() {
        return Err(ApiError::AccountNotFound);
    }
    // One more than asked for tells whether another page exists.
    let mut entries = storage::journal_page(&node.store, &id, query.after, limit + 1)?;
    let more = entries.len() > limit;
    entries.truncate(limit);
    let next = if more { entries.last().map(|e| e.seq) } else { None };
    let entries: Vec<Value> = entries.iter().map(entry_json).collect();
    Ok(Json(json!({"account": id, "entries": entries, "next": next})))
}

/// An entry as the API shows it: `made_by` also goes out as `actor`, the name clients of earlier versions read.
/// A posting of a transfer of several legs shows as kind `posting` with its `leg`.
fn entry_json(entry: &JournalEntry) -> Value {
    let mut value = serde_json::to_value(entry).unwrap_or(Value::Null);
    value["actor"] = json!(entry.made_by);
    if let journal::EntryKind::LegPosting { leg } = entry.kind {
        value["kind"] = json!("posting");
        value["leg"] = json!(leg);
    }
    value
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountsQuery {
    limit: Option<usize>,
    /// The cursor: return accounts whose id sorts after this one.
    after: Option<String>,
}

/// This shard's accounts in id order, a page at a time.
pub async fn accounts(
    State(node): State<Arc<Node>>,
    query: Result<Query<AccountsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<AccountList>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::Invalid(e.body_text()))?;
    let limit = page_limit(query.limit, ACCOUNTS_LIMIT_MAX)?;
    let core = node.core();
    // The accounts are ordered: a page is a range, so the lock is held for the page, not for every account.
    let accounts = core
        .machine()
        .accounts_after(query.after.as_deref())
        .take(limit)
        .map(|(id, r)| AccountView::of(id.clone(), r, node.shard))
        .collect();
    Ok(Json(AccountList { accounts }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    after_seq: Option<u64>,
}

pub async fn audit(
    State(node): State<Arc<Node>>,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<ShardAudit>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::Invalid(e.body_text()))?;
    let heuristics = storage::heuristics(&node.store)?
        .into_iter()
        .map(|(id, h)| HeuristicView { id, decision: h.decision, operator: h.operator, at_unix_ms: h.at_unix_ms })
        .collect();
    // Everything below under one lock: balances, holds and the commit list describe the same instant.
    let core = node.core();
    let (state, journal) = (core.machine(), core.journal());
    let seq = journal.last_seq();
    let totals = state.totals();
    let accounts = state.accounts_len();
    let invariant_violation =
        if accounts <= AUDIT_PER_ACCOUNT_MAX { state.violation() } else { state.holds_violation() };
    let below_overdraft_limit = match totals.below_floor {
        0 => Vec::new(),
        _ => state.accounts().filter(|(_, a)| a.below_floor()).map(|(id, _)| id.clone()).collect(),
    };
    let snapshot = ShardAudit {
        shard: node.shard,
        seq,
        accounts: accounts as u64,
        balance_total: totals.balance,
        held_total: totals.held,
        incoming_total: totals.incoming,
        created_total: journal.created_total(),
        below_overdraft_limit,
        invariant_violation,
        prepared: state.prepared().map(|(id, _)| *id).collect(),
        commits_since: journal.commits_between(query.after_seq.unwrap_or(seq), seq)?,
        heuristics,
    };
    Ok(Json(snapshot))
}

pub async fn commit_seqs(
    State(node): State<Arc<Node>>,
    JsonBody(req): JsonBody<CommitSeqsRequest>,
) -> Result<Json<CommitSeqsReply>, ApiError> {
    if req.ids.len() > COMMIT_SEQ_IDS_MAX {
        return Err(ApiError::Invalid(format!("at most {COMMIT_SEQ_IDS_MAX} ids")));
    }
    let seqs = req.ids.iter().map(|id| storage::commit_seq(&node.store, id)).collect::<Result<_, _>>()?;
    Ok(Json(CommitSeqsReply { seqs }))
}

/// This shard's transfers in doubt: prepared, holding funds, waiting for a decision.
pub async fn in_doubt(State(node): State<Arc<Node>>) -> Json<Value> {
    let now = now_unix_ms();
    let core = node.core();
    let mut list: Vec<Value> = core
        .machine()
        .prepared()
        .map(|(id, p)| {
            let heard = core.resolver().last_heard(id);
            let fields = json!({
                "id": id,
                "postings": p.postings,
                "age_ms": now.saturating_sub(p.prepared_at_unix_ms),
                "coordinator": p.coordinator_url,
                "last_heard": heard.map(|h| h.heard.to_string()),
                "last_heard_age_ms": heard.map(|h| now.saturating_sub(h.at_ms)),
            });
            common::wire::transfer_json(&p.transfer, fields)
        })
        .collect();
    list.sort_by_key(|v| std::cmp::Reverse(v["age_ms"].as_u64()));
    Json(json!({"shard": node.shard, "transactions": list}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForceRequest {
    decision: Decision,
    /// Who takes responsibility; goes into the journal.
    operator: String,
}

/// Forces a prepared transfer's outcome here. Refused while the coordinator answers: then it knows (or will
/// decide) the outcome, and the resolver applies it. Meant for a coordinator whose data is lost for good.
pub async fn force(
    State(node): State<Arc<Node>>,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<ForceRequest>,
) -> Result<Response, ApiError> {
    let id = uuid::Uuid::parse_str(&id).map_err(|_| ApiError::Invalid("transfer id must be a UUID".into()))?;
    let operator = req.operator.trim();
    if operator.is_empty() || operator.len() > 64 {
        return Err(ApiError::Invalid("operator must be 1 to 64 characters".into()));
    }
    let Some(prepared) = node.core().machine().prepared_transfer(&id).cloned() else {
        let message = "no prepared transfer with this id here: nothing to force";
        return Ok(error_response(StatusCode::NOT_FOUND, "not_in_doubt", message));
    };
    let item = DecisionQueryItem { id, transfer: prepared.transfer.clone() };
    match resolver::query(&node, &prepared.coordinator_url, vec![item]).await {
        Ok(answers) => {
            let said = answers.first().copied().unwrap_or(QueryAnswer::Pending);
            let message = format!("the coordinator is reachable and says {said:?}; it decides, not an operator");
            return Ok(error_response(StatusCode::CONFLICT, "coordinator_reachable", message));
        }
        Err(error) => tracing::warn!(transfer_id = %id, %error, operator, "coordinator unreachable: forcing outcome"),
    }
    let (ack, barrier) = {
        let mut core = node.core();
        let ack = core.handle_forced(now_unix_ms(), id, req.decision, operator, &storage::Decisions(&node.store));
        (ack, persist(&node, &mut core))
    };
    sync(&node, barrier).await?;
    if ack != DecideAck::Done {
        return Ok(error_response(StatusCode::CONFLICT, "not_in_doubt", "the transfer was decided meanwhile"));
    }
    tracing::warn!(transfer_id = %id, decision = ?req.decision, operator, "heuristic decision applied");
    Ok((StatusCode::OK, Json(json!({"id": id, "decision": req.decision, "operator": operator, "heuristic": true})))
        .into_response())
}
