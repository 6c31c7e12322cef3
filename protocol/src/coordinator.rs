//! The coordinator's protocol state for one transfer (presumed abort), and its answer to a participant's
//! decision query. The shell sends the Prepares, feeds the votes in, forces the decision to its log when told
//! to, then sends the decision and feeds the acks in.
//!
//! Invariants: a transfer is decided once and the decision never changes; commit needs a YES from every shard;
//! a decision is sent only after the shell reports it durable ([`TransferMachine::on_decision_logged`]).

use crate::ledger::{ShardId, Transfer, TransferId};
use crate::msg::{Decision, QueryAnswer, RefusalReason, Vote};
use crate::state::{AbortReason, Outcome};
use std::collections::BTreeSet;

/// What one shard said to Prepare.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VoteResult {
    /// The shard answered.
    Vote(Vote),
    /// No answer in time, or the call failed: the shard may or may not have prepared.
    Unavailable,
}

/// Where a transfer is in the protocol, as the coordinator sees it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Prepares are out; the outcome waits for a vote from every shard, or for the prepare timeout.
    Preparing {
        /// Each shard the transfer touches, with its vote once it has one.
        votes: Vec<(ShardId, Option<VoteResult>)>,
    },
    /// The outcome is chosen and must be made durable before anyone hears of it.
    Logging {
        /// The outcome chosen.
        outcome: Outcome,
        /// The shards that voted NO: they prepared nothing, so the decision skips them.
        voted_no: BTreeSet<ShardId>,
    },
    /// Durable; waiting for the shards in `unacked` to apply it.
    Decided {
        /// The outcome logged.
        outcome: Outcome,
        /// The shards the decision is still owed to; it is re-sent to them until they acknowledge it.
        unacked: BTreeSet<ShardId>,
    },
}

/// The coordinator's state machine for one transfer, from the first Prepare to the last ack.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TransferMachine {
    /// The transfer's id, the key of its decision.
    pub id: TransferId,
    /// The transfer as its client asked for it.
    pub transfer: Transfer,
    /// Every shard the transfer touches.
    shards: BTreeSet<ShardId>,
    /// How many shards the cluster has: which of the transfer's postings went to which shard.
    shard_count: u32,
    phase: Phase,
}

impl TransferMachine {
    /// A machine for a new transfer, about to send Prepare to every shard it touches.
    pub fn new(id: TransferId, transfer: Transfer, shard_count: u32) -> Self {
        let shards: BTreeSet<ShardId> = transfer.shards(shard_count).into_iter().collect();
        let votes = shards.iter().map(|s| (*s, None)).collect();
        TransferMachine { id, transfer, shards, shard_count, phase: Phase::Preparing { votes } }
    }

    /// A machine for the end of a granted hold (every shard voted YES on it and holds it prepared): the
    /// decision is chosen, to be logged and then sent to every shard.
    pub fn ending(id: TransferId, transfer: Transfer, outcome: Outcome, shard_count: u32) -> Self {
        assert!(outcome.ends_hold(), "only a hold's end follows a granted hold: {outcome:?}");
        let shards: BTreeSet<ShardId> = transfer.shards(shard_count).into_iter().collect();
        let phase = Phase::Logging { outcome, voted_no: BTreeSet::new() };
        TransferMachine { id, transfer, shards, shard_count, phase }
    }

    /// A machine for a decision read back from the log (coordinator recovery).
    pub fn recovered(
        id: TransferId,
        transfer: Transfer,
        outcome: Outcome,
        unacked: BTreeSet<ShardId>,
        shard_count: u32,
    ) -> Self {
        TransferMachine {
            id,
            transfer,
            shards: unacked.clone(),
            shard_count,
            phase: Phase::Decided { outcome, unacked },
        }
    }

    /// Where the transfer is in the protocol.
    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    /// The shards to send Prepare to.
    pub fn shards(&self) -> Vec<ShardId> {
        match &self.phase {
            Phase::Preparing { votes } => votes.iter().map(|(s, _)| *s).collect(),
            _ => Vec::new(),
        }
    }

