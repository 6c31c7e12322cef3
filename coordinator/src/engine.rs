//! The coordinator's shell around [`CoordinatorCore`]: one task owns the core and is the only one to touch it.
//! HTTP handlers send it commands; each participant's link task sends it the replies that arrive on the
//! stream; sync tasks tell it when log writes are durable. After every burst of inputs it carries out what the
//! core asks for: log writes (and a group-commit sync), frames to the shards, answers to release, timers.
//!
//! The shell holds no protocol rule. It only maps the core's answers to the callers waiting for them, routes
//! read replies, and keeps a link per shard open (connect, upgrade, heartbeats, reconnect with backoff).

use crate::metric;
use crate::participants::{self, LinkEvent, ParticipantClient};
use crate::wal::{Wal, WalError};
use common::crash;
use common::ledger::{AccountId, ShardId, Transfer, TransferId};
use common::records::{AccountRecord, Outcome};
use common::wire::{DecisionQueryItem, FromShard, QueryAnswer};
use protocol::coordinator_core::{
    drain, Answer, CoordinatorCore, CoreConfig, CoreShell, HoldEnd, HoldError, LogBatch, LogWrite, Notice, OwedView,
    SubmitError,
};
use protocol::msg::ToShard;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// Health probes of the participants (the up/down gauge) and the unacknowledged gauges are refreshed this often.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// Commands from the HTTP handlers that may wait for the core task; past it a handler waits for room.
const COMMAND_QUEUE_MAX: usize = 16_384;
/// Events from the links and syncs that may wait for the core task.
const EVENT_QUEUE_MAX: usize = 16_384;
/// Inputs the core task takes in one burst before it carries out what they asked for: large enough for
/// frames and group commits to fill up under load, small enough that no caller waits long.
const BURST_INPUTS_MAX: usize = 1_024;
/// Account reads waiting for their shard's reply; past it reads are refused (503) until some return.
const READS_PENDING_MAX: usize = 65_536;

#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub shard_count: u32,
    /// This coordinator's URL as participants should reach it (stored in their prepared records).
    pub coordinator_url: String,
    /// A shard that has not voted this long counts as unavailable, and the transfer aborts.
    pub prepare_timeout: Duration,
    /// Transfers being decided at once; past it new ones are refused with 503 rather than queued without end.
    pub transfers_in_flight_max: usize,
    /// Transfers running below which a new one is staged (parallel commits).
    pub parallel_commits_max: usize,
    /// The cluster id and secret the stream's upgrade request carries.
    pub cluster_id: String,
    pub cluster_token: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("transfer id already used with a different body")]
    IdempotencyConflict,
    #[error("too many transfers in flight")]
    Overloaded,
    #[error("too many holds are active")]
    HoldsFull,
    #[error("{0:?}")]
    Hold(HoldError),
    #[error(transparent)]
    Wal(#[from] WalError),
    #[error("the coordinator's core has stopped")]
    CoreGone,
    #[error("the decision log cannot be read")]
    LogUnreadable,
}

/// A transfer's final answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Final {
    pub transfer: Transfer,
    pub outcome: Outcome,
}

/// A decided transfer some shard has not acknowledged yet, as `GET /transactions?status=unacknowledged` shows
/// it. The coordinator knows its outcome: only the participants are in doubt.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Unacknowledged {
    pub id: TransferId,
    pub decision: &'static str,
    pub age_ms: u64,
    pub awaiting_shards: Vec<ShardId>,
}

type Reply<T> = oneshot::Sender<T>;
/// A read through the stream: `None` if the shard could not be asked, `Some(None)` if the account does not exist.
type ReadAnswer = Option<Option<AccountRecord>>;

