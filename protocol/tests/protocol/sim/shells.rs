//! The nodes' shells, as the simulation plays them: the coordinator's (`coordinator/src/engine.rs`) around the
//! real `CoordinatorCore`, the participants' (`participant/src/stream.rs`, `resolver.rs`) around the real
//! `ParticipantCore`, and the disks they write: the participant's records, as `participant::storage` lays them out.

use super::*;

/// The simulation plays the engine's shell: `drain` hands it what the core asks for.
impl CoreShell for Cluster {
    type Error = String;

    fn core(&mut self) -> &mut CoordinatorCore {
        self.coordinator.core.as_mut().expect("only a running coordinator is driven")
    }

    fn write_log(&mut self, batch: LogBatch) -> Check {
        for write in batch.writes {
            self.coordinator_log_write(write)?;
        }
        if let Some(barrier) = batch.sync {
            self.coordinator.barrier = barrier;
            self.schedule_flush(Node::Coordinator);
        }
        Ok(())
    }

    fn transmit(&mut self, shard: ShardId, items: Vec<ToShard>) -> Check {
        let (epoch, link) = (self.coordinator.epoch, self.coordinator.links[shard as usize]);
        let life = link.ok_or_else(|| format!("the core sent a frame to P{shard} without a link"))?;
        self.send(Node::Coordinator, Node::Participant(shard), Msg::Frame { epoch, life, items });
        Ok(())
    }

    fn release(&mut self, answer: Answer) -> Check {
        self.release_answer(answer)
    }

    fn notice(&mut self, notice: Notice) -> Check {
        match notice {
            Notice::Refused { id, shard, decision } => {
                return Err(format!("P{shard} refused {decision:?} on {id}: the shard and the coordinator disagree"));
            }
            Notice::PresumedAbort { .. } => self.stats.presumed_aborts += 1,
            Notice::Redelivered { count, .. } => self.stats.redeliveries += count as u64,
            Notice::LinkWanted { shard } => {
                self.coordinator.wanted[shard as usize] = true;
                let epoch = self.coordinator.epoch;
                self.schedule(self.now + 1, Event::LinkCheck { epoch, shard });
            }
            Notice::QueryAnswered { .. } | Notice::ShardSilent { .. } => {}
        }
        Ok(())
    }
}

impl Records {
    /// Applies one batch as `participant::storage::apply` does, refusing changes no correct machine makes.
    pub(super) fn apply(&mut self, writes: &[Write]) -> Result<(), String> {
        // What the balance writes since the last `Finished` moved, per account: what a capture of a hold moved.
        let mut moved: Vec<Posting> = Vec::new();
        for write in writes {
            match write {
                Write::Account(id, record) => {
                    let before = self.accounts.get(id).map_or(0, |a| a.balance);
                    moved.push(Posting { account: id.clone(), delta: record.balance - before });
                    // Only the balance and the limit are durable; holds follow from the prepared records.
                    let durable = AccountRecord { held: 0, incoming: 0, ..*record };
                    self.accounts.insert(id.clone(), durable);
                }
                Write::Prepared(id, record) => {
                    if self.finished.contains_key(id) {
                        return Err(format!("transfer {id} prepared again after it finished"));
                    }
                    self.prepared.insert(*id, record.clone());
                }
                Write::ClearPrepared(id) => {
                    self.last_cleared = self.prepared.remove(id).map(|r| (*id, r));
                }
                Write::Finished(id, decision) => {
                    if let Some(earlier) = self.finished.get(id) {
                        return Err(format!(
                            "transfer {id} finished twice on one shard ({earlier:?}, then {decision:?})"
                        ));
                    }
                    self.finished.insert(*id, *decision);
                    let cleared = self.last_cleared.take().filter(|(cleared, _)| cleared == id);
                    let moved = std::mem::take(&mut moved);
                    if *decision == Decision::Commit {
                        let Some((_, record)) = cleared else {
                            return Err(format!("transfer {id} committed without a prepared record"));
                        };
                        let postings = if record.transfer.hold_seconds().is_some() {
                            captured_postings(id, &record.postings, &moved)?
                        } else {
                            record.postings
                        };
                        self.committed_postings.insert(*id, postings);
                    }
                }
                Write::Journal(entry) => self.journal(entry)?,
                Write::JournalNextSeq(next) => self.journal_next_seq = *next,
                Write::CreatedTotal(total) => self.created_total = *total,
                Write::Heuristic(id, _) => return Err(format!("a heuristic decision on {id}: no operator here")),
            }
        }
        // An account's last journal entry shows its balance: a group writes a change and its entries together.
        for (id, record) in &self.accounts {
            if self.journal_balance.get(id) != Some(&record.balance) {
                return Err(format!(
                    "account {id} has balance {}, its journal says {:?}",
                    record.balance,
                    self.journal_balance.get(id)
                ));
            }
        }
        if self.journal_next_seq != self.journal_last_seq + 1 {
            return Err(format!(
                "the journal's next seq is stored as {}, after entry {}",
                self.journal_next_seq, self.journal_last_seq
            ));
        }
        Ok(())
    }

