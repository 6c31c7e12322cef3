//! The coordinator's write-ahead log: one decision record per transfer, kept forever (it answers idempotent
//! retries and participants' questions) and holding who submitted it, plus a key in the ledger-wide index by
//! the time the transfer was first logged. A staged transfer (parallel commits: see
//! `protocol::coordinator_core`) is logged first as its index key, whose value is the staging record; its
//! decision follows under its own key. Each batch of writes is one group of the store's redo log
//! ([`common::redo`]): durable with an append and an fdatasync, in sled at the next checkpoint. Which
//! transfers recovery must look at is one mark, not a key per transfer: every transfer indexed before the mark
//! is decided and, if committed, acknowledged everywhere. Recovery reads the time index from the mark on: the
//! commits there are re-sent (some already acknowledged: a shard acks a repeated Commit without applying it
//! twice), and the staged transfers with no decision are finished. The only coordinator module that touches
//! the store.

use common::ledger::{ShardId, Transfer, TransferId};
use common::records::{self, Outcome, TransferRecord};
use common::store::{KeyClasses, Store, StoreError, StoreKind, StoreOptions};
use migrations::ACKED_BEFORE_KEY;
use protocol::coordinator_core::{DecisionLog, GrantedHold, LogUnreadable, StagedTransfer};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use uuid::Uuid;

const RECORD: u8 = b't';
const PARTICIPANT_COUNT_KEY: &[u8] = b"mparticipant_count";
const CLUSTER_ID_KEY: &[u8] = b"mcluster_id";
/// Prefix of the ledger-wide index by the time a transfer's entry was first written: time, transfer id.
const BY_TIME: u8 = b'r';
/// Both kinds of key are written once per transfer and kept: history, in run files (see `common::runs`). A
/// hold's record is written again when it ends.
const CLASSES: KeyClasses = KeyClasses { transient: None, history: &[RECORD, BY_TIME] };
/// `h` hold id → nothing: a hold granted, or ended and not yet acknowledged by every shard. Removed at its
/// end record, so the keys are as many as the holds alive (at most `HOLDS_ACTIVE_MAX`), not history.
const HOLD: u8 = b'h';
/// The mark's value when no transfer is owed anything.
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

/// What the `t` key holds once decided: the decision and the name of the API token that submitted the transfer.
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

/// What a staged transfer's `r` index key holds (layout 4; a decided transfer's is empty): enough to prepare
/// it again.
#[derive(serde::Serialize, serde::Deserialize)]
struct Staged {
    transfer: Transfer,
    shards: Vec<ShardId>,
    made_by: Option<String>,
    staged_at_unix_ms: u64,
}

/// What recovery finds from the mark on.
enum Entry {
    Staged(Staged),
    Decided(Decided),
}

enum Op {
    Stage(TransferId, Staged),
    Decide(TransferId, TransferRecord, Option<String>),
    End(TransferId),
}

/// Writes gathered for one [`Wal::apply`], in the order they go to the log.
pub struct WalBatch {
    ops: Vec<Op>,
}

impl WalBatch {
    /// A staged transfer: owed a decision (and, if that is a commit, acks) from now on.
    pub fn stage(
        &mut self,
        id: &TransferId,
        transfer: Transfer,
        shards: Vec<ShardId>,
        made_by: Option<String>,
        at: u64,
    ) {
        self.ops.push(Op::Stage(*id, Staged { transfer, shards, made_by, staged_at_unix_ms: at }));
    }

    /// A decision. It overwrites the staging record, if there is one. A commit is owed acks until `end`; an
    /// abort needs nothing more (a participant left in doubt asks, and hears abort).
    pub fn put(&mut self, id: &TransferId, record: TransferRecord, made_by: Option<String>) {
        self.ops.push(Op::Decide(*id, record, made_by));
    }

    /// Every shard has applied the commit: recovery need not re-send it.
    pub fn end(&mut self, id: &TransferId) {
        self.ops.push(Op::End(*id));
    }
}

