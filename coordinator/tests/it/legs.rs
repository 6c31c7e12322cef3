//! Transfers of several legs through the real binaries, over three shards: all legs commit or none does, an
//! abort names the first failing leg, a bad leg is a 400 that names it, idempotency covers the whole body, and
//! each account's journal names the leg it posts.

use crate::harness::{account_on_shard, Cluster, Options};
use serde_json::{json, Value};
use std::time::Duration;
use uuid::Uuid;

const SHARDS: u32 = 3;

struct Accounts {
    payer: String,
    merchant: String,
    fees: String,
    carol: String,
}

/// payer on shard 0, merchant and carol on shard 1, fees on shard 2.
async fn three_shards(prefix: &str) -> (Cluster, Accounts) {
    let c = Cluster::start_with(Options { participants: SHARDS as usize, ..Options::default() }).await;
    let accounts = Accounts {
        payer: account_on_shard(&format!("{prefix}-payer"), 0, SHARDS),
        merchant: account_on_shard(&format!("{prefix}-merchant"), 1, SHARDS),
        carol: account_on_shard(&format!("{prefix}-carol"), 1, SHARDS),
        fees: account_on_shard(&format!("{prefix}-fees"), 2, SHARDS),
    };
    for (id, balance) in [(&accounts.payer, 1_000), (&accounts.merchant, 0), (&accounts.carol, 50), (&accounts.fees, 0)]
    {
        assert_eq!(c.create_account(id, balance).await as usize, shard_index(id), "{id} sits where the test needs it");
    }
    (c, accounts)
}

fn shard_index(id: &str) -> usize {
    common::ledger::shard_of(&common::ledger::AccountId::new(id).expect("valid"), SHARDS) as usize
}

fn leg(from: &str, to: &str, amount: i64) -> Value {
    json!({"from": from, "to": to, "amount": amount})
}

async fn balances(c: &Cluster, a: &Accounts) -> [i64; 4] {
    [c.balance(&a.payer).await, c.balance(&a.merchant).await, c.balance(&a.carol).await, c.balance(&a.fees).await]
}