    /// A journal entry: numbered after the last, its balance after it the one before plus what it moved.
    pub(super) fn journal(&mut self, entry: &JournalEntry) -> Check {
        if entry.seq != self.journal_last_seq + 1 {
            return Err(format!("journal entry {} follows entry {}", entry.seq, self.journal_last_seq));
        }
        self.journal_last_seq = entry.seq;
        let before = match (entry.kind, self.journal_balance.get(&entry.account)) {
            (EntryKind::Opened, None) => 0,
            (EntryKind::Opened, Some(_)) => return Err(format!("account {} opened twice", entry.account)),
            (_, Some(balance)) => *balance,
            (_, None) => return Err(format!("a journal entry on {}, never opened", entry.account)),
        };
        let moved = if entry.kind.moves_balance() { entry.amount } else { 0 };
        if entry.balance_after != before + moved {
            return Err(format!(
                "journal entry {} on {} ({:?} of {}) says the balance after it is {}, the entry before says {before}",
                entry.seq, entry.account, entry.kind, entry.amount, entry.balance_after
            ));
        }
        if entry.kind == EntryKind::Release && entry.amount != 0 {
            return Err(format!("journal entry {}: a release moved {}", entry.seq, entry.amount));
        }
        self.journal_balance.insert(entry.account.clone(), entry.balance_after);
        Ok(())
    }

    /// The amount a capture of hold `id` committed here: the same for each of its postings, 1 up to the
    /// posting's own, each moved in the posting's direction (`None`: `id` is no capture committed here).
    pub(super) fn captured_amount(&self, id: &TransferId) -> Option<i64> {
        let postings = self.committed_postings.get(id)?;
        let amount = postings.first()?.delta.abs();
        postings.iter().all(|p| p.delta.abs() == amount).then_some(amount)
    }

    /// The accounts as a restart rebuilds them: stored balances, holds and credits from the prepared records.
    pub(super) fn accounts_with_holds(&self) -> BTreeMap<AccountId, AccountRecord> {
        let mut accounts = self.accounts.clone();
        for p in self.prepared.values().flat_map(|r| &r.postings) {
            if let Some(a) = accounts.get_mut(&p.account) {
                if p.delta < 0 {
                    a.held -= p.delta;
                } else {
                    a.incoming += p.delta;
                }
            }
        }
        accounts
    }

    pub(super) fn restore(&self, shard: ShardId, now: u64) -> Result<ParticipantCore, String> {
        let accounts: BTreeMap<_, _> = self.accounts.clone();
        let prepared: HashMap<_, _> = self.prepared.iter().map(|(k, v)| (*k, v.clone())).collect();
        let machine = ParticipantMachine::restore(shard, accounts, prepared)
            .map(|m| m.with_recent_finished_max(RECENT_FINISHED_MAX))
            .map_err(|e| format!("P{shard}'s durable records do not restore: {e}"))?;
        let journal = JournalState::new(self.journal_next_seq, self.created_total);
        Ok(ParticipantCore::new(machine, journal, new_resolver(now)))
    }

    /// Balances against the reference: opening balance plus the postings of every commit finished here, each
    /// once; holds and credits reserved against the prepared transfers; nothing negative.
    pub(super) fn check_books(
        &self,
        shard: ShardId,
        opening: &BTreeMap<AccountId, i64>,
        what: &str,
    ) -> Result<(), String> {
        let mut expected: BTreeMap<&AccountId, (i64, i64, i64)> = BTreeMap::new();
        for id in self.accounts.keys() {
            let open = opening.get(id).copied().ok_or_else(|| format!("P{shard} {what}: unknown account {id}"))?;
            expected.insert(id, (open, 0, 0));
        }
        for postings in self.committed_postings.values() {
            for p in postings {
                let e = expected
                    .get_mut(&p.account)
                    .ok_or_else(|| format!("P{shard} {what}: commit on missing {}", p.account))?;
                e.0 += p.delta;
            }
        }
        for prepared in self.prepared.values() {
            for p in &prepared.postings {
                let e = expected
                    .get_mut(&p.account)
                    .ok_or_else(|| format!("P{shard} {what}: hold on missing {}", p.account))?;
                if p.delta < 0 {
                    e.1 -= p.delta;
                } else {
                    e.2 += p.delta;
                }
            }
        }
        for (id, record) in &self.accounts_with_holds() {
            let (balance, held, incoming) = expected[id];
            let actual = (record.balance, record.held, record.incoming);
            if actual != (balance, held, incoming) {
                return Err(format!(
                    "P{shard} {what}: account {id} has (balance, held, incoming) = {actual:?}, but its opening balance, \
                     the commits finished there and the prepared transfers give {:?}",
                    (balance, held, incoming)
                ));
            }
            if record.below_floor() || record.held < 0 || record.incoming < 0 || record.available_exact() < 0 {
                return Err(format!(
                    "P{shard} {what}: account {id} is below its overdraft limit or over-held: {record:?}"
                ));
            }
        }
        Ok(())
    }
}

