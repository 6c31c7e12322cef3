//! The coordinator's write-ahead log of decisions: one record per decided transfer, kept forever (it answers
//! idempotent retries and participants' questions) and holding who submitted it, plus a key in the
//! ledger-wide index by decision time. Which commits some shard has not acknowledged yet is one mark, not a
//! key per commit: every commit decided before the mark is acknowledged everywhere, so recovery re-sends the
//! commits the time index lists from the mark on (some already acknowledged: a shard acks a repeated Commit
//! without applying it twice). The only module that touches sled.

use common::ledger::TransferId;
use common::records::{self, Outcome, TransferRecord};
use common::store::{Durability, Store, StoreError, StoreKind};
use migrations::ACKED_BEFORE_KEY;
use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use uuid::Uuid;

const RECORD: u8 = b't';
const PARTICIPANT_COUNT_KEY: &[u8] = b"mparticipant_count";
const CLUSTER_ID_KEY: &[u8] = b"mcluster_id";
/// Prefix of the ledger-wide index by decision time: decision time, transfer id.
const BY_TIME: u8 = b'r';
/// The mark's value when no commit is owed acks.
const NOTHING_OWED: u64 = u64::MAX;

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

/// Writes gathered for one [`Wal::apply`], in the order they go to the log.
pub struct WalBatch {
    /// Key and value of each insert: the log only ever inserts.
    inserts: Vec<(Vec<u8>, Vec<u8>)>,
    /// Commits decided in this batch: owed acks from now on.
    owed: Vec<(u64, TransferId)>,
    /// Commits every shard has acknowledged.
    ended: Vec<TransferId>,
}

impl WalBatch {
    /// A decision. A commit is owed acks until `end`; aborts need nothing (a participant left in doubt asks,
    /// and hears abort).
    pub fn put(&mut self, id: &TransferId, record: &TransferRecord, made_by: Option<&str>) {
        // The index key first: a log cut short after it leaves a key whose record is missing, which readers
        // skip; never a record the index and recovery cannot find.
        self.inserts.push((time_key(vec![BY_TIME], record.decided_at_unix_ms, id), Vec::new()));
        self.inserts.push((key(RECORD, id).to_vec(), records::encode(&DecidedRef { record, made_by })));
        if record.outcome == Outcome::Committed {
            self.owed.push((record.decided_at_unix_ms, *id));
        }
    }

    /// Every shard has applied the commit: recovery need not re-send it.
    pub fn end(&mut self, id: &TransferId) {
        self.ended.push(*id);
    }
}

/// The commits owed acks, by decision time, and the mark last written for them.
#[derive(Debug, Default)]
struct Owed {
    by_time: BTreeSet<(u64, TransferId)>,
    time_of: HashMap<TransferId, u64>,
    /// The mark in the store (or in a batch applied to it); `None` before the first.
    mark: Option<u64>,
}

impl Owed {
    fn insert(&mut self, decided_at_unix_ms: u64, id: TransferId) {
        if let Some(previous) = self.time_of.insert(id, decided_at_unix_ms) {
            self.by_time.remove(&(previous, id));
        }
        self.by_time.insert((decided_at_unix_ms, id));
    }

    fn remove(&mut self, id: &TransferId) {
        if let Some(at) = self.time_of.remove(id) {
            self.by_time.remove(&(at, *id));
        }
    }

    /// The mark these owed commits need: at or before the earliest of them.
    fn needed_mark(&self) -> u64 {
        self.by_time.first().map_or(NOTHING_OWED, |(at, _)| *at)
    }
}

#[derive(Clone)]
pub struct Wal {
    store: Store,
    /// Fixed at first start; every internal call carries it, and participants refuse other clusters.
    cluster_id: Uuid,
    /// Only the engine's task writes the log, so this lock is never contended. Bounded by the commits owed acks,
    /// which the core bounds.
    owed: Arc<Mutex<Owed>>,
}