enum Command {
    Submit {
        id: TransferId,
        transfer: Transfer,
        made_by: Option<String>,
        reply: Reply<Result<Final, EngineError>>,
    },
    /// Several transfers at once (a batch's items): one command and one reply for all, in their order.
    SubmitMany {
        items: Vec<(TransferId, Transfer)>,
        made_by: Option<String>,
        reply: Reply<Vec<Result<Final, EngineError>>>,
    },
    Query {
        items: Vec<DecisionQueryItem>,
        reply: Reply<Result<Vec<QueryAnswer>, EngineError>>,
    },
    /// `None` in the reply: the shard has no link.
    Read {
        shard: ShardId,
        account: AccountId,
        reply: Reply<Option<Option<AccountRecord>>>,
    },
    Running {
        id: Option<TransferId>,
        account: Option<AccountId>,
        limit: usize,
        reply: Reply<Vec<(TransferId, Transfer)>>,
    },
    Owed {
        reply: Reply<Vec<OwedView>>,
    },
    InMemory {
        reply: Reply<serde_json::Value>,
    },
    EndHold {
        id: TransferId,
        end: HoldEnd,
        reply: Reply<Result<Final, EngineError>>,
    },
    /// The granted holds on an account, soonest expiry first: (id, transfer, expiry in unix ms).
    Holds {
        account: Option<AccountId>,
        limit: usize,
        reply: Reply<Vec<(TransferId, Transfer, u64)>>,
    },
}

/// What reaches the core task besides commands: what the links report, and the syncs that finished.
pub(crate) enum Event {
    Link(LinkEvent),
    Synced { barrier: u64, decisions: bool },
}

impl From<LinkEvent> for Event {
    fn from(event: LinkEvent) -> Self {
        Event::Link(event)
    }
}

pub struct Engine {
    pub config: EngineConfig,
    pub wal: Wal,
    pub participants: Vec<ParticipantClient>,
    commands: mpsc::Sender<Command>,
}

impl Engine {
    /// Reads the decisions still owed acks from the log, starts the core task and one link per participant.
    pub fn start(config: EngineConfig, wal: Wal, participants: Vec<ParticipantClient>) -> Result<Arc<Self>, WalError> {
        let recovery = wal.recovery()?;
        if !recovery.unacked.is_empty() {
            let count = recovery.unacked.len();
            tracing::info!(count, "recovered committed transfers still owed acks: re-sending");
            metrics::counter!(metric::RECOVERY_COMMITS_RESENT).increment(count as u64);
        }
        if !recovery.staged.is_empty() {
            tracing::info!(
                count = recovery.staged.len(),
                "recovered staged transfers with no decision: preparing them again"
            );
        }
        // The flags' settings over the core's defaults.
        let core_config = CoreConfig {
            shard_count: config.shard_count,
            coordinator_url: config.coordinator_url.clone(),
            prepare_timeout_ms: u64::try_from(config.prepare_timeout.as_millis()).unwrap_or(u64::MAX),
            transfers_in_flight_max: config.transfers_in_flight_max,
            parallel_commits_max: config.parallel_commits_max,
            ..CoreConfig::default()
        };
        // The core's clock: milliseconds of a monotonic clock, counted from the unix epoch at this start.
        let origin = Instant::now();
        let origin_unix_ms = common::http::now_unix_ms();
        let core = CoordinatorCore::new(core_config, origin_unix_ms, recovery.unacked, recovery.staged)
            .with_holds(recovery.holds);
        let (commands, command_rx) = mpsc::channel(COMMAND_QUEUE_MAX);
        let (events, event_rx) = mpsc::channel(EVENT_QUEUE_MAX);
        let wakes: Vec<Arc<tokio::sync::Notify>> = participants.iter().map(|_| Arc::default()).collect();
        for client in &participants {
            let link = participants::Link {
                wake: wakes[client.shard as usize].clone(),
                shard: client.shard,
                url: client.url.clone(),
                cluster_id: config.cluster_id.clone(),
                cluster_token: config.cluster_token.clone(),
                events: events.clone(),
            };
            tokio::spawn(link.run_forever());
        }
        let shell = Shell {
            core,
            wal: wal.clone(),
            origin,
            origin_unix_ms,
            events: events.clone(),
            links: vec![None; config.shard_count as usize],
            waiters: HashMap::new(),
            many: HashMap::new(),
            next_many: 0,
            queries: HashMap::new(),
            reads: HashMap::new(),
            next_read: 0,
            wakes,
        };
        tokio::spawn(shell.run(command_rx, event_rx));
        Ok(Arc::new(Engine { config, wal, participants, commands }))
    }

    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, EngineError> {
        let (reply, answer) = oneshot::channel();
        self.commands.send(make(reply)).await.map_err(|_| EngineError::CoreGone)?;
        answer.await.map_err(|_| EngineError::CoreGone)
    }

