//! An exhaustive model check (stateright, breadth-first) of the coordinator and two participants: what it
//! proves is that for one transfer, or two transfers competing for the same funds, **every** interleaving of
//! frame delivery, message loss and reordering, prepare timeouts, re-deliveries, decision queries, client
//! resubmissions, links lost and re-made and a bounded number of crashes keeps these properties:
//!
//! - never committed on one shard and aborted on another (not even for a moment, not even in a state a crash
//!   later loses); a shard applies Commit only while the transfer's staging entry or its commit decision is
//!   durable (parallel commits: the staging entry and the shards' prepared records prove the commit, so the
//!   commit decision is logged with no sync), and Abort only while an abort decision is durable; a logged
//!   decision never changes, and a committed transfer's log never holds an abort;
//! - never applied twice: each shard finishes a transfer at most once in any lineage of its disk, and its
//!   balances always equal the opening balances plus the commits it finished;
//! - a client told Committed was told so while the staging entry or the commit decision was durable, and the
//!   transfer never ends aborted anywhere; a client told Aborted was told the durable abort decision;
//! - the participant machines' invariants hold, and every durable state restores;
//! - from every reachable state, once the network heals and the crashed nodes restart, a fault-free run
//!   reaches quiescence with every transfer decided everywhere, no holds left and the money exactly where the
//!   outcomes say ("every transfer is eventually decided", checked as: a completion exists from every state).
//!
//! The coordinator **is** the real [`CoordinatorCore`] (held in the state and cloned per transition), driven
//! the way `coordinator/src/engine.rs` and the simulator drive it: `handle_*`, then `poll_log`,
//! `poll_transmit`, `poll_answer`, `poll_notice` until nothing is left, with `poll_timeout` saying when time
//! may next move. Like the engine, it may take a burst of two inputs (votes, decision queries, submissions)
//! before it drains the core, so the log the shell reads may lag the core's decisions; while a burst is open
//! only coordinator steps are explored (participant steps commute with it). Its log is two parts: the batches `poll_log` handed out and not yet synced (a crash loses
//! them, a commit's batch included, which asks for no sync) and the durable entries, one per transfer: its
//! staging entry (`LogWrite::Stage`) until its decision overwrites it; a sync makes every pending batch
//! durable, in order, and reports the last barrier among them with `handle_synced`. A restart builds a new
//! core from the durable log, with every commit still marked unacked owed to its shards, and either no other
//! commit or every acknowledged one as well (the log's acked-before mark makes recovery return a superset of
//! the commits owed acks), and every durable staging entry with no decision handed over as staged, for the
//! core to prepare again and decide. Time is a number in the state that moves
//! only to the core's own deadline (`poll_timeout`), so prepare timeouts and re-delivery fire through the
//! core's rules. The shell's link to
//! each shard is up to one life of the participant; it drops (`handle_link(false)`) once that life is gone,
//! comes up (`handle_link(true)`) when the shard is up, and a wanted link to a down shard fails.
//!
//! Each participant is the real [`ParticipantCore`], over a [`ParticipantMachine`] rebuilt with
//! [`ParticipantMachine::restore`] from a hashable snapshot of its records (its live state and, separately,
//! its disk), with the core's own record of what waits for durability and its real [`ResolverCore`] kept in
//! the state. The core applies frames and releases their replies once a flush reports its barrier; the
//! resolver asks the coordinator about the transfers it holds prepared (a query still unanswered when the next
//! round starts counts as timed out, as the shell's query timeout makes it), and the core applies its answers
//! (those that decide nothing, pending or held, reach the resolver at once: lost or late, they would only end its
//! round as a timeout does).
//! The resolver's clock stands still far past every hold's expiry, with no in-doubt age, scan interval or
//! backoff: every round asks about everything prepared.
//!
//! The network is a set of messages: any may be delivered next, or never (lost); retries (re-delivery,
//! queries, resubmissions) make the duplicates. The simulator (`sim.rs`) covers what this model abstracts:
//! disk contents written record by record, torn flushes, many transfers, real timings.

use protocol::coordinator_core::{
    drain, Answer, CoordinatorCore, CoreConfig, CoreShell, DecisionLog, GrantedHold, HoldEnd, HoldError, LogBatch,
    LogUnreadable, LogWrite, Notice, StagedTransfer,
};
use protocol::journal::JournalState;
use protocol::ledger::{AccountId, Amount, Leg, ShardId, Transfer, TransferId};
use protocol::msg::{DecideAck, Decision, DecisionQueryItem, FromShard, QueryAnswer, ToShard};
use protocol::participant::{ParticipantMachine, Write};
use protocol::participant_core::{frame_is_well_formed, Durability, ParticipantCore};
use protocol::resolver::{AnswerError, ResolverConfig, ResolverCore, QUERY_ITEMS_MAX};
use protocol::state::{AbortReason, AccountRecord, Outcome, PreparedRecord, TransferRecord};
use stateright::{Checker, Model, Property};
use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
#[allow(clippy::disallowed_types)] // the harness times itself; the code it checks reads no clock
use std::time::Instant;
use uuid::Uuid;

const SHARDS: u32 = 2;
/// Steps a healed run may take to reach quiescence before the state counts as stuck.
const SETTLE_STEPS_MAX: usize = 600;
const COORDINATOR_URL: &str = "model://coordinator";
/// What a client captures of a hold: part of it, so that the shards' books show the rest released.
const CAPTURED: i64 = 4;
/// The participants' clock, as their resolvers read it: far past every hold's expiry, and standing still.
const RESOLVER_NOW: u64 = u64::MAX / 4;

/// A resolver for the model's standing clock: no in-doubt age, scan interval or backoff, so every round asks
/// about every transfer prepared, and a new round may start at any step. What it last heard of each transfer
/// (pending, held) changes nothing at that clock, so it keeps none: states that differ only there are one.
fn new_resolver() -> ResolverCore {
    let config = ResolverConfig {
        in_doubt_after_ms: 0,
        scan_interval_ms: 0,
        backoff_min_ms: 0,
        backoff_max_ms: 0,
        query_items_max: QUERY_ITEMS_MAX,
        last_heard_max: 0,
    };
    ResolverCore::new(config, RESOLVER_NOW)
}

/// The core's settings. One millisecond of prepare round and re-delivery age: every timer the core sets is due
/// one step of time later, so a bounded clock still lets each of them fire at any point of an interleaving.
fn core_config() -> CoreConfig {
    CoreConfig {
        shard_count: SHARDS,
        coordinator_url: COORDINATOR_URL.into(),
        prepare_timeout_ms: 1,
        redeliver_after_ms: 1,
        transfers_in_flight_max: 8,
        frame_items_max: 4,
        parallel_commits_max: 1,
        hold_second_ms: 1,
    }
}

/// Messages. A frame travels on a link from one coordinator incarnation (`epoch`) to one life of a shard;
/// replies carry the epoch, answers to a decision query the asker's life: nothing reaches a later incarnation.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Msg {
    Frame {
        epoch: u8,
        shard: ShardId,
        life: u8,
        items: Vec<ToShard>,
    },
    Replies {
        epoch: u8,
        shard: ShardId,
        replies: Vec<FromShard>,
    },
    Query {
        shard: ShardId,
        life: u8,
        qid: u64,
        items: Vec<DecisionQueryItem>,
    },
    /// The coordinator's answers, one per item of query `qid`, for the participant's resolver to read. `ids`
    /// names what they answer, for the properties only (the resolver knows its own questions).
    Answers {
        shard: ShardId,
        life: u8,
        qid: u64,
        ids: Vec<TransferId>,
        answers: Vec<QueryAnswer>,
    },
}

/// A participant's records (its machine's state, or what its disk holds), and (a ghost variable) how many
/// times each transfer was committed in this lineage.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
struct Books {
    accounts: BTreeMap<AccountId, AccountRecord>,
    prepared: BTreeMap<TransferId, PreparedRecord>,
    finished: BTreeMap<TransferId, Decision>,
    commits_applied: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct PState {
    up: bool,
    life: u8,
    memory: Books,
    disk: Books,
    /// The core's replies and resolver reports waiting for a flush, and its barriers.
    durability: Durability,
    /// The last barrier the core handed out: the next flush reports it.
    barrier: u64,
    /// The real in-doubt resolver of this life.
    resolver: ResolverCore,
}

/// One transfer's entry in the coordinator's log, as the shell keeps it: its staging entry, until its decision
/// overwrites it (a presumed abort has no staging entry before it).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct LogRecord {
    transfer: Transfer,
    /// `None`: staged, with no decision yet.
    outcome: Option<Outcome>,
    shards: Vec<ShardId>,
    made_by: Option<String>,
    /// The "owed acks" marker a commit carries until every shard has acknowledged it.
    unacked: bool,
}

