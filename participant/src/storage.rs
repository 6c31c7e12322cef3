//! The participant's side of the store: turns the machine's writes into one atomic sled batch, and rebuilds the
//! machine from disk at start. The only participant module that touches sled.

use crate::journal::{self, HeuristicRecord, JournalEntry, JournalState};
use common::ledger::{AccountId, ShardId, TransferId};
use common::records::{self, participant_keys as keys, AccountRecord, FinishedRecord, PreparedRecord};
use common::redo::Op;
use common::store::{KeyClasses, Store, StoreError, StoreKind, StoreOptions};
use protocol::msg::Decision;
use protocol::participant::{FinishedLog, ParticipantMachine, RestoreError, Write};
use protocol::participant_core::ParticipantCore;
use protocol::resolver::{ResolverConfig, ResolverCore};
use std::collections::{BTreeMap, HashMap};
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

/// Prepared records are transient: most are removed at commit, before a checkpoint could write them. Finished
/// records and journal entries are history: one or two per transfer, kept forever, in run files.
pub const CLASSES: KeyClasses =
    KeyClasses { transient: Some(keys::PREPARED), history: &[keys::FINISHED, journal::ENTRY] };

/// Opens a participant's store, replaying its redo log.
pub fn open(dir: &std::path::Path, options: impl Into<StoreOptions>) -> Result<Store, StoreError> {
    Store::open(dir, StoreKind::Participant, options, CLASSES)
}

/// Logs the core's `writes` as one group (applied at once, durable at the next `Store::sync`). Per cross-shard
/// transfer a shard logs one record at prepare (the prepared record) and four at commit (the balance, the
/// prepared record's removal, the finished record, the journal entry), plus the journal's next sequence number
/// once per group. They reach sled at the next checkpoint: the balance and the counter as their last value, the
/// prepared record only if the transfer is still in doubt then.
pub fn apply(store: &Store, writes: &[Write]) -> Result<(), StoreError> {
    if writes.is_empty() {
        return Ok(());
    }
    // A commit's finished record keeps the journal seq of its last entry, which the audit asks for.
    let mut commit_seqs: HashMap<TransferId, u64> = HashMap::new();
    for write in writes {
        if let Write::Journal(JournalEntry { seq, kind, transfer_id: Some(id), .. }) = write {
            if kind.is_commit() {
                let last = commit_seqs.entry(*id).or_default();
                *last = (*last).max(*seq);
            }
        }
    }
    let mut ops: Vec<Op> = Vec::with_capacity(writes.len());
    for write in writes {
        ops.push(match write {
            // Only the balance and the limit are durable: holds follow from the prepared records.
            Write::Account(id, record) => (keys::account(id), Some(records::encode_account(record))),
            Write::Prepared(id, record) => (keys::prepared(id).to_vec(), Some(records::encode(record))),
            Write::ClearPrepared(id) => (keys::prepared(id).to_vec(), None),
            Write::Finished(id, decision) => {
                let record = FinishedRecord { decision: *decision, commit_seq: commit_seqs.get(id).copied() };
                (keys::finished(id).to_vec(), Some(records::encode(&record)))
            }
            Write::Journal(entry) => (journal::entry_key(&entry.account, entry.seq), Some(records::encode(entry))),
            Write::JournalNextSeq(next) => (journal::NEXT_SEQ_KEY.to_vec(), Some(next.to_be_bytes().to_vec())),
            Write::CreatedTotal(total) => (journal::CREATED_TOTAL_KEY.to_vec(), Some(total.to_be_bytes().to_vec())),
            Write::Heuristic(id, record) => {
                (journal::prefixed(journal::HEURISTIC, id.as_bytes()), Some(records::encode(record)))
            }
        });
    }
    store.log(ops)
}

/// The finished records as the machine reads them ([`FinishedLog`]): sled's view, which includes every
/// batch applied, durable or not. A store that cannot be read stops the process, as a failed write does, so
/// that it recovers from disk rather than answer from a guess.
pub struct Decisions<'a>(pub &'a Store);

