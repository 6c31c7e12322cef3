//! The participant's core: every rule a shard follows, with no I/O, in the shape of the coordinator's core.
//!
//! It owns the shard's [`ParticipantMachine`], its journal's counters and its in-doubt [`ResolverCore`]. Every
//! input that changes money comes through it: a frame of coordinator work ([`ParticipantCore::handle_frame`]),
//! the coordinator's answers to a decision query ([`ParticipantCore::handle_answers`]), an account opened, an
//! operator's forced decision. Each appends the writes to persist, journal entries included: a posting, the
//! balance after it and its leg are computed here, so the simulator checks the journal against the money.
//!
//! Its one rule above all: **nothing leaves before the writes it depends on are durable.** A frame's replies
//! (votes, acks, reads) wait for every write made before them, by this frame or any input before it, to be
//! reported durable; so does telling the resolver that a query's decisions are applied. The shell carries out,
//! in this order after every input: [`ParticipantCore::poll_writes`] (writes to apply to the store, in order,
//! as one group, and a sync barrier to wait for), then, once the barrier is durable,
//! [`ParticipantCore::handle_synced`], then [`ParticipantCore::poll_reply`] for each link. The participant's
//! stream, the simulator and the model check all drive this type.

use crate::journal::{journal_decision, journal_hold, JournalState};
use crate::ledger::{AccountId, TransferId};
use crate::msg::{DecideAck, Decision, FromShard, QueryAnswer, ToShard};
use crate::participant::{CreateError, FinishedLog, ParticipantMachine, Write};
use crate::resolver::{AnswerError, ResolverCore};
use std::collections::{BTreeMap, VecDeque};

/// Frames answered and not yet sent, per link. The stream shell keeps far fewer in flight (it stops reading past
/// its own pipeline limit), so a link this far behind is a shell bug.
pub const REPLY_FRAMES_WAITING_MAX: usize = 16_384;
/// Links with replies waiting: a coordinator holds one stream per shard, and an old one lingers only until the
/// shell drops it after it closes.
pub const LINKS_WAITING_MAX: usize = 64;
/// Resolver queries applied and not yet durable: the resolver has at most one round of queries out.
pub const RESOLVED_WAITING_MAX: usize = 1_024;

/// Checks a frame before anything of it is applied: a prepare with no postings is a coordinator bug, and the
/// whole frame is refused.
pub fn frame_is_well_formed(items: &[ToShard]) -> bool {
    items.iter().all(|i| !matches!(i, ToShard::Prepare { item, .. } if item.postings.is_empty()))
}

/// Writes for the shell to apply to its store, in order, as one atomic group.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WriteBatch {
    /// The writes, in the order they were made.
    pub writes: Vec<Write>,
    /// Once every write handed out so far is durable, call [`ParticipantCore::handle_synced`] with this.
    pub sync: Option<u64>,
}

/// What waits for durability: the barrier bookkeeping, and the replies and resolver reports held behind it.
/// Plain data, so that the model check can keep it in its state between steps.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Durability {
    /// Writes were handed out with no barrier after them: whatever waits now needs a new one.
    unbarriered: bool,
    /// A new barrier is to go with the next [`ParticipantCore::poll_writes`].
    sync_wanted: bool,
    barrier_issued: u64,
    barrier_synced: u64,
    /// Per link, each frame's replies with the barrier they wait for, in frame order.
    replies: BTreeMap<u64, VecDeque<(u64, Vec<FromShard>)>>,
    /// Resolver queries whose decisions are applied, with the barrier that makes them durable.
    resolved: VecDeque<(u64, u64)>,
}

impl Durability {
    /// The barrier that something queued now must wait for: a fresh one, handed to the caller's next
    /// `poll_writes`, while any write made so far may not be durable; else the last one synced.
    fn barrier_for_now(&mut self, writes_waiting: bool) -> u64 {
        if writes_waiting || self.unbarriered || self.barrier_issued > self.barrier_synced {
            self.sync_wanted = true;
            self.barrier_issued + 1
        } else {
            self.barrier_synced
        }
    }

    /// Nothing waits: every reply sent, every report made.
    pub fn is_idle(&self) -> bool {
        self.replies.values().all(VecDeque::is_empty) && self.resolved.is_empty()
    }