impl Cluster {
    // ---------------------------------------------------------------------------------------------------------
    // The coordinator: the real core, and the shell's part of `coordinator/src/engine.rs`.

    pub(super) fn core(&mut self) -> &mut CoordinatorCore {
        self.coordinator.core.as_mut().expect("only a running coordinator is driven")
    }

    pub(super) fn coordinator_receive(&mut self, from: Node, msg: Msg) -> Check {
        if !self.coordinator.up() {
            // Connection refused, or no answer before the caller's timeout.
            if let (Msg::Query { life, qid, .. }, Node::Participant(s)) = (&msg, from) {
                if self.rng.chance(0.5) {
                    self.send(Node::Coordinator, Node::Participant(s), Msg::QueryRefused { life: *life, qid: *qid });
                }
            }
            return Ok(());
        }
        let epoch = self.coordinator.epoch;
        let now = self.now;
        match msg {
            Msg::Submit { id, transfer } => {
                let (core, log) = self.coordinator.core_and_log();
                match core.handle_submit(now, id, transfer, None, &log) {
                    Ok(()) => self.coordinator.waiters.entry(id).or_default().push(Waiter::Submit),
                    Err(SubmitError::IdempotencyConflict) => {
                        self.stats.conflicts += 1;
                        self.send(Node::Coordinator, Node::Client, Msg::Answer { id, answer: ClientAnswer::Conflict });
                    }
                    Err(SubmitError::Overloaded | SubmitError::HoldsFull) => {} // the client retries
                    Err(SubmitError::LogUnreadable) => return Err("the simulated log cannot fail to read".into()),
                }
            }
            Msg::EndHold { request, id, end } => {
                let (core, log) = self.coordinator.core_and_log();
                match core.handle_end_hold(now, id, end, &log) {
                    Ok(()) => self.coordinator.waiters.entry(id).or_default().push(Waiter::End(request)),
                    Err(error) => {
                        self.stats.hold_ends_refused += 1;
                        let answer = EndAnswer::Refused(error);
                        self.send(Node::Coordinator, Node::Client, Msg::EndAnswer { request, answer });
                    }
                }
            }
            Msg::Replies { epoch: e, shard, replies } if e == epoch => {
                for reply in &replies {
                    if let FromShard::Vote { id, vote: Vote::No { .. } } = reply {
                        self.coordinator.no_votes.insert(*id);
                    }
                }
                self.core().handle_replies(now, shard, replies)
            }
            Msg::Replies { .. } => {} // for an earlier incarnation
            Msg::Query { shard, life, qid, items } => {
                let (core, log) = self.coordinator.core_and_log();
                let query = core.handle_query(items, &log).map_err(|e| e.to_string())?;
                self.coordinator.queries.insert(query, (shard, life, qid));
            }
            other => return Err(format!("the coordinator got a message it never receives: {other:?}")),
        }
        // As the engine does, sometimes take more inputs before draining the core: they read a log that lags it.
        if self.rng.chance(0.5) {
            if !self.coordinator.drive_pending {
                self.coordinator.drive_pending = true;
                let (at, epoch) = (self.now + self.rng.range(0, 3), self.coordinator.epoch);
                self.schedule(at, Event::CoordinatorDrive { epoch });
            }
            return Ok(());
        }
        self.drive_coordinator()
    }

    /// The life of `shard` the coordinator could hold a connection to now: both up, neither cut off.
    pub(super) fn reachable(&self, shard: ShardId) -> Option<u64> {
        let p = &self.participants[shard as usize];
        let cut = self.isolated.contains(&Node::Coordinator) || self.isolated.contains(&Node::Participant(shard));
        (p.core.is_some() && !cut).then_some(p.life)
    }

