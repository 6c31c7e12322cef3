//! The books: the journal of postings, transfers by account, the audit (at rest, under load, and when
//! something is wrong), and the operator's in-doubt tools.

use crate::harness::{cross_shard_pair, Cluster, Options};
use serde_json::{json, Value};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread")]
async fn the_journal_records_every_posting_newest_first_with_pages() {
    let c = Cluster::start_with(Options {
        api_tokens: Some("ops admin admin-token-0123456789\nshop client client-token-0123456789\n".into()),
        ..Options::default()
    })
    .await;
    let (alice, bob) = cross_shard_pair("journal");
    let admin = |r: reqwest::RequestBuilder| r.bearer_auth("admin-token-0123456789");
    for (id, balance) in [(&alice, 1_000), (&bob, 0)] {
        let r = admin(c.http.post(c.api("/accounts"))).json(&json!({"id": id, "balance": balance})).send().await;
        assert_eq!(r.expect("reply").status(), 201);
    }
    for amount in [100, 200, 300] {
        let r = c.http.post(c.api("/transfers")).bearer_auth("client-token-0123456789");
        let r = r.json(&json!({"from": alice, "to": bob, "amount": amount})).send().await.expect("reply");
        assert_eq!(r.status(), 200);
    }
    let r = c.http.post(c.api("/transfers")).bearer_auth("client-token-0123456789");
    let refused = r.json(&json!({"from": alice, "to": bob, "amount": 5_000})).send().await.expect("reply");
    assert_eq!(refused.status(), 422);

    let page = |q: String| {
        let req = c.http.get(c.api(&format!("/accounts/{alice}/entries{q}"))).bearer_auth("client-token-0123456789");
        async move { req.send().await.expect("reply").json::<Value>().await.expect("JSON") }
    };
    let first = page("?limit=2".into()).await;
    let entries = first["entries"].as_array().expect("entries");
    let amounts: Vec<i64> = entries.iter().map(|e| e["amount"].as_i64().expect("amount")).collect();
    assert_eq!(amounts, vec![-300, -200], "newest first");
    assert_eq!(entries[0]["balance_after"], 400);
    assert_eq!(entries[0]["kind"], "posting");
    assert_eq!(entries[0]["made_by"], "shop", "the API token's name is journaled");
    assert_eq!(entries[0]["actor"], "shop", "and still shown under its earlier name");
    let next = first["next"].as_u64().expect("a cursor to the next page");
    let second = page(format!("?limit=2&after={next}")).await;
    let rest: Vec<(Value, Value)> = second["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| (e["kind"].clone(), e["amount"].clone()))
        .collect();
    assert_eq!(rest, vec![(json!("posting"), json!(-100)), (json!("opened"), json!(1_000))]);
    assert_eq!(second["next"], Value::Null, "no page after the last: {second}");

    let bob_entries = c.http.get(c.api(&format!("/accounts/{bob}/entries"))).bearer_auth("client-token-0123456789");
    let bob_entries: Value = bob_entries.send().await.expect("reply").json().await.expect("JSON");
    let balances: Vec<i64> = bob_entries["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| e["balance_after"].as_i64().expect("n"))
        .collect();
    assert_eq!(balances, vec![600, 300, 100, 0]);

    let list =
        c.http.get(c.api(&format!("/transfers?account={alice}&limit=10"))).bearer_auth("client-token-0123456789");
    let list: Value = list.send().await.expect("reply").json().await.expect("JSON");
    let statuses: Vec<Value> =
        list["transfers"].as_array().expect("list").iter().map(|t| t["status"].clone()).collect();
    // The account's journal names its committed transfers; an aborted one moved nothing and is found by id.
    assert_eq!(statuses, vec![json!("committed"); 3], "{list}");

    let bad = c.http.get(c.api(&format!("/accounts/{alice}/entries?limit=0"))).bearer_auth("client-token-0123456789");
    assert_eq!(bad.send().await.expect("reply").status(), 400);
    let missing = c.http.get(c.api("/accounts/nobody/entries")).bearer_auth("client-token-0123456789");
    assert_eq!(missing.send().await.expect("reply").status(), 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_audit_balances_at_rest_and_while_transfers_run() {
    let c = Cluster::start().await;
    let names: Vec<String> = (0..8).map(|i| format!("audit{i}")).collect();
    for n in &names {
        c.create_account(n, 10_000).await;
    }
    let (status, report) = c.get("/audit").await;
    assert_eq!(status, 200);
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["created_total"], 80_000);
    assert_eq!(report["balance_total"], 80_000);

    // Audit over and over while 16 clients move money.
    let load = async {
        let jobs = (0..16).map(|w| {
            let names = names.clone();
            let c = &c;
            async move {
                for i in 0..40 {
                    let from = &names[(w + i) % names.len()];
                    let to = &names[(w * 3 + i + 1) % names.len()];
                    if from != to {
                        c.post("/transfers", json!({"from": from, "to": to, "amount": 1 + (i % 50)})).await;
                    }
                }
            }
        });
        futures::future::join_all(jobs).await;
    };
    let audits = async {
        let mut reports = Vec::new();
        for _ in 0..15 {
            reports.push(c.get("/audit").await);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        reports
    };
    let ((), reports) = tokio::join!(load, audits);
    for (status, report) in reports {
        assert_eq!(status, 200);
        assert_eq!(report["ok"], true, "the audit holds while transfers run: {report}");
    }
    c.settle(&names.iter().map(String::as_str).collect::<Vec<_>>(), Duration::from_secs(20)).await;
    let (_, report) = c.get("/audit").await;
    assert_eq!((report["ok"].clone(), report["balance_total"].clone()), (json!(true), json!(80_000)));
}

#[tokio::test(flavor = "multi_thread")]
async fn operators_see_a_shards_doubts_and_can_force_them_only_without_a_coordinator() {
    let mut c = Cluster::start().await;
    let (alice, bob) = cross_shard_pair("force");
    c.create_account(&alice, 500).await;
    c.create_account(&bob, 0).await;
    let alice_shard = c.account(&alice).await["shard"].as_u64().expect("shard") as usize;
    // The coordinator dies with both shards prepared: the debit shard holds 70.
    c.restart("coordinator", Some(common::crash::COORDINATOR_VOTES_RECEIVED)).await;
    let id = uuid::Uuid::new_v4().to_string();
    assert!(c.try_post("/transfers", json!({"from": alice, "to": bob, "amount": 70, "id": id})).await.is_none());
    assert!(c.node("coordinator").wait_for_death(Duration::from_secs(10)));

    let token = c.cluster_token.clone().expect("token");
    let shard_url = c.participants[alice_shard].url();
    let internal_get = |path: String| {
        let request = c.http.get(format!("{shard_url}/internal/{path}")).header("x-ledger-cluster-token", &token);
        async move { request.send().await.expect("reply").json::<Value>().await.expect("JSON") }
    };
    let view: Value = internal_get("in_doubt".into()).await;
    let doubts = view["transactions"].as_array().expect("list");
    assert_eq!(doubts.len(), 1, "{view}");
    assert_eq!(doubts[0]["id"], json!(id));
    assert_eq!(doubts[0]["amount"], 70);

    // Wait until the resolver has tried the dead coordinator, then see it in the view.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let view: Value = internal_get("in_doubt".into()).await;
    assert!(view["transactions"][0]["last_heard"].as_str().is_some_and(|s| s.starts_with("unreachable")), "{view}");

    let force = |decision: &'static str| {
        c.http
            .post(format!("{shard_url}/internal/transfers/{id}/force"))
            .header("x-ledger-cluster-token", &token)
            .json(&json!({"decision": decision, "operator": "carol"}))
            .send()
    };
    let forced = force("abort").await.expect("reply");
    assert_eq!(forced.status(), 200, "no coordinator: the operator may decide");
    let a = c.account_from(alice_shard, &alice).await;
    assert_eq!((a["balance"].clone(), a["held"].clone()), (json!(500), json!(0)), "the hold is released");
    let entries = internal_get(format!("accounts/{alice}/entries")).await;
    assert_eq!(entries["entries"][0]["kind"], "heuristic_abort");
    assert_eq!(entries["entries"][0]["made_by"], "carol");

    // With the coordinator back, forcing is refused (it decides), and it resolves the other shard itself.
    c.restart("coordinator", None).await;
    c.settle(&[&alice, &bob], Duration::from_secs(20)).await;
    let (_, report) = c.get("/audit").await;
    assert_eq!(report["ok"], true, "a heuristic abort agreeing with presumed abort is fine: {report}");
    let heuristics = &report["shards"][alice_shard]["heuristics"];
    assert_eq!(heuristics[0]["operator"], "carol");
}

#[tokio::test(flavor = "multi_thread")]
async fn forcing_is_refused_while_the_coordinator_answers() {
    let mut c = Cluster::start().await;
    let (alice, bob) = cross_shard_pair("noforce");
    c.create_account(&alice, 500).await;
    c.create_account(&bob, 0).await;
    let alice_shard = c.account(&alice).await["shard"].as_u64().expect("shard") as usize;
    // Pause the other shard so the transfer sits prepared on alice's shard during its prepare round.
    let other = format!("p{}", 1 - alice_shard);
    let pid = c.node(&other).pid().expect("pid");
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGSTOP);
    }
    let id = uuid::Uuid::new_v4().to_string();
    let transfer = c.post("/transfers", json!({"from": alice, "to": bob, "amount": 10, "id": id}));
    let attempt = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let token = c.cluster_token.clone().expect("token");
        let url = format!("{}/internal/transfers/{id}/force", c.participants[alice_shard].url());
        let r = c.http.post(url).header("x-ledger-cluster-token", token);
        r.json(&json!({"decision": "commit", "operator": "mallory"})).send().await.expect("reply")
    };
    let ((status, _), refused) = tokio::join!(transfer, attempt);
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGCONT);
    }
    assert_eq!(status, 503, "the paused shard made the transfer abort");
    assert_eq!(refused.status(), 409);
    let body: Value = refused.json().await.expect("JSON");
    assert_eq!(body["error"]["code"], "coordinator_reachable");
    c.settle(&[&alice, &bob], Duration::from_secs(20)).await;
    assert_eq!(c.balance(&alice).await, 500);
}

