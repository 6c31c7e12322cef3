//! The oracle: what must hold after every step (the books, money conserved, nothing final before it is
//! durable, the cores' invariants) and once the healed cluster is quiet (every transfer decided everywhere).

use super::*;

impl Cluster {
    // ---------------------------------------------------------------------------------------------------------
    // The oracle.

    /// After every event: the changed node's books, and money across the cluster, in memory and on disk.
    pub(super) fn check_step(&mut self, touched: Option<Node>) -> Check {
        if let Some(core) = &self.coordinator.core {
            core.check_invariants();
        }
        if let Some(Node::Participant(s)) = touched {
            let p = &self.participants[s as usize];
            if let Some(core) = &p.core {
                core.check_invariants();
                self.stats.overdrawn += u64::from(core.machine().accounts().any(|(_, a)| a.balance < 0));
                p.memory.check_books(s, &self.opening, "in memory")?;
            }
        }
        self.check_staging_proofs()?;
        self.check_conservation(false)?;
        self.check_conservation(true)
    }

    /// Parallel commits' rule: a transfer with its staging record durable, no decision durable, and every shard
    /// it touches durably holding it prepared or committed must end committed once the coordinator that staged
    /// it is gone, since whatever recovery finishes it hears YES from every shard (a prepared record stays until
    /// a durable decision is applied). Two lives are exempt, and abort it safely, since the abort is durable
    /// before anyone hears and a crash before that leaves the next recovery to commit: the one that staged it
    /// (its prepare deadline, a lost link), and a recovering one that was handed a NO before the shard prepared
    /// it after all (a delayed or duplicated Prepare: a NO proves only that the shard had not prepared it then).
    pub(super) fn check_staging_proofs(&mut self) -> Check {
        let epoch = self.coordinator.epoch;
        let proved: Vec<TransferId> = self
            .coordinator
            .durable
            .iter()
            .filter(|(id, r)| {
                r.decision.is_none()
                    && r.staged_in.is_some_and(|e| e < epoch)
                    && !self.coordinator.no_votes.contains(id)
                    && !self.must_commit.contains(id)
                    && r.shards.iter().all(|s| {
                        let disk = &self.participants[*s as usize].disk;
                        // Prepared for this body: with reused ids a shard may hold another one under the id, and
                        // refuses this one (`IdInUse`).
                        disk.prepared.get(id).is_some_and(|p| p.transfer == r.transfer)
                            || disk.finished.get(id) == Some(&Decision::Commit)
                    })
            })
            .map(|(id, _)| *id)
            .collect();
        for id in proved {
            self.stats.commits_proved_by_staging += 1;
            self.note(|| format!("{} is committed: staged, prepared on every shard, its coordinator gone", short(&id)));
            self.bind_commit(id, "its durable staging record and prepared records prove it")?;
        }
        Ok(())
    }

    /// Sum of balances plus what committed transfers have yet to move equals the opening total. `on_disk` looks
    /// at the durable records only: the state a crash of every node right now would leave.
    pub(super) fn check_conservation(&self, on_disk: bool) -> Check {
        let mut total: i64 = 0;
        for p in &self.participants {
            let records = if on_disk || p.core.is_none() { &p.disk } else { &p.memory };
            total += records.accounts.values().map(|a| a.balance).sum::<i64>();
            for (id, transfer) in &self.committed {
                if records.finished.get(id) != Some(&Decision::Commit) {
                    total += transfer.postings_for(p.shard, self.shard_count).iter().map(|x| x.delta).sum::<i64>();
                }
            }
        }
        if total != self.opening_total {
            let view = if on_disk { "on disk" } else { "in memory" };
            return Err(format!(
                "money is not conserved {view}: balances plus committed transfers in flight add up to {total}, \
                 the opening total was {}",
                self.opening_total
            ));
        }
        Ok(())
    }

