//! Ledger vocabulary: validated account ids, positive amounts, transfers, and the stable account-to-shard map.
//! Constructors validate, so a value of these types is always well formed.

use serde::{Deserialize, Serialize};
use std::fmt;
use uuid::Uuid;

/// Longest account id accepted; ids are short keys, not documents.
pub const ACCOUNT_ID_LEN_MAX: usize = 64;

/// An account id: 1 to 64 characters of `[A-Za-z0-9_-]`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct AccountId(String);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LedgerError {
    #[error("account id must be 1 to {ACCOUNT_ID_LEN_MAX} characters of A-Z, a-z, 0-9, '_' or '-'")]
    BadAccountId,
    #[error("amount must be an integer from 1 to {}", i64::MAX)]
    BadAmount,
    #[error("balance must be an integer from 0 to {}", i64::MAX)]
    BadBalance,
}

impl AccountId {
    pub fn new(id: impl Into<String>) -> Result<Self, LedgerError> {
        let id = id.into();
        let well_formed = !id.is_empty()
            && id.len() <= ACCOUNT_ID_LEN_MAX
            && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if well_formed {
            Ok(AccountId(id))
        } else {
            Err(LedgerError::BadAccountId)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An id orders as its text does (the derived `Ord` compares the one field), so maps keyed by ids can be
/// searched with any string, such as a page cursor that names no account.
impl std::borrow::Borrow<str> for AccountId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for AccountId {
    type Error = LedgerError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        AccountId::new(s)
    }
}

impl From<AccountId> for String {
    fn from(id: AccountId) -> String {
        id.0
    }
}

impl fmt::Display for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A transfer amount in minor units: 1..=i64::MAX, never zero or negative.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "i64", into = "i64")]
pub struct Amount(i64);

impl Amount {
    pub fn new(minor: i64) -> Result<Self, LedgerError> {
        if minor >= 1 {
            Ok(Amount(minor))
        } else {
            Err(LedgerError::BadAmount)
        }
    }

    pub fn minor(self) -> i64 {
        self.0
    }
}

impl TryFrom<i64> for Amount {
    type Error = LedgerError;
    fn try_from(v: i64) -> Result<Self, Self::Error> {
        Amount::new(v)
    }
}

impl From<Amount> for i64 {
    fn from(a: Amount) -> i64 {
        a.0
    }
}

/// Transfer ids are client-chosen (or generated) UUIDs; they are the idempotency key.
pub type TransferId = Uuid;

/// Shards are numbered 0..N in the order of the coordinator's `--participants` list.
pub type ShardId = u32;

/// What a client asked for: move `amount` from `from` to `to`. The body compared for idempotency.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Transfer {
    pub from: AccountId,
    pub to: AccountId,
    pub amount: Amount,
}

/// One signed change to one account: negative debits, positive credits.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Posting {
    pub account: AccountId,
    pub delta: i64,
}

impl Transfer {
    /// The postings that fall on `shard` when accounts are spread over `shard_count` shards.
    pub fn postings_for(&self, shard: ShardId, shard_count: u32) -> Vec<Posting> {
        let mut postings = Vec::with_capacity(2);
        if shard_of(&self.from, shard_count) == shard {
            postings.push(Posting { account: self.from.clone(), delta: -self.amount.minor() });
        }
        if shard_of(&self.to, shard_count) == shard {
            postings.push(Posting { account: self.to.clone(), delta: self.amount.minor() });
        }
        postings
    }

    /// The shards this transfer touches, ascending and without repeats.
    pub fn shards(&self, shard_count: u32) -> Vec<ShardId> {
        let mut shards = vec![shard_of(&self.from, shard_count), shard_of(&self.to, shard_count)];
        shards.sort_unstable();
        shards.dedup();
        shards
    }
}

/// The shard that owns `account`: FNV-1a (64-bit) of the id's bytes, modulo the shard count. FNV is written out
/// here rather than taken from `std::hash` because the map must never change between builds or releases.
pub fn shard_of(account: &AccountId, shard_count: u32) -> ShardId {
    assert!(shard_count > 0, "a cluster has at least one shard");
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let hash = account.as_str().bytes().fold(FNV_OFFSET, |h, b| (h ^ u64::from(b)).wrapping_mul(FNV_PRIME));
    (hash % u64::from(shard_count)) as ShardId
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn account_ids_are_validated() {
        assert!(AccountId::new("alice_01-x").is_ok());
        assert!(AccountId::new("a".repeat(64)).is_ok());
        assert_eq!(AccountId::new(""), Err(LedgerError::BadAccountId));
        assert_eq!(AccountId::new("a".repeat(65)), Err(LedgerError::BadAccountId));
        assert_eq!(AccountId::new("al ice"), Err(LedgerError::BadAccountId));
        assert_eq!(AccountId::new("ålice"), Err(LedgerError::BadAccountId));
    }

    #[test]
    fn amounts_are_positive() {
        assert!(Amount::new(1).is_ok());
        assert!(Amount::new(i64::MAX).is_ok());
        assert_eq!(Amount::new(0), Err(LedgerError::BadAmount));
        assert_eq!(Amount::new(-5), Err(LedgerError::BadAmount));
    }

    #[test]
    fn shard_map_is_stable() {
        // Pinned values: changing the hash would move every existing account to another shard.
        let id = |s: &str| AccountId::new(s).expect("valid id");
        assert_eq!(shard_of(&id("alice"), 2), shard_of(&id("alice"), 2));
        let pinned: Vec<u32> = ["alice", "bob", "carol", "dave"].iter().map(|s| shard_of(&id(s), 2)).collect();
        assert_eq!(pinned, PINNED_TWO_SHARDS);
    }

    const PINNED_TWO_SHARDS: [u32; 4] = [1, 0, 0, 1];

    #[test]
    fn postings_split_by_shard() {
        let id = |s: &str| AccountId::new(s).expect("valid id");
        let t = Transfer { from: id("alice"), to: id("bob"), amount: Amount::new(7).expect("positive") };
        let all: Vec<Posting> = (0..2).flat_map(|s| t.postings_for(s, 2)).collect();
        assert_eq!(all.iter().map(|p| p.delta).sum::<i64>(), 0);
        assert_eq!(all.len(), 2);
        let one_shard = t.postings_for(0, 1);
        assert_eq!(one_shard.len(), 2);
        assert_eq!(t.shards(1), vec![0]);
    }
}