impl FinishedLog for Decisions<'_> {
    fn decision(&self, id: &TransferId) -> Option<Decision> {
        let read = self.0.get(&keys::finished(id)).map_err(LoadError::from).and_then(|value| match value {
            None => Ok(None),
            Some(bytes) => Ok(Some(records::decode::<FinishedRecord>(&bytes)?.decision)),
        });
        read.unwrap_or_else(|error| {
            tracing::error!(transfer_id = %id, %error, "store read failed: stopping to recover from disk");
            std::process::abort()
        })
    }
}

/// Every finished transfer and its decision, in id order.
pub fn finished(store: &Store) -> Result<Vec<(TransferId, Decision)>, LoadError> {
    let mut out = Vec::new();
    for (key, value) in store.range(prefix_range(keys::FINISHED), false, usize::MAX)? {
        out.push((transfer_id(&key, &key[1..])?, records::decode::<FinishedRecord>(&value)?.decision));
    }
    Ok(out)
}

/// The cluster id this shard adopted, if it has been contacted by a coordinator yet.
pub fn cluster_id(store: &Store) -> Result<Option<Uuid>, LoadError> {
    match store.get(keys::CLUSTER)? {
        None => Ok(None),
        Some(bytes) => Uuid::from_slice(&bytes).map(Some).map_err(|_| LoadError::BadKey(keys::CLUSTER.to_vec())),
    }
}

/// Binds this shard to a cluster for good.
pub async fn adopt_cluster_id(store: &Store, id: Uuid) -> Result<(), StoreError> {
    store.log(vec![(keys::CLUSTER.to_vec(), Some(id.as_bytes().to_vec()))])?;
    store.sync().await
}

/// Checks (or, on first start, records) which shard this store belongs to, then reads the whole state back.
pub async fn load(store: &Store, shard: ShardId) -> Result<(ParticipantMachine, JournalState), LoadError> {
    match store.get(keys::SHARD)? {
        Some(bytes) => {
            let raw: [u8; 4] = bytes.as_slice().try_into().map_err(|_| LoadError::BadKey(keys::SHARD.to_vec()))?;
            let stored = u32::from_be_bytes(raw);
            if stored != shard {
                return Err(LoadError::WrongShard { stored, requested: shard });
            }
        }
        None => {
            store.log(vec![(keys::SHARD.to_vec(), Some(shard.to_be_bytes().to_vec()))])?;
            store.sync().await?;
        }
    }
    // The rest is read from sled alone: opening the store replayed its redo log into sled, and nothing but the
    // shard number has been logged since.
    let mut prepared: HashMap<TransferId, PreparedRecord> = HashMap::new();
    let mut created_total = 0;
    if let Some(bytes) = store.db.get(journal::CREATED_TOTAL_KEY)? {
        let raw: [u8; 16] =
            bytes.as_ref().try_into().map_err(|_| LoadError::BadKey(journal::CREATED_TOTAL_KEY.to_vec()))?;
        created_total = i128::from_be_bytes(raw);
    }
    let mut next_seq = 1;
    if let Some(bytes) = store.db.get(journal::NEXT_SEQ_KEY)? {
        let raw: [u8; 8] = bytes.as_ref().try_into().map_err(|_| LoadError::BadKey(journal::NEXT_SEQ_KEY.to_vec()))?;
        next_seq = u64::from_be_bytes(raw);
    }
    let journal = JournalState::new(next_seq, created_total);
    // Only the accounts and the transfers in doubt: the finished records and the journal, which grow with
    // history, stay on disk, so a restart takes as long whatever the history.
    // sled returns the keys in byte order, which is the ids' order: the map is built in one pass, not by
    // a search per account (a million accounts load in about a second).
    let mut sorted = Vec::new();
    for entry in store.db.scan_prefix([keys::ACCOUNT]) {
        let (key, value) = entry?;
        let id = std::str::from_utf8(&key[1..])
            .ok()
            .and_then(|s| AccountId::new(s).ok())
            .ok_or_else(|| LoadError::BadKey(key.to_vec()))?;
        sorted.push((id, records::decode_account(&value)?));
    }
    let accounts: BTreeMap<AccountId, AccountRecord> = sorted.into_iter().collect();
    for entry in store.db.scan_prefix([keys::PREPARED]) {
        let (key, value) = entry?;
        prepared.insert(transfer_id(&key, &key[1..])?, records::decode(&value)?);
    }
    Ok((ParticipantMachine::restore(shard, accounts, prepared)?, journal))
}