    pub(super) fn quiescent(&self) -> bool {
        let c = &self.coordinator;
        self.messages_in_flight == 0
            && c.core.as_ref().is_some_and(CoordinatorCore::is_idle)
            && self.intents.iter().all(|i| i.answer.is_some())
            && self.end_requests.iter().all(|r| !r.scheduled || r.answer.is_some())
            && self.participants.iter().all(|p| {
                p.core.as_ref().is_some_and(|c| c.machine().prepared().next().is_none() && c.durability().is_idle())
                    && p.unflushed.is_empty()
            })
    }

    /// Healed and quiet: every transfer decided everywhere, no hold left, money exactly where the outcomes say.
    /// A transfer's final outcome is its decision in the log the coordinator reads; a commit decision may not be
    /// on disk yet (nothing waits for it), but then its staging record is, and every shard has durably applied
    /// it, so no crash can undo it.
    pub(super) fn check_final(&self) -> Check {
        let c = &self.coordinator;
        let mut finals: BTreeMap<TransferId, (&LogRecord, Outcome)> = BTreeMap::new();
        for (id, record) in &c.memory {
            let outcome =
                record.outcome().ok_or_else(|| format!("{id} is still only staged once the cluster is quiet"))?;
            match c.durable.get(id) {
                Some(d) if d.outcome() == Some(outcome) => {}
                Some(d) if outcome == Outcome::Committed && d.decision.is_none() => {
                    for s in &record.shards {
                        let here = self.participants[*s as usize].disk.finished.get(id).copied();
                        if here != Some(Decision::Commit) {
                            return Err(format!(
                                "{id} committed, its decision is not durable, and P{s} has not durably applied it \
                                 ({here:?})"
                            ));
                        }
                    }
                }
                durable => {
                    return Err(format!(
                        "{id} was decided {outcome:?}, but the durable log holds {:?}",
                        durable.map(LogRecord::outcome)
                    ));
                }
            }
            finals.insert(*id, (record, outcome));
        }
        for id in &self.must_commit {
            let outcome = finals.get(id).map(|(_, o)| *o);
            if outcome != Some(Outcome::Committed) {
                return Err(format!("{id} had to end committed, but ends {outcome:?}"));
            }
        }
        let mut expected = self.opening.clone();
        let mut decided: BTreeMap<TransferId, Outcome> = BTreeMap::new();
        for intent in &self.intents {
            let answer = intent.answer.ok_or_else(|| format!("transfer {} was never answered", intent.id))?;
            let (_, outcome) = finals.get(&intent.id).copied().ok_or_else(|| {
                format!("transfer {} was answered but the coordinator has no record of it", intent.id)
            })?;
            match answer {
                // A hold heard granted: the grant was durable (`client_receive`), and has ended since (below).
                ClientAnswer::Final(Outcome::Held { expires_at_unix_ms })
                    if self.durable_grants.get(&intent.id) == Some(&expires_at_unix_ms) => {}
                ClientAnswer::Final(heard) if heard != outcome => {
                    return Err(format!(
                        "transfer {}: the client heard {heard:?}, the log says {outcome:?}",
                        intent.id
                    ));
                }
                // A conflict was checked when it arrived (`client_receive`): the body it was for was not the one
                // the coordinator ran or logged then, though a crash may have lost that one and logged this since.
                _ => {}
            }
            decided.insert(intent.id, outcome);
        }
        for (id, outcome) in &decided {
            let record = finals[id].0;
            for s in record.transfer.shards(self.shard_count) {
                let p = &self.participants[s as usize];
                let here = p.disk.finished.get(id).copied();
                match delivered(*outcome) {
                    None => return Err(format!("hold {id} is still granted once the cluster is quiet")),
                    Some(Decision::Commit) if here != Some(Decision::Commit) => {
                        return Err(format!("{id} ended {outcome:?}, but P{s} has {here:?}"));
                    }
                    Some(Decision::Abort) if here == Some(Decision::Commit) => {
                        return Err(format!("{id} ended {outcome:?}, but P{s} committed it"));
                    }
                    _ => {}
                }
            }
            let moved = match outcome {
                Outcome::Committed => Some(record.transfer.clone()),
                Outcome::Captured { amount } => Some(captured(&record.transfer, *amount)?),
                _ => None,
            };
            if let Some(moved) = moved {
                for s in 0..self.shard_count {
                    for posting in moved.postings_for(s, self.shard_count) {
                        *expected
                            .get_mut(&posting.account)
                            .ok_or_else(|| format!("{id} committed on a missing account"))? += posting.delta;
                    }
                }
            }
        }
        for p in &self.participants {
            let core = p.core.as_ref().expect("quiescent means every node is up");
            compare_with_shadow(core.machine(), &p.disk)?;
            p.disk.restore(p.shard, self.now)?;
            p.disk.check_books(p.shard, &self.opening, "at the end")?;
            for (id, decision) in &p.disk.finished {
                if *decision == Decision::Commit && !decided.contains_key(id) {
                    return Err(format!("P{} committed {id}, which no client asked for", p.shard));
                }
            }
            for (account, record) in &p.disk.accounts {
                if record.held != 0 || record.incoming != 0 {
                    return Err(format!("P{}: {account} still holds {record:?}", p.shard));
                }
                if record.balance != expected[account] {
                    return Err(format!(
                        "P{}: {account} ends at {}, the committed transfers give {}",
                        p.shard, record.balance, expected[account]
                    ));
                }
            }
        }
        let total: i64 = self.participants.iter().flat_map(|p| p.disk.accounts.values()).map(|a| a.balance).sum();
        if total != self.opening_total {
            return Err(format!("the books end at {total}, they opened at {}", self.opening_total));
        }
        self.check_holds_ended(&finals)
    }