    /// Runs (or joins, or replays) the transfer `id` and returns its final outcome, durable.
    pub async fn submit(
        &self,
        id: TransferId,
        transfer: Transfer,
        made_by: Option<String>,
    ) -> Result<Final, EngineError> {
        self.ask(|reply| Command::Submit { id, transfer, made_by, reply }).await?
    }

    /// [`Engine::submit`] for each of `items`, as one command: the answers come back together, in order.
    pub async fn submit_many(
        &self,
        items: Vec<(TransferId, Transfer)>,
        made_by: Option<String>,
    ) -> Result<Vec<Result<Final, EngineError>>, EngineError> {
        self.ask(|reply| Command::SubmitMany { items, made_by, reply }).await
    }

    /// Answers a participant in doubt (see [`CoordinatorCore::handle_query`]).
    pub async fn answer_queries(&self, items: Vec<DecisionQueryItem>) -> Result<Vec<QueryAnswer>, EngineError> {
        self.ask(|reply| Command::Query { items, reply }).await?
    }

    /// Reads an account through the shard's stream, behind every decision sent there before. `Ok(None)`: the
    /// account does not exist; `Err(())`: the shard is unavailable.
    pub async fn read(
        &self,
        shard: ShardId,
        account: AccountId,
        timeout: Duration,
    ) -> Result<Option<AccountRecord>, ()> {
        let asked = self.ask(|reply| Command::Read { shard, account, reply });
        match tokio::time::timeout(timeout, asked).await {
            Ok(Ok(Some(found))) => Ok(found),
            _ => Err(()),
        }
    }

    /// `pending` while this process is deciding `id`, else what the log says.
    pub async fn status(&self, id: &TransferId) -> Result<Option<(Transfer, Option<Outcome>)>, EngineError> {
        let running = self.ask(|reply| Command::Running { id: Some(*id), account: None, limit: 1, reply }).await?;
        if let Some((_, transfer)) = running.into_iter().next() {
            return Ok(Some((transfer, None)));
        }
        Ok(self.wal.get(id)?.map(|r| (r.transfer, Some(r.outcome))))
    }

    /// The transfers in flight (of one account, or of the whole ledger), at most `limit`.
    pub async fn running_of(
        &self,
        account: Option<&AccountId>,
        limit: usize,
    ) -> Result<Vec<(TransferId, Transfer, Option<Outcome>)>, EngineError> {
        let account = account.cloned();
        let running = self.ask(|reply| Command::Running { id: None, account, limit, reply }).await?;
        Ok(running.into_iter().map(|(id, t)| (id, t, None)).collect())
    }

    pub async fn unacknowledged(&self) -> Vec<Unacknowledged> {
        let owed = self.ask(|reply| Command::Owed { reply }).await.unwrap_or_default();
        owed.into_iter().map(unacknowledged_view).collect()
    }

    /// Captures or releases the hold `id`, or repeats the answer of the same request; the end is durable.
    pub async fn end_hold(&self, id: TransferId, end: HoldEnd) -> Result<Final, EngineError> {
        self.ask(|reply| Command::EndHold { id, end, reply }).await?
    }

    /// The holds granted (on `account`, if given), soonest expiry first: (id, transfer, expiry in unix ms).
    pub async fn holds_of(
        &self,
        account: Option<AccountId>,
        limit: usize,
    ) -> Result<Vec<(TransferId, Transfer, u64)>, EngineError> {
        self.ask(|reply| Command::Holds { account, limit, reply }).await
    }

    /// The sizes of what the engine and its core hold in memory (for `GET /stats`): none grows with history.
    pub async fn in_memory(&self) -> Result<serde_json::Value, EngineError> {
        self.ask(|reply| Command::InMemory { reply }).await
    }

