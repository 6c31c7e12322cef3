//! The participant's in-doubt resolver, with no I/O: which prepared transfers to ask the coordinator about,
//! when, in which queries, how long to back off while no coordinator answers, and what the participant last
//! heard about each transfer (for the operator's in-doubt view).
//!
//! A participant never decides alone: a prepared transfer keeps its hold until the coordinator's answer comes.
//! The core works in rounds. A round starts when [`ResolverCore::poll_timeout`] is due and the shell calls
//! [`ResolverCore::handle_timeout`] with every prepared transfer: the core picks those in doubt (all of them
//! until a round has been fully answered since start, since decisions may have come and gone while the
//! participant was down; afterwards those at least `in_doubt_after_ms` old, or as long past its expiry for a
//! hold the coordinator has said it granted), groups them by the coordinator they name, at most
//! `query_items_max` per query, oldest first. The shell sends each [`Query`] it takes from
//! [`ResolverCore::poll_query`] and reports the outcome: [`ResolverCore::handle_answers`] (which hands back
//! the decisions to apply), then [`ResolverCore::handle_applied`] or [`ResolverCore::handle_apply_failed`]
//! once they are durable or not, or [`ResolverCore::handle_unreachable`]. When every query of the round is
//! reported, the next round is due a scan interval later if all went well, or after the backoff (doubling
//! from `backoff_min_ms` to `backoff_max_ms`) if any failed.
//!
//! Time is an argument, in milliseconds of the clock that stamps `PreparedRecord::prepared_at_unix_ms` (the
//! age of a transfer is measured against it). The simulator drives this same type.

use crate::ledger::TransferId;
use crate::msg::{Decision, DecisionQueryItem, QueryAnswer};
use crate::state::PreparedRecord;
use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::sync::Arc;

/// How often to look for transfers in doubt when all is well.
pub const SCAN_INTERVAL_MS: u64 = 500;
/// Backoff bounds while the coordinator does not answer.
pub const BACKOFF_MIN_MS: u64 = 200;
/// The longest wait between rounds while the coordinator does not answer.
pub const BACKOFF_MAX_MS: u64 = 5_000;
/// Transfers per query: bounds one request's size.
pub const QUERY_ITEMS_MAX: usize = 1_000;
/// Transfers whose last answer is remembered: bounds the memory of the in-doubt view.
pub const LAST_HEARD_MAX: usize = 10_000;

/// The resolver's settings.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ResolverConfig {
    /// A prepared transfer undecided this long is asked about (once a round has been answered since start).
    pub in_doubt_after_ms: u64,
    /// How long after a round that went well the next one starts.
    pub scan_interval_ms: u64,
    /// The wait after the first round that failed; it doubles with each failed round after it.
    pub backoff_min_ms: u64,
    /// The most the wait doubles to.
    pub backoff_max_ms: u64,
    /// The most transfers one query asks about.
    pub query_items_max: usize,
    /// The most transfers whose last answer is remembered; past it the oldest news is forgotten.
    pub last_heard_max: usize,
}

impl ResolverConfig {
    /// The default limits above, with the shell's in-doubt age.
    pub fn new(in_doubt_after_ms: u64) -> Self {
        ResolverConfig {
            in_doubt_after_ms,
            scan_interval_ms: SCAN_INTERVAL_MS,
            backoff_min_ms: BACKOFF_MIN_MS,
            backoff_max_ms: BACKOFF_MAX_MS,
            query_items_max: QUERY_ITEMS_MAX,
            last_heard_max: LAST_HEARD_MAX,
        }
    }
}

/// A decision query to send: `items` to the coordinator at `coordinator_url`. Report its outcome with `id`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Query {
    /// The number its outcome is reported with.
    pub id: u64,
    /// The coordinator the transfers' prepared records name.
    pub coordinator_url: String,
    /// The transfers asked about, oldest first.
    pub items: Vec<DecisionQueryItem>,
}

/// What the participant last heard about a transfer in doubt.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Heard {
    /// The coordinator is still deciding.
    Pending,
    /// The coordinator has granted the hold: it is not in doubt before its expiry.
    Held,
    /// The query failed with this error.
    Unreachable(Arc<str>),
}