    /// Nothing waits, and every write handed out is durable: what comes next depends on nothing before, so
    /// a harness that keeps this state apart may start its barriers again from zero.
    pub fn is_settled(&self) -> bool {
        self.is_idle() && !self.unbarriered && !self.sync_wanted && self.barrier_issued == self.barrier_synced
    }

    /// Renumbers the barriers from the last one synced, which becomes 0, and returns how far they moved: only
    /// their order matters. For a harness that keeps this state apart between steps (the model check), where
    /// numbers that count frames would only tell equal states apart; it moves the barriers it holds by as much.
    pub fn rebase(&mut self) -> u64 {
        let by = self.barrier_synced;
        self.barrier_synced = 0;
        self.barrier_issued -= by;
        for queue in self.replies.values_mut() {
            for (barrier, _) in queue.iter_mut() {
                *barrier = barrier.saturating_sub(by);
            }
        }
        for (barrier, _) in &mut self.resolved {
            *barrier = barrier.saturating_sub(by);
        }
        by
    }

    fn check(&self) {
        assert!(self.barrier_synced <= self.barrier_issued, "a barrier synced before it was handed out");
        assert!(self.replies.len() <= LINKS_WAITING_MAX, "{} links with replies waiting", self.replies.len());
        for (link, queue) in &self.replies {
            assert!(queue.len() <= REPLY_FRAMES_WAITING_MAX, "link {link}: {} frames waiting", queue.len());
            let barriers: Vec<u64> = queue.iter().map(|(b, _)| *b).collect();
            assert!(barriers.windows(2).all(|w| w[0] <= w[1]), "link {link}: replies out of barrier order");
            assert!(barriers.iter().all(|b| *b <= self.barrier_issued + 1), "link {link}: a barrier never to come");
        }
        assert!(self.resolved.len() <= RESOLVED_WAITING_MAX, "{} resolved queries waiting", self.resolved.len());
    }
}

/// The participant's core; see the module docs.
#[derive(Debug)]
pub struct ParticipantCore {
    machine: ParticipantMachine,
    journal: JournalState,
    resolver: ResolverCore,
    /// Writes made and not yet handed out.
    writes: Vec<Write>,
    durability: Durability,
}

impl ParticipantCore {
    /// A core over the state a (re)start read from the store.
    pub fn new(machine: ParticipantMachine, journal: JournalState, resolver: ResolverCore) -> Self {
        ParticipantCore { machine, journal, resolver, writes: Vec::new(), durability: Durability::default() }
    }

    /// [`ParticipantCore::new`], carrying on with what waits for durability (the model check keeps it apart).
    pub fn with_durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    /// The parts, for a harness that keeps them apart between steps. Writes not yet handed out are lost.
    pub fn into_parts(self) -> (ParticipantMachine, JournalState, ResolverCore, Durability) {
        (self.machine, self.journal, self.resolver, self.durability)
    }

    /// The shard's accounts and prepared transfers, to read: every change goes through the core.
    pub fn machine(&self) -> &ParticipantMachine {
        &self.machine
    }

    /// The journal's counters, for the audit.
    pub fn journal(&self) -> &JournalState {
        &self.journal
    }

    /// The transfers in doubt and the queries about them, to read.
    pub fn resolver(&self) -> &ResolverCore {
        &self.resolver
    }

    /// The resolver, for its timer and its queries (`handle_timeout`, `poll_query`, `handle_unreachable`).
    pub fn resolver_mut(&mut self) -> &mut ResolverCore {
        &mut self.resolver
    }

    /// Asks the resolver to form a round now if one is due, over the transfers prepared here.
    pub fn handle_resolver_timeout(&mut self, now_ms: u64) {
        self.resolver.handle_timeout(now_ms, self.machine.prepared());
    }