impl LogRecord {
    /// The decision, as `Wal::get` reads it (a staged transfer has none).
    fn to_record(&self) -> Option<TransferRecord> {
        Some(TransferRecord {
            transfer: self.transfer.clone(),
            outcome: self.outcome?,
            shards: self.shards.clone(),
            decided_at_unix_ms: 0,
        })
    }

    /// Its shards commit it: a commit, or a hold's capture.
    fn committed(&self) -> bool {
        matches!(self.outcome, Some(Outcome::Committed | Outcome::Captured { .. }))
    }

    /// Its shards abort it: an abort, or a hold's release or expiry.
    fn aborted(&self) -> bool {
        matches!(
            self.outcome,
            Some(Outcome::Aborted(_) | Outcome::AbortedAtLeg { .. } | Outcome::Released | Outcome::Expired)
        )
    }

    /// A granted hold: recovery hands it to the core to end.
    fn held(&self) -> Option<u64> {
        match self.outcome {
            Some(Outcome::Held { expires_at_unix_ms }) => Some(expires_at_unix_ms),
            _ => None,
        }
    }
}

/// The log's entry for `id` proves a commit: its staging entry or its commit decision.
fn proves_commit(log: &BTreeMap<TransferId, LogRecord>, id: &TransferId) -> bool {
    log.get(id).is_some_and(|r| r.outcome.is_none() || r.committed())
}