/// The transfers owed something (a decision, or acks of their commit), by index time, and the mark last
/// written for them.
#[derive(Debug, Default)]
struct Owed {
    by_time: BTreeSet<(u64, TransferId)>,
    time_of: HashMap<TransferId, u64>,
    /// The mark in the store (or in a batch applied to it); `None` before the first.
    mark: Option<u64>,
    /// The holds with an `h` key: owed an end, or the acks of their end. Not by time, so that a hold of a month
    /// does not hold the mark back for a month.
    holds: HashSet<TransferId>,
}

impl Owed {
    fn insert(&mut self, at: u64, id: TransferId) {
        if let Some(previous) = self.time_of.insert(id, at) {
            self.by_time.remove(&(previous, id));
        }
        self.by_time.insert((at, id));
    }

    fn remove(&mut self, id: &TransferId) {
        if let Some(at) = self.time_of.remove(id) {
            self.by_time.remove(&(at, *id));
        }
    }

    /// The mark these owed transfers need: at or before the earliest of them.
    fn needed_mark(&self) -> u64 {
        self.by_time.first().map_or(NOTHING_OWED, |(at, _)| *at)
    }

    /// The inserts (and removals) that carry out `ops`, in a crash-safe order (see [`Wal::apply`]), and the
    /// owed set updated.
    fn plan(&mut self, ops: Vec<Op>) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
        let mut inserts = Vec::with_capacity(ops.len() * 2);
        for op in ops {
            match op {
                Op::Stage(id, staged) => {
                    let at = staged.staged_at_unix_ms;
                    let value = records::encode(&staged);
                    inserts.push((time_key(vec![BY_TIME], at, &id), Some(value)));
                    self.insert(at, id);
                }
                Op::Decide(id, record, made_by) => {
                    let staged_at = self.time_of.get(&id).copied();
                    // A hold's end keeps the index key its grant wrote.
                    if staged_at.is_none() && !record.outcome.ends_hold() {
                        // Not staged (a presumed abort): its own index key, first, so that a log cut short
                        // after it leaves a key whose record is missing, which readers skip; never a record the
                        // index and recovery cannot find.
                        inserts.push((time_key(vec![BY_TIME], record.decided_at_unix_ms, &id), Some(Vec::new())));
                    }
                    if let Outcome::Held { .. } = record.outcome {
                        // Before the record, as the index key is.
                        inserts.push((key(HOLD, &id).to_vec(), Some(Vec::new())));
                        self.holds.insert(id);
                    }
                    let value = records::encode(&DecidedRef { record: &record, made_by: made_by.as_deref() });
                    inserts.push((key(RECORD, &id).to_vec(), Some(value)));
                    match record.outcome {
                        Outcome::Committed if staged_at.is_none() => self.insert(record.decided_at_unix_ms, id),
                        Outcome::Committed => {}
                        // Owed through its `h` key until every shard has acknowledged its end.
                        outcome if outcome.ends_hold() => {}
                        _ => self.remove(&id),
                    }
                }
                Op::End(id) => {
                    self.remove(&id);
                    if self.holds.remove(&id) {
                        inserts.push((key(HOLD, &id).to_vec(), None));
                    }
                }
            }
        }
        let mark = self.needed_mark();
        let ordered = log_order(inserts, self.mark, mark);
        self.mark = Some(mark);
        ordered
    }
}

#[derive(Clone)]
pub struct Wal {
    store: Store,
    /// Fixed at first start; every internal call carries it, and participants refuse other clusters.
    cluster_id: Uuid,
    /// Only the engine's task writes the log, so this lock is never contended. Bounded by the transfers running
    /// and the commits owed acks, which the core bounds.
    owed: Arc<Mutex<Owed>>,
}

/// What recovery hands the core: commits and hold ends some shard may not have acknowledged, staged transfers
/// with no decision, and the holds granted and not ended.
pub struct Recovery {
    pub unacked: Vec<(TransferId, TransferRecord)>,
    pub staged: Vec<StagedTransfer>,
    pub holds: Vec<GrantedHold>,
}

