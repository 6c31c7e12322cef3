//! On-disk layout versions of the two stores, and the ordered migrations between them.
//!
//! Each store keeps its layout version and its kind in a `meta` tree. At start a node calls [`migrate`]: a fresh
//! store is stamped with the current version; an older one has each pending migration applied in order, the
//! version bumped and flushed after each (so every migration must be safe to re-run if a crash cuts it short);
//! a store written by a newer binary, or of the other kind, is refused with a clear error.

/// The layout this binary writes. Version 1 is the initial layout: participant accounts, prepared and finished
/// transfers in one prefixed tree; coordinator transfer records keyed by id. Version 2 writes fewer keys per
/// transfer (see [`v2_fewer_keys`]). Version 3 replaces the coordinator's marker per commit owed acks with one
/// mark (see [`v3_acked_before_mark`]). Version 4 lets a coordinator's `r` index key hold a staging record
/// (version byte 4) for a transfer not yet decided (see [`v4_staging_records`]). Version 5 writes record bodies
/// with variable-length integers (version byte 5; see [`v5_compact_records`]). Version 6 puts a redo log in
/// front of each store (see [`v6_redo_log`]). Version 7 writes the history keys to run files rather than to
/// sled (see [`v7_history_runs`]). Version 8 lets a participant's account value carry an overdraft limit (see
/// [`v8_overdraft_limits`]). Version 9 stores transfers of several legs (see [`v9_transfer_legs`]).
pub const LAYOUT_VERSION: u32 = 9;

/// Coordinator: every commit decided before this time (unix ms, big-endian u64) is acknowledged by all its
/// shards; commits at or after it may not be. `u64::MAX`: none is owed.
pub const ACKED_BEFORE_KEY: &[u8] = b"macked_before";

const META_TREE: &str = "meta";
const VERSION_KEY: &[u8] = b"layout_version";
const KIND_KEY: &[u8] = b"store_kind";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreKind {
    Coordinator,
    Participant,
}

impl StoreKind {
    fn name(self) -> &'static str {
        match self {
            StoreKind::Coordinator => "coordinator",
            StoreKind::Participant => "participant",
        }
    }
}

/// One step from `to_version - 1` to `to_version`.
pub struct Migration {
    pub to_version: u32,
    pub description: &'static str,
    /// Must be idempotent: it is re-run if the process dies before the version bump is flushed.
    pub apply: fn(&sled::Db, StoreKind) -> sled::Result<()>,
}

/// Every migration, in order.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        to_version: 2,
        description: "fewer keys per transfer: balances only, token names and commit seqs inside their records",
        apply: v2_fewer_keys,
    },
    Migration {
        to_version: 3,
        description: "coordinator: one acked-before mark instead of a marker per commit owed acks",
        apply: v3_acked_before_mark,
    },
    Migration {
        to_version: 4,
        description: "coordinator: staging records (parallel commits) in the time index's values",
        apply: v4_staging_records,
    },
    Migration {
        to_version: 5,
        description: "record bodies with variable-length integers (version byte 5); older records read as they are",
        apply: v5_compact_records,
    },
    Migration {
        to_version: 6,
        description: "a redo log in front of each store; sled is written at checkpoints",
        apply: v6_redo_log,
    },
    Migration {
        to_version: 7,
        description: "history keys (finished records, journal, decisions, time index) in run files beside sled",
        apply: v7_history_runs,
    },
    Migration {
        to_version: 8,
        description: "participant: an account's value may carry an overdraft limit beside its balance",
        apply: v8_overdraft_limits,
    },
    Migration {
        to_version: 9,
        description: "transfers of several legs: their records, the leg an abort names, journal entries by leg",
        apply: v9_transfer_legs,
    },
];

/// Records (values of the default tree) changed in this many keys per sled batch.
const MIGRATION_BATCH_KEYS: usize = 10_000;