    /// What the link task sees: a link to a life that is gone or cut off drops; a reachable shard gets a link;
    /// a wanted link to an unreachable shard fails at once.
    pub(super) fn check_link(&mut self, shard: ShardId) -> Check {
        let reachable = self.reachable(shard);
        let s = shard as usize;
        let current = self.coordinator.links[s];
        let now = self.now;
        if current.is_some() && current != reachable {
            self.note(|| format!("C link to P{shard} down"));
            self.coordinator.links[s] = None;
            self.core().handle_link(now, shard, false);
        }
        if self.coordinator.links[s].is_none() {
            match reachable {
                Some(life) => {
                    self.note(|| format!("C link to P{shard} up (l{life})"));
                    self.coordinator.links[s] = Some(life);
                    self.core().handle_link(now, shard, true);
                }
                None if self.coordinator.wanted[s] => self.core().handle_link(now, shard, false),
                None => {}
            }
            self.coordinator.wanted[s] = false;
        }
        self.drive_coordinator()
    }

    /// Carries out what the core asks for, as the engine's `drive` does.
    pub(super) fn drive_coordinator(&mut self) -> Check {
        self.coordinator.drive_pending = false;
        let epoch = self.coordinator.epoch;
        drain(self)?;
        self.check_core_and_log()?;
        if let Some(at) = self.core().poll_timeout() {
            if self.coordinator.timer_at != Some(at) {
                self.coordinator.timer_at = Some(at);
                self.schedule(at.max(self.now), Event::CoordinatorTimer { epoch, at });
            }
        }
        Ok(())
    }

    /// Answers reach every client waiting on the id, query answers their participant.
    pub(super) fn release_answer(&mut self, answer: Answer) -> Check {
        match answer {
            Answer::Transfer { id, outcome, .. } => {
                let waiters = self.coordinator.waiters.remove(&id).unwrap_or_default();
                self.check_released(id, outcome, waiters.len())?;
                for waiter in waiters {
                    let msg = match waiter {
                        Waiter::Submit => Msg::Answer { id, answer: ClientAnswer::Final(outcome) },
                        Waiter::End(request) => Msg::EndAnswer { request, answer: EndAnswer::Final(outcome) },
                    };
                    self.send(Node::Coordinator, Node::Client, msg);
                }
            }
            Answer::Queries { query, answers } => {
                if let Some((shard, life, qid)) = self.coordinator.queries.remove(&query) {
                    let answers = Msg::Answers { life, qid, answers };
                    self.send(Node::Coordinator, Node::Participant(shard), answers);
                }
            }
        }
        Ok(())
    }

    /// Applies one of the core's log writes to the log as the process reads it, and queues it for the disk.
    pub(super) fn coordinator_log_write(&mut self, write: coordinator_core::LogWrite) -> Check {
        let epoch = self.coordinator.epoch;
        match write {
            coordinator_core::LogWrite::Stage { id, transfer, shards, made_by } => {
                if let Some(known) = self.coordinator.memory.get(&id) {
                    return Err(format!("the core staged {id} again, but the log already holds {known:?}"));
                }
                let record = LogRecord {
                    transfer,
                    shards,
                    made_by,
                    indexed_at: self.now,
                    staged_in: Some(epoch),
                    decision: None,
                    unacked_marker: false,
                    hold_key: false,
                };
                self.coordinator.memory.insert(id, record.clone());
                self.coordinator.unflushed.push(LogWrite::Stage(id, record));
            }
            coordinator_core::LogWrite::Decision { id, transfer, outcome, shards, made_by } => {
                if outcome == Outcome::Committed && transfer.single().is_none() {
                    self.stats.multi_leg_commits += 1;
                }
                match outcome.abort_reason() {
                    None if outcome == Outcome::Committed => self.stats.committed += 1,
                    None => {} // a hold's grant or end, counted once durable (`make_durable`)
                    Some(AbortReason::ParticipantUnavailable) => self.stats.aborted_unavailable += 1,
                    Some(AbortReason::CoordinatorRestarted) => {}
                    Some(_) => self.stats.aborted_refused += 1,
                }
                if self.coordinator.staged_handed.contains(&id) {
                    match outcome {
                        Outcome::Committed => self.stats.staged_recovered_committed += 1,
                        _ => self.stats.staged_recovered_aborted += 1,
                    }
                }
                // A decision overwrites the staging record and keeps its place in the time index; a hold's end
                // overwrites its grant, and nothing else may follow a decision.
                let staged = self.coordinator.memory.get(&id);
                match staged.and_then(LogRecord::outcome) {
                    Some(known) if known == outcome => {}
                    Some(Outcome::Held { .. }) if outcome.ends_hold() => {}
                    None if !outcome.ends_hold() => {}
                    known => {
                        return Err(format!("the core decided {id} {outcome:?}, but the log already says {known:?}"));
                    }
                }
                // A commit with no staging record took the classic path: `check_released` and the shards' checks
                // hold it to its decision being durable before anyone hears of it.
                if outcome == Outcome::Committed && staged.is_none_or(|r| r.staged_in.is_none()) {
                    self.stats.classic_commits += 1;
                }
                let record = LogRecord {
                    transfer,
                    shards,
                    made_by,
                    indexed_at: staged.map_or(self.now, |r| r.indexed_at),
                    staged_in: staged.and_then(|r| r.staged_in),
                    decision: Some((outcome, self.now)),
                    unacked_marker: outcome == Outcome::Committed,
                    hold_key: matches!(outcome, Outcome::Held { .. })
                        || (outcome.ends_hold() && staged.is_some_and(|r| r.hold_key)),
                };
                self.coordinator.memory.insert(id, record.clone());
                self.coordinator.unflushed.push(LogWrite::Put(id, record));
            }
            coordinator_core::LogWrite::End { id } => {
                // Not flushed: if the end is lost, recovery re-sends a commit (or a hold's end) acknowledged
                // idempotently.
                if let Some(record) = self.coordinator.memory.get_mut(&id) {
                    record.end();
                }
                self.coordinator.unflushed.push(LogWrite::End(id));
            }
        }
        Ok(())
    }

