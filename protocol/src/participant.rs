//! A participant's protocol state: accounts, prepared (in-doubt) transfers, and the decisions of the transfers
//! it finished recently. Older decisions stay in the shard's store, which the machine reads through
//! [`FinishedLog`]: no set in memory grows with the transfers ever seen.
//!
//! Every method changes the in-memory state and appends the matching [`Write`]s; the caller must make those
//! writes durable, in order and atomically per call batch, before it tells anyone the result. The machine
//! holds these invariants, checked by [`ParticipantMachine::check_invariants`]:
//! - an account's `held` is the sum of the debits of its prepared transfers, `incoming` the sum of the credits;
//! - `held <= balance + overdraft_limit`, so no balance can go below `-overdraft_limit` at commit, and
//!   `balance + incoming <= i64::MAX`;
//! - a transfer id is prepared, or finished, or unknown: never two of these; a finished id never changes.

use crate::ledger::{AccountId, ShardId, TransferId};
use crate::msg::{DecideAck, Decision, PrepareItem, RefusalReason, Vote};
use crate::state::{AccountRecord, HeuristicRecord, JournalEntry, PreparedRecord};
use std::collections::{BTreeMap, HashMap, VecDeque};

/// Decisions a machine keeps in memory once the store has them too (about 200 KB), so that a repeated
/// Commit or Abort, re-sent when a link comes back, rarely needs a store lookup.
pub const RECENT_FINISHED_MAX: usize = 4_096;

/// The shard's store as the machine reads it: the decision of a transfer finished here, if any. It must see
/// every write the shell has applied, durable or not; the machine keeps each decision it makes in memory
/// until the shell says the writes are applied ([`ParticipantMachine::writes_applied`]). A store that cannot
/// be read is the shell's to handle (the server stops and recovers from disk), so the answer is plain.
pub trait FinishedLog {
    /// The decision finished here for `id`, or `None` if the store has none.
    fn decision(&self, id: &TransferId) -> Option<Decision>;
}

impl FinishedLog for BTreeMap<TransferId, Decision> {
    fn decision(&self, id: &TransferId) -> Option<Decision> {
        self.get(id).copied()
    }
}

/// A store that has finished nothing yet.
pub struct NothingFinished;

impl FinishedLog for NothingFinished {
    fn decision(&self, _: &TransferId) -> Option<Decision> {
        None
    }
}

/// A change the caller must persist.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write {
    /// An account was created or its balance changed (a commit). Its `held` and `incoming` are not durable
    /// state: [`ParticipantMachine::restore`] derives them from the prepared records.
    Account(AccountId, AccountRecord),
    /// The shard voted YES on a transfer: what it holds, kept until the decision comes.
    Prepared(TransferId, PreparedRecord),
    /// A decision settled the prepared transfer, so its record goes.
    ClearPrepared(TransferId),
    /// A transfer is over here, for good: what a late Prepare or decision is checked against.
    Finished(TransferId, Decision),
    /// An entry of the journal (see [`crate::journal`]); a commit's entries name the transfer, and the last of
    /// them is the journal seq its finished record keeps.
    Journal(JournalEntry),
    /// The journal's next sequence number, once per write group that added entries.
    JournalNextSeq(u64),
    /// The sum of every opening balance: money that entered the ledger.
    CreatedTotal(i128),
    /// An outcome an operator forced here.
    Heuristic(TransferId, HeuristicRecord),
}

/// Why an account could not be opened.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CreateError {
    /// An account of that id is already open here; opening never overwrites a balance.
    #[error("account already exists")]
    Exists,
}

/// A broken invariant, found in a state read back from disk or in a check of the running one.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RestoreError {
    /// An account's `held` or `incoming` differs from what its prepared transfers add up to.
    #[error("account {account}: stored {field} is {stored}, but the prepared transfers add up to {derived}")]
    HoldMismatch {
        /// The account whose sum is wrong.
        account: AccountId,
        /// Which sum: `"held"` or `"incoming"`.
        field: &'static str,
        /// The sum the account has.
        stored: i64,
        /// The sum its prepared transfers give.
        derived: i64,
    },
    /// A prepared transfer has a posting on an account this shard does not have.
    #[error("prepared transfer {0} names account {1}, which does not exist")]
    MissingAccount(TransferId, AccountId),
    /// A transfer is both in doubt and finished: a decision was applied without clearing its prepared record.
    #[error("transfer {0} is both prepared and finished")]
    PreparedAndFinished(TransferId),
    /// An account's balance, `held` or overdraft limit is out of bounds, or its sums overflow.
    #[error("account {0} breaks 0 <= held <= balance + overdraft_limit")]
    BadBalance(AccountId),
    /// The running [`Totals`] drifted from the accounts they sum.
    #[error("the sums kept over the accounts differ from a fresh sum")]
    TotalsMismatch,
}

/// One shard's protocol state: its accounts and its prepared transfers, with the decisions it made recently.
#[derive(Debug)]
pub struct ParticipantMachine {
    shard: ShardId,
    /// Ordered, so that a page of accounts is a range, not a scan of them all.
    accounts: BTreeMap<AccountId, AccountRecord>,
    prepared: HashMap<TransferId, PreparedRecord>,
    recent: Recent,
    totals: Totals,
}

