//! `POST /transfers/batch`: items are independent, each gets what it would have got alone (with its status as
//! `code`), the money moves exactly once per committed id, and only a bad envelope fails the whole request.

use crate::harness::{cross_shard_pair, Cluster};
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_mixing_good_bad_duplicate_and_conflicting_items_answers_each_alone() {
    let c = Cluster::start().await;
    let (alice, bob) = cross_shard_pair("batch");
    c.create_account(&alice, 1_000).await;
    c.create_account(&bob, 100).await;

    let earlier = uuid::Uuid::new_v4().to_string();
    let (status, first) = c.post("/transfers", json!({"id": earlier, "from": alice, "to": bob, "amount": 10})).await;
    assert_eq!(status, 200, "{first}");

    let twice = uuid::Uuid::new_v4().to_string();
    let items = vec![
        json!({"from": alice, "to": bob, "amount": 100}),
        json!({"id": twice, "from": bob, "to": alice, "amount": 7}),
        json!({"from": alice, "to": bob, "amount": 0}),
        json!({"id": twice, "from": bob, "to": alice, "amount": 7}),
        json!({"id": earlier, "from": alice, "to": bob, "amount": 10}),
        json!({"id": earlier, "from": alice, "to": bob, "amount": 11}),
        json!({"from": bob, "to": alice, "amount": 1_000_000}),
        json!({"from": alice, "to": "nobody", "amount": 1}),
        json!({"from": alice, "to": bob, "amount": 1, "memo": "x"}),
        json!("not an object"),
        json!({"id": "not-a-uuid", "from": alice, "to": bob, "amount": 1}),
        json!({"from": alice, "to": alice, "amount": 1}),
    ];
    let (status, body) = c.post("/transfers/batch", json!({"transfers": items})).await;
    assert_eq!(status, 200, "{body}");
    let results = body["results"].as_array().expect("results");
    assert_eq!(results.len(), items.len(), "one result per item, in order");
    let codes: Vec<u64> = results.iter().map(|r| r["code"].as_u64().expect("a code")).collect();
    assert_eq!(codes, [200, 200, 400, 200, 200, 409, 422, 404, 400, 400, 400, 400], "{body}");

    assert_eq!(results[0]["status"], "committed");
    assert_eq!((results[0]["from"].clone(), results[0]["amount"].clone()), (json!(alice), json!(100)));
    assert!(uuid::Uuid::parse_str(results[0]["id"].as_str().expect("a generated id")).is_ok());
    assert_eq!(results[1]["id"], json!(twice));
    let mut repeat = results[3].clone();
    repeat["code"] = json!(200);
    assert_eq!(repeat, results[1], "the same id and body twice in one batch: one transfer, one answer");
    assert_eq!(results[2]["error"]["code"], "invalid_request");
    let mut alone = first.clone();
    alone["code"] = json!(200);
    assert_eq!(results[4], alone, "a retry of an earlier transfer gets the answer it got alone");
    assert_eq!(results[5]["error"]["code"], "idempotency_conflict");
    assert_eq!(
        (results[6]["status"].clone(), results[6]["reason"].clone()),
        (json!("aborted"), json!("insufficient_funds"))
    );
    assert_eq!(results[7]["reason"], "account_not_found");
    for bad in &results[8..] {
        assert_eq!(bad["error"]["code"], "invalid_request", "{bad}");
        assert!(bad["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{bad}");
    }

    // Moved: 10 before, then 100 alice -> bob and 7 bob -> alice once.
    assert_eq!(c.balance(&alice).await, 1_000 - 10 - 100 + 7);
    assert_eq!(c.balance(&bob).await, 100 + 10 + 100 - 7);
    let (status, looked_up) = c.get(&format!("/transfers/{twice}")).await;
    assert_eq!((status, looked_up["status"].clone()), (200, json!("committed")));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_takes_transfers_of_several_legs_and_holds_as_items() {
    let c = Cluster::start().await;
    let (alice, bob) = cross_shard_pair("batchlegs");
    c.create_account(&alice, 1_000).await;
    c.create_account(&bob, 0).await;
    let leg = |from: &str, to: &str, amount: i64| json!({"from": from, "to": to, "amount": amount});
    let items = vec![
        json!({"legs": [leg(&alice, &bob, 5), leg(&alice, &bob, 6)]}),
        json!({"from": alice, "to": bob, "amount": 20, "hold": true, "expires_in_s": 60}),
        json!({"legs": [leg(&alice, &bob, 1), leg(&alice, &alice, 1)]}),
        json!({"legs": [leg(&alice, &bob, 1), leg(&bob, &alice, 1_000)]}),
    ];
    let (status, body) = c.post("/transfers/batch", json!({"transfers": items})).await;
    assert_eq!(status, 200, "{body}");
    let results = body["results"].as_array().expect("results");
    let codes: Vec<u64> = results.iter().map(|r| r["code"].as_u64().expect("a code")).collect();
    assert_eq!(codes, [200, 200, 400, 422], "{body}");
    assert_eq!(
        (results[0]["status"].clone(), results[0]["legs"].as_array().map(Vec::len)),
        (json!("committed"), Some(2))
    );
    assert_eq!((results[1]["status"].clone(), results[1]["amount"].clone()), (json!("held"), json!(20)));
    assert_eq!(results[2]["error"]["leg"], 1, "a bad leg is named in its item's error");
    assert_eq!((results[3]["reason"].clone(), results[3]["leg"].clone()), (json!("insufficient_funds"), json!(1)));
    let account = c.account(&alice).await;
    assert_eq!((account["balance"].clone(), account["held"].clone()), (json!(1_000 - 11), json!(20)));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_envelope_fails_the_whole_batch_and_nothing_moves() {
    let c = Cluster::start().await;
    let (alice, bob) = cross_shard_pair("envelope");
    c.create_account(&alice, 1_000_000).await;
    c.create_account(&bob, 0).await;
    let good = json!({"from": alice, "to": bob, "amount": 1});

    let envelopes = [
        json!({"transfers": []}),
        json!({"transfers": vec![good.clone(); coordinator::BATCH_ITEMS_MAX + 1]}),
        json!({"transfers": [good.clone()], "extra": 1}),
        json!({"items": [good.clone()]}),
        json!([good.clone()]),
    ];
    for envelope in envelopes {
        let (status, body) = c.post("/transfers/batch", envelope).await;
        assert_eq!((status, body["error"]["code"].clone()), (400, json!("invalid_request")), "{body}");
    }
    let padding = "x".repeat(coordinator::BATCH_BODY_BYTES_MAX);
    let (status, body) = c.post("/transfers/batch", json!({"transfers": [good.clone()], "padding": padding})).await;
    assert_eq!((status, body["error"]["code"].clone()), (413, json!("payload_too_large")), "{body}");
    assert_eq!(body["error"]["message"], "the request body is larger than the limit of 2097152 bytes (2048 KiB)");
    let not_json = c.http.post(c.api("/transfers/batch")).body("{}").send().await.expect("an answer");
    assert_eq!(not_json.status(), 415);
    assert_eq!(c.balance(&alice).await, 1_000_000, "no item of a refused batch ran");

    // A full batch at the limit runs, every item on its own.
    let items: Vec<Value> = (0..coordinator::BATCH_ITEMS_MAX).map(|_| good.clone()).collect();
    let (status, body) = c.post("/transfers/batch", json!({"transfers": items})).await;
    assert_eq!(status, 200);
    let results = body["results"].as_array().expect("results");
    assert_eq!(results.len(), coordinator::BATCH_ITEMS_MAX);
    assert!(results.iter().all(|r| r["code"] == 200), "every item committed");
    assert_eq!(c.balance(&bob).await, coordinator::BATCH_ITEMS_MAX as i64);
    assert_eq!(c.balance(&alice).await, 1_000_000 - coordinator::BATCH_ITEMS_MAX as i64);
}
