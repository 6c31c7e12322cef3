//! The protocol's durable state, as plain types: what a participant keeps per account and per prepared or
//! finished transfer, and what the coordinator keeps per decision. `common::records` owns how they are laid
//! out on disk.

use crate::ledger::{AccountId, Posting, ShardId, Transfer, TransferId};
use crate::msg::Decision;
use serde::{Deserialize, Serialize};

/// Participant: one account's money. `held` is reserved by prepared debits; `incoming` is promised to prepared
/// credits, so a commit can never overflow the balance. Only `balance` and `overdraft_limit` are stored:
/// `held` and `incoming` follow from the prepared records, so a prepare writes one record, not two.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AccountRecord {
    /// The money in the account, in minor units.
    pub balance: i64,
    /// The sum of the debits of the transfers prepared here: money no other debit may take.
    pub held: i64,
    /// The sum of the credits of the transfers prepared here: headroom below `i64::MAX` kept for them.
    pub incoming: i64,
    /// How far below zero the balance may go (0 for a customer's account; a bank's cash or settlement account
    /// has one, or no money could ever enter the ledger). Fixed when the account is opened.
    pub overdraft_limit: i64,
}

impl AccountRecord {
    /// What a new debit may take: `balance - held + overdraft_limit`, exact (the sum can pass `i64::MAX`).
    pub fn available_exact(&self) -> i128 {
        i128::from(self.balance) - i128::from(self.held) + i128::from(self.overdraft_limit)
    }

    /// [`Self::available_exact`], capped at `i64::MAX` for showing.
    pub fn available(&self) -> i64 {
        i64::try_from(self.available_exact()).unwrap_or(i64::MAX)
    }

    /// The balance is below what its overdraft limit allows: what the invariants forbid.
    pub fn below_floor(&self) -> bool {
        i128::from(self.balance) < -i128::from(self.overdraft_limit)
    }
}

/// Participant: a transfer this shard voted YES on and has not yet seen decided.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PreparedRecord {
    /// The whole transfer, as the coordinator sent it, for describing it in a decision query.
    pub transfer: Transfer,
    /// This shard's part of the transfer: what a commit applies and what the holds follow from.
    pub postings: Vec<Posting>,
    /// Where to ask for the decision while in doubt.
    pub coordinator_url: String,
    /// When the shard voted YES, on its own clock.
    pub prepared_at_unix_ms: u64,
    /// The name of the API token that submitted the transfer, for its journal entries at commit.
    pub made_by: Option<String>,
}

impl PreparedRecord {
    /// When its decision is due here: at once for a transfer, at its expiry for a hold (the coordinator
    /// captures, releases or expires it by then). Doubt about it is measured from this time.
    pub fn due_unix_ms(&self) -> u64 {
        let hold_ms = self.transfer.hold_seconds().map_or(0, |seconds| u64::from(seconds) * 1_000);
        self.prepared_at_unix_ms.saturating_add(hold_ms)
    }
}

/// Participant: a transfer that is over here, kept forever so a late Prepare or decision is recognised.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FinishedRecord {
    /// What was applied here; a later decision that contradicts it is refused.
    pub decision: Decision,
    /// The journal sequence number of the commit's last entry here (none for an abort): which audit snapshots
    /// include it.
    pub commit_seq: Option<u64>,
}

/// Why a transfer was aborted, as the client is told.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AbortReason {
    /// A shard refused a debit that would take a balance below its overdraft limit.
    InsufficientFunds,
    /// A shard has no account of that id.
    AccountNotFound,
    /// A shard refused a credit that would push a balance past `i64::MAX`.
    BalanceOverflow,
    /// A shard did not vote in time, or could not be reached.
    ParticipantUnavailable,
    /// The coordinator restarted while this transfer was being prepared; presumed abort made it final.
    CoordinatorRestarted,
}

impl AbortReason {
    /// The reason as the API's answers and the logs spell it; clients match on it, so it never changes.
    pub fn code(self) -> &'static str {
        match self {
            AbortReason::InsufficientFunds => "insufficient_funds",
            AbortReason::AccountNotFound => "account_not_found",
            AbortReason::BalanceOverflow => "balance_overflow",
            AbortReason::ParticipantUnavailable => "participant_unavailable",
            AbortReason::CoordinatorRestarted => "coordinator_restarted",
        }
    }
}

/// Coordinator: how a transfer ended (or, for a hold, stands), as logged and as its client is told.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Outcome {
    /// Every shard voted YES and the postings were applied.
    Committed,
    /// Aborted, for a reason that names no leg, or a transfer of one leg (whose record and answer are those of
    /// the transfers before legs).
    Aborted(AbortReason),
    /// A transfer of several legs aborted because of the leg at this index (the first failing one). After the
    /// variants before it, so that the records written before it existed read as they did.
    AbortedAtLeg {
        /// Why the leg failed.
        reason: AbortReason,
        /// The index of the leg in the transfer's legs.
        leg: u8,
    },
    /// A hold every shard voted YES on: its amount stays reserved until it is captured, released or expires
    /// (at this time, on the coordinator's clock). Not a decision: the shards hear nothing of it.
    Held {
        /// When the hold expires unless captured or released first.
        expires_at_unix_ms: u64,
    },
    /// A hold captured for `amount` (the rest released): a commit of that much.
    Captured {
        /// The part of the hold moved, in minor units.
        amount: i64,
    },
    /// A hold its client released: an abort.
    Released,
    /// A hold that reached its expiry: an abort.
    Expired,
}