/// Accounts opened per store batch by [`create_accounts_offline`].
const OFFLINE_BATCH: usize = 10_000;

/// Opens accounts straight in a stopped shard's store, through the machine and journal code the server uses
/// (so each gets its opening journal entry and counts in the money created): for filling a shard with many
/// accounts quickly (`ledger-fill accounts`). sled's lock on the store keeps a running participant out.
/// Returns how many were created and how many already existed.
pub async fn create_accounts_offline(
    dir: &std::path::Path,
    shard: ShardId,
    accounts: impl IntoIterator<Item = (AccountId, i64)>,
) -> Result<(u64, u64), LoadError> {
    let store = open(dir, common::store::Durability::Fsync)?;
    let (machine, journal) = load(&store, shard).await?;
    let resolver = ResolverCore::new(ResolverConfig::new(0), 0);
    let mut core = ParticipantCore::new(machine, journal, resolver);
    let (mut created, mut existed) = (0, 0);
    let mut accounts = accounts.into_iter().peekable();
    let now = common::http::now_unix_ms();
    while accounts.peek().is_some() {
        for (id, balance) in accounts.by_ref().take(OFFLINE_BATCH) {
            match core.handle_open(now, id, balance, 0) {
                Ok(()) => created += 1,
                Err(protocol::participant::CreateError::Exists) => existed += 1,
            }
        }
        if let Some(batch) = core.poll_writes() {
            apply(&store, &batch.writes)?;
            core.writes_applied();
        }
    }
    store.sync().await?;
    Ok((created, existed))
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
    for (_, value) in store.range(start..end, true, limit)? {
        out.push(records::decode(&value)?);
    }
    Ok(out)
}

/// The journal sequence number at which transfer `id` was committed here, if it was.
pub fn commit_seq(store: &Store, id: &TransferId) -> Result<Option<u64>, LoadError> {
    match store.get(&keys::finished(id))? {
        None => Ok(None),
        Some(bytes) => Ok(records::decode::<FinishedRecord>(&bytes)?.commit_seq),
    }
}

/// Every outcome an operator forced on this shard.
pub fn heuristics(store: &Store) -> Result<Vec<(TransferId, HeuristicRecord)>, LoadError> {
    let mut out = Vec::new();
    for (key, value) in store.range(prefix_range(journal::HEURISTIC), false, usize::MAX)? {
        out.push((transfer_id(&key, &key[1..])?, records::decode(&value)?));
    }
    Ok(out)
}

/// Every key that starts with `prefix`.
fn prefix_range(prefix: u8) -> std::ops::Range<Vec<u8>> {
    vec![prefix]..vec![prefix + 1]
}

