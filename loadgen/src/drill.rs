//! The kill-and-restart drill: a bank workload against a real cluster while a nemesis SIGKILLs, restarts, and
//! SIGSTOPs / SIGCONTs processes; afterwards it heals the cluster, waits for every transfer to settle, and checks
//! the books. In the style of Jepsen's bank test, but stricter: every transfer's fate is checked, not only the
//! total.
//!
//! One request in four is a batch of a few transfers (`POST /transfers/batch`), each item checked like a
//! single transfer. One transfer in five has 2 to 4 legs (a payment with fees, a split), over any accounts.
//! One single request in ten is a hold of 1 to 4 seconds, which the client then captures (all or part),
//! releases, or leaves to expire; the check requires every hold to have ended once, as its client was told.
//!
//! Checks: every acknowledged commit is committed and every acknowledged abort aborted; every transfer ends
//! committed or aborted (404 only for ids that never got an answer); each shard applied each committed transfer
//! and nothing else; final balances equal initial balances plus committed transfers; the total is conserved;
//! no balance is negative; no funds stay held.

use crate::cluster::{Cluster, Options};
use common::ledger::{shard_of, AccountId};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Each account starts with this much, so most transfers can commit but some run out.
const INITIAL_BALANCE: i64 = 10_000;
/// Largest transfer amount.
const AMOUNT_MAX: u64 = 2_000;
/// One request's timeout: past it the outcome is unknown and the client retries with the same id.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(4);
/// Attempts per transfer before the client gives up and leaves it unknown.
const ATTEMPTS_MAX: u32 = 20;
/// One request in this many is a batch (`POST /transfers/batch`) rather than a single transfer.
const BATCH_ONE_IN: u64 = 4;
/// A batch carries 2 to this many transfers: small, so a kill often lands while one is being decided.
const BATCH_ITEMS_MAX: u64 = 8;
/// One transfer in this many has several legs.
const LEGS_ONE_IN: u64 = 5;
/// A transfer of several legs has 2 to this many.
const LEGS_MAX: u64 = 4;
/// One single request in this many is a hold.
const HOLD_ONE_IN: u64 = 10;
/// A hold lasts 1 to this many seconds: short, so many expire during a run, some while a process is down.
const HOLD_SECONDS_MAX: u64 = 4;
/// Largest hold: smaller than a transfer, since holds pile up while they last, and with the amounts of
/// transfers they would hold most of the money and leave transfers mostly refused.
const HOLD_AMOUNT_MAX: u64 = 200;
/// How long the healed cluster gets to settle every transfer.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(90);

#[derive(Clone, Debug)]
pub struct Config {
    pub participants: usize,
    pub clients: usize,
    pub accounts: usize,
    pub duration: Duration,
    pub seed: u64,
    /// Mean time between nemesis actions.
    pub nemesis_interval: Duration,
    /// Print a progress line to stderr every this often.
    pub progress_every: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            participants: 2,
            clients: 16,
            accounts: 16,
            duration: Duration::from_secs(30),
            seed: 1,
            nemesis_interval: Duration::from_secs(3),
            progress_every: Duration::from_secs(2),
        }
    }
}

#[derive(Debug, Default)]
pub struct Report {
    pub transfers: usize,
    pub committed: usize,
    pub aborted: usize,
    pub unknown: usize,
    /// Holds granted, and how they ended.
    pub holds: usize,
    pub captured: usize,
    pub released: usize,
    pub expired: usize,
    pub kills: u64,
    pub pauses: u64,
    pub violations: Vec<String>,
}

impl Report {
    pub fn summary(&self, seed: u64) -> String {
        format!(
            "drill: seed={seed} transfers={} committed={} aborted={} unknown={} holds={} captured={} released={} \
             expired={} kills={} pauses={} violations={}",
            self.transfers,
            self.committed,
            self.aborted,
            self.unknown,
            self.holds,
            self.captured,
            self.released,
            self.expired,
            self.kills,
            self.pauses,
            self.violations.len()
        )
    }
}

/// The harnesses' one seeded generator: the drill needs reproducible choices, not cryptography.
pub use protocol::rng::SplitMix64 as Rng;

/// A duration from `min_ms` to `max_ms`, drawn from `rng`.
pub fn duration_ms(rng: &mut Rng, min_ms: u64, max_ms: u64) -> Duration {
    Duration::from_millis(rng.range(min_ms, max_ms))
}

/// What a client learnt about one transfer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    Committed,
    Aborted,
    Unknown,
    /// A hold, granted.
    Held,
}

