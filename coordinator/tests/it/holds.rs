//! Holds through the real binaries, over three participants: granted, captured in part, released, expired;
//! each end exactly once, across SIGKILLs of every process and with expiries while a process is down.

use crate::harness::{account_on_shard, Cluster, Options};
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use uuid::Uuid;

const SHARDS: u32 = 3;
const SETTLE: Duration = Duration::from_secs(30);
/// How far the coordinator's clock and this test's may disagree about the same instant.
const CLOCK_TOLERANCE_MS: u64 = 2_000;

struct Accounts {
    alice: String,
    shop: String,
    bob: String,
}

/// alice on shard 0 with 1000, shop on shard 1, bob on shard 2.
async fn cluster(prefix: &str) -> (Cluster, Accounts) {
    let c = Cluster::start_with(Options { participants: SHARDS as usize, ..Options::default() }).await;
    let a = Accounts {
        alice: account_on_shard(&format!("{prefix}-alice"), 0, SHARDS),
        shop: account_on_shard(&format!("{prefix}-shop"), 1, SHARDS),
        bob: account_on_shard(&format!("{prefix}-bob"), 2, SHARDS),
    };
    c.create_account(&a.alice, 1_000).await;
    c.create_account(&a.shop, 0).await;
    c.create_account(&a.bob, 0).await;
    (c, a)
}

async fn hold(c: &Cluster, from: &str, to: &str, amount: i64, seconds: u64) -> (u16, Value) {
    let id = Uuid::new_v4().to_string();
    let body = json!({"id": id, "from": from, "to": to, "amount": amount, "hold": true, "expires_in_s": seconds});
    c.post("/transfers", body).await
}

async fn held_and_balance(c: &Cluster, id: &str) -> (i64, i64) {
    let account = c.account(id).await;
    (account["balance"].as_i64().expect("balance"), account["held"].as_i64().expect("held"))
}

async fn status(c: &Cluster, id: &str) -> Value {
    c.get(&format!("/transfers/{id}")).await.1["status"].clone()
}

/// Polls `read` until it returns `want`, or panics after `timeout` naming `what`.
async fn wait_for<T, F>(what: &str, want: T, timeout: Duration, mut read: impl FnMut() -> F)
where
    T: PartialEq + std::fmt::Debug,
    F: std::future::Future<Output = T>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let now = read().await;
        if now == want {
            return;
        }
        assert!(Instant::now() < deadline, "{what} is {now:?}, not {want:?}, after {timeout:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_for_status(c: &Cluster, id: &str, want: &str, timeout: Duration) {
    wait_for(id, json!(want), timeout, || status(c, id)).await;
}

fn owned(entries: &[(&str, i64, i64)]) -> Vec<(String, i64, i64)> {
    entries.iter().map(|(kind, amount, after)| (kind.to_string(), *amount, *after)).collect()
}

/// `account`'s journal entries for transfer `id`, newest first: (kind, amount, balance after).
async fn journal_of(c: &Cluster, account: &str, id: &str) -> Vec<(String, i64, i64)> {
    let (_, entries) = c.get(&format!("/accounts/{account}/entries")).await;
    let entries = entries["entries"].as_array().cloned().unwrap_or_default();
    entries
        .iter()
        .filter(|e| e["transfer_id"] == json!(id))
        .map(|e| {
            let number = |field: &str| e[field].as_i64().unwrap_or(i64::MIN);
            (e["kind"].as_str().unwrap_or_default().to_string(), number("amount"), number("balance_after"))
        })
        .collect()
}

