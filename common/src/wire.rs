//! Messages between the coordinator and the participants over plain HTTP (JSON): the introduction, account
//! opening and reads, decision queries, and the books. The protocol's hot path (prepares, decisions, reads
//! behind them) travels on the binary stream (`crate::stream`) instead.

use crate::ledger::{AccountId, ShardId, TransferId};
pub use protocol::msg::*;
use serde::{Deserialize, Serialize};

/// Internal routes, shared so the two sides cannot drift apart.
pub const PATH_ACCOUNTS: &str = "/internal/accounts";
pub const PATH_APPLIED: &str = "/internal/applied";
pub const PATH_DECISIONS: &str = "/internal/decisions";
pub const PATH_JOIN: &str = "/internal/join";

/// The coordinator introduces itself: the shard it expects this participant to own. The cluster id travels in
/// its header, and the participant adopts it if it has none.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Join {
    pub shard: ShardId,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CreateAccount {
    pub id: AccountId,
    pub balance: i64,
    /// How far below zero the balance may go.
    #[serde(default)]
    pub overdraft_limit: i64,
}

/// A participant's view of one account.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountView {
    pub id: AccountId,
    pub balance: i64,
    pub held: i64,
    /// `balance - held + overdraft_limit`: what a new debit may take.
    pub available: i64,
    #[serde(default)]
    pub overdraft_limit: i64,
    pub shard: ShardId,
}

impl AccountView {
    pub fn of(id: AccountId, record: &crate::records::AccountRecord, shard: ShardId) -> AccountView {
        AccountView {
            id,
            balance: record.balance,
            held: record.held,
            available: record.available(),
            overdraft_limit: record.overdraft_limit,
            shard,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AccountList {
    pub accounts: Vec<AccountView>,
}

/// A participant in doubt asks the coordinator what became of these transfers.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DecisionQuery {
    pub shard: ShardId,
    pub items: Vec<DecisionQueryItem>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DecisionAnswers {
    pub answers: Vec<QueryAnswer>,
}

/// A finished transfer as a participant remembers it (the drill checks exactly-once application with these).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedTransfer {
    pub id: TransferId,
    pub decision: Decision,
}

/// Header carrying the cluster secret on every internal call.
pub const HEADER_CLUSTER_TOKEN: &str = "x-ledger-cluster-token";
/// Header carrying the cluster id (fixed at the coordinator's first start) on every internal call.
pub const HEADER_CLUSTER_ID: &str = "x-ledger-cluster-id";

pub const PATH_AUDIT: &str = "/internal/audit";
/// GET: a page of the shard's accounts in id order (`?limit=N&after=<id>`).
pub const PATH_ACCOUNT_LIST: &str = "/internal/account_list";
pub const PATH_COMMIT_SEQS: &str = "/internal/commit_seqs";

/// One shard's books at one instant (taken under its state lock), for the coordinator's audit.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ShardAudit {
    pub shard: ShardId,
    /// The journal sequence number the snapshot includes everything up to.
    pub seq: u64,
    pub accounts: u64,
    pub balance_total: i128,
    pub held_total: i128,
    pub incoming_total: i128,
    /// Money that entered through account creation.
    pub created_total: i128,
    /// Accounts whose balance is below minus their overdraft limit (below zero, for most accounts).
    #[serde(alias = "negative_balances")]
    pub below_overdraft_limit: Vec<AccountId>,
    /// A broken hold invariant (a hold that no prepared transfer explains), if any.
    pub invariant_violation: Option<String>,
    pub prepared: Vec<TransferId>,
    /// Transfers committed here with a sequence number after the `after_seq` asked for, up to `seq`.
    pub commits_since: Vec<TransferId>,
    pub heuristics: Vec<HeuristicView>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HeuristicView {
    pub id: TransferId,
    pub decision: Decision,
    pub operator: String,
    pub at_unix_ms: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CommitSeqsRequest {
    pub ids: Vec<TransferId>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CommitSeqsReply {
    /// Per id, the journal sequence number at which it was committed here, or null.
    pub seqs: Vec<Option<u64>>,
}

/// A transfer as the APIs show it, with `fields` (its id, its status...) beside its own: `from`, `to` and
/// `amount` for one leg, `legs` for several.
pub fn transfer_json(transfer: &crate::ledger::Transfer, fields: serde_json::Value) -> serde_json::Value {
    let mut body = serde_json::to_value(transfer).unwrap_or_default();
    if let (Some(body), serde_json::Value::Object(fields)) = (body.as_object_mut(), fields) {
        body.extend(fields);
    }
    body
}
