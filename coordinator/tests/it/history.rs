//! A long history costs a node no memory: after a SIGKILL and restart, a participant holds nothing of the
//! transfers it finished, yet every old id is still recognised, with 10× the history as with 1×.

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
async fn round(c: &mut Cluster, accounts: &[Vec<String>], transfers: u64, seed: u64, old: &mut Vec<(uuid::Uuid, Value)>) {
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