    /// Keeps the participant-up gauge current for dashboards and alerts.
    pub async fn probe_participants_forever(self: Arc<Self>) {
        loop {
            for client in &self.participants {
                let up = client.is_up(PROBE_TIMEOUT).await;
                let shard = client.shard.to_string();
                metrics::gauge!(metric::PARTICIPANT_UP, "shard" => shard).set(if up { 1.0 } else { 0.0 });
            }
            let unacknowledged = self.unacknowledged().await;
            let oldest_seconds = unacknowledged.first().map_or(0, |d| d.age_ms) as f64 / 1000.0;
            for name in [metric::UNACKNOWLEDGED, metric::UNACKNOWLEDGED_OLD_NAME] {
                metrics::gauge!(name).set(unacknowledged.len() as f64);
            }
            for name in [metric::UNACKNOWLEDGED_OLDEST_SECONDS, metric::UNACKNOWLEDGED_OLDEST_SECONDS_OLD_NAME] {
                metrics::gauge!(name).set(oldest_seconds);
            }
            tokio::time::sleep(PROBE_INTERVAL).await;
        }
    }
}

impl CoreShell for Shell {
    type Error = std::convert::Infallible;

    fn core(&mut self) -> &mut CoordinatorCore {
        &mut self.core
    }

    fn write_log(&mut self, batch: LogBatch) -> Result<(), Self::Error> {
        self.log_writes(batch);
        Ok(())
    }

    fn transmit(&mut self, shard: ShardId, items: Vec<ToShard>) -> Result<(), Self::Error> {
        let sent = match &self.links[shard as usize] {
            Some((_, frames)) => frames.try_send(participants::Outgoing::new(items)).is_ok(),
            None => false,
        };
        if !sent {
            // A link that cannot take a frame is as good as lost: drop it, and its task reconnects.
            self.link_lost(shard);
        }
        Ok(())
    }

    fn release(&mut self, answer: Answer) -> Result<(), Self::Error> {
        self.release_answer(answer);
        Ok(())
    }

    fn notice(&mut self, notice: Notice) -> Result<(), Self::Error> {
        if let Notice::LinkWanted { shard } = notice {
            self.wakes[shard as usize].notify_one();
        }
        notify(notice);
        Ok(())
    }
}

fn unacknowledged_view(o: OwedView) -> Unacknowledged {
    let decision = if o.decision == common::wire::Decision::Commit { "commit" } else { "abort" };
    Unacknowledged { id: o.id, decision, age_ms: o.age_ms, awaiting_shards: o.awaiting_shards }
}

/// Who waits for a transfer's answer.
enum Waiter {
    One(Reply<Result<Final, EngineError>>),
    /// Item `index` of the `SubmitMany` numbered `many`.
    Many {
        many: u64,
        index: usize,
    },
}

/// A `SubmitMany` whose answers are not all in.
struct Many {
    answers: Vec<Option<Result<Final, EngineError>>>,
    missing: usize,
    reply: Reply<Vec<Result<Final, EngineError>>>,
}

/// The task that owns the core, and the callers waiting on it.
struct Shell {
    core: CoordinatorCore,
    wal: Wal,
    /// The core's clock reads `origin_unix_ms` here.
    origin: Instant,
    origin_unix_ms: u64,
    events: mpsc::Sender<Event>,
    /// The current link to each shard: its generation and where its frames go.
    links: Vec<Option<(u64, mpsc::Sender<participants::Outgoing>)>>,
    /// Clients waiting for a transfer's answer (the first submission and any joined duplicates).
    waiters: HashMap<TransferId, Vec<Waiter>>,
    /// The answers of each `SubmitMany` gathered so far, by its number in `next_many`.
    many: HashMap<u64, Many>,
    next_many: u64,
    queries: HashMap<u64, Reply<Result<Vec<QueryAnswer>, EngineError>>>,
    reads: HashMap<u64, (ShardId, Reply<ReadAnswer>)>,
    next_read: u64,
    /// Wakes each link task out of its reconnect backoff.
    wakes: Vec<Arc<tokio::sync::Notify>>,
}

