//! A SIGKILL at every named crash point (see `common::crash`), on both sides: arm it, run one cross-shard
//! transfer, let the process die, restart it, and check that the transfer ended committed on every shard or
//! aborted on every shard, that no funds stay held, that money is conserved, and that the client's answer (when
//! it got one) matches what happened. Each point runs with a two-account transfer over two shards, and once
//! more with a transfer of three legs over three shards.

use crate::harness::{account_on_shard, cross_shard_pair, Cluster, Options};
use common::crash;
use common::ledger::{shard_of, AccountId};
use serde_json::{json, Value};
use std::time::Duration;
use uuid::Uuid;

const SETTLE: Duration = Duration::from_secs(30);
const DEATH: Duration = Duration::from_secs(15);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    Committed,
    Aborted,
    /// The client got no final answer and the coordinator has no record: a resubmission runs it afresh.
    NeverDecided,
    /// Committed if the staging record became durable before the crash, aborted if not: a race between the
    /// staging sync and the Prepares, which parallel commits run at once. Either way on every shard, and as
    /// the client was told.
    Either,
}

#[derive(Clone, Copy, Debug)]
enum Victim {
    Coordinator,
    /// The participant owning the (first) debited account.
    DebitShard,
    /// The participant owning the (last) credited account.
    CreditShard,
}

/// One transfer to crash in the middle of: its accounts, with their opening balances and what a commit adds.
struct Scenario {
    participants: usize,
    /// (account, opening balance, change if the transfer commits)
    accounts: Vec<(String, i64, i64)>,
    /// The transfer's body, without its id.
    body: Value,
    debit: String,
    credit: String,
}

impl Scenario {
    fn one_leg(prefix: &str) -> Scenario {
        let (alice, bob) = cross_shard_pair(prefix);
        Scenario {
            participants: 2,
            accounts: vec![(alice.clone(), 1_000, -250), (bob.clone(), 0, 250)],
            body: json!({"from": alice, "to": bob, "amount": 250}),
            debit: alice,
            credit: bob,
        }
    }

    /// A payment with a fee and a third party's share: the payer on shard 0 is debited twice, the merchant and
    /// carol share shard 1, the fee account is on shard 2.
    fn three_shards(prefix: &str) -> Scenario {
        let on = |name: &str, shard| account_on_shard(&format!("{prefix}-{name}"), shard, 3);
        let (payer, merchant, carol, fees) = (on("payer", 0), on("merchant", 1), on("carol", 1), on("fees", 2));
        let leg = |from: &str, to: &str, amount: i64| json!({"from": from, "to": to, "amount": amount});
        Scenario {
            participants: 3,
            accounts: vec![
                (payer.clone(), 1_000, -250),
                (merchant.clone(), 0, 200),
                (carol.clone(), 100, -10),
                (fees.clone(), 0, 60),
            ],
            body: json!({"legs": [leg(&payer, &merchant, 200), leg(&payer, &fees, 50), leg(&carol, &fees, 10)]}),
            debit: payer,
            credit: fees,
        }
    }

    fn names(&self) -> Vec<&str> {
        self.accounts.iter().map(|(id, ..)| id.as_str()).collect()
    }

    /// Money is conserved and the transfer applied wholly or not at all; returns whether it moved.
    async fn check_money(&self, c: &Cluster) -> bool {
        let mut balances = Vec::new();
        for (id, ..) in &self.accounts {
            let account = c.account(id).await;
            assert_eq!(account["held"], json!(0), "{id}: holds released");
            balances.push(account["balance"].as_i64().expect("balance"));
        }
        let opening: Vec<i64> = self.accounts.iter().map(|(_, open, _)| *open).collect();
        let committed: Vec<i64> = self.accounts.iter().map(|(_, open, change)| open + change).collect();
        assert_eq!(balances.iter().sum::<i64>(), opening.iter().sum::<i64>(), "money conserved");
        assert!(balances == opening || balances == committed, "applied wholly or not at all: {balances:?}");
        balances == committed
    }
}

async fn drill(point: &'static str, victim: Victim, expect: Expect) {
    run(Scenario::one_leg(&point.replace('.', "-")), point, victim, expect).await;
}