/// What a client learnt when it ended a hold.
#[derive(Clone, Debug, PartialEq, Eq)]
enum EndAnswer {
    Captured(i64),
    Released,
    /// A 4xx error code (`hold_expired`, `hold_not_active`).
    Refused(String),
    Unknown,
}

/// One movement of a transfer: (from, to, amount).
type Leg = (String, String, i64);

struct Attempted {
    legs: Vec<Leg>,
    answer: Answer,
    /// For a hold: its seconds, and what its client heard when it tried to end it (if it did).
    hold: Option<(u64, Option<EndAnswer>)>,
}

/// The legs a transfer's answer shows: `legs`, or `from`, `to` and `amount` for one.
fn shown_legs(body: &Value) -> Option<Vec<Leg>> {
    let leg = |v: &Value| Some((v["from"].as_str()?.to_string(), v["to"].as_str()?.to_string(), v["amount"].as_i64()?));
    match body.get("legs") {
        Some(legs) => legs.as_array()?.iter().map(leg).collect(),
        None => Some(vec![leg(body)?]),
    }
}

/// Ends the granted hold `id` as a client would: after a while, a capture of all or part of it, a release, or
/// nothing (it expires). Retries an unknown outcome with the same request.
async fn end_hold(http: &reqwest::Client, base: &str, id: &str, amount: i64, rng: &mut Rng) -> Option<EndAnswer> {
    let (path, body) = match rng.below(4) {
        0 => ("capture", json!({})),
        1 => ("capture", json!({"amount": 1 + rng.below(amount as u64) as i64})),
        2 => ("release", json!({})),
        _ => return None,
    };
    tokio::time::sleep(duration_ms(rng, 0, HOLD_SECONDS_MAX * 1_000)).await;
    for attempt in 0..ATTEMPTS_MAX {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt.min(10)))).await;
        }
        let Ok(reply) = http.post(format!("{base}/transfers/{id}/{path}")).json(&body).send().await else { continue };
        let status = reply.status().as_u16();
        let Ok(reply) = reply.json::<Value>().await else { continue };
        match (status, reply["status"].as_str(), reply["error"]["code"].as_str()) {
            (200, Some("captured"), _) => return Some(EndAnswer::Captured(reply["amount"].as_i64().unwrap_or(0))),
            (200, Some("released"), _) => return Some(EndAnswer::Released),
            (409, _, Some(code)) => return Some(EndAnswer::Refused(code.to_string())),
            _ => continue,
        }
    }
    Some(EndAnswer::Unknown)
}

/// The body `POST /transfers` takes for these legs: the two-account form for one.
fn transfer_body(id: &str, legs: &[Leg]) -> Value {
    match legs {
        [(from, to, amount)] => json!({"from": from, "to": to, "amount": amount, "id": id}),
        _ => {
            let legs: Vec<Value> =
                legs.iter().map(|(from, to, amount)| json!({"from": from, "to": to, "amount": amount})).collect();
            json!({"legs": legs, "id": id})
        }
    }
}

#[derive(Default)]
struct Counters {
    committed: AtomicU64,
    holds: AtomicU64,
    aborted: AtomicU64,
    unknown: AtomicU64,
    kills: AtomicU64,
    pauses: AtomicU64,
}