    /// The core releases the outcome of `id` (to `waiters` clients). A commit needs its staging record or its
    /// commit decision durable now, and binds the transfer to end committed; an abort needs the abort durable.
    pub(super) fn check_released(&mut self, id: TransferId, outcome: Outcome, waiters: usize) -> Check {
        let durable = self.coordinator.durable.get(&id);
        match outcome {
            Outcome::Committed => {
                if !durable.is_some_and(LogRecord::allows_commit) {
                    return Err(format!(
                        "the coordinator released committed for {id}, but its log holds {:?}, neither the staging \
                         record nor the commit durable",
                        durable.map(LogRecord::outcome)
                    ));
                }
                if waiters > 0 && durable.is_some_and(|r| r.decision.is_none()) {
                    self.stats.committed_before_decision_durable += 1;
                }
                self.bind_commit(id, "its commit was released to clients")
            }
            // A grant may be answered after the hold has ended (a repeated submission), but it was durable.
            Outcome::Held { expires_at_unix_ms } => {
                let granted = self.durable_grants.get(&id).copied();
                if granted != Some(expires_at_unix_ms) {
                    return Err(format!(
                        "the coordinator released {id} granted until {expires_at_unix_ms}, but the durable grant is \
                         {granted:?}"
                    ));
                }
                Ok(())
            }
            _ => {
                let durable = self.durable_outcomes.get(&id).copied();
                if durable != Some(outcome) {
                    return Err(format!(
                        "the coordinator released {outcome:?} for {id}, the durable outcome is {durable:?}"
                    ));
                }
                Ok(())
            }
        }
    }

    /// The body the coordinator knows under `id`: logged, or running (on the classic path, not logged yet).
    pub(super) fn current_body(&self, id: &TransferId) -> Option<Transfer> {
        let logged = self.coordinator.memory.get(id).map(|r| r.transfer.clone());
        logged.or_else(|| self.coordinator.core.as_ref().and_then(|c| c.running(id).cloned()))
    }

    /// `id` must end committed (`why`): no abort of it may be durable, now or later.
    pub(super) fn bind_commit(&mut self, id: TransferId, why: &str) -> Check {
        if self.must_commit.insert(id) {
            if let Some(outcome @ (Outcome::Aborted(_) | Outcome::AbortedAtLeg { .. })) = self.durable_outcomes.get(&id)
            {
                return Err(format!("{id} must commit ({why}), but its durable outcome is {outcome:?}"));
            }
            let transfer = self.coordinator.memory.get(&id).or_else(|| self.coordinator.durable.get(&id));
            let transfer = transfer.ok_or_else(|| format!("{id} must commit ({why}) but no log knows it"))?;
            self.committed.insert(id, transfer.transfer.clone());
        }
        Ok(())
    }

    /// The shell's log and the running core agree: every staged transfer running has its entry in the log, and every
    /// staging record with no decision is running (so no query presumes it aborted, no submission stages it
    /// twice).
    pub(super) fn check_core_and_log(&self) -> Check {
        let c = &self.coordinator;
        let Some(core) = c.core.as_ref() else { return Ok(()) };
        for (id, transfer) in core.running_transfers() {
            match c.memory.get(id) {
                Some(r) if r.transfer == *transfer => {}
                // A transfer on the classic path has no log entry until its decision.
                None if !core.is_staged(id) => {}
                other => return Err(format!("{id} runs staged in the core, but the log holds {other:?}")),
            }
        }
        for (id, _) in c.memory.iter().filter(|(_, r)| r.decision.is_none()) {
            if core.running(id).is_none() {
                return Err(format!("{id} is staged with no decision, but the core does not run it"));
            }
        }
        Ok(())
    }

