//! Overdraft limits through the real binaries: a bank's cash account goes below zero down to its limit and no
//! further, a customer's account (no limit) never does, the audit accepts the one and the books still add up,
//! and the limit survives a SIGKILL of its shard.

use crate::harness::{cross_shard_pair, Cluster};
use serde_json::json;

const LIMIT: i64 = 1_000_000;

#[tokio::test(flavor = "multi_thread")]
async fn a_cash_account_goes_below_zero_to_its_limit_and_a_customers_never_does() {
    let mut c = Cluster::start().await;
    let (cash, alice) = cross_shard_pair("overdraft");
    let (status, body) = c.post("/accounts", json!({"id": cash, "overdraft_limit": LIMIT})).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!((body["balance"].clone(), body["overdraft_limit"].clone()), (json!(0), json!(LIMIT)));
    c.create_account(&alice, 0).await;
    let account = c.account(&cash).await;
    assert_eq!((account["overdraft_limit"].clone(), account["available"].clone()), (json!(LIMIT), json!(LIMIT)));
    assert_eq!(c.account(&alice).await["overdraft_limit"], 0);

    // A deposit is a transfer from cash; a withdrawal one back to it.
    let deposit = c.post("/transfers", json!({"from": cash, "to": alice, "amount": 500})).await;
    assert_eq!((deposit.0, deposit.1["status"].clone()), (200, json!("committed")), "{}", deposit.1);
    let withdrawal = c.post("/transfers", json!({"from": alice, "to": cash, "amount": 200})).await;
    assert_eq!(withdrawal.0, 200, "{}", withdrawal.1);
    let account = c.account(&cash).await;
    assert_eq!((account["balance"].clone(), account["available"].clone()), (json!(-300), json!(LIMIT - 300)));

    let too_much = c.post("/transfers", json!({"from": cash, "to": alice, "amount": LIMIT - 299})).await;
    assert_eq!((too_much.0, too_much.1["reason"].clone()), (422, json!("insufficient_funds")), "{}", too_much.1);
    let to_the_floor = c.post("/transfers", json!({"from": cash, "to": alice, "amount": LIMIT - 300})).await;
    assert_eq!(to_the_floor.0, 200, "down to exactly minus the limit: {}", to_the_floor.1);
    let back = c.post("/transfers", json!({"from": alice, "to": cash, "amount": LIMIT - 300})).await;
    assert_eq!(back.0, 200, "{}", back.1);
    let overdrawn = c.post("/transfers", json!({"from": alice, "to": cash, "amount": 301})).await;
    assert_eq!(
        (overdrawn.0, overdrawn.1["reason"].clone()),
        (422, json!("insufficient_funds")),
        "no limit, no overdraft"
    );

    let (status, audit) = c.get("/audit").await;
    assert_eq!(status, 200);
    assert_eq!(audit["ok"], true, "a balance within its limit is no violation: {audit}");
    assert_eq!((audit["balance_total"].clone(), audit["created_total"].clone()), (json!(0), json!(0)));

    // The limit is durable with the account.
    let shard = c.account(&cash).await["shard"].as_u64().expect("shard");
    c.restart(&format!("p{shard}"), None).await;
    let account = c.account(&cash).await;
    assert_eq!((account["balance"].clone(), account["overdraft_limit"].clone()), (json!(-300), json!(LIMIT)));
    assert_eq!(c.balance(&alice).await, 300);
    assert_eq!(c.get("/audit").await.1["ok"], true);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_overdraft_limit_is_refused() {
    let c = Cluster::start().await;
    for (limit, what) in [
        (json!(-1), "negative"),
        (json!(1.5), "fractional"),
        (json!("100"), "a string"),
        (json!(9_223_372_036_854_775_808u64), "above i64::MAX"),
    ] {
        let (status, body) = c.post("/accounts", json!({"id": "bank-cash", "overdraft_limit": limit})).await;
        assert_eq!((status, body["error"]["code"].clone()), (400, json!("invalid_request")), "{what}: {body}");
    }
    assert_eq!(c.get("/accounts/bank-cash").await.0, 404, "no refused request opened the account");
    let (status, body) = c.post("/accounts", json!({"id": "bank-cash", "overdraft_limit": i64::MAX})).await;
    assert_eq!((status, body["overdraft_limit"].clone()), (201, json!(i64::MAX)));
    assert_eq!(c.account("bank-cash").await["available"], i64::MAX, "the largest limit does not overflow");
}
