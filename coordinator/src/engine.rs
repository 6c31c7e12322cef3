//! The coordinator's shell around the protocol machine: runs one transfer's prepare round, forces the decision
//! to the log, delivers it, and keeps re-delivering decisions until every shard has acknowledged them (after a
//! restart too). It also answers participants' decision queries. Each transfer runs in its own task, so a client
//! that hangs up cannot cut a transfer short half way.

use crate::participants::{CallError, ParticipantClient};
use crate::wal::{Wal, WalError};
use common::crash;
use common::http::now_unix_ms;
use common::ledger::{ShardId, Transfer, TransferId};
use protocol::coordinator::{decision_of, plan_query_answer, Phase, QueryPlan, TransferMachine, VoteResult};
use common::records::{AbortReason, Outcome, TransferRecord};
use common::wire::{DecideAck, DecideItem, Decision, DecisionQueryItem, PrepareItem, QueryAnswer};
use futures::future::join_all;
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{watch, Semaphore};
use tracing::Instrument;

/// Metric names of the coordinator.
pub mod metric {
    pub const TRANSFERS: &str = "ledger_transfers_total";
    pub const TRANSFER_SECONDS: &str = "ledger_transfer_seconds";
    pub const PREPARE_SECONDS: &str = "ledger_prepare_round_trip_seconds";
    pub const COMMIT_SECONDS: &str = "ledger_commit_round_trip_seconds";
    pub const ABORT_SECONDS: &str = "ledger_abort_round_trip_seconds";
    pub const IN_DOUBT: &str = "ledger_transfers_in_doubt";
    pub const IN_DOUBT_OLDEST_SECONDS: &str = "ledger_in_doubt_oldest_age_seconds";
    pub const PARTICIPANT_UP: &str = "ledger_participant_up";
    pub const RECOVERY_COMMITS_RESENT: &str = "ledger_recovery_commits_resent_total";
    pub const DECISION_QUERIES: &str = "ledger_decision_queries_total";
    pub const AUDIT_VIOLATIONS: &str = "ledger_audit_violations_total";

    /// Describes every metric once, so `/metrics` carries help text.
    pub fn describe() {
        metrics::describe_counter!(TRANSFERS, "Transfers decided, by outcome and abort reason");
        metrics::describe_histogram!(TRANSFER_SECONDS, "End-to-end time of POST /transfers");
        metrics::describe_histogram!(PREPARE_SECONDS, "Prepare round trip to one shard");
        metrics::describe_histogram!(COMMIT_SECONDS, "Commit round trip to one shard");
        metrics::describe_histogram!(ABORT_SECONDS, "Abort round trip to one shard");
        metrics::describe_gauge!(IN_DOUBT, "Decided transfers some shard has not acknowledged");
        metrics::describe_gauge!(IN_DOUBT_OLDEST_SECONDS, "Age of the oldest transfer in doubt");
        metrics::describe_gauge!(PARTICIPANT_UP, "1 if the shard answered its last health probe");
        metrics::describe_counter!(RECOVERY_COMMITS_RESENT, "Committed transfers re-sent after a restart");
        metrics::describe_counter!(DECISION_QUERIES, "Decision queries from participants, by answer");
        metrics::describe_counter!(AUDIT_VIOLATIONS, "Audit violations found");
    }
}

/// How often the re-delivery loop looks for decisions still owed an ack.
const REDELIVER_SCAN_INTERVAL: Duration = Duration::from_millis(500);
/// Health probes of the participants, for the up/down gauge.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// A decision unacknowledged this long is sent again.
const REDELIVER_AFTER: Duration = Duration::from_secs(1);

#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub shard_count: u32,
    /// This coordinator's URL as participants should reach it (stored in their prepared records).
    pub coordinator_url: String,
    /// A shard that has not voted this long counts as unavailable, and the transfer aborts.
    pub prepare_timeout: Duration,
    /// How long a client's commit waits for the shards' acks before it is answered anyway (the decision is
    /// durable by then; waiting only makes the client's next read see the new balances).
    pub commit_ack_wait: Duration,
    /// Transfers being decided at once; past it new ones are refused with 503 rather than queued without end.
    pub transfers_in_flight_max: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("transfer id already used with a different body")]
    IdempotencyConflict,
    #[error("too many transfers in flight")]
    Overloaded,
    #[error(transparent)]
    Wal(#[from] WalError),
    #[error("the transfer's task stopped unexpectedly")]
    TaskLost,
}