/// Sums over every account, kept up to date with each change, so that an audit reads them without a pass
/// over the accounts (a pass over a million takes tens of milliseconds under the state lock).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// The money in every account, in minor units.
    pub balance: i128,
    /// What the prepared debits hold.
    pub held: i128,
    /// What the prepared credits are promised.
    pub incoming: i128,
    /// Accounts whose balance is below minus their overdraft limit (none, while the invariants hold).
    pub below_floor: u64,
}

impl Totals {
    fn of<'a>(accounts: impl Iterator<Item = &'a AccountRecord>) -> Totals {
        let mut totals = Totals::default();
        for record in accounts {
            totals.add(record);
        }
        totals
    }

    fn add(&mut self, r: &AccountRecord) {
        self.balance += i128::from(r.balance);
        self.held += i128::from(r.held);
        self.incoming += i128::from(r.incoming);
        self.below_floor += u64::from(r.below_floor());
    }

    fn remove(&mut self, r: &AccountRecord) {
        self.balance -= i128::from(r.balance);
        self.held -= i128::from(r.held);
        self.incoming -= i128::from(r.incoming);
        self.below_floor -= u64::from(r.below_floor());
    }
}

/// The decisions made here that the store may not have yet, and up to `max` more: oldest first in `order`,
/// whose newest `unapplied` entries are not yet applied to the store.
#[derive(Debug)]
struct Recent {
    decisions: HashMap<TransferId, Decision>,
    order: VecDeque<TransferId>,
    unapplied: usize,
    max: usize,
}

impl Recent {
    fn new(max: usize) -> Self {
        Recent { decisions: HashMap::new(), order: VecDeque::new(), unapplied: 0, max }
    }

    fn insert(&mut self, id: TransferId, decision: Decision) {
        let earlier = self.decisions.insert(id, decision);
        debug_assert!(earlier.is_none(), "a finished transfer is never finished again");
        self.order.push_back(id);
        self.unapplied += 1;
        self.trim();
    }

    fn applied(&mut self) {
        self.unapplied = 0;
        self.trim();
    }

    /// Forgets the oldest decisions the store already has, beyond `max`.
    fn trim(&mut self) {
        while self.order.len() > self.max.max(self.unapplied) {
            let Some(id) = self.order.pop_front() else { break };
            self.decisions.remove(&id);
        }
    }
}

impl ParticipantMachine {
    /// The state of a new shard: no accounts, nothing prepared.
    pub fn new(shard: ShardId) -> Self {
        ParticipantMachine {
            shard,
            accounts: BTreeMap::new(),
            prepared: HashMap::new(),
            recent: Recent::new(RECENT_FINISHED_MAX),
            totals: Totals::default(),
        }
    }

    /// Keeps at most `max` decisions in memory once the store has them (the simulator uses a few, so that
    /// most lookups reach its store).
    pub fn with_recent_finished_max(mut self, max: usize) -> Self {
        self.recent.max = max;
        self.recent.trim();
        self
    }

    /// Rebuilds the state read back from disk, refusing a state that breaks an invariant. Only the accounts'
    /// balances are read: their `held` and `incoming` are recomputed from `prepared`. Finished transfers are
    /// not read: they stay in the store, behind [`FinishedLog`].
    pub fn restore(
        shard: ShardId,
        mut accounts: BTreeMap<AccountId, AccountRecord>,
        prepared: HashMap<TransferId, PreparedRecord>,
    ) -> Result<Self, RestoreError> {
        for record in accounts.values_mut() {
            record.held = 0;
            record.incoming = 0;
        }
        for (id, p) in &prepared {
            for posting in &p.postings {
                let record = accounts
                    .get_mut(&posting.account)
                    .ok_or(RestoreError::MissingAccount(*id, posting.account.clone()))?;
                if posting.delta < 0 {
                    record.held = record
                        .held
                        .checked_add(-posting.delta)
                        .ok_or(RestoreError::BadBalance(posting.account.clone()))?;
                } else {
                    record.incoming = record
                        .incoming
                        .checked_add(posting.delta)
                        .ok_or(RestoreError::BadBalance(posting.account.clone()))?;
                }
            }
        }
        let totals = Totals::of(accounts.values());
        let machine = ParticipantMachine { accounts, prepared, totals, ..ParticipantMachine::new(shard) };
        machine.verify()?;
        Ok(machine)
    }

    /// The shard this state belongs to.
    pub fn shard(&self) -> ShardId {
        self.shard
    }

    /// The account of id `id`, if this shard has it.
    pub fn account(&self, id: &AccountId) -> Option<AccountRecord> {
        self.accounts.get(id).copied()
    }

    /// How many accounts this shard has.
    pub fn accounts_len(&self) -> usize {
        self.accounts.len()
    }

    /// Every account, in id order.
    pub fn accounts(&self) -> impl Iterator<Item = (&AccountId, &AccountRecord)> {
        self.accounts.iter()
    }

    /// The accounts whose id sorts after `after` (all of them for `None`), in id order.
    pub fn accounts_after(&self, after: Option<&str>) -> impl Iterator<Item = (&AccountId, &AccountRecord)> {
        use std::ops::Bound;
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        self.accounts.range::<str, _>((start, Bound::Unbounded))
    }

    /// The transfers in doubt here, in no particular order.
    pub fn prepared(&self) -> impl Iterator<Item = (&TransferId, &PreparedRecord)> {
        self.prepared.iter()
    }

