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

/// Why a value was refused as ledger vocabulary; the message is fit to show a client.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LedgerError {
    /// The id is empty, longer than [`ACCOUNT_ID_LEN_MAX`], or has a character outside `[A-Za-z0-9_-]`.
    #[error("account id must be 1 to {ACCOUNT_ID_LEN_MAX} characters of A-Z, a-z, 0-9, '_' or '-'")]
    BadAccountId,
    /// The amount is zero or negative: a transfer always moves some money.
    #[error("amount must be an integer from 1 to {}", i64::MAX)]
    BadAmount,
    /// The balance is negative: no account holds less than nothing.
    #[error("balance must be an integer from 0 to {}", i64::MAX)]
    BadBalance,
}

impl AccountId {
    /// Validates `id`; every id, including one read from the wire or disk, is made here.
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

    /// The id's text, as sent and stored, and what the shard map hashes.
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
    /// Validates `minor`: an amount is at least 1.
    pub fn new(minor: i64) -> Result<Self, LedgerError> {
        if minor >= 1 {
            Ok(Amount(minor))
        } else {
            Err(LedgerError::BadAmount)
        }
    }

    /// The amount in minor units, as balances count them.
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

/// The most legs one transfer may have.
pub const LEGS_MAX: usize = 16;

/// One movement of a transfer: `amount` from `from` to `to`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Leg {
    /// The account debited.
    pub from: AccountId,
    /// The account credited.
    pub to: AccountId,
    /// How much moves, in minor units.
    pub amount: Amount,
}

/// The longest a hold may last (30 days), and how long one lasts unless asked otherwise (a day).
pub const HOLD_SECONDS_MAX: u32 = 2_592_000;
/// How long a hold lasts when the client names no `expires_in_s`.
pub const HOLD_SECONDS_DEFAULT: u32 = 86_400;

/// What a client asked for: one or more legs (at most [`LEGS_MAX`]), applied all together or not at all; or a
/// hold of one leg, which reserves the amount for a number of seconds until it is captured, released or
/// expires. The body compared for idempotency.
///
/// A one-leg transfer is encoded exactly as the transfers of earlier versions, which had no legs: as JSON
/// `{"from","to","amount"}`, and in bincode the three fields in a row. A transfer of several legs is JSON
/// `{"legs":[...]}`, and in bincode an empty string (which no account id can be, so a reader of either kind
/// tells them apart by the first field) followed by the legs. A hold is JSON `{"from","to","amount","hold":
/// true,"expires_in_s"}`, and in bincode `"+"` (no account id either), its legs and its seconds.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Transfer {
    /// Shared: a transfer is cloned into every log write, frame and answer about it, and a clone then costs
    /// no allocation.
    legs: std::sync::Arc<[Leg]>,
    /// A hold for this many seconds, not a transfer.
    hold_seconds: Option<u32>,
}

/// Why legs could not be made into a transfer or a hold; the message is fit to show a client.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LegsError {
    /// No legs, or more than [`LEGS_MAX`].
    #[error("a transfer has 1 to {LEGS_MAX} legs")]
    Count,
    /// A hold of no seconds, or of more than [`HOLD_SECONDS_MAX`].
    #[error("a hold lasts 1 to {HOLD_SECONDS_MAX} seconds")]
    HoldSeconds,
    /// A hold of other than one leg.
    #[error("a hold has one leg")]
    HoldLegs,
}

impl Transfer {
    /// A transfer of one leg.
    pub fn one(from: AccountId, to: AccountId, amount: Amount) -> Transfer {
        Transfer { legs: std::sync::Arc::new([Leg { from, to, amount }]), hold_seconds: None }
    }

    /// A transfer of `legs` (1 to [`LEGS_MAX`]), applied all together or not at all.
    pub fn new(legs: Vec<Leg>) -> Result<Transfer, LegsError> {
        if (1..=LEGS_MAX).contains(&legs.len()) {
            Ok(Transfer { legs: legs.into(), hold_seconds: None })
        } else {
            Err(LegsError::Count)
        }
    }

    /// A hold of `amount` on `from`, for `to`, lasting `seconds` (1 to [`HOLD_SECONDS_MAX`]).
    pub fn hold(from: AccountId, to: AccountId, amount: Amount, seconds: u32) -> Result<Transfer, LegsError> {
        Transfer::with_hold(vec![Leg { from, to, amount }], seconds)
    }

    fn with_hold(legs: Vec<Leg>, seconds: u32) -> Result<Transfer, LegsError> {
        if !(1..=HOLD_SECONDS_MAX).contains(&seconds) {
            return Err(LegsError::HoldSeconds);
        }
        if legs.len() != 1 {
            return Err(LegsError::HoldLegs);
        }
        Ok(Transfer { legs: legs.into(), hold_seconds: Some(seconds) })
    }

    /// How long it holds its amount, if it is a hold.
    pub fn hold_seconds(&self) -> Option<u32> {
        self.hold_seconds
    }

    /// Its legs, in the client's order; a leg's index here is how postings and answers name it.
    pub fn legs(&self) -> &[Leg] {
        &self.legs
    }