/// A transfer's final answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Final {
    pub transfer: Transfer,
    pub outcome: Outcome,
}

/// A transfer whose prepare round or decision logging is running in this process.
struct Inflight {
    transfer: Transfer,
    done: watch::Receiver<Option<Final>>,
}

enum Claim {
    Running(watch::Receiver<Option<Final>>),
    Logged(TransferRecord),
}

/// A durable decision some shard has not acknowledged yet.
struct Owed {
    machine: TransferMachine,
    decided_at: Instant,
    last_sent: Instant,
}

/// What `GET /transactions?status=in_doubt` shows.
#[derive(Clone, Debug, serde::Serialize)]
pub struct InDoubt {
    pub id: TransferId,
    pub decision: &'static str,
    pub age_ms: u64,
    pub awaiting_shards: Vec<ShardId>,
}

pub struct Engine {
    pub config: EngineConfig,
    pub wal: Wal,
    pub participants: Vec<ParticipantClient>,
    inflight: Mutex<HashMap<TransferId, Inflight>>,
    owed: Mutex<HashMap<TransferId, Owed>>,
    admission: Arc<Semaphore>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // These maps are only touched by short, non-panicking sections; recover the data if one ever did panic.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Engine {
    /// Builds the engine and queues every committed-but-unacknowledged transfer from the log for re-delivery.
    pub fn recover(
        config: EngineConfig,
        wal: Wal,
        participants: Vec<ParticipantClient>,
    ) -> Result<Arc<Self>, WalError> {
        let mut owed = HashMap::new();
        let long_ago = Instant::now().checked_sub(REDELIVER_AFTER).unwrap_or_else(Instant::now);
        for (id, record) in wal.unacked()? {
            let unacked: BTreeSet<ShardId> = record.shards.iter().copied().collect();
            let machine = TransferMachine::recovered(id, record.transfer, record.outcome, unacked);
            owed.insert(id, Owed { machine, decided_at: Instant::now(), last_sent: long_ago });
        }
        if !owed.is_empty() {
            tracing::info!(count = owed.len(), "recovered committed transfers still owed acks: re-sending");
            metrics::counter!(metric::RECOVERY_COMMITS_RESENT).increment(owed.len() as u64);
        }
        let admission = Arc::new(Semaphore::new(config.transfers_in_flight_max));
        Ok(Arc::new(Engine {
            config,
            wal,
            participants,
            inflight: Mutex::new(HashMap::new()),
            owed: Mutex::new(owed),
            admission,
        }))
    }

    /// Runs (or joins, or replays) the transfer `id` and returns its final outcome, durable.
    pub async fn submit(
        self: &Arc<Self>,
        id: TransferId,
        transfer: Transfer,
        made_by: Option<String>,
    ) -> Result<Final, EngineError> {
        let mut done = match self.claim(id, &transfer, made_by)? {
            Claim::Running(done) => done,
            Claim::Logged(record) => {
                // It may have been written by a decision query a moment ago: make sure it is on disk.
                self.wal.sync().await?;
                return Ok(Final { transfer: record.transfer, outcome: record.outcome });
            }
        };
        loop {
            if let Some(fin) = done.borrow_and_update().clone() {
                return Ok(fin);
            }
            if done.changed().await.is_err() {
                return Err(EngineError::TaskLost);
            }
        }
    }