impl Shell {
    fn now_ms(&self) -> u64 {
        self.origin_unix_ms + self.origin.elapsed().as_millis() as u64
    }

    async fn run(mut self, mut commands: mpsc::Receiver<Command>, mut events: mpsc::Receiver<Event>) {
        loop {
            let since_origin = |ms: u64| Duration::from_millis(ms.saturating_sub(self.origin_unix_ms));
            let deadline = self.core.poll_timeout().map(|ms| self.origin + since_origin(ms));
            let sleep = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                event = events.recv() => match event {
                    Some(event) => self.event(event),
                    None => return,
                },
                command = commands.recv() => match command {
                    Some(command) => self.command(command),
                    None => return, // the server is shutting down
                },
                () = sleep => {}
            }
            // Take whatever else is waiting, so one frame and one sync serve the whole burst.
            for _ in 0..BURST_INPUTS_MAX {
                if let Ok(event) = events.try_recv() {
                    self.event(event);
                } else if let Ok(command) = commands.try_recv() {
                    self.command(command);
                } else {
                    break;
                }
            }
            let now = self.now_ms();
            self.core.handle_timeout(now);
            self.drive();
        }
    }

    /// Hands one submission to the core; on `Ok` an answer for `id` follows.
    fn submit(
        &mut self,
        now: u64,
        id: TransferId,
        transfer: Transfer,
        made_by: Option<String>,
    ) -> Result<(), EngineError> {
        self.core.handle_submit(now, id, transfer, made_by, &self.wal).map_err(|error| match error {
            SubmitError::IdempotencyConflict => EngineError::IdempotencyConflict,
            SubmitError::Overloaded => EngineError::Overloaded,
            SubmitError::HoldsFull => EngineError::HoldsFull,
            SubmitError::LogUnreadable => EngineError::LogUnreadable,
        })
    }

    fn command(&mut self, command: Command) {
        let now = self.now_ms();
        match command {
            Command::Submit { id, transfer, made_by, reply } => {
                if let Err(error) = self.submit(now, id, transfer, made_by) {
                    return drop(reply.send(Err(error)));
                }
                self.waiters.entry(id).or_default().push(Waiter::One(reply));
            }
            Command::SubmitMany { items, made_by, reply } => {
                let many = self.next_many;
                self.next_many += 1;
                let mut answers = Vec::with_capacity(items.len());
                let mut missing = 0;
                for (index, (id, transfer)) in items.into_iter().enumerate() {
                    match self.submit(now, id, transfer, made_by.clone()) {
                        Ok(()) => {
                            self.waiters.entry(id).or_default().push(Waiter::Many { many, index });
                            missing += 1;
                            answers.push(None);
                        }
                        Err(error) => answers.push(Some(Err(error))),
                    }
                }
                let waiting = Many { answers, missing, reply };
                if missing == 0 {
                    finish_many(waiting);
                } else {
                    self.many.insert(many, waiting);
                }
            }
            Command::EndHold { id, end, reply } => match self.core.handle_end_hold(now, id, end, &self.wal) {
                Ok(()) => self.waiters.entry(id).or_default().push(Waiter::One(reply)),
                Err(HoldError::LogUnreadable) => drop(reply.send(Err(EngineError::LogUnreadable))),
                Err(error) => drop(reply.send(Err(EngineError::Hold(error)))),
            },
            Command::Holds { account, limit, reply } => {
                let holds = self.core.holds_of(account.as_ref(), limit);
                let list = holds.into_iter().map(|h| (h.id, h.transfer.clone(), h.expires_at_unix_ms)).collect();
                drop(reply.send(list))
            }
            Command::Query { items, reply } => match self.core.handle_query(items, &self.wal) {
                Ok(query) => drop(self.queries.insert(query, reply)),
                Err(_) => drop(reply.send(Err(EngineError::LogUnreadable))),
            },
            Command::Read { shard, account, reply } => {
                if self.reads.len() >= READS_PENDING_MAX {
                    // Callers that gave up no longer need their reply.
                    self.reads.retain(|_, (_, waiter)| !waiter.is_closed());
                }
                if self.reads.len() >= READS_PENDING_MAX {
                    let _ = reply.send(None);
                    return;
                }
                self.next_read += 1;
                self.core.queue_read(shard, self.next_read, account);
                self.reads.insert(self.next_read, (shard, reply));
            }
            Command::Running { id, account, limit, reply } => {
                let list = match id {
                    Some(id) => self.core.running(&id).map(|t| (id, t.clone())).into_iter().collect(),
                    None => self
                        .core
                        .running_transfers()
                        .filter(|(_, t)| account.as_ref().is_none_or(|a| t.touches(a)))
                        .take(limit)
                        .map(|(id, t)| (*id, t.clone()))
                        .collect(),
                };
                let _ = reply.send(list);
            }
            Command::Owed { reply } => drop(reply.send(self.core.owed(now))),
            Command::InMemory { reply } => {
                let core = self.core.in_memory();
                let view = serde_json::json!({
                    "running": core.running,
                    "owed": core.owed,
                    "holds": core.holds,
                    "queued": core.queued,
                    "unlogged": core.unlogged,
                    "log_owed": self.wal.owed_count(),
                    "waiting_clients": self.waiters.len(),
                    "queries": self.queries.len(),
                    "reads": self.reads.len(),
                });
                drop(reply.send(view))
            }
        }
    }

    fn event(&mut self, event: Event) {
        let now = self.now_ms();
        match event {
            Event::Link(LinkEvent::Up { shard, generation, frames }) => {
                self.links[shard as usize] = Some((generation, frames));
                tracing::info!(shard, "stream to participant up");
                self.core.handle_link(now, shard, true);
            }
            Event::Link(LinkEvent::Down { shard, generation }) => {
                if self.links[shard as usize].as_ref().is_some_and(|(g, _)| *g == generation) {
                    self.link_lost(shard);
                }
            }
            Event::Link(LinkEvent::Failed { shard }) => {
                if self.links[shard as usize].is_none() {
                    self.link_lost(shard);
                }
            }
            Event::Link(LinkEvent::Replies { shard, replies }) => {
                if replies.iter().any(|r| matches!(r, FromShard::Vote { .. })) {
                    crash::point(crash::COORDINATOR_PREPARE_SENT);
                }
                let commit_acked = replies.iter().any(
                    |r| matches!(r, FromShard::Ack { decision, .. } if *decision == common::wire::Decision::Commit),
                );
                if commit_acked {
                    crash::point(crash::COORDINATOR_COMMIT_SENT);
                }
                for reply in &replies {
                    if let FromShard::Account { read, account } = reply {
                        if let Some((_, waiter)) = self.reads.remove(read) {
                            let _ = waiter.send(Some(*account));
                        }
                    }
                }
                self.core.handle_replies(now, shard, replies);
            }
            Event::Synced { barrier, decisions } => {
                if decisions {
                    crash::point(crash::COORDINATOR_DECISION_LOGGED);
                }
                self.core.handle_synced(now, barrier);
            }
        }
    }

    fn link_lost(&mut self, shard: ShardId) {
        if self.links[shard as usize].take().is_some() {
            tracing::warn!(shard, "stream to participant down");
        }
        self.core.handle_link(self.now_ms(), shard, false);
        // Reads sent on the lost link will get no reply: they fail now.
        let lost: Vec<u64> = self.reads.iter().filter(|(_, (s, _))| *s == shard).map(|(read, _)| *read).collect();
        for read in lost {
            if let Some((_, waiter)) = self.reads.remove(&read) {
                let _ = waiter.send(None);
            }
        }
    }

    /// Carries out everything the core asks for, until it asks for nothing more.
    fn drive(&mut self) {
        match drain(self) {
            Ok(()) => {}
            Err(never) => match never {},
        }
    }

    fn log_writes(&mut self, batch: LogBatch) {
        let mut decisions = false;
        let mut writes = self.wal.batch();
        for write in batch.writes {
            match write {
                LogWrite::Stage { id, transfer, shards, made_by } => {
                    decisions = true;
                    writes.stage(&id, transfer, shards, made_by, common::http::now_unix_ms());
                }
                LogWrite::Decision { id, transfer, outcome, shards, made_by } => {
                    crash::point(crash::COORDINATOR_VOTES_RECEIVED);
                    decisions = true;
                    let decided_at_unix_ms = common::http::now_unix_ms();
                    let record = common::records::TransferRecord { transfer, outcome, shards, decided_at_unix_ms };
                    writes.put(&id, record, made_by);
                }
                LogWrite::End { id } => {
                    crash::point(crash::COORDINATOR_BEFORE_END);
                    writes.end(&id);
                }
            }
        }
        if let Err(error) = self.wal.apply(writes) {
            // The core already counts the writes as made: memory would run ahead of the log.
            tracing::error!(%error, "decision log write failed: stopping so recovery starts from the log");
            std::process::abort();
        }
        if let Some(barrier) = batch.sync {
            self.sync(barrier, decisions);
        }
    }

    /// Makes every write so far durable and reports `barrier` synced. Each barrier gets its own sync call: the
    /// flusher serves every call waiting when it starts with one fsync, and holding calls back here until the
    /// previous sync returned measured slower (fewer transfers per fsync at 64 clients).
    fn sync(&self, barrier: u64, decisions: bool) {
        let (wal, events) = (self.wal.clone(), self.events.clone());
        tokio::spawn(async move {
            if let Err(error) = wal.sync().await {
                tracing::error!(%error, "decision log sync failed: stopping so recovery starts from the log");
                std::process::abort();
            }
            let _ = events.send(Event::Synced { barrier, decisions }).await;
        });
    }

    fn release_answer(&mut self, answer: Answer) {
        match answer {
            Answer::Transfer { id, transfer, outcome } => {
                let (label, reason) = (outcome.status(), outcome.abort_reason().map_or("none", |r| r.code()));
                let waiters = self.waiters.remove(&id).unwrap_or_default();
                if !waiters.is_empty() {
                    metrics::counter!(metric::TRANSFERS, "outcome" => label, "reason" => reason).increment(1);
                }
                for waiter in waiters {
                    let answer = Ok(Final { transfer: transfer.clone(), outcome });
                    match waiter {
                        Waiter::One(reply) => drop(reply.send(answer)),
                        Waiter::Many { many, index } => {
                            let Some(waiting) = self.many.get_mut(&many) else { continue };
                            waiting.answers[index] = Some(answer);
                            waiting.missing -= 1;
                            if waiting.missing == 0 {
                                if let Some(done) = self.many.remove(&many) {
                                    finish_many(done);
                                }
                            }
                        }
                    }
                }
            }
            Answer::Queries { query, answers } => {
                if let Some(waiter) = self.queries.remove(&query) {
                    let _ = waiter.send(Ok(answers));
                }
            }
        }
    }
}