    /// The prepared record of `id`, if it is in doubt here.
    pub fn prepared_transfer(&self, id: &TransferId) -> Option<&PreparedRecord> {
        self.prepared.get(id)
    }

    /// The decision of a transfer finished here: from memory if recent, else from the store.
    pub fn finished_decision(&self, id: &TransferId, log: &dyn FinishedLog) -> Option<Decision> {
        match self.recent.decisions.get(id) {
            Some(decision) => Some(*decision),
            None => log.decision(id),
        }
    }

    /// The shell has applied every write handed out so far to the store that its [`FinishedLog`] reads.
    pub fn writes_applied(&mut self) {
        self.recent.applied();
    }

    /// The decisions held in memory: bounded by [`RECENT_FINISHED_MAX`] plus those not yet applied.
    pub fn recent_finished(&self) -> impl Iterator<Item = (&TransferId, &Decision)> {
        self.recent.decisions.iter()
    }

    /// What is wrong with the state, if anything, found in a pass over every account (`check_invariants`
    /// panics instead).
    pub fn violation(&self) -> Option<String> {
        self.verify().err().map(|e| e.to_string())
    }

    /// The sums over every account.
    pub fn totals(&self) -> Totals {
        self.totals
    }

    /// What the prepared transfers say the holds add up to, against the sums over the accounts: the audit's
    /// check, in a pass over the transfers in doubt rather than over every account. The per-account check
    /// ([`Self::violation`]) runs at every restart and, in the simulator, after every step.
    pub fn holds_violation(&self) -> Option<String> {
        let (mut held, mut incoming) = (0i128, 0i128);
        for posting in self.prepared.values().flat_map(|p| &p.postings) {
            if posting.delta < 0 {
                held -= i128::from(posting.delta);
            } else {
                incoming += i128::from(posting.delta);
            }
        }
        let totals = self.totals;
        if (held, incoming) != (totals.held, totals.incoming) {
            return Some(format!(
                "the accounts hold {} and expect {} in credits, but the prepared transfers add up to {held} and {incoming}",
                totals.held, totals.incoming
            ));
        }
        if totals.below_floor > 0 {
            return Some(format!("{} accounts have a balance below their overdraft limit", totals.below_floor));
        }
        None
    }

    /// Opens an account with no overdraft: its balance never goes below zero.
    pub fn create_account(&mut self, id: AccountId, balance: i64, writes: &mut Vec<Write>) -> Result<(), CreateError> {
        self.create_account_with_limit(id, balance, 0, writes)
    }

    /// Opens an account whose balance may go down to `-overdraft_limit`.
    pub fn create_account_with_limit(
        &mut self,
        id: AccountId,
        balance: i64,
        overdraft_limit: i64,
        writes: &mut Vec<Write>,
    ) -> Result<(), CreateError> {
        assert!(
            balance >= 0 && overdraft_limit >= 0,
            "balances and limits are validated before they reach the machine"
        );
        if self.accounts.contains_key(&id) {
            return Err(CreateError::Exists);
        }
        let record = AccountRecord { balance, held: 0, incoming: 0, overdraft_limit };
        self.accounts.insert(id.clone(), record);
        self.totals.add(&record);
        writes.push(Write::Account(id, record));
        Ok(())
    }

    /// Phase one. YES reserves the debits (holds) and the credits' headroom; NO changes nothing.
    pub fn prepare(
        &mut self,
        item: &PrepareItem,
        now_unix_ms: u64,
        log: &dyn FinishedLog,
        writes: &mut Vec<Write>,
    ) -> Vote {
        self.prepare_by(item, None, now_unix_ms, log, writes)
    }

    /// [`Self::prepare`], recording who submitted the transfer (kept in its prepared record until the decision).
    pub fn prepare_by(
        &mut self,
        item: &PrepareItem,
        made_by: Option<String>,
        now_unix_ms: u64,
        log: &dyn FinishedLog,
        writes: &mut Vec<Write>,
    ) -> Vote {
        if let Some(prepared) = self.prepared.get(&item.id) {
            // YES to another body would commit this shard's old postings beside the other shards' new ones.
            let same = prepared.transfer == item.transfer && prepared.postings == item.postings;
            return if same { Vote::Yes } else { Vote::no(RefusalReason::IdInUse) };
        }
        match self.finished_decision(&item.id, log) {
            // Only a YES can have led to a commit, so repeating it is the truthful answer.
            Some(Decision::Commit) => return Vote::Yes,
            Some(Decision::Abort) => return Vote::no(RefusalReason::AlreadyAborted),
            None => {}
        }
        assert!(!item.postings.is_empty(), "the coordinator only prepares shards with postings");

        // Work on copies so a refusal leaves no trace; a transfer may touch an account more than once.
        let mut touched: Vec<(AccountId, AccountRecord)> = Vec::with_capacity(item.postings.len());
        for (index, posting) in item.postings.iter().enumerate() {
            let current = match touched.iter().find(|(id, _)| *id == posting.account) {
                Some((_, record)) => *record,
                None => match self.accounts.get(&posting.account) {
                    Some(record) => *record,
                    None => return Vote::no_at(RefusalReason::AccountNotFound, index),
                },
            };
            let next = match apply_hold(current, posting.delta) {
                Ok(next) => next,
                Err(reason) => return Vote::no_at(reason, index),
            };
            match touched.iter_mut().find(|(id, _)| *id == posting.account) {
                Some((_, record)) => *record = next,
                None => touched.push((posting.account.clone(), next)),
            }
        }
        // No account write: the holds follow from the prepared record (see `restore`).
        for (id, record) in touched {
            if let Some(old) = self.accounts.insert(id, record) {
                self.totals.remove(&old);
            }
            self.totals.add(&record);
        }
        let record = PreparedRecord {
            transfer: item.transfer.clone(),
            postings: item.postings.clone(),
            coordinator_url: item.coordinator_url.clone(),
            prepared_at_unix_ms: now_unix_ms,
            made_by,
        };
        self.prepared.insert(item.id, record.clone());
        writes.push(Write::Prepared(item.id, record));
        Vote::Yes
    }