/// Version 1 → 2. Every record value starts with its layout version byte, which becomes 2. Beyond that:
/// - participant `a` account: `{balance, held, incoming}` → `balance` (holds follow from the prepared records);
/// - participant `p` prepared: gains `made_by`, taken from the `w` key, which goes;
/// - participant `f` finished: gains `commit_seq`, taken from the `c` key, which goes; the `r` commit-order keys
///   go too (the audit lists recent commits from memory), and `mjournal_next_seq` is written once, so a start
///   needs no scan of the journal;
/// - coordinator `t` decision: gains `made_by`, taken from the `n` key, which goes.
///
/// Each record is rewritten in the same batch that removes the key it absorbed, and records already at version
/// 2 are left alone, so a migration cut short by a crash resumes where it stopped.
fn v2_fewer_keys(db: &sled::Db, kind: StoreKind) -> sled::Result<()> {
    const V1: u8 = 1;
    const V2: u8 = 2;
    // bincode's encoding of Option<String> / Option<u64>, as the records' new last fields.
    fn opt_string(v: Option<&[u8]>) -> Vec<u8> {
        let v = v.map(|b| String::from_utf8_lossy(b).into_owned());
        bincode::serialize(&v).expect("bincode into a Vec is infallible")
    }
    fn opt_u64(v: Option<&[u8]>) -> Vec<u8> {
        let v = v.and_then(|b| <[u8; 8]>::try_from(b).ok()).map(u64::from_be_bytes);
        bincode::serialize(&v).expect("bincode into a Vec is infallible")
    }
    let with_prefix = |prefix: u8, key: &[u8]| {
        let mut k = Vec::with_capacity(key.len());
        k.push(prefix);
        k.extend_from_slice(&key[1..]);
        k
    };
    let mut batch = sled::Batch::default();
    let mut in_batch = 0;
    let mut journal_next_seq = 1u64;
    for entry in db.iter() {
        let (key, value) = entry?;
        let (Some(&prefix), Some(&version)) = (key.first(), value.first()) else { continue };
        if kind == StoreKind::Participant && prefix == b'j' && key.len() >= 8 {
            let seq: [u8; 8] = key[key.len() - 8..].try_into().expect("8 bytes");
            journal_next_seq = journal_next_seq.max(u64::from_be_bytes(seq) + 1);
        }
        let versioned: &[u8] = match kind {
            StoreKind::Participant => b"apfjh",
            StoreKind::Coordinator => b"t",
        };
        if !versioned.contains(&prefix) || version != V1 {
            continue;
        }
        let body = &value[1..];
        let mut new = vec![V2];
        match (kind, prefix) {
            (StoreKind::Participant, b'a') => new.extend_from_slice(&body[..8.min(body.len())]),
            (StoreKind::Participant, b'p') | (StoreKind::Coordinator, b't') => {
                let name_prefix = if kind == StoreKind::Participant { b'w' } else { b'n' };
                let name_key = with_prefix(name_prefix, &key);
                new.extend_from_slice(body);
                new.extend_from_slice(&opt_string(db.get(&name_key)?.as_deref()));
                batch.remove(name_key);
            }
            (StoreKind::Participant, b'f') => {
                let seq_key = with_prefix(b'c', &key);
                new.extend_from_slice(body);
                new.extend_from_slice(&opt_u64(db.get(&seq_key)?.as_deref()));
                batch.remove(seq_key);
            }
            _ => new.extend_from_slice(body),
        }
        batch.insert(key, new);
        in_batch += 1;
        if in_batch == MIGRATION_BATCH_KEYS {
            db.apply_batch(std::mem::take(&mut batch))?;
            in_batch = 0;
        }
    }
    db.apply_batch(batch)?;
    if kind == StoreKind::Participant {
        // Keys the new layout no longer has. Names (`w`) of transfers no longer prepared, and `c` keys, were
        // read above; any left over belong to nothing.
        let mut batch = sled::Batch::default();
        for prefix in [b'c', b'r', b'w'] {
            for entry in db.scan_prefix([prefix]) {
                batch.remove(entry?.0);
            }
        }
        if db.get(b"mjournal_next_seq")?.is_none() {
            batch.insert(&b"mjournal_next_seq"[..], &journal_next_seq.to_be_bytes()[..]);
        }
        db.apply_batch(batch)?;
    } else {
        let mut batch = sled::Batch::default();
        for entry in db.scan_prefix([b'n']) {
            batch.remove(entry?.0);
        }
        db.apply_batch(batch)?;
    }
    Ok(())
}