    /// A frame of coordinator work from `link` (the shell's name for a connection): its items applied in order,
    /// their replies queued, to leave once every write before them is durable. Hands back those replies, for
    /// the shell's logs and metrics only: they are sent through [`ParticipantCore::poll_reply`].
    pub fn handle_frame(
        &mut self,
        now_unix_ms: u64,
        link: u64,
        items: Vec<ToShard>,
        log: &dyn FinishedLog,
    ) -> &[FromShard] {
        assert!(frame_is_well_formed(&items), "frames are checked before they are applied");
        let mut replies = Vec::with_capacity(items.len());
        for item in items {
            replies.push(self.apply(now_unix_ms, item, log));
        }
        let barrier = self.durability.barrier_for_now(!self.writes.is_empty());
        let queue = self.durability.replies.entry(link).or_default();
        queue.push_back((barrier, replies));
        queue.back().map_or(&[], |(_, replies)| replies.as_slice())
    }

    fn apply(&mut self, now: u64, item: ToShard, log: &dyn FinishedLog) -> FromShard {
        let w = &mut self.writes;
        match item {
            ToShard::Prepare { item, made_by } => {
                let before = w.len();
                let vote = self.machine.prepare_by(&item, made_by, now, log, w);
                let granted = w[before..].iter().find_map(|w| match w {
                    Write::Prepared(id, record) if record.transfer.hold_seconds().is_some() => {
                        Some((*id, record.clone()))
                    }
                    _ => None,
                });
                if let Some((id, record)) = granted {
                    journal_hold(&self.machine, &mut self.journal, id, &record, now, w);
                }
                FromShard::Vote { id: item.id, vote }
            }
            ToShard::Decide { id, decision } => {
                let (ack, settled) = self.machine.settle(id, decision, log, w);
                if let (DecideAck::Done, Some(record)) = (ack, settled) {
                    journal_decision(&self.machine, &mut self.journal, id, decision, &record, None, now, w);
                }
                FromShard::Ack { id, decision, ack }
            }
            ToShard::Capture { id, amount } => {
                let (ack, settled) = self.machine.capture(id, amount, log, w);
                if let (DecideAck::Done, Some(record)) = (ack, settled) {
                    journal_decision(&self.machine, &mut self.journal, id, Decision::Commit, &record, None, now, w);
                }
                FromShard::Ack { id, decision: Decision::Commit, ack }
            }
            ToShard::Read { read, account } => FromShard::Account { read, account: self.machine.account(&account) },
        }
    }

    /// The coordinator's answers to the resolver's `query`. The decisions among them are applied and journaled
    /// now, and handed back with each ack (a refusal means the shard's state contradicts the coordinator, which
    /// needs an operator); the resolver hears they are applied once they are durable.
    pub fn handle_answers(
        &mut self,
        now_ms: u64,
        query: u64,
        answers: &[QueryAnswer],
        log: &dyn FinishedLog,
    ) -> Result<Vec<(TransferId, Decision, DecideAck)>, AnswerError> {
        let decided = self.resolver.handle_answers(now_ms, query, answers)?;
        let mut acks = Vec::with_capacity(decided.len());
        for (id, decision) in decided {
            acks.push((id, decision, self.decide(now_ms, id, decision, None, log)));
        }
        let barrier = self.durability.barrier_for_now(!self.writes.is_empty());
        if barrier <= self.durability.barrier_synced {
            self.resolver.handle_applied(now_ms, query);
        } else {
            self.durability.resolved.push_back((barrier, query));
        }
        Ok(acks)
    }

    /// The writes of a resolver's query could not be made durable: it asks again after its backoff.
    pub fn handle_answers_failed(&mut self, now_ms: u64, query: u64) {
        self.durability.resolved.retain(|(_, q)| *q != query);
        self.resolver.handle_apply_failed(now_ms, query);
    }

    /// An operator forces `decision` on a transfer prepared here while its coordinator is unreachable for good
    /// (a heuristic decision, journaled as such with `operator`). The shell answers once it is durable.
    pub fn handle_forced(
        &mut self,
        now_ms: u64,
        id: TransferId,
        decision: Decision,
        operator: &str,
        log: &dyn FinishedLog,
    ) -> DecideAck {
        self.decide(now_ms, id, decision, Some(operator), log)
    }

    fn decide(
        &mut self,
        now: u64,
        id: TransferId,
        decision: Decision,
        operator: Option<&str>,
        log: &dyn FinishedLog,
    ) -> DecideAck {
        let w = &mut self.writes;
        let (ack, settled) = self.machine.settle(id, decision, log, w);
        if let (DecideAck::Done, Some(record)) = (ack, settled) {
            journal_decision(&self.machine, &mut self.journal, id, decision, &record, operator, now, w);
        }
        ack
    }