    /// Phase two. Commit applies the postings and releases the holds; abort only releases them. Both are
    /// idempotent; an abort of an unknown id leaves a tombstone so a late Prepare of it is refused.
    pub fn decide(
        &mut self,
        id: TransferId,
        decision: Decision,
        log: &dyn FinishedLog,
        writes: &mut Vec<Write>,
    ) -> DecideAck {
        self.settle(id, decision, log, writes).0
    }

    /// [`Self::decide`], also handing back the prepared record this decision settled, if it settled one.
    pub fn settle(
        &mut self,
        id: TransferId,
        decision: Decision,
        log: &dyn FinishedLog,
        writes: &mut Vec<Write>,
    ) -> (DecideAck, Option<PreparedRecord>) {
        self.finish(id, decision, None, log, writes)
    }

    /// Captures `amount` of the hold `id`: a commit that moves that much (1 up to the held amount) and
    /// releases the rest. Handed back, the record's postings are the amounts moved. Idempotent as a commit is;
    /// a capture of something that is not a hold, or of more than it holds, is refused.
    pub fn capture(
        &mut self,
        id: TransferId,
        amount: i64,
        log: &dyn FinishedLog,
        writes: &mut Vec<Write>,
    ) -> (DecideAck, Option<PreparedRecord>) {
        if let Some(prepared) = self.prepared.get(&id) {
            let held = prepared.transfer.single().map_or(0, |leg| leg.amount.minor());
            if prepared.transfer.hold_seconds().is_none() || !(1..=held).contains(&amount) {
                return (DecideAck::Refused, None);
            }
        }
        self.finish(id, Decision::Commit, Some(amount), log, writes)
    }

    /// Settles `id`: an abort releases its reservations; a commit applies its postings, or `captured` of each
    /// (signed as the posting) when the commit captures part of a hold.
    fn finish(
        &mut self,
        id: TransferId,
        decision: Decision,
        captured: Option<i64>,
        log: &dyn FinishedLog,
        writes: &mut Vec<Write>,
    ) -> (DecideAck, Option<PreparedRecord>) {
        if captured.is_none() && decision == Decision::Commit {
            // A hold moves only by a capture, which says how much.
            if self.prepared.get(&id).is_some_and(|p| p.transfer.hold_seconds().is_some()) {
                return (DecideAck::Refused, None);
            }
        }
        let Some(mut prepared) = self.prepared.remove(&id) else {
            if let Some(done) = self.finished_decision(&id, log) {
                return (if done == decision { DecideAck::Done } else { DecideAck::Refused }, None);
            }
            return match decision {
                // Never prepared here, so never voted YES: a commit would be a coordinator bug.
                Decision::Commit => (DecideAck::Refused, None),
                Decision::Abort => {
                    self.recent.insert(id, Decision::Abort);
                    writes.push(Write::Finished(id, Decision::Abort));
                    (DecideAck::Done, None)
                }
            };
        };
        for posting in &mut prepared.postings {
            let record = self
                .accounts
                .get_mut(&posting.account)
                .expect("a prepared transfer's accounts exist (checked at prepare and at restore)");
            let old = *record;
            let moved = match (decision, captured) {
                (Decision::Abort, _) => 0,
                (Decision::Commit, None) => posting.delta,
                (Decision::Commit, Some(amount)) => posting.delta.signum() * amount,
            };
            *record = release_hold(old, posting.delta, moved);
            if decision == Decision::Commit {
                posting.delta = moved;
            }
            self.totals.remove(&old);
            self.totals.add(record);
            // An abort changes no balance, and the released hold needs no write (see `restore`).
            if decision == Decision::Commit {
                writes.push(Write::Account(posting.account.clone(), *record));
            }
        }
        writes.push(Write::ClearPrepared(id));
        self.recent.insert(id, decision);
        writes.push(Write::Finished(id, decision));
        (DecideAck::Done, Some(prepared))
    }

    /// Panics if an invariant is broken: only a bug can break one, and carrying on would corrupt money.
    pub fn check_invariants(&self) {
        if let Err(e) = self.verify() {
            panic!("participant invariant broken: {e}");
        }
    }

