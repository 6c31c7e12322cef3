//! The protocol's durable state, as plain types: what a participant keeps per account and per prepared or
//! finished transfer, and what the coordinator keeps per decision. `common::records` owns how they are laid
//! out on disk.

use crate::ledger::{Posting, ShardId, Transfer};
use crate::msg::Decision;
use serde::{Deserialize, Serialize};

/// Participant: one account's money. `held` is reserved by prepared debits; `incoming` is promised to prepared
/// credits, so a commit can never overflow the balance. Only `balance` and `overdraft_limit` are stored:
/// `held` and `incoming` follow from the prepared records, so a prepare writes one record, not two.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AccountRecord {
    pub balance: i64,
    pub held: i64,
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
    pub transfer: Transfer,
    pub postings: Vec<Posting>,
    pub coordinator_url: String,
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
    pub decision: Decision,
    /// The journal sequence number of the commit's last entry here (none for an abort): which audit snapshots
    /// include it.
    pub commit_seq: Option<u64>,
}

/// Why a transfer was aborted, as the client is told.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AbortReason {
    InsufficientFunds,
    AccountNotFound,
    BalanceOverflow,
    ParticipantUnavailable,
    /// The coordinator restarted while this transfer was being prepared; presumed abort made it final.
    CoordinatorRestarted,
}

impl AbortReason {
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

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Outcome {
    Committed,
    /// Aborted, for a reason that names no leg, or a transfer of one leg (whose record and answer are those of
    /// the transfers before legs).
    Aborted(AbortReason),
    /// A transfer of several legs aborted because of the leg at this index (the first failing one). After the
    /// variants before it, so that the records written before it existed read as they did.
    AbortedAtLeg {
        reason: AbortReason,
        leg: u8,
    },
    /// A hold every shard voted YES on: its amount stays reserved until it is captured, released or expires
    /// (at this time, on the coordinator's clock). Not a decision: the shards hear nothing of it.
    Held {
        expires_at_unix_ms: u64,
    },
    /// A hold captured for `amount` (the rest released): a commit of that much.
    Captured {
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
    pub transfer: Transfer,
    pub outcome: Outcome,
    /// The shards the transfer touches, which a commit must reach.
    pub shards: Vec<ShardId>,
    pub decided_at_unix_ms: u64,
}
