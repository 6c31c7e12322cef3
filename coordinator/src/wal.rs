//! The coordinator's write-ahead log of decisions: one record per decided transfer, kept forever (it answers
//! idempotent retries and participants' questions) and holding who submitted it, a key in the ledger-wide index
//! by decision time, plus a marker per committed transfer that some shard has not yet acknowledged, so recovery
//! finds them without scanning every record. The only module that touches sled.

use common::ledger::TransferId;
use common::records::{self, Outcome, TransferRecord};
use common::store::{Durability, Store, StoreError, StoreKind};
use std::path::Path;
use uuid::Uuid;

const RECORD: u8 = b't';
const UNACKED: u8 = b'u';
const PARTICIPANT_COUNT_KEY: &[u8] = b"mparticipant_count";
const CLUSTER_ID_KEY: &[u8] = b"mcluster_id";
/// Prefix of the ledger-wide index by decision time: decision time, transfer id.
const BY_TIME: u8 = b'r';

#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("this data directory was set up for {stored} participants, not {requested}: accounts would move to other shards")]
    ParticipantCount { stored: u32, requested: u32 },
    #[error("corrupt log entry {0:?}")]
    BadKey(Vec<u8>),
}

impl From<sled::Error> for WalError {
    fn from(e: sled::Error) -> Self {
        WalError::Store(StoreError::Sled(e))
    }
}

impl From<records::RecordError> for WalError {
    fn from(e: records::RecordError) -> Self {
        WalError::Store(StoreError::Record(e))
    }
}

/// What the `t` key holds: the decision and the name of the API token that submitted the transfer.
#[derive(serde::Deserialize)]
struct Decided {
    record: TransferRecord,
    made_by: Option<String>,
}

#[derive(serde::Serialize)]
struct DecidedRef<'a> {
    record: &'a TransferRecord,
    made_by: Option<&'a str>,
}

/// Writes gathered for one [`Wal::apply`].
pub struct WalBatch(sled::Batch);

impl WalBatch {
    /// A decision. A commit also gets a marker, removed by `end` once every shard has acknowledged it; aborts
    /// need none (a participant left in doubt asks, and hears abort).
    pub fn put(&mut self, id: &TransferId, record: &TransferRecord, made_by: Option<&str>) {
        let batch = &mut self.0;
        batch.insert(&key(RECORD, id)[..], records::encode(&DecidedRef { record, made_by }));
        batch.insert(time_key(vec![BY_TIME], record.decided_at_unix_ms, id), &[][..]);
        if record.outcome == Outcome::Committed {
            batch.insert(&key(UNACKED, id)[..], &[][..]);
        }
    }

    /// Every shard has applied the commit: recovery need not re-send it.
    pub fn end(&mut self, id: &TransferId) {
        self.0.remove(&key(UNACKED, id)[..]);
    }
}

#[derive(Clone)]
pub struct Wal {
    store: Store,
    /// Fixed at first start; every internal call carries it, and participants refuse other clusters.
    cluster_id: Uuid,
}


/// A key of an index by decision time: the index's prefix, the decision time, the transfer id.
fn time_key(mut prefix: Vec<u8>, decided_at_unix_ms: u64, id: &TransferId) -> Vec<u8> {
    prefix.extend_from_slice(&decided_at_unix_ms.to_be_bytes());
    prefix.extend_from_slice(id.as_bytes());
    prefix
}

fn key(prefix: u8, id: &TransferId) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = prefix;
    k[1..].copy_from_slice(id.as_bytes());
    k
}

impl Wal {
    /// Opens the log, fixing the participant count at first start and refusing a different one later.
    pub async fn open(dir: &Path, durability: Durability, participant_count: u32) -> Result<Wal, WalError> {
        let dir = dir.to_owned();
        let store =
            tokio::task::spawn_blocking(move || Store::open(&dir, StoreKind::Coordinator, durability)).await.map_err(
                |e| StoreError::LogFile { path: Default::default(), source: std::io::Error::other(e.to_string()) },
            )??;
        match store.db.get(PARTICIPANT_COUNT_KEY)? {
            Some(bytes) => {
                let raw: [u8; 4] =
                    bytes.as_ref().try_into().map_err(|_| WalError::BadKey(PARTICIPANT_COUNT_KEY.to_vec()))?;
                let stored = u32::from_be_bytes(raw);
                if stored != participant_count {
                    return Err(WalError::ParticipantCount { stored, requested: participant_count });
                }
            }
            None => {
                store.db.insert(PARTICIPANT_COUNT_KEY, &participant_count.to_be_bytes())?;
                store.sync().await?;
            }
        }
        let cluster_id = match store.db.get(CLUSTER_ID_KEY)? {
            Some(bytes) => Uuid::from_slice(&bytes).map_err(|_| WalError::BadKey(CLUSTER_ID_KEY.to_vec()))?,
            None => {
                let id = Uuid::new_v4();
                store.db.insert(CLUSTER_ID_KEY, id.as_bytes())?;
                store.sync().await?;
                id
            }
        };
        Ok(Wal { store, cluster_id })
    }