impl fmt::Display for Heard {
    /// The in-doubt view's text: `pending` or `unreachable: <error>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Heard::Pending => f.write_str("pending"),
            Heard::Held => f.write_str("held"),
            Heard::Unreachable(error) => write!(f, "unreachable: {error}"),
        }
    }
}

/// The latest news of a transfer in doubt, for the operator's in-doubt view.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct LastHeard {
    /// What the participant heard.
    pub heard: Heard,
    /// When it heard it, on the resolver's clock.
    pub at_ms: u64,
}

/// Why the coordinator's answers to a query were not taken.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AnswerError {
    /// Not a query waiting for answers: already answered, given up as unreachable, or never asked.
    #[error("not waiting for answers to query {0}")]
    NotWaiting(u64),
    /// The query now counts as failed (the coordinator unreachable).
    #[error("{answered} answers for {asked} questions")]
    CountMismatch {
        /// How many transfers the query asked about.
        asked: usize,
        /// How many answers came back.
        answered: usize,
    },
}

/// A query handed out and not yet fully reported.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Outstanding {
    ids: Vec<TransferId>,
    /// Answered: its decisions are being applied.
    applying: bool,
}

/// The resolver's state: its rounds, its queries and what it last heard; see the module docs.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ResolverCore {
    config: ResolverConfig,
    /// A round has been fully answered since start: from then on only transfers `in_doubt_after_ms` old are
    /// in doubt.
    settled: bool,
    /// The delay before the next round if the current one fails.
    backoff_ms: u64,
    /// When the next round is due; `None` while a round is under way.
    next_round_ms: Option<u64>,
    /// The round's queries not yet handed out, and those handed out and not yet reported.
    queued: VecDeque<Query>,
    outstanding: BTreeMap<u64, Outstanding>,
    /// Some query of the round failed.
    round_failed: bool,
    next_query: u64,
    // Ordered: the core must be deterministic (the simulator replays a seed exactly).
    last_heard: BTreeMap<TransferId, LastHeard>,
}

impl ResolverCore {
    /// A resolver that has just started: its first round is due at `now_ms` and asks about every prepared
    /// transfer.
    pub fn new(config: ResolverConfig, now_ms: u64) -> Self {
        ResolverCore {
            backoff_ms: config.backoff_min_ms,
            config,
            settled: false,
            next_round_ms: Some(now_ms),
            queued: VecDeque::new(),
            outstanding: BTreeMap::new(),
            round_failed: false,
            next_query: 0,
            last_heard: BTreeMap::new(),
        }
    }

    /// When to call [`ResolverCore::handle_timeout`] next; `None` while a round's queries are under way (the
    /// next input is their outcome).
    pub fn poll_timeout(&self) -> Option<u64> {
        self.next_round_ms
    }

