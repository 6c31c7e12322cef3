//! A real network partition in the middle of load. One participant runs in its own network namespace behind
//! a veth pair; the test takes the host's end of the link down for a few seconds while clients keep moving
//! money, then brings it back. A link that is down drops packets silently (no RST, no FIN), so only the
//! stream's own heartbeats and silence timeout can notice. Meanwhile every transfer must end committed or
//! aborted with 503; after the link returns, transfers through that shard commit again, and once the cluster
//! settles the money is exactly conserved with no funds left held.
//!
//! Needs root and iproute2's `ip` (`scripts/deps.sh` installs it when missing).

use crate::harness::{cross_shard_pair, free_port, Cluster, Options};
use serde_json::{json, Value};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Load before the cut, the cut itself, and load after the link is back.
const BEFORE_CUT: Duration = Duration::from_secs(2);
const CUT: Duration = Duration::from_secs(4);
const AFTER_CUT: Duration = Duration::from_secs(4);
const CLIENTS: usize = 8;
const OPENING_BALANCE: i64 = 1_000_000;

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("cannot run `ip` ({e}): scripts/deps.sh"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// A network namespace joined to the host by a veth pair; removed on drop.
struct Namespace {
    name: String,
    host_link: String,
    host_ip: String,
    inner_ip: String,
}

impl Namespace {
    fn create() -> Namespace {
        let n = std::process::id() % 200 + 20;
        let ns = Namespace {
            name: format!("ledger-part-{n}"),
            host_link: format!("lgp{n}h"),
            host_ip: format!("10.213.{n}.1"),
            inner_ip: format!("10.213.{n}.2"),
        };
        let inner_link = format!("lgp{n}i");
        // Leftovers of an earlier run that was killed would make the names clash.
        let _ = ip(&["link", "del", &ns.host_link]);
        let _ = ip(&["netns", "del", &ns.name]);
        let steps: Vec<Vec<String>> = vec![
            vec!["netns".into(), "add".into(), ns.name.clone()],
            vec![
                "link".into(),
                "add".into(),
                ns.host_link.clone(),
                "type".into(),
                "veth".into(),
                "peer".into(),
                "name".into(),
                inner_link.clone(),
            ],
            vec!["link".into(), "set".into(), inner_link.clone(), "netns".into(), ns.name.clone()],
            vec!["addr".into(), "add".into(), format!("{}/24", ns.host_ip), "dev".into(), ns.host_link.clone()],
            vec!["link".into(), "set".into(), ns.host_link.clone(), "up".into()],
            vec![
                "netns".into(),
                "exec".into(),
                ns.name.clone(),
                "ip".into(),
                "addr".into(),
                "add".into(),
                format!("{}/24", ns.inner_ip),
                "dev".into(),
                inner_link.clone(),
            ],
            vec![
                "netns".into(),
                "exec".into(),
                ns.name.clone(),
                "ip".into(),
                "link".into(),
                "set".into(),
                inner_link.clone(),
                "up".into(),
            ],
            vec![
                "netns".into(),
                "exec".into(),
                ns.name.clone(),
                "ip".into(),
                "link".into(),
                "set".into(),
                "lo".into(),
                "up".into(),
            ],
        ];
        for step in steps {
            let args: Vec<&str> = step.iter().map(String::as_str).collect();
            ip(&args).unwrap_or_else(|e| panic!("cannot build the test network (needs root and iproute2): {e}"));
        }
        ns
    }

    fn link(&self, up: bool) {
        ip(&["link", "set", &self.host_link, if up { "up" } else { "down" }]).expect("toggle the veth link");
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.host_link]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// What the clients saw, by phase.
#[derive(Default)]
struct Seen {
    committed: [AtomicU64; 3],
    unavailable: [AtomicU64; 3],
}

#[tokio::test(flavor = "multi_thread")]
async fn a_participant_cut_off_mid_load_aborts_or_completes_and_the_stream_recovers() {
    let ns = Namespace::create();
    let (p0_port, p1_port, c_port) = (free_port(), free_port(), free_port());
    // The coordinator listens on the host's end of the veth, which the shard inside the namespace can reach.
    let addresses = (
        format!("{}:{c_port}", ns.host_ip),
        vec![format!("127.0.0.1:{p0_port}"), format!("{}:{p1_port}", ns.inner_ip)],
    );
    let options = Options { addresses: Some(addresses), ..Options::default() };
    let c = Cluster::start_adjusted(options, |nodes| {
        nodes[1].prefix = ["ip", "netns", "exec", &ns.name].map(String::from).to_vec();
        nodes[2].set_flag("--prepare-timeout-ms", "500");
    })
    .await;
    let c_url = c.coordinator.url();
    let http = reqwest::Client::builder().timeout(Duration::from_secs(20)).build().expect("client");

    let (alice, bob) = cross_shard_pair("partition");
    for id in [&alice, &bob] {
        c.create_account(id, OPENING_BALANCE).await;
    }

    let started = Instant::now();
    let phase = move || {
        let t = started.elapsed();
        if t < BEFORE_CUT {
            0
        } else if t < BEFORE_CUT + CUT {
            1
        } else {
            2
        }
    };
    let seen = Arc::new(Seen::default());
    let end = BEFORE_CUT + CUT + AFTER_CUT;
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let (http, url, seen) = (http.clone(), c_url.clone(), seen.clone());
            let (from, to) = if i % 2 == 0 { (alice.clone(), bob.clone()) } else { (bob.clone(), alice.clone()) };
            tokio::spawn(async move {
                while started.elapsed() < end {
                    let body = json!({"from": from, "to": to, "amount": 1 + (i as i64)});
                    let asked_in = phase();
                    let r = http.post(format!("{url}/transfers")).json(&body).send().await.expect("an answer");
                    let status = r.status().as_u16();
                    let reply: Value = r.json().await.unwrap_or(Value::Null);
                    match (status, reply["status"].as_str()) {
                        (200, Some("committed")) => drop(seen.committed[asked_in].fetch_add(1, Relaxed)),
                        (503, Some("aborted")) if reply["reason"] == "participant_unavailable" => {
                            seen.unavailable[asked_in].fetch_add(1, Relaxed);
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        other => panic!("a transfer ended neither committed nor 503 unavailable: {other:?} {reply}"),
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(BEFORE_CUT).await;
    ns.link(false);
    tokio::time::sleep(CUT).await;
    ns.link(true);
    for client in clients {
        client.await.expect("client task");
    }

    let count = |a: &[AtomicU64; 3], p: usize| a[p].load(Relaxed);
    let by_phase = |a: &[AtomicU64; 3]| [count(a, 0), count(a, 1), count(a, 2)];
    eprintln!(
        "partition: committed before/during/after the cut {:?}, aborted 503 {:?}",
        by_phase(&seen.committed),
        by_phase(&seen.unavailable)
    );
    assert!(count(&seen.committed, 0) > 0, "transfers committed before the cut");
    assert!(count(&seen.unavailable, 1) > 0, "transfers asked during the cut aborted with 503");
    assert!(count(&seen.committed, 2) > 0, "transfers committed again once the link was back");
    let log = std::fs::read_to_string(c.data_dir().join("coordinator.log")).expect("coordinator log");
    assert!(
        log.contains("stream to participant down shard=1"),
        "the coordinator noticed the silent link by its own timeout"
    );

    // Settle: no decision unacknowledged, no holds, and the money where it started in total.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let doubt: Value = http
            .get(format!("{c_url}/transactions?status=unacknowledged"))
            .send()
            .await
            .expect("answer")
            .json()
            .await
            .expect("json");
        let mut total = 0;
        let mut held = 0;
        for id in [&alice, &bob] {
            let a: Value =
                http.get(format!("{c_url}/accounts/{id}")).send().await.expect("answer").json().await.expect("json");
            total += a["balance"].as_i64().unwrap_or(0);
            held += a["held"].as_i64().unwrap_or(-1);
        }
        if doubt["transactions"].as_array().is_some_and(|t| t.is_empty()) && held == 0 {
            assert_eq!(total, 2 * OPENING_BALANCE, "money conserved across the partition");
            break;
        }
        assert!(Instant::now() < deadline, "the cluster did not settle: unacknowledged {doubt}, held {held}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
