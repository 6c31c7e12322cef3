//! The coordinator's core: every rule the coordinator follows, for every transfer at once, with no I/O.
//!
//! It runs each transfer's [`TransferMachine`], batches the work for each shard into frames, owns the prepare
//! deadlines, the re-delivery of decisions still owed acks (on a timer, and at once when a shard's link comes
//! back), the answers to participants' decision queries (presumed abort included), idempotent replays, and
//! recovery from the log. It never answers or sends anything that depends on a log write before the shell
//! reports that write durable ([`CoordinatorCore::handle_synced`]).
//!
//! Commits are parallel commits: a transfer's staging record goes to the log while its Prepares run, and once
//! it is durable and every shard has voted YES the transfer is committed, with no further log write on the
//! client's path. Its commit decision is logged then too, but nothing waits for it: whatever crash loses it,
//! the staging record and the shards' prepared records still prove the commit. Recovery finishes every staged
//! transfer without a decision by preparing it again on every shard, with no deadline: YES from all (a shard
//! that prepared or committed it says YES again) commits, and a NO aborts: a shard that voted YES keeps the
//! transfer prepared until it hears the decision, so a NO proves that no YES from it reached a client's
//! answer. A staged transfer is never aborted for a shard's silence once the process that staged it is gone,
//! since its client may have been told it committed. Aborts are logged and made durable before anyone hears.
//! Under load (`CoreConfig::parallel_commits_max` transfers running) a new transfer takes the classic path
//! instead: no staging record, and its commit is answered and sent once its decision is durable.
//!
//! A hold (a one-leg transfer with `hold_seconds`) runs the classic path, and where a transfer would commit it
//! is granted instead: [`Outcome::Held`] is logged, the client hears once it is durable, and the shards keep it
//! prepared and hear nothing. It ends once, by [`CoordinatorCore::handle_end_hold`] (a capture commits part or
//! all of it, a release aborts it) or by reaching its expiry in [`CoordinatorCore::handle_timeout`] (an abort):
//! that end is a decision like any other, logged before anyone hears of it and delivered until every shard has
//! acknowledged it. At most [`HOLDS_ACTIVE_MAX`] holds are granted at once.
//!
//! The shell feeds it inputs (`handle_*`, each with the current time in milliseconds of a monotonic clock whose
//! zero is the unix epoch at the shell's start, so that hold expiries, in unix milliseconds, compare with it) and
//! carries out what it asks for, in this order after every input: [`CoordinatorCore::poll_log`] (writes to
//! apply to the log, and a sync barrier to wait for), [`CoordinatorCore::poll_transmit`] (frames to send),
//! [`CoordinatorCore::poll_answer`] (answers to release) and [`CoordinatorCore::poll_timeout`] (when to call
//! [`CoordinatorCore::handle_timeout`] next). The simulator drives this same type.

use crate::coordinator::{decision_of, plan_query_answer, Phase, QueryPlan, TransferMachine, VoteResult};
use crate::ledger::{AccountId, ShardId, Transfer, TransferId};
use crate::msg::{DecideAck, Decision, DecisionQueryItem, FromShard, PrepareItem, QueryAnswer, ToShard};
use crate::state::{AbortReason, Outcome, TransferRecord};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// Holds granted and not yet ended, at most: each keeps an entry in memory until it ends.
pub const HOLDS_ACTIVE_MAX: usize = 100_000;
/// Presumed aborts logged and not yet durable, at most: as many as the decision queries answered in one sync's
/// time. Past it a query about an unknown transfer is answered "pending", and asked again.
pub const PRESUMED_UNSYNCED_MAX: usize = 65_536;
/// Answers released and not yet taken with [`CoordinatorCore::poll_answer`], and notices not yet taken with
/// [`CoordinatorCore::poll_notice`], at most. The shell takes them after every burst of inputs, so a queue this
/// long means it stopped draining the core: [`CoordinatorCore::check_invariants`] says so.
pub const POLLED_WAITING_MAX: usize = 1 << 20;

/// The core's settings (the shell's flags, in milliseconds).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CoreConfig {
    /// How many shards the cluster has: which shard each account falls on.
    pub shard_count: u32,
    /// Where participants ask about transfers they are in doubt on (kept in their prepared records).
    pub coordinator_url: String,
    /// A shard that has not voted this long after its Prepare was queued counts as unavailable.
    pub prepare_timeout_ms: u64,
    /// A decision unacknowledged this long is sent again.
    pub redeliver_after_ms: u64,
    /// Transfers being prepared or logged at once; more are refused as overloaded, not queued without end.
    pub transfers_in_flight_max: usize,
    /// Items in one frame to a shard: bounds a frame's size and a shard's time under its lock.
    pub frame_items_max: usize,
    /// A transfer submitted while fewer than this many run is staged (parallel commits). From this many on it
    /// takes the classic path, its commit logged and synced after the votes: under load the client waits in
    /// queues more than for that fsync, and one decision fsync then serves a whole burst of votes, where
    /// staging records, arriving one by one, would cost more fsyncs and smaller frames.
    pub parallel_commits_max: usize,
    /// A second of a hold's life (`expires_in_s`), in the core's milliseconds: [`HOLD_SECOND_MS`], except in
    /// the model check, whose clock is a few ticks long and must still reach an expiry.
    pub hold_second_ms: u64,
}

/// A second, in milliseconds: what [`CoreConfig::hold_second_ms`] is outside the model check.
pub const HOLD_SECOND_MS: u64 = 1_000;
/// The default prepare round: long against a shard's fsync (milliseconds) and a loaded machine's scheduling,
/// short enough that a dead shard costs its clients only a couple of seconds.
pub const PREPARE_TIMEOUT_MS: u64 = 2_000;
/// The default age at which an unacknowledged decision is sent again: a link that came back has already
/// re-sent it at once, so this only covers a frame lost on a link that stayed up.
pub const REDELIVER_AFTER_MS: u64 = 1_000;
/// The default number of transfers decided at once: far more than 64 clients keep busy, and a bound on the
/// core's memory (a few KiB each).
pub const TRANSFERS_IN_FLIGHT_MAX: usize = 4_096;
/// The default of `parallel_commits_max`. Measured with `scripts/bench-ab.sh` on 2 cores: parallel commits win
/// on latency, throughput and CPU at 1 to 16 clients, and lose at 64, where a staging record per transfer costs
/// more fsyncs and smaller frames than one decision fsync per burst of votes.
pub const PARALLEL_COMMITS_MAX: usize = 8;

/// The one source of the core's defaults: the coordinator's flags start from it, and the simulator and the
/// model check override only what they mean to (the shard count and the coordinator's URL are the shell's).
impl Default for CoreConfig {
    fn default() -> Self {
        CoreConfig {
            shard_count: 1,
            coordinator_url: String::new(),
            prepare_timeout_ms: PREPARE_TIMEOUT_MS,
            redeliver_after_ms: REDELIVER_AFTER_MS,
            transfers_in_flight_max: TRANSFERS_IN_FLIGHT_MAX,
            frame_items_max: crate::msg::FRAME_ITEMS_MAX,
            parallel_commits_max: PARALLEL_COMMITS_MAX,
            hold_second_ms: HOLD_SECOND_MS,
        }
    }
}

/// A write the shell applies to its log, in order.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum LogWrite {
    /// A transfer whose Prepares go out now. Durable, with a YES from every shard, it is committed; recovery
    /// finishes every staged transfer that has no decision (see the module docs). The commit that follows needs no
    /// sync, but while a staged transfer has no durable decision it holds back the "acked before" mark as an owed
    /// commit does.
    Stage {
        /// The transfer staged.
        id: TransferId,
        /// The transfer as its client asked for it: what recovery prepares again.
        transfer: Transfer,
        /// The shards it touches.
        shards: Vec<ShardId>,
        /// The name of the API token that submitted it.
        made_by: Option<String>,
    },
    /// The decision of a transfer, with (for a commit) the marker that it is still owed acks.
    Decision {
        /// The transfer decided.
        id: TransferId,
        /// The transfer as its client asked for it, kept for retries and decision queries.
        transfer: Transfer,
        /// The decision, or a hold's grant.
        outcome: Outcome,
        /// The shards the transfer touches, which a commit must reach (none for a presumed abort).
        shards: Vec<ShardId>,
        /// The name of the API token that submitted it (none for a presumed abort).
        made_by: Option<String>,
    },
    /// Every shard has applied the commit: its owed-acks marker goes. Needs no sync: if lost, recovery re-sends
    /// a commit the shards acknowledge again without applying it twice.
    End {
        /// The transfer every shard has acknowledged.
        id: TransferId,
    },
}

/// What the shell must write, and whether it must then wait for a sync and report it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct LogBatch {
    /// The writes, to apply in this order.
    pub writes: Vec<LogWrite>,
    /// Call [`CoordinatorCore::handle_synced`] with this once every write so far is durable.
    pub sync: Option<u64>,
}

/// Something final the shell may now tell someone: every write it depends on is durable.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Answer {
    /// The outcome of a transfer, for every client waiting on `id`.
    Transfer {
        /// The transfer answered.
        id: TransferId,
        /// The transfer as its client asked for it, for the answer's body.
        transfer: Transfer,
        /// How it ended, or that the hold is granted.
        outcome: Outcome,
    },
    /// The answers to one decision query, in the order of its items.
    Queries {
        /// The number [`CoordinatorCore::handle_query`] returned for the query.
        query: u64,
        /// One answer per item.
        answers: Vec<QueryAnswer>,
    },
}

/// The coordinator's log as the core reads it: the decision logged for a transfer, if any. It must see every
/// write the shell has applied from [`CoordinatorCore::poll_log`], durable or not (the core counts its own
/// decisions not yet handed out as logged). The shell, the simulator and the model check each implement it over
/// their log; the core reads it only where a rule needs it, so no shell repeats when to read it.
pub trait DecisionLog {
    /// The record logged for `id`, if any, counting writes applied and not yet durable.
    fn decision(&self, id: &TransferId) -> Result<Option<TransferRecord>, LogUnreadable>;
}

/// The log could not be read (the shell has said why): the request that needed it fails, and changes nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
#[error("the decision log cannot be read")]
pub struct LogUnreadable;