pub async fn run(config: Config) -> Report {
    let options = Options { participants: config.participants, log_filter: "warn".into(), ..Options::default() };
    let mut cluster = Cluster::start_with(options).await;
    let accounts: Vec<String> = (0..config.accounts).map(|i| format!("acct{i:03}")).collect();
    for a in &accounts {
        cluster.create_account(a, INITIAL_BALANCE).await;
    }
    let http = reqwest::Client::builder().timeout(REQUEST_TIMEOUT).build().expect("http client");
    let base = cluster.coordinator.url();
    let counters = Arc::new(Counters::default());
    let ledger: Arc<Mutex<BTreeMap<String, Attempted>>> = Arc::default();
    let deadline = Instant::now() + config.duration;

    let clients: Vec<_> = (0..config.clients)
        .map(|c| {
            let (http, base, accounts) = (http.clone(), base.clone(), accounts.clone());
            let (counters, ledger) = (counters.clone(), ledger.clone());
            let mut rng = Rng::new(config.seed.wrapping_mul(1_000_003).wrapping_add(c as u64 + 1));
            tokio::spawn(async move {
                // Holds being ended, each on its own task so that the client goes on meanwhile.
                let mut ending: Vec<tokio::task::JoinHandle<()>> = Vec::new();
                while Instant::now() < deadline {
                    if rng.below(HOLD_ONE_IN) == 0 {
                        let from = accounts[rng.below(accounts.len() as u64) as usize].clone();
                        let mut to = from.clone();
                        while to == from {
                            to = accounts[rng.below(accounts.len() as u64) as usize].clone();
                        }
                        let amount = 1 + rng.below(HOLD_AMOUNT_MAX) as i64;
                        let seconds = 1 + rng.below(HOLD_SECONDS_MAX);
                        let id = uuid::Uuid::from_u64_pair(rng.next_u64(), rng.next_u64()).to_string();
                        let mut body = transfer_body(&id, &[(from.clone(), to.clone(), amount)]);
                        body["hold"] = json!(true);
                        body["expires_in_s"] = json!(seconds);
                        let answer = submit(&http, &base, &body).await;
                        let counter = match answer {
                            Answer::Held | Answer::Committed => &counters.holds,
                            Answer::Aborted => &counters.aborted,
                            Answer::Unknown => &counters.unknown,
                        };
                        counter.fetch_add(1, Ordering::Relaxed);
                        let (http, base, ledger) = (http.clone(), base.clone(), ledger.clone());
                        let mut end_rng = Rng::new(rng.next_u64());
                        ending.retain(|task| !task.is_finished());
                        ending.push(tokio::spawn(async move {
                            let ended = match answer {
                                Answer::Held => end_hold(&http, &base, &id, amount, &mut end_rng).await,
                                _ => None,
                            };
                            let attempted =
                                Attempted { legs: vec![(from, to, amount)], answer, hold: Some((seconds, ended)) };
                            ledger.lock().expect("ledger lock").insert(id, attempted);
                        }));
                        continue;
                    }
                    let batch = rng.below(BATCH_ONE_IN) == 0;
                    let items = if batch { 2 + rng.below(BATCH_ITEMS_MAX - 1) } else { 1 };
                    let mut bodies: Vec<(String, Vec<Leg>)> = Vec::new();
                    for _ in 0..items {
                        let leg_count = if rng.below(LEGS_ONE_IN) == 0 { 2 + rng.below(LEGS_MAX - 1) } else { 1 };
                        let legs = (0..leg_count)
                            .map(|_| {
                                let from = accounts[rng.below(accounts.len() as u64) as usize].clone();
                                let mut to = from.clone();
                                while to == from {
                                    to = accounts[rng.below(accounts.len() as u64) as usize].clone();
                                }
                                (from, to, 1 + rng.below(AMOUNT_MAX) as i64)
                            })
                            .collect();
                        let id = uuid::Uuid::from_u64_pair(rng.next_u64(), rng.next_u64()).to_string();
                        bodies.push((id, legs));
                    }
                    let json_of = |(id, legs): &(String, Vec<Leg>)| transfer_body(id, legs);
                    let answers = if batch {
                        submit_batch(&http, &base, bodies.iter().map(json_of).collect()).await
                    } else {
                        vec![submit(&http, &base, &json_of(&bodies[0])).await]
                    };
                    let mut ledger = ledger.lock().expect("ledger lock");
                    for ((id, legs), answer) in bodies.into_iter().zip(answers) {
                        let counter = match answer {
                            Answer::Committed | Answer::Held => &counters.committed,
                            Answer::Aborted => &counters.aborted,
                            Answer::Unknown => &counters.unknown,
                        };
                        counter.fetch_add(1, Ordering::Relaxed);
                        ledger.insert(id, Attempted { legs, answer, hold: None });
                    }
                }
                for task in ending {
                    let _ = task.await;
                }
            })
        })
        .collect();

    let started = Instant::now();
    let mut rng = Rng::new(config.seed);
    let mut next_progress = Instant::now() + config.progress_every;
    while Instant::now() < deadline {
        let wait = duration_ms(
            &mut rng,
            config.nemesis_interval.as_millis() as u64 / 2,
            config.nemesis_interval.as_millis() as u64 * 3 / 2,
        );
        let wake = (Instant::now() + wait).min(deadline);
        while Instant::now() < wake {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if Instant::now() >= next_progress {
                next_progress = Instant::now() + config.progress_every;
                eprintln!(
                    "drill: {:>4}s committed={} holds={} aborted={} unknown={} kills={} pauses={}",
                    started.elapsed().as_secs(),
                    counters.committed.load(Ordering::Relaxed),
                    counters.holds.load(Ordering::Relaxed),
                    counters.aborted.load(Ordering::Relaxed),
                    counters.unknown.load(Ordering::Relaxed),
                    counters.kills.load(Ordering::Relaxed),
                    counters.pauses.load(Ordering::Relaxed),
                );
            }
        }
        if Instant::now() >= deadline {
            break;
        }
        nemesis_step(&mut cluster, &mut rng, &counters).await;
    }
    for c in clients {
        let _ = c.await;
    }

    // Heal: every process running and none paused.
    let names: Vec<String> =
        std::iter::once("coordinator".to_string()).chain((0..config.participants).map(|i| format!("p{i}"))).collect();
    for name in &names {
        let node = cluster.node(name);
        if let Some(pid) = node.pid() {
            signal(pid, libc::SIGCONT);
        }
        if !node.is_running() {
            cluster.restart(name, None).await;
        }
    }
    let account_refs: Vec<&str> = accounts.iter().map(String::as_str).collect();
    cluster.settle(&account_refs, SETTLE_TIMEOUT).await;

    let ledger = std::mem::take(&mut *ledger.lock().expect("ledger lock"));
    let mut report = Report {
        transfers: ledger.len(),
        kills: counters.kills.load(Ordering::Relaxed),
        pauses: counters.pauses.load(Ordering::Relaxed),
        ..Report::default()
    };
    check(&cluster, &accounts, &ledger, &mut report).await;
    report
}