fn transfer_id(key: &[u8], rest: &[u8]) -> Result<TransferId, LoadError> {
    Uuid::from_slice(rest).map_err(|_| LoadError::BadKey(key.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::ledger::{Amount, Posting, Transfer};
    use common::store::Durability;
    use common::wire::Decision;
    use serde::Serialize;

    /// A prepared record as layout 1 wrote it (no `made_by`).
    #[derive(Serialize)]
    struct PreparedV1 {
        transfer: Transfer,
        postings: Vec<Posting>,
        coordinator_url: String,
        prepared_at_unix_ms: u64,
    }

    fn v1<T: Serialize>(value: &T) -> Vec<u8> {
        let mut out = vec![1];
        out.extend(bincode::serialize(value).expect("serialises"));
        out
    }

    fn key(prefix: u8, rest: &[u8]) -> Vec<u8> {
        journal::prefixed(prefix, rest)
    }

    /// A layout-1 store: alice (100, 30 held by a prepared transfer named by a token), a commit journaled at
    /// seq 7 with its `c` and `r` keys.
    fn write_v1_store(dir: &std::path::Path) -> (TransferId, TransferId) {
        let db = sled::open(dir.join("store")).expect("sled opens");
        migrations::migrate(&db, migrations::StoreKind::Participant).expect("fresh store");
        migrations::stamp_version(&db, 1).expect("stamp");
        let alice = AccountId::new("alice").expect("valid");
        let (prepared, committed) = (Uuid::new_v4(), Uuid::new_v4());
        db.insert(
            keys::account(&alice),
            v1(&AccountRecord { balance: 100, held: 30, incoming: 0, overdraft_limit: 0 }),
        )
        .expect("insert");
        let transfer =
            Transfer::one(alice.clone(), AccountId::new("bob").expect("valid"), Amount::new(30).expect("positive"));
        let record = PreparedV1 {
            transfer,
            postings: vec![Posting { account: alice.clone(), delta: -30 }],
            coordinator_url: "http://127.0.0.1:1".into(),
            prepared_at_unix_ms: 5,
        };
        db.insert(keys::prepared(&prepared), v1(&record)).expect("insert");
        db.insert(key(b'w', prepared.as_bytes()), &b"teller"[..]).expect("insert");
        db.insert(keys::finished(&committed), v1(&Decision::Commit)).expect("insert");
        db.insert(key(b'c', committed.as_bytes()), &7u64.to_be_bytes()[..]).expect("insert");
        db.insert(key(b'r', &7u64.to_be_bytes()), committed.as_bytes()).expect("insert");
        let entry = JournalEntry {
            seq: 7,
            account: alice.clone(),
            kind: journal::EntryKind::Posting,
            transfer_id: Some(committed),
            amount: 5,
            balance_after: 100,
            at_unix_ms: 9,
            made_by: None,
        };
        db.insert(journal::entry_key(&alice, 7), v1(&entry)).expect("insert");
        db.flush().expect("flush");
        (prepared, committed)
    }

    async fn check_v2(store: &Store, prepared: TransferId, committed: TransferId) {
        let alice = AccountId::new("alice").expect("valid");
        let (machine, journal) = load(store, 0).await.expect("a migrated store loads");
        assert_eq!(
            machine.account(&alice),
            Some(AccountRecord { balance: 100, held: 30, incoming: 0, overdraft_limit: 0 })
        );
        let record = machine.prepared_transfer(&prepared).expect("still prepared");
        assert_eq!(record.made_by.as_deref(), Some("teller"), "the token name moved into the record");
        assert_eq!(machine.finished_decision(&committed, &Decisions(store)), Some(Decision::Commit));
        assert_eq!(commit_seq(store, &committed).expect("readable"), Some(7), "the commit seq moved too");
        assert_eq!(journal.last_seq(), 7, "the next seq is stored, not scanned for");
        let page = journal_page(store, &alice, None, 10).expect("journal readable");
        assert_eq!(page.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![7]);
        for gone in [b'c', b'r', b'w'] {
            assert_eq!(store.db.scan_prefix([gone]).count(), 0, "no {} keys are left", gone as char);
        }
    }

    #[tokio::test]
    async fn a_layout_1_store_migrates_and_a_rerun_changes_nothing() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (prepared, committed) = write_v1_store(dir.path());
        {
            let store = open(dir.path(), Durability::NoFsync).expect("opens");
            check_v2(&store, prepared, committed).await;
            // A crash before the version bump re-runs the migration on migrated records.
            migrations::stamp_version(&store.db, 1).expect("stamp");
        }
        let store = open(dir.path(), Durability::NoFsync).expect("reopens");
        check_v2(&store, prepared, committed).await;
    }
}