/// Waits until `account` shows `(balance, held)` (`Cluster::settle` cannot be used while a hold is active: a
/// granted hold stays prepared on its shards).
async fn wait_for_books(c: &Cluster, account: &str, want: (i64, i64)) {
    wait_for(account, want, SETTLE, || held_and_balance(c, account)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hold_is_captured_in_part_released_or_expires_each_exactly_once() {
    let (c, a) = cluster("holds").await;

    let before = common::http::now_unix_ms();
    let (code, granted) = hold(&c, &a.alice, &a.shop, 300, 60).await;
    assert_eq!(code, 200, "{granted}");
    let id = granted["id"].as_str().expect("id").to_string();
    assert_eq!((granted["status"].clone(), granted["amount"].clone()), (json!("held"), json!(300)));
    let after = common::http::now_unix_ms();
    let expires_at = granted["expires_at_unix_ms"].as_u64().expect("expiry");
    // The coordinator's clock is its own (a monotonic clock counted from the wall clock at its start), not this
    // test's: the expiry is 60 s after the grant, give or take the tolerance of two clocks on a loaded machine.
    let (earliest, latest) = (before + 60_000 - CLOCK_TOLERANCE_MS, after + 60_000 + CLOCK_TOLERANCE_MS);
    assert!((earliest..=latest).contains(&expires_at), "{granted}: expected {earliest}..={latest}");
    let alice = c.account(&a.alice).await;
    assert_eq!(
        (alice["balance"].clone(), alice["held"].clone(), alice["available"].clone()),
        (json!(1000), json!(300), json!(700))
    );
    let (_, listed) = c.get(&format!("/holds?account={}", a.alice)).await;
    assert_eq!(listed["holds"].as_array().map(|h| h.len()), Some(1), "{listed}");
    assert_eq!(listed["holds"][0]["id"], json!(id));
    assert_eq!(listed["holds"][0]["expires_at_unix_ms"], json!(expires_at), "the expiry the grant reported");

    // A capture of part of it moves that much and releases the rest; the same request again is answered the
    // same, any other end is refused.
    let capture_path = format!("/transfers/{id}/capture");
    let capture = |amount: Option<i64>| {
        let body = amount.map_or(json!({}), |n| json!({"amount": n}));
        c.post(&capture_path, body)
    };
    let (code, captured) = capture(Some(120)).await;
    assert_eq!(code, 200, "{captured}");
    assert_eq!(
        (captured["status"].clone(), captured["amount"].clone(), captured["held_amount"].clone()),
        (json!("captured"), json!(120), json!(300))
    );
    assert_eq!(held_and_balance(&c, &a.alice).await, (880, 0));
    assert_eq!(held_and_balance(&c, &a.shop).await, (120, 0));
    assert_eq!(capture(Some(120)).await, (200, captured.clone()), "the same capture again");
    let (code, refused) = capture(Some(100)).await;
    assert_eq!((code, refused["error"]["code"].clone()), (409, json!("hold_not_active")), "{refused}");
    assert!(refused["error"]["message"].as_str().is_some_and(|m| m.contains("captured")), "{refused}");
    let (code, _) = c.post(&format!("/transfers/{id}/release"), json!({})).await;
    assert_eq!(code, 409);
    assert_eq!(status(&c, &id).await, "captured");
    assert_eq!(held_and_balance(&c, &a.alice).await, (880, 0), "moved once");
    assert_eq!(journal_of(&c, &a.alice, &id).await, owned(&[("capture", -120, 880), ("hold", -300, 1000)]));
    assert_eq!(journal_of(&c, &a.shop, &id).await, owned(&[("capture", 120, 120), ("hold", 300, 0)]));

    // Released: nothing moves, and the hold is gone from the list.
    let (_, granted) = hold(&c, &a.alice, &a.bob, 50, 60).await;
    let released_id = granted["id"].as_str().expect("id").to_string();
    let release_path = format!("/transfers/{released_id}/release");
    let release = || c.post(&release_path, json!({}));
    let (code, released) = release().await;
    assert_eq!(
        (code, released["status"].clone(), released["amount"].clone()),
        (200, json!("released"), json!(50)),
        "{released}"
    );
    assert_eq!(release().await, (200, released), "the same release again");
    let (code, refused) = c.post(&format!("/transfers/{released_id}/capture"), json!({})).await;
    assert_eq!((code, refused["error"]["code"].clone()), (409, json!("hold_not_active")));
    assert_eq!(held_and_balance(&c, &a.alice).await, (880, 0));
    assert_eq!(held_and_balance(&c, &a.bob).await, (0, 0));
    assert_eq!(journal_of(&c, &a.alice, &released_id).await, owned(&[("release", 0, 880), ("hold", -50, 880)]));

    // Expired: released by itself at its time; a capture after it is refused.
    let (_, granted) = hold(&c, &a.alice, &a.shop, 10, 1).await;
    let expiring = granted["id"].as_str().expect("id").to_string();
    assert_eq!(held_and_balance(&c, &a.alice).await, (880, 10));
    wait_for_status(&c, &expiring, "expired", Duration::from_secs(10)).await;
    let (code, refused) = c.post(&format!("/transfers/{expiring}/capture"), json!({})).await;
    assert_eq!((code, refused["error"]["code"].clone()), (409, json!("hold_expired")), "{refused}");
    c.settle(&[&a.alice, &a.shop, &a.bob], SETTLE).await;
    assert_eq!(held_and_balance(&c, &a.alice).await, (880, 0));

    // A hold the balance cannot cover aborts like a transfer; a capture of all of it takes the default.
    let (code, refused) = hold(&c, &a.alice, &a.shop, 881, 60).await;
    assert_eq!(
        (code, refused["status"].clone(), refused["reason"].clone()),
        (422, json!("aborted"), json!("insufficient_funds"))
    );
    let (_, granted) = hold(&c, &a.alice, &a.shop, 80, 60).await;
    let whole = granted["id"].as_str().expect("id").to_string();
    let (code, captured) = c.post(&format!("/transfers/{whole}/capture"), json!({})).await;
    assert_eq!((code, captured["amount"].clone()), (200, json!(80)), "{captured}");
    let (_, listed) = c.get(&format!("/holds?account={}", a.alice)).await;
    assert_eq!(listed["holds"], json!([]), "no active hold is left");

    let (code, audit) = c.get("/audit").await;
    assert_eq!((code, audit["ok"].clone()), (200, json!(true)), "{audit}");
    assert_eq!(held_and_balance(&c, &a.alice).await.0 + c.balance(&a.shop).await + c.balance(&a.bob).await, 1_000);
}

#[tokio::test(flavor = "multi_thread")]
async fn every_bad_hold_request_gets_its_4xx() {
    let (c, a) = cluster("badhold").await;
    let (alice, shop) = (a.alice.as_str(), a.shop.as_str());
    let bad = [
        json!({"from": alice, "to": shop, "amount": 1, "hold": true, "expires_in_s": 0}),
        json!({"from": alice, "to": shop, "amount": 1, "hold": true, "expires_in_s": 2_592_001}),
        json!({"from": alice, "to": shop, "amount": 1, "hold": true, "expires_in_s": 1.5}),
        json!({"from": alice, "to": shop, "amount": 1, "expires_in_s": 60}),
        json!({"legs": [{"from": alice, "to": shop, "amount": 1}], "hold": true}),
        json!({"from": alice, "to": shop, "amount": 1, "hold": "yes"}),
    ];
    for body in bad {
        let (code, answer) = c.post("/transfers", body.clone()).await;
        assert_eq!((code, answer["error"]["code"].clone()), (400, json!("invalid_request")), "{body}: {answer}");
    }
    // The message of a limit names its own range and unit.
    for seconds in [json!(0), json!(-1), json!(2_592_001), json!(1.5)] {
        let body = json!({"from": alice, "to": shop, "amount": 1, "hold": true, "expires_in_s": seconds});
        let (_, answer) = c.post("/transfers", body).await;
        let expected = "expires_in_s must be a whole number from 1 to 2592000 (seconds)";
        assert_eq!(answer["error"]["message"], expected, "{seconds}: {answer}");
    }
    let (_, granted) = hold(&c, alice, shop, 100, 2_592_000).await;
    assert_eq!(granted["status"], "held", "the longest hold is accepted: {granted}");
    let id = granted["id"].as_str().expect("id");
    for (body, what) in [
        (json!({"amount": 0}), "zero"),
        (json!({"amount": 101}), "more than held"),
        (json!({"amount": "5"}), "a string"),
        (json!({"memo": 1}), "unknown field"),
    ] {
        let (code, answer) = c.post(&format!("/transfers/{id}/capture"), body).await;
        assert_eq!((code, answer["error"]["code"].clone()), (400, json!("invalid_request")), "{what}: {answer}");
    }
    let (_, answer) = c.post(&format!("/transfers/{id}/capture"), json!({"amount": 101})).await;
    let expected = "amount must be a whole number from 1 to 100, the held amount (minor units)";
    assert_eq!(answer["error"]["message"], expected, "{answer}");
    // A body that is not JSON is a 415 here as on every other route; no body at all is fine.
    for end in ["capture", "release"] {
        let form = c.http.post(c.api(&format!("/transfers/{id}/{end}")));
        let form = form.header("content-type", "application/x-www-form-urlencoded").body("amount=5");
        let form = form.send().await.expect("an answer");
        assert_eq!(form.status(), 415, "a form-encoded {end}");
        let answer: Value = form.json().await.expect("JSON");
        assert_eq!(answer["error"]["code"], "unsupported_media_type", "{answer}");
    }
    // A body over the limit is refused in the API's shape, naming the limit.
    let fresh = reqwest::Client::builder().pool_max_idle_per_host(0).build().expect("client");
    let big = format!("{{\"amount\":1,\"pad\":\"{}\"}}", "x".repeat(64 * 1024));
    let url = c.api(&format!("/transfers/{id}/capture"));
    let r = fresh.post(url).header("content-type", "application/json").body(big).send().await.expect("reply");
    assert_eq!(r.status(), 413);
    let answer: Value = r.json().await.expect("JSON");
    assert_eq!(answer["error"]["code"], "payload_too_large", "{answer}");
    let unknown = Uuid::new_v4();
    assert_eq!(c.post(&format!("/transfers/{unknown}/capture"), json!({})).await.0, 404);
    assert_eq!(c.post(&format!("/transfers/{unknown}/release"), json!({})).await.0, 404);
    assert_eq!(c.post("/transfers/not-a-uuid/release", json!({})).await.0, 400);
    let (_, plain) = c.post("/transfers", json!({"from": alice, "to": shop, "amount": 1})).await;
    let plain_id = plain["id"].as_str().expect("id");
    let (code, answer) = c.post(&format!("/transfers/{plain_id}/release"), json!({})).await;
    assert_eq!((code, answer["error"]["code"].clone()), (404, json!("hold_not_found")), "a transfer is not a hold");
    let (code, all) = c.get("/holds").await;
    assert_eq!((code, all["holds"][0]["id"].clone()), (200, json!(id)), "every account's holds: {all}");
    assert_eq!(c.get("/holds?account=bad%20id").await.0, 400);
    let (_, audit) = c.get("/audit").await;
    assert_eq!(
        (audit["ok"].clone(), audit["holds_active"].clone()),
        (json!(true), json!(1)),
        "a live hold is no violation: {audit}"
    );
    let released = c.http.post(c.api(&format!("/transfers/{id}/release"))).send().await.expect("an answer");
    assert_eq!(released.status(), 200, "a release with no body and no Content-Type");
    let answer: Value = released.json().await.expect("JSON");
    assert_eq!(answer["status"], "released", "{answer}");
}

#[tokio::test(flavor = "multi_thread")]
async fn holds_end_exactly_once_across_sigkills_and_expire_while_a_process_is_down() {
    let (mut c, a) = cluster("killhold").await;
    let accounts = [a.alice.as_str(), &a.shop, &a.bob];
    let id_of = |v: &Value| v["id"].as_str().expect("id").to_string();

    // Expiry while the coordinator is down: at once on its restart.
    let (_, early) = hold(&c, &a.alice, &a.shop, 100, 2).await;
    let (_, kept) = hold(&c, &a.alice, &a.bob, 200, 600).await;
    let (early, kept) = (id_of(&early), id_of(&kept));
    c.node("coordinator").kill();
    tokio::time::sleep(Duration::from_secs(3)).await;
    c.restart("coordinator", None).await;
    wait_for_status(&c, &early, "expired", Duration::from_secs(10)).await;
    assert_eq!(status(&c, &kept).await, "held", "a hold survives a SIGKILL of the coordinator");
    wait_for_books(&c, &a.alice, (1_000, 200)).await;

    // Expiry while the debited account's shard is down: delivered when it is back.
    let (_, lapsing) = hold(&c, &a.alice, &a.shop, 50, 2).await;
    let lapsing = id_of(&lapsing);
    c.node("p0").kill();
    wait_for_status(&c, &lapsing, "expired", Duration::from_secs(10)).await;
    c.restart("p0", None).await;
    wait_for_books(&c, &a.alice, (1_000, 200)).await;

    // A capture while the credited shard is down is durable at once and applied when it is back.
    c.node("p2").kill();
    let (code, captured) = c.post(&format!("/transfers/{kept}/capture"), json!({"amount": 150})).await;
    assert_eq!((code, captured["status"].clone()), (200, json!("captured")), "{captured}");
    c.restart("p2", None).await;
    c.settle(&accounts, SETTLE).await;
    assert_eq!(held_and_balance(&c, &a.bob).await, (150, 0));

    // A SIGKILL of the coordinator right after a capture answered, and of each shard right after a release.
    let (_, granted) = hold(&c, &a.alice, &a.shop, 30, 600).await;
    let granted = id_of(&granted);
    assert_eq!(c.post(&format!("/transfers/{granted}/capture"), json!({})).await.0, 200);
    c.restart("coordinator", None).await;
    for shard in ["p0", "p1"] {
        let (_, other) = hold(&c, &a.alice, &a.shop, 7, 600).await;
        let other = id_of(&other);
        assert_eq!(c.post(&format!("/transfers/{other}/release"), json!({})).await.0, 200);
        c.restart(shard, None).await;
        assert_eq!(status(&c, &other).await, "released");
    }
    c.settle(&accounts, SETTLE).await;
    assert_eq!(status(&c, &granted).await, "captured");
    assert_eq!(held_and_balance(&c, &a.alice).await, (1_000 - 150 - 30, 0));
    assert_eq!(held_and_balance(&c, &a.shop).await, (30, 0));
    let (code, audit) = c.get("/audit").await;
    assert_eq!((code, audit["ok"].clone()), (200, json!(true)), "{audit}");
}
