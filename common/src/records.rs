//! On-disk records of both stores. Each value is one layout-version byte followed by its bincode body, so a
//! reader can tell a record it understands from one a newer binary wrote; `migrations` moves stores between
//! layouts. Keys are built here too, so the layout is described in one place.

use crate::ledger::{AccountId, TransferId};
pub use protocol::state::*;
use serde::{de::DeserializeOwned, Serialize};

/// Version byte written in front of every record value: layout 5, whose bodies are bincode with variable-length
/// integers (about half the bytes of fixed-width ones for the ledger's records).
pub const RECORD_VERSION: u8 = 5;
// Layout 6 changed where records are written, not how they are encoded.
const _: () = assert!(RECORD_VERSION as u32 <= migrations::LAYOUT_VERSION);
/// Records written before layout 5 (fixed-width integers). Layout 5 left them in place, so they are still read.
pub const FIXINT_RECORD_VERSION: u8 = 2;
/// The coordinator's staging record before layout 5 (the value of a time-index key; new in layout 4).
pub const FIXINT_STAGED_RECORD_VERSION: u8 = 4;

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("record has layout version {found}, this binary reads {expected} here")]
    Version { found: u8, expected: u8 },
    #[error("record is empty")]
    Empty,
    #[error("record does not decode: {0}")]
    Decode(#[from] bincode::Error),
}

fn compact() -> impl bincode::Options {
    use bincode::Options;
    bincode::DefaultOptions::new().with_varint_encoding().with_little_endian().reject_trailing_bytes()
}

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    use bincode::Options;
    // Sized first: the record is kept (in the redo log's overlay until a checkpoint), and growing it from
    // empty cost several reallocations per record.
    let size = compact().serialized_size(value).map_or(0, |n| n as usize);
    let mut out = Vec::with_capacity(1 + size);
    out.push(RECORD_VERSION);
    // Serialising plain owned data into a Vec cannot fail.
    compact().serialize_into(&mut out, value).expect("bincode into a Vec is infallible");
    out
}

/// A record of this layout, or one of the kind written before layout 5 with version byte
/// [`FIXINT_RECORD_VERSION`].
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, RecordError> {
    decode_or_fixint(FIXINT_RECORD_VERSION, bytes)
}

/// A record of this layout, or one written before layout 5 whose version byte is `fixint_version`.
pub fn decode_or_fixint<T: DeserializeOwned>(fixint_version: u8, bytes: &[u8]) -> Result<T, RecordError> {
    use bincode::Options;
    match bytes.split_first() {
        None => Err(RecordError::Empty),
        Some((&RECORD_VERSION, body)) => Ok(compact().deserialize(body)?),
        Some((&found, body)) if found == fixint_version => Ok(bincode::deserialize(body)?),
        Some((&found, _)) => Err(RecordError::Version { found, expected: RECORD_VERSION }),
    }
}

/// A participant's account value: its balance alone when it has no overdraft limit (as every account before
/// layout 8), else the balance and the limit. Its held and incoming amounts follow from the prepared records.
pub fn encode_account(record: &AccountRecord) -> Vec<u8> {
    if record.overdraft_limit == 0 {
        encode(&record.balance)
    } else {
        encode(&(record.balance, record.overdraft_limit))
    }
}