    pub(super) fn coordinator_flush(&mut self) -> Check {
        self.coordinator.flush_scheduled = false;
        if self.healed_at.is_none() && self.rng.chance(self.faults.crash_at_flush) {
            self.note(|| "C crashes instead of flushing".into());
            return self.crash_and_schedule_restart(Node::Coordinator);
        }
        let writes = std::mem::take(&mut self.coordinator.unflushed);
        for write in writes {
            self.make_durable(write)?;
        }
        if self.healed_at.is_none() && self.rng.chance(self.faults.crash_at_flush) {
            self.note(|| "C crashes after flushing, before answering".into());
            return self.crash_and_schedule_restart(Node::Coordinator);
        }
        // Everything written before this flush is durable: so is every barrier handed out so far.
        let (now, barrier) = (self.now, self.coordinator.barrier);
        self.core().handle_synced(now, barrier);
        self.drive_coordinator()
    }

    /// One log write reaches the disk. A staging record never overwrites anything; a durable outcome never
    /// changes, and no transfer bound to commit is ever durably aborted; a durable commit is money in flight
    /// until every shard has applied it (even one a torn flush made durable that nobody has heard of yet).
    pub(super) fn make_durable(&mut self, write: LogWrite) -> Check {
        match &write {
            LogWrite::Stage(id, _) => {
                if let Some(known) = self.coordinator.durable.get(id) {
                    return Err(format!("a staging record of {id} reached the disk over {known:?}"));
                }
            }
            LogWrite::Put(id, record) => {
                let outcome = record.outcome().expect("a decision write holds a decision");
                match self.durable_outcomes.insert(*id, outcome) {
                    Some(known) if known == outcome => {}
                    Some(Outcome::Held { .. }) if outcome.ends_hold() => self.count_hold_end(outcome, &record.transfer),
                    None if !outcome.ends_hold() => {}
                    known => {
                        return Err(format!(
                            "the durable outcome of {id} went from {known:?} to {outcome:?}: only a hold's grant \
                             changes, once, to its end"
                        ));
                    }
                }
                if let Outcome::Held { expires_at_unix_ms } = outcome {
                    if self.durable_grants.insert(*id, expires_at_unix_ms).is_none() {
                        self.stats.holds_granted += 1;
                    }
                }
                if outcome == Outcome::Committed {
                    self.committed.insert(*id, record.transfer.clone());
                } else if let Outcome::Captured { amount } = outcome {
                    self.committed.insert(*id, captured(&record.transfer, amount)?);
                } else if self.must_commit.contains(id) {
                    return Err(format!("{id} must end committed, but {outcome:?} reached the disk"));
                }
            }
            LogWrite::End(_) => {}
        }
        apply_log_write(&mut self.coordinator.durable, write);
        Ok(())
    }

    /// A hold's end reached the disk.
    pub(super) fn count_hold_end(&mut self, end: Outcome, hold: &Transfer) {
        match end {
            Outcome::Captured { amount } => {
                self.stats.holds_captured += 1;
                let held = hold.single().map_or(0, |leg| leg.amount.minor());
                self.stats.holds_captured_in_part += u64::from(amount < held);
            }
            Outcome::Released => self.stats.holds_released += 1,
            _ => self.stats.holds_expired += 1,
        }
    }

    pub(super) fn crash_and_schedule_restart(&mut self, node: Node) -> Check {
        self.crash(node)?;
        let back = self.now + self.rng.range(10, 2_000);
        self.schedule(back, Event::Restart(node));
        Ok(())
    }

    pub(super) fn schedule_flush(&mut self, node: Node) {
        let (scheduled, life) = match node {
            Node::Coordinator => (&mut self.coordinator.flush_scheduled, self.coordinator.epoch),
            Node::Participant(s) => {
                let p = &mut self.participants[s as usize];
                (&mut p.flush_scheduled, p.life)
            }
            Node::Client => unreachable!("clients have no disk"),
        };
        if !*scheduled {
            *scheduled = true;
            // Most flushes take milliseconds; now and then an fsync stalls, and replies wait behind it.
            let took = if self.rng.chance(0.1) { self.rng.range(20, 300) } else { self.rng.range(1, 10) };
            self.schedule(self.now + took, Event::Flush { node, life });
        }
    }

    // ---------------------------------------------------------------------------------------------------------
    // The participants, as `participant/src/server.rs` and `participant/src/resolver.rs`.

