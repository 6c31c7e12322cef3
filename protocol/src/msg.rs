//! The protocol's messages: what a coordinator and a participant say to each other, whatever carries it.

use crate::ledger::{AccountId, Posting, Transfer, TransferId};
use crate::state::AccountRecord;
use serde::{Deserialize, Serialize};

/// Items in one frame of [`ToShard`]s: the coordinator's batching limit, and what a participant accepts. It
/// bounds a frame's size and a shard's time under its lock.
pub const FRAME_ITEMS_MAX: usize = 1_024;

/// Phase one for one shard: hold this transfer's postings here and vote on them.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PrepareItem {
    /// The transfer's id, the key its prepared record and its decision go by.
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
    /// A posting names an account this shard does not have.
    AccountNotFound,
    /// A debit would take the balance below its overdraft limit, counting what prepared transfers already hold.
    InsufficientFunds,
    /// The credit would push a balance past i64::MAX.
    BalanceOverflow,
    /// The transfer id was already aborted here (a late or repeated Prepare).
    AlreadyAborted,
    /// The transfer id is prepared here for a different transfer: an id reused with another body, which the
    /// coordinator could not refuse because a crash lost its record of the first one.
    IdInUse,
}

/// A shard's answer to a prepare: whether it can apply the transfer's postings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "vote", rename_all = "snake_case")]
pub enum Vote {
    /// The shard holds the funds and will apply whichever decision comes.
    Yes,
    /// The shard refused and holds nothing: the transfer must abort.
    No {
        /// Why the shard refused.
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

/// The coordinator's outcome for a transfer, logged before any shard hears it; it never changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// Apply the postings: every shard voted YES.
    Commit,
    /// Release what the postings hold and move nothing.
    Abort,
}

/// A shard's answer to a decision or a capture.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecideAck {
    /// The decision is applied and flushed (or was already).
    Done,
    /// Commit for a transfer this participant never prepared, or a decision contradicting an earlier one: a
    /// protocol violation, reported rather than applied.
    Refused,
}

/// A participant's question about a transfer it prepared and has no decision for.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DecisionQueryItem {
    /// The transfer in doubt.
    pub id: TransferId,
    /// The body prepared here, so the coordinator can tell an id reused with another body (which aborts).
    pub transfer: Transfer,
}

/// What a participant in doubt learns from the coordinator about one [`DecisionQueryItem`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QueryAnswer {
    /// The transfer committed: apply it.
    Commit,
    /// The transfer aborted, or was never decided and now never will be: release it.
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
    /// Phase one: hold the item's postings and answer with a [`FromShard::Vote`].
    Prepare {
        /// The transfer and this shard's part of it.
        item: PrepareItem,
        /// The name of the API token that submitted the transfer, for the shard's journal.
        made_by: Option<String>,
    },
    /// Phase two: apply the coordinator's decision and answer with a [`FromShard::Ack`].
    Decide {
        /// The transfer decided.
        id: TransferId,
        /// What the coordinator logged for it.
        decision: Decision,
    },
    /// Read an account. It travels behind every decision queued before it, so a client that was told its
    /// transfer committed reads the new balance.
    Read {
        /// The number the coordinator gave this read, echoed in the [`FromShard::Account`] that answers it.
        read: u64,
        /// The account to read; it lives on this shard.
        account: AccountId,
    },
    /// Commit `amount` of a hold (1 up to its amount) and release the rest. Acknowledged as a commit.
    Capture {
        /// The hold to capture.
        id: TransferId,
        /// How much of the hold moves, in minor units.
        amount: i64,
    },
}

/// A shard's answer to one [`ToShard`] item.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum FromShard {
    /// The answer to a [`ToShard::Prepare`].
    Vote {
        /// The transfer voted on.
        id: TransferId,
        /// Whether the shard holds the funds, or why not.
        #[serde(with = "vote_as_refusal")]
        vote: Vote,
    },
    /// The answer to a [`ToShard::Decide`] or a [`ToShard::Capture`].
    Ack {
        /// The transfer decided.
        id: TransferId,
        /// The decision acknowledged: a capture's is [`Decision::Commit`].
        decision: Decision,
        /// Whether the shard applied it or refused it.
        ack: DecideAck,
    },
    /// The answer to a [`ToShard::Read`].
    Account {
        /// The number of the read it answers.
        read: u64,
        /// The account as the shard has it, with every decision queued before the read applied; `None` if the
        /// shard has no such account.
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