impl DecisionLog for BTreeMap<TransferId, TransferRecord> {
    fn decision(&self, id: &TransferId) -> Result<Option<TransferRecord>, LogUnreadable> {
        Ok(self.get(id).cloned())
    }
}

/// Why a submission was not taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SubmitError {
    /// The id is known with a different body.
    IdempotencyConflict,
    /// `transfers_in_flight_max` transfers are being decided: the client may retry later.
    Overloaded,
    /// [`HOLDS_ACTIVE_MAX`] holds are granted or being granted.
    HoldsFull,
    /// The log could not be read to check the id: nothing was taken.
    LogUnreadable,
}

/// How a client ends a hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HoldEnd {
    /// Commit this much of it (all of it by default) and release the rest.
    Capture(Option<i64>),
    /// Move nothing and release it all: an abort.
    Release,
}

/// Why a hold's end was not taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HoldError {
    /// No transfer or hold has this id.
    NotFound,
    /// The id is a transfer, not a hold.
    NotAHold,
    /// The hold is not active: it is being granted or ended (`pending`), was refused, or ended in another way
    /// (its status).
    NotActive(&'static str),
    /// A capture of a hold that has expired.
    Expired,
    /// A capture of more than the hold holds (or of nothing).
    BadAmount {
        /// What the hold holds, in minor units.
        held: i64,
    },
    /// The log could not be read: nothing was changed.
    LogUnreadable,
}

/// A granted hold, as the log holds it: what [`CoordinatorCore::with_holds`] takes after a restart.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct GrantedHold {
    /// The hold's id.
    pub id: TransferId,
    /// The hold as its client asked for it.
    pub transfer: Transfer,
    /// The name of the API token that submitted it.
    pub made_by: Option<String>,
    /// When it expires unless captured or released first.
    pub expires_at_unix_ms: u64,
}

/// Events worth a log line or a metric; the core itself says nothing.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Notice {
    /// A shard refused a decision: it contradicts the shard's state, and needs an operator.
    Refused {
        /// The transfer decided.
        id: TransferId,
        /// The shard that refused.
        shard: ShardId,
        /// The decision it refused.
        decision: Decision,
    },
    /// A decision query about a transfer with no decision and none in progress: presumed abort, logged.
    PresumedAbort {
        /// The transfer asked about.
        id: TransferId,
    },
    /// One item of a decision query was answered.
    QueryAnswered {
        /// The answer given.
        answer: QueryAnswer,
    },
    /// A transfer's prepare round to `shard` ended without a vote (timeout or lost link).
    ShardSilent {
        /// The transfer whose prepare round ended.
        id: TransferId,
        /// The shard that did not vote.
        shard: ShardId,
    },
    /// Work is waiting for a shard whose link is down: the shell should try to connect now.
    LinkWanted {
        /// The shard to connect to.
        shard: ShardId,
    },
    /// Decisions owed to a shard were queued again (timer or reconnection).
    Redelivered {
        /// The shard they go to.
        shard: ShardId,
        /// How many decisions were queued.
        count: usize,
    },
}

/// What a shell does with what the core asks for: [`drain`] hands it over. The engine, the simulator and the
/// model check each implement it, so the order in which the core's output is carried out is one rule.
pub trait CoreShell {
    /// Why the shell cannot go on (the simulator's and the model's checks; the engine's never fails).
    type Error;
    /// The core the shell drives.
    fn core(&mut self) -> &mut CoordinatorCore;
    /// Applies the writes to the log, in order; with a barrier, makes them durable and then reports it
    /// ([`CoordinatorCore::handle_synced`]).
    fn write_log(&mut self, batch: LogBatch) -> Result<(), Self::Error>;
    /// Sends a frame to `shard` on its current link (or reports the link lost).
    fn transmit(&mut self, shard: ShardId, items: Vec<ToShard>) -> Result<(), Self::Error>;
    /// Tells whoever waits for it: every write it depends on is durable.
    fn release(&mut self, answer: Answer) -> Result<(), Self::Error>;
    /// A log line, a metric, or a link to try now.
    fn notice(&mut self, notice: Notice) -> Result<(), Self::Error>;
}

/// Carries out everything the core asks for, until it asks for nothing more: its log writes first (a frame or
/// an answer may depend on them), then its frames, its answers and its notices, and again while any of them
/// made more.
pub fn drain<S: CoreShell + ?Sized>(shell: &mut S) -> Result<(), S::Error> {
    loop {
        let mut progressed = false;
        while let Some(batch) = shell.core().poll_log() {
            progressed = true;
            shell.write_log(batch)?;
        }
        while let Some((shard, items)) = shell.core().poll_transmit() {
            progressed = true;
            shell.transmit(shard, items)?;
        }
        while let Some(answer) = shell.core().poll_answer() {
            progressed = true;
            shell.release(answer)?;
        }
        while let Some(notice) = shell.core().poll_notice() {
            shell.notice(notice)?;
        }
        if !progressed {
            return Ok(());
        }
    }
}

/// The shell's link to one shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LinkState {
    /// Not yet connected since start: work is queued, and goes once the link is up (or fails by its deadline).
    Connecting,
    /// Connected: queued work goes out in frames.
    Up,
    /// Lost, or the shard refused or did not answer a connection. New work makes it `Connecting` again and
    /// asks the shell for a fresh attempt ([`Notice::LinkWanted`]); a failed attempt fails the work at once,
    /// as a refused connection does.
    Down,
}

/// A transfer whose prepare round or decision logging is under way.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Run {
    machine: TransferMachine,
    made_by: Option<String>,
    /// It has a staging record (parallel commits), not necessarily durable yet.
    parallel: bool,
    /// Its staging record is durable: a YES from every shard commits it.
    staged: bool,
    /// Staged by an earlier life of the coordinator, and finished by this one: its Prepares go again until
    /// every shard answers, and silence never aborts it.
    recovering: Option<Recovering>,
    /// A hold, granted at this time if every shard votes YES.
    expires_at_ms: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Recovering {
    /// When its Prepares were last queued (0: never by this life).
    last_sent_ms: u64,
}

/// A staged transfer the log holds no decision for: what [`CoordinatorCore::new`] finishes after a restart.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct StagedTransfer {
    /// The transfer staged.
    pub id: TransferId,
    /// The transfer as its client asked for it: what is prepared again.
    pub transfer: Transfer,
    /// The name of the API token that submitted it.
    pub made_by: Option<String>,
}

/// A durable decision some shard has not acknowledged yet.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Owed {
    machine: TransferMachine,
    decided_at_ms: u64,
    last_sent_ms: u64,
}

/// What becomes possible once a sync barrier is durable.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum AfterSync {
    /// The staging record of a transfer is durable.
    Staged(TransferId),
    Decided(TransferId),
    Answer(Answer),
}

/// A decided transfer some shard still owes an ack (for the in-doubt listing).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwedView {
    /// The transfer decided.
    pub id: TransferId,
    /// The decision the shards are owed.
    pub decision: Decision,
    /// How long ago it was decided (for a decision read back after a restart: how long since the restart).
    pub age_ms: u64,
    /// The shards that have not acknowledged it.
    pub awaiting_shards: Vec<ShardId>,
}

/// The sizes of what a core holds ([`CoordinatorCore::in_memory`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InMemory {
    /// Transfers being decided (at most `transfers_in_flight_max`, plus recovered staged ones).
    pub running: usize,
    /// Decided transfers some shard has not acknowledged.
    pub owed: usize,
    /// Granted holds (at most [`HOLDS_ACTIVE_MAX`]).
    pub holds: usize,
    /// Items waiting for a shard's link.
    pub queued: usize,
    /// Decisions made but not yet handed to the shell.
    pub unlogged: usize,
}

/// The coordinator's core; see the module docs.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CoordinatorCore {
    config: CoreConfig,
    // Ordered maps: the core must be deterministic (the simulator replays a seed exactly).
    running: BTreeMap<TransferId, Run>,
    owed: BTreeMap<TransferId, Owed>,
    /// Work queued per shard, in the order the shard must see it.
    outbox: Vec<VecDeque<ToShard>>,
    /// The state of the shell's link to each shard.
    links: Vec<LinkState>,
    /// Prepare deadlines in the order they were set (all are `now + prepare_timeout_ms`, so already sorted).
    deadlines: VecDeque<(u64, TransferId)>,
    log: Vec<LogWrite>,
    /// The last barrier handed out, and the last one reported durable.
    barrier_issued: u64,
    barrier_synced: u64,
    /// Something waits for the next barrier, which is not handed out yet.
    sync_wanted: bool,
    after_sync: VecDeque<(u64, AfterSync)>,
    answers: VecDeque<Answer>,
    notices: VecDeque<Notice>,
    next_query: u64,
    /// When the owed decisions are next checked for re-delivery.
    next_redeliver_ms: u64,
    /// Runs that are recovered staged transfers.
    recovering: usize,
    /// Decisions in `log`, not yet handed to the shell: what its reads of the log cannot see yet.
    unlogged: BTreeMap<TransferId, (Transfer, Outcome)>,
    /// Presumed aborts not yet durable, with the barrier that makes them so: a request to end a hold is told
    /// nothing from them before then. As many as the decision queries answered in one sync's time.
    presumed_unsynced: BTreeMap<TransferId, u64>,
    /// Granted holds, and their expiries in time order.
    holds: BTreeMap<TransferId, GrantedHold>,
    expiries: BTreeSet<(u64, TransferId)>,
}