    /// Starts a round if one is due: `prepared` is every transfer prepared here (the core picks those in doubt,
    /// and forgets what it heard about the others). Does nothing while a round is under way or before its time.
    pub fn handle_timeout<'a>(
        &mut self,
        now_ms: u64,
        prepared: impl IntoIterator<Item = (&'a TransferId, &'a PreparedRecord)>,
    ) {
        let Some(due) = self.next_round_ms else {
            return;
        };
        // Nothing is ever set further ahead than this: a later time means the clock went back, and waiting for
        // it would stall the resolver for as long as the clock jumped.
        let furthest = now_ms.saturating_add(self.config.scan_interval_ms.max(self.config.backoff_max_ms));
        if now_ms < due && due <= furthest {
            return;
        }
        let age_min = if self.settled { self.config.in_doubt_after_ms } else { 0 };
        let mut heard = BTreeMap::new();
        let mut by_coordinator: BTreeMap<&str, Vec<(u64, TransferId, &PreparedRecord)>> = BTreeMap::new();
        for (id, record) in prepared {
            if let Some(h) = self.last_heard.remove(id) {
                heard.insert(*id, h);
            }
            // A hold is asked about as a transfer is, since the coordinator may have lost it, until the
            // coordinator says it has granted it; then only once it is due.
            let granted = heard.get(id).is_some_and(|h: &LastHeard| h.heard == Heard::Held);
            let from = if granted { record.due_unix_ms() } else { record.prepared_at_unix_ms };
            if now_ms.saturating_sub(from) >= age_min {
                by_coordinator.entry(&record.coordinator_url).or_default().push((
                    record.prepared_at_unix_ms,
                    *id,
                    record,
                ));
            }
        }
        self.last_heard = heard;
        self.next_round_ms = None;
        for (url, mut candidates) in by_coordinator {
            candidates.sort_unstable_by_key(|(at, id, _)| (*at, *id)); // oldest first; ids break ties
            candidates.truncate(self.config.query_items_max);
            let items: Vec<DecisionQueryItem> = candidates
                .into_iter()
                .map(|(_, id, record)| DecisionQueryItem { id, transfer: record.transfer.clone() })
                .collect();
            let id = self.next_query;
            self.next_query += 1;
            self.outstanding.insert(id, Outstanding { ids: items.iter().map(|i| i.id).collect(), applying: false });
            self.queued.push_back(Query { id, coordinator_url: url.to_owned(), items });
        }
        self.end_round_if_done(now_ms);
    }

    /// The next query to send, if any.
    pub fn poll_query(&mut self) -> Option<Query> {
        self.queued.pop_front()
    }

    /// The coordinator's answers to `query`, one per item in order. Returns the decisions to apply; report
    /// them with [`ResolverCore::handle_applied`] or [`ResolverCore::handle_apply_failed`] (even when there are
    /// none). Wrong answers count as a failed query.
    pub fn handle_answers(
        &mut self,
        now_ms: u64,
        query: u64,
        answers: &[QueryAnswer],
    ) -> Result<Vec<(TransferId, Decision)>, AnswerError> {
        let Some(asked) = self.outstanding.get(&query).filter(|o| !o.applying).map(|o| o.ids.len()) else {
            return Err(AnswerError::NotWaiting(query));
        };
        if answers.len() != asked {
            let error = AnswerError::CountMismatch { asked, answered: answers.len() };
            self.handle_unreachable(now_ms, query, &error.to_string());
            return Err(error);
        }
        let asked = self.outstanding.get_mut(&query).expect("checked above");
        asked.applying = true;
        let mut decisions = Vec::new();
        for (id, answer) in asked.ids.iter().zip(answers) {
            match answer {
                QueryAnswer::Commit => decisions.push((*id, Decision::Commit)),
                QueryAnswer::Abort => decisions.push((*id, Decision::Abort)),
                QueryAnswer::Pending => {
                    self.last_heard.insert(*id, LastHeard { heard: Heard::Pending, at_ms: now_ms });
                    continue;
                }
                QueryAnswer::Held => {
                    self.last_heard.insert(*id, LastHeard { heard: Heard::Held, at_ms: now_ms });
                    continue;
                }
            }
            self.last_heard.remove(id);
        }
        self.bound_last_heard();
        Ok(decisions)
    }

    /// The decisions [`ResolverCore::handle_answers`] returned for `query` are durable.
    pub fn handle_applied(&mut self, now_ms: u64, query: u64) {
        self.finish_query(now_ms, query, true, false);
    }

    /// The decisions [`ResolverCore::handle_answers`] returned for `query` could not be made durable: the
    /// round counts as failed, and the transfers still prepared are asked about again after the backoff.
    pub fn handle_apply_failed(&mut self, now_ms: u64, query: u64) {
        self.finish_query(now_ms, query, true, true);
    }

    /// `query` got no usable answer (no connection, a timeout, a refusal). Ignored for a query already
    /// answered.
    pub fn handle_unreachable(&mut self, now_ms: u64, query: u64, error: &str) {
        let Some(asked) = self.outstanding.get(&query).filter(|o| !o.applying) else {
            return;
        };
        let error: Arc<str> = error.into();
        for id in &asked.ids {
            self.last_heard.insert(*id, LastHeard { heard: Heard::Unreachable(error.clone()), at_ms: now_ms });
        }
        self.bound_last_heard();
        self.finish_query(now_ms, query, false, true);
    }

    /// The queries handed out and not answered yet, oldest first: those a shell's timeout may report
    /// unreachable.
    pub fn unanswered(&self) -> Vec<u64> {
        self.outstanding.iter().filter(|(_, o)| !o.applying).map(|(id, _)| *id).collect()
    }

    /// The delay the current round's failure would cause (what the shell tells the operator when a query
    /// fails; read it before reporting the failure).
    pub fn retry_in_ms(&self) -> u64 {
        self.backoff_ms
    }

    /// The minimum age of a prepared transfer the next round asks about.
    pub fn in_doubt_age_ms(&self) -> u64 {
        if self.settled {
            self.config.in_doubt_after_ms
        } else {
            0
        }
    }

    /// What the participant last heard about `id`, and when.
    pub fn last_heard(&self, id: &TransferId) -> Option<&LastHeard> {
        self.last_heard.get(id)
    }

    /// How many transfers have news remembered (at most `last_heard_max`).
    pub fn last_heard_len(&self) -> usize {
        self.last_heard.len()
    }

    fn finish_query(&mut self, now_ms: u64, query: u64, applying: bool, failed: bool) {
        if self.outstanding.get(&query).is_none_or(|o| o.applying != applying) {
            return;
        }
        self.outstanding.remove(&query);
        self.round_failed |= failed;
        self.end_round_if_done(now_ms);
    }

    fn end_round_if_done(&mut self, now_ms: u64) {
        if self.next_round_ms.is_some() || !self.outstanding.is_empty() {
            return;
        }
        if std::mem::take(&mut self.round_failed) {
            self.next_round_ms = Some(now_ms.saturating_add(self.backoff_ms));
            self.backoff_ms = self.backoff_ms.saturating_mul(2).min(self.config.backoff_max_ms);
        } else {
            self.settled = true;
            self.backoff_ms = self.config.backoff_min_ms;
            self.next_round_ms = Some(now_ms.saturating_add(self.config.scan_interval_ms));
        }
    }

    /// Past the limit, forgets the oldest news first (ids break ties).
    fn bound_last_heard(&mut self) {
        let excess = self.last_heard.len().saturating_sub(self.config.last_heard_max);
        if excess == 0 {
            return;
        }
        let mut by_age: Vec<(u64, TransferId)> = self.last_heard.iter().map(|(id, h)| (h.at_ms, *id)).collect();
        by_age.select_nth_unstable(excess - 1);
        for (_, id) in &by_age[..excess] {
            self.last_heard.remove(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{AccountId, Amount, Transfer};
    use uuid::Uuid;

    const AGE: u64 = 3_000;

    fn id(n: u128) -> TransferId {
        Uuid::from_u128(n)
    }

    fn record(url: &str, prepared_at: u64) -> PreparedRecord {
        let account = |s: &str| AccountId::new(s).expect("valid id");
        PreparedRecord {
            transfer: Transfer::one(account("alice"), account("bob"), Amount::new(1).expect("positive")),
            postings: Vec::new(),
            coordinator_url: url.into(),
            prepared_at_unix_ms: prepared_at,
            made_by: None,
        }
    }

    fn core(now: u64) -> ResolverCore {
        ResolverCore::new(ResolverConfig::new(AGE), now)
    }

    fn queries(core: &mut ResolverCore) -> Vec<Query> {
        std::iter::from_fn(|| core.poll_query()).collect()
    }

    fn ids(query: &Query) -> Vec<TransferId> {
        query.items.iter().map(|i| i.id).collect()
    }

    /// Runs a round whose only query gets `answer` for every item (or fails if `None`); returns the query.
    fn round(
        core: &mut ResolverCore,
        now: u64,
        prepared: &BTreeMap<TransferId, PreparedRecord>,
        answer: Option<QueryAnswer>,
    ) -> Option<Query> {
        core.handle_timeout(now, prepared);
        let mut asked = queries(core);
        assert!(asked.len() <= 1, "one coordinator, one query: {asked:?}");
        let query = asked.pop()?;
        match answer {
            Some(answer) => {
                core.handle_answers(now, query.id, &vec![answer; query.items.len()]).expect("waiting for answers");
                core.handle_applied(now, query.id);
            }
            None => core.handle_unreachable(now, query.id, "connection refused"),
        }
        Some(query)
    }

    #[test]
    fn right_after_start_everything_is_in_doubt_then_only_what_is_old_enough() {
        let mut core = core(10_000);
        assert_eq!(core.poll_timeout(), Some(10_000), "the first round is due at start");
        assert_eq!(core.in_doubt_age_ms(), 0);
        let prepared = BTreeMap::from([(id(1), record("http://c", 9_999))]);
        let query = round(&mut core, 10_000, &prepared, Some(QueryAnswer::Pending)).expect("1 ms old is in doubt");
        assert_eq!(ids(&query), [id(1)]);
        assert_eq!(core.in_doubt_age_ms(), AGE);
        assert_eq!(core.poll_timeout(), Some(10_000 + SCAN_INTERVAL_MS));

        // Answered once: only transfers at least the configured age old are in doubt.
        let now = 10_000 + SCAN_INTERVAL_MS;
        let prepared = BTreeMap::from([
            (id(1), record("http://c", 9_999)),
            (id(2), record("http://c", now - AGE + 1)),
            (id(3), record("http://c", now - AGE)),
        ]);
        let query = round(&mut core, now, &prepared, Some(QueryAnswer::Pending)).expect("id 3 is old enough");
        assert_eq!(ids(&query), [id(3)]);
        assert_eq!(core.last_heard(&id(1)).map(|h| h.at_ms), Some(10_000), "not asked, still prepared: kept");
    }

    #[test]
    fn a_granted_hold_is_in_doubt_only_once_it_has_expired() {
        let mut core = core(0);
        let account = |s: &str| AccountId::new(s).expect("valid id");
        let hold = Transfer::hold(account("alice"), account("shop"), Amount::new(1).expect("positive"), 60);
        let held = PreparedRecord { transfer: hold.expect("a hold"), ..record("http://c", 1_000) };
        let prepared = BTreeMap::from([(id(1), held)]);
        let query = round(&mut core, 1_000, &prepared, Some(QueryAnswer::Pending)).expect("asked right after start");
        assert_eq!(ids(&query), [id(1)]);
        // Not yet granted: a coordinator that lost it must not leave the money held until the expiry.
        let query = round(&mut core, 1_000 + AGE, &prepared, Some(QueryAnswer::Held)).expect("asked as a transfer is");
        assert_eq!(ids(&query), [id(1)]);
        assert_eq!(core.last_heard(&id(1)).map(|h| h.heard.to_string()), Some("held".into()));
        let expiry = 1_000 + 60_000;
        assert!(round(&mut core, expiry + AGE - 1, &prepared, None).is_none(), "not in doubt before expiry + the age");
        let next = expiry + AGE - 1 + SCAN_INTERVAL_MS;
        let query = round(&mut core, next, &prepared, Some(QueryAnswer::Pending)).expect("in doubt at the next round");
        assert_eq!(ids(&query), [id(1)]);
    }

    #[test]
    fn the_configured_age_applies_after_the_first_answered_round() {
        let start = 10_000;
        let mut core = core(start);
        let none = BTreeMap::new();
        assert!(round(&mut core, start, &none, None).is_none(), "nothing prepared: nothing to ask");
        assert_eq!(core.in_doubt_age_ms(), AGE, "an empty round is answered");
        let now = start + SCAN_INTERVAL_MS;
        let young = BTreeMap::from([(id(1), record("http://c", now - AGE + 1))]);
        assert!(round(&mut core, now, &young, None).is_none(), "1 ms short of the age");
        let now = now + SCAN_INTERVAL_MS;
        let query = round(&mut core, now, &young, Some(QueryAnswer::Pending)).expect("now old enough");
        assert_eq!(ids(&query), [id(1)]);
    }

    #[test]
    fn a_failed_first_round_keeps_asking_about_everything() {
        let mut core = core(0);
        let prepared = BTreeMap::from([(id(1), record("http://c", 0))]);
        round(&mut core, 0, &prepared, None).expect("asked");
        assert_eq!(core.in_doubt_age_ms(), 0);
        let retry = core.poll_timeout().expect("a retry is due");
        let query = round(&mut core, retry, &prepared, None).expect("still in doubt at age 200 ms");
        assert_eq!(ids(&query), [id(1)]);
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_and_an_answer_resets_it() {
        let mut core = core(0);
        let prepared = BTreeMap::from([(id(1), record("http://c", 0))]);
        let mut now = 0;
        let mut delays = Vec::new();
        for _ in 0..8 {
            let promised = core.retry_in_ms();
            round(&mut core, now, &prepared, None).expect("asked");
            let next = core.poll_timeout().expect("a retry is due");
            assert_eq!(next - now, promised, "the delay announced is the one used");
            delays.push(next - now);
            now = next;
        }
        assert_eq!(delays, [200, 400, 800, 1_600, 3_200, 5_000, 5_000, 5_000]);
        round(&mut core, now, &prepared, Some(QueryAnswer::Pending)).expect("asked");
        assert_eq!(core.poll_timeout(), Some(now + SCAN_INTERVAL_MS));
        assert_eq!(core.retry_in_ms(), BACKOFF_MIN_MS);
        now += SCAN_INTERVAL_MS;
        round(&mut core, now, &prepared, None).expect("asked");
        assert_eq!(core.poll_timeout(), Some(now + BACKOFF_MIN_MS), "backoff starts over after an answer");
    }

    #[test]
    fn one_query_per_coordinator_and_one_failure_fails_the_round() {
        let mut core = core(0);
        let prepared = BTreeMap::from([
            (id(1), record("http://b", 5)),
            (id(2), record("http://a", 7)),
            (id(3), record("http://b", 3)),
            (id(4), record("http://a", 1)),
        ]);
        core.handle_timeout(10, &prepared);
        let asked = queries(&mut core);
        let by_url: Vec<(&str, Vec<TransferId>)> = asked.iter().map(|q| (q.coordinator_url.as_str(), ids(q))).collect();
        assert_eq!(by_url, [("http://a", vec![id(4), id(2)]), ("http://b", vec![id(3), id(1)])], "oldest first");
        assert_eq!(core.poll_timeout(), None, "under way");
        let decisions =
            core.handle_answers(11, asked[0].id, &[QueryAnswer::Commit, QueryAnswer::Abort]).expect("waiting");
        assert_eq!(decisions, [(id(4), Decision::Commit), (id(2), Decision::Abort)]);
        core.handle_applied(12, asked[0].id);
        assert_eq!(core.poll_timeout(), None, "b has not answered yet");
        core.handle_unreachable(20, asked[1].id, "timed out");
        assert_eq!(core.poll_timeout(), Some(20 + BACKOFF_MIN_MS), "one coordinator down: the round backs off");
    }

    #[test]
    fn a_query_carries_at_most_the_item_cap_oldest_first() {
        let mut core = core(0);
        let extra = 5;
        let prepared: BTreeMap<TransferId, PreparedRecord> = (0..QUERY_ITEMS_MAX + extra)
            .map(|n| (id(n as u128), record("http://c", (QUERY_ITEMS_MAX + extra - n) as u64)))
            .collect();
        let query = round(&mut core, 10_000, &prepared, Some(QueryAnswer::Abort)).expect("asked");
        assert_eq!(query.items.len(), QUERY_ITEMS_MAX);
        assert!(query.items.iter().all(|i| i.id.as_u128() >= extra as u128), "the youngest wait for the next round");
        let rest: BTreeMap<TransferId, PreparedRecord> =
            prepared.into_iter().filter(|(id, _)| id.as_u128() < extra as u128).collect();
        let query = round(&mut core, 10_000 + SCAN_INTERVAL_MS, &rest, Some(QueryAnswer::Abort)).expect("asked");
        assert_eq!(query.items.len(), extra);
    }

    #[test]
    fn last_heard_follows_the_answers_and_forgets_what_is_no_longer_prepared() {
        let mut core = core(0);
        let prepared = BTreeMap::from([(id(1), record("http://c", 0)), (id(2), record("http://c", 0))]);
        let query = round(&mut core, 100, &prepared, None).expect("asked");
        assert_eq!(ids(&query), [id(1), id(2)]);
        for n in [1, 2] {
            let heard = core.last_heard(&id(n)).expect("recorded");
            assert_eq!((heard.heard.to_string(), heard.at_ms), ("unreachable: connection refused".into(), 100));
        }

        let retry = core.poll_timeout().expect("due");
        core.handle_timeout(retry, &prepared);
        let query = core.poll_query().expect("asked again");
        let decisions =
            core.handle_answers(retry + 1, query.id, &[QueryAnswer::Pending, QueryAnswer::Commit]).expect("waiting");
        assert_eq!(decisions, [(id(2), Decision::Commit)]);
        let heard = core.last_heard(&id(1)).expect("recorded");
        assert_eq!((heard.heard.to_string(), heard.at_ms), ("pending".into(), retry + 1));
        assert_eq!(core.last_heard(&id(2)), None, "decided: nothing in doubt to report");
        core.handle_applied(retry + 2, query.id);

        // id(1) was decided by its coordinator meanwhile: the next round forgets it.
        core.handle_timeout(retry + 2 + SCAN_INTERVAL_MS, &BTreeMap::new());
        assert_eq!(core.last_heard(&id(1)), None);
        assert_eq!(core.last_heard_len(), 0);
    }

    #[test]
    fn last_heard_is_bounded_and_drops_the_oldest_news() {
        let config = ResolverConfig { last_heard_max: 3, query_items_max: 2, ..ResolverConfig::new(AGE) };
        let mut core = ResolverCore::new(config, 0);
        let prepared: BTreeMap<TransferId, PreparedRecord> =
            (1..=4).map(|n| (id(n), record(&format!("http://c{n}"), 0))).collect();
        core.handle_timeout(0, &prepared);
        let asked = queries(&mut core);
        assert_eq!(asked.len(), 4, "one query per coordinator");
        for (n, query) in asked.iter().enumerate() {
            core.handle_unreachable(10 + n as u64, query.id, "down");
        }
        assert_eq!(core.last_heard_len(), 3);
        assert_eq!(core.last_heard(&id(1)), None, "the oldest news went first");
        assert!((2..=4).all(|n| core.last_heard(&id(n)).is_some()));
    }

    #[test]
    fn stale_duplicate_and_wrong_answers() {
        let mut core = core(0);
        let prepared = BTreeMap::from([(id(1), record("http://c", 0))]);
        core.handle_timeout(0, &prepared);
        let query = core.poll_query().expect("asked");
        assert_eq!(
            core.handle_answers(1, query.id + 1, &[QueryAnswer::Abort]),
            Err(AnswerError::NotWaiting(query.id + 1))
        );
        assert_eq!(
            core.handle_answers(1, query.id, &[QueryAnswer::Abort, QueryAnswer::Abort]),
            Err(AnswerError::CountMismatch { asked: 1, answered: 2 })
        );
        assert_eq!(core.poll_timeout(), Some(1 + BACKOFF_MIN_MS), "a wrong answer fails the query");
        assert!(core.last_heard(&id(1)).is_some_and(|h| h.heard.to_string().starts_with("unreachable: 2 answers")));
        assert_eq!(
            core.handle_answers(2, query.id, &[QueryAnswer::Abort]),
            Err(AnswerError::NotWaiting(query.id)),
            "given up"
        );

        let at = core.poll_timeout().expect("due");
        core.handle_timeout(at, &prepared);
        let query = core.poll_query().expect("asked");
        core.handle_answers(at, query.id, &[QueryAnswer::Abort]).expect("waiting");
        assert_eq!(
            core.handle_answers(at, query.id, &[QueryAnswer::Abort]),
            Err(AnswerError::NotWaiting(query.id)),
            "a duplicate"
        );
        core.handle_unreachable(at, query.id, "late timeout");
        assert_eq!(core.poll_timeout(), None, "a timeout after the answer changes nothing: the apply is under way");
        core.handle_apply_failed(at + 5, query.id);
        assert_eq!(core.poll_timeout(), Some(at + 5 + 2 * BACKOFF_MIN_MS), "a failed apply backs off too");
    }

    #[test]
    fn a_timeout_before_its_time_does_nothing_but_a_clock_gone_back_does_not_stall() {
        let mut core = core(0);
        let prepared = BTreeMap::from([(id(1), record("http://c", 0))]);
        round(&mut core, 0, &prepared, Some(QueryAnswer::Pending)).expect("asked");
        let due = core.poll_timeout().expect("due");
        core.handle_timeout(due - 1, &prepared);
        assert!(core.poll_query().is_none());
        assert_eq!(core.poll_timeout(), Some(due));
        // The clock went back an hour: a round due in an hour is due now.
        let now = 60 * 60 * 1_000;
        let mut late = ResolverCore::new(ResolverConfig::new(AGE), now + 60 * 60 * 1_000);
        late.handle_timeout(now, &prepared);
        assert!(late.poll_query().is_some());
    }
}