    /// Records a vote; once every shard has answered, returns the outcome the shell must log.
    pub fn on_vote(&mut self, shard: ShardId, result: VoteResult) -> Option<Outcome> {
        let Phase::Preparing { votes } = &mut self.phase else {
            return None; // A vote after the decision changes nothing.
        };
        let slot = votes.iter_mut().find(|(s, _)| *s == shard)?;
        if slot.1.is_none() {
            slot.1 = Some(result);
        }
        if votes.iter().any(|(_, v)| v.is_none()) {
            return None;
        }
        // Every slot is filled: read each as (shard, vote), with no copy of the list on this per-transfer path.
        let votes = || votes.iter().filter_map(|(s, v)| Some((*s, (*v)?)));
        let outcome = decide(&self.transfer, self.shard_count, votes());
        let voted_no =
            votes().filter(|(_, v)| matches!(v, VoteResult::Vote(Vote::No { .. }))).map(|(s, _)| s).collect();
        self.phase = Phase::Logging { outcome, voted_no };
        Some(outcome)
    }

    /// Every shard voted YES on a hold: it is granted, not committed. Returns the outcome to log.
    pub fn grant(&mut self, expires_at_unix_ms: u64) -> Outcome {
        match &mut self.phase {
            Phase::Logging { outcome: outcome @ Outcome::Committed, .. } => {
                *outcome = Outcome::Held { expires_at_unix_ms };
                *outcome
            }
            other => panic!("hold {} granted outside a unanimous vote: {other:?}", self.id),
        }
    }

    /// The prepare round ran out of time: whoever has not answered counts as unavailable.
    pub fn on_prepare_timeout(&mut self) -> Option<Outcome> {
        let Phase::Preparing { votes } = &self.phase else {
            return None;
        };
        let silent: Vec<ShardId> = votes.iter().filter(|(_, v)| v.is_none()).map(|(s, _)| *s).collect();
        silent.into_iter().fold(None, |decided, shard| decided.or(self.on_vote(shard, VoteResult::Unavailable)))
    }

    /// The outcome is durable: returns the decision and the shards to send it to. A shard that voted NO has
    /// prepared nothing, so it needs no abort.
    pub fn on_decision_logged(&mut self) -> (Decision, Vec<ShardId>) {
        let Phase::Logging { outcome, voted_no } = &self.phase else {
            panic!("decision logged for transfer {} outside the logging phase: {:?}", self.id, self.phase);
        };
        let outcome = *outcome;
        let unacked: BTreeSet<ShardId> = self.shards.difference(voted_no).copied().collect();
        let targets = unacked.iter().copied().collect();
        self.phase = Phase::Decided { outcome, unacked };
        (decision_of(outcome), targets)
    }

    /// A shard applied the decision; returns true once every shard has.
    pub fn on_ack(&mut self, shard: ShardId) -> bool {
        match &mut self.phase {
            Phase::Decided { unacked, .. } => {
                unacked.remove(&shard);
                unacked.is_empty()
            }
            other => panic!("ack for transfer {} before its decision was durable: {other:?}", self.id),
        }
    }

    /// The shards the durable decision is still owed to (none before it is durable).
    pub fn unacked(&self) -> Vec<ShardId> {
        match &self.phase {
            Phase::Decided { unacked, .. } => unacked.iter().copied().collect(),
            _ => Vec::new(),
        }
    }
}

/// The outcome of a complete vote: commit only on YES from everyone. Among refusals the most specific reason
/// wins, and among refusals for it the first leg, so the outcome does not depend on the order the votes
/// arrived in.
fn decide(transfer: &Transfer, shard_count: u32, votes: impl Iterator<Item = (ShardId, VoteResult)>) -> Outcome {
    let mut worst: Option<(AbortReason, Option<usize>)> = None;
    for (shard, vote) in votes {
        let leg = match vote {
            VoteResult::Vote(Vote::No { posting: Some(index), .. }) => {
                transfer.postings_with_legs(shard, shard_count).get(usize::from(index)).map(|(leg, _)| *leg)
            }
            VoteResult::Unavailable => transfer.postings_with_legs(shard, shard_count).first().map(|(leg, _)| *leg),
            _ => None,
        };
        let this = match vote {
            VoteResult::Vote(Vote::Yes) => continue,
            VoteResult::Vote(Vote::No { reason: r, .. }) => match r {
                RefusalReason::AccountNotFound => AbortReason::AccountNotFound,
                RefusalReason::InsufficientFunds => AbortReason::InsufficientFunds,
                RefusalReason::BalanceOverflow => AbortReason::BalanceOverflow,
                // The id's earlier attempt was lost by a coordinator restart.
                RefusalReason::AlreadyAborted | RefusalReason::IdInUse => AbortReason::CoordinatorRestarted,
            },
            VoteResult::Unavailable => AbortReason::ParticipantUnavailable,
        };
        // A refusal that names no leg ranks after one that does.
        let rank = |(reason, leg): (AbortReason, Option<usize>)| (precedence(reason), leg.unwrap_or(usize::MAX));
        worst = match worst {
            Some(kept) if rank(kept) <= rank((this, leg)) => Some(kept),
            _ => Some((this, leg)),
        };
    }
    match worst {
        None => Outcome::Committed,
        // A transfer of one leg keeps the record and the answer of the transfers before legs.
        Some((reason, Some(leg))) if transfer.legs().len() > 1 => match u8::try_from(leg) {
            Ok(leg) => Outcome::AbortedAtLeg { reason, leg },
            Err(_) => Outcome::Aborted(reason),
        },
        Some((reason, _)) => Outcome::Aborted(reason),
    }
}