/// The order a batch's inserts go to the log in, with the mark moving from `old_mark` to `new_mark`: before the
/// entries when it moves back (or is the first), after them when it moves on, not at all when it stays.
fn log_order(
    inserts: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    old_mark: Option<u64>,
    new_mark: u64,
) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
    if old_mark == Some(new_mark) {
        return inserts;
    }
    let mark = (ACKED_BEFORE_KEY.to_vec(), Some(new_mark.to_be_bytes().to_vec()));
    // No mark yet claims nothing, like a lower one: it goes first too.
    if old_mark.is_none_or(|old| new_mark < old) {
        std::iter::once(mark).chain(inserts).collect()
    } else {
        inserts.into_iter().chain(std::iter::once(mark)).collect()
    }
}

/// A key of the index by time: the index's prefix, the time, the transfer id.
fn time_key(mut prefix: Vec<u8>, at_unix_ms: u64, id: &TransferId) -> Vec<u8> {
    prefix.extend_from_slice(&at_unix_ms.to_be_bytes());
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
    pub async fn open(dir: &Path, options: impl Into<StoreOptions>, participant_count: u32) -> Result<Wal, WalError> {
        let (dir, options) = (dir.to_owned(), options.into());
        let store = tokio::task::spawn_blocking(move || Store::open(&dir, StoreKind::Coordinator, options, CLASSES))
            .await
            .map_err(|e| StoreError::LogFile {
                path: Default::default(),
                source: std::io::Error::other(e.to_string()),
            })??;
        match store.get(PARTICIPANT_COUNT_KEY)? {
            Some(bytes) => {
                let raw: [u8; 4] =
                    bytes.as_slice().try_into().map_err(|_| WalError::BadKey(PARTICIPANT_COUNT_KEY.to_vec()))?;
                let stored = u32::from_be_bytes(raw);
                if stored != participant_count {
                    return Err(WalError::ParticipantCount { stored, requested: participant_count });
                }
            }
            None => {
                store.log(vec![(PARTICIPANT_COUNT_KEY.to_vec(), Some(participant_count.to_be_bytes().to_vec()))])?;
                store.sync().await?;
            }
        }
        let cluster_id = match store.get(CLUSTER_ID_KEY)? {
            Some(bytes) => Uuid::from_slice(&bytes).map_err(|_| WalError::BadKey(CLUSTER_ID_KEY.to_vec()))?,
            None => {
                let id = Uuid::new_v4();
                store.log(vec![(CLUSTER_ID_KEY.to_vec(), Some(id.as_bytes().to_vec()))])?;
                store.sync().await?;
                id
            }
        };
        let wal = Wal { store, cluster_id, owed: Arc::default() };
        let mark = wal.stored_mark()?;
        let mut owed = wal.owed();
        owed.mark = mark;
        wal.scan_owed(|at, id, _| owed.insert(at, id))?;
        owed.holds = wal.hold_ids()?.into_iter().collect();
        drop(owed);
        Ok(wal)
    }

    /// Transfers the log tracks as owed something (a decision, or acks of their commit).
    pub fn owed_count(&self) -> usize {
        self.owed().time_of.len()
    }

    fn owed(&self) -> MutexGuard<'_, Owed> {
        // Poisoned only by a panic mid-update, and the engine aborts on any failure before that could matter.
        self.owed.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn stored_mark(&self) -> Result<Option<u64>, WalError> {
        match self.store.get(ACKED_BEFORE_KEY)? {
            None => Ok(None),
            Some(bytes) => {
                let raw: [u8; 8] =
                    bytes.as_slice().try_into().map_err(|_| WalError::BadKey(ACKED_BEFORE_KEY.to_vec()))?;
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

    /// The decision of `id`, if it has one (a staged transfer has none yet).
    pub fn get(&self, id: &TransferId) -> Result<Option<TransferRecord>, WalError> {
        Ok(self.decided(id)?.map(|d| d.record))
    }

    fn decided(&self, id: &TransferId) -> Result<Option<Decided>, WalError> {
        match self.store.get(&key(RECORD, id))? {
            Some(bytes) => Ok(Some(records::decode(&bytes)?)),
            None => Ok(None),
        }
    }

    /// A set of log writes to apply together ([`Wal::apply`]).
    pub fn batch(&self) -> WalBatch {
        WalBatch { ops: Vec::new() }
    }

    /// Applies `batch` (not yet durable: call `sync`) as one group of the store's redo log, which a crash keeps
    /// whole or not at all. The writes are still ordered so that every prefix of them is safe, as sled's own
    /// log once had to be (a store of layout 5 or older, and `tests::every_prefix...`): each index key before
    /// its record, and the mark before the decisions when it moves back (a lower mark claims less) and after
    /// them when it moves on, so no durable commit owed acks is ever behind the durable mark.
    pub fn apply(&self, batch: WalBatch) -> Result<(), WalError> {
        let mut owed = self.owed();
        Ok(self.store.log(owed.plan(batch.ops))?)
    }

    /// The newest `limit` decided transfers of the whole ledger (by the time each was first logged), newest
    /// first. Those still running are skipped: only a bounded number can be.
    pub fn recent(&self, limit: usize) -> Result<Vec<(TransferId, TransferRecord)>, WalError> {
        let mut out = Vec::new();
        let mut end = vec![BY_TIME + 1];
        while out.len() < limit {
            // Pages of the index, newest first: running transfers are skipped, so a page may yield fewer.
            let page = self.store.range(vec![BY_TIME]..end.clone(), true, limit - out.len())?;
            let Some((last, _)) = page.last() else { break };
            end = last.clone();
            for (k, _) in &page {
                let id = Uuid::from_slice(k.get(9..).unwrap_or_default()).map_err(|_| WalError::BadKey(k.to_vec()))?;
                if let Some(record) = self.get(&id)? {
                    out.push((id, record));
                }
            }
        }
        Ok(out)
    }

    /// Makes every write before the call durable (group commit).
    pub async fn sync(&self) -> Result<(), WalError> {
        Ok(self.store.sync().await?)
    }

    /// What recovery must finish: every commit indexed at or after the mark (some shard may not have
    /// acknowledged it) and every staged transfer with no decision. Bounded by how far the oldest of them
    /// lags, not by history.
    pub fn recovery(&self) -> Result<Recovery, WalError> {
        let mut recovery = Recovery { unacked: Vec::new(), staged: Vec::new(), holds: Vec::new() };
        self.scan_owed(|_, id, entry| match entry {
            Entry::Decided(d) => recovery.unacked.push((id, d.record)),
            Entry::Staged(s) => recovery.staged.push(StagedTransfer { id, transfer: s.transfer, made_by: s.made_by }),
        })?;
        for id in self.hold_ids()? {
            // An `h` key whose record a crash lost was never granted: nobody heard of it.
            let Some(Decided { record, made_by }) = self.decided(&id)? else { continue };
            match record.outcome {
                Outcome::Held { expires_at_unix_ms } => {
                    let transfer = record.transfer;
                    recovery.holds.push(GrantedHold { id, transfer, made_by, expires_at_unix_ms });
                }
                outcome if outcome.ends_hold() => recovery.unacked.push((id, record)),
                _ => {}
            }
        }
        Ok(recovery)
    }

    /// The holds with an `h` key: granted, or ended and not yet acknowledged everywhere.
    fn hold_ids(&self) -> Result<Vec<TransferId>, WalError> {
        let keys = self.store.range(vec![HOLD]..vec![HOLD + 1], false, usize::MAX)?;
        keys.into_iter()
            .map(|(k, _)| Uuid::from_slice(k.get(1..).unwrap_or_default()).map_err(|_| WalError::BadKey(k.to_vec())))
            .collect()
    }

    /// Calls `found` with the index time, id and entry of every staged transfer and every commit indexed at or
    /// after the mark.
    fn scan_owed(&self, mut found: impl FnMut(u64, TransferId, Entry)) -> Result<(), WalError> {
        let Some(mark) = self.stored_mark()? else {
            return Ok(()); // nothing was ever logged
        };
        if mark == NOTHING_OWED {
            return Ok(());
        }
        let from = time_key(vec![BY_TIME], mark, &Uuid::nil());
        for (k, v) in self.store.range(from..vec![BY_TIME + 1], false, usize::MAX)? {
            let bad = || WalError::BadKey(k.to_vec());
            let at = u64::from_be_bytes(k.get(1..9).and_then(|b| b.try_into().ok()).ok_or_else(bad)?);
            let id = Uuid::from_slice(k.get(9..).ok_or_else(bad)?).map_err(|_| bad())?;
            match self.decided(&id)? {
                Some(d) if d.record.outcome == Outcome::Committed => found(at, id, Entry::Decided(d)),
                Some(_) => {}
                None if v.is_empty() => {} // a crash kept the index key and lost its record
                None => {
                    found(at, id, Entry::Staged(records::decode_or_fixint(records::FIXINT_STAGED_RECORD_VERSION, &v)?))
                }
            }
        }
        Ok(())
    }

    pub fn store(&self) -> &Store {
        &self.store
    }
}

/// The log as the core reads it. A read that fails is logged here, once, and fails the request that needed it.
impl DecisionLog for Wal {
    fn decision(&self, id: &TransferId) -> Result<Option<TransferRecord>, LogUnreadable> {
        self.get(id).map_err(|error| {
            tracing::error!(transfer_id = %id, %error, "decision log read failed");
            LogUnreadable
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::ledger::{AccountId, Amount, Transfer};
    use common::records::AbortReason;
    use common::store::Durability;

    fn record(outcome: Outcome, decided_at_unix_ms: u64) -> TransferRecord {
        TransferRecord {
            transfer: Transfer::one(
                AccountId::new("alice").expect("valid"),
                AccountId::new("bob").expect("valid"),
                Amount::new(5).expect("positive"),
            ),
            outcome,
            shards: vec![0, 1],
            decided_at_unix_ms,
        }
    }

    fn ids(unacked: Vec<(TransferId, TransferRecord)>) -> Vec<TransferId> {
        sorted(unacked.into_iter().map(|(id, _)| id).collect())
    }

    fn sorted(mut ids: Vec<TransferId>) -> Vec<TransferId> {
        ids.sort();
        ids
    }

    fn staged_ids(wal: &Wal) -> Vec<TransferId> {
        sorted(wal.recovery().expect("readable").staged.into_iter().map(|s| s.id).collect())
    }

    fn unacked(wal: &Wal) -> Vec<TransferId> {
        ids(wal.recovery().expect("readable").unacked)
    }

    /// Stages each transfer at its time, then decides it (an outcome) or leaves it staged (`None`).
    fn run(wal: &Wal, transfers: &[(TransferId, u64, Option<Outcome>)], ended: &[TransferId]) {
        let mut batch = wal.batch();
        for (id, at, _) in transfers {
            let r = record(Outcome::Committed, *at);
            batch.stage(id, r.transfer, r.shards, Some("teller".into()), *at);
        }
        for (id, at, outcome) in transfers {
            if let Some(outcome) = outcome {
                batch.put(id, record(*outcome, *at + 1), None);
            }
        }
        for id in ended {
            batch.end(id);
        }
        wal.apply(batch).expect("applies");
    }

    #[tokio::test]
    async fn recovery_finds_every_staged_transfer_and_every_commit_not_yet_acknowledged() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (early, late, aborted, later, staged) =
            (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let refused = Some(Outcome::Aborted(AbortReason::InsufficientFunds));
        {
            let wal = Wal::open(dir.path(), Durability::Fsync, 2).await.expect("opens");
            assert!(unacked(&wal).is_empty() && staged_ids(&wal).is_empty(), "a fresh log owes nothing");
            run(&wal, &[(early, 100, Some(Outcome::Committed)), (late, 200, Some(Outcome::Committed))], &[]);
            run(&wal, &[(aborted, 300, refused)], &[]);
            assert_eq!(unacked(&wal), sorted(vec![early, late]), "aborts are never owed");
            // The early one is acknowledged: the mark moves to the late one.
            run(&wal, &[], &[early]);
            assert_eq!(unacked(&wal), vec![late]);
            run(&wal, &[(staged, 400, None)], &[]);
            assert_eq!(staged_ids(&wal), vec![staged], "staged with no decision");
            assert_eq!(wal.get(&staged).expect("readable"), None, "a staged transfer has no decision yet");
            // The clock went back: a transfer staged "before" the mark holds the mark back with it.
            run(&wal, &[(later, 50, Some(Outcome::Committed))], &[]);
            assert_eq!(unacked(&wal), sorted(vec![late, later, early]), "from 50 on");
            wal.sync().await.expect("syncs");
        }
        let wal = Wal::open(dir.path(), Durability::Fsync, 2).await.expect("reopens");
        let owed = unacked(&wal);
        assert!(owed.contains(&late) && owed.contains(&later), "every commit still owed is re-sent: {owed:?}");
        let recovered = wal.recovery().expect("readable").staged;
        assert_eq!(recovered.len(), 1);
        assert_eq!((recovered[0].id, recovered[0].made_by.as_deref()), (staged, Some("teller")));
        // What recovery re-sends, the core ends once the shards ack it again; the staged one it decides.
        let mut batch = wal.batch();
        batch.put(&staged, record(Outcome::Aborted(AbortReason::CoordinatorRestarted), 500), None);
        wal.apply(batch).expect("applies");
        run(&wal, &[], &owed);
        assert!(unacked(&wal).is_empty() && staged_ids(&wal).is_empty(), "nothing left to finish");
        assert_eq!(wal.stored_mark().expect("readable"), Some(NOTHING_OWED));
        assert_eq!(wal.get(&early).expect("readable").map(|r| r.outcome), Some(Outcome::Committed), "kept forever");
        let listed: Vec<TransferId> = wal.recent(10).expect("readable").into_iter().map(|(id, _)| id).collect();
        assert_eq!(listed.len(), 5, "every decided transfer is listed once: {listed:?}");
    }

    /// Every prefix of what `apply` writes, as a crash could leave it (sled keeps a prefix of its log), keeps
    /// the log's two promises: each record has its index key, and no transfer recovery must finish (staged with
    /// no decision, or committed and owed acks) is behind the mark. Cases: the first batch, a batch whose mark
    /// moves on (acks, an abort) while new transfers come in, one whose mark moves back (the wall clock went
    /// back), and one that decides the only staged transfer.
    #[test]
    fn every_prefix_of_a_log_write_keeps_what_recovery_must_finish_at_or_after_the_mark() {
        struct Case {
            /// The mark on disk before, and the transfers owed then (index times).
            old_mark: Option<u64>,
            owed_before: Vec<u64>,
            /// New transfers staged (index time) and what the same batch decides for them.
            staged: Vec<(u64, Option<Outcome>)>,
            /// How many of `owed_before` are acknowledged, and how many of the rest aborted, in this batch.
            ended_before: usize,
            aborted_before: usize,
        }
        let abort = Some(Outcome::Aborted(AbortReason::ParticipantUnavailable));
        let cases = [
            Case {
                old_mark: None,
                owed_before: vec![],
                staged: vec![(100, Some(Outcome::Committed)), (101, None)],
                ended_before: 0,
                aborted_before: 0,
            },
            Case {
                old_mark: Some(50),
                owed_before: vec![50, 200],
                staged: vec![(300, abort)],
                ended_before: 1,
                aborted_before: 0,
            },
            Case {
                old_mark: Some(200),
                owed_before: vec![200],
                staged: vec![(50, None)],
                ended_before: 0,
                aborted_before: 0,
            },
            Case { old_mark: Some(100), owed_before: vec![100], staged: vec![], ended_before: 0, aborted_before: 1 },
        ];
        for (n, case) in cases.iter().enumerate() {
            let before: Vec<(u64, TransferId)> = case.owed_before.iter().map(|at| (*at, Uuid::new_v4())).collect();
            let mut owed = Owed { mark: case.old_mark, ..Owed::default() };
            for (at, id) in &before {
                owed.insert(*at, *id);
            }
            let new: Vec<(u64, TransferId, Option<Outcome>)> =
                case.staged.iter().map(|(at, outcome)| (*at, Uuid::new_v4(), *outcome)).collect();
            let mut batch = WalBatch { ops: Vec::new() };
            for (at, id, _) in &new {
                let r = record(Outcome::Committed, *at);
                batch.stage(id, r.transfer, r.shards, None, *at);
            }
            for (at, id, outcome) in &new {
                if let Some(outcome) = outcome {
                    batch.put(id, record(*outcome, *at + 1), None);
                }
            }
            let (acked, rest) = before.split_at(case.ended_before);
            let (aborted, still) = rest.split_at(case.aborted_before);
            for (_, id) in acked {
                batch.end(id);
            }
            for (at, id) in aborted {
                batch.put(id, record(Outcome::Aborted(AbortReason::CoordinatorRestarted), *at + 1), None);
            }
            // This case writes no hold, so nothing is removed.
            let written: Vec<(Vec<u8>, Vec<u8>)> =
                owed.plan(batch.ops).into_iter().map(|(k, v)| (k, v.expect("no removal"))).collect();
            let time_of = |id: &TransferId| {
                before
                    .iter()
                    .map(|(at, i)| (*at, *i))
                    .chain(new.iter().map(|(at, i, _)| (*at, *i)))
                    .find(|(_, i)| i == id)
            };
            for cut in 0..=written.len() {
                let prefix = &written[..cut];
                let mark = prefix
                    .iter()
                    .rev()
                    .find(|(k, _)| k.as_slice() == ACKED_BEFORE_KEY)
                    .map(|(_, v)| u64::from_be_bytes(v.as_slice().try_into().expect("8 bytes")))
                    .or(case.old_mark);
                // The last entry written for each transfer in this prefix.
                // (is it a decision, its value)
                let mut entries: HashMap<TransferId, (bool, &[u8])> = HashMap::new();
                for (pos, (k, v)) in prefix.iter().enumerate() {
                    if k[0] == BY_TIME && !v.is_empty() {
                        entries.entry(Uuid::from_slice(&k[9..]).expect("id")).or_insert((false, v));
                        // a staging record
                    }
                    if k[0] != RECORD {
                        continue;
                    }
                    let id = Uuid::from_slice(&k[1..]).expect("id");
                    let (at, _) = time_of(&id).expect("an id of this case");
                    let indexed = before.iter().any(|(_, i)| *i == id)
                        || prefix[..pos].iter().any(|(k2, _)| k2.as_slice() == time_key(vec![BY_TIME], at, &id));
                    assert!(indexed, "case {n}, cut {cut}: a record without its index key");
                    entries.insert(id, (true, v));
                }
                let finished = |id: &TransferId| {
                    entries.get(id).is_some_and(|(decided, v)| {
                        *decided && records::decode::<Decided>(v).expect("decodes").record.outcome != Outcome::Committed
                    })
                };
                let must_finish = still
                    .iter()
                    .chain(aborted)
                    .map(|(at, id)| (*at, *id))
                    .chain(new.iter().filter(|(_, id, _)| entries.contains_key(id)).map(|(at, id, _)| (*at, *id)))
                    .filter(|(_, id)| !finished(id));
                for (at, _) in must_finish {
                    let mark = mark.unwrap_or_else(|| panic!("case {n}, cut {cut}: something owed and no mark"));
                    assert!(at >= mark, "case {n}, cut {cut}: a transfer at {at} behind the mark {mark}");
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
                // As layout 2 wrote it: fixed-width bincode.
                let mut value = vec![records::FIXINT_RECORD_VERSION];
                value.extend(bincode::serialize(&DecidedRef { record: &record, made_by: None }).expect("serialises"));
                db.insert(key(RECORD, &id), value).expect("insert");
                db.insert(time_key(vec![BY_TIME], at, &id), &[][..]).expect("insert");
                if marked {
                    db.insert(key(b'u', &id), &[][..]).expect("insert");
                }
            }
            db.flush().expect("flush");
        }
        let wal = Wal::open(dir.path(), Durability::NoFsync, 2).await.expect("a layout-2 log opens");
        assert_eq!(unacked(&wal), sorted(vec![owed_early, owed_late]));
        assert_eq!(wal.store().db.scan_prefix([b'u']).count(), 0, "the markers are gone");
        assert_eq!(wal.stored_mark().expect("readable"), Some(20), "the earliest owed decision");
    }

    #[tokio::test]
    async fn a_layout_1_log_migrates_the_token_name_into_the_decision() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (named, anonymous) = (Uuid::new_v4(), Uuid::new_v4());
        let record = TransferRecord {
            transfer: Transfer::one(
                AccountId::new("alice").expect("valid"),
                AccountId::new("bob").expect("valid"),
                Amount::new(5).expect("positive"),
            ),
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