    pub fn cluster_id(&self) -> Uuid {
        self.cluster_id
    }

    /// The name of the API token that submitted `id`, if it was decided and a token was used.
    pub fn made_by(&self, id: &TransferId) -> Result<Option<String>, WalError> {
        Ok(self.decided(id)?.and_then(|d| d.made_by))
    }

    pub fn get(&self, id: &TransferId) -> Result<Option<TransferRecord>, WalError> {
        Ok(self.decided(id)?.map(|d| d.record))
    }

    fn decided(&self, id: &TransferId) -> Result<Option<Decided>, WalError> {
        match self.store.db.get(key(RECORD, id))? {
            Some(bytes) => Ok(Some(records::decode(&bytes)?)),
            None => Ok(None),
        }
    }

    /// A set of log writes to apply as one atomic store batch ([`Wal::apply`]).
    pub fn batch(&self) -> WalBatch {
        WalBatch(sled::Batch::default())
    }

    /// Applies `batch` (not yet durable: call `sync`). One store batch per burst of decisions, not one per
    /// decision: each sled batch costs a log write of its own.
    pub fn apply(&self, batch: WalBatch) -> Result<(), WalError> {
        self.store.db.apply_batch(batch.0)?;
        Ok(())
    }

    /// The newest `limit` decided transfers of the whole ledger, newest first.
    pub fn recent(&self, limit: usize) -> Result<Vec<(TransferId, TransferRecord)>, WalError> {
        self.newest(&[BY_TIME], limit)
    }

    /// Walks an index whose keys end in decision time and transfer id, newest first.
    fn newest(&self, prefix: &[u8], limit: usize) -> Result<Vec<(TransferId, TransferRecord)>, WalError> {
        let mut out = Vec::new();
        for entry in self.store.db.scan_prefix(prefix).rev().take(limit) {
            let (k, _) = entry?;
            let id = Uuid::from_slice(&k[k.len() - 16..]).map_err(|_| WalError::BadKey(k.to_vec()))?;
            if let Some(record) = self.get(&id)? {
                out.push((id, record));
            }
        }
        Ok(out)
    }

    /// Makes every write before the call durable (group commit).
    pub async fn sync(&self) -> Result<(), WalError> {
        Ok(self.store.sync().await?)
    }

    /// Committed transfers some shard has not acknowledged: what recovery must re-send.
    pub fn unacked(&self) -> Result<Vec<(TransferId, TransferRecord)>, WalError> {
        let mut out = Vec::new();
        for entry in self.store.db.scan_prefix([UNACKED]) {
            let (k, _) = entry?;
            let id = Uuid::from_slice(&k[1..]).map_err(|_| WalError::BadKey(k.to_vec()))?;
            if let Some(record) = self.get(&id)? {
                out.push((id, record));
            }
        }
        Ok(out)
    }

    pub fn store(&self) -> &Store {
        &self.store
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::ledger::{AccountId, Amount, Transfer};

    #[tokio::test]
    async fn a_layout_1_log_migrates_the_token_name_into_the_decision() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (named, anonymous) = (Uuid::new_v4(), Uuid::new_v4());
        let record = TransferRecord {
            transfer: Transfer {
                from: AccountId::new("alice").expect("valid"),
                to: AccountId::new("bob").expect("valid"),
                amount: Amount::new(5).expect("positive"),
            },
            outcome: Outcome::Committed,
            shards: vec![0, 1],
            decided_at_unix_ms: 3,
        };
        {
            let db = sled::open(dir.path().join("store")).expect("sled opens");
            migrations::migrate(&db, StoreKind::Coordinator).expect("fresh store");
            migrations::stamp_version(&db, 1).expect("stamp");
            let mut v1 = vec![1];
            v1.extend(bincode::serialize(&record).expect("serialises"));
            db.insert(key(RECORD, &named), v1.clone()).expect("insert");
            db.insert(key(b'n', &named), &b"teller"[..]).expect("insert");
            db.insert(key(RECORD, &anonymous), v1).expect("insert");
            db.flush().expect("flush");
        }
        let wal = Wal::open(dir.path(), Durability::NoFsync, 2).await.expect("a layout-1 log opens");
        assert_eq!(wal.get(&named).expect("readable"), Some(record.clone()));
        assert_eq!(wal.made_by(&named).expect("readable").as_deref(), Some("teller"));
        assert_eq!(wal.get(&anonymous).expect("readable"), Some(record));
        assert_eq!(wal.made_by(&anonymous).expect("readable"), None);
        assert_eq!(wal.store().db.scan_prefix([b'n']).count(), 0, "the name keys are gone");
    }
}