/// Submits one transfer, retrying an unknown outcome with the same id.
async fn submit(http: &reqwest::Client, base: &str, body: &Value) -> Answer {
    for attempt in 0..ATTEMPTS_MAX {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt.min(10)))).await;
        }
        let Ok(reply) = http.post(format!("{base}/transfers")).json(body).send().await else { continue };
        let status = reply.status().as_u16();
        let Ok(reply) = reply.json::<Value>().await else { continue };
        match (status, reply["status"].as_str()) {
            (200, Some("committed")) => return Answer::Committed,
            (200, Some("held")) => return Answer::Held,
            (_, Some("aborted")) => return Answer::Aborted,
            _ => continue, // overloaded or storage trouble: no final answer yet
        }
    }
    Answer::Unknown
}

/// Submits a batch, sending the items with no final answer again (same ids) until each has one.
async fn submit_batch(http: &reqwest::Client, base: &str, items: Vec<Value>) -> Vec<Answer> {
    let mut answers = vec![Answer::Unknown; items.len()];
    for attempt in 0..ATTEMPTS_MAX {
        let open: Vec<usize> = (0..items.len()).filter(|i| answers[*i] == Answer::Unknown).collect();
        if open.is_empty() {
            break;
        }
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt.min(10)))).await;
        }
        let body = json!({"transfers": open.iter().map(|i| items[*i].clone()).collect::<Vec<_>>()});
        let Ok(reply) = http.post(format!("{base}/transfers/batch")).json(&body).send().await else { continue };
        if reply.status() != 200 {
            continue;
        }
        let Ok(reply) = reply.json::<Value>().await else { continue };
        let results = reply["results"].as_array().map(Vec::as_slice).unwrap_or_default();
        for (i, result) in open.iter().zip(results) {
            answers[*i] = match (result["code"].as_u64(), result["status"].as_str()) {
                (Some(200), Some("committed")) => Answer::Committed,
                (_, Some("aborted")) => Answer::Aborted,
                _ => Answer::Unknown, // overloaded or storage trouble: no final answer yet
            };
        }
    }
    answers
}

