//! The protocol's messages: what a coordinator and a participant say to each other, whatever carries it.

use crate::ledger::{Posting, Transfer, TransferId};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PrepareItem {
    pub id: TransferId,
    /// The whole transfer as the client asked for it (the coordinator's view), kept with the prepared record
    /// so a recovering participant can describe the transfer when it asks for the decision.
    pub transfer: Transfer,
    /// This shard's part of the transfer.
    pub postings: Vec<Posting>,
    /// Where to ask for the decision if this participant is left in doubt.
    pub coordinator_url: String,
}

/// Why a participant refused to prepare.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefusalReason {
    AccountNotFound,
    InsufficientFunds,
    /// The credit would push a balance past i64::MAX.
    BalanceOverflow,
    /// The transfer id was already aborted here (a late or repeated Prepare).
    AlreadyAborted,
    /// The transfer id is prepared here for a different transfer: an id reused with another body, which the
    /// coordinator could not refuse because a crash lost its record of the first one.
    IdInUse,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "vote", rename_all = "snake_case")]
pub enum Vote {
    Yes,
    No {
        reason: RefusalReason,
        /// The index, in the item's postings, of the posting that was refused, when one was: the coordinator
        /// maps it to the leg it names to the client.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        posting: Option<u8>,
    },
}

impl Vote {
    /// A refusal of the whole item, not of one posting in it.
    pub fn no(reason: RefusalReason) -> Vote {
        Vote::No { reason, posting: None }
    }

    /// A refusal of the posting at `index` in the item's postings.
    pub fn no_at(reason: RefusalReason, index: usize) -> Vote {
        Vote::No { reason, posting: u8::try_from(index).ok() }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    Commit,
    Abort,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecideAck {
    /// The decision is applied and flushed (or was already).
    Done,
    /// Commit for a transfer this participant never prepared, or a decision contradicting an earlier one: a
    /// protocol violation, reported rather than applied.
    Refused,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DecisionQueryItem {
    pub id: TransferId,
    pub transfer: Transfer,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QueryAnswer {
    Commit,
    Abort,
    /// The coordinator is still deciding; ask again later.
    Pending,
    /// A hold the coordinator has durably granted: it ends by capture, release or expiry, so ask again only
    /// once it is due (`PreparedRecord::due_unix_ms`).
    Held,
}
