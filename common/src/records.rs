//! On-disk records of both stores. Each value is one layout-version byte followed by its bincode body, so a
//! reader can tell a record it understands from one a newer binary wrote; `migrations` moves stores between
//! layouts. Keys are built here too, so the layout is described in one place.

use crate::ledger::{AccountId, Posting, ShardId, Transfer, TransferId};
use crate::wire::Decision;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// Layout version written in front of every record value.
pub const RECORD_VERSION: u8 = 1;
const _: () = assert!(RECORD_VERSION as u32 == migrations::LAYOUT_VERSION);

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("record has layout version {found}, this binary reads {RECORD_VERSION}")]
    Version { found: u8 },
    #[error("record is empty")]
    Empty,
    #[error("record does not decode: {0}")]
    Decode(#[from] bincode::Error),
}

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = vec![RECORD_VERSION];
    // Serialising plain owned data into a Vec cannot fail.
    bincode::serialize_into(&mut out, value).expect("bincode into a Vec is infallible");
    out
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, RecordError> {
    match bytes.split_first() {
        None => Err(RecordError::Empty),
        Some((&RECORD_VERSION, body)) => Ok(bincode::deserialize(body)?),
        Some((&found, _)) => Err(RecordError::Version { found }),
    }
}

/// Participant: one account's money. `held` is reserved by prepared debits; `incoming` is promised to prepared
/// credits, so a commit can never overflow the balance.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountRecord {
    pub balance: i64,
    pub held: i64,
    pub incoming: i64,
}

impl AccountRecord {
    pub fn available(&self) -> i64 {
        self.balance - self.held
    }
}

/// Participant: a transfer this shard voted YES on and has not yet seen decided.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreparedRecord {
    pub transfer: Transfer,
    pub postings: Vec<Posting>,
    pub coordinator_url: String,
    pub prepared_at_unix_ms: u64,
}

/// Participant: a transfer that is over here, kept forever so a late Prepare or decision is recognised.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinishedRecord {
    pub decision: Decision,
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

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Committed,
    Aborted(AbortReason),
}

/// Coordinator: the decision for one transfer. Kept forever: it answers idempotent retries and participants'
/// decision queries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferRecord {
    pub transfer: Transfer,
    pub outcome: Outcome,
    /// The shards the transfer touches, which a commit must reach.
    pub shards: Vec<ShardId>,
    pub decided_at_unix_ms: u64,
}

/// Participant keys: one tree, prefixed, so that one atomic batch can touch accounts and transfers together.
pub mod participant_keys {
    use super::*;

    pub const ACCOUNT: u8 = b'a';
    pub const PREPARED: u8 = b'p';
    pub const FINISHED: u8 = b'f';
    /// The shard number this store belongs to, fixed at first start.
    pub const SHARD: &[u8] = b"mshard";
    /// The id of the cluster this shard belongs to, adopted from the first coordinator call.
    pub const CLUSTER: &[u8] = b"mcluster";

    pub fn account(id: &AccountId) -> Vec<u8> {
        let mut key = Vec::with_capacity(1 + id.as_str().len());
        key.push(ACCOUNT);
        key.extend_from_slice(id.as_str().as_bytes());
        key
    }

    pub fn prepared(id: &TransferId) -> [u8; 17] {
        prefixed(PREPARED, id)
    }

    pub fn finished(id: &TransferId) -> [u8; 17] {
        prefixed(FINISHED, id)
    }

    fn prefixed(prefix: u8, id: &TransferId) -> [u8; 17] {
        let mut key = [0u8; 17];
        key[0] = prefix;
        key[1..].copy_from_slice(id.as_bytes());
        key
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_check_version() {
        let rec = AccountRecord { balance: 10, held: 3, incoming: 1 };
        let bytes = encode(&rec);
        assert_eq!(bytes[0], RECORD_VERSION);
        assert_eq!(decode::<AccountRecord>(&bytes).expect("decodes"), rec);
        let mut newer = bytes.clone();
        newer[0] = RECORD_VERSION + 1;
        assert!(matches!(decode::<AccountRecord>(&newer), Err(RecordError::Version { .. })));
        assert!(matches!(decode::<AccountRecord>(&[]), Err(RecordError::Empty)));
    }
}