    pub(super) fn participant_receive(&mut self, s: ShardId, msg: Msg) -> Check {
        let now = self.now;
        let p = &mut self.participants[s as usize];
        let life = p.life;
        let Some(core) = p.core.as_mut() else {
            return Ok(());
        };
        match msg {
            Msg::Frame { life: l, .. } if l != life => Ok(()), // a connection to an earlier life
            Msg::Frame { epoch, items, .. } => {
                // The coordinator's epoch names the connection: the core keeps each one's replies apart.
                let replies = core.handle_frame(now, epoch, items, &p.memory.finished);
                // A NO on its way to this life's core already frees a staged transfer from having to commit,
                // though the shard may prepare it later all the same (a delayed Prepare): see
                // `check_staging_proofs`.
                if epoch == self.coordinator.epoch {
                    for reply in replies {
                        if let FromShard::Vote { id, vote: Vote::No { .. } } = reply {
                            self.coordinator.no_votes.insert(*id);
                        }
                    }
                }
                self.drive_participant(s)
            }
            Msg::Answers { life: l, .. } if l != life => Ok(()), // a reply to an earlier life
            Msg::Answers { qid, answers, .. } => {
                let acks = match core.handle_answers(now, qid, &answers, &p.memory.finished) {
                    Ok(acks) => acks,
                    // A duplicate, or a reply to a query already given up as unreachable.
                    Err(AnswerError::NotWaiting(_)) => return Ok(()),
                    Err(error @ AnswerError::CountMismatch { .. }) => {
                        return Err(format!("P{s}'s query {qid} got a wrong reply from the coordinator: {error}"));
                    }
                };
                for (id, decision, ack) in acks {
                    self.stats.in_doubt_resolved += 1;
                    if ack == DecideAck::Refused {
                        return Err(format!("P{s} refused the coordinator's answer {decision:?} for {id}"));
                    }
                }
                self.drive_participant(s)
            }
            Msg::QueryRefused { life: l, qid } => self.resolver_unreachable(s, l, qid, "connection refused"),
            other => Err(format!("P{s} got a message it never receives: {other:?}")),
        }
    }

    /// Carries out what the participant's core asks for, as its stream and resolver shells do: its writes go
    /// to the memory shadow and wait for the next flush, which a barrier asks for; the replies it releases go
    /// out; the resolver's queries are sent.
    pub(super) fn drive_participant(&mut self, s: ShardId) -> Check {
        let p = &mut self.participants[s as usize];
        let Some(core) = p.core.as_mut() else {
            return Ok(());
        };
        core.check_invariants();
        if let Some(batch) = core.poll_writes() {
            core.writes_applied();
            if let Some(barrier) = batch.sync {
                p.barrier = barrier;
            }
            self.persist(s, batch.writes)?;
        }
        loop {
            let p = &mut self.participants[s as usize];
            let Some((epoch, replies)) = p.core.as_mut().and_then(ParticipantCore::poll_any_reply) else { break };
            // A Commit re-sent after the log had it acknowledged: already finished here, it must be acked
            // without a write (a second `Finished` fails the write shadow, a balance moved twice the books).
            self.stats.acked_commits_acked_again += replies
                .iter()
                .filter(|r| {
                    matches!(r, FromShard::Ack { id, decision: Decision::Commit, ack: DecideAck::Done }
                        if self.coordinator.resent_acked.contains(id))
                })
                .count() as u64;
            let reply = Msg::Replies { epoch, shard: s, replies };
            self.send(Node::Participant(s), Node::Coordinator, reply);
        }
        let p = &self.participants[s as usize];
        if !p.unflushed.is_empty() || p.core.as_ref().is_some_and(|c| !c.durability().is_idle()) {
            self.schedule_flush(Node::Participant(s));
        }
        self.drive_resolver(s)
    }

    /// Applies a group of the core's writes to the memory shadow (as `participant::storage::apply` does to the
    /// store); they reach the disk at the next flush.
    pub(super) fn persist(&mut self, s: ShardId, writes: Vec<Write>) -> Check {
        for write in &writes {
            if let Write::Finished(id, decision) = write {
                self.record_applied(s, *id, *decision)?;
            }
        }
        let p = &mut self.participants[s as usize];
        p.memory.apply(&writes).map_err(|e| format!("P{s} in memory: {e}"))?;
        // A capture moves what the durable one says: not the whole hold, nor another amount.
        for write in &writes {
            let Write::Finished(id, Decision::Commit) = write else { continue };
            if let Some(Outcome::Captured { amount }) = self.durable_outcomes.get(id) {
                let here = p.memory.captured_amount(id);
                if here != Some(*amount) {
                    return Err(format!(
                        "P{s} captured {here:?} of {id}, the coordinator's durable capture is {amount}"
                    ));
                }
            }
        }
        if !writes.is_empty() {
            p.unflushed.push(writes);
        }
        Ok(())
    }

