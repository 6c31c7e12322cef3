//! The protocol's messages: what a coordinator and a participant say to each other, whatever carries it.

use crate::ledger::{AccountId, Posting, Transfer, TransferId};
use crate::state::AccountRecord;
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

/// One piece of work for a shard. A frame carries several, and a shard handles them in order.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ToShard {
    Prepare {
        item: PrepareItem,
        /// The name of the API token that submitted the transfer, for the shard's journal.
        made_by: Option<String>,
    },
    Decide {
        id: TransferId,
        decision: Decision,
    },
    /// Read an account. It travels behind every decision queued before it, so a client that was told its
    /// transfer committed reads the new balance.
    Read {
        read: u64,
        account: AccountId,
    },
    /// Commit `amount` of a hold (1 up to its amount) and release the rest. Acknowledged as a commit.
    Capture {
        id: TransferId,
        amount: i64,
    },
}

/// A shard's answer to one [`ToShard`] item.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum FromShard {
    Vote {
        id: TransferId,
        #[serde(with = "vote_as_refusal")]
        vote: Vote,
    },
    Ack {
        id: TransferId,
        decision: Decision,
        ack: DecideAck,
    },
    Account {
        read: u64,
        account: Option<AccountRecord>,
    },
}

/// [`Vote`]'s own serde form is tagged for JSON, which bincode cannot read back; on the stream a vote is the
/// refusal it carries, if any.
mod vote_as_refusal {
    use crate::msg::{RefusalReason, Vote};
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(vote: &Vote, s: S) -> Result<S::Ok, S::Error> {
        let refusal = match vote {
            Vote::Yes => None,
            Vote::No { reason, posting } => Some((*reason, *posting)),
        };
        refusal.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vote, D::Error> {
        let refusal = Option::<(RefusalReason, Option<u8>)>::deserialize(d)?;
        Ok(refusal.map_or(Vote::Yes, |(reason, posting)| Vote::No { reason, posting }))
    }
}