    /// Opens an account with `balance`, whose balance may go down to `-overdraft_limit`. The shell answers once
    /// it is durable.
    pub fn handle_open(
        &mut self,
        now_ms: u64,
        id: AccountId,
        balance: i64,
        overdraft_limit: i64,
    ) -> Result<(), CreateError> {
        self.machine.create_account_with_limit(id.clone(), balance, overdraft_limit, &mut self.writes)?;
        self.journal.opened(&id, balance, now_ms, &mut self.writes);
        Ok(())
    }

    /// The writes to apply to the store, in order, as one group; then call
    /// [`ParticipantCore::writes_applied`]. With a barrier, something waits for them to be durable.
    pub fn poll_writes(&mut self) -> Option<WriteBatch> {
        if self.writes.is_empty() && !self.durability.sync_wanted {
            return None;
        }
        self.journal.counters(&mut self.writes);
        let writes = std::mem::take(&mut self.writes);
        let d = &mut self.durability;
        let sync = if std::mem::take(&mut d.sync_wanted) {
            d.barrier_issued += 1;
            d.unbarriered = false;
            Some(d.barrier_issued)
        } else {
            d.unbarriered |= !writes.is_empty();
            None
        };
        Some(WriteBatch { writes, sync })
    }

    /// The store now holds every write handed out (durable or not): the machine may forget the decisions it
    /// kept for its reads of the store.
    pub fn writes_applied(&mut self) {
        self.machine.writes_applied();
    }

    /// Every write handed out with barriers up to `barrier` is durable.
    pub fn handle_synced(&mut self, now_ms: u64, barrier: u64) {
        let d = &mut self.durability;
        d.barrier_synced = d.barrier_synced.max(barrier);
        while let Some(&(b, query)) = d.resolved.front() {
            if b > d.barrier_synced {
                break;
            }
            d.resolved.pop_front();
            self.resolver.handle_applied(now_ms, query);
        }
    }

    /// The replies to the next frame from `link`, once every write before them is durable.
    pub fn poll_reply(&mut self, link: u64) -> Option<Vec<FromShard>> {
        let d = &mut self.durability;
        let queue = d.replies.get_mut(&link)?;
        match queue.front() {
            Some((barrier, _)) if *barrier <= d.barrier_synced => queue.pop_front().map(|(_, replies)| replies),
            Some(_) => None,
            None => {
                d.replies.remove(&link);
                None
            }
        }
    }

    /// The replies to the next frame of any link whose replies may leave, with its link.
    pub fn poll_any_reply(&mut self) -> Option<(u64, Vec<FromShard>)> {
        let synced = self.durability.barrier_synced;
        let link = self.durability.replies.iter().find(|(_, q)| q.front().is_some_and(|(b, _)| *b <= synced))?.0;
        let link = *link;
        self.poll_reply(link).map(|replies| (link, replies))
    }

    /// The connection `link` is gone: its replies will never be sent.
    pub fn drop_link(&mut self, link: u64) {
        self.durability.replies.remove(&link);
    }

    /// What waits for durability.
    pub fn durability(&self) -> &Durability {
        &self.durability
    }

