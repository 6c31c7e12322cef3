//! On-disk layout versions of the two stores, and the ordered migrations between them.
//!
//! Each store keeps its layout version and its kind in a `meta` tree. At start a node calls [`migrate`]: a fresh
//! store is stamped with the current version; an older one has each pending migration applied in order, the
//! version bumped and flushed after each (so every migration must be safe to re-run if a crash cuts it short);
//! a store written by a newer binary, or of the other kind, is refused with a clear error.

/// The layout this binary writes. Version 1 is the initial layout: participant accounts, prepared and finished
/// transfers in one prefixed tree; coordinator transfer records keyed by id.
pub const LAYOUT_VERSION: u32 = 1;

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

/// Every migration, in order. Empty while version 1 is the only layout.
pub const MIGRATIONS: &[Migration] = &[];

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
        assert_eq!(migrate(&db, StoreKind::Participant).expect("v1 store opens"), 1);
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