impl CoordinatorCore {
    /// A core after a (re)start: `unacked` are the committed decisions the log still marks as owed acks, and
    /// `staged` the staged transfers it holds no decision for, which this core prepares again and decides.
    pub fn new(
        config: CoreConfig,
        now_ms: u64,
        unacked: Vec<(TransferId, TransferRecord)>,
        staged: Vec<StagedTransfer>,
    ) -> Self {
        assert!(config.shard_count > 0 && config.frame_items_max > 0 && config.transfers_in_flight_max > 0);
        let shards = config.shard_count as usize;
        let owed = unacked
            .into_iter()
            .map(|(id, record)| {
                let unacked: BTreeSet<ShardId> = record.shards.iter().copied().collect();
                let machine =
                    TransferMachine::recovered(id, record.transfer, record.outcome, unacked, config.shard_count);
                // Never sent by this incarnation: due at the first re-delivery check, or when a link comes up.
                (id, Owed { machine, decided_at_ms: now_ms, last_sent_ms: 0 })
            })
            .collect();
        let running = staged
            .into_iter()
            .map(|s| {
                let machine = TransferMachine::new(s.id, s.transfer, config.shard_count);
                let recovering = Some(Recovering { last_sent_ms: 0 });
                let run =
                    Run { machine, made_by: s.made_by, parallel: true, staged: true, recovering, expires_at_ms: None };
                (s.id, run)
            })
            .collect::<BTreeMap<_, _>>();
        CoordinatorCore {
            recovering: running.len(),
            unlogged: BTreeMap::new(),
            presumed_unsynced: BTreeMap::new(),
            running,
            owed,
            outbox: vec![VecDeque::new(); shards],
            links: vec![LinkState::Connecting; shards],
            deadlines: VecDeque::new(),
            log: Vec::new(),
            barrier_issued: 0,
            barrier_synced: 0,
            sync_wanted: false,
            after_sync: VecDeque::new(),
            answers: VecDeque::new(),
            notices: VecDeque::new(),
            next_query: 0,
            next_redeliver_ms: now_ms,
            config,
            holds: BTreeMap::new(),
            expiries: BTreeSet::new(),
        }
    }

    /// The holds the log holds granted and not ended (after a restart). Those past their expiry expire at the
    /// first [`CoordinatorCore::handle_timeout`].
    pub fn with_holds(mut self, holds: Vec<GrantedHold>) -> Self {
        for hold in holds {
            self.expiries.insert((hold.expires_at_unix_ms, hold.id));
            self.holds.insert(hold.id, hold);
        }
        self
    }

    /// The settings the core was made with.
    pub fn config(&self) -> &CoreConfig {
        &self.config
    }

    /// A client asks for transfer `id`. Unless `id` is running here, the core reads what `log` holds for it
    /// (a decision this core made and has not handed out in [`CoordinatorCore::poll_log`] yet counts as
    /// logged). On `Ok`, an [`Answer::Transfer`] for `id` follows.
    pub fn handle_submit(
        &mut self,
        now_ms: u64,
        id: TransferId,
        transfer: Transfer,
        made_by: Option<String>,
        log: &dyn DecisionLog,
    ) -> Result<(), SubmitError> {
        if let Some(run) = self.running.get(&id) {
            return if run.machine.transfer == transfer { Ok(()) } else { Err(SubmitError::IdempotencyConflict) };
        }
        let granted = self
            .holds
            .get(&id)
            .map(|h| (h.transfer.clone(), Outcome::Held { expires_at_unix_ms: h.expires_at_unix_ms }));
        let logged = match granted.or_else(|| self.unlogged.get(&id).cloned()) {
            Some(known) => Some(known),
            None => log.decision(&id).map_err(|_| SubmitError::LogUnreadable)?.map(|r| (r.transfer, r.outcome)),
        };
        if let Some((logged_transfer, outcome)) = logged {
            if logged_transfer != transfer {
                return Err(SubmitError::IdempotencyConflict);
            }
            // A decision query may have written it a moment ago: answer only once it is surely durable.
            let answer = Answer::Transfer { id, transfer, outcome };
            self.after_next_sync(AfterSync::Answer(answer));
            return Ok(());
        }
        if self.running.len() >= self.config.transfers_in_flight_max {
            return Err(SubmitError::Overloaded);
        }
        let expires_at_ms = transfer
            .hold_seconds()
            .map(|seconds| now_ms.saturating_add(u64::from(seconds) * self.config.hold_second_ms));
        if expires_at_ms.is_some() {
            let granting = self.running.values().filter(|r| r.expires_at_ms.is_some()).count();
            if self.holds.len() + granting >= HOLDS_ACTIVE_MAX {
                return Err(SubmitError::HoldsFull);
            }
        }
        let machine = TransferMachine::new(id, transfer, self.config.shard_count);
        let shards = machine.shards();
        // A hold is never staged: a staged transfer with every YES is committed, and a hold is not.
        let parallel = expires_at_ms.is_none() && self.running.len() < self.config.parallel_commits_max;
        if parallel {
            self.log.push(LogWrite::Stage {
                id,
                transfer: machine.transfer.clone(),
                shards: shards.clone(),
                made_by: made_by.clone(),
            });
            self.after_next_sync(AfterSync::Staged(id));
        }
        self.running.insert(id, Run { machine, made_by, parallel, staged: false, recovering: None, expires_at_ms });
        self.deadlines.push_back((now_ms + self.config.prepare_timeout_ms, id));
        for shard in shards {
            self.want_link(shard);
            self.queue_prepare(id, shard);
        }
        Ok(())
    }

    fn queue_prepare(&mut self, id: TransferId, shard: ShardId) {
        let run = &self.running[&id];
        let item = PrepareItem {
            id,
            transfer: run.machine.transfer.clone(),
            postings: run.machine.transfer.postings_for(shard, self.config.shard_count),
            coordinator_url: self.config.coordinator_url.clone(),
        };
        self.outbox[shard as usize].push_back(ToShard::Prepare { item, made_by: run.made_by.clone() });
    }

    /// Answers arrived from `shard`.
    pub fn handle_replies(&mut self, now_ms: u64, shard: ShardId, replies: Vec<FromShard>) {
        for reply in replies {
            match reply {
                FromShard::Vote { id, vote } => self.vote(now_ms, id, shard, VoteResult::Vote(vote)),
                FromShard::Ack { id, decision, ack } => self.ack(id, shard, decision, ack),
                // Reads are routed by the shell; the core only orders them.
                FromShard::Account { .. } => {}
            }
        }
    }

    /// The shell's link to `shard` came up (a fresh connection) or went down (closed, failed, silent, or could
    /// not be opened).
    pub fn handle_link(&mut self, now_ms: u64, shard: ShardId, up: bool) {
        let s = shard as usize;
        self.links[s] = if up { LinkState::Up } else { LinkState::Down };
        if up {
            // Decisions owed to this shard go first, before any new work or read on the fresh link: a shard
            // that restarted must apply them before it answers a read, or a client could see money unmoved.
            self.redeliver(now_ms, Some(shard), true);
            self.prepare_recovering(now_ms, Some(shard));
            return;
        }
        // Whatever was queued or in flight on the old link may be lost. Decisions stay owed and go again on
        // the next link; a prepare round waiting for this shard ends now, as for a refused connection.
        self.outbox[s].clear();
        let waiting: Vec<TransferId> =
            self.running.iter().filter(|(_, run)| awaits_vote(&run.machine, shard)).map(|(id, _)| *id).collect();
        for id in waiting {
            self.notices.push_back(Notice::ShardSilent { id, shard });
            self.vote(now_ms, id, shard, VoteResult::Unavailable);
        }
    }

    /// A participant asks what became of `items`; the core reads what `log` holds for each (as for
    /// `handle_submit`, a decision not handed out yet counts). An [`Answer::Queries`] with the returned number
    /// follows, once every answer is durable. If the log cannot be read, nothing is answered or logged.
    pub fn handle_query(&mut self, items: Vec<DecisionQueryItem>, log: &dyn DecisionLog) -> Result<u64, LogUnreadable> {
        let mut read = Vec::with_capacity(items.len());
        for item in &items {
            read.push(log.decision(&item.id)?.map(|r| (r.transfer, r.outcome)));
        }
        self.next_query += 1;
        let query = self.next_query;
        let mut answers = Vec::with_capacity(items.len());
        for (item, logged) in items.into_iter().zip(read) {
            // A shell may feed several inputs before it drains the log: a transfer committed by the first is no
            // longer running, and its decision not yet in the log it reads. Presuming it aborted would contradict
            // the Commit already on its way.
            let logged = self.unlogged.get(&item.id).cloned().or(logged);
            // A shard may hold a body that a client sent under an id it then reused for another, after a crash
            // erased the first here before it was logged. That body was never decided (a decision never
            // changes, and this one is for another body), and can no longer be: it aborts.
            let other_body = match (self.running.get(&item.id), &logged) {
                (Some(run), _) => run.machine.transfer != item.transfer,
                (None, Some((transfer, _))) => *transfer != item.transfer,
                (None, None) => false,
            };
            let plan = if other_body {
                QueryPlan::Answer(QueryAnswer::Abort)
            } else {
                plan_query_answer(self.running.contains_key(&item.id), logged.map(|(_, outcome)| outcome))
            };
            let answer = match plan {
                QueryPlan::Answer(answer) => answer,
                // Past the bound, the shard hears "pending" and asks again once earlier aborts are durable.
                QueryPlan::LogAbortThenAnswer if self.presumed_unsynced.len() >= PRESUMED_UNSYNCED_MAX => {
                    QueryAnswer::Pending
                }
                QueryPlan::LogAbortThenAnswer => {
                    let outcome = Outcome::Aborted(AbortReason::CoordinatorRestarted);
                    self.unlogged.insert(item.id, (item.transfer.clone(), outcome));
                    // Written now, so the next barrier handed out covers it.
                    self.presumed_unsynced.insert(item.id, self.barrier_issued + 1);
                    self.log.push(LogWrite::Decision {
                        id: item.id,
                        transfer: item.transfer,
                        outcome,
                        shards: Vec::new(),
                        made_by: None,
                    });
                    self.notices.push_back(Notice::PresumedAbort { id: item.id });
                    QueryAnswer::Abort
                }
            };
            self.notices.push_back(Notice::QueryAnswered { answer });
            answers.push(answer);
        }
        // Every answer waits for a sync, not only the presumed aborts: a commit or abort read from the log may
        // itself not be durable yet.
        self.after_next_sync(AfterSync::Answer(Answer::Queries { query, answers }));
        Ok(query)
    }