/// The order a batch's inserts go to the log in, with the mark moving from `old_mark` to `new_mark`: before the
/// decisions when it moves back (or is the first), after them when it moves on, not at all when it stays.
fn log_order(inserts: Vec<(Vec<u8>, Vec<u8>)>, old_mark: Option<u64>, new_mark: u64) -> Vec<(Vec<u8>, Vec<u8>)> {
    if old_mark == Some(new_mark) {
        return inserts;
    }
    let mark = (ACKED_BEFORE_KEY.to_vec(), new_mark.to_be_bytes().to_vec());
    // No mark yet claims nothing, like a lower one: it goes first too.
    if old_mark.is_none_or(|old| new_mark < old) {
        std::iter::once(mark).chain(inserts).collect()
    } else {
        inserts.into_iter().chain(std::iter::once(mark)).collect()
    }
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
        let wal = Wal { store, cluster_id, owed: Arc::default() };
        let mark = wal.stored_mark()?;
        let unacked = wal.unacked()?;
        let mut owed = wal.owed();
        owed.mark = mark;
        for (id, record) in unacked {
            owed.insert(record.decided_at_unix_ms, id);
        }
        drop(owed);
        Ok(wal)
    }

    fn owed(&self) -> MutexGuard<'_, Owed> {
        // Poisoned only by a panic mid-update, and the engine aborts on any failure before that could matter.
        self.owed.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn stored_mark(&self) -> Result<Option<u64>, WalError> {
        match self.store.db.get(ACKED_BEFORE_KEY)? {
            None => Ok(None),
            Some(bytes) => {
                let raw: [u8; 8] = bytes.as_ref().try_into().map_err(|_| WalError::BadKey(ACKED_BEFORE_KEY.to_vec()))?;
                Ok(Some(u64::from_be_bytes(raw)))
            }
        }
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

    /// A set of log writes to apply together ([`Wal::apply`]).
    pub fn batch(&self) -> WalBatch {
        WalBatch { inserts: Vec::new(), owed: Vec::new(), ended: Vec::new() }
    }

    /// Applies `batch` (not yet durable: call `sync`) as plain inserts in order, not as a sled batch: a batch
    /// costs sled two more log-buffer writes, each waited for on disk, on the client's path. sled's recovery
    /// keeps a prefix of its log (it stops at the first torn entry), so a crash may lose the tail of these
    /// inserts but never keep one without those before it. The order makes every prefix safe: each index key
    /// before its record, and the mark before the decisions when it moves back (a lower mark claims less) and
    /// after them when it moves on, so no durable commit owed acks is ever behind the durable mark.
    pub fn apply(&self, batch: WalBatch) -> Result<(), WalError> {
        let WalBatch { inserts, owed: decided, ended } = batch;
        let mut owed = self.owed();
        for (at, id) in decided {
            owed.insert(at, id);
        }
        for id in &ended {
            owed.remove(id);
        }
        let mark = owed.needed_mark();
        for (key, value) in log_order(inserts, owed.mark, mark) {
            self.store.db.insert(key, value)?;
        }
        owed.mark = Some(mark);
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

    /// Committed transfers some shard may not have acknowledged: every commit decided at or after the mark.
    /// What recovery re-sends; bounded by how far the oldest unacknowledged commit lags, not by history.
    pub fn unacked(&self) -> Result<Vec<(TransferId, TransferRecord)>, WalError> {
        let Some(mark) = self.stored_mark()? else {
            return Ok(Vec::new()); // no commit was ever logged
        };
        let mut out = Vec::new();
        if mark == NOTHING_OWED {
            return Ok(out);
        }
        let from = time_key(vec![BY_TIME], mark, &Uuid::nil());
        for entry in self.store.db.range(from..) {
            let (k, _) = entry?;
            if k.first() != Some(&BY_TIME) {
                break;
            }
            let id = Uuid::from_slice(&k[k.len() - 16..]).map_err(|_| WalError::BadKey(k.to_vec()))?;
            match self.get(&id)? {
                Some(record) if record.outcome == Outcome::Committed => out.push((id, record)),
                _ => {}
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
    use common::records::AbortReason;

    fn record(outcome: Outcome, decided_at_unix_ms: u64) -> TransferRecord {
        TransferRecord {
            transfer: Transfer {
                from: AccountId::new("alice").expect("valid"),
                to: AccountId::new("bob").expect("valid"),
                amount: Amount::new(5).expect("positive"),
            },
            outcome,
            shards: vec![0, 1],
            decided_at_unix_ms,
        }
    }

    fn ids(unacked: Vec<(TransferId, TransferRecord)>) -> Vec<TransferId> {
        let mut ids: Vec<TransferId> = unacked.into_iter().map(|(id, _)| id).collect();
        ids.sort();
        ids
    }

    fn sorted(mut ids: Vec<TransferId>) -> Vec<TransferId> {
        ids.sort();
        ids
    }

    fn decide(wal: &Wal, decisions: &[(TransferId, Outcome, u64)], ended: &[TransferId]) {
        let mut batch = wal.batch();
        for (id, outcome, at) in decisions {
            batch.put(id, &record(*outcome, *at), None);
        }
        for id in ended {
            batch.end(id);
        }
        wal.apply(batch).expect("applies");
    }

    #[tokio::test]
    async fn recovery_re_sends_every_commit_not_yet_acknowledged_and_no_older_one() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (early, late, aborted, later) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        {
            let wal = Wal::open(dir.path(), Durability::Fsync, 2).await.expect("opens");
            assert!(wal.unacked().expect("readable").is_empty(), "a fresh log owes nothing");
            decide(&wal, &[(early, Outcome::Committed, 100), (late, Outcome::Committed, 200)], &[]);
            decide(&wal, &[(aborted, Outcome::Aborted(AbortReason::InsufficientFunds), 300)], &[]);
            assert_eq!(ids(wal.unacked().expect("readable")), sorted(vec![early, late]), "aborts are never owed");
            // The early one is acknowledged: the mark moves to the late one.
            decide(&wal, &[], &[early]);
            assert_eq!(ids(wal.unacked().expect("readable")), vec![late]);
            // The clock went back: a commit decided "before" the mark holds the mark back with it.
            decide(&wal, &[(later, Outcome::Committed, 50)], &[]);
            assert_eq!(ids(wal.unacked().expect("readable")), sorted(vec![late, later, early]), "from 50 on");
            wal.sync().await.expect("syncs");
        }
        let wal = Wal::open(dir.path(), Durability::Fsync, 2).await.expect("reopens");
        let owed = ids(wal.unacked().expect("readable"));
        assert!(owed.contains(&late) && owed.contains(&later), "every commit still owed is re-sent: {owed:?}");
        // What recovery re-sends, the core ends once the shards ack it again.
        decide(&wal, &[], &owed);
        assert!(wal.unacked().expect("readable").is_empty(), "all acknowledged: nothing to re-send");
        assert_eq!(wal.get(&early).expect("readable").map(|r| r.outcome), Some(Outcome::Committed), "kept forever");
    }

    /// Every prefix of what `apply` writes, as a crash could leave it (sled keeps a prefix of its log), keeps
    /// the log's two promises: each decision record has its index key, and no commit owed acks is behind the
    /// mark. Cases: the first batch, a batch whose mark moves on (acks) while new commits come in, and one
    /// whose mark moves back (a commit decided after the wall clock went back).
    #[test]
    fn every_prefix_of_a_log_write_keeps_owed_commits_at_or_after_the_mark() {
        struct Case {
            /// The mark on disk before, and the commits owed acks then (decision times).
            old_mark: Option<u64>,
            owed_before: Vec<u64>,
            decided: Vec<u64>,
            ended_before: usize,
        }
        let cases = [
            Case { old_mark: None, owed_before: vec![], decided: vec![100, 101], ended_before: 0 },
            Case { old_mark: Some(50), owed_before: vec![50, 200], decided: vec![300], ended_before: 1 },
            Case { old_mark: Some(200), owed_before: vec![200], decided: vec![50], ended_before: 0 },
        ];
        for (n, case) in cases.iter().enumerate() {
            let wal_owed: Vec<(u64, TransferId)> = case.owed_before.iter().map(|at| (*at, Uuid::new_v4())).collect();
            let mut owed = Owed { mark: case.old_mark, ..Owed::default() };
            for (at, id) in &wal_owed {
                owed.insert(*at, *id);
            }
            let mut batch = WalBatch { inserts: Vec::new(), owed: Vec::new(), ended: Vec::new() };
            let decided: Vec<TransferId> = case.decided.iter().map(|_| Uuid::new_v4()).collect();
            for (id, at) in decided.iter().zip(&case.decided) {
                batch.put(id, &record(Outcome::Committed, *at), None);
            }
            for (_, id) in wal_owed.iter().take(case.ended_before) {
                batch.end(id);
            }
            for (at, id) in &batch.owed {
                owed.insert(*at, *id);
            }
            for id in &batch.ended {
                owed.remove(id);
            }
            let new_mark = owed.needed_mark();
            let written = log_order(batch.inserts, case.old_mark, new_mark);
            let still_owed_before: Vec<u64> = wal_owed.iter().skip(case.ended_before).map(|(at, _)| *at).collect();
            for cut in 0..=written.len() {
                let prefix = &written[..cut];
                let mark = prefix
                    .iter()
                    .rev()
                    .find(|(k, _)| k.as_slice() == ACKED_BEFORE_KEY)
                    .map(|(_, v)| u64::from_be_bytes(v.as_slice().try_into().expect("8 bytes")))
                    .or(case.old_mark);
                let durable_commits: Vec<u64> = prefix
                    .iter()
                    .filter(|(k, _)| k[0] == RECORD)
                    .map(|(k, _)| {
                        let id = Uuid::from_slice(&k[1..]).expect("id");
                        let at = case.decided[decided.iter().position(|d| *d == id).expect("decided here")];
                        let indexed = prefix.iter().any(|(k2, _)| k2.as_slice() == time_key(vec![BY_TIME], at, &id));
                        assert!(indexed, "case {n}, cut {cut}: a record without its index key");
                        at
                    })
                    .collect();
                for at in durable_commits.iter().chain(&still_owed_before) {
                    let mark = mark.unwrap_or_else(|| panic!("case {n}, cut {cut}: a commit owed acks and no mark"));
                    assert!(*at >= mark, "case {n}, cut {cut}: commit at {at} behind the mark {mark}");
                }
            }
        }
    }

    #[tokio::test]
    async fn a_layout_2_log_trades_its_owed_markers_for_the_mark() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (owed_early, owed_late, acked) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        {
            let db = sled::open(dir.path().join("store")).expect("sled opens");
            migrations::migrate(&db, StoreKind::Coordinator).expect("fresh store");
            migrations::stamp_version(&db, 2).expect("stamp");
            for (id, at, marked) in [(acked, 10, false), (owed_early, 20, true), (owed_late, 30, true)] {
                let record = record(Outcome::Committed, at);
                db.insert(key(RECORD, &id), records::encode(&DecidedRef { record: &record, made_by: None }))
                    .expect("insert");
                db.insert(time_key(vec![BY_TIME], at, &id), &[][..]).expect("insert");
                if marked {
                    db.insert(key(b'u', &id), &[][..]).expect("insert");
                }
            }
            db.flush().expect("flush");
        }
        let wal = Wal::open(dir.path(), Durability::NoFsync, 2).await.expect("a layout-2 log opens");
        assert_eq!(ids(wal.unacked().expect("readable")), sorted(vec![owed_early, owed_late]));
        assert_eq!(wal.store().db.scan_prefix([b'u']).count(), 0, "the markers are gone");
        assert_eq!(wal.stored_mark().expect("readable"), Some(20), "the earliest owed decision");
    }

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
