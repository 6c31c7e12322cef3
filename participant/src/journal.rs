//! The append-only journal of postings: every balance change of every account (account opening, each posting
//! of a committed transfer, heuristic decisions) with the balance after it and the time. Entries are written in
//! the same atomic batch as the change they describe and never edited. Each gets a sequence number, one counter
//! per shard, so the audit can tell exactly which commits a snapshot of the balances includes.
//!
//! Key layout (participant store, beside the protocol records):
//! - `j` account `\0` seq → [`JournalEntry`]: an account's entries in order;
//! - `mjournal_next_seq` → the next sequence number, so a restart need not scan the entries.
//!
//! The entry that applied a committed transfer here is named by its finished record (`commit_seq`). The audit's
//! "commits applied since seq S" comes from a bounded list of recent commits in memory: the audit asks about
//! the few milliseconds between two snapshots, so no key per commit is written for it.

use common::ledger::{AccountId, TransferId};
use common::records;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};

pub const ENTRY: u8 = b'j';
/// Sum of all opening balances: money that entered the ledger.
pub const CREATED_TOTAL_KEY: &[u8] = b"mcreated_total";
/// The journal's next sequence number, written with every batch that adds entries.
pub const NEXT_SEQ_KEY: &[u8] = b"mjournal_next_seq";
/// Recent commits kept in memory for the audit (about 4 MB): at 10,000 commits/s, the last 13 s.
pub const RECENT_COMMITS_MAX: usize = 131_072;
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
    /// One posting of a committed transfer of several legs, from the leg at this index. After the kinds before
    /// it, so that the entries written before it existed read as they did.
    LegPosting {
        leg: u8,
    },
    /// A hold granted here: `amount` is reserved (debit) or promised (credit); the balance does not change.
    Hold,
    /// The captured part of a hold, moved.
    Capture,
    /// A hold released or expired: nothing moved (amount 0).
    Release,
}

impl EntryKind {
    /// The entry records a commit (its transfer's money moved here).
    pub fn is_commit(self) -> bool {
        matches!(
            self,
            EntryKind::Posting | EntryKind::HeuristicCommit | EntryKind::LegPosting { .. } | EntryKind::Capture
        )
    }
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
    /// Who caused it: the API token's name for a transfer, the operator for a heuristic decision. The JSON
    /// of an entry also carries it as `actor`, its name before this one (see `books::entries`).
    pub made_by: Option<String>,
}

/// The journal's counters; lives under the participant's state lock so entries are numbered in apply order.
#[derive(Debug, Default)]
pub struct JournalState {
    /// The next entry's sequence number.
    pub next_seq: u64,
    /// Sum of every opening balance.
    pub created_total: i128,
    /// (seq, transfer) of the latest commits applied since start, oldest first, at most `RECENT_COMMITS_MAX`.
    recent_commits: VecDeque<(u64, TransferId)>,
    /// The last sequence number before the oldest commit `recent_commits` may be missing: commits after it
    /// are all listed.
    recent_from: u64,
}

/// Changes to add to the batch that makes the change.
#[derive(Debug, Default)]
pub struct Inserts {
    /// A value to insert, or `None` to remove the key.
    pub keys: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    /// The journal sequence number of each commit journaled, for its finished record.
    pub commit_seqs: HashMap<TransferId, u64>,
    /// The journal's next sequence number, if entries were added.
    pub next_seq: Option<u64>,
    /// The money created so far, if accounts were opened (written once per batch, however many).
    pub created_total: Option<i128>,
}

impl Inserts {
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.commit_seqs.is_empty() && self.next_seq.is_none() && self.created_total.is_none()
    }
}

/// The recent-commits list no longer reaches back to the sequence number asked about.
#[derive(Debug, thiserror::Error)]
#[error("commits after journal seq {after} are no longer listed here (the list starts after seq {from}); take a new snapshot")]
pub struct TooOld {
    pub after: u64,
    pub from: u64,
}

impl JournalState {
    pub fn new(next_seq: u64, created_total: i128) -> Self {
        let next_seq = next_seq.max(1);
        JournalState { next_seq, created_total, recent_commits: VecDeque::new(), recent_from: next_seq - 1 }
    }

    /// Commits listed in memory for the audit (at most [`RECENT_COMMITS_MAX`]).
    pub fn recent_commits_len(&self) -> usize {
        self.recent_commits.len()
    }

