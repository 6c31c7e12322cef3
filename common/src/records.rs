//! On-disk records of both stores. Each value is one layout-version byte followed by its bincode body, so a
//! reader can tell a record it understands from one a newer binary wrote; `migrations` moves stores between
//! layouts. Keys are built here too, so the layout is described in one place.

use crate::ledger::{AccountId, TransferId};
pub use protocol::state::*;
use serde::{de::DeserializeOwned, Serialize};

/// Layout version written in front of every record value: the layout in which record values last changed
/// (layout 3 changed only keys).
pub const RECORD_VERSION: u8 = 2;
const _: () = assert!(RECORD_VERSION as u32 <= migrations::LAYOUT_VERSION);
/// The coordinator's staging record, new in layout 4 (the value of a time-index key, empty before).
pub const STAGED_RECORD_VERSION: u8 = 4;
const _: () = assert!(STAGED_RECORD_VERSION as u32 <= migrations::LAYOUT_VERSION);

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("record has layout version {found}, this binary reads {expected} here")]
    Version { found: u8, expected: u8 },
    #[error("record is empty")]
    Empty,
    #[error("record does not decode: {0}")]
    Decode(#[from] bincode::Error),
}

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    encode_as(RECORD_VERSION, value)
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, RecordError> {
    decode_as(RECORD_VERSION, bytes)
}

/// A record whose version byte is `version` rather than [`RECORD_VERSION`].
pub fn encode_as<T: Serialize>(version: u8, value: &T) -> Vec<u8> {
    let mut out = vec![version];
    // Serialising plain owned data into a Vec cannot fail.
    bincode::serialize_into(&mut out, value).expect("bincode into a Vec is infallible");
    out
}

pub fn decode_as<T: DeserializeOwned>(version: u8, bytes: &[u8]) -> Result<T, RecordError> {
    match bytes.split_first() {
        None => Err(RecordError::Empty),
        Some((&found, body)) if found == version => Ok(bincode::deserialize(body)?),
        Some((&found, _)) => Err(RecordError::Version { found, expected: version }),
    }
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