impl Outcome {
    /// Why it aborted, if it did (a hold that ended by release or expiry did not abort: it was granted).
    pub fn abort_reason(self) -> Option<AbortReason> {
        match self {
            Outcome::Aborted(reason) | Outcome::AbortedAtLeg { reason, .. } => Some(reason),
            _ => None,
        }
    }

    /// A hold's end (capture, release or expiry): a decision that follows [`Outcome::Held`].
    pub fn ends_hold(self) -> bool {
        matches!(self, Outcome::Captured { .. } | Outcome::Released | Outcome::Expired)
    }

    /// What a client reads as its status.
    pub fn status(self) -> &'static str {
        match self {
            Outcome::Committed => "committed",
            Outcome::Aborted(_) | Outcome::AbortedAtLeg { .. } => "aborted",
            Outcome::Held { .. } => "held",
            Outcome::Captured { .. } => "captured",
            Outcome::Released => "released",
            Outcome::Expired => "expired",
        }
    }

    /// The leg whose failure aborted it, if one is named.
    pub fn failed_leg(self) -> Option<u8> {
        match self {
            Outcome::AbortedAtLeg { leg, .. } => Some(leg),
            _ => None,
        }
    }
}

/// Coordinator: the decision for one transfer. Kept forever: it answers idempotent retries and participants'
/// decision queries.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TransferRecord {
    /// The transfer as its client asked for it: a retry under the same id must carry the same body.
    pub transfer: Transfer,
    /// The decision, or how the hold stands.
    pub outcome: Outcome,
    /// The shards the transfer touches, which a commit must reach.
    pub shards: Vec<ShardId>,
    /// When the outcome was reached, on the coordinator's clock.
    pub decided_at_unix_ms: u64,
}

/// Participant: the kind of a journal entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    /// The account was created with `amount`.
    Opened,
    /// One posting of a committed transfer.
    Posting,
    /// An operator forced the transfer's outcome here without the coordinator (a heuristic decision).
    HeuristicCommit,
    /// An operator forced the transfer to abort here: its hold is released and nothing moves.
    HeuristicAbort,
    /// One posting of a committed transfer of several legs, from the leg at this index. After the kinds before
    /// it, so that the entries written before it existed read as they did.
    LegPosting {
        /// The index of the leg in the transfer's legs.
        leg: u8,
    },
    /// A hold granted here: `amount` is reserved (debit) or promised (credit); the balance does not change.
    Hold,
    /// The captured part of a hold, moved.
    Capture,
    /// A hold released or expired: nothing moved (amount 0).
    Release,
}

impl EntryKind {
    /// The entry records a commit (its transfer's money moved here).
    pub fn is_commit(self) -> bool {
        matches!(
            self,
            EntryKind::Posting | EntryKind::HeuristicCommit | EntryKind::LegPosting { .. } | EntryKind::Capture
        )
    }

    /// The entry changes the balance by its amount (the others record a reservation or its release).
    pub fn moves_balance(self) -> bool {
        self.is_commit() || self == EntryKind::Opened
    }
}

/// Participant: one entry of the append-only journal: a change of an account's balance (or a hold on it), with
/// the balance after it. Written in the same write group as the change it describes, and never edited.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct JournalEntry {
    /// One counter per shard, so the audit can tell exactly which commits a snapshot of the balances includes.
    pub seq: u64,
    /// The account changed.
    pub account: AccountId,
    /// What caused the change.
    pub kind: EntryKind,
    /// The transfer or hold it belongs to (none for an opening).
    pub transfer_id: Option<TransferId>,
    /// Signed change of the balance (0 for a heuristic abort, which only releases a hold).
    pub amount: i64,
    /// The account's balance once this entry is applied (unchanged by a hold or its release).
    pub balance_after: i64,
    /// When it was written, on the shard's clock.
    pub at_unix_ms: u64,
    /// Who caused it: the API token's name for a transfer, the operator for a heuristic decision.
    pub made_by: Option<String>,
}

/// Participant: an outcome forced by an operator while the coordinator was unreachable; the audit compares it
/// with the coordinator's own decision, if one ever appears.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct HeuristicRecord {
    /// The outcome the operator forced.
    pub decision: Decision,
    /// Who forced it, for the audit.
    pub operator: String,
    /// When it was forced, on the shard's clock.
    pub at_unix_ms: u64,
}