/// Reads what [`encode_account`] wrote: the two forms differ in length, so neither is mistaken for the other.
pub fn decode_account(bytes: &[u8]) -> Result<AccountRecord, RecordError> {
    let (balance, overdraft_limit) = match decode::<i64>(bytes) {
        Ok(balance) => (balance, 0),
        Err(RecordError::Decode(_)) => decode::<(i64, i64)>(bytes)?,
        Err(other) => return Err(other),
    };
    Ok(AccountRecord { balance, held: 0, incoming: 0, overdraft_limit })
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
        let rec = AccountRecord { balance: 10, held: 3, incoming: 1, overdraft_limit: 0 };
        let bytes = encode(&rec);
        assert_eq!(bytes[0], RECORD_VERSION);
        assert_eq!(decode::<AccountRecord>(&bytes).expect("decodes"), rec);
        let mut newer = bytes.clone();
        newer[0] = RECORD_VERSION + 1;
        assert!(matches!(decode::<AccountRecord>(&newer), Err(RecordError::Version { .. })));
        assert!(matches!(decode::<AccountRecord>(&[]), Err(RecordError::Empty)));
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(matches!(decode::<AccountRecord>(&trailing), Err(RecordError::Decode(_))));
    }

    /// The sizes `ARCHITECTURE.md` gives for the records written per transfer (accounts of 11 characters, a
    /// token name of 6, times of 2026): layout 5 against the fixed-width bodies before it.
    #[test]
    fn layout_5_record_sizes() {
        use crate::ledger::{Amount, Posting, Transfer};
        let account = |n: &str| AccountId::new(n).expect("valid");
        let transfer =
            Transfer::one(account("acct-000123"), account("acct-000456"), Amount::new(250).expect("positive"));
        let at = 1_796_000_000_000u64;
        let made_by = Some("loadgen".to_string());
        let decided = (
            TransferRecord {
                transfer: transfer.clone(),
                outcome: Outcome::Committed,
                shards: vec![0, 1],
                decided_at_unix_ms: at,
            },
            made_by.clone(),
        );
        let prepared = PreparedRecord {
            transfer: transfer.clone(),
            postings: vec![Posting { account: account("acct-000123"), delta: -250 }],
            coordinator_url: "http://127.0.0.1:7000".into(),
            prepared_at_unix_ms: at,
            made_by,
        };
        let finished = FinishedRecord { decision: protocol::msg::Decision::Commit, commit_seq: Some(1_000_000) };
        let fixint = |bytes: Vec<u8>| bytes.len() + 1;
        let sizes = [
            ("coordinator t", encode(&decided).len(), fixint(bincode::serialize(&decided).expect("ser"))),
            ("participant p", encode(&prepared).len(), fixint(bincode::serialize(&prepared).expect("ser"))),
            ("participant f", encode(&finished).len(), fixint(bincode::serialize(&finished).expect("ser"))),
            ("participant a", encode(&1_000_000i64).len(), fixint(bincode::serialize(&1_000_000i64).expect("ser"))),
        ];
        for (name, compact, fixed) in sizes {
            eprintln!("{name}: {compact} B, was {fixed} B");
        }
        assert_eq!(sizes.map(|(_, compact, fixed)| (compact, fixed)), [(50, 91), (84, 135), (8, 14), (6, 9)]);
    }

    #[test]
    fn an_account_is_its_balance_and_its_limit_only_when_it_has_one() {
        let plain = AccountRecord { balance: 1_000_000, held: 5, incoming: 6, overdraft_limit: 0 };
        assert_eq!(encode_account(&plain), encode(&1_000_000i64), "the same bytes as before limits existed");
        let stored = AccountRecord { held: 0, incoming: 0, ..plain };
        assert_eq!(decode_account(&encode_account(&plain)).expect("decodes"), stored);
        let cash = AccountRecord { balance: -70, held: 0, incoming: 0, overdraft_limit: i64::MAX };
        assert_eq!(decode_account(&encode_account(&cash)).expect("decodes"), cash);
        let mut old = vec![FIXINT_RECORD_VERSION];
        old.extend(bincode::serialize(&42i64).expect("serialises"));
        assert_eq!(decode_account(&old).expect("decodes").balance, 42);
        assert!(decode_account(&[RECORD_VERSION + 1, 1]).is_err());
    }

    /// A transfer's record before transfers had legs.
    #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
    struct TransferBeforeLegs {
        from: AccountId,
        to: AccountId,
        amount: crate::ledger::Amount,
    }

    #[test]
    fn a_one_leg_transfer_is_encoded_as_before_legs_and_several_legs_are_told_apart() {
        use crate::ledger::{Amount, Leg, Transfer};
        let account = |n: &str| AccountId::new(n).expect("valid");
        let amount = |n: i64| Amount::new(n).expect("positive");
        let one = Transfer::one(account("alice"), account("bob"), amount(250));
        let before = TransferBeforeLegs { from: account("alice"), to: account("bob"), amount: amount(250) };
        // Stored records (varint), the stream's frames and records before layout 5 (fixint) alike.
        assert_eq!(encode(&one), encode(&before));
        assert_eq!(bincode::serialize(&one).expect("ser"), bincode::serialize(&before).expect("ser"));
        assert_eq!(decode::<Transfer>(&encode(&before)).expect("decodes"), one);
        let prepared_before = (before, vec![7u8], "url".to_string());
        let (read, rest, url): (Transfer, Vec<u8>, String) = decode(&encode(&prepared_before)).expect("decodes");
        assert_eq!((read, rest, url.as_str()), (one.clone(), vec![7u8], "url"), "fields after it are read right");

        let legs = vec![
            Leg { from: account("alice"), to: account("bob"), amount: amount(100) },
            Leg { from: account("alice"), to: account("fees"), amount: amount(2) },
        ];
        let two = Transfer::new(legs).expect("two legs");
        let record = (two.clone(), 42u64);
        assert_eq!(decode::<(Transfer, u64)>(&encode(&record)).expect("decodes"), record);
        let fixint: (Transfer, u64) = bincode::deserialize(&bincode::serialize(&record).expect("ser")).expect("de");
        assert_eq!(fixint, record);
        assert!(decode::<TransferBeforeLegs>(&encode(&two)).is_err(), "a reader without legs refuses several");

        assert_eq!(
            serde_json::to_value(&one).expect("json"),
            serde_json::json!({"from": "alice", "to": "bob", "amount": 250})
        );
        let json = serde_json::to_value(&two).expect("json");
        assert_eq!(json["legs"][1]["to"], "fees");
        assert_eq!(serde_json::from_value::<Transfer>(json).expect("from json"), two);
        assert!(serde_json::from_value::<Transfer>(serde_json::json!({"legs": []})).is_err(), "no legs");
        let leg = serde_json::json!({"from": "a", "to": "b", "amount": 1});
        let too_many = serde_json::json!({"legs": vec![leg; crate::ledger::LEGS_MAX + 1]});
        assert!(serde_json::from_value::<Transfer>(too_many).is_err(), "more than LEGS_MAX legs");
    }

    #[test]
    fn a_hold_is_told_apart_from_a_transfer_in_both_encodings() {
        use crate::ledger::{Amount, Transfer, HOLD_SECONDS_MAX};
        let account = |n: &str| AccountId::new(n).expect("valid");
        let amount = Amount::new(70).expect("positive");
        let hold = Transfer::hold(account("alice"), account("shop"), amount, 600).expect("a hold");
        let plain = Transfer::one(account("alice"), account("shop"), amount);
        assert_ne!(hold, plain, "a hold and a transfer of the same leg are different bodies");
        assert_eq!((hold.hold_seconds(), plain.hold_seconds()), (Some(600), None));
        let record = (hold.clone(), 42u64);
        assert_eq!(decode::<(Transfer, u64)>(&encode(&record)).expect("decodes"), record);
        let fixint: (Transfer, u64) = bincode::deserialize(&bincode::serialize(&record).expect("ser")).expect("de");
        assert_eq!(fixint, record);
        assert!(decode::<TransferBeforeLegs>(&encode(&hold)).is_err(), "a reader without holds refuses one");

        let json = serde_json::to_value(&hold).expect("json");
        let expected =
            serde_json::json!({"from": "alice", "to": "shop", "amount": 70, "hold": true, "expires_in_s": 600});
        assert_eq!(json, expected);
        assert_eq!(serde_json::from_value::<Transfer>(json).expect("from json"), hold);
        assert_eq!(hold.to_string(), "alice->shop 70 (hold 600 s)");

        assert!(Transfer::hold(account("a"), account("b"), amount, 0).is_err());
        assert!(Transfer::hold(account("a"), account("b"), amount, HOLD_SECONDS_MAX + 1).is_err());
        let too_long = serde_json::json!({"from": "a", "to": "b", "amount": 1, "hold": true, "expires_in_s": HOLD_SECONDS_MAX + 1});
        assert!(serde_json::from_value::<Transfer>(too_long).is_err());
    }

    #[test]
    fn records_written_before_layout_5_still_decode() {
        let rec = AccountRecord { balance: 10, held: 3, incoming: 1, overdraft_limit: 0 };
        let mut old = vec![FIXINT_RECORD_VERSION];
        old.extend(bincode::serialize(&rec).expect("serialises"));
        assert_eq!(decode::<AccountRecord>(&old).expect("decodes"), rec);
        assert!(encode(&rec).len() < old.len(), "layout 5 is the smaller encoding");
        // A staging record's old version byte is only accepted where a staging record is read.
        old[0] = FIXINT_STAGED_RECORD_VERSION;
        assert!(matches!(decode::<AccountRecord>(&old), Err(RecordError::Version { .. })));
        assert_eq!(decode_or_fixint::<AccountRecord>(FIXINT_STAGED_RECORD_VERSION, &old).expect("decodes"), rec);
    }
}