    /// The leg of a one-leg transfer or hold.
    pub fn single(&self) -> Option<&Leg> {
        match &self.legs[..] {
            [leg] => Some(leg),
            _ => None,
        }
    }

    /// The postings that fall on `shard` when accounts are spread over `shard_count` shards, leg by leg, each
    /// with the index of its leg.
    pub fn postings_with_legs(&self, shard: ShardId, shard_count: u32) -> Vec<(usize, Posting)> {
        let mut postings = Vec::with_capacity(2 * self.legs.len());
        for (index, leg) in self.legs.iter().enumerate() {
            if shard_of(&leg.from, shard_count) == shard {
                postings.push((index, Posting { account: leg.from.clone(), delta: -leg.amount.minor() }));
            }
            if shard_of(&leg.to, shard_count) == shard {
                postings.push((index, Posting { account: leg.to.clone(), delta: leg.amount.minor() }));
            }
        }
        postings
    }

    /// The leg each of `postings` came from, where `postings` is one shard's share of this transfer's postings
    /// in order (what [`Self::postings_for`] gives): `None` for a posting that is not such a share. Matching in
    /// order is exact because equal postings name one account, which falls on one shard: the shard's share
    /// holds every posting equal to one of its own.
    pub fn legs_of_postings(&self, postings: &[Posting]) -> Vec<Option<usize>> {
        let all =
            self.legs.iter().enumerate().flat_map(|(index, leg)| {
                [(index, &leg.from, -leg.amount.minor()), (index, &leg.to, leg.amount.minor())]
            });
        let mut legs = Vec::with_capacity(postings.len());
        let mut next = postings.iter().peekable();
        for (index, account, delta) in all {
            if next.peek().is_some_and(|p| p.account == *account && p.delta == delta) {
                next.next();
                legs.push(Some(index));
            }
        }
        legs.resize(postings.len(), None);
        legs
    }

    /// The postings that fall on `shard` when accounts are spread over `shard_count` shards.
    pub fn postings_for(&self, shard: ShardId, shard_count: u32) -> Vec<Posting> {
        self.postings_with_legs(shard, shard_count).into_iter().map(|(_, posting)| posting).collect()
    }

    /// The shards this transfer touches, ascending and without repeats.
    pub fn shards(&self, shard_count: u32) -> Vec<ShardId> {
        let mut shards: Vec<ShardId> = self
            .legs
            .iter()
            .flat_map(|leg| [shard_of(&leg.from, shard_count), shard_of(&leg.to, shard_count)])
            .collect();
        shards.sort_unstable();
        shards.dedup();
        shards
    }

    /// Whether `account` is debited or credited by some leg.
    pub fn touches(&self, account: &AccountId) -> bool {
        self.legs.iter().any(|leg| leg.from == *account || leg.to == *account)
    }
}

/// `alice->bob 5`, legs separated by `, `; a hold ends with ` (hold 60 s)`.
impl fmt::Display for Transfer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, leg) in self.legs.iter().enumerate() {
            let separator = if i == 0 { "" } else { ", " };
            write!(f, "{separator}{}->{} {}", leg.from, leg.to, leg.amount.minor())?;
        }
        match self.hold_seconds {
            Some(seconds) => write!(f, " (hold {seconds} s)"),
            None => Ok(()),
        }
    }
}

/// The JSON form of a transfer of several legs.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct LegsJson {
    legs: Vec<Leg>,
}

/// The JSON form of a hold.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct HoldJson {
    from: AccountId,
    to: AccountId,
    amount: Amount,
    hold: bool,
    expires_in_s: u32,
}

/// The first field of a hold's bincode form, where a transfer has its first account id or `""`.
const HOLD_MARK: &str = "+";