    /// The last sequence number handed out (0 if none).
    pub fn last_seq(&self) -> u64 {
        self.next_seq.saturating_sub(1)
    }

    /// Transfers committed here with a sequence number in `(after, upto]`, in apply order.
    pub fn commits_between(&self, after: u64, upto: u64) -> Result<Vec<TransferId>, TooOld> {
        if after >= upto {
            return Ok(Vec::new());
        }
        if after < self.recent_from {
            return Err(TooOld { after, from: self.recent_from });
        }
        Ok(self.recent_commits.iter().filter(|(seq, _)| *seq > after && *seq <= upto).map(|(_, id)| *id).collect())
    }

    fn remember_commit(&mut self, seq: u64, id: TransferId) {
        if self.recent_commits.len() == RECENT_COMMITS_MAX {
            if let Some((oldest, _)) = self.recent_commits.pop_front() {
                self.recent_from = oldest;
            }
        }
        self.recent_commits.push_back((seq, id));
    }

    pub fn opened(&mut self, account: &AccountId, balance: i64, now: u64, out: &mut Inserts) {
        self.created_total += i128::from(balance);
        out.created_total = Some(self.created_total);
        self.entry(account, EntryKind::Opened, None, balance, balance, now, None, out);
    }

    /// Journals the postings of a transfer applied here; `postings` holds (kind, account, delta, balance after).
    pub fn applied(
        &mut self,
        id: TransferId,
        postings: &[(EntryKind, AccountId, i64, i64)],
        made_by: Option<&str>,
        now: u64,
        out: &mut Inserts,
    ) {
        let mut last = 0;
        for (kind, account, delta, after) in postings {
            last = self.entry(account, *kind, Some(id), *delta, *after, now, made_by, out);
        }
        if postings.last().is_some_and(|(kind, ..)| kind.is_commit()) {
            out.commit_seqs.insert(id, last);
            self.remember_commit(last, id);
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
        made_by: Option<&str>,
        out: &mut Inserts,
    ) -> u64 {
        let seq = self.next_seq.max(1);
        self.next_seq = seq + 1;
        out.next_seq = Some(self.next_seq);
        let entry = JournalEntry {
            seq,
            account: account.clone(),
            kind,
            transfer_id,
            amount,
            balance_after,
            at_unix_ms,
            made_by: made_by.map(str::to_owned),
        };
        out.keys.push((entry_key(account, seq), Some(records::encode(&entry))));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_commits_answer_since_start_and_refuse_older_snapshots() {
        let mut state = JournalState::new(11, 0);
        let account = AccountId::new("alice").expect("valid");
        let (a, b) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
        let mut out = Inserts::default();
        state.applied(a, &[(EntryKind::Posting, account.clone(), 5, 5)], None, 0, &mut out);
        state.applied(b, &[(EntryKind::Posting, account, -5, 0)], None, 0, &mut out);
        assert_eq!(out.commit_seqs.get(&a), Some(&11));
        assert_eq!(out.next_seq, Some(13));
        assert_eq!(state.commits_between(10, 12).expect("listed"), vec![a, b]);
        assert_eq!(state.commits_between(11, 12).expect("listed"), vec![b]);
        assert_eq!(state.commits_between(12, 12).expect("nothing after the last"), Vec::<TransferId>::new());
        // Seq 10 was handed out before this start: what came after it up to 10 is unknown here.
        let err = state.commits_between(9, 12).expect_err("from before the start");
        assert_eq!((err.after, err.from), (9, 10));
    }

    /// The size `ARCHITECTURE.md` gives for a journal entry (an account of 11 characters, a token name of 6, the
    /// millionth posting, a time of 2026), in layout 5 and in the fixed-width body before it.
    #[test]
    fn a_journal_entry_takes_about_half_the_bytes_in_layout_5() {
        let entry = JournalEntry {
            seq: 1_000_000,
            account: AccountId::new("acct-000123").expect("valid"),
            kind: EntryKind::Posting,
            transfer_id: Some(uuid::Uuid::new_v4()),
            amount: -250,
            balance_after: 999_750,
            at_unix_ms: 1_796_000_000_000,
            made_by: Some("loadgen".into()),
        };
        let fixed = 1 + bincode::serialize(&entry).expect("serialises").len();
        assert_eq!((records::encode(&entry).len(), fixed), (63, 97));
        assert_eq!(entry_key(&entry.account, entry.seq).len(), 21);
    }
}