async fn nemesis_step(cluster: &mut Cluster, rng: &mut Rng, counters: &Counters) {
    let participants = cluster.participants.len() as u64;
    let victim = match rng.below(participants + 1) {
        0 => "coordinator".to_string(),
        n => format!("p{}", n - 1),
    };
    if rng.below(3) == 0 {
        let Some(pid) = cluster.node(&victim).pid() else { return };
        let pause = duration_ms(rng, 300, 2_500);
        eprintln!("drill: nemesis pauses {victim} for {}ms", pause.as_millis());
        signal(pid, libc::SIGSTOP);
        tokio::time::sleep(pause).await;
        signal(pid, libc::SIGCONT);
        counters.pauses.fetch_add(1, Ordering::Relaxed);
    } else {
        let down = duration_ms(rng, 100, 2_000);
        eprintln!("drill: nemesis kills {victim}, restarts it after {}ms", down.as_millis());
        cluster.node(&victim).kill();
        counters.kills.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(down).await;
        cluster.restart(&victim, None).await;
    }
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill has no memory-safety preconditions; the pid is a child of this process.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// Checks one hold after the heal: it ended (none is still held), once, as its client was told. Returns the
/// amount it moved, if it was captured.
fn check_hold(
    id: &str,
    answer: Answer,
    ended: Option<&EndAnswer>,
    status: u16,
    body: &Value,
    report: &mut Report,
) -> Option<i64> {
    let now = match (status, body["status"].as_str()) {
        (404, _) => "unknown",
        (200, Some(now)) => now,
        _ => {
            report.violations.push(format!("hold {id}: unexpected GET answer {status} {body}"));
            return None;
        }
    };
    match now {
        "captured" => report.captured += 1,
        "released" => report.released += 1,
        "expired" => report.expired += 1,
        "aborted" => report.aborted += 1,
        "unknown" => report.unknown += 1,
        other => report.violations.push(format!("hold {id} is still {other} after the heal: {body}")),
    }
    report.holds += usize::from(matches!(now, "captured" | "released" | "expired"));
    let as_told = matches!(
        (answer, now),
        (Answer::Held, "captured" | "released" | "expired") | (Answer::Aborted, "aborted") | (Answer::Unknown, _)
    );
    if !as_told {
        report.violations.push(format!("hold {id}: its client was told {answer:?}, now {body}"));
    }
    let captured = (now == "captured").then(|| body["amount"].as_i64().unwrap_or(0));
    let end_as_told = match ended {
        Some(EndAnswer::Captured(amount)) => captured == Some(*amount),
        Some(EndAnswer::Released) => now == "released",
        Some(EndAnswer::Refused(code)) if code == "hold_expired" => now == "expired",
        Some(EndAnswer::Refused(_) | EndAnswer::Unknown) | None => true,
    };
    if !end_as_told {
        report.violations.push(format!("hold {id}: its end was answered {ended:?}, now {body}"));
    }
    captured
}

async fn check(cluster: &Cluster, accounts: &[String], ledger: &BTreeMap<String, Attempted>, report: &mut Report) {
    let shard_count = cluster.participants.len() as u32;
    let shard = |a: &str| shard_of(&AccountId::new(a).expect("drill account ids are valid"), shard_count) as usize;
    let mut applied: Vec<HashMap<String, String>> = Vec::new();
    for s in 0..cluster.participants.len() {
        let list = cluster.applied(s).await;
        let mut by_id = HashMap::new();
        for entry in list {
            let id = entry["id"].as_str().unwrap_or_default().to_string();
            let decision = entry["decision"].as_str().unwrap_or_default().to_string();
            if by_id.insert(id.clone(), decision).is_some() {
                report.violations.push(format!("shard {s} lists transfer {id} twice"));
            }
        }
        applied.push(by_id);
    }

    let mut expected: HashMap<&str, i64> = accounts.iter().map(|a| (a.as_str(), INITIAL_BALANCE)).collect();
    let mut committed_ids: HashSet<&str> = HashSet::new();
    for (id, t) in ledger {
        let (status, body) = cluster.get(&format!("/transfers/{id}")).await;
        if let Some((_, ended)) = &t.hold {
            let moved = check_hold(id, t.answer, ended.as_ref(), status, &body, report);
            let shards: HashSet<usize> = t.legs.iter().flat_map(|(from, to, _)| [shard(from), shard(to)]).collect();
            for (s, by_id) in applied.iter().enumerate() {
                let here = by_id.get(id.as_str()).map(String::as_str);
                let ok = if moved.is_some() {
                    !shards.contains(&s) || here == Some("commit")
                } else {
                    here != Some("commit")
                };
                if !ok {
                    report.violations.push(format!("hold {id} (moved {moved:?}): shard {s} shows {here:?}"));
                }
            }
            if let (Some(amount), [(from, to, _)]) = (moved, t.legs.as_slice()) {
                committed_ids.insert(id);
                *expected.get_mut(from.as_str()).expect("known account") -= amount;
                *expected.get_mut(to.as_str()).expect("known account") += amount;
            }
            continue;
        }
        let final_status = match (status, body["status"].as_str()) {
            (200, Some("committed")) => Answer::Committed,
            (200, Some("aborted")) => Answer::Aborted,
            (404, _) => Answer::Unknown,
            _ => {
                report.violations.push(format!("transfer {id}: unexpected GET answer {status} {body}"));
                continue;
            }
        };
        match (t.answer, final_status) {
            (Answer::Committed, Answer::Committed) | (Answer::Aborted, Answer::Aborted) => {}
            (Answer::Unknown, _) => {}
            (told, now) => report.violations.push(format!("transfer {id}: client was told {told:?}, now {now:?}")),
        }
        match final_status {
            Answer::Committed | Answer::Held => report.committed += 1,
            Answer::Aborted => report.aborted += 1,
            Answer::Unknown => report.unknown += 1,
        }
        let shards: HashSet<usize> = t.legs.iter().flat_map(|(from, to, _)| [shard(from), shard(to)]).collect();
        for (s, by_id) in applied.iter().enumerate() {
            let here = by_id.get(id.as_str()).map(String::as_str);
            let ok = match final_status {
                Answer::Committed | Answer::Held => !shards.contains(&s) || here == Some("commit"),
                Answer::Aborted | Answer::Unknown => here != Some("commit"),
            };
            if !ok {
                report.violations.push(format!("transfer {id} ({final_status:?}): shard {s} shows {here:?}"));
            }
        }
        if final_status != Answer::Unknown && shown_legs(&body).as_ref() != Some(&t.legs) {
            report.violations.push(format!("transfer {id}: GET shows {body}, the client sent {:?}", t.legs));
        }
        if final_status == Answer::Committed {
            committed_ids.insert(id);
            for (from, to, amount) in &t.legs {
                *expected.get_mut(from.as_str()).expect("known account") -= amount;
                *expected.get_mut(to.as_str()).expect("known account") += amount;
            }
        }
    }
    // A shard must not have committed anything the drill did not ask for.
    for (s, by_id) in applied.iter().enumerate() {
        for (id, decision) in by_id {
            if decision == "commit" && !committed_ids.contains(id.as_str()) {
                report.violations.push(format!("shard {s} committed unknown transfer {id}"));
            }
        }
    }

    let mut total = 0i64;
    for a in accounts {
        let view = cluster.account(a).await;
        let balance = view["balance"].as_i64().unwrap_or(i64::MIN);
        total += balance;
        if balance != expected[a.as_str()] {
            report
                .violations
                .push(format!("account {a}: balance {balance}, committed transfers say {}", expected[a.as_str()]));
        }
        if balance < 0 {
            report.violations.push(format!("account {a}: negative balance {balance}"));
        }
        if view["held"] != json!(0) {
            report.violations.push(format!("account {a}: funds still held: {}", view["held"]));
        }
    }
    let initial_total = INITIAL_BALANCE * accounts.len() as i64;
    if total != initial_total {
        report.violations.push(format!("total {total} != initial total {initial_total}"));
    }
}

/// Bank workload with a nemesis against a real local cluster: random transfers from concurrent clients while
/// processes are SIGKILLed, restarted, paused and resumed; then a heal and a strict check of every transfer.
#[derive(clap::Args, Debug)]
pub struct DrillArgs {
    /// Seconds of workload under the nemesis.
    #[arg(long, default_value_t = 30)]
    pub duration: u64,
    /// Concurrent clients.
    #[arg(long, default_value_t = 16)]
    pub clients: usize,
    /// Accounts the clients move money between.
    #[arg(long, default_value_t = 16)]
    pub accounts: usize,
    /// Participant processes (shards).
    #[arg(long, default_value_t = 2)]
    pub participants: usize,
    /// Seed of the clients' and the nemesis's choices (default: from the clock).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Mean milliseconds between nemesis actions.
    #[arg(long, default_value_t = 3_000)]
    pub nemesis_interval_ms: u64,
}

/// What `ledger drill` and `ledger-drill` do with their arguments: a one-line summary, and exit 1 on any
/// violation with the seed that reproduces the run's schedule.
pub async fn run_cli(args: DrillArgs) -> ExitCode {
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
    });
    let config = Config {
        participants: args.participants.max(1),
        clients: args.clients.max(1),
        accounts: args.accounts.max(2),
        duration: Duration::from_secs(args.duration),
        seed,
        nemesis_interval: Duration::from_millis(args.nemesis_interval_ms.max(100)),
        ..Default::default()
    };
    eprintln!("drill: seed={seed} (reproduce the schedule with --seed {seed})");
    let report = run(config).await;
    for v in &report.violations {
        eprintln!("VIOLATION: {v}");
    }
    println!("{}", report.summary(seed));
    if report.violations.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!("drill failed: rerun with --seed {seed}");
        ExitCode::FAILURE
    }
}
