//! The participant's side of the store: turns the machine's writes into one atomic sled batch, and rebuilds the
//! machine from disk at start. The only participant module that touches sled.

use common::ledger::{AccountId, ShardId, TransferId};
use common::protocol::participant::{ParticipantMachine, RestoreError, Write};
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

/// Applies `writes` as one atomic batch (in sled's memory; `Store::sync` makes it durable).
pub fn apply(store: &Store, writes: &[Write]) -> Result<(), sled::Error> {
    if writes.is_empty() {
        return Ok(());
    }
    let mut batch = sled::Batch::default();
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
pub async fn load(store: &Store, shard: ShardId) -> Result<ParticipantMachine, LoadError> {
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
    Ok(ParticipantMachine::restore(shard, accounts, prepared, finished)?)
}

fn transfer_id(key: &[u8], rest: &[u8]) -> Result<TransferId, LoadError> {
    Uuid::from_slice(rest).map_err(|_| LoadError::BadKey(key.to_vec()))
}
