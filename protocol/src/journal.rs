//! The journal of postings, as the participant's core computes it: every balance change of every account
//! (an opening, each posting of a committed transfer, a hold and its end, a heuristic decision) with the balance
//! after it. Entries are [`Write::Journal`]s in the same write group as the change they describe. Each gets a
//! sequence number, one counter per shard, so that the audit can tell exactly which commits a snapshot of the
//! balances includes.
//!
//! The audit's "commits applied since seq S" comes from a bounded list of recent commits in memory: the audit
//! asks about the few milliseconds between two snapshots, so no key per commit is written for it.

use crate::ledger::{AccountId, TransferId};
use crate::msg::Decision;
use crate::participant::{ParticipantMachine, Write};
use crate::state::{EntryKind, HeuristicRecord, JournalEntry, PreparedRecord};
use std::collections::{HashMap, VecDeque};

/// Recent commits kept in memory for the audit (about 4 MB): at 10,000 commits/s, the last 13 s.
pub const RECENT_COMMITS_MAX: usize = 131_072;

/// One line of a transfer's journal: (kind, account, amount, balance after).
pub type Line = (EntryKind, AccountId, i64, i64);

/// The journal's counters; lives beside the machine, so entries are numbered in apply order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JournalState {
    /// The next entry's sequence number.
    next_seq: u64,
    /// The next sequence number last handed out as a write: written once per write group.
    next_seq_written: u64,
    /// Sum of every opening balance.
    created_total: i128,
    /// `created_total` changed since it was last handed out as a write.
    created_total_changed: bool,
    /// (seq, transfer) of the latest commits applied since start, oldest first, at most `RECENT_COMMITS_MAX`.
    recent_commits: VecDeque<(u64, TransferId)>,
    /// The last sequence number before the oldest commit `recent_commits` may be missing: commits after it
    /// are all listed.
    recent_from: u64,
}

/// The recent-commits list no longer reaches back to the sequence number asked about.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "commits after journal seq {after} are no longer listed here (the list starts after seq {from}); take a new \
     snapshot"
)]
pub struct TooOld {
    /// The sequence number asked about.
    pub after: u64,
    /// Where the list starts: commits after this seq are all listed.
    pub from: u64,
}

impl JournalState {
    /// The journal as the store left it: its next sequence number and the money created so far.
    pub fn new(next_seq: u64, created_total: i128) -> Self {
        let next_seq = next_seq.max(1);
        JournalState {
            next_seq,
            next_seq_written: next_seq,
            created_total,
            created_total_changed: false,
            recent_commits: VecDeque::new(),
            recent_from: next_seq - 1,
        }
    }

    /// Commits listed in memory for the audit (at most [`RECENT_COMMITS_MAX`]).
    pub fn recent_commits_len(&self) -> usize {
        self.recent_commits.len()
    }

    /// The last sequence number handed out (0 if none).
    pub fn last_seq(&self) -> u64 {
        self.next_seq.saturating_sub(1)
    }