/// What the log says of `id`, for messages.
fn logged_as(log: &BTreeMap<TransferId, LogRecord>, id: &TransferId) -> String {
    match log.get(id) {
        None => "nothing".into(),
        Some(LogRecord { outcome: None, .. }) => "staged".into(),
        Some(LogRecord { outcome: Some(o), .. }) => format!("{o:?}"),
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct CState {
    /// The real core; `None` while the coordinator is down.
    core: Option<CoordinatorCore>,
    epoch: u8,
    /// The clock the shell hands the core (milliseconds).
    now: u64,
    durable: BTreeMap<TransferId, LogRecord>,
    /// Batches `poll_log` handed out since the last sync, in order: the log as the process reads it is
    /// `durable` with these applied; a crash loses them.
    pending: Vec<LogBatch>,
    /// Per transfer: a client waits for this incarnation's answer.
    waiting: Vec<bool>,
    /// Per hold: a client that asked to end it waits for this incarnation's answer.
    end_waiting: Vec<bool>,
    /// The shell's side of the decision queries: who asked query `n` (shard, life, the resolver's query id), and
    /// about what.
    queries: BTreeMap<u64, (ShardId, u8, u64, Vec<TransferId>)>,
    /// Per shard, the participant life the link is connected to, if up.
    links: Vec<Option<u8>>,
    /// Per shard, the core asked for a link that is not up (`Notice::LinkWanted`).
    wanted: Vec<bool>,
    /// The core was fed an input (a vote, a query, a submit) and not yet drained: the engine feeds a burst
    /// of inputs before it drains, so the log it reads may lag the core's decisions.
    undrained: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct State {
    coordinator: CState,
    participants: Vec<PState>,
    network: BTreeSet<Msg>,
    /// What the client heard for each transfer (for a hold: its grant, then its end).
    answers: Vec<Option<Outcome>>,
    /// Per hold, the statuses its end requests were refused with (a hold "not active": captured, released,
    /// expired), other than "pending".
    refusals: Vec<BTreeSet<&'static str>>,
    /// Ghost: for each transfer, whether any shard ever applied commit (bit 0) or abort (bit 1).
    ever_applied: Vec<u8>,
    crashes_left: u8,
    queries_left: u8,
    /// A broken machine invariant, a refused decision or another impossible event, with its description.
    violation: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Action {
    Submit(u8),
    /// A client that heard hold `t` granted captures (part of) it or releases it.
    EndHold(u8, HoldEnd),
    Deliver(Msg),
    /// The shell drains the core after a burst of inputs (see `CState::undrained`).
    Drain,
    /// The core's timer fires: the clock moves to `poll_timeout()` (if later) and `handle_timeout` runs.
    Timeout,
    /// The log's pending batches become durable; the last barrier among them is reported.
    SyncLog,
    FlushParticipant(ShardId),
    /// The participant's resolver asks about every transfer it holds prepared.
    Query(ShardId),
    LinkUp(ShardId),
    /// The link's participant life is gone (the stream's silence timeout noticed).
    LinkDown(ShardId),
    /// A wanted link to a down shard cannot be opened.
    LinkFail(ShardId),
    CrashCoordinator,
    /// A new core from the durable log. `resend_acked`: recovery hands it the commits every shard has
    /// already acknowledged too, as `Wal::unacked` does for those decided at or after its acked-before mark.
    RestartCoordinator {
        resend_acked: bool,
    },
    CrashParticipant(ShardId),
    RestartParticipant(ShardId),
}

struct LedgerModel {
    accounts: Vec<(AccountId, i64)>,
    transfers: Vec<Transfer>,
    crashes: u8,
    /// Which nodes may crash: index 0 is the coordinator, 1 and 2 the participants.
    crashable: [bool; 3],
    retries: Retries,
    /// The clock never passes this (the healed runs of the liveness check ignore it).
    time_max: u64,
    /// Decision queries in all (each one moves the core's query and barrier counters, so they are bounded).
    queries: u8,
    /// Fingerprints of states already shown to settle once healed (shared by the checker's threads).
    settles: Mutex<HashSet<u64>>,
    /// Restarts (transitions, not states) that hand the core a staged transfer: any; one whose client heard
    /// Committed; one some shard already committed. Printed after the check, to show the case is explored.
    staged_recoveries: [AtomicUsize; 3],
}

/// When clients resubmit and participants ask about transfers in doubt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Retries {
    /// At any moment: every race of a retry with the protocol's own messages.
    Always,
    /// Clients submit every transfer at the start and resubmit only after a coordinator crash; participants ask
    /// only once some node has crashed. Used with several transfers, whose interleavings multiply; the races
    /// of retries without a crash are covered by the one-transfer model.
    AfterCrash,
}

fn tid(t: u8) -> TransferId {
    Uuid::from_u128(u128::from(t) + 1)
}

fn fingerprint(state: &State) -> u64 {
    let mut h = DefaultHasher::new();
    state.hash(&mut h);
    h.finish()
}

/// Applies one log write to `log`; Err if it would change a logged decision.
fn apply_log_write(log: &mut BTreeMap<TransferId, LogRecord>, write: &LogWrite) -> Result<(), String> {
    match write {
        LogWrite::Stage { id, transfer, shards, made_by } => {
            if let Some(before) = log.get(id).and_then(|r| r.outcome) {
                return Err(format!("a staging entry of {id} overwrites its logged decision {before:?}"));
            }
            let record = LogRecord {
                transfer: transfer.clone(),
                outcome: None,
                shards: shards.clone(),
                made_by: made_by.clone(),
                unacked: false,
            };
            log.insert(*id, record);
        }
        LogWrite::Decision { id, transfer, outcome, shards, made_by } => {
            if let Some(before) = log.get(id).and_then(|r| r.outcome) {
                // A grant is the one outcome that another follows: the hold's end.
                let ends = matches!(before, Outcome::Held { .. }) && outcome.ends_hold();
                if before != *outcome && !ends {
                    return Err(format!("the logged decision of {id} changed from {before:?} to {outcome:?}"));
                }
            }
            // Like the `h` key of a hold's end, the commit's marker stays until every shard has acknowledged it.
            let unacked = *outcome == Outcome::Committed || outcome.ends_hold();
            let record = LogRecord {
                transfer: transfer.clone(),
                outcome: Some(*outcome),
                shards: shards.clone(),
                made_by: made_by.clone(),
                unacked,
            };
            log.insert(*id, record);
        }
        LogWrite::End { id } => {
            if let Some(record) = log.get_mut(id) {
                record.unacked = false;
            }
        }
    }
    Ok(())
}

/// The model plays the engine's shell over one state: `drain` hands it what the core asks for.
struct Shell<'a> {
    model: &'a LedgerModel,
    s: &'a mut State,
}

impl CoreShell for Shell<'_> {
    type Error = String;

    fn core(&mut self) -> &mut CoordinatorCore {
        self.s.coordinator.core()
    }

    fn write_log(&mut self, batch: LogBatch) -> Result<(), String> {
        let c = &mut self.s.coordinator;
        c.pending.push(batch);
        c.memory().map(drop) // a decision the log already holds must not change
    }

    fn transmit(&mut self, shard: ShardId, items: Vec<ToShard>) -> Result<(), String> {
        let c = &self.s.coordinator;
        let life = c.links[shard as usize].ok_or_else(|| format!("a frame for P{shard} without a link"))?;
        self.s.network.insert(Msg::Frame { epoch: c.epoch, shard, life, items });
        Ok(())
    }

    fn release(&mut self, answer: Answer) -> Result<(), String> {
        let s = &mut *self.s;
        match answer {
            Answer::Transfer { id, outcome, .. } => {
                let t = self.model.transfer_index(&id)?;
                if let Some(before) = s.answers[t] {
                    let ends = matches!(before, Outcome::Held { .. }) && outcome.ends_hold();
                    if before != outcome && !ends {
                        return Err(format!("the client heard {before:?} and then {outcome:?} for t{t}"));
                    }
                }
                if let Outcome::Captured { amount } = outcome {
                    if amount != CAPTURED {
                        return Err(format!("t{t} was captured for {amount}; the client asked for {CAPTURED}"));
                    }
                }
                s.answers[t] = Some(outcome);
                s.coordinator.waiting[t] = false;
                s.coordinator.end_waiting[t] = false;
            }
            Answer::Queries { query, answers } => {
                let asked = s.coordinator.queries.remove(&query);
                let (shard, life, qid, ids) = asked.ok_or_else(|| format!("answers to unknown query {query}"))?;
                // Every answer goes, "pending" too: what it means is the resolver's to say. One that decides
                // nothing (pending, held) is handed over at once: losing or delaying it only ends the resolver's
                // round as a timed-out query does, which the Query step explores, and interleaving it with every
                // other step would multiply the states for nothing.
                let decides = answers.iter().any(|a| matches!(a, QueryAnswer::Commit | QueryAnswer::Abort));
                let msg = Msg::Answers { shard, life, qid, ids, answers };
                if decides {
                    s.network.insert(msg);
                } else {
                    self.model.deliver(s, msg)?;
                }
            }
        }
        Ok(())
    }

    fn notice(&mut self, notice: Notice) -> Result<(), String> {
        match notice {
            Notice::Refused { id, shard, decision } => Err(format!("P{shard} refused {decision:?} on {id}")),
            Notice::LinkWanted { shard } => {
                self.s.coordinator.wanted[shard as usize] = true;
                Ok(())
            }
            Notice::PresumedAbort { .. }
            | Notice::QueryAnswered { .. }
            | Notice::ShardSilent { .. }
            | Notice::Redelivered { .. } => Ok(()),
        }
    }
}

/// The log as the shell reads it, for the core ([`DecisionLog`]): a staged transfer has no decision yet.
struct ReadLog(BTreeMap<TransferId, LogRecord>);

impl DecisionLog for ReadLog {
    fn decision(&self, id: &TransferId) -> Result<Option<TransferRecord>, LogUnreadable> {
        Ok(self.0.get(id).and_then(LogRecord::to_record))
    }
}

impl CState {
    fn core(&mut self) -> &mut CoordinatorCore {
        self.core.as_mut().expect("only a running coordinator is driven")
    }

    /// The log as the process reads it: the durable records and every write handed out since.
    fn memory(&self) -> Result<BTreeMap<TransferId, LogRecord>, String> {
        let mut log = self.durable.clone();
        for write in self.pending.iter().flat_map(|b| &b.writes) {
            apply_log_write(&mut log, write)?;
        }
        Ok(log)
    }
}

impl LedgerModel {
    /// `transfers`: each a list of legs (from, to, amount).
    fn new(transfers: &[&[(&str, &str, i64)]], crashes: u8, crashable: [bool; 3], retries: Retries) -> Self {
        let id = |s: &str| AccountId::new(s).expect("valid account id");
        // alice is on shard 1, bob and carol on shard 0 (pinned by the ledger's shard map tests).
        let accounts = vec![(id("alice"), 10), (id("bob"), 0), (id("carol"), 0)];
        let leg = |(from, to, amount): &(&str, &str, i64)| Leg {
            from: id(from),
            to: id(to),
            amount: Amount::new(*amount).expect("positive amount"),
        };
        let transfers =
            transfers.iter().map(|legs| Transfer::new(legs.iter().map(leg).collect()).expect("1 to 16 legs")).collect();
        LedgerModel {
            accounts,
            transfers,
            crashes,
            crashable,
            retries,
            time_max: 2,
            queries: 2,
            settles: Mutex::new(HashSet::new()),
            staged_recoveries: Default::default(),
        }
    }

    fn transfer_count(&self) -> usize {
        self.transfers.len()
    }

    fn transfer_index(&self, id: &TransferId) -> Result<usize, String> {
        (0..self.transfers.len() as u8)
            .find(|t| tid(*t) == *id)
            .map(usize::from)
            .ok_or_else(|| format!("{id} is not a transfer of the model"))
    }

    fn shards_of(&self, t: usize) -> Vec<ShardId> {
        self.transfers[t].shards(SHARDS)
    }

    fn machine(&self, shard: ShardId, books: &Books) -> Result<ParticipantMachine, String> {
        let accounts: BTreeMap<AccountId, AccountRecord> =
            books.accounts.iter().map(|(k, v)| (k.clone(), *v)).collect();
        let prepared: HashMap<TransferId, PreparedRecord> =
            books.prepared.iter().map(|(k, v)| (*k, v.clone())).collect();
        // No decision kept in memory: every one is read from the books, as the shell reads its store.
        ParticipantMachine::restore(shard, accounts, prepared)
            .map(|m| m.with_recent_finished_max(0))
            .map_err(|e| format!("P{shard}'s books do not restore: {e}"))
    }

    /// Reads the machine back into books, with the finished records its writes left and the ghost counter.
    fn books(
        machine: &ParticipantMachine,
        finished: BTreeMap<TransferId, Decision>,
        commits_applied: Vec<u8>,
    ) -> Books {
        Books {
            accounts: machine.accounts().map(|(k, v)| (k.clone(), *v)).collect(),
            prepared: machine.prepared().map(|(k, v)| (*k, v.clone())).collect(),
            finished,
            commits_applied,
        }
    }

    fn opening_books(&self, shard: ShardId) -> Books {
        let mut machine = ParticipantMachine::new(shard);
        let mut writes = Vec::new();
        for (id, balance) in &self.accounts {
            if protocol::ledger::shard_of(id, SHARDS) == shard {
                machine.create_account(id.clone(), *balance, &mut writes).expect("unique account");
            }
        }
        Self::books(&machine, BTreeMap::new(), vec![0; self.transfer_count()])
    }

    // -------------------------------------------------------------------------------------------------------
    // Transitions.

    fn apply(&self, s: &mut State, action: &Action) -> Result<(), String> {
        match action {
            Action::Submit(t) => self.submit(s, *t)?,
            Action::EndHold(t, end) => self.end_hold(s, *t, *end)?,
            Action::Drain => self.drive(s)?,
            Action::Deliver(msg) => {
                s.network.remove(msg);
                self.deliver(s, msg.clone())?;
            }
            Action::Timeout => {
                let c = &mut s.coordinator;
                let at = c.core().poll_timeout().ok_or("a timeout with no timer set")?;
                c.now = c.now.max(at);
                let now = c.now;
                c.core().handle_timeout(now);
                self.drive(s)?;
            }
            Action::SyncLog => self.sync_log(s)?,
            Action::FlushParticipant(p) => self.flush(s, *p)?,
            Action::Query(p) => {
                s.queries_left = s.queries_left.saturating_sub(1);
                let mut core = self.participant(*p, &s.participants[*p as usize])?;
                // The shell's query timeout: what is still unanswered when the next round is due failed.
                for query in core.resolver().unanswered() {
                    core.resolver_mut().handle_unreachable(RESOLVER_NOW, query, "timed out");
                }
                core.handle_resolver_timeout(RESOLVER_NOW);
                let life = s.participants[*p as usize].life;
                while let Some(query) = core.resolver_mut().poll_query() {
                    if query.coordinator_url != COORDINATOR_URL {
                        return Err(format!("P{p} asked {:?}, which is no coordinator", query.coordinator_url));
                    }
                    s.network.insert(Msg::Query { shard: *p, life, qid: query.id, items: query.items });
                }
                self.settle_participant(s, *p, core)?;
            }
            Action::LinkUp(shard) => {
                let c = &mut s.coordinator;
                c.links[*shard as usize] = Some(s.participants[*shard as usize].life);
                c.wanted[*shard as usize] = false;
                let now = c.now;
                c.core().handle_link(now, *shard, true);
                self.drive(s)?;
            }
            Action::LinkDown(shard) => {
                let c = &mut s.coordinator;
                c.links[*shard as usize] = None;
                let now = c.now;
                c.core().handle_link(now, *shard, false);
                self.drive(s)?;
            }
            Action::LinkFail(shard) => {
                let c = &mut s.coordinator;
                c.wanted[*shard as usize] = false;
                let now = c.now;
                c.core().handle_link(now, *shard, false);
                self.drive(s)?;
            }
            Action::CrashCoordinator => {
                s.crashes_left -= 1;
                let c = &mut s.coordinator;
                c.core = None;
                c.undrained = false;
                c.epoch += 1;
                c.pending.clear();
                c.waiting.iter_mut().for_each(|w| *w = false);
                c.end_waiting.iter_mut().for_each(|w| *w = false);
                c.queries.clear();
                c.links.iter_mut().for_each(|l| *l = None);
                c.wanted.iter_mut().for_each(|w| *w = false);
            }
            Action::RestartCoordinator { resend_acked } => {
                // `Engine::start`: every commit still marked unacked is owed to all its shards, and the log may
                // return acknowledged ones with them (the shards ack those again without applying them twice);
                // every staging entry with no decision is handed over to be prepared again and decided; every
                // granted hold is handed over to be ended, and every hold's end whose `h` key remains is owed.
                let c = &mut s.coordinator;
                let owed = |r: &LogRecord| {
                    (r.outcome == Some(Outcome::Committed) && (r.unacked || *resend_acked))
                        || (r.outcome.is_some_and(Outcome::ends_hold) && r.unacked)
                };
                let unacked: Vec<(TransferId, TransferRecord)> = c
                    .durable
                    .iter()
                    .filter(|(_, r)| owed(r))
                    .filter_map(|(id, r)| Some((*id, r.to_record()?)))
                    .collect();
                let holds: Vec<GrantedHold> = c
                    .durable
                    .iter()
                    .filter_map(|(id, r)| {
                        let expires_at_unix_ms = r.held()?;
                        Some(GrantedHold {
                            id: *id,
                            transfer: r.transfer.clone(),
                            made_by: r.made_by.clone(),
                            expires_at_unix_ms,
                        })
                    })
                    .collect();
                let staged: Vec<StagedTransfer> = c
                    .durable
                    .iter()
                    .filter(|(_, r)| r.outcome.is_none())
                    .map(|(id, r)| StagedTransfer { id: *id, transfer: r.transfer.clone(), made_by: r.made_by.clone() })
                    .collect();
                self.count_recovery(s, &staged);
                let c = &mut s.coordinator;
                c.core = Some(CoordinatorCore::new(core_config(), c.now, unacked, staged).with_holds(holds));
                self.drive(s)?;
            }
            Action::CrashParticipant(p) => {
                s.crashes_left -= 1;
                let ps = &mut s.participants[*p as usize];
                ps.up = false;
                ps.life += 1;
                ps.memory = ps.disk.clone();
                ps.durability = Durability::default();
                ps.barrier = 0;
                ps.resolver = new_resolver();
            }
            Action::RestartParticipant(p) => {
                let ps = &mut s.participants[*p as usize];
                self.machine(*p, &ps.disk)?;
                ps.memory = ps.disk.clone();
                ps.up = true;
            }
        }
        Ok(())
    }

    fn count_recovery(&self, s: &State, staged: &[StagedTransfer]) {
        for st in staged {
            let Ok(t) = self.transfer_index(&st.id) else { continue };
            let told = s.answers[t] == Some(Outcome::Committed);
            let applied = s.participants.iter().any(|p| p.memory.finished.get(&st.id) == Some(&Decision::Commit));
            for (i, yes) in [true, told, applied].into_iter().enumerate() {
                if yes {
                    self.staged_recoveries[i].fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// A client asks for transfer `t`, as `coordinator/src/api.rs` does.
    fn submit(&self, s: &mut State, t: u8) -> Result<(), String> {
        let (id, transfer) = (tid(t), self.transfers[t as usize].clone());
        let c = &mut s.coordinator;
        let log = ReadLog(c.memory()?);
        let now = c.now;
        c.core().handle_submit(now, id, transfer, None, &log).map_err(|e| format!("the core refused t{t}: {e:?}"))?;
        c.waiting[t as usize] = true;
        self.end_of_input(s)
    }

    /// A client asks to end hold `t`, as `coordinator/src/api.rs` does. A refusal is told at once: unless it
    /// is "pending", it must say how the hold ends.
    fn end_hold(&self, s: &mut State, t: u8, end: HoldEnd) -> Result<(), String> {
        let id = tid(t);
        let c = &mut s.coordinator;
        let log = ReadLog(c.memory()?);
        let now = c.now;
        match c.core().handle_end_hold(now, id, end, &log) {
            Ok(()) => c.end_waiting[t as usize] = true,
            Err(HoldError::NotActive("pending")) => {}
            Err(HoldError::NotActive(status)) => {
                s.refusals[t as usize].insert(status);
            }
            Err(HoldError::Expired) => {
                s.refusals[t as usize].insert(Outcome::Expired.status());
            }
            Err(HoldError::NotFound) if c.durable.get(&id).is_some_and(|r| r.outcome.is_some()) => {
                return Err(format!(
                    "an end of t{t} heard that it is unknown; the durable log holds {}",
                    logged_as(&c.durable, &id)
                ));
            }
            Err(HoldError::NotFound) => {}
            Err(e) => return Err(format!("the core refused to end t{t} ({end:?}): {e:?}")),
        }
        self.end_of_input(s)
    }

    /// After an input a burst may hold: the first leaves the core undrained (another input may follow before
    /// the shell drains it, `Action::Drain`); a second one ends the burst.
    fn end_of_input(&self, s: &mut State) -> Result<(), String> {
        if s.coordinator.undrained {
            self.drive(s)
        } else {
            s.coordinator.undrained = true;
            Ok(())
        }
    }

    /// The participant's core over its memory, carrying on with its resolver and what waits for durability.
    fn participant(&self, shard: ShardId, ps: &PState) -> Result<ParticipantCore, String> {
        let machine = self.machine(shard, &ps.memory)?;
        let core = ParticipantCore::new(machine, JournalState::new(1, 0), ps.resolver.clone());
        Ok(core.with_durability(ps.durability.clone()))
    }

    /// Carries out what the participant's core asks after an input, as its shells do: its writes become the
    /// memory (durable at the next flush), the replies it releases go out; then its parts are kept.
    fn settle_participant(&self, s: &mut State, shard: ShardId, mut core: ParticipantCore) -> Result<(), String> {
        core.check_invariants();
        let batch = core.poll_writes().unwrap_or_default();
        core.writes_applied();
        while let Some((link, replies)) = core.poll_any_reply() {
            let epoch = u8::try_from(link).map_err(|_| format!("P{shard} replied on link {link}"))?;
            s.network.insert(Msg::Replies { epoch, shard, replies });
        }
        let (machine, _, resolver, mut durability) = core.into_parts();
        self.store(s, shard, &machine, &batch.writes)?;
        let ps = &mut s.participants[shard as usize];
        ps.barrier = batch.sync.unwrap_or(ps.barrier);
        // Barriers count frames: only their order means something, and counting on would only tell equal states
        // apart.
        ps.barrier = ps.barrier.saturating_sub(durability.rebase());
        if durability.is_settled() {
            durability = Durability::default();
            ps.barrier = 0;
        }
        ps.resolver = resolver;
        ps.durability = durability;
        Ok(())
    }

    /// A participant's flush: its memory is durable, and the core hears its last barrier is.
    fn flush(&self, s: &mut State, shard: ShardId) -> Result<(), String> {
        let ps = &mut s.participants[shard as usize];
        ps.disk = ps.memory.clone();
        let mut core = self.participant(shard, ps)?;
        core.handle_synced(RESOLVER_NOW, ps.barrier);
        self.settle_participant(s, shard, core)
    }

    fn deliver(&self, s: &mut State, msg: Msg) -> Result<(), String> {
        match msg {
            Msg::Frame { epoch, shard, life, items } => {
                let ps = &s.participants[shard as usize];
                if !ps.up || ps.life != life {
                    return Ok(()); // a connection to an earlier life: gone
                }
                if !frame_is_well_formed(&items) {
                    return Err(format!("P{shard} got a malformed frame: {items:?}"));
                }
                let mut core = self.participant(shard, ps)?;
                core.handle_frame(0, u64::from(epoch), items, &ps.memory.finished);
                self.settle_participant(s, shard, core)?;
            }
            Msg::Replies { epoch, shard, replies } => {
                let c = &mut s.coordinator;
                if c.core.is_none() || c.epoch != epoch {
                    return Ok(());
                }
                let now = c.now;
                c.core().handle_replies(now, shard, replies);
                self.end_of_input(s)?;
            }
            Msg::Query { shard, life, qid, items } => {
                let c = &mut s.coordinator;
                if c.core.is_none() {
                    return Ok(()); // connection refused
                }
                let log = ReadLog(c.memory()?);
                let ids = items.iter().map(|item| item.id).collect();
                let query = c.core().handle_query(items, &log).map_err(|e| e.to_string())?;
                c.queries.insert(query, (shard, life, qid, ids));
                self.end_of_input(s)?;
            }
            Msg::Answers { shard, life, qid, answers, .. } => {
                let ps = &s.participants[shard as usize];
                if !ps.up || ps.life != life {
                    return Ok(());
                }
                let mut core = self.participant(shard, ps)?;
                match core.handle_answers(RESOLVER_NOW, qid, &answers, &ps.memory.finished) {
                    // A late answer to a query given up as timed out.
                    Err(AnswerError::NotWaiting(_)) => return Ok(()),
                    Err(error) => return Err(format!("P{shard}'s query {qid}: {error}")),
                    Ok(acks) => {
                        if let Some((id, decision, _)) = acks.iter().find(|(_, _, ack)| *ack == DecideAck::Refused) {
                            return Err(format!("P{shard} refused the coordinator's answer {decision:?} for {id}"));
                        }
                    }
                }
                self.settle_participant(s, shard, core)?;
            }
        }
        Ok(())
    }

    /// The machine's new state becomes the participant's memory; its finished writes are checked against the
    /// coordinator's durable log: a commit needs the staging entry or the commit decision durable, an abort the
    /// abort decision.
    fn store(
        &self,
        s: &mut State,
        shard: ShardId,
        machine: &ParticipantMachine,
        writes: &[Write],
    ) -> Result<(), String> {
        let mut applied = s.participants[shard as usize].memory.commits_applied.clone();
        let mut finished = s.participants[shard as usize].memory.finished.clone();
        for write in writes {
            if let Write::Finished(id, decision) = write {
                if finished.insert(*id, *decision).is_some() {
                    return Err(format!("P{shard} finished {id} a second time"));
                }
                let t = self.transfer_index(id)?;
                let durable = &s.coordinator.durable;
                let proven = match decision {
                    Decision::Commit => proves_commit(durable, id),
                    Decision::Abort => durable.get(id).is_some_and(LogRecord::aborted),
                };
                if !proven {
                    let logged = logged_as(durable, id);
                    return Err(format!("P{shard} applied {decision:?} to t{t}; the durable log holds {logged}"));
                }
                s.ever_applied[t] |= if *decision == Decision::Commit { 1 } else { 2 };
                if *decision == Decision::Commit {
                    applied[t] += 1;
                }
            }
        }
        s.participants[shard as usize].memory = Self::books(machine, finished, applied);
        Ok(())
    }

    /// Carries out what the core asks for, as the engine's `drive` does, until it asks for nothing more.
    fn drive(&self, s: &mut State) -> Result<(), String> {
        s.coordinator.undrained = false;
        drain(&mut Shell { model: self, s })
    }

    /// A sync: every pending batch is durable, and so is the last barrier handed out with them.
    fn sync_log(&self, s: &mut State) -> Result<(), String> {
        let c = &mut s.coordinator;
        let mut barrier = None;
        for batch in std::mem::take(&mut c.pending) {
            for write in &batch.writes {
                apply_log_write(&mut c.durable, write).map_err(|e| format!("on disk: {e}"))?;
            }
            barrier = batch.sync.or(barrier);
        }
        if let Some(barrier) = barrier {
            let now = c.now;
            c.core().handle_synced(now, barrier);
            self.drive(s)?;
        }
        Ok(())
    }

    /// Two reductions that change no behaviour, only the number of states that stand for it:
    /// - a message to an earlier incarnation (a reply for an old epoch, a frame or an answer for an old life)
    ///   would be ignored on delivery, so it is dropped now;
    /// - on a node that can no longer crash an unflushed write can never be lost, so syncing or flushing at once
    ///   is as good as later (the network already delays replies arbitrarily).
    fn normalize(&self, s: &mut State) -> Result<(), String> {
        let safe = |s: &State, node: usize| s.crashes_left == 0 || !self.crashable[node];
        while safe(s, 0) && s.coordinator.core.is_some() && !s.coordinator.pending.is_empty() {
            self.sync_log(s)?;
        }
        for p in 0..s.participants.len() {
            let ps = &mut s.participants[p];
            if ps.up
                && (s.crashes_left == 0 || !self.crashable[1 + p])
                && (ps.memory != ps.disk || !ps.durability.is_idle())
            {
                self.flush(s, p as ShardId)?;
            }
        }
        let epoch = s.coordinator.epoch;
        let lives: Vec<u8> = s.participants.iter().map(|p| p.life).collect();
        s.network.retain(|m| match m {
            Msg::Replies { epoch: e, .. } => *e == epoch,
            Msg::Frame { shard, life, .. } | Msg::Answers { shard, life, .. } => *life == lives[*shard as usize],
            Msg::Query { .. } => true,
        });
        Ok(())
    }

    // -------------------------------------------------------------------------------------------------------
    // Properties.

    /// The ledger's safety properties in one state, or the first one broken.
    fn safety(&self, s: &State) -> Result<(), String> {
        if let Some(v) = &s.violation {
            return Err(v.clone());
        }
        for (t, bits) in s.ever_applied.iter().enumerate() {
            if *bits == 3 {
                return Err(format!("t{t} was committed on one shard and aborted on another"));
            }
        }
        self.atomic(s)?;
        self.nothing_final_before_durable(s)?;
        let durable = &s.coordinator.durable;
        let memory = s.coordinator.memory()?;
        // A committed transfer: some shard applied its commit, or its client heard so. Neither the durable log
        // nor the log as the process reads it may then hold an abort, and the durable one must prove the commit
        // (a staging entry or a commit decision: it never loses either once durable, and only a decision
        // overwrites a staging entry).
        let committed = |id: &TransferId, what: &str| -> Result<(), String> {
            if !proves_commit(durable, id) || memory.get(id).is_some_and(LogRecord::aborted) {
                let (d, m) = (logged_as(durable, id), logged_as(&memory, id));
                return Err(format!("{what}; the durable log holds {d}, the process's log {m}"));
            }
            Ok(())
        };
        for (p, ps) in s.participants.iter().enumerate() {
            for (what, books) in [("memory", &ps.memory), ("disk", &ps.disk)] {
                if books.commits_applied.iter().any(|n| *n > 1) {
                    return Err(format!("P{p}'s {what} applied a transfer twice: {:?}", books.commits_applied));
                }
                self.check_books(p as ShardId, books, durable).map_err(|e| format!("P{p}'s {what}: {e}"))?;
                for (id, decision) in &books.finished {
                    match decision {
                        Decision::Commit => committed(id, &format!("P{p}'s {what} finished {id} as committed"))?,
                        Decision::Abort if !durable.get(id).is_some_and(LogRecord::aborted) => {
                            let logged = logged_as(durable, id);
                            return Err(format!(
                                "P{p}'s {what} finished {id} as aborted; the durable log has {logged}"
                            ));
                        }
                        Decision::Abort => {}
                    }
                }
            }
        }
        for (t, answer) in s.answers.iter().enumerate() {
            let id = tid(t as u8);
            match answer {
                None => {}
                Some(Outcome::Committed) => {
                    committed(&id, &format!("the client heard Committed for t{t}"))?;
                    if s.ever_applied[t] & 2 != 0 {
                        return Err(format!("the client heard Committed for t{t}, and a shard aborted it"));
                    }
                }
                // A grant stays durable until the hold's end overwrites it.
                Some(Outcome::Held { .. })
                    if durable
                        .get(&id)
                        .is_some_and(|r| r.held().is_some() || r.outcome.is_some_and(Outcome::ends_hold)) => {}
                Some(answer) if durable.get(&id).and_then(|r| r.outcome) != Some(*answer) => {
                    let logged = logged_as(durable, &id);
                    return Err(format!("the client heard {answer:?} for t{t}, the durable log holds {logged}"));
                }
                Some(_) => {}
            }
            // A hold said not to be active ends as the refusal said: it already had, durably, or (expired) its
            // expiry has passed while it is granted, so that nothing else can end it, after a restart either.
            for status in &s.refusals[t] {
                let record = durable.get(&id);
                let expired = *status == Outcome::Expired.status()
                    && record.and_then(LogRecord::held).is_some_and(|at| at <= s.coordinator.now);
                if !expired && record.and_then(|r| r.outcome).map(Outcome::status) != Some(status) {
                    let logged = logged_as(durable, &id);
                    return Err(format!("t{t}'s end was refused as {status}; the durable log holds {logged}"));
                }
            }
        }
        Ok(())
    }

    /// Prepared records are the coordinator's; balance = opening + commits finished here (of a hold, what its
    /// durable capture says); held and incoming = the prepared transfers'; none negative.
    /// Atomicity, in every state: once a shard has committed a transfer (in memory or on disk), every shard it
    /// touches holds it durably prepared or committed, so the commit can still reach all of them. A shard that
    /// has aborted it, or never durably prepared it, could never commit it: a vote was counted that no disk
    /// kept, or a decision other than the one logged reached a shard.
    fn atomic(&self, s: &State) -> Result<(), String> {
        for t in 0..self.transfer_count() {
            let id = tid(t as u8);
            let committed_on = |books: &Books| books.finished.get(&id) == Some(&Decision::Commit);
            let Some(p) = s.participants.iter().position(|p| committed_on(&p.memory) || committed_on(&p.disk)) else {
                continue;
            };
            for shard in self.shards_of(t) {
                let disk = &s.participants[shard as usize].disk;
                if !committed_on(disk) && !disk.prepared.contains_key(&id) {
                    let here = disk.finished.get(&id);
                    return Err(format!(
                        "t{t} is committed on P{p}, and P{shard}'s disk holds it neither prepared nor committed \
                         (finished: {here:?})"
                    ));
                }
            }
        }
        Ok(())
    }

    /// The coordinator tells nothing final before it is durable: every decision on its way to a shard (a
    /// Decide, a Capture, a query's Commit or Abort) is backed by the durable log as it travels. Checked on the
    /// state before `normalize` too, whose immediate syncs would otherwise hide a message sent too early.
    fn nothing_final_before_durable(&self, s: &State) -> Result<(), String> {
        let durable = &s.coordinator.durable;
        let backed = |id: &TransferId, decision: Decision| match decision {
            Decision::Commit => proves_commit(durable, id),
            Decision::Abort => durable.get(id).is_some_and(LogRecord::aborted),
        };
        for msg in &s.network {
            let decisions: Vec<(TransferId, Decision)> = match msg {
                Msg::Frame { items, .. } => items
                    .iter()
                    .filter_map(|item| match item {
                        ToShard::Decide { id, decision } => Some((*id, *decision)),
                        ToShard::Capture { id, .. } => Some((*id, Decision::Commit)),
                        ToShard::Prepare { .. } | ToShard::Read { .. } => None,
                    })
                    .collect(),
                Msg::Answers { ids, answers, .. } => ids
                    .iter()
                    .zip(answers)
                    .filter_map(|(id, answer)| match answer {
                        QueryAnswer::Commit => Some((*id, Decision::Commit)),
                        QueryAnswer::Abort => Some((*id, Decision::Abort)),
                        QueryAnswer::Pending | QueryAnswer::Held => None,
                    })
                    .collect(),
                Msg::Replies { .. } | Msg::Query { .. } => Vec::new(),
            };
            for (id, decision) in decisions {
                if !backed(&id, decision) {
                    let logged = logged_as(durable, &id);
                    return Err(format!("{decision:?} of {id} is on its way while the durable log holds {logged}"));
                }
            }
        }
        Ok(())
    }

    fn check_books(
        &self,
        shard: ShardId,
        books: &Books,
        durable: &BTreeMap<TransferId, LogRecord>,
    ) -> Result<(), String> {
        for (id, record) in &books.prepared {
            let t = self.transfer_index(id)?;
            let transfer = &self.transfers[t];
            if record.transfer != *transfer
                || record.postings != transfer.postings_for(shard, SHARDS)
                || record.coordinator_url != COORDINATOR_URL
            {
                return Err(format!("holds a prepared t{t} the coordinator never sent: {record:?}"));
            }
        }
        let postings = |id: &TransferId| -> Result<_, String> {
            Ok(self.transfers[self.transfer_index(id)?].postings_for(shard, SHARDS))
        };
        for (account, record) in &books.accounts {
            let opening = self.accounts.iter().find(|(a, _)| a == account).ok_or("an unknown account")?.1;
            let mut expected = (opening, 0, 0);
            for (id, decision) in &books.finished {
                if *decision == Decision::Commit {
                    let captured = match durable.get(id).and_then(|r| r.outcome) {
                        Some(Outcome::Captured { amount }) => Some(amount),
                        _ => None,
                    };
                    let moved = |delta: i64| captured.map_or(delta, |amount| delta.signum() * amount);
                    expected.0 +=
                        postings(id)?.iter().filter(|p| p.account == *account).map(|p| moved(p.delta)).sum::<i64>();
                }
            }
            for id in books.prepared.keys() {
                for p in postings(id)?.iter().filter(|p| p.account == *account) {
                    if p.delta < 0 {
                        expected.1 -= p.delta;
                    } else {
                        expected.2 += p.delta;
                    }
                }
            }
            let actual = (record.balance, record.held, record.incoming);
            if actual != expected {
                return Err(format!("{account} has {actual:?}, expected {expected:?}"));
            }
            if record.below_floor() || record.available_exact() < 0 {
                return Err(format!("{account} is below its overdraft limit or over-held"));
            }
        }
        Ok(())
    }

    /// Heals the network, restarts every node and runs a fair, fault-free schedule; Ok once every transfer is
    /// decided everywhere with no holds left and the balances exactly what the outcomes say.
    fn settle(&self, start: &State) -> Result<(), String> {
        let mut s = start.clone();
        let mut path = Vec::new();
        for _ in 0..SETTLE_STEPS_MAX {
            let fp = fingerprint(&s);
            let known = self.settles.lock().unwrap_or_else(|e| e.into_inner()).contains(&fp);
            if known || self.settled(&s)? {
                let mut settles = self.settles.lock().unwrap_or_else(|e| e.into_inner());
                settles.extend(path);
                settles.insert(fp);
                return Ok(());
            }
            path.push(fp);
            let action = self.healing_action(&s).ok_or_else(|| format!("stuck with nothing to do: {s:?}"))?;
            s = self
                .next_state(&s, action.clone())
                .ok_or_else(|| format!("the healing action {action:?} changed nothing: {s:?}"))?;
            self.safety(&s)?;
        }
        Err(format!("no quiescent state within {SETTLE_STEPS_MAX} healed steps: {s:?}"))
    }

    /// The next step of the healed schedule: restart, re-link, deliver, sync, flush, let time pass, ask,
    /// resubmit. No bound of the model applies (time, queries).
    fn healing_action(&self, s: &State) -> Option<Action> {
        let c = &s.coordinator;
        let Some(core) = &c.core else { return Some(Action::RestartCoordinator { resend_acked: false }) };
        if let Some(p) = s.participants.iter().position(|p| !p.up) {
            return Some(Action::RestartParticipant(p as ShardId));
        }
        for (shard, link) in c.links.iter().enumerate() {
            let life = s.participants[shard].life;
            match link {
                Some(l) if *l != life => return Some(Action::LinkDown(shard as ShardId)),
                None => return Some(Action::LinkUp(shard as ShardId)),
                Some(_) => {}
            }
        }
        if c.undrained {
            return Some(Action::Drain);
        }
        if let Some(msg) = s.network.iter().next() {
            return Some(Action::Deliver(msg.clone()));
        }
        if !c.pending.is_empty() {
            return Some(Action::SyncLog);
        }
        if let Some(p) = s.participants.iter().position(|p| !p.durability.is_idle() || p.memory != p.disk) {
            return Some(Action::FlushParticipant(p as ShardId));
        }
        if core.poll_timeout().is_some() {
            return Some(Action::Timeout);
        }
        if let Some(p) = s.participants.iter().position(|p| !p.memory.prepared.is_empty()) {
            return Some(Action::Query(p as ShardId));
        }
        let unanswered = (0..self.transfer_count()).find(|t| s.answers[*t].is_none() && !c.waiting[*t])?;
        Some(Action::Submit(unanswered as u8))
    }

    fn settled(&self, s: &State) -> Result<bool, String> {
        let c = &s.coordinator;
        let quiet = c.core.as_ref().is_some_and(|core| core.is_idle() && core.holds_count() == 0)
            && !c.undrained
            && c.pending.is_empty()
            && c.queries.is_empty()
            && s.network.is_empty()
            && s.answers.iter().all(|a| a.is_some())
            && s.participants
                .iter()
                .all(|p| p.up && p.durability.is_idle() && p.memory == p.disk && p.disk.prepared.is_empty());
        if !quiet {
            return Ok(false);
        }
        for t in 0..self.transfer_count() {
            let record = c.durable.get(&tid(t as u8)).filter(|r| r.outcome.is_some());
            let record = record.ok_or_else(|| format!("t{t} settled with no durable decision"))?;
            if record.held().is_some() {
                return Err(format!("t{t} settled as a hold still granted"));
            }
            let commit = record.committed();
            for shard in self.shards_of(t) {
                let here = s.participants[shard as usize].disk.finished.get(&tid(t as u8)).copied();
                if commit && here != Some(Decision::Commit) {
                    return Err(format!("t{t} committed but P{shard} has {here:?} once settled"));
                }
                if !commit && here == Some(Decision::Commit) {
                    return Err(format!("t{t} aborted but P{shard} committed it"));
                }
            }
            if record.unacked {
                return Err(format!("t{t} settled with its owed-acks marker still durable"));
            }
        }
        for p in &s.participants {
            if p.disk.accounts.values().any(|a| a.held != 0 || a.incoming != 0) {
                return Err(format!("holds remain once settled: {:?}", p.disk.accounts));
            }
        }
        let total: i64 = s.participants.iter().flat_map(|p| p.disk.accounts.values()).map(|a| a.balance).sum();
        let opening: i64 = self.accounts.iter().map(|a| a.1).sum();
        if total != opening {
            return Err(format!("the books settle at {total}, they opened at {opening}"));
        }
        Ok(true)
    }
}

impl Model for LedgerModel {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        let participants = (0..SHARDS)
            .map(|p| {
                let books = self.opening_books(p);
                PState {
                    up: true,
                    life: 0,
                    memory: books.clone(),
                    disk: books,
                    durability: Durability::default(),
                    barrier: 0,
                    resolver: new_resolver(),
                }
            })
            .collect();
        let mut core = CoordinatorCore::new(core_config(), 0, Vec::new(), Vec::new());
        for shard in 0..SHARDS {
            core.handle_link(0, shard, true);
        }
        let mut state = State {
            coordinator: CState {
                core: Some(core),
                epoch: 0,
                now: 0,
                durable: BTreeMap::new(),
                pending: Vec::new(),
                waiting: vec![false; self.transfer_count()],
                end_waiting: vec![false; self.transfer_count()],
                queries: BTreeMap::new(),
                links: vec![Some(0); SHARDS as usize],
                wanted: vec![false; SHARDS as usize],
                undrained: false,
            },
            participants,
            network: BTreeSet::new(),
            answers: vec![None; self.transfer_count()],
            refusals: vec![BTreeSet::new(); self.transfer_count()],
            ever_applied: vec![0; self.transfer_count()],
            crashes_left: self.crashes,
            queries_left: self.queries,
            violation: None,
        };
        if self.retries == Retries::AfterCrash {
            for t in 0..self.transfer_count() as u8 {
                // Each on its own, drained at once: the prepares travel in separate frames.
                self.submit(&mut state, t)
                    .and_then(|()| self.drive(&mut state))
                    .expect("the first submissions are taken");
            }
        }
        self.normalize(&mut state).expect("the initial state normalizes");
        vec![state]
    }

    fn actions(&self, s: &State, actions: &mut Vec<Action>) {
        if s.violation.is_some() {
            return;
        }
        let c = &s.coordinator;
        let crashed = c.epoch > 0 || s.participants.iter().any(|p| p.life > 0);
        let retrying = self.retries == Retries::Always || crashed;
        if c.undrained {
            // Mid-burst: another input to the coordinator, the drain that ends the burst, or a crash before
            // it. Every other step touches only participants and commutes with the burst, so it is explored
            // after the drain instead (a partial-order reduction that keeps the state count within CI).
            actions.push(Action::Drain);
            for msg in s.network.iter().filter(|m| matches!(m, Msg::Replies { .. } | Msg::Query { .. })) {
                actions.push(Action::Deliver(msg.clone()));
            }
            if self.retries == Retries::Always || c.epoch > 0 {
                for t in 0..self.transfer_count() {
                    if s.answers[t].is_none() && !c.waiting[t] {
                        actions.push(Action::Submit(t as u8));
                    }
                }
            }
            if s.crashes_left > 0 && self.crashable[0] {
                actions.push(Action::CrashCoordinator);
            }
            return;
        }
        for msg in &s.network {
            actions.push(Action::Deliver(msg.clone()));
        }
        if let Some(core) = &c.core {
            if self.retries == Retries::Always || c.epoch > 0 {
                for t in 0..self.transfer_count() {
                    // A client submits (or resubmits) until it hears the outcome; a second wait changes nothing.
                    if s.answers[t].is_none() && !c.waiting[t] {
                        actions.push(Action::Submit(t as u8));
                    }
                    // Once it hears a hold granted, it may capture or release it until it hears the end. One that
                    // lost its answer in a coordinator crash may release it to be safe.
                    let granted = matches!(s.answers[t], Some(Outcome::Held { .. }));
                    let hold = self.transfers[t].hold_seconds().is_some();
                    if hold && !c.end_waiting[t] && (granted || (s.answers[t].is_none() && c.epoch > 0)) {
                        if granted {
                            actions.push(Action::EndHold(t as u8, HoldEnd::Capture(Some(CAPTURED))));
                        }
                        actions.push(Action::EndHold(t as u8, HoldEnd::Release));
                    }
                }
            }
            if core.poll_timeout().is_some_and(|at| at.max(c.now) <= self.time_max) {
                actions.push(Action::Timeout);
            }
            if !c.pending.is_empty() {
                actions.push(Action::SyncLog);
            }
            for (shard, link) in c.links.iter().enumerate() {
                let p = &s.participants[shard];
                let shard = shard as ShardId;
                match link {
                    Some(life) if !p.up || p.life != *life => actions.push(Action::LinkDown(shard)),
                    None if p.up => actions.push(Action::LinkUp(shard)),
                    None if c.wanted[shard as usize] => actions.push(Action::LinkFail(shard)),
                    _ => {}
                }
            }
            if s.crashes_left > 0 && self.crashable[0] {
                actions.push(Action::CrashCoordinator);
            }
        } else {
            actions.push(Action::RestartCoordinator { resend_acked: false });
            if c.durable.values().any(|r| r.committed() && !r.unacked) {
                actions.push(Action::RestartCoordinator { resend_acked: true });
            }
        }
        for (p, ps) in s.participants.iter().enumerate() {
            let p = p as ShardId;
            if !ps.up {
                actions.push(Action::RestartParticipant(p));
                continue;
            }
            let asking = s.network.iter().any(|m| matches!(m, Msg::Query { shard, .. } if *shard == p));
            if retrying && s.queries_left > 0 && !ps.memory.prepared.is_empty() && !asking {
                actions.push(Action::Query(p));
            }
            if !ps.durability.is_idle() || ps.memory != ps.disk {
                actions.push(Action::FlushParticipant(p));
            }
            if s.crashes_left > 0 && self.crashable[1 + p as usize] {
                actions.push(Action::CrashParticipant(p));
            }
        }
    }

    fn next_state(&self, last: &State, action: Action) -> Option<State> {
        let mut next = last.clone();
        let result = panic::catch_unwind(AssertUnwindSafe(|| {
            self.apply(&mut next, &action)?;
            // The state before the reductions is reached too: what they sync at once was not durable in it.
            self.safety(&next)?;
            self.normalize(&mut next)?;
            if let Some(core) = &next.coordinator.core {
                core.check_invariants();
            }
            Ok::<(), String>(())
        }));
        match result {
            Ok(Ok(())) => {}
            Ok(Err(violation)) => next.violation = Some(format!("{violation} (on {action:?})")),
            Err(payload) => {
                let message = payload
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "a panic".into());
                next.violation = Some(format!("panicked on {action:?}: {message}"));
            }
        }
        (next != *last).then_some(next)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        let mut properties: Vec<Property<Self>> = vec![
            Property::always("the ledger's safety properties hold", |model, s| match model.safety(s) {
                Ok(()) => true,
                Err(e) => {
                    eprintln!("safety broken: {e}");
                    false
                }
            }),
            Property::always(
                "every transfer is decided everywhere once the network heals",
                |model: &LedgerModel, s: &State| {
                    // Healing either loses every message still in flight (the worst case: only retries help) or
                    // delivers them late.
                    let mut lost = s.clone();
                    lost.network.clear();
                    match model.settle(&lost).and_then(|()| model.settle(s)) {
                        Ok(()) => true,
                        Err(e) => {
                            eprintln!("cannot settle: {e}");
                            false
                        }
                    }
                },
            ),
            Property::sometimes("a transfer commits on both shards", |_, s: &State| {
                s.participants.iter().all(|p| p.disk.finished.values().any(|d| *d == Decision::Commit))
            }),
            Property::sometimes("a prepare round times out", |_, s: &State| {
                let timed_out = Some(Outcome::Aborted(AbortReason::ParticipantUnavailable));
                s.coordinator.durable.values().any(|r| r.outcome == timed_out)
            }),
        ];
        if self.transfers.iter().any(|t| t.hold_seconds().is_some()) {
            properties.extend(Self::hold_properties());
            return properties;
        }
        if self.crashes == 0 || !self.crashable[0] {
            // Without a coordinator crash there is no presumed abort and no recovery to discover, and the log is
            // synced at once (see `normalize`), so no commit decision is ever left unsynced.
            return properties;
        }
        properties.extend([
            Property::sometimes("a client hears Committed while only the staging entry is durable", |_, s: &State| {
                (0..s.answers.len()).any(|t| {
                    s.answers[t] == Some(Outcome::Committed)
                        && s.coordinator.durable.get(&tid(t as u8)).is_some_and(|r| r.outcome.is_none())
                })
            }),
            Property::sometimes("a shard applies Commit while only the staging entry is durable", |_, s: &State| {
                s.participants.iter().any(|p| {
                    p.memory.finished.iter().any(|(id, d)| {
                        *d == Decision::Commit && s.coordinator.durable.get(id).is_some_and(|r| r.outcome.is_none())
                    })
                })
            }),
            Property::sometimes(
                "a restarted coordinator finishes a staged transfer whose client heard Committed",
                |_, s: &State| {
                    let c = &s.coordinator;
                    // A client that heard the outcome never resubmits: it runs because it was handed over.
                    c.epoch > 0
                        && c.core.as_ref().is_some_and(|core| {
                            (0..s.answers.len()).any(|t| {
                                s.answers[t] == Some(Outcome::Committed) && core.running(&tid(t as u8)).is_some()
                            })
                        })
                },
            ),
            Property::sometimes("a participant hears a presumed abort", |_, s: &State| {
                let presumed = Some(Outcome::Aborted(AbortReason::CoordinatorRestarted));
                s.coordinator.durable.values().any(|r| r.outcome == presumed)
                    && s.participants.iter().any(|p| p.disk.finished.values().any(|d| *d == Decision::Abort))
            }),
            Property::sometimes("a recovered coordinator owes a commit", |_, s: &State| {
                let c = &s.coordinator;
                c.epoch > 0
                    && c.core
                        .as_ref()
                        .is_some_and(|core| core.owed(c.now).iter().any(|o| o.decision == Decision::Commit))
            }),
            Property::sometimes(
                "a recovered coordinator re-sends a commit every shard acknowledged",
                |_, s: &State| {
                    let c = &s.coordinator;
                    let acked = |id: &TransferId| c.durable.get(id).is_some_and(|r| r.committed() && !r.unacked);
                    c.epoch > 0 && c.core.as_ref().is_some_and(|core| core.owed(c.now).iter().any(|o| acked(&o.id)))
                },
            ),
        ]);
        properties
    }
}

impl LedgerModel {
    /// What the hold model must be seen to reach: each way a hold ends, with the crashes around it.
    fn hold_properties() -> Vec<Property<Self>> {
        fn ended(s: &State, outcome: Outcome) -> bool {
            s.coordinator.durable.values().any(|r| r.outcome == Some(outcome))
        }
        vec![
            Property::sometimes("a hold is captured in part on both shards", |_, s: &State| {
                ended(s, Outcome::Captured { amount: CAPTURED })
                    && s.participants.iter().all(|p| p.disk.finished.values().any(|d| *d == Decision::Commit))
            }),
            Property::sometimes("a client releases a hold", |_, s: &State| {
                ended(s, Outcome::Released) && s.answers.contains(&Some(Outcome::Released))
            }),
            Property::sometimes("a hold expires while a shard is down", |_, s: &State| {
                ended(s, Outcome::Expired) && s.participants.iter().any(|p| !p.up)
            }),
            Property::sometimes("a capture is refused: the hold expired", |_, s: &State| {
                s.refusals.iter().any(|r| r.contains(Outcome::Expired.status()))
            }),
            Property::sometimes("a restarted coordinator is handed a granted hold to end", |_, s: &State| {
                let c = &s.coordinator;
                c.epoch > 0 && c.core.as_ref().is_some_and(|core| core.holds_count() > 0)
            }),
            Property::sometimes("a restarted coordinator owes a hold's end", |_, s: &State| {
                let c = &s.coordinator;
                let ends =
                    |id: &TransferId| c.durable.get(id).is_some_and(|r| r.outcome.is_some_and(Outcome::ends_hold));
                c.epoch > 0 && c.core.as_ref().is_some_and(|core| core.owed(c.now).iter().any(|o| ends(&o.id)))
            }),
        ]
    }
}

/// Checks `model` exhaustively; returns the number of unique states explored.
fn check(name: &str, model: LedgerModel) -> usize {
    #[allow(clippy::disallowed_types, clippy::disallowed_methods)] // the harness times itself
    let started = Instant::now();
    let checker =
        model.checker().threads(std::thread::available_parallelism().map_or(2, |n| n.get())).spawn_bfs().join();
    let states = checker.unique_state_count();
    let recoveries = checker.model().staged_recoveries.each_ref().map(|n| n.load(Ordering::Relaxed));
    eprintln!(
        "model {name}: {states} states ({} generated), depth {}, in {:.1?}; restarts handing over a staged \
         transfer: {} (its client heard Committed: {}, a shard committed it: {})",
        checker.state_count(),
        checker.max_depth(),
        started.elapsed(),
        recoveries[0],
        recoveries[1],
        recoveries[2],
    );
    assert!(checker.is_done(), "model {name}: the check did not finish");
    checker.assert_properties();
    states
}

fn env_or(name: &str, default: u8) -> u8 {
    std::env::var(name).map_or(default, |v| v.parse().expect("a small number"))
}

#[test]
fn one_transfer_survives_every_interleaving_of_loss_and_a_crash() {
    let mut model = LedgerModel::new(&[&[("alice", "bob", 6)]], env_or("MC", 1), [true; 3], Retries::Always);
    model.time_max = u64::from(env_or("MCT", 2));
    model.queries = env_or("MCQ", 2);
    let states = check("one transfer, a crash of any node", model);
    assert!(states > 10_000, "only {states} states: the model explores too little to prove anything");
}

/// A hold of 1 second (a millisecond of the model's clock) on a lossy, reordering network, with a crash of any
/// node: granted or refused, then captured in part, released or expired, each exactly once.
#[test]
fn a_hold_ends_once_through_every_interleaving_of_loss_and_a_crash() {
    let mut model = LedgerModel::new(&[], env_or("MCH", 1), [true; 3], Retries::Always);
    let id = |s: &str| AccountId::new(s).expect("valid account id");
    let hold = Transfer::hold(id("alice"), id("bob"), Amount::new(6).expect("positive"), 1).expect("a hold");
    model.transfers = vec![hold];
    model.time_max = u64::from(env_or("MCHT", 2));
    model.queries = env_or("MCHQ", 2);
    let states = check("a hold, a crash of any node", model);
    assert!(states > 10_000, "only {states} states: the model explores too little to prove anything");
}

/// Two transfers racing for the same funds over a lossy, reordering network, one of them of two legs. With a
/// crash as well the state space is beyond a CI budget; `MC2=1 MCN=<0|1|2>` runs that check for one crashing
/// node.
#[test]
fn two_transfers_competing_for_funds_survive_every_interleaving_of_loss() {
    let crashes = env_or("MC2", 0);
    let which = env_or("MCN", 9);
    for (node, name) in [(0, "the coordinator"), (1, "P0"), (2, "P1")] {
        if which != 9 && which != node {
            continue;
        }
        let mut crashable = [false; 3];
        crashable[node as usize] = true;
        // The second has two legs, which debit alice twice on her shard: 6 + 3 + 2 > 10, so one of the two aborts.
        let transfers: [&[(&str, &str, i64)]; 2] =
            [&[("alice", "bob", 6)], &[("alice", "carol", 3), ("alice", "bob", 2)]];
        let mut model = LedgerModel::new(&transfers, crashes, crashable, Retries::AfterCrash);
        model.time_max = u64::from(env_or("MCT2", 2));
        model.queries = env_or("MCQ2", 1);
        let label = if crashes == 0 { "no crash".to_string() } else { format!("{crashes} crash(es) of {name}") };
        let states = check(&format!("two transfers, {label}"), model);
        assert!(states > 10_000, "only {states} states: the model explores too little to prove anything");
        if crashes == 0 {
            break; // without a crash, which node may crash does not matter
        }
    }
}