    fn verify(&self) -> Result<(), RestoreError> {
        let mut derived: HashMap<&AccountId, (i64, i64)> = HashMap::new();
        for (id, p) in &self.prepared {
            if self.recent.decisions.contains_key(id) {
                return Err(RestoreError::PreparedAndFinished(*id));
            }
            for posting in &p.postings {
                if !self.accounts.contains_key(&posting.account) {
                    return Err(RestoreError::MissingAccount(*id, posting.account.clone()));
                }
                let entry = derived.entry(&posting.account).or_default();
                if posting.delta < 0 {
                    entry.0 += -posting.delta;
                } else {
                    entry.1 += posting.delta;
                }
            }
        }
        if Totals::of(self.accounts.values()) != self.totals {
            return Err(RestoreError::TotalsMismatch);
        }
        for (id, record) in &self.accounts {
            let (held, incoming) = derived.get(id).copied().unwrap_or_default();
            if record.held != held {
                let (stored, derived) = (record.held, held);
                return Err(RestoreError::HoldMismatch { account: id.clone(), field: "held", stored, derived });
            }
            if record.incoming != incoming {
                let (stored, derived) = (record.incoming, incoming);
                return Err(RestoreError::HoldMismatch { account: id.clone(), field: "incoming", stored, derived });
            }
            if record.held < 0 || record.overdraft_limit < 0 || record.available_exact() < 0 || record.below_floor() {
                return Err(RestoreError::BadBalance(id.clone()));
            }
        }
        Ok(())
    }
}

/// Reserves one posting at prepare: a debit needs available funds, a credit needs headroom below i64::MAX.
fn apply_hold(mut record: AccountRecord, delta: i64) -> Result<AccountRecord, RefusalReason> {
    if delta < 0 {
        let amount = delta.checked_neg().ok_or(RefusalReason::InsufficientFunds)?;
        if record.available_exact() < i128::from(amount) {
            return Err(RefusalReason::InsufficientFunds);
        }
        record.held += amount;
    } else {
        let promised = record.balance.checked_add(record.incoming).and_then(|v| v.checked_add(delta));
        if promised.is_none() {
            return Err(RefusalReason::BalanceOverflow);
        }
        record.incoming += delta;
    }
    Ok(record)
}

