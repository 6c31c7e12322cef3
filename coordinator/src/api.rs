//! The public HTTP API (and the participants' decision-query route). Requests are parsed and validated here,
//! into ledger types; every failure is an [`ApiError`], turned into a status and JSON body in one place.

use crate::engine::{Engine, EngineError, Final};
use crate::Config;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Extension;
use axum::{Json, Router};
use common::auth::{ApiTokens, Caller, Role};
use common::crash;
use common::http::{error_response, from_json_object, BodyError, JsonBody};
use common::ledger::{
    shard_of, AccountId, Amount, Leg, ShardId, Transfer, HOLD_SECONDS_DEFAULT, HOLD_SECONDS_MAX, LEGS_MAX,
};
use common::records::{AbortReason, Outcome};
use common::wire::{self, AccountView, CreateAccount, DecisionAnswers, DecisionQuery};
use protocol::coordinator_core::{HoldEnd, HoldError};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;
use uuid::Uuid;

/// Public request bodies are small; anything bigger is a mistake or an attack.
const PUBLIC_BODY_BYTES_MAX: usize = 16 * 1024;
/// `POST /transfers/batch` carries up to `BATCH_ITEMS_MAX` transfers of about 250 bytes each.
pub const BATCH_BODY_BYTES_MAX: usize = 2 * 1024 * 1024;
/// Transfers in one batch: TigerBeetle's batch size, which fills about 2 MiB with our bodies.
pub const BATCH_ITEMS_MAX: usize = 8_190;
const _: () = assert!(BATCH_ITEMS_MAX * 256 <= BATCH_BODY_BYTES_MAX);
/// Decision queries carry up to a thousand transfers.
const QUERY_BODY_BYTES_MAX: usize = 4 * 1024 * 1024;
/// A participant that does not answer a health check this fast is reported down.
const HEALTH_TIMEOUT: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Invalid(String),
    /// A bad leg of a transfer of several legs: named by its index, in the message and in the body.
    #[error("legs[{leg}]: {message}")]
    InvalidLeg { leg: usize, message: String },
    #[error("account already exists")]
    AccountExists,
    #[error("account not found")]
    AccountNotFound,
    #[error("no final outcome is known for this transfer id; it is safe to submit it again")]
    TransferNotFound,
    #[error("this transfer id was already used with a different body")]
    IdempotencyConflict,
    #[error("shard {0} is unavailable")]
    ParticipantUnavailable(ShardId),
    #[error("too many transfers in flight; retry shortly")]
    Overloaded,
    #[error("too many holds are active; capture or release some, or retry later")]
    HoldsFull,
    #[error("no hold has this id")]
    HoldNotFound,
    #[error("the hold is not active: it is {0}")]
    HoldNotActive(&'static str),
    #[error("the hold has expired")]
    HoldExpired,
    #[error("storage is unavailable")]
    Storage(String),
    #[error("{}", BodyError::NotJson)]
    NotJson,
    /// A body over the route's limit, in bytes.
    #[error("the request body is larger than the limit of {bytes} bytes ({kib} KiB)", bytes = .0, kib = .0 / 1024)]
    TooLarge(usize),
}

impl ApiError {
    /// The status and the error code this error is answered with.
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::Invalid(_) | ApiError::InvalidLeg { .. } => (StatusCode::BAD_REQUEST, "invalid_request"),
            ApiError::AccountExists => (StatusCode::CONFLICT, "account_exists"),
            ApiError::AccountNotFound => (StatusCode::NOT_FOUND, "account_not_found"),
            ApiError::TransferNotFound => (StatusCode::NOT_FOUND, "transfer_not_found"),
            ApiError::IdempotencyConflict => (StatusCode::CONFLICT, "idempotency_conflict"),
            ApiError::ParticipantUnavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "participant_unavailable"),
            ApiError::Overloaded => (StatusCode::SERVICE_UNAVAILABLE, "overloaded"),
            ApiError::HoldsFull => (StatusCode::SERVICE_UNAVAILABLE, "holds_full"),
            ApiError::HoldNotFound => (StatusCode::NOT_FOUND, "hold_not_found"),
            ApiError::HoldNotActive(_) => (StatusCode::CONFLICT, "hold_not_active"),
            ApiError::HoldExpired => (StatusCode::CONFLICT, "hold_expired"),
            ApiError::NotJson => (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type"),
            ApiError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            ApiError::Storage(detail) => {
                tracing::error!(%detail, "storage error");
                (StatusCode::SERVICE_UNAVAILABLE, "storage_unavailable")
            }
        }
    }

    /// The message the client reads: what it was told, never an internal detail.
    fn message(&self) -> String {
        match self {
            ApiError::Invalid(m) => m.clone(),
            other => other.to_string(),
        }
    }

    /// The status and the JSON body that answer this error.
    fn answer(&self) -> (StatusCode, Value) {
        let (status, code) = self.status_and_code();
        let mut error = json!({"code": code, "message": self.message()});
        if let ApiError::InvalidLeg { leg, .. } = self {
            error["leg"] = json!(leg);
        }
        (status, json!({"error": error}))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, body) = self.answer();
        let mut response = (status, Json(body)).into_response();
        if matches!(self, ApiError::Overloaded) {
            response.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        response
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::IdempotencyConflict => ApiError::IdempotencyConflict,
            EngineError::Overloaded => ApiError::Overloaded,
            EngineError::HoldsFull => ApiError::HoldsFull,
            EngineError::Hold(HoldError::NotFound | HoldError::NotAHold) => ApiError::HoldNotFound,
            EngineError::Hold(HoldError::NotActive(status)) => ApiError::HoldNotActive(status),
            EngineError::Hold(HoldError::Expired) => ApiError::HoldExpired,
            EngineError::Hold(HoldError::BadAmount { held }) => ApiError::Invalid(format!(
                "amount must be a whole number from 1 to {held}, the held amount (minor units)"
            )),
            EngineError::Wal(e) => ApiError::Storage(e.to_string()),
            EngineError::CoreGone => ApiError::Storage(e.to_string()),
            EngineError::LogUnreadable | EngineError::Hold(HoldError::LogUnreadable) => {
                ApiError::Storage(EngineError::LogUnreadable.to_string())
            }
        }
    }
}

impl From<PathRejection> for ApiError {
    /// A path parameter of these routes is a string, so the one way to fail is a percent-encoding that does not
    /// decode to UTF-8.
    fn from(_: PathRejection) -> Self {
        ApiError::Invalid("the path is not valid: an id must be UTF-8 once percent-decoded".into())
    }
}