    /// The sum of every opening balance.
    pub fn created_total(&self) -> i128 {
        self.created_total
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

    /// Journals an account opened with `balance`.
    pub fn opened(&mut self, account: &AccountId, balance: i64, now: u64, writes: &mut Vec<Write>) {
        self.created_total += i128::from(balance);
        self.created_total_changed = true;
        self.entry(account, EntryKind::Opened, None, balance, balance, now, None, writes);
    }

    /// Journals the lines of a transfer applied here.
    pub fn applied(
        &mut self,
        id: TransferId,
        lines: &[Line],
        made_by: Option<&str>,
        now: u64,
        writes: &mut Vec<Write>,
    ) {
        let mut last = 0;
        for (kind, account, amount, after) in lines {
            last = self.entry(account, *kind, Some(id), *amount, *after, now, made_by, writes);
        }
        if lines.last().is_some_and(|(kind, ..)| kind.is_commit()) {
            self.remember_commit(last, id);
        }
    }

    /// The counters' writes, if they changed since last asked: once per write group, however many entries.
    pub fn counters(&mut self, writes: &mut Vec<Write>) {
        if self.next_seq != self.next_seq_written {
            self.next_seq_written = self.next_seq;
            writes.push(Write::JournalNextSeq(self.next_seq));
        }
        if std::mem::take(&mut self.created_total_changed) {
            writes.push(Write::CreatedTotal(self.created_total));
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
        writes: &mut Vec<Write>,
    ) -> u64 {
        let seq = self.next_seq.max(1);
        self.next_seq = seq + 1;
        writes.push(Write::Journal(JournalEntry {
            seq,
            account: account.clone(),
            kind,
            transfer_id,
            amount,
            balance_after,
            at_unix_ms,
            made_by: made_by.map(str::to_owned),
        }));
        seq
    }
}

/// The journal of a decision just applied to a prepared transfer (`record`, as the decision settled it): an
/// entry per posting for a commit, per account with amount 0 for a heuristic abort (so the operator's act is on
/// record) or a hold's release, none for a plain abort. `operator` names who forced a heuristic decision, which
/// also gets its own record for the audit.
#[allow(clippy::too_many_arguments)]
pub fn journal_decision(
    machine: &ParticipantMachine,
    journal: &mut JournalState,
    id: TransferId,
    decision: Decision,
    record: &PreparedRecord,
    operator: Option<&str>,
    now: u64,
    writes: &mut Vec<Write>,
) {
    let postings = &record.postings;
    let hold = record.transfer.hold_seconds().is_some();
    let kind = match (operator, decision) {
        (None, Decision::Commit) if hold => EntryKind::Capture,
        (None, Decision::Abort) if hold => EntryKind::Release,
        (None, Decision::Commit) => EntryKind::Posting,
        (None, Decision::Abort) => return,
        (Some(_), Decision::Commit) => EntryKind::HeuristicCommit,
        (Some(_), Decision::Abort) => EntryKind::HeuristicAbort,
    };
    // A commit of several legs names each entry's leg.
    let legs = match kind {
        EntryKind::Posting if record.transfer.single().is_none() => record.transfer.legs_of_postings(postings),
        _ => Vec::new(),
    };
    // The decision is applied: walk back from each account's balance now, so that an account posted twice shows
    // its balance after each posting.
    let mut balance: HashMap<&AccountId, i64> = HashMap::new();
    let mut lines: Vec<Line> = postings
        .iter()
        .enumerate()
        .rev()
        .map(|(index, p)| {
            let amount = if decision == Decision::Commit { p.delta } else { 0 };
            let now = balance.entry(&p.account).or_insert_with(|| machine.account(&p.account).map_or(0, |a| a.balance));
            let after = *now;
            *now = now.saturating_sub(amount);
            let leg = legs.get(index).copied().flatten().and_then(|leg| u8::try_from(leg).ok());
            let kind = leg.map_or(kind, |leg| EntryKind::LegPosting { leg });
            (kind, p.account.clone(), amount, after)
        })
        .collect();
    lines.reverse();
    journal.applied(id, &lines, operator.or(record.made_by.as_deref()), now, writes);
    if let Some(operator) = operator {
        let record = HeuristicRecord { decision, operator: operator.to_owned(), at_unix_ms: now };
        writes.push(Write::Heuristic(id, record));
    }
}

/// The journal of a hold just granted here (`record`, prepared): an entry per posting, for what it reserves or
/// promises; the balance is unchanged. A transfer's prepare is not journaled: only its outcome is.
pub fn journal_hold(
    machine: &ParticipantMachine,
    journal: &mut JournalState,
    id: TransferId,
    record: &PreparedRecord,
    now: u64,
    writes: &mut Vec<Write>,
) {
    let lines: Vec<Line> = record
        .postings
        .iter()
        .map(|p| {
            let balance = machine.account(&p.account).map_or(0, |a| a.balance);
            (EntryKind::Hold, p.account.clone(), p.delta, balance)
        })
        .collect();
    journal.applied(id, &lines, record.made_by.as_deref(), now, writes);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(writes: &[Write]) -> Vec<&JournalEntry> {
        writes.iter().filter_map(|w| if let Write::Journal(e) = w { Some(e) } else { None }).collect()
    }

    #[test]
    fn recent_commits_answer_since_start_and_refuse_older_snapshots() {
        let mut state = JournalState::new(11, 0);
        let account = AccountId::new("alice").expect("valid");
        let (a, b) = (TransferId::from_u128(1), TransferId::from_u128(2));
        let mut out = Vec::new();
        state.applied(a, &[(EntryKind::Posting, account.clone(), 5, 5)], None, 0, &mut out);
        state.applied(b, &[(EntryKind::Posting, account, -5, 0)], None, 0, &mut out);
        assert_eq!(entries(&out).iter().map(|e| e.seq).collect::<Vec<_>>(), vec![11, 12]);
        state.counters(&mut out);
        assert_eq!(out.last(), Some(&Write::JournalNextSeq(13)));
        assert_eq!(state.commits_between(10, 12).expect("listed"), vec![a, b]);
        assert_eq!(state.commits_between(11, 12).expect("listed"), vec![b]);
        assert_eq!(state.commits_between(12, 12).expect("nothing after the last"), Vec::<TransferId>::new());
        // Seq 10 was handed out before this start: what came after it up to 10 is unknown here.
        let err = state.commits_between(9, 12).expect_err("from before the start");
        assert_eq!((err.after, err.from), (9, 10));
    }

    #[test]
    fn the_counters_are_written_once_per_group_and_only_when_they_change() {
        let mut state = JournalState::new(1, 0);
        let mut out = Vec::new();
        state.counters(&mut out);
        assert!(out.is_empty(), "nothing changed");
        let alice = AccountId::new("alice").expect("valid");
        state.opened(&alice, 7, 0, &mut out);
        state.opened(&AccountId::new("bob").expect("valid"), 3, 0, &mut out);
        state.counters(&mut out);
        let counters: Vec<&Write> =
            out.iter().filter(|w| matches!(w, Write::JournalNextSeq(_) | Write::CreatedTotal(_))).collect();
        assert_eq!(counters, vec![&Write::JournalNextSeq(3), &Write::CreatedTotal(10)]);
    }
}