    /// Joins the run of `id` in progress, or finds its logged outcome, or starts running it.
    fn claim(
        self: &Arc<Self>,
        id: TransferId,
        transfer: &Transfer,
        made_by: Option<String>,
    ) -> Result<Claim, EngineError> {
        let mut inflight = lock(&self.inflight);
        if let Some(running) = inflight.get(&id) {
            if running.transfer != *transfer {
                return Err(EngineError::IdempotencyConflict);
            }
            return Ok(Claim::Running(running.done.clone()));
        }
        if let Some(record) = self.wal.get(&id)? {
            if record.transfer != *transfer {
                return Err(EngineError::IdempotencyConflict);
            }
            return Ok(Claim::Logged(record));
        }
        let permit = self.admission.clone().try_acquire_owned().map_err(|_| EngineError::Overloaded)?;
        let (tx, rx) = watch::channel(None);
        inflight.insert(id, Inflight { transfer: transfer.clone(), done: rx.clone() });
        let engine = self.clone();
        let transfer = transfer.clone();
        let span = tracing::info_span!("transfer", transfer_id = %id);
        tokio::spawn(
            async move {
                let result = engine.run(id, transfer, made_by).await;
                drop(permit);
                match result {
                    Ok(fin) => {
                        let _ = tx.send(Some(fin));
                    }
                    Err(error) => {
                        // Nothing final was said; the id stays unknown and may be submitted again.
                        tracing::error!(%error, "transfer failed before a final outcome");
                        lock(&engine.inflight).remove(&id);
                    }
                }
            }
            .instrument(span),
        );
        Ok(Claim::Running(rx))
    }

    /// One transfer, from Prepare to the client's answer. Phase two continues after the answer if shards lag.
    async fn run(
        self: &Arc<Self>,
        id: TransferId,
        transfer: Transfer,
        made_by: Option<String>,
    ) -> Result<Final, EngineError> {
        let mut machine = TransferMachine::new(id, transfer.clone(), self.config.shard_count);
        let prepares = machine.shards().into_iter().map(|shard| {
            let item = PrepareItem {
                id,
                transfer: transfer.clone(),
                postings: transfer.postings_for(shard, self.config.shard_count),
                coordinator_url: self.config.coordinator_url.clone(),
            };
            let client = &self.participants[shard as usize];
            let actor = made_by.clone();
            async move {
                let started = Instant::now();
                let vote = match tokio::time::timeout(self.config.prepare_timeout, client.prepare(item, actor)).await {
                    Ok(Ok(vote)) => {
                        let shard_label = shard.to_string();
                        metrics::histogram!(metric::PREPARE_SECONDS, "shard" => shard_label).record(started.elapsed());
                        VoteResult::Vote(vote)
                    }
                    Ok(Err(CallError::Failed(error))) => {
                        tracing::warn!(shard, %error, "prepare failed");
                        VoteResult::Unavailable
                    }
                    Err(_) => {
                        tracing::warn!(shard, "prepare timed out");
                        VoteResult::Unavailable
                    }
                };
                (shard, vote)
            }
        });
        let votes = join_all(prepares).await;
        let mut outcome = None;
        for (shard, vote) in votes {
            tracing::debug!(shard, ?vote, "vote");
            outcome = outcome.or(machine.on_vote(shard, vote));
        }
        let outcome = outcome.or_else(|| machine.on_prepare_timeout()).expect("every shard has voted or timed out");
        crash::point(crash::COORDINATOR_VOTES_RECEIVED);

        // Force the decision to the log before anyone hears of it.
        let record = TransferRecord {
            transfer: transfer.clone(),
            outcome,
            shards: transfer.shards(self.config.shard_count),
            decided_at_unix_ms: now_unix_ms(),
        };
        self.wal.put(&id, &record, made_by.as_deref())?;
        self.wal.sync().await?;
        crash::point(crash::COORDINATOR_DECISION_LOGGED);
        tracing::info!(?outcome, "decision logged");
        let (label, reason) = match outcome {
            Outcome::Committed => ("committed", "none"),
            Outcome::Aborted(reason) => ("aborted", reason.code()),
        };
        metrics::counter!(metric::TRANSFERS, "outcome" => label, "reason" => reason).increment(1);

        let (decision, targets) = machine.on_decision_logged();
        let fin = Final { transfer, outcome };
        if targets.is_empty() {
            lock(&self.inflight).remove(&id);
            return Ok(fin);
        }
        let now = Instant::now();
        lock(&self.owed).insert(id, Owed { machine, decided_at: now, last_sent: now });
        lock(&self.inflight).remove(&id);
        let delivery = self.clone().deliver(id, decision, targets);
        if outcome == Outcome::Committed {
            // Wait (bounded) so the client's next read already sees the money moved.
            let _ = tokio::time::timeout(self.config.commit_ack_wait, delivery).await;
        } else {
            tokio::spawn(delivery.in_current_span());
        }
        Ok(fin)
    }