impl Serialize for Transfer {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeTuple;
        match (self.single(), serializer.is_human_readable()) {
            (Some(leg), true) => match self.hold_seconds {
                None => leg.serialize(serializer),
                Some(expires_in_s) => {
                    let (from, to, amount) = (leg.from.clone(), leg.to.clone(), leg.amount);
                    HoldJson { from, to, amount, hold: true, expires_in_s }.serialize(serializer)
                }
            },
            (None, true) => LegsJson { legs: self.legs.to_vec() }.serialize(serializer),
            (_, false) if self.hold_seconds.is_some() => {
                let mut tuple = serializer.serialize_tuple(3)?;
                tuple.serialize_element(HOLD_MARK)?;
                tuple.serialize_element(&self.legs[..])?;
                tuple.serialize_element(&self.hold_seconds.unwrap_or_default())?;
                tuple.end()
            }
            (Some(leg), false) => {
                let mut tuple = serializer.serialize_tuple(3)?;
                tuple.serialize_element(&leg.from)?;
                tuple.serialize_element(&leg.to)?;
                tuple.serialize_element(&leg.amount)?;
                tuple.end()
            }
            (None, false) => {
                let mut tuple = serializer.serialize_tuple(2)?;
                tuple.serialize_element("")?;
                tuple.serialize_element(&self.legs[..])?;
                tuple.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for Transfer {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        if deserializer.is_human_readable() {
            // A hold first: a plain leg would also read it, ignoring its hold fields.
            #[derive(Deserialize)]
            #[serde(untagged)]
            enum Json {
                Hold(HoldJson),
                One(Leg),
                Many(LegsJson),
            }
            return match Json::deserialize(deserializer)? {
                Json::Hold(h) if h.hold => {
                    Transfer::hold(h.from, h.to, h.amount, h.expires_in_s).map_err(D::Error::custom)
                }
                Json::Hold(h) => Ok(Transfer::one(h.from, h.to, h.amount)),
                Json::One(leg) => Ok(Transfer::one(leg.from, leg.to, leg.amount)),
                Json::Many(many) => Transfer::new(many.legs).map_err(D::Error::custom),
            };
        }
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Transfer;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a transfer: from, to and amount, or an empty string and legs")
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Transfer, A::Error> {
                let missing = || A::Error::custom("a transfer ends too early");
                let first: String = seq.next_element()?.ok_or_else(missing)?;
                if first.is_empty() {
                    let legs: Vec<Leg> = seq.next_element()?.ok_or_else(missing)?;
                    return Transfer::new(legs).map_err(A::Error::custom);
                }
                if first == HOLD_MARK {
                    let legs: Vec<Leg> = seq.next_element()?.ok_or_else(missing)?;
                    let seconds: u32 = seq.next_element()?.ok_or_else(missing)?;
                    return Transfer::with_hold(legs, seconds).map_err(A::Error::custom);
                }
                let from = AccountId::new(first).map_err(A::Error::custom)?;
                let to: AccountId = seq.next_element()?.ok_or_else(missing)?;
                let amount: Amount = seq.next_element()?.ok_or_else(missing)?;
                Ok(Transfer::one(from, to, amount))
            }
        }
        deserializer.deserialize_tuple(3, Visitor)
    }
}

/// One signed change to one account: negative debits, positive credits.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Posting {
    /// The account changed; its shard is the one the posting falls on.
    pub account: AccountId,
    /// The change in minor units.
    pub delta: i64,
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
    fn a_transfer_of_several_legs_posts_each_leg_on_its_shards() {
        let id = |s: &str| AccountId::new(s).expect("valid id");
        let amount = |n: i64| Amount::new(n).expect("positive");
        // alice and dave on shard 1, bob and carol on shard 0 (the pinned map above).
        let legs = vec![
            Leg { from: id("alice"), to: id("bob"), amount: amount(100) },
            Leg { from: id("alice"), to: id("dave"), amount: amount(2) },
            Leg { from: id("carol"), to: id("bob"), amount: amount(5) },
        ];
        let t = Transfer::new(legs).expect("three legs");
        assert_eq!(t.shards(2), vec![0, 1]);
        let on = |shard| {
            t.postings_with_legs(shard, 2)
                .into_iter()
                .map(|(leg, p)| (leg, p.account.to_string(), p.delta))
                .collect::<Vec<_>>()
        };
        assert_eq!(on(1), [(0, "alice".into(), -100), (1, "alice".into(), -2), (1, "dave".into(), 2)]);
        assert_eq!(on(0), [(0, "bob".into(), 100), (2, "carol".into(), -5), (2, "bob".into(), 5)]);
        for shard in 0..2 {
            let legs: Vec<Option<usize>> = t.postings_with_legs(shard, 2).iter().map(|(leg, _)| Some(*leg)).collect();
            assert_eq!(t.legs_of_postings(&t.postings_for(shard, 2)), legs, "shard {shard}");
        }
        let stranger = Posting { account: id("erin"), delta: 1 };
        assert_eq!(t.legs_of_postings(&[stranger]), vec![None]);
        let all: i64 = (0..2).flat_map(|s| t.postings_for(s, 2)).map(|p| p.delta).sum();
        assert_eq!(all, 0, "every leg's debit meets its credit");
        assert!(t.touches(&id("dave")) && !t.touches(&id("erin")));
        assert_eq!(t.single(), None);
        assert_eq!(t.to_string(), "alice->bob 100, alice->dave 2, carol->bob 5");
        assert_eq!(Transfer::new(Vec::new()), Err(LegsError::Count));
        let leg = Leg { from: id("a"), to: id("b"), amount: amount(1) };
        assert_eq!(Transfer::new(vec![leg; LEGS_MAX + 1]), Err(LegsError::Count));
    }

    #[test]
    fn postings_split_by_shard() {
        let id = |s: &str| AccountId::new(s).expect("valid id");
        let t = Transfer::one(id("alice"), id("bob"), Amount::new(7).expect("positive"));
        let all: Vec<Posting> = (0..2).flat_map(|s| t.postings_for(s, 2)).collect();
        assert_eq!(all.iter().map(|p| p.delta).sum::<i64>(), 0);
        assert_eq!(all.len(), 2);
        let one_shard = t.postings_for(0, 1);
        assert_eq!(one_shard.len(), 2);
        assert_eq!(t.shards(1), vec![0]);
    }
}