    /// Panics if an invariant is broken: the machine's, and the bounds and order of what waits.
    pub fn check_invariants(&self) {
        self.machine.check_invariants();
        self.durability.check();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{Amount, Transfer};
    use crate::msg::{PrepareItem, Vote};
    use crate::participant::NothingFinished;
    use crate::resolver::ResolverConfig;
    use crate::state::{EntryKind, JournalEntry};

    fn id(name: &str) -> AccountId {
        AccountId::new(name).expect("valid")
    }

    fn core() -> ParticipantCore {
        let mut core = ParticipantCore::new(
            ParticipantMachine::new(0),
            JournalState::new(1, 0),
            ResolverCore::new(ResolverConfig::new(1_000), 0),
        );
        core.handle_open(0, id("alice"), 100, 0).expect("new");
        core.handle_open(0, id("bob"), 0, 0).expect("new");
        let opened = core.poll_writes().expect("writes");
        assert_eq!(opened.sync, None, "nothing waits for the openings");
        core.writes_applied();
        core
    }

    fn prepare(tid: u128, amount: i64) -> ToShard {
        let transfer = Transfer::one(id("alice"), id("bob"), Amount::new(amount).expect("positive"));
        let postings = transfer.postings_for(0, 1);
        let item = PrepareItem { id: TransferId::from_u128(tid), transfer, postings, coordinator_url: "c".into() };
        ToShard::Prepare { item, made_by: None }
    }

    #[test]
    fn replies_wait_for_the_sync_of_every_write_before_them() {
        let mut core = core();
        core.handle_frame(0, 7, vec![prepare(1, 30)], &NothingFinished);
        assert_eq!(core.poll_reply(7), None, "the vote waits for its prepared record");
        // A read right behind it on the same link waits too, in order.
        core.handle_frame(0, 7, vec![ToShard::Read { read: 1, account: id("alice") }], &NothingFinished);
        let batch = core.poll_writes().expect("the prepare's writes");
        let barrier = batch.sync.expect("a barrier: a vote waits");
        core.writes_applied();
        assert_eq!(core.poll_reply(7), None);
        core.handle_synced(0, barrier);
        let vote = core.poll_reply(7).expect("durable now");
        assert!(matches!(vote[..], [FromShard::Vote { vote: Vote::Yes, .. }]));
        assert!(matches!(core.poll_reply(7).expect("then the read")[..], [FromShard::Account { .. }]));
        assert_eq!(core.poll_reply(7), None);
        core.check_invariants();
    }

    #[test]
    fn a_repeated_prepare_waits_for_the_first_ones_sync() {
        let mut core = core();
        core.handle_frame(0, 1, vec![prepare(1, 30)], &NothingFinished);
        let first = core.poll_writes().expect("writes").sync.expect("barrier");
        core.writes_applied();
        // The same Prepare again on a new link, before the first is durable: it writes nothing, and its YES
        // must still wait.
        core.handle_frame(0, 2, vec![prepare(1, 30)], &NothingFinished);
        let again = core.poll_writes().expect("a barrier with no writes");
        assert!(again.writes.is_empty());
        core.handle_synced(0, first);
        assert!(core.poll_reply(1).is_some());
        assert_eq!(core.poll_reply(2), None, "the second waits for its own barrier");
        core.handle_synced(0, again.sync.expect("barrier"));
        assert!(core.poll_reply(2).is_some());
    }

    #[test]
    fn with_everything_durable_a_read_is_answered_at_once() {
        let mut core = core();
        core.handle_frame(0, 1, vec![prepare(1, 30)], &NothingFinished);
        let barrier = core.poll_writes().expect("writes").sync.expect("barrier");
        core.handle_synced(0, barrier);
        core.handle_frame(0, 1, vec![ToShard::Read { read: 1, account: id("alice") }], &NothingFinished);
        assert_eq!(core.poll_writes(), None, "nothing to write or wait for");
        assert!(core.poll_reply(1).is_some(), "the vote");
        assert!(core.poll_reply(1).is_some(), "the read");
    }

    #[test]
    fn a_commit_journals_each_posting_with_the_balance_after_it() {
        let mut core = core();
        core.handle_frame(0, 1, vec![prepare(1, 30)], &NothingFinished);
        core.poll_writes();
        core.writes_applied();
        let commit = ToShard::Decide { id: TransferId::from_u128(1), decision: Decision::Commit };
        core.handle_frame(5, 1, vec![commit], &NothingFinished);
        let batch = core.poll_writes().expect("writes");
        let entries: Vec<&JournalEntry> =
            batch.writes.iter().filter_map(|w| if let Write::Journal(e) = w { Some(e) } else { None }).collect();
        let lines: Vec<(&str, EntryKind, i64, i64)> =
            entries.iter().map(|e| (e.account.as_str(), e.kind, e.amount, e.balance_after)).collect();
        assert_eq!(lines, vec![("alice", EntryKind::Posting, -30, 70), ("bob", EntryKind::Posting, 30, 30)]);
        assert!(batch.writes.contains(&Write::JournalNextSeq(5)), "two openings and two postings: seq 5 is next");
    }
}