    /// Sends a durable decision to `targets` and records their acks; the last ack ends the transfer.
    async fn deliver(self: Arc<Self>, id: TransferId, decision: common::wire::Decision, targets: Vec<ShardId>) {
        let sends = targets.into_iter().map(|shard| {
            let client = &self.participants[shard as usize];
            async move {
                let started = Instant::now();
                let result = client.decide(DecideItem { id, decision }).await;
                if result.is_ok() {
                    let name =
                        if decision == Decision::Commit { metric::COMMIT_SECONDS } else { metric::ABORT_SECONDS };
                    metrics::histogram!(name, "shard" => shard.to_string()).record(started.elapsed());
                }
                (shard, result)
            }
        });
        for (shard, result) in join_all(sends).await {
            match result {
                Ok(DecideAck::Done) => self.on_ack(id, shard),
                Ok(DecideAck::Refused) => {
                    tracing::error!(transfer_id = %id, shard, ?decision, "shard refused the decision: needs an operator");
                }
                Err(error) => {
                    tracing::warn!(transfer_id = %id, shard, %error, "decision not delivered; will retry")
                }
            }
        }
    }

    fn on_ack(&self, id: TransferId, shard: ShardId) {
        let finished = {
            let mut owed = lock(&self.owed);
            let Some(entry) = owed.get_mut(&id) else {
                return;
            };
            if !entry.machine.on_ack(shard) {
                return;
            }
            owed.remove(&id)
        };
        let Some(entry) = finished else { return };
        if let Phase::Decided { outcome: Outcome::Committed, .. } = entry.machine.phase() {
            crash::point(crash::COORDINATOR_BEFORE_END);
            // Not flushed: if the end is lost, recovery re-sends a commit the shards acknowledge idempotently.
            if let Err(error) = self.wal.end(&id) {
                tracing::error!(transfer_id = %id, %error, "cannot record the end of a transfer; recovery will re-send");
            }
        }
        tracing::debug!(transfer_id = %id, "all shards acknowledged");
    }

    /// Re-sends decisions that are still owed acks (lost messages, shards that were down, recovered transfers).
    pub async fn redeliver_forever(self: Arc<Self>) {
        loop {
            tokio::time::sleep(REDELIVER_SCAN_INTERVAL).await;
            let in_doubt = self.in_doubt();
            metrics::gauge!(metric::IN_DOUBT).set(in_doubt.len() as f64);
            let oldest_ms = in_doubt.first().map_or(0, |d| d.age_ms);
            metrics::gauge!(metric::IN_DOUBT_OLDEST_SECONDS).set(oldest_ms as f64 / 1000.0);
            let due: Vec<(TransferId, common::wire::Decision, Vec<ShardId>)> = {
                let mut owed = lock(&self.owed);
                let now = Instant::now();
                owed.iter_mut()
                    .filter(|(_, o)| now.duration_since(o.last_sent) >= REDELIVER_AFTER)
                    .filter_map(|(id, o)| {
                        o.last_sent = now;
                        let Phase::Decided { outcome, unacked } = o.machine.phase() else {
                            return None;
                        };
                        Some((*id, decision_of(*outcome), unacked.iter().copied().collect()))
                    })
                    .collect()
            };
            for (id, decision, targets) in due {
                tokio::spawn(self.clone().deliver(id, decision, targets));
            }
        }
    }