    /// A client ends hold `id`; the core reads `log` as for `handle_submit`. On `Ok`, an [`Answer::Transfer`]
    /// for `id` follows: the end's outcome once it is durable (a repeated request gets the same one).
    pub fn handle_end_hold(
        &mut self,
        now_ms: u64,
        id: TransferId,
        end: HoldEnd,
        log: &dyn DecisionLog,
    ) -> Result<(), HoldError> {
        if let Some(hold) = self.holds.get(&id) {
            let held = hold.transfer.single().map_or(0, |leg| leg.amount.minor());
            if now_ms >= hold.expires_at_unix_ms {
                self.end_hold(id, Outcome::Expired);
                return Err(match end {
                    HoldEnd::Capture(_) => HoldError::Expired,
                    HoldEnd::Release => HoldError::NotActive(Outcome::Expired.status()),
                });
            }
            let outcome = match end {
                HoldEnd::Capture(amount) => {
                    let amount = amount.unwrap_or(held);
                    if !(1..=held).contains(&amount) {
                        return Err(HoldError::BadAmount { held });
                    }
                    Outcome::Captured { amount }
                }
                HoldEnd::Release => Outcome::Released,
            };
            self.end_hold(id, outcome);
            return Ok(());
        }
        // Not granted here: being granted or ended (running), or known only to the log.
        let (transfer, outcome) = match self.running.get(&id) {
            Some(run) => match run.machine.phase() {
                Phase::Logging { outcome, .. } | Phase::Decided { outcome, .. } => {
                    (run.machine.transfer.clone(), Some(*outcome))
                }
                Phase::Preparing { .. } => (run.machine.transfer.clone(), None),
            },
            // The shell reads its log before a sync: a presumed abort there may not survive a crash, and the
            // transfer, resubmitted, may still be granted.
            None if self.presumed_unsynced.contains_key(&id) => return Err(HoldError::NotActive("pending")),
            None => {
                // A decision not handed out yet is newer than the log.
                let logged = match self.unlogged.get(&id).cloned() {
                    Some(known) => Some(known),
                    None => log.decision(&id).map_err(|_| HoldError::LogUnreadable)?.map(|r| (r.transfer, r.outcome)),
                };
                let (transfer, outcome) = logged.ok_or(HoldError::NotFound)?;
                (transfer, Some(outcome))
            }
        };
        let Some(held) = transfer.hold_seconds().and(transfer.single()).map(|leg| leg.amount.minor()) else {
            return Err(HoldError::NotAHold);
        };
        let same = match (end, outcome) {
            (HoldEnd::Capture(amount), Some(Outcome::Captured { amount: captured })) => {
                amount.unwrap_or(held) == captured
            }
            (HoldEnd::Release, Some(Outcome::Released)) => true,
            (HoldEnd::Capture(_), Some(Outcome::Expired)) => return Err(HoldError::Expired),
            _ => false,
        };
        match outcome {
            Some(outcome) if same => {
                if !self.running.contains_key(&id) {
                    // Ended before: the same answer again, once the record it comes from is surely durable.
                    self.after_next_sync(AfterSync::Answer(Answer::Transfer { id, transfer, outcome }));
                }
                Ok(())
            }
            // Another end (or the grant) is being logged and is not durable yet: a crash now would lose it, so
            // nobody may hear of it, and the hold is only pending. An expiry is told at once, as above: once its
            // time has passed nothing else can end the hold, after a restart either.
            Some(outcome) if self.running.contains_key(&id) && outcome != Outcome::Expired => {
                Err(HoldError::NotActive("pending"))
            }
            Some(outcome) => Err(HoldError::NotActive(outcome.status())),
            None => Err(HoldError::NotActive("pending")),
        }
    }

    /// Every log write handed out with barriers up to `barrier` is durable.
    pub fn handle_synced(&mut self, now_ms: u64, barrier: u64) {
        self.barrier_synced = self.barrier_synced.max(barrier);
        let synced = self.barrier_synced;
        self.presumed_unsynced.retain(|_, b| *b > synced);
        while let Some((b, _)) = self.after_sync.front() {
            if *b > self.barrier_synced {
                break;
            }
            let Some((_, after)) = self.after_sync.pop_front() else { break };
            match after {
                AfterSync::Answer(answer) => self.answers.push_back(answer),
                AfterSync::Staged(id) => self.staged(now_ms, id),
                AfterSync::Decided(id) => self.decided(now_ms, id),
            }
        }
    }

    /// Time passed: prepare rounds past their deadline end, holds past their expiry expire, and owed decisions
    /// are sent again.
    pub fn handle_timeout(&mut self, now_ms: u64) {
        while let Some(&(expires_at, id)) = self.expiries.first() {
            if expires_at > now_ms {
                break;
            }
            self.end_hold(id, Outcome::Expired);
        }
        while let Some(&(deadline, id)) = self.deadlines.front() {
            if deadline > now_ms {
                break;
            }
            self.deadlines.pop_front();
            let Some(run) = self.running.get_mut(&id) else { continue };
            if run.recovering.is_some() {
                continue; // not reached: recovered transfers get no deadline
            }
            let silent: Vec<ShardId> = (0..self.config.shard_count).filter(|s| awaits_vote(&run.machine, *s)).collect();
            if let Some(outcome) = run.machine.on_prepare_timeout() {
                for shard in silent {
                    self.notices.push_back(Notice::ShardSilent { id, shard });
                }
                self.chosen(now_ms, id, outcome);
            }
        }
        if now_ms >= self.next_redeliver_ms {
            self.next_redeliver_ms = now_ms + (self.config.redeliver_after_ms / 2).max(1);
            self.redeliver(now_ms, None, false);
            self.prepare_recovering(now_ms, None);
        }
    }

    /// Queues a read of `account` to `shard`, behind everything already queued there. If the link is lost
    /// before it goes, the shell fails it.
    pub fn queue_read(&mut self, shard: ShardId, read: u64, account: AccountId) {
        self.want_link(shard);
        self.outbox[shard as usize].push_back(ToShard::Read { read, account });
    }

    /// New work for a shard whose link is down: ask the shell to try connecting now, as a plain request would.
    /// If that fails too, the work fails at once ([`CoordinatorCore::handle_link`] with `up: false`).
    fn want_link(&mut self, shard: ShardId) {
        if self.links[shard as usize] == LinkState::Down {
            self.links[shard as usize] = LinkState::Connecting;
            self.notices.push_back(Notice::LinkWanted { shard });
        }
    }

    /// The next log writes to apply, with a barrier to sync when something waits on them.
    pub fn poll_log(&mut self) -> Option<LogBatch> {
        if self.log.is_empty() && !self.sync_wanted {
            return None;
        }
        let sync = self.sync_wanted.then(|| {
            self.sync_wanted = false;
            self.barrier_issued += 1;
            self.barrier_issued
        });
        self.unlogged.clear();
        Some(LogBatch { writes: std::mem::take(&mut self.log), sync })
    }

    /// The next frame to send: up to `frame_items_max` items for one shard, in order.
    pub fn poll_transmit(&mut self) -> Option<(ShardId, Vec<ToShard>)> {
        let max = self.config.frame_items_max;
        let links = &self.links;
        let (shard, queue) =
            self.outbox.iter_mut().enumerate().find(|(s, q)| links[*s] == LinkState::Up && !q.is_empty())?;
        let take = queue.len().min(max);
        Some((shard as ShardId, queue.drain(..take).collect()))
    }

    /// The next answer the shell may release: every write it depends on is durable.
    pub fn poll_answer(&mut self) -> Option<Answer> {
        self.answers.pop_front()
    }

    /// The next event worth a log line or a metric.
    pub fn poll_notice(&mut self) -> Option<Notice> {
        self.notices.pop_front()
    }

    /// When the shell must call [`CoordinatorCore::handle_timeout`] next, if ever.
    pub fn poll_timeout(&self) -> Option<u64> {
        let prepare = self.deadlines.front().map(|(at, _)| *at);
        let redeliver = (!self.owed.is_empty() || self.recovering > 0).then_some(self.next_redeliver_ms);
        let expiry = self.expiries.first().map(|(at, _)| *at);
        prepare.into_iter().chain(redeliver).chain(expiry).min()
    }

    /// The transfer as it runs here (`None` once decided and answered: then the log knows it).
    pub fn running(&self, id: &TransferId) -> Option<&Transfer> {
        self.running.get(id).map(|r| &r.machine.transfer)
    }

    /// Every transfer being prepared or logged, in id order.
    pub fn running_transfers(&self) -> impl Iterator<Item = (&TransferId, &Transfer)> {
        self.running.iter().map(|(id, r)| (id, &r.machine.transfer))
    }

    /// `id` runs with a staging record (parallel commits), durable or not yet.
    pub fn is_staged(&self, id: &TransferId) -> bool {
        self.running.get(id).is_some_and(|r| r.parallel)
    }

    /// How many transfers are being prepared or logged.
    pub fn running_count(&self) -> usize {
        self.running.len()
    }

    /// Decided transfers still owed an ack, oldest first.
    pub fn owed(&self, now_ms: u64) -> Vec<OwedView> {
        let mut list: Vec<OwedView> = self
            .owed
            .iter()
            .filter_map(|(id, o)| match o.machine.phase() {
                Phase::Decided { outcome, unacked } => Some(OwedView {
                    id: *id,
                    decision: decision_of(*outcome),
                    age_ms: now_ms.saturating_sub(o.decided_at_ms),
                    awaiting_shards: unacked.iter().copied().collect(),
                }),
                _ => None,
            })
            .collect();
        list.sort_by_key(|o| (std::cmp::Reverse(o.age_ms), o.id));
        list
    }

    /// What the core holds, by kind: each is bounded by the transfers in flight or owed acks, none by history.
    pub fn in_memory(&self) -> InMemory {
        InMemory {
            running: self.running.len(),
            owed: self.owed.len(),
            holds: self.holds.len(),
            queued: self.outbox.iter().map(VecDeque::len).sum(),
            unlogged: self.unlogged.len(),
        }
    }