async fn run(scenario: Scenario, point: &'static str, victim: Victim, expect: Expect) {
    let options = Options { participants: scenario.participants, ..Options::default() };
    let mut c = Cluster::start_with(options).await;
    for (id, balance, _) in &scenario.accounts {
        c.create_account(id, *balance).await;
    }
    let shard = |s: &str| shard_of(&AccountId::new(s).expect("valid"), scenario.participants as u32);
    let name = match victim {
        Victim::Coordinator => "coordinator".to_string(),
        Victim::DebitShard => format!("p{}", shard(&scenario.debit)),
        Victim::CreditShard => format!("p{}", shard(&scenario.credit)),
    };
    let accounts = scenario.names();
    c.restart(&name, Some(point)).await;

    let id = Uuid::new_v4().to_string();
    let mut body = scenario.body.clone();
    body["id"] = json!(id);
    let answer = c.try_post("/transfers", body.clone()).await;
    assert!(c.node(&name).wait_for_death(DEATH), "{name} did not die at {point}");
    c.restart(&name, None).await;
    c.settle(&accounts, SETTLE).await;

    let (status, stored) = c.get(&format!("/transfers/{id}")).await;
    let moved = scenario.check_money(&c).await;
    match expect {
        Expect::Committed => {
            assert!(moved, "{point}: the transfer must end committed");
            assert_eq!((status, stored["status"].clone()), (200, json!("committed")), "{point}");
        }
        Expect::Aborted => {
            assert!(!moved, "{point}: the transfer must end aborted");
            assert_eq!((status, stored["status"].clone()), (200, json!("aborted")), "{point}: {stored}");
        }
        Expect::NeverDecided => {
            assert!(!moved, "{point}: nothing may have moved");
            assert_eq!(status, 404, "{point}: {stored}");
        }
        Expect::Either => {
            let outcome = if moved { "committed" } else { "aborted" };
            assert_eq!((status, stored["status"].clone()), (200, json!(outcome)), "{point}: {stored}");
        }
    }
    // Whatever the client was told is what happened.
    match &answer {
        Some((200, reply)) => assert!(moved, "{point}: client told committed: {reply}"),
        Some((_, reply)) if reply["status"] == "aborted" => {
            assert!(!moved, "{point}: told aborted: {reply}")
        }
        Some((s, reply)) => panic!("{point}: unexpected answer {s} {reply}"),
        None => {}
    }
    // The shards agree, and each applied the transfer at most once (finished ids are unique per shard).
    for s in 0..scenario.participants {
        let applied = c.applied(s).await;
        let mine: Vec<&Value> = applied.iter().filter(|a| a["id"] == json!(id)).collect();
        assert!(mine.len() <= 1);
        if moved {
            assert_eq!(mine.first().map(|a| a["decision"].clone()), Some(json!("commit")), "{point}: shard {s}");
        } else {
            assert!(mine.iter().all(|a| a["decision"] == "abort"), "{point}: shard {s}: {mine:?}");
        }
    }
    // A retry with the same id gets the recorded outcome; if there is none it runs now, exactly once.
    let (retry_status, retry) = c.post("/transfers", body).await;
    match expect {
        Expect::Committed => assert_eq!(retry_status, 200, "{retry}"),
        Expect::Aborted => assert_eq!(retry["status"], "aborted", "{retry}"),
        Expect::Either if moved => assert_eq!(retry_status, 200, "{retry}"),
        Expect::Either => assert_eq!(retry["status"], "aborted", "{retry}"),
        Expect::NeverDecided => {
            assert_eq!(retry_status, 200, "{retry}");
            c.settle(&accounts, SETTLE).await;
            assert!(scenario.check_money(&c).await, "the resubmission committed");
        }
    }
    if let Some((s, first)) = answer {
        assert_eq!((retry_status, &retry), (s, &first), "{point}: a retry repeats the first final answer");
    }
}

/// Every crash point of a transfer, as the tests below run them one by one for a transfer of one leg.
const TRANSFER_CRASHES: [(&str, Victim, Expect); 13] = [
    (crash::PARTICIPANT_PREPARE_RECEIVED, Victim::DebitShard, Expect::Aborted),
    (crash::PARTICIPANT_PREPARE_FLUSHED, Victim::DebitShard, Expect::Aborted),
    (crash::PARTICIPANT_PREPARE_FLUSHED, Victim::CreditShard, Expect::Aborted),
    (crash::PARTICIPANT_DECIDE_RECEIVED, Victim::DebitShard, Expect::Committed),
    (crash::PARTICIPANT_DECIDE_APPLIED, Victim::CreditShard, Expect::Committed),
    (crash::PARTICIPANT_FRAME_RECEIVED, Victim::DebitShard, Expect::Aborted),
    (crash::COORDINATOR_TRANSFER_RECEIVED, Victim::Coordinator, Expect::NeverDecided),
    (crash::COORDINATOR_PREPARE_SENT, Victim::Coordinator, Expect::Either),
    (crash::COORDINATOR_VOTES_RECEIVED, Victim::Coordinator, Expect::Committed),
    (crash::COORDINATOR_DECISION_LOGGED, Victim::Coordinator, Expect::Committed),
    (crash::COORDINATOR_COMMIT_SENT, Victim::Coordinator, Expect::Committed),
    (crash::COORDINATOR_FRAME_SENT, Victim::Coordinator, Expect::Either),
    (crash::COORDINATOR_BEFORE_END, Victim::Coordinator, Expect::Committed),
];

