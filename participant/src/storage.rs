//! The participant's side of the store: turns the machine's writes into one atomic sled batch, and rebuilds the
//! machine from disk at start. The only participant module that touches sled.

use crate::journal::{self, HeuristicRecord, JournalEntry, JournalState};
use common::ledger::{AccountId, ShardId, TransferId};
use protocol::participant::{ParticipantMachine, RestoreError, Write};
use common::records::{self, participant_keys as keys, AccountRecord, FinishedRecord, PreparedRecord};
use common::store::{Store, StoreError};
use std::collections::HashMap;
use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("this data directory belongs to shard {stored}, not shard {requested}")]
    WrongShard { stored: ShardId, requested: ShardId },
    #[error("unreadable key {0:?} in the store")]
    BadKey(Vec<u8>),
    #[error("stored state is inconsistent: {0}")]
    Inconsistent(#[from] RestoreError),
}

impl From<sled::Error> for LoadError {
    fn from(e: sled::Error) -> Self {
        LoadError::Store(StoreError::Sled(e))
    }
}

impl From<records::RecordError> for LoadError {
    fn from(e: records::RecordError) -> Self {
        LoadError::Store(StoreError::Record(e))
    }
}

/// Applies the machine's `writes` and the journal's `extra` changes as one atomic batch (in sled's memory;
/// `Store::sync` makes it durable).
pub fn apply(store: &Store, writes: &[Write], extra: &journal::Inserts) -> Result<(), sled::Error> {
    if writes.is_empty() && extra.is_empty() {
        return Ok(());
    }
    let mut batch = sled::Batch::default();
    for (key, value) in extra {
        match value {
            Some(v) => batch.insert(key.as_slice(), v.as_slice()),
            None => batch.remove(key.as_slice()),
        }
    }
    for write in writes {
        match write {
            Write::Account(id, record) => batch.insert(keys::account(id), records::encode(record)),
            Write::Prepared(id, record) => batch.insert(&keys::prepared(id)[..], records::encode(record)),
            Write::ClearPrepared(id) => batch.remove(&keys::prepared(id)[..]),
            Write::Finished(id, decision) => {
                batch.insert(&keys::finished(id)[..], records::encode(&FinishedRecord { decision: *decision }))
            }
        }
    }
    store.db.apply_batch(batch)
}

/// The cluster id this shard adopted, if it has been contacted by a coordinator yet.
pub fn cluster_id(store: &Store) -> Result<Option<Uuid>, LoadError> {
    match store.db.get(keys::CLUSTER)? {
        None => Ok(None),
        Some(bytes) => Uuid::from_slice(&bytes).map(Some).map_err(|_| LoadError::BadKey(keys::CLUSTER.to_vec())),
    }
}

/// Binds this shard to a cluster for good.
pub async fn adopt_cluster_id(store: &Store, id: Uuid) -> Result<(), StoreError> {
    store.db.insert(keys::CLUSTER, id.as_bytes())?;
    store.sync().await
}