fn precedence(reason: AbortReason) -> u8 {
    match reason {
        AbortReason::AccountNotFound => 0,
        AbortReason::InsufficientFunds => 1,
        AbortReason::BalanceOverflow => 2,
        AbortReason::CoordinatorRestarted => 3,
        AbortReason::ParticipantUnavailable => 4,
    }
}

/// The decision an outcome sends to the shards. A granted hold has none yet: the shell never sends it, and
/// the core never logs one as a decision to deliver.
pub fn decision_of(outcome: Outcome) -> Decision {
    match outcome {
        Outcome::Committed | Outcome::Captured { .. } => Decision::Commit,
        Outcome::Aborted(_) | Outcome::AbortedAtLeg { .. } | Outcome::Released | Outcome::Expired => Decision::Abort,
        Outcome::Held { .. } => unreachable!("a granted hold is never delivered as a decision"),
    }
}

/// How to answer a participant that asks about a transfer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueryPlan {
    /// Answer at once, with nothing to log: the log already binds the answer, or the transfer is not settled yet.
    Answer(QueryAnswer),
    /// Nothing is known and nothing is in progress: presumed abort. The shell must log the abort durably
    /// before answering, so the answer is binding even if the same id is submitted again later.
    LogAbortThenAnswer,
}

/// `in_progress` is true while this process is still running the transfer's prepare round or logging its
/// decision; then the answer must wait, because the transfer may yet commit.
pub fn plan_query_answer(in_progress: bool, logged: Option<Outcome>) -> QueryPlan {
    match (in_progress, logged) {
        (_, Some(Outcome::Held { .. })) => QueryPlan::Answer(QueryAnswer::Held),
        // A Commit would move the whole hold: the capture, with its amount, is re-delivered until every shard
        // has it (its `h` key keeps it owed across restarts), so the shard waits for that.
        (_, Some(Outcome::Captured { .. })) => QueryPlan::Answer(QueryAnswer::Pending),
        (_, Some(outcome)) => match decision_of(outcome) {
            Decision::Commit => QueryPlan::Answer(QueryAnswer::Commit),
            Decision::Abort => QueryPlan::Answer(QueryAnswer::Abort),
        },
        (true, None) => QueryPlan::Answer(QueryAnswer::Pending),
        (false, None) => QueryPlan::LogAbortThenAnswer,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{AccountId, Amount, Leg};
    use uuid::Uuid;

    /// alice and bob sit on different shards of two (pinned in the ledger tests).
    fn cross_shard() -> TransferMachine {
        let t = Transfer::one(
            AccountId::new("alice").expect("valid"),
            AccountId::new("bob").expect("valid"),
            Amount::new(5).expect("positive"),
        );
        let m = TransferMachine::new(Uuid::new_v4(), t, 2);
        assert_eq!(m.shards(), vec![0, 1]);
        m
    }

    #[test]
    fn commits_only_when_every_shard_votes_yes() {
        let mut m = cross_shard();
        assert_eq!(m.on_vote(0, VoteResult::Vote(Vote::Yes)), None);
        assert_eq!(m.on_vote(1, VoteResult::Vote(Vote::Yes)), Some(Outcome::Committed));
        assert_eq!(m.on_decision_logged(), (Decision::Commit, vec![0, 1]));
        assert!(!m.on_ack(1));
        assert!(m.on_ack(0));
    }

    #[test]
    fn a_refusal_aborts_and_the_refusing_shard_needs_no_abort() {
        let mut m = cross_shard();
        assert_eq!(m.on_vote(1, VoteResult::Vote(Vote::no(RefusalReason::InsufficientFunds))), None);
        let outcome = m.on_vote(0, VoteResult::Vote(Vote::Yes));
        assert_eq!(outcome, Some(Outcome::Aborted(AbortReason::InsufficientFunds)));
        assert_eq!(m.on_decision_logged(), (Decision::Abort, vec![0]));
    }

    #[test]
    fn reasons_do_not_depend_on_vote_order() {
        for order in [[0u32, 1], [1, 0]] {
            let mut m = cross_shard();
            let votes = [
                VoteResult::Vote(Vote::no(RefusalReason::InsufficientFunds)),
                VoteResult::Vote(Vote::no(RefusalReason::AccountNotFound)),
            ];
            let mut outcome = None;
            for shard in order {
                outcome = m.on_vote(shard, votes[shard as usize]);
            }
            assert_eq!(outcome, Some(Outcome::Aborted(AbortReason::AccountNotFound)));
        }
    }

    #[test]
    fn an_abort_of_several_legs_names_the_first_failing_leg_whatever_the_vote_order() {
        let id = |s: &str| AccountId::new(s).expect("valid");
        let leg = |from: &str, to: &str, n: i64| Leg {
            from: id(from),
            to: id(to),
            amount: Amount::new(n).expect("positive"),
        };
        // Shard 0 holds bob and carol, shard 1 alice and dave. Postings on shard 0: bob +100 (leg 0), carol -5
        // and bob +5 (leg 1); on shard 1: alice -100 (leg 0), alice -2 and dave +2 (leg 2).
        let t = Transfer::new(vec![leg("alice", "bob", 100), leg("carol", "bob", 5), leg("alice", "dave", 2)])
            .expect("legs");
        let no_at = |reason, index| VoteResult::Vote(Vote::no_at(reason, index));
        let funds = RefusalReason::InsufficientFunds;
        let cases = [
            (
                [no_at(funds, 1), no_at(funds, 1)],
                Outcome::AbortedAtLeg { reason: AbortReason::InsufficientFunds, leg: 1 },
            ),
            (
                [no_at(funds, 0), no_at(RefusalReason::AccountNotFound, 2)],
                Outcome::AbortedAtLeg { reason: AbortReason::AccountNotFound, leg: 2 },
            ),
            (
                [VoteResult::Vote(Vote::Yes), VoteResult::Unavailable],
                Outcome::AbortedAtLeg { reason: AbortReason::ParticipantUnavailable, leg: 0 },
            ),
            (
                [VoteResult::Vote(Vote::no(RefusalReason::IdInUse)), VoteResult::Vote(Vote::Yes)],
                Outcome::Aborted(AbortReason::CoordinatorRestarted),
            ),
        ];
        for (votes, expected) in cases {
            for order in [[0u32, 1], [1, 0]] {
                let mut m = TransferMachine::new(Uuid::new_v4(), t.clone(), 2);
                let mut outcome = None;
                for shard in order {
                    outcome = m.on_vote(shard, votes[shard as usize]);
                }
                assert_eq!(outcome, Some(expected), "votes {votes:?} in order {order:?}");
                assert_eq!(
                    expected.failed_leg().is_some(),
                    expected != Outcome::Aborted(AbortReason::CoordinatorRestarted)
                );
            }
        }
    }

    #[test]
    fn a_silent_shard_aborts_the_transfer_at_the_timeout() {
        let mut m = cross_shard();
        m.on_vote(0, VoteResult::Vote(Vote::Yes));
        assert_eq!(m.on_prepare_timeout(), Some(Outcome::Aborted(AbortReason::ParticipantUnavailable)));
        assert_eq!(m.on_decision_logged(), (Decision::Abort, vec![0, 1]));
        assert_eq!(m.on_prepare_timeout(), None, "decided transfers ignore late timers");
        assert_eq!(m.on_vote(1, VoteResult::Vote(Vote::Yes)), None, "and late votes");
    }

    #[test]
    fn queries_never_get_abort_while_the_transfer_may_commit() {
        assert_eq!(plan_query_answer(true, None), QueryPlan::Answer(QueryAnswer::Pending));
        assert_eq!(plan_query_answer(false, None), QueryPlan::LogAbortThenAnswer);
        assert_eq!(plan_query_answer(true, Some(Outcome::Committed)), QueryPlan::Answer(QueryAnswer::Commit));
        let aborted = Some(Outcome::Aborted(AbortReason::InsufficientFunds));
        assert_eq!(plan_query_answer(false, aborted), QueryPlan::Answer(QueryAnswer::Abort));
    }
}