/// A query string that does not parse, in the API's words rather than axum's ("Failed to deserialize query
/// string: limit: invalid digit found in string"); `listed` names what `limit` counts, for its message.
fn query_error(rejection: QueryRejection, listed: &str) -> ApiError {
    let text = rejection.body_text();
    match query_problem(&text) {
        QueryProblem::Field("limit") => limit_error(listed),
        problem => ApiError::Invalid(problem.to_string()),
    }
}

/// What axum's (or serde's) text about a query string says is wrong with it.
enum QueryProblem<'a> {
    /// `unknown field `x`, expected `a` or `b``: the part after "unknown field ".
    Unknown(&'a str),
    /// The parameter is given twice.
    Duplicate(&'a str),
    /// This parameter's value does not parse.
    Field(&'a str),
    Other(&'a str),
}

fn query_problem(text: &str) -> QueryProblem<'_> {
    let detail = text.strip_prefix("Failed to deserialize query string: ").unwrap_or(text);
    // serde_path_to_error puts the parameter's name first: "limit: invalid digit found in string".
    let (field, reason) = detail.split_once(": ").map_or((None, detail), |(field, reason)| (Some(field), reason));
    if let Some(unknown) = reason.strip_prefix("unknown field ") {
        QueryProblem::Unknown(unknown)
    } else if let Some(duplicate) = reason.strip_prefix("duplicate field ") {
        QueryProblem::Duplicate(duplicate)
    } else if let Some(field) = field {
        QueryProblem::Field(field)
    } else {
        QueryProblem::Other(detail)
    }
}

impl std::fmt::Display for QueryProblem<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QueryProblem::Unknown(unknown) => {
                write!(f, "unknown query parameter {}", unknown.replacen(", expected ", "; the parameters are ", 1))
            }
            QueryProblem::Duplicate(field) => write!(f, "the query parameter {field} is given more than once"),
            QueryProblem::Field(field) => write!(f, "{field} is not valid in the query string"),
            QueryProblem::Other(detail) => write!(f, "the query string is not valid: {detail}"),
        }
    }
}

#[derive(Clone)]
struct AppState {
    engine: Arc<Engine>,
    call_timeout: Duration,
    api_tokens: Option<Arc<ApiTokens>>,
    rates: Arc<crate::rates::TransferRates>,
    /// Batch items being decided at once, over every batch: an item waits here for room instead of being
    /// refused as overloaded, and single transfers keep the rest of `--transfers-in-flight-max`.
    batch_room: Arc<tokio::sync::Semaphore>,
    /// The permits `batch_room` holds in all: no group of items may wait for more.
    batch_room_max: usize,
}

pub fn router(engine: Arc<Engine>, config: &Config) -> Router {
    let api_tokens = config.api_tokens.clone().map(Arc::new);
    let rates = Arc::default();
    let batch_room_max = (config.transfers_in_flight_max / 2).max(1);
    let batch_room = Arc::new(tokio::sync::Semaphore::new(batch_room_max));
    let state = AppState {
        engine,
        call_timeout: config.participant_call_timeout,
        api_tokens,
        rates,
        batch_room,
        batch_room_max,
    };
    let admin = Router::new()
        .route("/accounts", post(create_account))
        .layer(middleware::from_fn_with_state(Role::Admin, require_role));
    let metrics_handle = common::telemetry::install_metrics();
    crate::metric::describe();
    let client = Router::new()
        .route("/metrics", get(move || async move { common::telemetry::render_metrics(&metrics_handle) }))
        .route("/stats", get(stats))
        .route("/accounts", get(list_accounts))
        .route("/accounts/{id}", get(get_account))
        .route("/accounts/{id}/entries", get(get_entries))
        .route("/audit", get(audit))
        .route("/transfers", post(create_transfer).get(list_transfers))
        .route("/transfers/batch", post(create_transfers_batch).layer(DefaultBodyLimit::max(BATCH_BODY_BYTES_MAX)))
        .route("/transfers/{id}", get(get_transfer))
        .route("/transfers/{id}/capture", post(capture_hold))
        .route("/transfers/{id}/release", post(release_hold))
        .route("/holds", get(list_holds))
        .route("/transactions", get(transactions))
        .merge(admin)
        .layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .layer(DefaultBodyLimit::max(PUBLIC_BODY_BYTES_MAX));
    let internal = Router::new()
        .route(wire::PATH_DECISIONS, post(decisions))
        .layer(middleware::from_fn_with_state(state.clone(), require_own_cluster))
        .layer(middleware::from_fn_with_state(config.cluster_token.clone(), common::http::require_cluster_token))
        .layer(DefaultBodyLimit::max(QUERY_BODY_BYTES_MAX));
    Router::new()
        .route("/", get(console))
        .route("/health", get(health))
        .merge(client)
        .merge(internal)
        .fallback(common::http::not_found)
        .method_not_allowed_fallback(common::http::method_not_allowed)
        .layer(middleware::from_fn_with_state(config.request_timeout, common::http::time_limit))
        .with_state(state)
}

/// The live console: a static page that polls the API (so it needs no token itself; its calls carry one).
async fn console() -> Response {
    const PAGE: &str = include_str!("console.html");
    const POLICY: &str =
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'";
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, POLICY),
            (header::CACHE_CONTROL, "no-store"),
        ],
        PAGE,
    )
        .into_response()
}

/// With API tokens configured, finds the caller of a bearer token (401 without a valid one) and passes it on.
async fn authenticate(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let Some(tokens) = &state.api_tokens else {
        return next.run(req).await;
    };
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let Some(caller) = presented.and_then(|token| tokens.caller(token)) else {
        let mut response = error_response(StatusCode::UNAUTHORIZED, "unauthorized", "a valid bearer token is required");
        response.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        return response;
    };
    let span = tracing::info_span!("caller", made_by = %caller.name);
    req.extensions_mut().insert(caller);
    next.run(req).instrument(span).await
}

/// 403 unless the authenticated caller has at least `role` (no check when tokens are not configured).
async fn require_role(State(role): State<Role>, req: Request, next: Next) -> Response {
    match req.extensions().get::<Caller>() {
        Some(caller) if caller.role < role => {
            error_response(StatusCode::FORBIDDEN, "forbidden", format!("this needs an {role:?} token").to_lowercase())
        }
        _ => next.run(req).await,
    }
}

/// A participant's query must come from this coordinator's own cluster. A participant never contacted has no
/// cluster id yet, and then has nothing prepared to ask about, so its (empty) query passes.
async fn require_own_cluster(State(state): State<AppState>, req: Request, next: Next) -> Response {
    match common::http::cluster_id_of(req.headers()) {
        Some(id) if id != state.engine.wal.cluster_id() => {
            error_response(StatusCode::FORBIDDEN, "wrong_cluster", "this coordinator runs another cluster")
        }
        _ => next.run(req).await,
    }
}