/// Version 2 → 3, coordinator only. The `u` marker of each commit some shard had not acknowledged goes; the
/// [`ACKED_BEFORE_KEY`] mark takes their place: the earliest decision time among them (`u64::MAX` if none), so
/// recovery, which re-sends every commit decided at or after the mark, still re-sends each of them. One atomic
/// batch, so a crash leaves either the markers or the mark.
fn v3_acked_before_mark(db: &sled::Db, kind: StoreKind) -> sled::Result<()> {
    /// The coordinator's `t` record value after its version byte (layout 2 and 3).
    #[derive(serde::Deserialize)]
    struct Decided {
        record: protocol::state::TransferRecord,
        #[allow(dead_code)]
        made_by: Option<String>,
    }
    if kind != StoreKind::Coordinator {
        return Ok(());
    }
    let mut batch = sled::Batch::default();
    let mut mark = u64::MAX;
    for entry in db.scan_prefix([b'u']) {
        let (key, _) = entry?;
        batch.remove(key.clone());
        let mut record_key = key.to_vec();
        record_key[0] = b't';
        let Some(value) = db.get(&record_key)? else { continue };
        let decided: Decided = bincode::deserialize(value.get(1..).unwrap_or_default())
            .map_err(|e| sled::Error::Unsupported(format!("decision record {record_key:?} does not decode: {e}")))?;
        mark = mark.min(decided.record.decided_at_unix_ms);
    }
    if db.get(ACKED_BEFORE_KEY)?.is_none() {
        batch.insert(ACKED_BEFORE_KEY, &mark.to_be_bytes()[..]);
    }
    db.apply_batch(batch)
}

/// Version 3 → 4 rewrites nothing: a layout-3 store holds no staging record (its `r` values are empty), and its
/// mark already means what layout 4 needs (every transfer indexed before it is decided and acknowledged). The
/// version bump alone keeps an older binary, which would not finish staged transfers, from opening the store.
fn v4_staging_records(_db: &sled::Db, _kind: StoreKind) -> sled::Result<()> {
    Ok(())
}

/// Version 4 → 5 rewrites nothing: a record keeps the version byte it was written with, and readers decode a
/// version-5 body as variable-length bincode and an older one (version byte 2, or 4 for a staging record) as
/// fixed-width bincode, so old records need no rewrite, which at a million transfers would take minutes. New
/// records are written at version 5 (about half the bytes). The bump keeps a layout-4 binary, which cannot read
/// them, from opening the store.
fn v5_compact_records(_db: &sled::Db, _kind: StoreKind) -> sled::Result<()> {
    Ok(())
}

/// Version 5 → 6: nothing to rewrite. A layout-6 node's recent writes may live only in its redo log
/// (`redo/` beside `store/`), which older binaries do not read: the bump makes them refuse the store.
fn v6_redo_log(_db: &sled::Db, _kind: StoreKind) -> sled::Result<()> {
    Ok(())
}

/// Version 6 → 7: nothing to rewrite. Checkpoints now write the history keys to run files (`runs/` beside
/// `store/`, named by the `mredo_runs` key), which older binaries do not read: the bump makes them refuse the
/// store. History that sled already holds stays there and is read as before, under the runs.
fn v7_history_runs(_db: &sled::Db, _kind: StoreKind) -> sled::Result<()> {
    Ok(())
}

/// Version 7 → 8. An account with an overdraft limit is written as `(balance, limit)` instead of `balance`
/// (`records::encode_account`); every existing account has no limit and keeps its value. Nothing is
/// rewritten: the version exists so that a binary of layout 7, which would misread such a value, refuses the
/// store.
fn v8_overdraft_limits(_db: &sled::Db, _kind: StoreKind) -> sled::Result<()> {
    Ok(())
}

/// Version 8 → 9. A transfer of several legs is stored as an empty string and its legs where a transfer had
/// `from`, `to` and `amount`; a coordinator's decision may name the leg that failed (`Outcome::AbortedAtLeg`),
/// and a journal entry the leg it posts (`EntryKind::LegPosting`). Every existing record is of one leg and
/// reads as before. Nothing is rewritten: the version exists so that a binary of layout 8, which would misread
/// such records, refuses the store.
fn v9_transfer_legs(_db: &sled::Db, _kind: StoreKind) -> sled::Result<()> {
    Ok(())
}

/// The layout version `db` was stamped with, if any.
pub fn stored_version(db: &sled::Db) -> Result<Option<u32>, MigrationError> {
    read_version(&db.open_tree(META_TREE)?)
}

const _: () = assert!(MIGRATIONS.len() as u32 + 1 == LAYOUT_VERSION, "one migration per version after 1");

