//! The clients: they submit transfers and holds, resubmit while unanswered, end the holds they were granted, and
//! check every answer they hear against the durable log.

use super::*;

impl Cluster {
    // ---------------------------------------------------------------------------------------------------------
    // Clients.

    /// A client sends `msg` to the coordinator (now and then twice at once while the faults last), and sends it
    /// again (`again`) a while later if it is unanswered by then.
    pub(super) fn client_request(&mut self, msg: Msg, again: Event) {
        self.send(Node::Client, Node::Coordinator, msg.clone());
        if self.healed_at.is_none() && self.rng.chance(0.15) {
            self.stats.duplicate_submissions += 1;
            self.send(Node::Client, Node::Coordinator, msg);
        }
        let retry = self.now + self.rng.range(1_500, 5_000);
        self.schedule(retry, again);
    }

    pub(super) fn client_receive(&mut self, msg: Msg) -> Check {
        let (id, answer) = match msg {
            Msg::Answer { id, answer } => (id, answer),
            Msg::EndAnswer { request, answer } => return self.client_end_answer(request, answer),
            other => return Err(format!("a client got a message it never receives: {other:?}")),
        };
        if let ClientAnswer::Final(outcome) = answer {
            let durable = self.durable_outcomes.get(&id).copied();
            let staged = self.coordinator.durable.get(&id).is_some_and(|r| r.decision.is_none());
            // A commit is told once staged and voted: its decision need not be durable yet, its staging record must.
            // A hold's grant is told once durable, though its end may have overwritten it since.
            let matches = durable == Some(outcome)
                || (outcome == Outcome::Committed && durable.is_none() && staged)
                || matches!(outcome, Outcome::Held { expires_at_unix_ms }
                    if self.durable_grants.get(&id) == Some(&expires_at_unix_ms));
            if !matches {
                return Err(format!(
                    "a client heard {outcome:?} for {id}, but the durable outcome is {durable:?} (staged: {staged})"
                ));
            }
            if outcome == Outcome::Committed {
                self.bind_commit(id, "a client heard it committed")?;
            }
        } else if !self.reused_ids {
            return Err(format!("a client that never reuses ids was told {id} conflicts"));
        }
        // With reused ids, a final answer is for the body the coordinator runs or logged, a conflict for others.
        let current = self.current_body(&id);
        let for_this_body = |intent: &Intent| match (&current, answer) {
            // A conflict the coordinator no longer knows the other side of (a crash lost it): which body it
            // was for is unknown, and the client resubmits whatever stays unanswered.
            (None, ClientAnswer::Conflict) => false,
            (None, ClientAnswer::Final(_)) => true,
            (Some(t), ClientAnswer::Final(_)) => *t == intent.transfer,
            (Some(t), ClientAnswer::Conflict) => *t != intent.transfer,
        };
        if let (Some(current), ClientAnswer::Conflict) = (&current, answer) {
            if self.intents.iter().all(|i| i.id != id || i.transfer == *current) {
                return Err(format!("a conflict was reported for {id}, but no client sent it another body"));
            }
        }
        let mut granted = Vec::new();
        for (index, intent) in self.intents.iter_mut().enumerate().filter(|(_, i)| i.id == id && for_this_body(i)) {
            match (intent.answer, answer) {
                // A hold heard granted may be heard ended (a repeated submission answered later), and the two
                // answers may cross: each was checked against the durable log above.
                (Some(ClientAnswer::Final(Outcome::Held { .. })), ClientAnswer::Final(_))
                | (Some(ClientAnswer::Final(_)), ClientAnswer::Final(Outcome::Held { .. })) => {}
                (Some(ClientAnswer::Final(a)), ClientAnswer::Final(b)) if a != b => {
                    return Err(format!("a client heard {a:?} and then {b:?} for {id}"));
                }
                (None, _) | (Some(ClientAnswer::Conflict), ClientAnswer::Final(_)) => {
                    intent.answer = Some(answer);
                    if matches!(answer, ClientAnswer::Final(o) if matches!(o, Outcome::Held { .. }) || o.ends_hold()) {
                        granted.push(index);
                    }
                }
                _ => {}
            }
        }
        // Told its hold is granted, a client ends it as planned (a hold heard ended is tried all the same).
        for intent in granted {
            for request in self.intents[intent].ends.clone() {
                let r = &mut self.end_requests[request];
                if !r.scheduled {
                    r.scheduled = true;
                    let at = self.now + r.after_grant;
                    self.schedule(at, Event::ClientEndHold { request });
                }
            }
        }
        Ok(())
    }

    /// A client hears about its request to end a hold. A taken end is the one it asked for, and durable; a
    /// refusal agrees with the durable log: the hold ended another way, or its expiry has passed (which is
    /// bound to end it: the core refuses a late capture at once, and a restart expires the hold before
    /// anything else), or the capture asked for more than the hold holds while it was granted, or (`pending`)
    /// another end is under way, which it must not name before that end is durable.
    pub(super) fn client_end_answer(&mut self, request: usize, answer: EndAnswer) -> Check {
        let r = &self.end_requests[request];
        let intent = &self.intents[r.intent];
        let id = intent.id;
        let held = intent.transfer.single().map_or(0, |leg| leg.amount.minor());
        let durable = self.durable_outcomes.get(&id).copied();
        let asked = match r.end {
            HoldEnd::Capture(amount) => Outcome::Captured { amount: amount.unwrap_or(held) },
            HoldEnd::Release => Outcome::Released,
        };
        let expired = match durable {
            Some(Outcome::Held { expires_at_unix_ms }) => expires_at_unix_ms <= self.now,
            other => other == Some(Outcome::Expired),
        };
        let agrees = match answer {
            EndAnswer::Final(outcome) => outcome == asked && durable == Some(outcome),
            // Another end is under way, not yet durable: a refusal that tells nothing of it.
            EndAnswer::Refused(HoldError::NotActive("pending")) => self.durable_grants.contains_key(&id),
            EndAnswer::Refused(HoldError::NotActive("expired")) => expired,
            EndAnswer::Refused(HoldError::NotActive(status)) => {
                durable.is_some_and(|o| o.ends_hold() && o.status() == status)
            }
            EndAnswer::Refused(HoldError::Expired) => matches!(r.end, HoldEnd::Capture(_)) && expired,
            EndAnswer::Refused(HoldError::BadAmount { held: told }) => {
                told == held
                    && matches!(r.end, HoldEnd::Capture(Some(amount)) if !(1..=held).contains(&amount))
                    && self.durable_grants.contains_key(&id)
            }
            EndAnswer::Refused(HoldError::NotFound | HoldError::NotAHold | HoldError::LogUnreadable) => false,
        };
        if !agrees {
            return Err(format!(
                "the client of hold {id} asked {:?} and heard {answer:?}, but the durable outcome is {durable:?}",
                r.end
            ));
        }
        self.end_requests[request].answer.get_or_insert(answer);
        Ok(())
    }
}
