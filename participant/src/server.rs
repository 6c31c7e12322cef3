//! The participant's HTTP routes: the coordinator's introduction and its stream's upgrade, account opening and
//! reads, the books, health. A handler that changes money hands it to the core under the state lock, applies
//! the core's writes, unlocks, waits for the group commit, then answers. The protocol itself travels on the
//! stream (`stream.rs`): there is no other way into the shard's machine.

use crate::apply::{persist, sync};
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
use common::store::StoreError;
use common::wire::{self, AccountView, AppliedTransfer, CreateAccount, Join};
use protocol::participant::CreateError;
use serde_json::json;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Largest internal request body.
const BODY_BYTES_MAX: usize = 8 * 1024 * 1024;

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
    crate::apply::metric::describe();
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
    let prepared = node.core().machine().prepared().count();
    Json(json!({"status": "ok", "shard": node.shard, "prepared": prepared}))
}

async fn stats(State(node): State<Arc<Node>>) -> Json<serde_json::Value> {
    let s = &node.store.stats;
    // What this node holds in memory, each with its bound: none of them grows with the transfers ever seen.
    let in_memory = {
        let core = node.core();
        let machine = core.machine();
        json!({
            "accounts": machine.accounts_len(),
            "prepared": machine.prepared().count(),
            "finished": machine.recent_finished().count(),
            "finished_max": protocol::participant::RECENT_FINISHED_MAX,
            "recent_commits": core.journal().recent_commits_len(),
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
    let barrier = {
        let mut core = node.core();
        core.handle_open(now_unix_ms(), req.id.clone(), req.balance, req.overdraft_limit).map_err(|e| match e {
            CreateError::Exists => ApiError::AccountExists,
        })?;
        persist(&node, &mut core)
    };
    sync(&node, barrier).await?;
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
    let record = node.core().machine().account(&id).ok_or(ApiError::AccountNotFound)?;
    Ok(Json(AccountView::of(id, &record, node.shard)))
}

/// Every transfer finished here, read from the store (for tests and drills: the list grows with history).
async fn applied(State(node): State<Arc<Node>>) -> Result<Json<Vec<AppliedTransfer>>, ApiError> {
    let finished = storage::finished(&node.store)?;
    Ok(Json(finished.into_iter().map(|(id, decision)| AppliedTransfer { id, decision }).collect()))
}