    /// Every hold granted has ended, and every answer to a request to end one agrees with how it ended.
    pub(super) fn check_holds_ended(&self, finals: &BTreeMap<TransferId, (&LogRecord, Outcome)>) -> Check {
        for id in self.durable_grants.keys() {
            let outcome = finals.get(id).map(|(_, o)| *o);
            if !outcome.is_some_and(Outcome::ends_hold) {
                return Err(format!("hold {id} was granted, but ends {outcome:?}"));
            }
        }
        for r in self.end_requests.iter().filter(|r| r.scheduled) {
            let id = self.intents[r.intent].id;
            let answer =
                r.answer.ok_or_else(|| format!("the request to end hold {id} ({:?}) was never answered", r.end))?;
            let outcome = finals.get(&id).map(|(_, o)| *o);
            let agrees = match answer {
                EndAnswer::Final(heard) => outcome == Some(heard),
                EndAnswer::Refused(HoldError::NotActive("pending")) => true,
                EndAnswer::Refused(HoldError::NotActive(status)) => outcome.is_some_and(|o| o.status() == status),
                EndAnswer::Refused(HoldError::Expired) => outcome == Some(Outcome::Expired),
                EndAnswer::Refused(_) => true, // checked when it arrived
            };
            if !agrees {
                return Err(format!(
                    "the client of hold {id} asked {:?} and heard {answer:?}, but it ends {outcome:?}",
                    r.end
                ));
            }
        }
        Ok(())
    }

    pub(super) fn summary(&self) -> String {
        let c = &self.coordinator;
        let unanswered = self.intents.iter().filter(|i| i.answer.is_none()).count();
        let prepared: Vec<usize> = self
            .participants
            .iter()
            .map(|p| p.core.as_ref().map_or(usize::MAX, |c| c.machine().prepared().count()))
            .collect();
        format!(
            "coordinator up={} running={} owed={}; unanswered clients={unanswered}; prepared per shard={prepared:?}; \
             messages in flight={}",
            c.up(),
            c.core.as_ref().map_or(0, CoordinatorCore::running_count),
            c.core.as_ref().map_or(0, CoordinatorCore::owed_count),
            self.messages_in_flight
        )
    }
}