/// A JSON number that must be an amount of money: a whole number of minor units in `min..=i64::MAX`.
fn whole_number(field: &str, value: &serde_json::Number, min: i64) -> Result<i64, ApiError> {
    whole_number_in(field, value, min..=i64::MAX, "minor units")
}

/// A JSON number that must be a whole number in `range`; the message names the range and its `unit`.
fn whole_number_in(
    field: &str,
    value: &serde_json::Number,
    range: std::ops::RangeInclusive<i64>,
    unit: &str,
) -> Result<i64, ApiError> {
    match value.as_i64() {
        Some(v) if range.contains(&v) => Ok(v),
        _ => Err(ApiError::Invalid(format!(
            "{field} must be a whole number from {} to {} ({unit})",
            range.start(),
            range.end()
        ))),
    }
}

fn account_id(field: &str, raw: String) -> Result<AccountId, ApiError> {
    AccountId::new(raw).map_err(|e| ApiError::Invalid(format!("{field}: {e}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateAccountRequest {
    id: String,
    #[serde(default)]
    balance: Option<serde_json::Number>,
    #[serde(default)]
    overdraft_limit: Option<serde_json::Number>,
}

async fn create_account(
    State(state): State<AppState>,
    body: Result<JsonBody<CreateAccountRequest>, BodyError>,
) -> Result<Response, ApiError> {
    let req = json_body(body, PUBLIC_BODY_BYTES_MAX)?;
    let id = account_id("id", req.id)?;
    let balance = match &req.balance {
        Some(n) => whole_number("balance", n, 0)?,
        None => 0,
    };
    let overdraft_limit = match &req.overdraft_limit {
        Some(n) => whole_number("overdraft_limit", n, 0)?,
        None => 0,
    };
    let shard = shard_of(&id, state.engine.config.shard_count);
    let client = &state.engine.participants[shard as usize];
    let reply = client
        .http()
        .post(format!("{}{}", client.url, wire::PATH_ACCOUNTS))
        .timeout(state.call_timeout)
        .json(&CreateAccount { id: id.clone(), balance, overdraft_limit })
        .send()
        .await
        .map_err(|_| ApiError::ParticipantUnavailable(shard))?;
    match reply.status() {
        StatusCode::CREATED => {
            tracing::info!(account = %id, balance, overdraft_limit, shard, "account created");
            let body = json!({"id": id, "balance": balance, "overdraft_limit": overdraft_limit, "shard": shard});
            Ok((StatusCode::CREATED, Json(body)).into_response())
        }
        StatusCode::CONFLICT => Err(ApiError::AccountExists),
        _ => Err(ApiError::ParticipantUnavailable(shard)),
    }
}

/// GETs `path` (and query) from the participant owning `shard`; a shard that does not answer is a 503.
async fn shard_get(state: &AppState, shard: ShardId, path: String) -> Result<reqwest::Response, ApiError> {
    let client = &state.engine.participants[shard as usize];
    let request = client.http().get(format!("{}{path}", client.url)).timeout(state.call_timeout);
    request.send().await.map_err(|_| ApiError::ParticipantUnavailable(shard))
}

async fn get_account(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<AccountView>, ApiError> {
    let Path(raw) = path?;
    let id = account_id("account id", raw)?;
    let shard = shard_of(&id, state.engine.config.shard_count);
    // Through the shard's stream, behind every decision already sent there: a client reads its own writes.
    let record = state.engine.read(shard, id.clone(), state.call_timeout).await;
    match record {
        Ok(Some(r)) => Ok(Json(AccountView::of(id, &r, shard))),
        Ok(None) => Err(ApiError::AccountNotFound),
        Err(()) => Err(ApiError::ParticipantUnavailable(shard)),
    }
}

/// An account's journal, newest first, from the shard that owns it (`limit`, `after` are passed through).
async fn get_entries(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> Result<Response, ApiError> {
    let Path(raw) = path?;
    let id = account_id("account id", raw)?;
    let shard = shard_of(&id, state.engine.config.shard_count);
    let mut path = format!("{}/{id}/entries", wire::PATH_ACCOUNTS);
    if let Some(q) = query {
        path.push('?');
        path.push_str(&q);
    }
    let reply = shard_get(&state, shard, path).await?;
    let status = reply.status();
    let body: Value = reply.json().await.map_err(|_| ApiError::ParticipantUnavailable(shard))?;
    match status {
        StatusCode::OK => Ok(Json(body).into_response()),
        StatusCode::NOT_FOUND => Err(ApiError::AccountNotFound),
        StatusCode::BAD_REQUEST => Err(ApiError::Invalid(entries_query_message(
            body["error"]["message"].as_str().unwrap_or("the query string is not valid"),
        ))),
        _ => Err(ApiError::ParticipantUnavailable(shard)),
    }
}

/// The shard's refusal of a journal query, in the words of the coordinator's own listings: `limit` and
/// `after` are whole numbers there.
fn entries_query_message(message: &str) -> String {
    if let Some(range) = message.strip_prefix("limit must be from ") {
        return format!("limit must be a whole number from {range} (entries listed at most)");
    }
    match query_problem(message) {
        QueryProblem::Field(field @ ("limit" | "after")) => format!("{field} must be a whole number"),
        QueryProblem::Other(message) => message.to_owned(),
        problem => problem.to_string(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListAccountsQuery {
    limit: Option<usize>,
    after: Option<String>,
}

/// Every shard's accounts merged in id order, a page at a time (`next` is the cursor of the next page).
async fn list_accounts(
    State(state): State<AppState>,
    query: Result<Query<ListAccountsQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(query) = query.map_err(|e| query_error(e, "accounts"))?;
    let limit = list_limit(query.limit, "accounts")?;
    let after = query.after.map(|a| account_id("after", a)).transpose()?;
    // One more than asked for tells whether another page exists. Account ids need no escaping in a URL.
    let mut path = format!("{}?limit={}", wire::PATH_ACCOUNT_LIST, limit + 1);
    if let Some(after) = &after {
        path.push_str(&format!("&after={after}"));
    }
    let pages = (0..state.engine.config.shard_count).map(|shard| {
        let (state, path) = (&state, path.clone());
        async move {
            let unavailable = |_| ApiError::ParticipantUnavailable(shard);
            let reply = shard_get(state, shard, path).await?.error_for_status().map_err(unavailable)?;
            reply.json::<wire::AccountList>().await.map_err(unavailable)
        }
    });
    let mut accounts: Vec<wire::AccountView> = Vec::new();
    for page in futures::future::join_all(pages).await {
        accounts.extend(page?.accounts);
    }
    accounts.sort_unstable_by(|a, b| a.id.as_str().cmp(b.id.as_str()));
    let more = accounts.len() > limit;
    accounts.truncate(limit);
    let next = if more { accounts.last().map(|a| a.id.clone()) } else { None };
    Ok(Json(json!({"accounts": accounts, "next": next})))
}

async fn audit(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    match crate::audit::run(&state.engine).await {
        Ok(mut report) => {
            // Active holds are prepared debits on their shards: the rule that `held` is what prepared debits
            // explain covers them, and here is how many there are.
            report["holds_active"] = state.engine.in_memory().await?["holds"].clone();
            Ok(Json(report))
        }
        Err(crate::audit::AuditError::ShardUnavailable(shard, _) | crate::audit::AuditError::SnapshotTooOld(shard)) => {
            Err(ApiError::ParticipantUnavailable(shard))
        }
        Err(crate::audit::AuditError::Wal(e)) => Err(ApiError::Storage(e.to_string())),
    }
}

/// `{"from","to","amount"}` or `{"legs":[...]}`, with an optional `id`. Every field is optional (a missing
/// `Option` is `None`) so that [`validate_transfer`] can say which rule a body breaks, and which leg.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TransferRequest {
    from: Option<String>,
    to: Option<String>,
    amount: Option<serde_json::Number>,
    /// Each leg's text, parsed on its own so that a bad one is named.
    legs: Option<Vec<Box<serde_json::value::RawValue>>>,
    id: Option<String>,
    /// Reserve the amount instead of moving it, for `expires_in_s` (default a day).
    hold: Option<bool>,
    expires_in_s: Option<serde_json::Number>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LegRequest {
    from: Option<String>,
    to: Option<String>,
    amount: Option<serde_json::Number>,
}

async fn create_transfer(
    State(state): State<AppState>,
    caller: Option<Extension<Caller>>,
    body: Result<JsonBody<TransferRequest>, BodyError>,
) -> Result<Response, ApiError> {
    let req = json_body(body, PUBLIC_BODY_BYTES_MAX)?;
    let (id, transfer) = validate_transfer(req)?;
    let made_by = caller.map(|Extension(c)| c.name);
    let (status, body) = run_transfer(&state, id, transfer, made_by).await?;
    Ok((status, Json(body)).into_response())
}

/// Decides one valid transfer, as `POST /transfers` and each item of a batch do.
async fn run_transfer(
    state: &AppState,
    id: Option<Uuid>,
    transfer: Transfer,
    made_by: Option<String>,
) -> Result<(StatusCode, Value), ApiError> {
    let id = id.unwrap_or_else(Uuid::new_v4);
    tracing::info_span!("transfer", transfer_id = %id).in_scope(|| crash::point(crash::COORDINATOR_TRANSFER_RECEIVED));
    let started = std::time::Instant::now();
    let fin = state.engine.submit(id, transfer, made_by).await?;
    tracing::debug!(transfer_id = %id, outcome = ?fin.outcome, "transfer answered");
    let took = started.elapsed();
    metrics::histogram!(crate::metric::TRANSFER_SECONDS).record(took);
    state.rates.record(fin.outcome == Outcome::Committed, took);
    Ok(outcome_body(id, &fin))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchRequest {
    /// Each item's text, parsed on its own: a bad item is that item's 400, and no tree of values is built.
    transfers: Vec<Box<serde_json::value::RawValue>>,
}

/// Items of a batch handed to the engine as one command: such a group waits for room for all its items at
/// once and is answered when its last item is decided. Small beside the batch room (half of
/// `--transfers-in-flight-max`), so that groups of several batches share the room as single items would.
const BATCH_GROUP_ITEMS_MAX: usize = 256;

/// One batch item's answer.
enum BatchAnswer {
    Decided(Uuid, Final),
    /// Refused or failed: its status and body.
    Failed(StatusCode, Value),
}

/// `POST /transfers/batch`: each item is what `POST /transfers` would take, and gets what it would answer, with
/// its status as `code`. Items are independent (their own ids, idempotency and outcomes); they are decided
/// together, so they share the coordinator's and the shards' group commits. Every result is final and durable
/// before the answer. Only a malformed envelope fails the whole request.
async fn create_transfers_batch(
    State(state): State<AppState>,
    caller: Option<Extension<Caller>>,
    body: Result<JsonBody<BatchRequest>, BodyError>,
) -> Result<Response, ApiError> {
    let req = json_body(body, BATCH_BODY_BYTES_MAX)?;
    if req.transfers.is_empty() || req.transfers.len() > BATCH_ITEMS_MAX {
        return Err(ApiError::Invalid(format!("transfers must hold 1 to {BATCH_ITEMS_MAX} items")));
    }
    let made_by = caller.map(|Extension(c)| c.name);
    let mut answers: Vec<Option<BatchAnswer>> = Vec::with_capacity(req.transfers.len());
    let mut valid = Vec::with_capacity(req.transfers.len());
    for (index, item) in req.transfers.iter().enumerate() {
        let parsed = from_json_object::<TransferRequest>(item.get().as_bytes())
            .map_err(|e| ApiError::Invalid(format!("malformed transfer: {e}")))
            .and_then(validate_transfer);
        match parsed {
            Ok((id, transfer)) => {
                let id = id.unwrap_or_else(Uuid::new_v4);
                tracing::info_span!("transfer", transfer_id = %id)
                    .in_scope(|| crash::point(crash::COORDINATOR_TRANSFER_RECEIVED));
                valid.push((index, id, transfer));
                answers.push(None);
            }
            Err(error) => {
                let (status, body) = error.answer();
                answers.push(Some(BatchAnswer::Failed(status, body)));
            }
        }
    }
    drop(req);
    let group_max = BATCH_GROUP_ITEMS_MAX.min(state.batch_room_max);
    let mut groups = Vec::with_capacity(valid.len().div_ceil(group_max));
    let mut rest = valid.into_iter().peekable();
    while rest.peek().is_some() {
        let group: Vec<_> = rest.by_ref().take(group_max).collect();
        groups.push(decide_group(&state, group, made_by.clone()));
    }
    for decided in futures::future::join_all(groups).await {
        for (index, answer) in decided {
            answers[index] = Some(answer);
        }
    }
    let mut body = Vec::with_capacity(160 * answers.len() + 16);
    body.extend_from_slice(br#"{"results":["#);
    for (i, answer) in answers.into_iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        let answer = answer.unwrap_or_else(|| {
            let (status, body) = ApiError::Storage("a batch item got no answer".into()).answer();
            BatchAnswer::Failed(status, body)
        });
        write_batch_item(&mut body, answer);
    }
    body.extend_from_slice(b"]}");
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

/// Decides a group of valid batch items through one engine command: (item index, answer) for each.
async fn decide_group(
    state: &AppState,
    group: Vec<(usize, Uuid, Transfer)>,
    made_by: Option<String>,
) -> Vec<(usize, BatchAnswer)> {
    let mut slots = Vec::with_capacity(group.len());
    let mut items = Vec::with_capacity(group.len());
    for (index, id, transfer) in group {
        slots.push((index, id));
        items.push((id, transfer));
    }
    let count = u32::try_from(items.len()).unwrap_or(u32::MAX);
    let decided = match state.batch_room.acquire_many(count).await {
        Err(_) => Err(ApiError::Overloaded),
        Ok(_room) => {
            let started = std::time::Instant::now();
            state
                .engine
                .submit_many(items, made_by)
                .await
                .map(|finals| (finals, started.elapsed()))
                .map_err(ApiError::from)
        }
    };
    let (finals, took) = match decided {
        Ok(decided) => decided,
        Err(error) => {
            let (status, body) = error.answer();
            return slots.into_iter().map(|(index, _)| (index, BatchAnswer::Failed(status, body.clone()))).collect();
        }
    };
    let latency = metrics::histogram!(crate::metric::TRANSFER_SECONDS);
    slots
        .into_iter()
        .zip(finals)
        .map(|((index, id), fin)| match fin {
            Ok(fin) => {
                tracing::debug!(transfer_id = %id, outcome = ?fin.outcome, "transfer answered");
                latency.record(took);
                state.rates.record(fin.outcome == Outcome::Committed, took);
                (index, BatchAnswer::Decided(id, fin))
            }
            Err(error) => {
                let (status, body) = ApiError::from(error).answer();
                (index, BatchAnswer::Failed(status, body))
            }
        })
        .collect()
}

/// Appends one batch item's answer, with its status as `code`: written directly for a committed transfer of
/// one leg (nearly every item), byte for byte as its `Value` form would be (keys in order), which costs a map
/// per item.
fn write_batch_item(out: &mut Vec<u8>, answer: BatchAnswer) {
    use std::io::Write;
    let (status, mut body) = match answer {
        BatchAnswer::Decided(id, fin) => {
            if let (Outcome::Committed, Some(leg), None) =
                (fin.outcome, fin.transfer.single(), fin.transfer.hold_seconds())
            {
                // Account ids are [A-Za-z0-9_-] and a UUID is hex and dashes: nothing needs escaping.
                let (amount, from, to) = (leg.amount.minor(), leg.from.as_str(), leg.to.as_str());
                let _ = write!(
                    out,
                    r#"{{"amount":{amount},"code":200,"from":"{from}","id":"{id}","status":"committed","to":"{to}"}}"#
                );
                return;
            }
            outcome_body(id, &fin)
        }
        BatchAnswer::Failed(status, body) => (status, body),
    };
    body["code"] = json!(status.as_u16());
    // Writing a `Value` to a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, &body);
}

/// Every rule a transfer request must meet, in one pure function (fuzzed by the tests below).
fn validate_transfer(req: TransferRequest) -> Result<(Option<Uuid>, Transfer), ApiError> {
    let id = match req.id {
        Some(raw) => Some(Uuid::parse_str(&raw).map_err(|_| ApiError::Invalid("id must be a UUID".into()))?),
        None => None,
    };
    let hold = req.hold == Some(true);
    if req.expires_in_s.is_some() && !hold {
        return Err(ApiError::Invalid("expires_in_s is only for a hold (\"hold\": true)".into()));
    }
    if hold && req.legs.is_some() {
        return Err(ApiError::Invalid("a hold has one leg: from, to and amount, not legs".into()));
    }
    let Some(legs) = req.legs else {
        let leg =
            validate_leg(LegRequest { from: req.from, to: req.to, amount: req.amount }).map_err(ApiError::Invalid)?;
        if !hold {
            return Ok((id, Transfer::one(leg.from, leg.to, leg.amount)));
        }
        let seconds = match &req.expires_in_s {
            Some(raw) => {
                let seconds = whole_number_in("expires_in_s", raw, 1..=i64::from(HOLD_SECONDS_MAX), "seconds")?;
                u32::try_from(seconds).map_err(|_| ApiError::Invalid("expires_in_s is out of range".into()))?
            }
            None => HOLD_SECONDS_DEFAULT,
        };
        let transfer =
            Transfer::hold(leg.from, leg.to, leg.amount, seconds).map_err(|e| ApiError::Invalid(e.to_string()))?;
        return Ok((id, transfer));
    };
    if req.from.is_some() || req.to.is_some() || req.amount.is_some() {
        return Err(ApiError::Invalid("a transfer has either from, to and amount, or legs, not both".into()));
    }
    if legs.is_empty() || legs.len() > LEGS_MAX {
        return Err(ApiError::Invalid(format!("legs must hold 1 to {LEGS_MAX} legs")));
    }
    let legs = legs
        .iter()
        .enumerate()
        .map(|(leg, raw)| {
            let request =
                from_json_object::<LegRequest>(raw.get().as_bytes()).map_err(|e| format!("malformed leg: {e}"));
            request.and_then(validate_leg).map_err(|message| ApiError::InvalidLeg { leg, message })
        })
        .collect::<Result<Vec<Leg>, ApiError>>()?;
    let transfer = Transfer::new(legs).map_err(|e| ApiError::Invalid(e.to_string()))?;
    Ok((id, transfer))
}

/// The rules for one movement, whether it is a whole transfer's body or one of its legs.
fn validate_leg(req: LegRequest) -> Result<Leg, String> {
    let present = |field: &str, value: Option<String>| value.ok_or_else(|| format!("missing field `{field}`"));
    let invalid = |e: ApiError| e.message();
    let from = account_id("from", present("from", req.from)?).map_err(invalid)?;
    let to = account_id("to", present("to", req.to)?).map_err(invalid)?;
    if from == to {
        return Err("from and to must be different accounts".into());
    }
    let amount = req.amount.ok_or("missing field `amount`")?;
    let amount = Amount::new(whole_number("amount", &amount, 1).map_err(invalid)?).map_err(|e| e.to_string())?;
    Ok(Leg { from, to, amount })
}

/// A hold as the API shows it: `amount` is what it holds, or what was captured of it (then `held_amount` is
/// what it held); `expires_at_unix_ms` while it is held.
fn hold_json(id: Uuid, transfer: &Transfer, outcome: Option<Outcome>) -> Value {
    let leg = transfer.single();
    let held = leg.map(|l| l.amount.minor());
    let mut body = json!({
        "id": id,
        "status": outcome.map_or("pending", Outcome::status),
        "from": leg.map(|l| l.from.as_str()),
        "to": leg.map(|l| l.to.as_str()),
        "amount": held,
    });
    match outcome {
        Some(Outcome::Held { expires_at_unix_ms }) => body["expires_at_unix_ms"] = json!(expires_at_unix_ms),
        Some(Outcome::Captured { amount }) => {
            body["amount"] = json!(amount);
            body["held_amount"] = json!(held);
        }
        Some(outcome) if outcome.abort_reason().is_some() => {
            body["reason"] = json!(outcome.abort_reason().map(AbortReason::code))
        }
        _ => {}
    }
    body
}

/// The status and body that answer a decided transfer.
fn outcome_body(id: Uuid, fin: &Final) -> (StatusCode, Value) {
    match fin.outcome {
        Outcome::Committed => {
            let body = wire::transfer_json(&fin.transfer, json!({"id": id, "status": "committed"}));
            (StatusCode::OK, body)
        }
        Outcome::Held { .. } | Outcome::Captured { .. } | Outcome::Released | Outcome::Expired => {
            (StatusCode::OK, hold_json(id, &fin.transfer, Some(fin.outcome)))
        }
        Outcome::Aborted(reason) | Outcome::AbortedAtLeg { reason, .. } => {
            let status = match reason {
                AbortReason::InsufficientFunds | AbortReason::BalanceOverflow => StatusCode::UNPROCESSABLE_ENTITY,
                AbortReason::AccountNotFound => StatusCode::NOT_FOUND,
                AbortReason::ParticipantUnavailable | AbortReason::CoordinatorRestarted => {
                    StatusCode::SERVICE_UNAVAILABLE
                }
            };
            if fin.transfer.hold_seconds().is_some() {
                return (status, hold_json(id, &fin.transfer, Some(fin.outcome)));
            }
            let mut body = json!({"id": id, "status": "aborted", "reason": reason.code()});
            if let Some(leg) = fin.outcome.failed_leg() {
                body["leg"] = json!(leg);
            }
            (status, body)
        }
    }
}

/// Longest page of a listing.
const LIST_LIMIT_MAX: usize = 1_000;
const LIST_LIMIT_DEFAULT: usize = 50;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListTransfersQuery {
    account: Option<String>,
    limit: Option<usize>,
}

/// `limit` of a listing of `listed` (accounts, transfers, holds).
fn list_limit(limit: Option<usize>, listed: &str) -> Result<usize, ApiError> {
    match limit.unwrap_or(LIST_LIMIT_DEFAULT) {
        n @ 1..=LIST_LIMIT_MAX => Ok(n),
        _ => Err(limit_error(listed)),
    }
}

fn limit_error(listed: &str) -> ApiError {
    ApiError::Invalid(format!("limit must be a whole number from 1 to {LIST_LIMIT_MAX} ({listed} listed at most)"))
}

fn transfer_json(id: Uuid, transfer: &Transfer, outcome: Option<Outcome>) -> Value {
    if transfer.hold_seconds().is_some() {
        return hold_json(id, transfer, outcome);
    }
    let mut body = wire::transfer_json(transfer, json!({"id": id}));
    match outcome {
        None => body["status"] = json!("pending"),
        Some(Outcome::Committed) => body["status"] = json!("committed"),
        Some(outcome @ (Outcome::Held { .. } | Outcome::Captured { .. } | Outcome::Released | Outcome::Expired)) => {
            body["status"] = json!(outcome.status())
        }
        Some(outcome @ (Outcome::Aborted(_) | Outcome::AbortedAtLeg { .. })) => {
            body["status"] = json!("aborted");
            body["reason"] = json!(outcome.abort_reason().map(AbortReason::code));
            if let Some(leg) = outcome.failed_leg() {
                body["leg"] = json!(leg);
            }
        }
    }
    body
}

async fn list_transfers(
    State(state): State<AppState>,
    query: Result<Query<ListTransfersQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(query) = query.map_err(|e| query_error(e, "transfers"))?;
    let account = query.account.map(|a| account_id("account", a)).transpose()?;
    let limit = list_limit(query.limit, "transfers")?;
    let mut transfers = state.engine.running_of(account.as_ref(), limit).await?;
    let rest = limit - transfers.len();
    let storage = |e: crate::wal::WalError| ApiError::Storage(e.to_string());
    match &account {
        // The account's own journal on its shard names its committed transfers: the log keeps no index by
        // account, so a decision costs one record.
        Some(account) => {
            for id in journal_transfer_ids(&state, account, rest).await? {
                if let Some(record) = state.engine.wal.get(&id).map_err(storage)? {
                    transfers.push((id, record.transfer, Some(record.outcome)));
                }
            }
        }
        None => {
            let recent = state.engine.wal.recent(rest).map_err(storage)?;
            transfers.extend(recent.into_iter().map(|(id, r)| (id, r.transfer, Some(r.outcome))));
        }
    }
    let list: Vec<Value> = transfers.iter().map(|(id, t, o)| transfer_json(*id, t, *o)).collect();
    let mut body = json!({"transfers": list});
    if let Some(account) = account {
        body["account"] = json!(account);
    }
    Ok(Json(body))
}

/// The newest `limit` distinct transfers in `account`'s journal, newest first (several postings of one transfer
/// on one account give one id).
async fn journal_transfer_ids(state: &AppState, account: &AccountId, limit: usize) -> Result<Vec<Uuid>, ApiError> {
    let shard = shard_of(account, state.engine.config.shard_count);
    let mut ids: Vec<Uuid> = Vec::with_capacity(limit);
    let mut after: Option<u64> = None;
    while ids.len() < limit {
        let mut path = format!("{}/{account}/entries?limit={LIST_LIMIT_MAX}", wire::PATH_ACCOUNTS);
        if let Some(after) = after {
            path.push_str(&format!("&after={after}"));
        }
        let reply = shard_get(state, shard, path).await?;
        let page: Value = match reply.status() {
            StatusCode::OK => reply.json().await.map_err(|_| ApiError::ParticipantUnavailable(shard))?,
            StatusCode::NOT_FOUND => return Err(ApiError::AccountNotFound),
            _ => return Err(ApiError::ParticipantUnavailable(shard)),
        };
        let entries = page["entries"].as_array().map(Vec::as_slice).unwrap_or_default();
        for id in entries.iter().filter_map(|e| e["transfer_id"].as_str()).filter_map(|t| Uuid::parse_str(t).ok()) {
            if ids.len() < limit && !ids.contains(&id) {
                ids.push(id);
            }
        }
        match page["next"].as_u64() {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    Ok(ids)
}

async fn get_transfer(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let Path(raw) = path?;
    let id = Uuid::parse_str(&raw).map_err(|_| ApiError::Invalid("transfer id must be a UUID".into()))?;
    let (transfer, outcome) = state.engine.status(&id).await?.ok_or(ApiError::TransferNotFound)?;
    let mut body = transfer_json(id, &transfer, outcome);
    if let Some(name) = state.engine.wal.made_by(&id).map_err(|e| ApiError::Storage(e.to_string()))? {
        body["made_by"] = json!(name);
    }
    Ok(Json(body))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CaptureRequest {
    amount: Option<serde_json::Number>,
}

fn transfer_id(path: Result<Path<String>, PathRejection>) -> Result<Uuid, ApiError> {
    let Path(raw) = path?;
    Uuid::parse_str(&raw).map_err(|_| ApiError::Invalid("transfer id must be a UUID".into()))
}

/// `POST /transfers/{id}/capture`, with an optional `{"amount": n}` (all of the hold by default).
async fn capture_hold(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    headers: header::HeaderMap,
    body: Result<axum::body::Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = optional_json_body(&headers, body)?;
    let id = transfer_id(path)?;
    let amount = match optional_body::<CaptureRequest>(&body)? {
        Some(CaptureRequest { amount: Some(raw) }) => Some(whole_number("amount", &raw, 1)?),
        _ => None,
    };
    end_hold(&state, id, HoldEnd::Capture(amount)).await
}

/// `POST /transfers/{id}/release`: the body, if any, is `{}`.
async fn release_hold(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    headers: header::HeaderMap,
    body: Result<axum::body::Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = optional_json_body(&headers, body)?;
    let id = transfer_id(path)?;
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Empty {}
    optional_body::<Empty>(&body)?;
    end_hold(&state, id, HoldEnd::Release).await
}

fn is_blank(body: &[u8]) -> bool {
    body.iter().all(u8::is_ascii_whitespace)
}

/// A body that may be left out: absent (empty, whatever its Content-Type), or JSON that says so, as every other
/// body of the API must be (a form-encoded body is a 415, not a capture).
fn optional_json_body(
    headers: &header::HeaderMap,
    body: Result<axum::body::Bytes, BytesRejection>,
) -> Result<axum::body::Bytes, ApiError> {
    let body = body.map_err(|rejection| match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::TooLarge(PUBLIC_BODY_BYTES_MAX),
        _ => ApiError::Invalid("could not read the request body".into()),
    })?;
    if is_blank(&body) || common::http::is_json(headers) {
        Ok(body)
    } else {
        Err(ApiError::NotJson)
    }
}

/// A JSON body, or why it is refused: a body over `max_bytes`, the route's limit, is told the limit.
fn json_body<T>(body: Result<JsonBody<T>, BodyError>, max_bytes: usize) -> Result<T, ApiError> {
    match body {
        Ok(JsonBody(body)) => Ok(body),
        Err(BodyError::TooLarge) => Err(ApiError::TooLarge(max_bytes)),
        Err(BodyError::NotJson) => Err(ApiError::NotJson),
        Err(refused @ (BodyError::Malformed(_) | BodyError::Unreadable(_))) => {
            Err(ApiError::Invalid(refused.to_string()))
        }
    }
}

/// A body that may be left out (empty), and is otherwise a JSON object of type `T`.
fn optional_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<Option<T>, ApiError> {
    if is_blank(body) {
        return Ok(None);
    }
    from_json_object(body).map(Some).map_err(|e| ApiError::Invalid(format!("malformed request: {e}")))
}

async fn end_hold(state: &AppState, id: Uuid, end: HoldEnd) -> Result<Response, ApiError> {
    let fin = tracing::info_span!("transfer", transfer_id = %id).in_scope(|| state.engine.end_hold(id, end));
    let fin = fin.await?;
    let (status, body) = outcome_body(id, &fin);
    Ok((status, Json(body)).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HoldsQuery {
    account: Option<String>,
    limit: Option<usize>,
}

/// `GET /holds?account={id}`: the account's active holds, soonest expiry first (every account's without it).
async fn list_holds(
    State(state): State<AppState>,
    query: Result<Query<HoldsQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(query) = query.map_err(|e| query_error(e, "holds"))?;
    let account = query.account.map(|a| account_id("account", a)).transpose()?;
    let limit = list_limit(query.limit, "holds")?;
    let holds = state.engine.holds_of(account, limit).await?;
    let list: Vec<Value> = holds
        .iter()
        .map(|(id, transfer, expires_at_unix_ms)| {
            hold_json(*id, transfer, Some(Outcome::Held { expires_at_unix_ms: *expires_at_unix_ms }))
        })
        .collect();
    Ok(Json(json!({"holds": list})))
}

#[derive(Deserialize)]
struct TransactionsQuery {
    status: Option<String>,
}

async fn transactions(
    State(state): State<AppState>,
    query: Result<Query<TransactionsQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(query) = query.map_err(|e| query_error(e, "transactions"))?;
    match query.status.as_deref() {
        // `in_doubt` is the name earlier versions gave it.
        Some("unacknowledged" | "in_doubt") => Ok(Json(json!({"transactions": state.engine.unacknowledged().await}))),
        _ => Err(ApiError::Invalid("status must be given and be unacknowledged".into())),
    }
}

async fn health(State(state): State<AppState>) -> Json<Value> {
    let checks = state.engine.participants.iter().map(|client| async move {
        let up = client.is_up(HEALTH_TIMEOUT).await;
        json!({"shard": client.shard, "url": client.url, "up": up})
    });
    let participants = futures::future::join_all(checks).await;
    let all_up = participants.iter().all(|p| p["up"] == json!(true));
    Json(json!({"status": if all_up { "ok" } else { "degraded" }, "participants": participants}))
}

async fn stats(State(state): State<AppState>) -> Json<Value> {
    use std::sync::atomic::Ordering::Relaxed;
    let s = &state.engine.wal.store().stats;
    let unacknowledged = state.engine.unacknowledged().await.len();
    Json(json!({
        "fsyncs": s.fsyncs.load(Relaxed),
        "flush_waiters": s.waiters.load(Relaxed),
        "flush_micros": s.flush_micros.load(Relaxed),
        "history_runs": state.engine.wal.store().runs_json(),
        "unacknowledged": unacknowledged,
        // The same count under its earlier name.
        "in_doubt": unacknowledged,
        "in_memory": state.engine.in_memory().await.unwrap_or(Value::Null),
        "transfers": state.rates.to_json(),
    }))
}

async fn decisions(
    State(state): State<AppState>,
    JsonBody(query): JsonBody<DecisionQuery>,
) -> Result<Json<DecisionAnswers>, ApiError> {
    tracing::debug!(shard = query.shard, count = query.items.len(), "decision query");
    let answers = state.engine.answer_queries(query.items).await?;
    Ok(Json(DecisionAnswers { answers }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_batch_item_written_directly_is_its_value_form_byte_for_byte() {
        let account = |s: &str| AccountId::new(s).expect("valid id");
        let amount = |a: i64| Amount::new(a).expect("valid amount");
        let id = Uuid::new_v4();
        let transfers = [
            Transfer::one(account("alice_1"), account("bob-2"), amount(i64::MAX)),
            Transfer::new(vec![Leg { from: account("a"), to: account("b"), amount: amount(3) }; 2]).expect("legs"),
            Transfer::hold(account("a"), account("b"), amount(3), 60).expect("hold"),
        ];
        let outcomes = [Outcome::Committed, Outcome::Aborted(AbortReason::InsufficientFunds)];
        for transfer in &transfers {
            for outcome in outcomes {
                let fin = Final { transfer: transfer.clone(), outcome };
                let (status, mut want) = outcome_body(id, &fin);
                want["code"] = json!(status.as_u16());
                let mut got = Vec::new();
                write_batch_item(&mut got, BatchAnswer::Decided(id, fin));
                assert_eq!(String::from_utf8(got).expect("utf8"), want.to_string(), "{transfer} {outcome:?}");
            }
        }
    }

    /// The rules, restated independently: what the validator must accept.
    fn acceptable(from: &str, to: &str, amount: &Value, id: Option<&str>) -> bool {
        let good_id = |s: &str| {
            !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        };
        let good_amount = amount.as_i64().is_some_and(|a| a >= 1);
        good_id(from) && good_id(to) && from != to && good_amount && id.is_none_or(|i| Uuid::parse_str(i).is_ok())
    }

    fn account_like() -> impl Strategy<Value = String> {
        prop_oneof!["[A-Za-z0-9_-]{1,64}", "[a-c]{1,2}", ".{0,70}", Just(String::new()), "[A-Za-z0-9_-]{65,70}",]
    }

    fn amount_like() -> impl Strategy<Value = Value> {
        prop_oneof![
            any::<i64>().prop_map(Value::from),
            (1i64..1_000).prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_filter("JSON has no NaN or infinity", |f| f.is_finite()).prop_map(Value::from),
            ".{0,8}".prop_map(Value::from),
            Just(Value::Null),
            Just(json!([1])),
        ]
    }

    fn id_like() -> impl Strategy<Value = Option<String>> {
        prop_oneof![
            Just(None),
            any::<u128>().prop_map(|n| Some(Uuid::from_u128(n).to_string())),
            ".{0,40}".prop_map(Some),
        ]
    }

    #[test]
    fn a_transfer_of_several_legs_is_validated_leg_by_leg_and_a_bad_leg_is_named() {
        let parse = |body: Value| validate_transfer(serde_json::from_str(&body.to_string()).expect("parses"));
        let good = json!({"from": "a", "to": "b", "amount": 3});
        let (_, t) = parse(json!({"legs": [good, {"from": "b", "to": "c", "amount": 1}]})).expect("valid");
        assert_eq!(t.to_string(), "a->b 3, b->c 1");
        let (_, t) = parse(json!({"legs": [good]})).expect("one leg in a list is valid");
        assert_eq!(t.single().map(|leg| leg.amount.minor()), Some(3));
        let bad_legs = [
            (json!([good, {"from": "a", "to": "a", "amount": 1}]), 1),
            (json!([good, good, {"from": "a", "amount": 1}]), 2),
            (json!([{"from": "a", "to": "b", "amount": 0}]), 0),
            (json!([good, 5]), 1),
            (json!([good, {"from": "a", "to": "b", "amount": 1, "memo": "x"}]), 1),
            (json!([{"from": "bad id!", "to": "b", "amount": 1}]), 0),
        ];
        for (legs, index) in bad_legs {
            match parse(json!({"legs": legs})) {
                Err(error @ ApiError::InvalidLeg { leg, .. }) => {
                    assert_eq!(leg, index, "{legs}");
                    let (status, body) = error.answer();
                    assert_eq!((status, &body["error"]["leg"]), (StatusCode::BAD_REQUEST, &json!(index)));
                    assert!(error.message().starts_with(&format!("legs[{index}]: ")), "{}", error.message());
                }
                other => panic!("{legs}: {:?}", other.map(|(_, t)| t.to_string())),
            }
        }
        let whole_body_errors = [
            json!({"legs": []}),
            json!({"legs": vec![good.clone(); LEGS_MAX + 1]}),
            json!({"legs": [good], "from": "a"}),
            json!({"legs": [good], "id": "nope"}),
        ];
        for body in whole_body_errors {
            assert!(matches!(parse(body.clone()), Err(ApiError::Invalid(_))), "{body}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4_000))]

        /// Whatever the fields hold, the validator accepts exactly the valid requests and never panics.
        #[test]
        fn transfer_validation_matches_the_rules(
            from in account_like(), to in account_like(), amount in amount_like(), id in id_like(),
        ) {
            let mut body = json!({"from": from, "to": to, "amount": amount});
            if let Some(id) = &id {
                body["id"] = json!(id);
            }
            let parsed: Result<TransferRequest, _> = serde_json::from_value(body);
            let expected = acceptable(&from, &to, &amount, id.as_deref());
            match parsed {
                Ok(req) => {
                    let result = validate_transfer(req);
                    prop_assert_eq!(result.is_ok(), expected, "from={:?} to={:?} amount={} id={:?}", from, to, amount, id);
                    if let Ok((_, t)) = result {
                        let leg = t.single().expect("a two-account body is one leg");
                        prop_assert_eq!(Some(leg.amount.minor()), amount.as_i64());
                        prop_assert_eq!(leg.from.as_str(), from.as_str());
                    }
                }
                // Only a non-number amount may fail to deserialise, and such a request is invalid.
                Err(_) => prop_assert!(!expected && !amount.is_number()),
            }
        }

        /// Arbitrary bytes never panic the parser; whatever parses is then validated without panicking.
        #[test]
        fn arbitrary_bodies_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            if let Ok(req) = serde_json::from_slice::<TransferRequest>(&bytes) {
                let _ = validate_transfer(req);
            }
            if let Ok(req) = serde_json::from_slice::<CreateAccountRequest>(&bytes) {
                let _ = account_id("id", req.id);
            }
        }
    }
}