/// Checks (or, on first start, records) which shard this store belongs to, then reads the whole state back.
pub async fn load(store: &Store, shard: ShardId) -> Result<(ParticipantMachine, JournalState), LoadError> {
    match store.db.get(keys::SHARD)? {
        Some(bytes) => {
            let raw: [u8; 4] = bytes.as_ref().try_into().map_err(|_| LoadError::BadKey(keys::SHARD.to_vec()))?;
            let stored = u32::from_be_bytes(raw);
            if stored != shard {
                return Err(LoadError::WrongShard { stored, requested: shard });
            }
        }
        None => {
            store.db.insert(keys::SHARD, &shard.to_be_bytes())?;
            store.sync().await?;
        }
    }
    let mut accounts: HashMap<AccountId, AccountRecord> = HashMap::new();
    let mut prepared: HashMap<TransferId, PreparedRecord> = HashMap::new();
    let mut finished = HashMap::new();
    let mut journal = JournalState { next_seq: 1, created_total: 0 };
    if let Some(bytes) = store.db.get(journal::CREATED_TOTAL_KEY)? {
        let raw: [u8; 16] =
            bytes.as_ref().try_into().map_err(|_| LoadError::BadKey(journal::CREATED_TOTAL_KEY.to_vec()))?;
        journal.created_total = i128::from_be_bytes(raw);
    }
    // Entries are keyed by account, so the highest sequence number is found by looking at all of them.
    for entry in store.db.scan_prefix([journal::ENTRY]) {
        let (key, _) = entry?;
        let raw: [u8; 8] = key[key.len() - 8..].try_into().map_err(|_| LoadError::BadKey(key.to_vec()))?;
        journal.next_seq = journal.next_seq.max(u64::from_be_bytes(raw) + 1);
    }
    for entry in store.db.iter() {
        let (key, value) = entry?;
        let Some((&prefix, rest)) = key.split_first() else {
            continue;
        };
        match prefix {
            keys::ACCOUNT => {
                let id = std::str::from_utf8(rest)
                    .ok()
                    .and_then(|s| AccountId::new(s).ok())
                    .ok_or_else(|| LoadError::BadKey(key.to_vec()))?;
                accounts.insert(id, records::decode(&value)?);
            }
            keys::PREPARED => {
                prepared.insert(transfer_id(&key, rest)?, records::decode(&value)?);
            }
            keys::FINISHED => {
                let record: FinishedRecord = records::decode(&value)?;
                finished.insert(transfer_id(&key, rest)?, record.decision);
            }
            _ => {} // metadata such as the shard number
        }
    }
    Ok((ParticipantMachine::restore(shard, accounts, prepared, finished)?, journal))
}

/// An account's journal, newest first: up to `limit` entries with a sequence number below `before`.
pub fn journal_page(
    store: &Store,
    account: &AccountId,
    before: Option<u64>,
    limit: usize,
) -> Result<Vec<JournalEntry>, LoadError> {
    let start = journal::account_prefix(account);
    let end = journal::entry_key(account, before.unwrap_or(u64::MAX));
    let mut out = Vec::new();
    for entry in store.db.range(start..end).rev().take(limit) {
        let (_, value) = entry?;
        out.push(records::decode(&value)?);
    }
    Ok(out)
}

/// The journal sequence number at which transfer `id` was committed here, if it was.
pub fn commit_seq(store: &Store, id: &TransferId) -> Result<Option<u64>, LoadError> {
    let key = journal::prefixed(journal::COMMIT_SEQ, id.as_bytes());
    match store.db.get(&key)? {
        None => Ok(None),
        Some(v) => Ok(Some(u64::from_be_bytes(v.as_ref().try_into().map_err(|_| LoadError::BadKey(key))?))),
    }
}

/// Transfers committed here with a sequence number in `(after, upto]`, in apply order.
pub fn commits_between(store: &Store, after: u64, upto: u64) -> Result<Vec<TransferId>, LoadError> {
    if after >= upto {
        return Ok(Vec::new());
    }
    let start = journal::prefixed(journal::COMMIT_ORDER, &(after + 1).to_be_bytes());
    let end = journal::prefixed(journal::COMMIT_ORDER, &upto.to_be_bytes());
    let mut out = Vec::new();
    for entry in store.db.range(start..=end) {
        let (key, value) = entry?;
        out.push(Uuid::from_slice(&value).map_err(|_| LoadError::BadKey(key.to_vec()))?);
    }
    Ok(out)
}

/// The API token name recorded at Prepare for transfer `id`.
pub fn actor(store: &Store, id: &TransferId) -> Result<Option<String>, LoadError> {
    let key = journal::prefixed(journal::ACTOR, id.as_bytes());
    Ok(store.db.get(key)?.map(|v| String::from_utf8_lossy(&v).into_owned()))
}

/// Every outcome an operator forced on this shard.
pub fn heuristics(store: &Store) -> Result<Vec<(TransferId, HeuristicRecord)>, LoadError> {
    let mut out = Vec::new();
    for entry in store.db.scan_prefix([journal::HEURISTIC]) {
        let (key, value) = entry?;
        out.push((transfer_id(&key, &key[1..])?, records::decode(&value)?));
    }
    Ok(out)
}

fn transfer_id(key: &[u8], rest: &[u8]) -> Result<TransferId, LoadError> {
    Uuid::from_slice(rest).map_err(|_| LoadError::BadKey(key.to_vec()))
}