#[tokio::test(flavor = "multi_thread")]
async fn accounts_of_every_shard_and_the_latest_transfers_are_listed_in_pages() {
    let c = Cluster::start().await;
    let (a, b) = cross_shard_pair("list");
    let others: Vec<String> = (0..5).map(|i| format!("list-z{i}")).collect();
    c.create_account(&a, 100).await;
    c.create_account(&b, 0).await;
    for id in &others {
        c.create_account(id, 7).await;
    }
    let mut all: Vec<String> = [a.clone(), b.clone()].into_iter().chain(others.clone()).collect();
    all.sort();

    // Pages of three, merged across shards in id order, until the cursor runs out.
    let mut seen = Vec::new();
    let mut shards = std::collections::BTreeSet::new();
    let mut cursor: Option<String> = None;
    loop {
        let query = cursor.as_ref().map_or(String::new(), |after| format!("&after={after}"));
        let (status, page) = c.get(&format!("/accounts?limit=3{query}")).await;
        assert_eq!(status, 200, "{page}");
        let accounts = page["accounts"].as_array().expect("list");
        assert!(accounts.len() <= 3);
        for account in accounts {
            seen.push(account["id"].as_str().expect("id").to_owned());
            shards.insert(account["shard"].as_u64().expect("shard"));
            assert_eq!(account["available"], account["balance"]);
        }
        match page["next"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen, all, "every account once, in id order");
    assert_eq!(shards.len(), 2, "both shards listed");
    assert_eq!(c.get("/accounts?limit=0").await.0, 400);
    assert_eq!(c.get("/accounts?after=not%20an%20id").await.0, 400);

    let mut ids = Vec::new();
    for amount in [10, 20, 30] {
        let (status, body) = c.post("/transfers", json!({"from": a, "to": b, "amount": amount})).await;
        assert_eq!(status, 200, "{body}");
        ids.push(body["id"].clone());
        // The index orders by decision time in milliseconds; within one millisecond the order is arbitrary.
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    let (status, recent) = c.get("/transfers?limit=2").await;
    assert_eq!(status, 200, "{recent}");
    let listed: Vec<Value> = recent["transfers"].as_array().expect("list").iter().map(|t| t["id"].clone()).collect();
    assert_eq!(listed, vec![ids[2].clone(), ids[1].clone()], "the newest first, across the ledger");
    assert!(recent.get("account").is_none());
}