    /// Panics if an invariant is broken (the simulator calls it after every step, the model check on every
    /// state): the barriers' order, what waits for them, and every queue within its named bound.
    pub fn check_invariants(&self) {
        assert!(
            self.barrier_synced <= self.barrier_issued,
            "barrier {} synced, {} issued",
            self.barrier_synced,
            self.barrier_issued
        );
        let waits: Vec<u64> = self.after_sync.iter().map(|(b, _)| *b).collect();
        assert!(waits.windows(2).all(|w| w[0] <= w[1]), "what waits for a sync is out of barrier order");
        assert!(waits.iter().all(|b| *b <= self.barrier_issued + 1), "something waits for a barrier never to come");
        assert!(
            self.sync_wanted || waits.iter().all(|b| *b <= self.barrier_issued),
            "something waits for the next barrier, and none is wanted"
        );
        let recovered = self.running.values().filter(|r| r.recovering.is_some()).count();
        assert_eq!(recovered, self.recovering, "the count of recovered runs");
        let fresh = self.running.len() - recovered;
        assert!(fresh <= self.config.transfers_in_flight_max, "{fresh} transfers running past the limit");
        assert!(self.holds.len() <= HOLDS_ACTIVE_MAX, "{} holds granted", self.holds.len());
        assert_eq!(self.expiries.len(), self.holds.len(), "one expiry per granted hold");
        for (at, id) in &self.expiries {
            assert!(self.holds.get(id).is_some_and(|h| h.expires_at_unix_ms == *at), "an expiry with no hold: {id}");
        }
        for id in self.holds.keys() {
            assert!(!self.running.contains_key(id) && !self.owed.contains_key(id), "hold {id} is also deciding");
        }
        assert!(self.presumed_unsynced.len() <= PRESUMED_UNSYNCED_MAX, "too many presumed aborts not yet durable");
        assert!(
            self.presumed_unsynced.values().all(|b| *b > self.barrier_synced && *b <= self.barrier_issued + 1),
            "a presumed abort is waiting for a barrier already synced, or never to come"
        );
        assert!(self
            .unlogged
            .keys()
            .all(|id| self.log.iter().any(|w| matches!(w, LogWrite::Decision { id: d, .. } if d == id))));
        assert!(self.answers.len() <= POLLED_WAITING_MAX, "{} answers not taken", self.answers.len());
        assert!(self.notices.len() <= POLLED_WAITING_MAX, "{} notices not taken", self.notices.len());
        assert_eq!(self.links.len(), self.outbox.len());
        for (shard, queue) in self.outbox.iter().enumerate() {
            if self.links[shard] == LinkState::Down {
                assert!(queue.is_empty(), "work queued for shard {shard}, whose link is down");
            }
        }
    }

    /// Nothing running, owed, queued or waiting for a sync: the state a healed, quiet cluster reaches.
    pub fn is_idle(&self) -> bool {
        self.running.is_empty()
            && self.owed.is_empty()
            && self.after_sync.is_empty()
            && self.log.is_empty()
            && !self.sync_wanted
            && self.outbox.iter().all(VecDeque::is_empty)
    }

    /// How many decided transfers some shard has not acknowledged.
    pub fn owed_count(&self) -> usize {
        self.owed.len()
    }

    /// The granted holds (on `account`, debiting it, if given), soonest expiry first, at most `limit`.
    pub fn holds_of(&self, account: Option<&AccountId>, limit: usize) -> Vec<&GrantedHold> {
        let on = |hold: &&GrantedHold| {
            account.is_none_or(|account| hold.transfer.single().is_some_and(|leg| leg.from == *account))
        };
        self.expiries.iter().filter_map(|(_, id)| self.holds.get(id)).filter(on).take(limit).collect()
    }

    /// How many holds are granted.
    pub fn holds_count(&self) -> usize {
        self.holds.len()
    }

    /// A granted hold ends: its end is logged, then delivered to every shard like any decision.
    fn end_hold(&mut self, id: TransferId, outcome: Outcome) {
        let Some(hold) = self.holds.remove(&id) else { return };
        self.expiries.remove(&(hold.expires_at_unix_ms, id));
        // An answer is for every client waiting on the id, whatever each asked: a grant answered again (to a
        // repeated submission) and not yet handed out would reach the requester of this end too. The end's own
        // answer, once it is durable, serves them all.
        let regrant =
            |a: &Answer| matches!(a, Answer::Transfer { id: i, outcome: Outcome::Held { .. }, .. } if *i == id);
        self.answers.retain(|a| !regrant(a));
        self.after_sync.retain(|(_, after)| !matches!(after, AfterSync::Answer(a) if regrant(a)));
        let machine = TransferMachine::ending(id, hold.transfer, outcome, self.config.shard_count);
        let run = Run {
            machine,
            made_by: hold.made_by,
            parallel: false,
            staged: false,
            recovering: None,
            expires_at_ms: None,
        };
        self.running.insert(id, run);
        self.log_decision(id, outcome);
    }

    fn after_next_sync(&mut self, after: AfterSync) {
        self.sync_wanted = true;
        self.after_sync.push_back((self.barrier_issued + 1, after));
    }

    fn vote(&mut self, now_ms: u64, id: TransferId, shard: ShardId, vote: VoteResult) {
        let Some(run) = self.running.get_mut(&id) else {
            return; // A vote after the decision changes nothing.
        };
        if run.recovering.is_some() && vote == VoteResult::Unavailable {
            return; // Its client may have been told it committed: ask again, never presume.
        }
        if let Some(outcome) = run.machine.on_vote(shard, vote) {
            self.chosen(now_ms, id, outcome);
        }
    }

    /// The votes are in. A staged commit is final once the staging record is durable; any other decision once
    /// it is logged.
    fn chosen(&mut self, now_ms: u64, id: TransferId, outcome: Outcome) {
        let Some(run) = self.running.get_mut(&id) else { return };
        match outcome {
            // Every shard said YES to a hold: granted, not committed.
            Outcome::Committed if run.expires_at_ms.is_some() => {
                let held = run.machine.grant(run.expires_at_ms.unwrap_or_default());
                self.log_decision(id, held);
            }
            Outcome::Committed if run.staged => self.commit(now_ms, id),
            Outcome::Committed if run.parallel => {} // `staged` commits it once the staging record is durable
            _ => self.log_decision(id, outcome),
        }
    }

    /// The staging record of `id` is durable.
    fn staged(&mut self, now_ms: u64, id: TransferId) {
        let Some(run) = self.running.get_mut(&id) else {
            return; // decided (an abort) in the same sync
        };
        run.staged = true;
        if matches!(run.machine.phase(), Phase::Logging { outcome: Outcome::Committed, .. }) {
            self.commit(now_ms, id);
        }
    }

    /// Staged and voted YES everywhere: committed. The decision record is logged for the readers of the log and
    /// for recovery's sake, but nobody waits for it to be durable.
    fn commit(&mut self, now_ms: u64, id: TransferId) {
        self.push_decision(id, Outcome::Committed);
        self.decided(now_ms, id);
    }

    /// Queues the Prepares of recovered transfers again to the shards that have not voted: all that are due
    /// (or every one, to `only` a shard whose link just came up).
    fn prepare_recovering(&mut self, now_ms: u64, only: Option<ShardId>) {
        if self.recovering == 0 {
            return;
        }
        let after = self.config.redeliver_after_ms;
        let mut due = Vec::new();
        for (id, run) in self.running.iter_mut() {
            let Some(recovering) = run.recovering.as_mut() else { continue };
            if only.is_none() && recovering.last_sent_ms != 0 && now_ms.saturating_sub(recovering.last_sent_ms) < after
            {
                continue;
            }
            let mut sent = false;
            for shard in (0..self.config.shard_count).filter(|s| only.is_none_or(|o| o == *s)) {
                if awaits_vote(&run.machine, shard) && self.links[shard as usize] == LinkState::Up {
                    due.push((*id, shard));
                    sent = true;
                }
            }
            if sent {
                recovering.last_sent_ms = now_ms.max(1);
            }
        }
        for (id, shard) in due {
            self.queue_prepare(id, shard);
        }
    }

    /// An abort, or a commit on the classic path, is chosen: it goes to the log, and nobody hears of it before
    /// the log is durable.
    fn log_decision(&mut self, id: TransferId, outcome: Outcome) {
        self.push_decision(id, outcome);
        self.after_next_sync(AfterSync::Decided(id));
    }

    fn push_decision(&mut self, id: TransferId, outcome: Outcome) {
        let run = &self.running[&id];
        self.unlogged.insert(id, (run.machine.transfer.clone(), outcome));
        self.log.push(LogWrite::Decision {
            id,
            transfer: run.machine.transfer.clone(),
            outcome,
            shards: run.machine.transfer.shards(self.config.shard_count),
            made_by: run.made_by.clone(),
        });
    }

    /// The decision of `id` is final (an abort durable, a commit staged and voted): tell the client, and the
    /// shards that prepared.
    fn decided(&mut self, now_ms: u64, id: TransferId) {
        let Some(Run { mut machine, recovering, made_by, .. }) = self.running.remove(&id) else {
            unreachable!("transfer {id} was logged while not running");
        };
        if recovering.is_some() {
            self.recovering -= 1;
        }
        if let Phase::Logging { outcome: outcome @ Outcome::Held { expires_at_unix_ms }, .. } = *machine.phase() {
            // Granted: the shards keep it prepared and hear nothing until it ends.
            let transfer = machine.transfer;
            self.answers.push_back(Answer::Transfer { id, transfer: transfer.clone(), outcome });
            self.expiries.insert((expires_at_unix_ms, id));
            self.holds.insert(id, GrantedHold { id, transfer, made_by, expires_at_unix_ms });
            return;
        }
        let (decision, targets) = machine.on_decision_logged();
        let outcome = match machine.phase() {
            Phase::Decided { outcome, .. } => *outcome,
            other => unreachable!("transfer {id} is not decided after its decision was logged: {other:?}"),
        };
        self.answers.push_back(Answer::Transfer { id, transfer: machine.transfer.clone(), outcome });
        if targets.is_empty() {
            return;
        }
        for shard in &targets {
            if self.links[*shard as usize] != LinkState::Down {
                self.outbox[*shard as usize].push_back(delivery(id, outcome, decision));
            }
        }
        self.owed.insert(id, Owed { machine, decided_at_ms: now_ms, last_sent_ms: now_ms });
    }

    fn ack(&mut self, id: TransferId, shard: ShardId, decision: Decision, ack: DecideAck) {
        if ack == DecideAck::Refused {
            self.notices.push_back(Notice::Refused { id, shard, decision });
            return;
        }
        let Some(owed) = self.owed.get_mut(&id) else {
            return; // A repeated ack, after the transfer ended.
        };
        if !owed.machine.unacked().contains(&shard) {
            return;
        }
        if owed.machine.on_ack(shard) {
            let owed = self.owed.remove(&id);
            // A commit and a hold's end are kept as owed in the log until every shard has them.
            if let Some(Phase::Decided { outcome, .. }) = owed.as_ref().map(|o| o.machine.phase()) {
                if *outcome == Outcome::Committed || outcome.ends_hold() {
                    self.log.push(LogWrite::End { id });
                }
            }
        }
    }