/// The same SIGKILLs during a transfer of three legs over three shards, one point after another.
#[tokio::test(flavor = "multi_thread")]
async fn every_crash_point_during_a_transfer_of_three_legs_over_three_shards() {
    for (i, (point, victim, expect)) in TRANSFER_CRASHES.into_iter().enumerate() {
        eprintln!("three legs: {point} on {victim:?}");
        run(Scenario::three_shards(&format!("crash{i}")), point, victim, expect).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn participant_killed_when_prepare_arrives_aborts() {
    drill(crash::PARTICIPANT_PREPARE_RECEIVED, Victim::DebitShard, Expect::Aborted).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn participant_killed_after_flushing_its_vote_resolves_abort_after_restart() {
    drill(crash::PARTICIPANT_PREPARE_FLUSHED, Victim::DebitShard, Expect::Aborted).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn credit_participant_killed_after_flushing_its_vote_resolves_abort_after_restart() {
    drill(crash::PARTICIPANT_PREPARE_FLUSHED, Victim::CreditShard, Expect::Aborted).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn participant_killed_after_voting_yes_commits_after_restart() {
    drill(crash::PARTICIPANT_DECIDE_RECEIVED, Victim::DebitShard, Expect::Committed).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn participant_killed_after_applying_commit_before_ack_stays_committed_once() {
    drill(crash::PARTICIPANT_DECIDE_APPLIED, Victim::CreditShard, Expect::Committed).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn coordinator_killed_when_request_arrives_decides_nothing() {
    drill(crash::COORDINATOR_TRANSFER_RECEIVED, Victim::Coordinator, Expect::NeverDecided).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn coordinator_killed_after_first_vote_ends_as_its_staging_record_says() {
    drill(crash::COORDINATOR_PREPARE_SENT, Victim::Coordinator, Expect::Either).await;
}

/// Every vote was YES and the staging record is durable: the transfer is committed although no decision was
/// written, and recovery, preparing it again, finds every shard still prepared.
#[tokio::test(flavor = "multi_thread")]
async fn coordinator_killed_before_writing_the_decision_of_a_staged_transfer_commits_it() {
    drill(crash::COORDINATOR_VOTES_RECEIVED, Victim::Coordinator, Expect::Committed).await;
}

/// The first sync is the staging record's: recovery prepares the transfer again and commits it.
#[tokio::test(flavor = "multi_thread")]
async fn coordinator_killed_after_logging_the_staging_record_commits_both_shards_after_restart() {
    drill(crash::COORDINATOR_DECISION_LOGGED, Victim::Coordinator, Expect::Committed).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn coordinator_killed_after_first_commit_sent_finishes_the_commit() {
    drill(crash::COORDINATOR_COMMIT_SENT, Victim::Coordinator, Expect::Committed).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn coordinator_killed_before_the_end_record_re_sends_commit_harmlessly() {
    drill(crash::COORDINATOR_BEFORE_END, Victim::Coordinator, Expect::Committed).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn coordinator_killed_after_writing_the_prepare_frame_ends_as_its_staging_record_says() {
    drill(crash::COORDINATOR_FRAME_SENT, Victim::Coordinator, Expect::Either).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn participant_killed_with_a_frame_read_but_not_applied_aborts() {
    drill(crash::PARTICIPANT_FRAME_RECEIVED, Victim::DebitShard, Expect::Aborted).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn participant_killed_after_creating_an_account_keeps_it() {
    let mut c = Cluster::start().await;
    let id = "created-then-killed";
    let shard = shard_of(&AccountId::new(id).expect("valid"), 2);
    let name = format!("p{shard}");
    c.restart(&name, Some(crash::PARTICIPANT_ACCOUNT_CREATED)).await;
    let (status, body) = c.post("/accounts", json!({"id": id, "balance": 77})).await;
    assert_eq!((status, body["error"]["code"].clone()), (503, json!("participant_unavailable")), "{body}");
    assert!(c.node(&name).wait_for_death(DEATH));
    c.restart(&name, None).await;
    assert_eq!(c.balance(id).await, 77, "the account was durable before the crash point");
    let (status, _) = c.post("/accounts", json!({"id": id, "balance": 77})).await;
    assert_eq!(status, 409);
}

#[tokio::test(flavor = "multi_thread")]
async fn every_crash_point_has_a_test() {
    // The list above must grow with `common::crash::ALL`.
    let source = include_str!("crash.rs");
    for point in crash::ALL {
        let constant = crash_constant_name(point);
        assert!(
            source.contains(&format!("crash::{constant},")) || source.contains(&format!("crash::{constant})")),
            "no test for {point}"
        );
    }
}

fn crash_constant_name(point: &str) -> String {
    point.replace(['.'], "_").to_uppercase()
}