/// Undoes the reservation of a posting of `delta` and moves `moved` (0 on abort, `delta` or a captured part of
/// it, of the same sign, on commit). Prepare made both steps overflow-free.
fn release_hold(mut record: AccountRecord, delta: i64, moved: i64) -> AccountRecord {
    assert!(
        moved == 0 || (moved.signum() == delta.signum() && moved.abs() <= delta.abs()),
        "moves at most what was reserved"
    );
    if delta < 0 {
        record.held += delta;
    } else {
        record.incoming -= delta;
    }
    record.balance += moved;
    assert!(record.held >= 0 && record.incoming >= 0 && record.available_exact() >= 0 && !record.below_floor());
    record
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{Amount, Posting, Transfer};
    use uuid::Uuid;

    fn id(s: &str) -> AccountId {
        AccountId::new(s).expect("valid id")
    }

    fn item(tx: TransferId, from: &str, to: &str, amount: i64, postings: Vec<(&str, i64)>) -> PrepareItem {
        PrepareItem {
            id: tx,
            transfer: Transfer::one(id(from), id(to), Amount::new(amount).expect("positive")),
            postings: postings.into_iter().map(|(a, d)| Posting { account: id(a), delta: d }).collect(),
            coordinator_url: "http://127.0.0.1:1".into(),
        }
    }

    fn machine_with(accounts: &[(&str, i64)]) -> ParticipantMachine {
        let mut m = ParticipantMachine::new(0);
        let mut w = Vec::new();
        for (a, b) in accounts {
            m.create_account(id(a), *b, &mut w).expect("new account");
        }
        m
    }

    #[test]
    fn prepare_holds_and_commit_applies() {
        let mut m = machine_with(&[("alice", 100)]);
        let tx = Uuid::new_v4();
        let mut w = Vec::new();
        assert_eq!(
            m.prepare(&item(tx, "alice", "bob", 60, vec![("alice", -60)]), 0, &NothingFinished, &mut w),
            Vote::Yes
        );
        assert_eq!(
            m.account(&id("alice")),
            Some(AccountRecord { balance: 100, held: 60, incoming: 0, overdraft_limit: 0 })
        );
        assert!(w.iter().any(|x| matches!(x, Write::Prepared(..))));
        // A second debit only sees what is still available.
        let tx2 = Uuid::new_v4();
        let vote = m.prepare(&item(tx2, "alice", "bob", 50, vec![("alice", -50)]), 0, &NothingFinished, &mut w);
        assert_eq!(vote, Vote::no_at(RefusalReason::InsufficientFunds, 0));
        assert_eq!(m.decide(tx, Decision::Commit, &NothingFinished, &mut w), DecideAck::Done);
        assert_eq!(
            m.account(&id("alice")),
            Some(AccountRecord { balance: 40, held: 0, incoming: 0, overdraft_limit: 0 })
        );
        m.check_invariants();
    }

    #[test]
    fn a_capture_moves_part_of_a_hold_and_releases_the_rest() {
        let mut m = machine_with(&[("alice", 100), ("shop", 0), ("bob", 0)]);
        let mut w = Vec::new();
        let (hold_id, plain_id) = (Uuid::new_v4(), Uuid::new_v4());
        let hold = PrepareItem {
            id: hold_id,
            transfer: Transfer::hold(id("alice"), id("shop"), Amount::new(60).expect("positive"), 600).expect("hold"),
            postings: vec![Posting { account: id("alice"), delta: -60 }, Posting { account: id("shop"), delta: 60 }],
            coordinator_url: "http://127.0.0.1:1".into(),
        };
        assert_eq!(m.prepare(&hold, 0, &NothingFinished, &mut w), Vote::Yes);
        assert_eq!(m.account(&id("alice")).map(|a| (a.balance, a.held, a.available())), Some((100, 60, 40)));
        let plain = item(plain_id, "alice", "bob", 10, vec![("alice", -10), ("bob", 10)]);
        assert_eq!(m.prepare(&plain, 0, &NothingFinished, &mut w), Vote::Yes);

        assert_eq!(m.capture(plain_id, 5, &NothingFinished, &mut w).0, DecideAck::Refused, "not a hold");
        assert_eq!(m.capture(hold_id, 61, &NothingFinished, &mut w).0, DecideAck::Refused, "more than it holds");
        assert_eq!(m.capture(hold_id, 0, &NothingFinished, &mut w).0, DecideAck::Refused, "nothing");
        assert_eq!(
            m.decide(hold_id, Decision::Commit, &NothingFinished, &mut w),
            DecideAck::Refused,
            "a hold is captured"
        );
        let (ack, settled) = m.capture(hold_id, 25, &NothingFinished, &mut w);
        assert_eq!(ack, DecideAck::Done);
        let moved: Vec<i64> = settled.expect("the hold's record").postings.iter().map(|p| p.delta).collect();
        assert_eq!(moved, [-25, 25], "the record handed back shows what moved");
        assert_eq!(
            m.account(&id("alice")).map(|a| (a.balance, a.held)),
            Some((75, 10)),
            "the plain transfer's 10 stays held"
        );
        assert_eq!(m.account(&id("shop")).map(|a| (a.balance, a.incoming)), Some((25, 0)));
        assert_eq!(m.capture(hold_id, 25, &NothingFinished, &mut w).0, DecideAck::Done, "a repeated capture");
        assert_eq!(m.decide(hold_id, Decision::Abort, &NothingFinished, &mut w), DecideAck::Refused, "it committed");
        assert_eq!(m.decide(plain_id, Decision::Abort, &NothingFinished, &mut w), DecideAck::Done);
        m.check_invariants();
        assert_eq!(m.totals().balance, 100, "money is conserved");
    }

    #[test]
    fn a_prepared_id_says_yes_again_only_to_the_same_transfer() {
        let mut m = machine_with(&[("alice", 100)]);
        let tx = Uuid::new_v4();
        let mut w = Vec::new();
        let first = item(tx, "alice", "bob", 60, vec![("alice", -60)]);
        assert_eq!(m.prepare(&first, 0, &NothingFinished, &mut w), Vote::Yes);
        w.clear();
        assert_eq!(m.prepare(&first, 5, &NothingFinished, &mut w), Vote::Yes, "a repeated Prepare");
        let reused = item(tx, "alice", "bob", 10, vec![("alice", -10)]);
        assert_eq!(m.prepare(&reused, 5, &NothingFinished, &mut w), Vote::no(RefusalReason::IdInUse));
        assert!(w.is_empty(), "neither writes anything");
        assert_eq!(
            m.account(&id("alice")),
            Some(AccountRecord { balance: 100, held: 60, incoming: 0, overdraft_limit: 0 })
        );
    }

    #[test]
    fn credits_are_invisible_until_commit_and_abort_releases() {
        let mut m = machine_with(&[("bob", 5)]);
        let tx = Uuid::new_v4();
        let mut w = Vec::new();
        assert_eq!(m.prepare(&item(tx, "alice", "bob", 10, vec![("bob", 10)]), 0, &NothingFinished, &mut w), Vote::Yes);
        assert_eq!(m.account(&id("bob")).map(|a| a.balance), Some(5));
        assert_eq!(m.decide(tx, Decision::Abort, &NothingFinished, &mut w), DecideAck::Done);
        assert_eq!(m.account(&id("bob")), Some(AccountRecord { balance: 5, held: 0, incoming: 0, overdraft_limit: 0 }));
        m.check_invariants();
    }

    #[test]
    fn decisions_are_idempotent_and_final() {
        let mut m = machine_with(&[("alice", 100)]);
        let tx = Uuid::new_v4();
        let mut w = Vec::new();
        let it = item(tx, "alice", "bob", 30, vec![("alice", -30)]);
        assert_eq!(m.prepare(&it, 0, &NothingFinished, &mut w), Vote::Yes);
        assert_eq!(m.prepare(&it, 0, &NothingFinished, &mut w), Vote::Yes, "a repeated Prepare is answered again");
        assert_eq!(m.account(&id("alice")).map(|a| a.held), Some(30), "but holds only once");
        assert_eq!(m.decide(tx, Decision::Commit, &NothingFinished, &mut w), DecideAck::Done);
        assert_eq!(m.decide(tx, Decision::Commit, &NothingFinished, &mut w), DecideAck::Done);
        assert_eq!(m.decide(tx, Decision::Abort, &NothingFinished, &mut w), DecideAck::Refused);
        assert_eq!(m.prepare(&it, 0, &NothingFinished, &mut w), Vote::Yes, "a late Prepare never re-applies");
        assert_eq!(
            m.account(&id("alice")),
            Some(AccountRecord { balance: 70, held: 0, incoming: 0, overdraft_limit: 0 })
        );
        m.check_invariants();
    }

    #[test]
    fn abort_before_prepare_leaves_a_tombstone() {
        let mut m = machine_with(&[("alice", 100)]);
        let tx = Uuid::new_v4();
        let mut w = Vec::new();
        assert_eq!(m.decide(tx, Decision::Abort, &NothingFinished, &mut w), DecideAck::Done);
        let late = item(tx, "alice", "bob", 30, vec![("alice", -30)]);
        assert_eq!(m.prepare(&late, 0, &NothingFinished, &mut w), Vote::no(RefusalReason::AlreadyAborted));
        assert_eq!(m.decide(Uuid::new_v4(), Decision::Commit, &NothingFinished, &mut w), DecideAck::Refused);
        assert_eq!(m.account(&id("alice")).map(|a| a.held), Some(0));
    }

    #[test]
    fn refusals_leave_no_trace() {
        let mut m = machine_with(&[("alice", 10), ("rich", i64::MAX)]);
        let mut w = Vec::new();
        let missing = item(Uuid::new_v4(), "alice", "nobody", 1, vec![("alice", -1), ("nobody", 1)]);
        assert_eq!(m.prepare(&missing, 0, &NothingFinished, &mut w), Vote::no_at(RefusalReason::AccountNotFound, 1));
        let overflow = item(Uuid::new_v4(), "alice", "rich", 1, vec![("alice", -1), ("rich", 1)]);
        assert_eq!(m.prepare(&overflow, 0, &NothingFinished, &mut w), Vote::no_at(RefusalReason::BalanceOverflow, 1));
        assert!(w.is_empty());
        assert_eq!(
            m.account(&id("alice")),
            Some(AccountRecord { balance: 10, held: 0, incoming: 0, overdraft_limit: 0 })
        );
    }

    #[test]
    fn restore_derives_holds_from_the_prepared_records() {
        let mut m = machine_with(&[("alice", 100), ("bob", 0)]);
        let mut w = Vec::new();
        let (tx, tx2) = (Uuid::new_v4(), Uuid::new_v4());
        m.prepare(&item(tx, "alice", "bob", 30, vec![("alice", -30), ("bob", 30)]), 0, &NothingFinished, &mut w);
        m.prepare(&item(tx2, "alice", "bob", 20, vec![("alice", -20), ("bob", 20)]), 0, &NothingFinished, &mut w);
        assert!(!w.iter().any(|x| matches!(x, Write::Account(..))), "a prepare writes no account");
        m.decide(tx2, Decision::Commit, &NothingFinished, &mut w);
        // What a store holds: balances as last written, stale holds, and the prepared records.
        let stale = |b| AccountRecord { balance: b, held: 7, incoming: 7, overdraft_limit: 0 };
        let accounts: BTreeMap<_, _> = [(id("alice"), stale(80)), (id("bob"), stale(20))].into();
        let prepared: HashMap<_, _> = m.prepared().map(|(k, v)| (*k, v.clone())).collect();
        let restored = ParticipantMachine::restore(0, accounts, prepared).expect("consistent");
        assert_eq!(restored.account(&id("alice")), m.account(&id("alice")));
        assert_eq!(
            restored.account(&id("bob")),
            Some(AccountRecord { balance: 20, held: 0, incoming: 30, overdraft_limit: 0 })
        );
    }

    #[test]
    fn restore_rejects_holds_beyond_the_balance() {
        let mut m = machine_with(&[("alice", 100)]);
        let mut w = Vec::new();
        let tx = Uuid::new_v4();
        m.prepare(&item(tx, "alice", "bob", 60, vec![("alice", -60)]), 0, &NothingFinished, &mut w);
        let accounts: BTreeMap<_, _> =
            [(id("alice"), AccountRecord { balance: 50, held: 0, incoming: 0, overdraft_limit: 0 })].into();
        let prepared: HashMap<_, _> = m.prepared().map(|(k, v)| (*k, v.clone())).collect();
        let err = ParticipantMachine::restore(0, accounts, prepared);
        assert!(matches!(err, Err(RestoreError::BadBalance(_))));
    }

    #[test]
    fn an_overdraft_limit_lets_a_balance_go_that_far_below_zero_and_no_further() {
        let mut m = ParticipantMachine::new(0);
        let mut w = Vec::new();
        m.create_account_with_limit(id("cash"), 0, 100, &mut w).expect("new account");
        m.create_account(id("alice"), 0, &mut w).expect("new account");
        let cash = |m: &ParticipantMachine| m.account(&id("cash")).expect("cash");
        assert_eq!(cash(&m).available(), 100, "available counts the limit");

        let deposit =
            |amount| item(Uuid::new_v4(), "cash", "alice", amount, vec![("cash", -amount), ("alice", amount)]);
        let first = deposit(60);
        assert_eq!(m.prepare(&first, 0, &NothingFinished, &mut w), Vote::Yes);
        assert_eq!(cash(&m).available(), 40);
        assert_eq!(
            m.prepare(&deposit(41), 0, &NothingFinished, &mut w),
            Vote::no_at(RefusalReason::InsufficientFunds, 0)
        );
        assert_eq!(m.decide(first.id, Decision::Commit, &NothingFinished, &mut w), DecideAck::Done);
        let rest = deposit(40);
        assert_eq!(m.prepare(&rest, 0, &NothingFinished, &mut w), Vote::Yes);
        assert_eq!(m.decide(rest.id, Decision::Commit, &NothingFinished, &mut w), DecideAck::Done);
        assert_eq!(cash(&m), AccountRecord { balance: -100, held: 0, incoming: 0, overdraft_limit: 100 });
        assert_eq!(
            m.prepare(&deposit(1), 0, &NothingFinished, &mut w),
            Vote::no_at(RefusalReason::InsufficientFunds, 0)
        );
        m.check_invariants();
        assert_eq!(m.totals(), Totals { balance: 0, held: 0, incoming: 0, below_floor: 0 });
        assert_eq!(m.holds_violation(), None);

        // A store that holds the account at its floor restores; one below it is refused.
        let at_floor: BTreeMap<_, _> = [(id("cash"), cash(&m))].into();
        assert!(ParticipantMachine::restore(0, at_floor, HashMap::new()).is_ok());
        let below = AccountRecord { balance: -101, ..cash(&m) };
        let err = ParticipantMachine::restore(0, [(id("cash"), below)].into(), HashMap::new());
        assert!(matches!(err, Err(RestoreError::BadBalance(_))));
        // The largest limit does not overflow what is available.
        m.create_account_with_limit(id("bank"), i64::MAX, i64::MAX, &mut w).expect("new account");
        assert_eq!(m.account(&id("bank")).expect("bank").available(), i64::MAX);
        m.check_invariants();
    }

    #[test]
    fn old_decisions_are_read_from_the_store_and_memory_stays_bounded() {
        let mut m = machine_with(&[("alice", 1_000)]).with_recent_finished_max(2);
        let mut store: BTreeMap<TransferId, Decision> = BTreeMap::new();
        let mut w = Vec::new();
        let items: Vec<PrepareItem> =
            (0..5).map(|_| item(Uuid::new_v4(), "alice", "bob", 1, vec![("alice", -1)])).collect();
        for it in &items {
            assert_eq!(m.prepare(it, 0, &store, &mut w), Vote::Yes);
            assert_eq!(m.decide(it.id, Decision::Commit, &store, &mut w), DecideAck::Done);
        }
        assert_eq!(m.recent_finished().count(), 5, "decisions the store has not been given stay in memory");
        // The shell applies the writes, then says so.
        for x in w.drain(..) {
            if let Write::Finished(id, d) = x {
                store.insert(id, d);
            }
        }
        m.writes_applied();
        assert_eq!(m.recent_finished().count(), 2);
        let oldest = &items[0];
        assert!(m.recent_finished().all(|(id, _)| *id != oldest.id), "the oldest is forgotten");
        assert_eq!(m.prepare(oldest, 0, &store, &mut w), Vote::Yes, "a late Prepare of an old commit");
        assert_eq!(m.decide(oldest.id, Decision::Commit, &store, &mut w), DecideAck::Done);
        assert_eq!(m.decide(oldest.id, Decision::Abort, &store, &mut w), DecideAck::Refused);
        assert!(w.is_empty(), "nothing is applied twice");
        assert_eq!(
            m.account(&id("alice")),
            Some(AccountRecord { balance: 995, held: 0, incoming: 0, overdraft_limit: 0 })
        );
        // The same machine with nothing in the store would prepare it again: the lookup is what refuses.
        assert_eq!(m.prepare(oldest, 0, &NothingFinished, &mut w), Vote::Yes);
        assert_eq!(m.account(&id("alice")).map(|a| a.held), Some(1));
    }

    #[test]
    fn accounts_page_from_any_cursor_in_id_order() {
        let m = machine_with(&[("carol", 3), ("alice", 1), ("bob", 2), ("bob-2", 4)]);
        let ids =
            |after: Option<&str>| m.accounts_after(after).map(|(id, _)| id.as_str().to_owned()).collect::<Vec<_>>();
        assert_eq!(ids(None), ["alice", "bob", "bob-2", "carol"]);
        assert_eq!(ids(Some("bob")), ["bob-2", "carol"]);
        assert_eq!(ids(Some("b!")), ["bob", "bob-2", "carol"], "a cursor that is no valid id still pages");
        assert_eq!(ids(Some("zz")), Vec::<String>::new());
    }

    #[test]
    fn the_sums_follow_every_change_and_the_holds_check_reads_them() {
        let mut m = machine_with(&[("alice", 100), ("bob", 5)]);
        let mut w = Vec::new();
        let (tx, tx2) = (Uuid::new_v4(), Uuid::new_v4());
        m.prepare(&item(tx, "alice", "bob", 30, vec![("alice", -30), ("bob", 30)]), 0, &NothingFinished, &mut w);
        m.prepare(&item(tx2, "alice", "bob", 20, vec![("alice", -20)]), 0, &NothingFinished, &mut w);
        assert_eq!(m.totals(), Totals { balance: 105, held: 50, incoming: 30, below_floor: 0 });
        assert_eq!(m.holds_violation(), None);
        m.decide(tx, Decision::Commit, &NothingFinished, &mut w);
        m.decide(tx2, Decision::Abort, &NothingFinished, &mut w);
        assert_eq!(m.totals(), Totals { balance: 105, held: 0, incoming: 0, below_floor: 0 });
        assert_eq!(m.holds_violation(), None);
        m.check_invariants(); // recomputes the sums from every account
                              // A hold no prepared transfer explains shows in the sums.
        m.totals.held += 1;
        assert!(m.holds_violation().is_some());
        assert!(m.violation().is_some());
    }
}