#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error(
        "store layout version {found} is newer than this binary understands ({LAYOUT_VERSION}); use a newer binary"
    )]
    TooNew { found: u32 },
    #[error("this is a {found} store, not a {expected} store: check the --data directory")]
    WrongKind { found: String, expected: &'static str },
    #[error("store holds data but no layout version: not a store this program wrote")]
    Unversioned,
    #[error("store metadata is corrupt: {0}")]
    Corrupt(&'static str),
    #[error("storage error: {0}")]
    Sled(#[from] sled::Error),
}

/// Brings `db` to [`LAYOUT_VERSION`]; returns the version the store had when opened (0 for a fresh store).
pub fn migrate(db: &sled::Db, kind: StoreKind) -> Result<u32, MigrationError> {
    let meta = db.open_tree(META_TREE)?;
    let found = read_version(&meta)?;
    match meta.get(KIND_KEY)? {
        Some(k) if k.as_ref() != kind.name().as_bytes() => {
            let found = String::from_utf8_lossy(&k).into_owned();
            return Err(MigrationError::WrongKind { found, expected: kind.name() });
        }
        _ => {}
    }
    let Some(found) = found else {
        let holds_data = db.tree_names().iter().any(|name| {
            name.as_ref() != META_TREE.as_bytes() && db.open_tree(name).map(|t| !t.is_empty()).unwrap_or(true)
        });
        if holds_data {
            return Err(MigrationError::Unversioned);
        }
        meta.insert(KIND_KEY, kind.name().as_bytes())?;
        meta.insert(VERSION_KEY, &LAYOUT_VERSION.to_be_bytes())?;
        db.flush()?;
        return Ok(0);
    };
    if found > LAYOUT_VERSION {
        return Err(MigrationError::TooNew { found });
    }
    for step in MIGRATIONS.iter().filter(|m| m.to_version > found) {
        (step.apply)(db, kind)?;
        meta.insert(VERSION_KEY, &step.to_version.to_be_bytes())?;
        db.flush()?;
    }
    Ok(found)
}

fn read_version(meta: &sled::Tree) -> Result<Option<u32>, MigrationError> {
    match meta.get(VERSION_KEY)? {
        None => Ok(None),
        Some(bytes) => {
            let raw: [u8; 4] = bytes.as_ref().try_into().map_err(|_| MigrationError::Corrupt("layout version"))?;
            Ok(Some(u32::from_be_bytes(raw)))
        }
    }
}

/// Stamps a store with an arbitrary version: lets tests build stores of other versions.
pub fn stamp_version(db: &sled::Db, version: u32) -> sled::Result<()> {
    db.open_tree(META_TREE)?.insert(VERSION_KEY, &version.to_be_bytes())?;
    db.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &std::path::Path) -> sled::Db {
        sled::open(dir).expect("sled opens a temp dir")
    }

    #[test]
    fn a_fresh_store_is_stamped_and_a_v1_store_reopens() {
        let dir = tempfile::tempdir().expect("temp dir");
        {
            let db = open(dir.path());
            assert_eq!(migrate(&db, StoreKind::Participant).expect("fresh store opens"), 0);
            db.insert(b"a-key", b"value").expect("insert");
            db.flush().expect("flush");
        }
        let db = open(dir.path());
        assert_eq!(migrate(&db, StoreKind::Participant).expect("store reopens"), LAYOUT_VERSION);
        assert_eq!(db.get(b"a-key").expect("get").as_deref(), Some(&b"value"[..]));
    }

    #[test]
    fn a_newer_store_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = open(dir.path());
        migrate(&db, StoreKind::Coordinator).expect("fresh store opens");
        stamp_version(&db, LAYOUT_VERSION + 1).expect("stamp");
        let err = migrate(&db, StoreKind::Coordinator).expect_err("newer layout refused");
        assert!(matches!(err, MigrationError::TooNew { found } if found == LAYOUT_VERSION + 1));
        assert!(err.to_string().contains("newer"));
    }

    #[test]
    fn a_store_of_the_other_kind_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = open(dir.path());
        migrate(&db, StoreKind::Coordinator).expect("fresh store opens");
        let err = migrate(&db, StoreKind::Participant).expect_err("kind mismatch refused");
        assert!(matches!(err, MigrationError::WrongKind { .. }));
    }

    #[test]
    fn unversioned_data_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = open(dir.path());
        db.insert(b"stray", b"data").expect("insert");
        assert!(matches!(migrate(&db, StoreKind::Participant), Err(MigrationError::Unversioned)));
    }
}
