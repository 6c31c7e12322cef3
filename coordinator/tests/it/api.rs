//! The public API's contract: money moves, refusals change nothing, bad input gets its 4xx, retries are
//! idempotent.

use crate::harness::{cross_shard_pair, Cluster};
use serde_json::{json, Value};
use std::process::Stdio;
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread")]
async fn committed_cross_shard_transfer_moves_the_money() {
    let c = Cluster::start().await;
    let (alice, bob) = cross_shard_pair("move");
    let sa = c.create_account(&alice, 10_000).await;
    let sb = c.create_account(&bob, 0).await;
    assert_ne!(sa, sb, "the pair spans both shards");

    let id = Uuid::new_v4().to_string();
    let (status, body) = c.post("/transfers", json!({"from": alice, "to": bob, "amount": 250, "id": id})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"id": id, "status": "committed", "from": alice, "to": bob, "amount": 250}));
    let a = c.account(&alice).await;
    assert_eq!(
        (a["balance"].clone(), a["held"].clone(), a["available"].clone()),
        (json!(9_750), json!(0), json!(9_750))
    );
    assert_eq!(c.balance(&bob).await, 250);
    let (status, body) = c.get(&format!("/transfers/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(body["status"], "committed");
    assert_eq!(body["amount"], 250);
}

#[tokio::test(flavor = "multi_thread")]
async fn refused_transfers_change_nothing() {
    let c = Cluster::start().await;
    let (alice, bob) = cross_shard_pair("refuse");
    c.create_account(&alice, 100).await;
    c.create_account(&bob, 5).await;

    let (status, body) = c.post("/transfers", json!({"from": alice, "to": bob, "amount": 101})).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["status"], "aborted");
    assert_eq!(body["reason"], "insufficient_funds");
    let id = body["id"].as_str().expect("generated id").to_owned();
    let (_, stored) = c.get(&format!("/transfers/{id}")).await;
    assert_eq!((stored["status"].clone(), stored["reason"].clone()), (json!("aborted"), json!("insufficient_funds")));

    let (status, body) = c.post("/transfers", json!({"from": alice, "to": "nobody", "amount": 1})).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["reason"], "account_not_found");

    assert_eq!(
        c.account(&alice).await,
        json!({"id": alice, "balance": 100, "held": 0, "available": 100, "overdraft_limit": 0, "shard": c.account(&alice).await["shard"]})
    );
    assert_eq!(c.balance(&bob).await, 5);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_a_clear_4xx() {
    let c = Cluster::start().await;
    let (alice, bob) = cross_shard_pair("bad");
    c.create_account(&alice, 100).await;
    c.create_account(&bob, 0).await;

    let bad_transfers: Vec<(Value, &str)> = vec![
        (json!({"from": alice, "to": bob}), "missing amount"),
        (json!({"from": alice, "amount": 1}), "missing to"),
        (json!({"from": alice, "to": bob, "amount": 0}), "zero"),
        (json!({"from": alice, "to": bob, "amount": -5}), "negative"),
        (json!({"from": alice, "to": bob, "amount": 1.5}), "fractional"),
        (json!({"from": alice, "to": bob, "amount": "10"}), "string"),
        (json!({"from": alice, "to": bob, "amount": 9_223_372_036_854_775_808u64}), "above i64::MAX"),
        (json!({"from": alice, "to": alice, "amount": 1}), "from == to"),
        (json!({"from": alice, "to": bob, "amount": 1, "id": "not-a-uuid"}), "bad id"),
        (json!({"from": "bad id!", "to": bob, "amount": 1}), "bad account id"),
        (json!({"from": alice, "to": bob, "amount": 1, "memo": "x"}), "unknown field"),
        (json!([1, 2]), "not an object"),
    ];
    for (body, what) in bad_transfers {
        let (status, reply) = c.post("/transfers", body).await;
        assert_eq!(status, 400, "{what}: {reply}");
        assert_eq!(reply["error"]["code"], "invalid_request", "{what}: {reply}");
        assert!(reply["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}");
    }

    // Malformed JSON, wrong content type, oversized body.
    let raw = |body: &'static str, ctype: &'static str| {
        c.http.post(c.api("/transfers")).header("content-type", ctype).body(body).send()
    };
    let r = raw("{\"from\":", "application/json").await.expect("reply");
    assert_eq!(r.status(), 400);
    let r = raw("{}", "text/plain").await.expect("reply");
    assert_eq!(r.status(), 415);
    let big = format!("{{\"from\":\"{}\"}}", "x".repeat(64 * 1024));
    // Its own connection: the server closes one whose oversized body it did not read.
    let fresh = reqwest::Client::builder().pool_max_idle_per_host(0).build().expect("client");
    let r = fresh.post(c.api("/transfers")).header("content-type", "application/json").body(big).send().await;
    let r = r.expect("reply");
    assert_eq!(r.status(), 413);
    let body: Value = r.json().await.expect("JSON error body");
    assert_eq!(body["error"]["code"], "payload_too_large");
    assert_eq!(body["error"]["message"], "the request body is larger than the limit of 16384 bytes (16 KiB)");

    let bad_accounts: Vec<(Value, &str)> = vec![
        (json!({"id": ""}), "empty id"),
        (json!({"id": "a".repeat(65)}), "long id"),
        (json!({"id": "sp ace"}), "bad char"),
        (json!({"id": "neg", "balance": -1}), "negative balance"),
        (json!({"id": "frac", "balance": 0.5}), "fractional balance"),
        (json!({"balance": 5}), "missing id"),
    ];
    for (body, what) in bad_accounts {
        let (status, reply) = c.post("/accounts", body).await;
        assert_eq!(status, 400, "{what}: {reply}");
    }
    let (status, reply) = c.post("/accounts", json!({"id": alice})).await;
    assert_eq!((status, reply["error"]["code"].clone()), (409, json!("account_exists")));

    // Every refusal is in the API's own words and shape: no names of the server's types, no axum's phrasing.
    let message = |reply: &Value| reply["error"]["message"].as_str().unwrap_or_default().to_owned();
    let leaks = |text: &str| {
        ["struct", "Request", "Failed to deserialize", "usize", "sequence"].iter().any(|w| text.contains(w))
    };
    for (body, expected) in [
        (json!([]), "malformed request: expected a JSON object, not a list"),
        // A list is never taken as a transfer's fields in order.
        (json!([alice, bob, 5, null, null, null, null]), "malformed request: expected a JSON object, not a list"),
        (json!({"legs": [[alice, bob, 5]]}), "legs[0]: malformed leg: expected a JSON object, not a list"),
        (
            json!({"from": alice, "to": bob, "amount": 1, "legs": 5}),
            "malformed request: invalid type: integer `5`, expected a list",
        ),
    ] {
        let (status, reply) = c.post("/transfers", body.clone()).await;
        assert_eq!((status, message(&reply)), (400, expected.to_owned()), "{body}: {reply}");
        assert_eq!(reply["error"]["code"], "invalid_request", "{body}: {reply}");
    }
    let entries = format!("/accounts/{alice}/entries?limit=abc");
    for (path, expected) in [
        ("/transfers?limit=abc", "limit must be a whole number from 1 to 1000 (transfers listed at most)"),
        ("/transfers?limit=0", "limit must be a whole number from 1 to 1000 (transfers listed at most)"),
        ("/accounts?limit=-1", "limit must be a whole number from 1 to 1000 (accounts listed at most)"),
        ("/holds?limit=1001", "limit must be a whole number from 1 to 1000 (holds listed at most)"),
        ("/accounts?memo=1", "unknown query parameter `memo`; the parameters are `limit` or `after`"),
        (entries.as_str(), "limit must be a whole number"),
    ] {
        let (status, reply) = c.get(path).await;
        assert_eq!((status, reply["error"]["code"].clone()), (400, json!("invalid_request")), "{path}: {reply}");
        assert_eq!(message(&reply), expected, "{path}: {reply}");
        assert!(!leaks(&message(&reply)), "{path}: {reply}");
    }
    let (status, reply) = c.get("/accounts/%FF").await;
    assert_eq!(status, 400, "{reply}");
    assert!(message(&reply).starts_with("the path is not valid"), "{reply}");

    assert_eq!(c.get("/accounts/nobody").await.0, 404);
    assert_eq!(c.get("/accounts/bad%20id").await.0, 400);
    assert_eq!(c.get("/transfers/not-a-uuid").await.0, 400);
    let (status, body) = c.get(&format!("/transfers/{}", Uuid::new_v4())).await;
    assert_eq!((status, body["error"]["code"].clone()), (404, json!("transfer_not_found")));
    assert_eq!(c.get("/transactions?status=weird").await.0, 400);
    assert_eq!(c.get("/no/such/route").await.0, 404);
    let r = c.http.delete(c.api("/accounts/x")).send().await.expect("reply");
    assert_eq!(r.status(), 405);

    // Nothing above moved money.
    assert_eq!(c.balance(&alice).await, 100);
    assert_eq!(c.balance(&bob).await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn retried_transfer_returns_the_same_answer_and_applies_once() {
    let c = Cluster::start().await;
    let (alice, bob) = cross_shard_pair("idem");
    c.create_account(&alice, 1_000).await;
    c.create_account(&bob, 0).await;
    let id = Uuid::new_v4().to_string();
    let body = json!({"from": alice, "to": bob, "amount": 300, "id": id});

    let first = c.post("/transfers", body.clone()).await;
    assert_eq!(first.0, 200);
    for _ in 0..3 {
        assert_eq!(c.post("/transfers", body.clone()).await, first);
    }
    // Concurrent duplicates too.
    let dupes: Vec<_> = (0..8).map(|_| c.post("/transfers", body.clone())).collect();
    for reply in futures::future::join_all(dupes).await {
        assert_eq!(reply, first);
    }
    assert_eq!(c.balance(&alice).await, 700);
    assert_eq!(c.balance(&bob).await, 300);

    let (status, reply) = c.post("/transfers", json!({"from": alice, "to": bob, "amount": 301, "id": id})).await;
    assert_eq!((status, reply["error"]["code"].clone()), (409, json!("idempotency_conflict")));

    // An aborted outcome is replayed too, even once funds would suffice.
    let abort_id = Uuid::new_v4().to_string();
    let abort_body = json!({"from": bob, "to": alice, "amount": 500, "id": abort_id});
    let aborted = c.post("/transfers", abort_body.clone()).await;
    assert_eq!(aborted.0, 422);
    c.post("/transfers", json!({"from": alice, "to": bob, "amount": 300})).await;
    assert_eq!(c.post("/transfers", abort_body).await, aborted);
    assert_eq!(c.balance(&bob).await, 600);
}

#[tokio::test(flavor = "multi_thread")]
async fn health_reports_every_participant() {
    let mut c = Cluster::start().await;
    let (status, body) = c.get("/health").await;
    assert_eq!(status, 200);
    assert_eq!(body["status"], "ok");
    let shards: Vec<Value> = body["participants"].as_array().expect("list").iter().map(|p| p["up"].clone()).collect();
    assert_eq!(shards, vec![json!(true), json!(true)]);

    c.node("p1").kill();
    let (status, body) = c.get("/health").await;
    assert_eq!(status, 200);
    assert_eq!(body["participants"][1]["up"], false);
    assert_eq!(body["participants"][0]["up"], true);

    // With shard 1 down, transfers touching it abort with 503 and leave shard 0 untouched.
    let (alice, bob) = cross_shard_pair("down");
    let alice_shard = common::ledger::shard_of(&common::ledger::AccountId::new(alice.as_str()).expect("id"), 2);
    let (on0, on1) = if alice_shard == 0 { (alice, bob) } else { (bob, alice) };
    c.restart("p1", None).await;
    c.create_account(&on0, 50).await;
    c.create_account(&on1, 50).await;
    c.node("p1").kill();
    let (status, body) = c.post("/transfers", json!({"from": on0, "to": on1, "amount": 10})).await;
    assert_eq!((status, body["reason"].clone()), (503, json!("participant_unavailable")), "{body}");
    assert_eq!(c.get(&format!("/accounts/{on1}")).await.0, 503);
    let a = c.account(&on0).await;
    assert_eq!((a["balance"].clone(), a["held"].clone()), (json!(50), json!(0)));

    // Decisions some shard has not acknowledged, under their name and under the one earlier versions used.
    let (status, listed) = c.get("/transactions?status=unacknowledged").await;
    assert_eq!(status, 200, "{listed}");
    assert!(listed["transactions"].is_array(), "{listed}");
    let ids =
        |list: &Value| list["transactions"].as_array().map(|t| t.iter().map(|x| x["id"].clone()).collect::<Vec<_>>());
    let (status, by_old_name) = c.get("/transactions?status=in_doubt").await;
    assert_eq!((status, ids(&by_old_name)), (200, ids(&listed)));
    let (status, body) = c.get("/transactions?status=pending").await;
    assert_eq!((status, body["error"]["code"].clone()), (400, json!("invalid_request")), "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn restarting_everything_keeps_every_balance() {
    let mut c = Cluster::start().await;
    let names: Vec<String> = (0..6).map(|i| format!("keep{i}")).collect();
    for n in &names {
        c.create_account(n, 1_000).await;
    }
    for i in 0..30 {
        let from = &names[i % names.len()];
        let to = &names[(i * 7 + 1) % names.len()];
        if from != to {
            c.post("/transfers", json!({"from": from, "to": to, "amount": 10 + i})).await;
        }
    }
    let mut before = Vec::new();
    for n in &names {
        before.push(c.account(n).await);
    }
    // Kill -9 all, then bring all back.
    c.coordinator.kill();
    for p in &mut c.participants {
        p.kill();
    }
    for name in ["p0", "p1", "coordinator"] {
        c.restart(name, None).await;
    }
    let mut after = Vec::new();
    for n in &names {
        after.push(c.account(n).await);
    }
    assert_eq!(before, after);
    assert_eq!(after.iter().map(|a| a["balance"].as_i64().expect("balance")).sum::<i64>(), 6_000);

    // And SIGTERM stops cleanly, with the same result after restart.
    c.coordinator.terminate();
    for p in &mut c.participants {
        p.terminate();
    }
    for name in ["p0", "p1", "coordinator"] {
        c.restart(name, None).await;
    }
    for (n, b) in names.iter().zip(&before) {
        assert_eq!(&c.account(n).await, b);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_different_participant_count_is_refused() {
    let mut c = Cluster::start().await;
    c.coordinator.kill();
    let mut spec = c.coordinator.spec.clone();
    spec.set_flag("--participants", "http://127.0.0.1:1");
    let out =
        spec.command(&[], None).expect("a command line").stderr(Stdio::piped()).output().expect("run coordinator");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("2 participants, not 1"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_are_served_in_prometheus_format() {
    let c = Cluster::start().await;
    let (alice, bob) = cross_shard_pair("metrics");
    c.create_account(&alice, 100).await;
    c.create_account(&bob, 0).await;
    c.post("/transfers", json!({"from": alice, "to": bob, "amount": 5})).await;
    c.post("/transfers", json!({"from": alice, "to": bob, "amount": 500})).await;
    tokio::time::sleep(std::time::Duration::from_millis(1_200)).await;
    let text = c.http.get(c.api("/metrics")).send().await.expect("reply").text().await.expect("text");
    for expected in [
        "ledger_transfers_total{outcome=\"committed\",reason=\"none\"} 1",
        "ledger_transfers_total{outcome=\"aborted\",reason=\"insufficient_funds\"} 1",
        "ledger_transfer_seconds_bucket",
        "ledger_prepare_round_trip_seconds_bucket{shard=\"0\"",
        "ledger_commit_round_trip_seconds_bucket{shard=\"1\"",
        "ledger_wal_flush_seconds_bucket",
        "ledger_wal_records_per_flush_bucket",
        "ledger_transfers_unacknowledged 0",
        "ledger_transfers_in_doubt 0",
        "ledger_participant_up{shard=\"1\"} 1",
        "# HELP ledger_transfers_total",
    ] {
        assert!(text.contains(expected), "coordinator /metrics lacks {expected}:\n{text}");
    }
    let p = c.http.get(format!("{}/metrics", c.participants[0].url())).send().await.expect("reply");
    let text = p.text().await.expect("text");
    for expected in [
        "ledger_participant_votes_total{vote=\"yes\"}",
        "ledger_wal_fsyncs_total",
        "ledger_participant_prepared_transfers 0",
    ] {
        assert!(text.contains(expected), "participant /metrics lacks {expected}:\n{text}");
    }
}