    /// A shard finished a transfer. A Commit needs the coordinator's staging record or commit decision durable
    /// now, and binds the transfer to end committed; an Abort needs the abort durable. The same everywhere.
    pub(super) fn record_applied(&mut self, s: ShardId, id: TransferId, decision: Decision) -> Check {
        let durable = self.durable_outcomes.get(&id).copied();
        match decision {
            // A capture of a hold: `persist` checks its amount against the durable capture once it is applied.
            Decision::Commit if matches!(durable, Some(Outcome::Captured { .. })) => {}
            Decision::Commit => {
                let log = self.coordinator.durable.get(&id);
                if !log.is_some_and(LogRecord::allows_commit) {
                    return Err(format!(
                        "P{s} applied Commit to {id}, but the coordinator's log durably holds {:?}, neither its \
                         staging record nor its commit",
                        log.map(LogRecord::outcome)
                    ));
                }
                if durable.is_none() {
                    self.stats.commit_applied_before_decision_durable += 1;
                }
                self.bind_commit(id, &format!("P{s} applied its Commit"))?;
            }
            Decision::Abort => {
                // A body sent under an id a client then reused for another (`SIM_REUSED_IDS`): the coordinator
                // aborts it whatever it decides for the body it logged, and it is not the logged transfer.
                let held = self.participants[s as usize].memory.prepared.get(&id).map(|p| &p.transfer);
                let current = self.current_body(&id);
                if self.reused_ids && held.is_some() && current.is_some() && held != current.as_ref() {
                    return Ok(());
                }
                if durable.and_then(delivered) != Some(decision) {
                    return Err(format!(
                        "P{s} applied {decision:?} to {id}, but the coordinator's durable outcome is {durable:?}"
                    ));
                }
            }
        }
        if let Some(other) = self.applied.insert(id, decision) {
            if other != decision {
                return Err(format!("{id} was {other:?} on one shard and {decision:?} on P{s}"));
            }
        }
        Ok(())
    }

    pub(super) fn participant_flush(&mut self, s: ShardId) -> Check {
        self.participants[s as usize].flush_scheduled = false;
        if self.healed_at.is_none() && self.rng.chance(self.faults.crash_at_flush) {
            self.note(|| format!("P{s} crashes instead of flushing"));
            return self.crash_and_schedule_restart(Node::Participant(s));
        }
        let p = &mut self.participants[s as usize];
        for batch in p.unflushed.drain(..) {
            p.disk.apply(&batch).map_err(|e| format!("P{s} on disk: {e}"))?;
        }
        let core = p.core.as_ref().expect("only a running participant flushes");
        compare_with_shadow(core.machine(), &p.memory)?;
        p.disk.check_books(s, &self.opening, "on disk")?;
        if self.healed_at.is_none() && self.rng.chance(self.faults.crash_at_flush) {
            self.note(|| format!("P{s} crashes after flushing, before answering"));
            return self.crash_and_schedule_restart(Node::Participant(s));
        }
        let now = self.now;
        let p = &mut self.participants[s as usize];
        let barrier = p.barrier;
        p.core.as_mut().expect("only a running participant flushes").handle_synced(now, barrier);
        self.drive_participant(s)
    }

    /// Carries out what the resolver asks for, as the participant's resolver shell does: sends every query it
    /// has formed (each with the shell's own timeout), and schedules its next callback.
    pub(super) fn drive_resolver(&mut self, s: ShardId) -> Check {
        let p = &mut self.participants[s as usize];
        let life = p.life;
        let Some(resolver) = p.core.as_mut().map(ParticipantCore::resolver_mut) else {
            return Ok(());
        };
        let mut queries = Vec::new();
        while let Some(query) = resolver.poll_query() {
            queries.push(query);
        }
        let due = resolver.poll_timeout();
        for query in queries {
            if query.coordinator_url != COORDINATOR_URL {
                return Err(format!("P{s} asked {:?}, which is no coordinator", query.coordinator_url));
            }
            let (qid, items) = (query.id, query.items);
            self.send(Node::Participant(s), Node::Coordinator, Msg::Query { shard: s, life, qid, items });
            self.schedule(self.now + QUERY_TIMEOUT, Event::QueryTimeout { shard: s, life, qid });
        }
        if let Some(at) = due {
            let p = &mut self.participants[s as usize];
            if p.resolver_timer_at != Some(at) {
                p.resolver_timer_at = Some(at);
                self.schedule(at.max(self.now), Event::ResolverTick { shard: s, life, at });
            }
        }
        Ok(())
    }

    /// A decision query of this life was refused or timed out: the core backs off (a query already answered,
    /// or of an earlier life, is ignored).
    pub(super) fn resolver_unreachable(&mut self, s: ShardId, life: u64, qid: u64, error: &str) -> Check {
        let now = self.now;
        let p = &mut self.participants[s as usize];
        if p.life != life {
            return Ok(());
        }
        let Some(resolver) = p.core.as_mut().map(ParticipantCore::resolver_mut) else {
            return Ok(());
        };
        resolver.handle_unreachable(now, qid, error);
        self.drive_resolver(s)
    }
}
