//! Scale: a long history costs a restarted participant no memory, yet every old id is still recognised,
//! with 10× the history as with 1×; and thousands of accounts opened straight in a shard's store are served
//! page by page and audited.

use crate::harness::*;
use loadgen::fill::{self, Fill};
use serde_json::{json, Value};
use std::time::Duration;

const ACCOUNTS_PER_SHARD: usize = 8;
const BALANCE: i64 = 1_000_000;
/// The first history; the second round adds nine times as much, so the cluster has seen 10×.
const HISTORY: u64 = 400;

async fn participant_stats(c: &Cluster, shard: usize) -> Value {
    let url = format!("{}/stats", c.participants[shard].url());
    c.http.get(url).send().await.expect("participant answers").json().await.expect("stats JSON")
}

async fn balances(c: &Cluster, accounts: &[Vec<String>]) -> Vec<i64> {
    let mut out = Vec::new();
    for id in accounts.iter().flatten() {
        out.push(c.balance(id).await);
    }
    out
}

/// Sends `transfers` more, lets the cluster settle, SIGKILLs and restarts p0 and the coordinator, and checks
/// that p0 holds nothing of its history while every sampled old id is still recognised.
async fn round(
    c: &mut Cluster,
    accounts: &[Vec<String>],
    transfers: u64,
    seed: u64,
    old: &mut Vec<(uuid::Uuid, Value)>,
) {
    let config = Fill { url: c.coordinator.url(), token: None, transfers, clients: 16, seed };
    let filled = fill::fill(&config, accounts).await.expect("fill runs");
    assert_eq!(filled.errors, 0, "no transfer failed while building history");
    assert!(filled.committed > transfers / 2, "most transfers commit: {filled:?}");
    old.extend(filled.sample);
    let names: Vec<&str> = accounts.iter().flatten().map(String::as_str).collect();
    c.settle(&names, Duration::from_secs(30)).await;
    // Every commit p0 applied is durable a moment after it was applied.
    tokio::time::sleep(Duration::from_millis(500)).await;

    c.restart("p0", None).await;
    c.restart("coordinator", None).await;
    c.settle(&names, Duration::from_secs(30)).await;
    let before = balances(c, accounts).await;

    // Replays of old transfers: the same body gets the same answer and moves nothing; another body is refused.
    for (id, body) in old.iter() {
        let (status, reply) = c.post("/transfers", body.clone()).await;
        assert_eq!((status, reply["status"].as_str()), (200, Some("committed")), "replay of {id}: {reply}");
        let mut other = body.clone();
        other["amount"] = json!(2);
        let (status, reply) = c.post("/transfers", other).await;
        assert_eq!(status, 409, "another body under old id {id}: {reply}");
    }
    c.settle(&names, Duration::from_secs(30)).await;
    assert_eq!(balances(c, accounts).await, before, "replays moved no money");

    let stats = participant_stats(c, 0).await;
    let mem = &stats["in_memory"];
    assert_eq!(mem["accounts"].as_u64(), Some(accounts[0].len() as u64), "{stats}");
    assert_eq!(mem["prepared"].as_u64(), Some(0), "{stats}");
    // Nothing of the history was read back at restart, and recognising old ids read the store, not memory.
    assert_eq!(mem["finished"].as_u64(), Some(0), "p0 holds no finished transfer after its restart: {stats}");
    assert_eq!(mem["recent_commits"].as_u64(), Some(0), "{stats}");
    // The restart's checkpoint wrote p0's history (a finished record and a journal entry per transfer) to run
    // files, which is where the old ids above were found.
    let in_runs = stats["history_runs"]["entries"].as_u64().unwrap_or(0);
    assert!(in_runs >= old.len() as u64, "p0's history is in its run files: {stats}");
    // The coordinator, once the cluster is quiet, holds nothing of any transfer.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, stats) = c.get("/stats").await;
        let m = &stats["in_memory"];
        let counts: Vec<u64> = ["running", "owed", "unlogged", "log_owed", "waiting_clients"]
            .iter()
            .map(|k| m[*k].as_u64().unwrap_or(u64::MAX))
            .collect();
        if counts.iter().all(|n| *n == 0) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the quiet coordinator still holds transfers: {stats}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The shard that was not restarted holds at most its bound, whatever the history.
    let other = participant_stats(c, 1).await;
    let (held, bound) = (other["in_memory"]["finished"].as_u64(), other["in_memory"]["finished_max"].as_u64());
    assert!(held.zip(bound).is_some_and(|(h, b)| h <= b), "p1 keeps at most its bound: {other}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_times_the_history_costs_a_restarted_node_no_memory_and_old_ids_stay_known() {
    let mut c = Cluster::start_with(Options { log_filter: "warn".into(), ..Options::default() }).await;
    let accounts = fill::pick_accounts("hist", 2, ACCOUNTS_PER_SHARD).expect("ids");
    fill::create_accounts(&c.http, &c.coordinator.url(), None, &accounts, BALANCE, false).await.expect("accounts");
    let mut old = Vec::new();
    round(&mut c, &accounts, HISTORY, 1, &mut old).await;
    round(&mut c, &accounts, 9 * HISTORY, 2, &mut old).await;

    let total: i64 = balances(&c, &accounts).await.iter().sum();
    assert_eq!(total, BALANCE * 2 * ACCOUNTS_PER_SHARD as i64, "money is conserved");
}

/// Accounts opened straight in a stopped shard's store (`ledger-fill accounts`) are served like any other:
/// listed page by page in id order, readable, counted by the audit, and usable at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_accounts_opened_offline_are_paged_read_and_audited() {
    const CANDIDATES: u64 = 6_000;
    const BALANCE: i64 = 500;
    let mut c = Cluster::start_with(Options { log_filter: "warn".into(), ..Options::default() }).await;
    c.node("p0").kill();
    let fill = loadgen::cluster::bin_dir().join("ledger-fill");
    let data = c.data_dir().join("p0");
    let run = |args: &[&str]| std::process::Command::new(&fill).args(args).output().expect("ledger-fill runs");
    let data_arg = data.display().to_string();
    let count = CANDIDATES.to_string();
    let args =
        ["accounts", "--data", &data_arg, "--shard", "0", "--count", &count, "--prefix", "bulk", "--balance", "500"];
    let out = run(&args);
    assert!(out.status.success(), "ledger-fill accounts: {}", String::from_utf8_lossy(&out.stderr));
    let again = run(&args);
    let said = String::from_utf8_lossy(&again.stdout).to_string();
    assert!(again.status.success() && said.contains(" 0 accounts opened"), "a second run opens nothing: {said}");
    c.node("p0").spawn(None);
    let url = c.participants[0].url();
    c.wait_ready(&url).await;

    // Every account of shard 0 among the candidates, in order, page by page.
    let expected: Vec<String> = (0..CANDIDATES).map(|i| format!("bulk-{i:07}")).filter(|id| shard(id) == 0).collect();
    let mut listed = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let cursor = after.as_ref().map(|a| format!("&after={a}")).unwrap_or_default();
        let (status, page) = c.get(&format!("/accounts?limit=1000{cursor}")).await;
        assert_eq!(status, 200, "{page}");
        for a in page["accounts"].as_array().expect("accounts") {
            listed.push(a["id"].as_str().expect("id").to_owned());
            assert_eq!(a["balance"], json!(BALANCE), "{a}");
        }
        match page["next"].as_str() {
            Some(next) => after = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(listed, expected, "every account opened offline is listed once, in id order");

    let (status, audit) = c.get("/audit").await;
    assert_eq!(status, 200, "{audit}");
    let created = BALANCE as u64 * expected.len() as u64;
    assert_eq!(audit["ok"], json!(true), "{audit}");
    assert_eq!(audit["created_total"].as_u64(), Some(created), "{audit}");

    // Usable at once: a transfer from one of them to an account on the other shard.
    let to = shard_1_account();
    c.create_account(&to, 0).await;
    let (status, reply) = c.post("/transfers", json!({"from": expected[0], "to": to, "amount": 200})).await;
    assert_eq!((status, reply["status"].as_str()), (200, Some("committed")), "{reply}");
    assert_eq!(c.balance(&expected[0]).await, BALANCE - 200);
}

fn shard(id: &str) -> u32 {
    common::ledger::shard_of(&common::ledger::AccountId::new(id).expect("valid id"), 2)
}

fn shard_1_account() -> String {
    (0..).map(|i| format!("offline-{i}")).find(|id| shard(id) == 1).expect("some id lands on shard 1")
}
