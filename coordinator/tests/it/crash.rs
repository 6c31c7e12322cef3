//! A SIGKILL at every named crash point (see `common::crash`), on both sides: arm it, run one cross-shard
//! transfer, let the process die, restart it, and check that the transfer ended committed on both shards or
//! aborted on both, that no funds stay held, that money is conserved, and that the client's answer (when it
//! got one) matches what happened.

use crate::harness::{cross_shard_pair, Cluster};
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
    /// staging sync and the Prepares, which parallel commits run at once. Either way on both shards, and as
    /// the client was told.
    Either,
}

#[derive(Clone, Copy)]
enum Victim {
    Coordinator,
    /// The participant owning the debited account.
    DebitShard,
    /// The participant owning the credited account.
    CreditShard,
}

async fn drill(point: &'static str, victim: Victim, expect: Expect) {
    let mut c = Cluster::start().await;
    let (alice, bob) = cross_shard_pair(&point.replace('.', "-"));
    c.create_account(&alice, 1_000).await;
    c.create_account(&bob, 0).await;
    let shard = |s: &str| shard_of(&AccountId::new(s).expect("valid"), 2);
    let name = match victim {
        Victim::Coordinator => "coordinator".to_string(),
        Victim::DebitShard => format!("p{}", shard(&alice)),
        Victim::CreditShard => format!("p{}", shard(&bob)),
    };
    c.restart(&name, Some(point)).await;

    let id = Uuid::new_v4().to_string();
    let body = json!({"from": alice, "to": bob, "amount": 250, "id": id});
    let answer = c.try_post("/transfers", body.clone()).await;
    assert!(c.node(&name).wait_for_death(DEATH), "{name} did not die at {point}");
    c.restart(&name, None).await;
    c.settle(&[&alice, &bob], SETTLE).await;

    let (status, stored) = c.get(&format!("/transfers/{id}")).await;
    let moved = check_money(&c, &alice, &bob).await;
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
    for s in 0..2 {
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
            c.settle(&[&alice, &bob], SETTLE).await;
            assert!(check_money(&c, &alice, &bob).await, "the resubmission committed");
        }
    }
    if let Some((s, first)) = answer {
        assert_eq!((retry_status, &retry), (s, &first), "{point}: a retry repeats the first final answer");
    }
}

/// Money is conserved and the transfer applied wholly or not at all; returns whether it moved.
async fn check_money(c: &Cluster, alice: &str, bob: &str) -> bool {
    let (a, b) = (c.account(alice).await, c.account(bob).await);
    assert_eq!((a["held"].clone(), b["held"].clone()), (json!(0), json!(0)), "holds released");
    let (a, b) = (a["balance"].as_i64().expect("balance"), b["balance"].as_i64().expect("balance"));
    assert_eq!(a + b, 1_000, "money conserved");
    assert!((a, b) == (750, 250) || (a, b) == (1_000, 0), "applied wholly or not at all: {a} / {b}");
    b == 250
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
