//! The append-only journal of postings: every balance change of every account (account opening, each posting
//! of a committed transfer, heuristic decisions) with the balance after it and the time. Entries are written in
//! the same atomic batch as the change they describe and never edited. Each gets a sequence number, one counter
//! per shard, so the audit can tell exactly which commits a snapshot of the balances includes.
//!
//! Key layout (participant store, beside the protocol records):
//! - `j` account `\0` seq → [`JournalEntry`]: an account's entries in order;
//! - `c` transfer id → seq: the entry that applied a committed transfer here;
//! - `r` seq → transfer id: commits in the order they were applied.

use common::ledger::{AccountId, TransferId};
use common::records;
use serde::{Deserialize, Serialize};

pub const ENTRY: u8 = b'j';
pub const COMMIT_SEQ: u8 = b'c';
pub const COMMIT_ORDER: u8 = b'r';
/// Sum of all opening balances: money that entered the ledger.
pub const CREATED_TOTAL_KEY: &[u8] = b"mcreated_total";
/// `w` transfer id → name of the API token that submitted it, kept from Prepare until the commit is journaled.
pub const ACTOR: u8 = b'w';
/// `h` transfer id → [`HeuristicRecord`]: outcomes an operator forced here.
pub const HEURISTIC: u8 = b'h';

/// An outcome forced by an operator while the coordinator was unreachable; the audit compares it with the
/// coordinator's own decision, if one ever appears.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeuristicRecord {
    pub decision: common::wire::Decision,
    pub operator: String,
    pub at_unix_ms: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    /// The account was created with `amount`.
    Opened,
    /// One posting of a committed transfer.
    Posting,
    /// An operator forced the transfer's outcome here without the coordinator (see `heuristic` in the server).
    HeuristicCommit,
    HeuristicAbort,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalEntry {
    pub seq: u64,
    pub account: AccountId,
    pub kind: EntryKind,
    pub transfer_id: Option<TransferId>,
    /// Signed change of the balance (0 for a heuristic abort, which only releases a hold).
    pub amount: i64,
    pub balance_after: i64,
    pub at_unix_ms: u64,
    /// Who caused it: the API token's name for a transfer, the operator for a heuristic decision.
    pub actor: Option<String>,
}

/// The journal's counters; lives under the participant's state lock so entries are numbered in apply order.
#[derive(Debug, Default)]
pub struct JournalState {
    /// The next entry's sequence number.
    pub next_seq: u64,
    /// Sum of every opening balance.
    pub created_total: i128,
}

/// Key changes to add to the batch that makes the change: a value to insert, or `None` to remove the key.
pub type Inserts = Vec<(Vec<u8>, Option<Vec<u8>>)>;

impl JournalState {
    /// The last sequence number handed out (0 if none).
    pub fn last_seq(&self) -> u64 {
        self.next_seq.saturating_sub(1)
    }

    pub fn opened(&mut self, account: &AccountId, balance: i64, now: u64, out: &mut Inserts) {
        self.created_total += i128::from(balance);
        out.push((CREATED_TOTAL_KEY.to_vec(), Some(self.created_total.to_be_bytes().to_vec())));
        self.entry(account, EntryKind::Opened, None, balance, balance, now, None, out);
    }

    /// Journals the postings of a transfer applied here; `postings` holds (account, delta, balance after).
    #[allow(clippy::too_many_arguments)]
    pub fn applied(
        &mut self,
        id: TransferId,
        kind: EntryKind,
        postings: &[(AccountId, i64, i64)],
        actor: Option<&str>,
        now: u64,
        out: &mut Inserts,
    ) {
        let mut last = 0;
        for (account, delta, after) in postings {
            last = self.entry(account, kind, Some(id), *delta, *after, now, actor, out);
        }
        if matches!(kind, EntryKind::Posting | EntryKind::HeuristicCommit) {
            out.push((prefixed(COMMIT_SEQ, id.as_bytes()), Some(last.to_be_bytes().to_vec())));
            out.push((prefixed(COMMIT_ORDER, &last.to_be_bytes()), Some(id.as_bytes().to_vec())));
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn entry(
        &mut self,
        account: &AccountId,
        kind: EntryKind,
        transfer_id: Option<TransferId>,
        amount: i64,
        balance_after: i64,
        at_unix_ms: u64,
        actor: Option<&str>,
        out: &mut Inserts,
    ) -> u64 {
        let seq = self.next_seq.max(1);
        self.next_seq = seq + 1;
        let entry = JournalEntry {
            seq,
            account: account.clone(),
            kind,
            transfer_id,
            amount,
            balance_after,
            at_unix_ms,
            actor: actor.map(str::to_owned),
        };
        out.push((entry_key(account, seq), Some(records::encode(&entry))));
        seq
    }
}

pub fn account_prefix(account: &AccountId) -> Vec<u8> {
    let mut k = Vec::with_capacity(account.as_str().len() + 10);
    k.push(ENTRY);
    k.extend_from_slice(account.as_str().as_bytes());
    k.push(0); // never part of an account id: one account's prefix cannot match another's
    k
}

pub fn entry_key(account: &AccountId, seq: u64) -> Vec<u8> {
    let mut k = account_prefix(account);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

pub fn prefixed(prefix: u8, rest: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + rest.len());
    k.push(prefix);
    k.extend_from_slice(rest);
    k
}