    /// Keeps the participant-up gauge current for dashboards and alerts.
    pub async fn probe_participants_forever(self: Arc<Self>) {
        loop {
            for client in &self.participants {
                let up = client
                    .http()
                    .get(format!("{}/health", client.url))
                    .timeout(PROBE_TIMEOUT)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
                metrics::gauge!(metric::PARTICIPANT_UP, "shard" => client.shard.to_string()).set(if up {
                    1.0
                } else {
                    0.0
                });
            }
            tokio::time::sleep(PROBE_INTERVAL).await;
        }
    }

    /// Answers a participant in doubt. Never "abort" while the transfer may still commit; an abort given for an
    /// unknown transfer is logged first, so it binds any later submission of the same id.
    pub async fn answer_queries(&self, items: Vec<DecisionQueryItem>) -> Result<Vec<QueryAnswer>, EngineError> {
        let mut answers = Vec::with_capacity(items.len());
        for item in items {
            let inflight = lock(&self.inflight);
            let record = self.wal.get(&item.id)?;
            let answer = match plan_query_answer(inflight.contains_key(&item.id), record.map(|r| r.outcome)) {
                QueryPlan::Answer(answer) => {
                    metrics::counter!(metric::DECISION_QUERIES, "answer" => format!("{answer:?}").to_lowercase())
                        .increment(1);
                    answer
                }
                QueryPlan::LogAbortThenAnswer => {
                    let record = TransferRecord {
                        transfer: item.transfer,
                        outcome: Outcome::Aborted(AbortReason::CoordinatorRestarted),
                        shards: Vec::new(),
                        decided_at_unix_ms: now_unix_ms(),
                    };
                    self.wal.put(&item.id, &record, None)?;
                    tracing::info!(transfer_id = %item.id, "presumed abort for a transfer with no decision");
                    metrics::counter!(metric::DECISION_QUERIES, "answer" => "presumed_abort").increment(1);
                    QueryAnswer::Abort
                }
            };
            drop(inflight);
            answers.push(answer);
        }
        self.wal.sync().await?;
        Ok(answers)
    }

    /// `pending` while this process is deciding `id`, else what the log says.
    pub fn status(&self, id: &TransferId) -> Result<Option<(Transfer, Option<Outcome>)>, EngineError> {
        if let Some(running) = lock(&self.inflight).get(id) {
            return Ok(Some((running.transfer.clone(), None)));
        }
        Ok(self.wal.get(id)?.map(|r| (r.transfer, Some(r.outcome))))
    }

    /// The transfers in flight and then the newest decided ones, of one account or (`None`) of the whole ledger.
    pub fn transfers_of(
        &self,
        account: Option<&common::ledger::AccountId>,
        limit: usize,
    ) -> Result<Vec<(TransferId, Transfer, Option<Outcome>)>, EngineError> {
        let touches = |t: &Transfer| account.is_none_or(|a| t.from == *a || t.to == *a);
        let mut out: Vec<(TransferId, Transfer, Option<Outcome>)> = lock(&self.inflight)
            .iter()
            .filter(|(_, f)| touches(&f.transfer))
            .map(|(id, f)| (*id, f.transfer.clone(), None))
            .take(limit)
            .collect();
        let rest = limit - out.len();
        let logged = match account {
            Some(account) => self.wal.by_account(account, rest)?,
            None => self.wal.recent(rest)?,
        };
        out.extend(logged.into_iter().map(|(id, r)| (id, r.transfer, Some(r.outcome))));
        Ok(out)
    }

    pub fn in_doubt(&self) -> Vec<InDoubt> {
        let owed = lock(&self.owed);
        let mut list: Vec<InDoubt> = owed
            .iter()
            .map(|(id, o)| {
                let decision = match o.machine.phase() {
                    Phase::Decided { outcome: Outcome::Committed, .. } => "commit",
                    _ => "abort",
                };
                InDoubt {
                    id: *id,
                    decision,
                    age_ms: o.decided_at.elapsed().as_millis() as u64,
                    awaiting_shards: o.machine.unacked(),
                }
            })
            .collect();
        list.sort_by_key(|d| std::cmp::Reverse(d.age_ms));
        list
    }
}