#[tokio::test(flavor = "multi_thread")]
async fn a_transfer_of_several_legs_over_three_shards_commits_whole_or_not_at_all() {
    let (c, a) = three_shards("legs").await;
    let all = [a.payer.as_str(), &a.merchant, &a.carol, &a.fees];

    // A payment with a fee, and a third party's part: three legs over all three shards.
    let id = Uuid::new_v4().to_string();
    let legs = json!([leg(&a.payer, &a.merchant, 900), leg(&a.payer, &a.fees, 10), leg(&a.carol, &a.fees, 5)]);
    let body = json!({"id": id, "legs": legs});
    let (status, answer) = c.post("/transfers", body.clone()).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer, json!({"id": id, "status": "committed", "legs": legs}));
    assert_eq!(balances(&c, &a).await, [90, 900, 45, 15]);

    // The same body again gets the same answer and moves nothing; the id with another body is refused.
    assert_eq!(c.post("/transfers", body).await, (200, answer.clone()));
    let other = json!({"id": id, "legs": [leg(&a.payer, &a.merchant, 900), leg(&a.payer, &a.fees, 11)]});
    let (status, refused) = c.post("/transfers", other).await;
    assert_eq!((status, refused["error"]["code"].clone()), (409, json!("idempotency_conflict")), "{refused}");
    assert_eq!(balances(&c, &a).await, [90, 900, 45, 15]);

    let (status, stored) = c.get(&format!("/transfers/{id}")).await;
    assert_eq!((status, stored), (200, answer));

    // Each entry names the transfer and its leg: the fee account got legs 1 and 2.
    let (status, entries) = c.get(&format!("/accounts/{}/entries", a.fees)).await;
    assert_eq!(status, 200, "{entries}");
    // Newest first; each entry's balance is the one after its own posting.
    let postings: Vec<(Value, Value, Value, Value)> = entries["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .filter(|e| e["transfer_id"] == json!(id))
        .map(|e| (e["kind"].clone(), e["leg"].clone(), e["amount"].clone(), e["balance_after"].clone()))
        .collect();
    let posting = |leg: i64, amount: i64, after: i64| (json!("posting"), json!(leg), json!(amount), json!(after));
    assert_eq!(postings, [posting(2, 5, 15), posting(1, 10, 10)], "{entries}");

    // Any failing leg aborts them all, and the answer names the first failing one.
    let aborts = [
        // carol has 45: the second leg fails.
        (
            json!([leg(&a.payer, &a.merchant, 50), leg(&a.carol, &a.fees, 100), leg(&a.payer, &a.fees, 1)]),
            422,
            "insufficient_funds",
            1,
        ),
        // Two debits of one account need their sum: 60 + 40 > 90.
        (json!([leg(&a.payer, &a.merchant, 60), leg(&a.payer, &a.fees, 40)]), 422, "insufficient_funds", 1),
        (
            json!([leg(&a.payer, &a.merchant, 1), leg(&a.carol, &a.fees, 1), leg(&a.fees, "legs-nobody", 1)]),
            404,
            "account_not_found",
            2,
        ),
        (json!([leg("legs-nobody", &a.merchant, 1), leg(&a.carol, &a.fees, 1_000)]), 404, "account_not_found", 0),
    ];
    for (legs, code, reason, failed) in aborts {
        let id = Uuid::new_v4().to_string();
        let (status, answer) = c.post("/transfers", json!({"id": id, "legs": legs})).await;
        assert_eq!(status, code, "{legs}: {answer}");
        assert_eq!(answer, json!({"id": id, "status": "aborted", "reason": reason, "leg": failed}), "{legs}");
        let (_, stored) = c.get(&format!("/transfers/{id}")).await;
        assert_eq!(
            (stored["status"].clone(), stored["leg"].clone(), stored["legs"].clone()),
            (json!("aborted"), json!(failed), legs.clone())
        );
        assert_eq!(balances(&c, &a).await, [90, 900, 45, 15], "nothing moved for {legs}");
    }
    c.settle(&all, Duration::from_secs(20)).await;

    // A one-leg transfer answers exactly as it always has, whether or not it is written as a list of legs.
    let (status, refused) = c.post("/transfers", json!({"from": a.carol, "to": a.payer, "amount": 1_000})).await;
    assert_eq!(status, 422);
    let mut fields: Vec<&String> = refused.as_object().map(|o| o.keys().collect()).unwrap_or_default();
    fields.sort();
    assert_eq!(fields, ["id", "reason", "status"], "no leg is named for a transfer of one: {refused}");
    let (status, one) = c.post("/transfers", json!({"legs": [leg(&a.carol, &a.payer, 5)]})).await;
    assert_eq!(status, 200, "{one}");
    assert_eq!((one["from"].clone(), one["amount"].clone(), one.get("legs")), (json!(a.carol), json!(5), None));

    let (status, audit) = c.get("/audit").await;
    assert_eq!((status, audit["ok"].clone()), (200, json!(true)), "{audit}");
    assert_eq!(balances(&c, &a).await.iter().sum::<i64>(), 1_050, "money is conserved");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_leg_is_a_400_that_names_it() {
    let (c, a) = three_shards("badleg").await;
    let good = leg(&a.payer, &a.merchant, 1);
    let bad = [
        (json!({"legs": [good, leg(&a.payer, &a.payer, 1)]}), Some(1)),
        (json!({"legs": [good, good, {"from": a.payer, "amount": 1}]}), Some(2)),
        (json!({"legs": [leg(&a.payer, &a.merchant, 0)]}), Some(0)),
        (json!({"legs": [good, {"from": a.payer, "to": a.fees, "amount": 1.5}]}), Some(1)),
        (json!({"legs": [good, "x"]}), Some(1)),
        (json!({"legs": []}), None),
        (json!({"legs": vec![good.clone(); 17]}), None),
        (json!({"legs": [good], "from": a.payer}), None),
        (json!({"legs": good}), None),
    ];
    for (body, leg) in bad {
        let (status, answer) = c.post("/transfers", body.clone()).await;
        assert_eq!((status, answer["error"]["code"].clone()), (400, json!("invalid_request")), "{body}: {answer}");
        assert_eq!(answer["error"].get("leg").cloned(), leg.map(|l: i32| json!(l)), "{body}: {answer}");
        if let Some(leg) = leg {
            let message = answer["error"]["message"].as_str().unwrap_or_default();
            assert!(message.starts_with(&format!("legs[{leg}]: ")), "{message}");
        }
    }
    // Sixteen legs is the most, and is accepted.
    let (status, answer) = c.post("/transfers", json!({"legs": vec![good.clone(); 16]})).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(c.balance(&a.merchant).await, 16);
}