/// Sends a `SubmitMany` its answers, all in.
fn finish_many(done: Many) {
    let answers = done.answers.into_iter().map(|a| a.unwrap_or(Err(EngineError::CoreGone))).collect();
    let _ = done.reply.send(answers);
}

fn notify(notice: Notice) {
    match notice {
        Notice::Refused { id, shard, decision } => {
            tracing::error!(transfer_id = %id, shard, ?decision, "shard refused the decision: needs an operator")
        }
        Notice::PresumedAbort { id } => {
            tracing::info!(transfer_id = %id, "presumed abort for a transfer with no decision");
            metrics::counter!(metric::DECISION_QUERIES, "answer" => "presumed_abort").increment(1);
        }
        Notice::QueryAnswered { answer } => {
            let label = format!("{answer:?}").to_lowercase();
            metrics::counter!(metric::DECISION_QUERIES, "answer" => label).increment(1);
        }
        Notice::ShardSilent { id, shard } => {
            tracing::warn!(transfer_id = %id, shard, "no vote from the shard in time: aborting")
        }
        Notice::Redelivered { shard, count } => tracing::debug!(shard, count, "decisions re-sent"),
        Notice::LinkWanted { shard } => tracing::debug!(shard, "work waits for the stream: reconnecting now"),
    }
}