    /// Queues owed decisions again: those unacknowledged for `redeliver_after_ms` (or all, when `all`), to
    /// `only` shard or to every shard with a link.
    fn redeliver(&mut self, now_ms: u64, only: Option<ShardId>, all: bool) {
        let after = self.config.redeliver_after_ms;
        let mut counts = vec![0usize; self.outbox.len()];
        for (id, owed) in self.owed.iter_mut() {
            if !all && now_ms.saturating_sub(owed.last_sent_ms) < after {
                continue;
            }
            let Phase::Decided { outcome, unacked } = owed.machine.phase() else { continue };
            let (outcome, decision) = (*outcome, decision_of(*outcome));
            let mut sent = false;
            for shard in unacked.iter().copied().filter(|s| only.is_none_or(|o| o == *s)) {
                if self.links[shard as usize] == LinkState::Up {
                    self.outbox[shard as usize].push_back(delivery(*id, outcome, decision));
                    counts[shard as usize] += 1;
                    sent = true;
                }
            }
            if sent {
                owed.last_sent_ms = now_ms;
            }
        }
        for (shard, count) in counts.into_iter().enumerate() {
            if count > 0 {
                self.notices.push_back(Notice::Redelivered { shard: shard as ShardId, count });
            }
        }
    }
}

/// What delivers `outcome` to a shard: a capture of its amount, or the plain decision.
fn delivery(id: TransferId, outcome: Outcome, decision: Decision) -> ToShard {
    match outcome {
        Outcome::Captured { amount } => ToShard::Capture { id, amount },
        _ => ToShard::Decide { id, decision },
    }
}

fn awaits_vote(machine: &TransferMachine, shard: ShardId) -> bool {
    match machine.phase() {
        Phase::Preparing { votes } => votes.iter().any(|(s, v)| *s == shard && v.is_none()),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A log that holds `self` for whatever id is asked: enough for a test about one transfer.
    impl DecisionLog for Option<&TransferRecord> {
        fn decision(&self, _: &TransferId) -> Result<Option<TransferRecord>, LogUnreadable> {
            Ok(self.cloned())
        }
    }
    use crate::ledger::Amount;
    use crate::msg::{RefusalReason, Vote};

    fn config() -> CoreConfig {
        CoreConfig {
            shard_count: 2,
            coordinator_url: "http://c".into(),
            prepare_timeout_ms: 100,
            redeliver_after_ms: 1_000,
            transfers_in_flight_max: 8,
            frame_items_max: 64,
            parallel_commits_max: 8,
            hold_second_ms: HOLD_SECOND_MS,
        }
    }

    /// alice and bob sit on different shards of two (pinned in the ledger tests).
    fn transfer(amount: i64) -> Transfer {
        let id = |s: &str| AccountId::new(s).expect("valid id");
        Transfer::one(id("alice"), id("bob"), Amount::new(amount).expect("positive"))
    }

    fn up(core: &mut CoordinatorCore) {
        core.handle_link(0, 0, true);
        core.handle_link(0, 1, true);
    }

    fn drain_frames(core: &mut CoordinatorCore) -> Vec<(ShardId, Vec<ToShard>)> {
        std::iter::from_fn(|| core.poll_transmit()).collect()
    }

    fn vote_all(core: &mut CoordinatorCore, frames: &[(ShardId, Vec<ToShard>)], vote: Vote) {
        for (shard, items) in frames {
            let replies = items
                .iter()
                .filter_map(|i| match i {
                    ToShard::Prepare { item, .. } => Some(FromShard::Vote { id: item.id, vote }),
                    _ => None,
                })
                .collect();
            core.handle_replies(0, *shard, replies);
        }
    }

    fn hold(amount: i64, seconds: u32) -> Transfer {
        let id = |s: &str| AccountId::new(s).expect("valid id");
        Transfer::hold(id("alice"), id("bob"), Amount::new(amount).expect("positive"), seconds).expect("a hold")
    }

    /// Hands out the log's writes and reports them durable; returns them.
    fn sync(core: &mut CoordinatorCore, now: u64) -> Vec<LogWrite> {
        let batch = core.poll_log().expect("something to log");
        core.handle_synced(now, batch.sync.expect("a barrier"));
        batch.writes
    }

    #[test]
    fn a_hold_is_granted_then_ends_once_by_capture_release_or_expiry() {
        let mut core = CoordinatorCore::new(config(), 1_000, Vec::new(), Vec::new());
        up(&mut core);
        let (captured, released, expiring) =
            (TransferId::from_u128(1), TransferId::from_u128(2), TransferId::from_u128(3));
        for (id, seconds) in [(captured, 60), (released, 60), (expiring, 5)] {
            core.handle_submit(1_000, id, hold(10, seconds), None, &None).expect("taken");
        }
        let frames = drain_frames(&mut core);
        vote_all(&mut core, &frames, Vote::Yes);
        let writes = sync(&mut core, 1_000);
        assert!(
            writes.iter().all(|w| matches!(w, LogWrite::Decision { outcome: Outcome::Held { .. }, .. })),
            "{writes:?}"
        );
        assert!(matches!(writes[0], LogWrite::Decision { outcome: Outcome::Held { expires_at_unix_ms: 61_000 }, .. }));
        let granted: Vec<Outcome> = std::iter::from_fn(|| core.poll_answer())
            .filter_map(|a| match a {
                Answer::Transfer { outcome, .. } => Some(outcome),
                _ => None,
            })
            .collect();
        assert_eq!(granted.len(), 3);
        assert!(drain_frames(&mut core).is_empty(), "the shards hear nothing of a grant");
        assert_eq!(core.holds_count(), 3);
        core.handle_timeout(1_100); // the spent prepare deadlines
        assert_eq!(core.poll_timeout(), Some(6_000), "the soonest expiry");
        assert_eq!(
            core.handle_submit(1_000, captured, transfer(10), None, &None),
            Err(SubmitError::IdempotencyConflict)
        );

        // A capture is logged before anyone hears, then goes to every shard with its amount.
        let logged =
            |outcome| TransferRecord { transfer: hold(10, 60), outcome, shards: vec![0, 1], decided_at_unix_ms: 1_000 };
        assert_eq!(
            core.handle_end_hold(2_000, captured, HoldEnd::Capture(Some(11)), &None),
            Err(HoldError::BadAmount { held: 10 })
        );
        core.handle_end_hold(2_000, captured, HoldEnd::Capture(Some(4)), &None).expect("taken");
        // Until the capture is durable, a crash may lose it: another end hears only that the hold is pending.
        assert_eq!(
            core.handle_end_hold(2_000, captured, HoldEnd::Release, &None),
            Err(HoldError::NotActive("pending"))
        );
        assert!(
            core.poll_answer().is_none() && drain_frames(&mut core).is_empty(),
            "nothing before the log is durable"
        );
        assert!(matches!(
            sync(&mut core, 2_000)[..],
            [LogWrite::Decision { outcome: Outcome::Captured { amount: 4 }, .. }]
        ));
        let frames = drain_frames(&mut core);
        assert!(frames.iter().all(|(_, items)| items == &[ToShard::Capture { id: captured, amount: 4 }]), "{frames:?}");
        for shard in [0, 1] {
            core.handle_replies(
                2_000,
                shard,
                vec![FromShard::Ack { id: captured, decision: Decision::Commit, ack: DecideAck::Done }],
            );
        }
        assert!(
            matches!(core.poll_log().expect("the end").writes[..], [LogWrite::End { .. }]),
            "owed until both acked"
        );
        // Asked again: the same answer from the log; another end is refused.
        let record = logged(Outcome::Captured { amount: 4 });
        core.handle_end_hold(2_000, captured, HoldEnd::Capture(Some(4)), &Some(&record)).expect("a replay");
        assert_eq!(
            core.handle_end_hold(2_000, captured, HoldEnd::Capture(None), &Some(&record)),
            Err(HoldError::NotActive("captured"))
        );

        core.handle_end_hold(2_000, released, HoldEnd::Release, &None).expect("taken");
        sync(&mut core, 2_000);
        let frames = drain_frames(&mut core);
        assert!(frames
            .iter()
            .all(|(_, items)| items == &[ToShard::Decide { id: released, decision: Decision::Abort }]));

        // Expiry: at its time, by itself; a capture after it is refused.
        core.handle_timeout(5_999);
        assert_eq!(core.holds_count(), 1);
        core.handle_timeout(6_000);
        assert_eq!(core.holds_count(), 0);
        assert!(matches!(sync(&mut core, 6_000)[..], [LogWrite::Decision { outcome: Outcome::Expired, .. }]));
        let record = logged(Outcome::Expired);
        assert_eq!(
            core.handle_end_hold(6_000, expiring, HoldEnd::Capture(None), &Some(&record)),
            Err(HoldError::Expired)
        );
        let plain = TransferRecord { transfer: transfer(10), ..logged(Outcome::Committed) };
        assert_eq!(
            core.handle_end_hold(6_000, TransferId::from_u128(9), HoldEnd::Release, &Some(&plain)),
            Err(HoldError::NotAHold)
        );
        assert_eq!(
            core.handle_end_hold(6_000, TransferId::from_u128(9), HoldEnd::Release, &None),
            Err(HoldError::NotFound)
        );
    }

    /// A core whose shards have all voted YES on hold `id` (10, for 60 s from 1,000): its grant is being logged.
    fn granting(id: TransferId) -> CoordinatorCore {
        let mut core = CoordinatorCore::new(config(), 1_000, Vec::new(), Vec::new());
        up(&mut core);
        core.handle_submit(1_000, id, hold(10, 60), None, &None).expect("taken");
        let frames = drain_frames(&mut core);
        vote_all(&mut core, &frames, Vote::Yes);
        core
    }

    #[test]
    fn no_one_hears_how_a_hold_ends_before_that_end_is_durable() {
        let id = TransferId::from_u128(1);
        let mut core = granting(id);
        assert_eq!(
            core.handle_end_hold(1_000, id, HoldEnd::Release, &None),
            Err(HoldError::NotActive("pending")),
            "granting"
        );
        sync(&mut core, 1_000);
        core.handle_end_hold(2_000, id, HoldEnd::Capture(Some(4)), &None).expect("taken");
        assert_eq!(core.handle_end_hold(2_000, id, HoldEnd::Release, &None), Err(HoldError::NotActive("pending")));
        assert_eq!(
            core.handle_end_hold(2_000, id, HoldEnd::Capture(Some(5)), &None),
            Err(HoldError::NotActive("pending"))
        );
        // Had the release heard "captured": a crash before the capture is durable leaves the hold granted (its
        // `h` key names the grant), and it may yet be released or expire.
        let granted = GrantedHold { id, transfer: hold(10, 60), made_by: None, expires_at_unix_ms: 61_000 };
        let mut restarted = CoordinatorCore::new(config(), 2_000, Vec::new(), Vec::new()).with_holds(vec![granted]);
        restarted.handle_end_hold(2_100, id, HoldEnd::Release, &None).expect("still granted after the crash");
    }

    #[test]
    fn a_hold_presumed_aborted_is_pending_to_its_end_until_that_abort_is_durable() {
        // A restarted coordinator with no record of a hold its shards prepared: their question presumes it aborted.
        let id = TransferId::from_u128(1);
        let mut core = CoordinatorCore::new(config(), 1_000, Vec::new(), Vec::new());
        core.handle_query(vec![DecisionQueryItem { id, transfer: hold(10, 60) }], &None).expect("read");
        let batch = core.poll_log().expect("the presumed abort");
        // The shell reads the abort back before it is synced: a crash could still lose it, and the client that
        // submitted the hold, resubmitting, could then have it granted.
        let presumed = Outcome::Aborted(AbortReason::CoordinatorRestarted);
        let read =
            TransferRecord { transfer: hold(10, 60), outcome: presumed, shards: Vec::new(), decided_at_unix_ms: 1 };
        assert_eq!(
            core.handle_end_hold(1_000, id, HoldEnd::Release, &Some(&read)),
            Err(HoldError::NotActive("pending"))
        );
        core.handle_synced(1_000, batch.sync.expect("a barrier"));
        assert_eq!(
            core.handle_end_hold(1_000, id, HoldEnd::Release, &Some(&read)),
            Err(HoldError::NotActive("aborted"))
        );
    }

    #[test]
    fn a_request_that_ends_a_hold_never_hears_it_granted() {
        let id = TransferId::from_u128(1);
        let mut core = granting(id);
        sync(&mut core, 1_000);
        assert!(matches!(core.poll_answer(), Some(Answer::Transfer { outcome: Outcome::Held { .. }, .. })));
        // A late copy of the submission is answered "held" after the next sync; a capture comes before it. The
        // shell's waiters on the id are the submitter and the capturer: both hear the capture, once durable.
        core.handle_submit(2_000, id, hold(10, 60), None, &None).expect("a replay");
        core.handle_end_hold(2_000, id, HoldEnd::Capture(Some(4)), &None).expect("taken");
        sync(&mut core, 2_000);
        let answers: Vec<Answer> = std::iter::from_fn(|| core.poll_answer()).collect();
        let captured = Answer::Transfer { id, transfer: hold(10, 60), outcome: Outcome::Captured { amount: 4 } };
        assert_eq!(answers, vec![captured]);
    }

    #[test]
    fn a_participant_asking_about_a_hold_hears_held_and_a_capture_is_only_delivered() {
        let held = TransferRecord {
            transfer: hold(10, 60),
            outcome: Outcome::Held { expires_at_unix_ms: 9 },
            shards: vec![0, 1],
            decided_at_unix_ms: 1,
        };
        let captured = TransferRecord { outcome: Outcome::Captured { amount: 3 }, ..held.clone() };
        let released = TransferRecord { outcome: Outcome::Released, ..held.clone() };
        let mut core = CoordinatorCore::new(config(), 0, Vec::new(), Vec::new());
        let log: BTreeMap<TransferId, TransferRecord> = [held, captured, released]
            .into_iter()
            .enumerate()
            .map(|(i, r)| (TransferId::from_u128(i as u128), r))
            .collect();
        let items = log.iter().map(|(id, r)| DecisionQueryItem { id: *id, transfer: r.transfer.clone() }).collect();
        let q = core.handle_query(items, &log).expect("read");
        sync(&mut core, 0);
        let answers = vec![QueryAnswer::Held, QueryAnswer::Pending, QueryAnswer::Abort];
        assert_eq!(core.poll_answer(), Some(Answer::Queries { query: q, answers }));
    }

    #[test]
    fn commit_is_answered_and_sent_only_once_staged_and_voted_yes() {
        let mut core = CoordinatorCore::new(config(), 0, Vec::new(), Vec::new());
        up(&mut core);
        let id = TransferId::from_u128(1);
        core.handle_submit(0, id, transfer(5), None, &None).expect("taken");
        let staging = core.poll_log().expect("the staging record is logged");
        assert!(matches!(staging.writes[..], [LogWrite::Stage { .. }]));
        let frames = drain_frames(&mut core);
        assert_eq!(frames.len(), 2, "a Prepare to each shard, while the staging record is written");
        vote_all(&mut core, &frames, Vote::Yes);
        assert!(core.poll_log().is_none(), "no decision before the staging record is durable");
        assert!(core.poll_transmit().is_none() && core.poll_answer().is_none(), "nothing before the sync");
        // A query meanwhile must hear pending, never abort.
        let q = core.handle_query(vec![DecisionQueryItem { id, transfer: transfer(5) }], &None).expect("read");
        let barrier2 = core.poll_log().and_then(|b| b.sync).expect("the answer waits for a sync");
        core.handle_synced(0, staging.sync.expect("a barrier"));
        assert!(matches!(core.poll_answer(), Some(Answer::Transfer { outcome: Outcome::Committed, .. })));
        assert_eq!(drain_frames(&mut core).len(), 2, "a Commit to each shard");
        let decision = core.poll_log().expect("the commit is logged");
        assert!(matches!(decision.writes[..], [LogWrite::Decision { outcome: Outcome::Committed, .. }]));
        assert_eq!(decision.sync, None, "nothing waits for the commit record");
        core.handle_synced(0, barrier2);
        assert_eq!(core.poll_answer(), Some(Answer::Queries { query: q, answers: vec![QueryAnswer::Pending] }));
        for shard in 0..2 {
            let ack = FromShard::Ack { id, decision: Decision::Commit, ack: DecideAck::Done };
            core.handle_replies(0, shard, vec![ack]);
        }
        assert_eq!(core.poll_log().map(|b| b.writes), Some(vec![LogWrite::End { id }]));
        assert_eq!(core.owed_count(), 0);
    }

    #[test]
    fn votes_after_the_staging_sync_commit_with_no_further_sync() {
        let mut core = CoordinatorCore::new(config(), 0, Vec::new(), Vec::new());
        up(&mut core);
        let id = TransferId::from_u128(11);
        core.handle_submit(0, id, transfer(5), None, &None).expect("taken");
        let staging = core.poll_log().expect("staged");
        core.handle_synced(0, staging.sync.expect("a barrier"));
        let frames = drain_frames(&mut core);
        vote_all(&mut core, &frames, Vote::Yes);
        assert!(matches!(core.poll_answer(), Some(Answer::Transfer { outcome: Outcome::Committed, .. })));
        let decision = core.poll_log().expect("the commit is logged");
        assert_eq!(decision.sync, None);
        assert_eq!(drain_frames(&mut core).len(), 2, "a Commit to each shard at once");
    }

    /// The engine feeds a burst of inputs before it drains the log: a query or a resubmission right after a
    /// staged commit, in the same burst, must see that decision although the log the shell reads does not yet.
    #[test]
    fn a_decision_not_yet_handed_out_counts_as_logged() {
        let mut core = CoordinatorCore::new(config(), 0, Vec::new(), Vec::new());
        up(&mut core);
        let id = TransferId::from_u128(16);
        core.handle_submit(0, id, transfer(5), None, &None).expect("taken");
        let staging = core.poll_log().expect("staged");
        core.handle_synced(0, staging.sync.expect("a barrier"));
        let frames = drain_frames(&mut core);
        vote_all(&mut core, &frames, Vote::Yes);
        assert!(core.running(&id).is_none(), "committed, no longer running");
        let q = core.handle_query(vec![DecisionQueryItem { id, transfer: transfer(5) }], &None).expect("read");
        core.handle_submit(0, id, transfer(5), None, &None).expect("a replay, not a new run");
        assert!(core.running(&id).is_none(), "not run again");
        let batch = core.poll_log().expect("the commit, and a sync for the answers");
        let decisions: Vec<Outcome> = batch
            .writes
            .iter()
            .filter_map(|w| match w {
                LogWrite::Decision { outcome, .. } => Some(*outcome),
                _ => None,
            })
            .collect();
        assert_eq!(decisions, vec![Outcome::Committed], "no presumed abort, no second staging");
        core.handle_synced(0, batch.sync.expect("a barrier"));
        let answers: Vec<Answer> = std::iter::from_fn(|| core.poll_answer()).collect();
        assert!(answers.contains(&Answer::Queries { query: q, answers: vec![QueryAnswer::Commit] }), "{answers:?}");
    }

    #[test]
    fn under_load_a_transfer_takes_the_classic_path_and_its_commit_waits_for_the_decision_sync() {
        let mut busy = config();
        busy.parallel_commits_max = 1;
        let mut core = CoordinatorCore::new(busy, 0, Vec::new(), Vec::new());
        up(&mut core);
        let (a, b) = (TransferId::from_u128(14), TransferId::from_u128(15));
        core.handle_submit(0, a, transfer(5), None, &None).expect("taken");
        core.handle_submit(0, b, transfer(6), None, &None).expect("taken");
        let staging = core.poll_log().expect("a is staged");
        assert!(matches!(&staging.writes[..], [LogWrite::Stage { id, .. }] if *id == a), "b is not: {staging:?}");
        core.handle_synced(0, staging.sync.expect("a barrier"));
        let frames = drain_frames(&mut core);
        core.handle_replies(0, 0, vec![FromShard::Vote { id: b, vote: Vote::Yes }]);
        core.handle_replies(0, 1, vec![FromShard::Vote { id: b, vote: Vote::Yes }]);
        let decision = core.poll_log().expect("b's commit is logged");
        assert!(
            matches!(&decision.writes[..], [LogWrite::Decision { id, outcome: Outcome::Committed, .. }] if *id == b)
        );
        assert!(core.poll_answer().is_none() && drain_frames(&mut core).is_empty(), "nothing before its sync");
        core.handle_synced(0, decision.sync.expect("the classic commit waits for a sync"));
        assert!(
            matches!(core.poll_answer(), Some(Answer::Transfer { id, outcome: Outcome::Committed, .. }) if id == b)
        );
        assert_eq!(drain_frames(&mut core).len(), 2, "a Commit of b to each shard");
        vote_all(&mut core, &frames, Vote::Yes);
        assert!(matches!(core.poll_answer(), Some(Answer::Transfer { id, .. }) if id == a), "a, staged, at once");
    }

    #[test]
    fn a_recovered_staged_transfer_is_prepared_again_and_never_aborted_for_silence() {
        let id = TransferId::from_u128(12);
        let staged = StagedTransfer { id, transfer: transfer(5), made_by: Some("teller".into()) };
        let mut core = CoordinatorCore::new(config(), 0, Vec::new(), vec![staged]);
        assert_eq!(core.running(&id), Some(&transfer(5)), "it runs: queries about it hear pending");
        assert!(core.poll_log().is_none() && drain_frames(&mut core).is_empty(), "nothing until a link is up");
        core.handle_link(0, 0, true);
        let frames = drain_frames(&mut core);
        assert!(
            matches!(&frames[..], [(0, items)] if matches!(&items[..], [ToShard::Prepare { made_by: Some(_), .. }]))
        );
        core.handle_replies(0, 0, vec![FromShard::Vote { id, vote: Vote::Yes }]);
        // Shard 1 is gone for longer than any prepare deadline: the transfer waits.
        core.handle_link(10, 1, false);
        core.handle_timeout(10_000);
        assert!(core.poll_log().is_none() && core.running(&id).is_some(), "silence decides nothing");
        core.handle_link(10_000, 1, true);
        let frames = drain_frames(&mut core);
        assert!(matches!(&frames[..], [(1, items)] if matches!(&items[..], [ToShard::Prepare { .. }])));
        core.handle_replies(10_000, 1, vec![FromShard::Vote { id, vote: Vote::Yes }]);
        assert!(matches!(core.poll_answer(), Some(Answer::Transfer { outcome: Outcome::Committed, .. })));
        assert_eq!(drain_frames(&mut core).len(), 2, "a Commit to each shard");
    }

    #[test]
    fn a_recovered_staged_transfer_aborts_on_a_refusal_once_the_abort_is_durable() {
        let id = TransferId::from_u128(13);
        let staged = StagedTransfer { id, transfer: transfer(5), made_by: None };
        let mut core = CoordinatorCore::new(config(), 0, Vec::new(), vec![staged]);
        up(&mut core);
        drain_frames(&mut core);
        core.handle_replies(0, 0, vec![FromShard::Vote { id, vote: Vote::no(RefusalReason::AlreadyAborted) }]);
        core.handle_replies(0, 1, vec![FromShard::Vote { id, vote: Vote::Yes }]);
        let batch = core.poll_log().expect("the abort is logged");
        assert!(matches!(&batch.writes[..], [LogWrite::Decision { outcome: Outcome::Aborted(_), .. }]));
        assert!(drain_frames(&mut core).is_empty() && core.poll_answer().is_none(), "nothing before the sync");
        core.handle_synced(0, batch.sync.expect("a barrier"));
        assert!(matches!(core.poll_answer(), Some(Answer::Transfer { outcome: Outcome::Aborted(_), .. })));
        assert_eq!(drain_frames(&mut core), vec![(1, vec![ToShard::Decide { id, decision: Decision::Abort }])]);
    }

    #[test]
    fn a_silent_or_lost_shard_aborts_and_the_abort_is_redelivered_on_reconnect() {
        let mut core = CoordinatorCore::new(config(), 0, Vec::new(), Vec::new());
        up(&mut core);
        let id = TransferId::from_u128(2);
        core.handle_submit(0, id, transfer(5), None, &None).expect("taken");
        drain_frames(&mut core);
        core.poll_log().expect("staged");
        core.handle_replies(0, 0, vec![FromShard::Vote { id, vote: Vote::Yes }]);
        core.handle_link(10, 1, false);
        let batch = core.poll_log().expect("logged");
        let aborted = Outcome::Aborted(AbortReason::ParticipantUnavailable);
        assert!(matches!(&batch.writes[..], [LogWrite::Decision { outcome, .. }] if *outcome == aborted));
        core.handle_synced(10, batch.sync.expect("barrier"));
        // Only shard 0 prepared... but shard 1 may have too before the link broke: it is owed an abort.
        let frames = drain_frames(&mut core);
        assert_eq!(frames.len(), 1);
        core.handle_link(20, 1, true);
        let frames = drain_frames(&mut core);
        assert_eq!(frames, vec![(1, vec![ToShard::Decide { id, decision: Decision::Abort }])]);
    }

    #[test]
    fn the_prepare_deadline_aborts_and_refusals_carry_their_reason() {
        let mut core = CoordinatorCore::new(config(), 0, Vec::new(), Vec::new());
        up(&mut core);
        let (a, b) = (TransferId::from_u128(3), TransferId::from_u128(4));
        core.handle_submit(0, a, transfer(5), None, &None).expect("taken");
        core.handle_submit(0, b, transfer(6), None, &None).expect("taken");
        core.handle_replies(0, 0, vec![FromShard::Vote { id: b, vote: Vote::no(RefusalReason::InsufficientFunds) }]);
        assert_eq!(core.poll_timeout(), Some(100));
        core.handle_timeout(100);
        let batch = core.poll_log().expect("both decided");
        let outcomes: Vec<Outcome> = batch
            .writes
            .iter()
            .filter_map(|w| match w {
                LogWrite::Decision { outcome, .. } => Some(*outcome),
                LogWrite::Stage { .. } => None,
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert!(outcomes.contains(&Outcome::Aborted(AbortReason::ParticipantUnavailable)));
        assert!(outcomes.contains(&Outcome::Aborted(AbortReason::InsufficientFunds)));
    }

    #[test]
    fn replays_conflicts_and_overload() {
        let mut core = CoordinatorCore::new(config(), 0, Vec::new(), Vec::new());
        up(&mut core);
        let id = TransferId::from_u128(5);
        core.handle_submit(0, id, transfer(5), None, &None).expect("taken");
        assert_eq!(core.handle_submit(0, id, transfer(5), None, &None), Ok(()), "joins the run");
        assert_eq!(core.handle_submit(0, id, transfer(6), None, &None), Err(SubmitError::IdempotencyConflict));
        let record = TransferRecord {
            transfer: transfer(7),
            outcome: Outcome::Committed,
            shards: vec![0, 1],
            decided_at_unix_ms: 0,
        };
        let other = TransferId::from_u128(6);
        core.handle_submit(0, other, transfer(7), None, &Some(&record)).expect("a replay");
        let barrier = core.poll_log().and_then(|b| b.sync).expect("a replay waits for a sync");
        core.handle_synced(0, barrier);
        assert!(matches!(core.poll_answer(), Some(Answer::Transfer { id, .. }) if id == other));
        let mut small = config();
        small.transfers_in_flight_max = 1;
        let mut core = CoordinatorCore::new(small, 0, Vec::new(), Vec::new());
        up(&mut core);
        core.handle_submit(0, TransferId::from_u128(7), transfer(1), None, &None).expect("taken");
        let refused = core.handle_submit(0, TransferId::from_u128(8), transfer(1), None, &None);
        assert_eq!(refused, Err(SubmitError::Overloaded));
    }

    #[test]
    fn a_query_answered_with_a_presumed_abort_waits_for_the_aborts_barrier() {
        // A restarted coordinator with no record of a transfer a shard holds prepared: the abort is logged, and
        // the answer leaves only once that write's barrier is durable, after a later input too.
        let id = TransferId::from_u128(3);
        let mut core = CoordinatorCore::new(config(), 1_000, Vec::new(), Vec::new());
        let q = core.handle_query(vec![DecisionQueryItem { id, transfer: transfer(5) }], &None).expect("read");
        assert_eq!(core.poll_answer(), None, "nothing before the abort is written");
        let batch = core.poll_log().expect("the presumed abort");
        assert!(matches!(
            &batch.writes[..],
            [LogWrite::Decision { outcome: Outcome::Aborted(AbortReason::CoordinatorRestarted), .. }]
        ));
        let barrier = batch.sync.expect("an answer waits for a barrier");
        core.handle_timeout(1_500);
        core.handle_synced(1_500, barrier - 1);
        assert_eq!(core.poll_answer(), None, "nor before it is durable");
        core.handle_synced(1_500, barrier);
        assert_eq!(core.poll_answer(), Some(Answer::Queries { query: q, answers: vec![QueryAnswer::Abort] }));
    }

    #[test]
    fn recovered_commits_are_sent_when_links_come_up() {
        let id = TransferId::from_u128(9);
        let record = TransferRecord {
            transfer: transfer(3),
            outcome: Outcome::Committed,
            shards: vec![0, 1],
            decided_at_unix_ms: 0,
        };
        let mut core = CoordinatorCore::new(config(), 5_000, vec![(id, record)], Vec::new());
        assert_eq!(core.owed(5_000).len(), 1);
        core.handle_link(5_000, 0, true);
        let frames = drain_frames(&mut core);
        assert_eq!(frames, vec![(0, vec![ToShard::Decide { id, decision: Decision::Commit }])]);
        // An unknown transfer asked about is presumed aborted, in the log first.
        let unknown = TransferId::from_u128(10);
        let q = core.handle_query(vec![DecisionQueryItem { id: unknown, transfer: transfer(1) }], &None).expect("read");
        let batch = core.poll_log().expect("the abort is logged");
        assert!(matches!(&batch.writes[..], [LogWrite::Decision { id, .. }] if *id == unknown));
        core.handle_synced(5_000, batch.sync.expect("barrier"));
        assert_eq!(core.poll_answer(), Some(Answer::Queries { query: q, answers: vec![QueryAnswer::Abort] }));
    }
}
