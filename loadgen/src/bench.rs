//! The throughput benchmark behind `ledger-bench`: starts its own cluster (a coordinator and two participants
//! from the built binaries, fresh temp data dirs, `RUST_LOG=warn`), creates accounts on both shards, then runs
//! one measured window per concurrency level. Each client is one tokio task with its own keep-alive HTTP
//! connection, sending `POST /transfers` back to back between a random account on shard 0 and one on shard 1
//! (random direction, amount 1..=100, a fresh UUID each), so every transfer is a full two-phase commit.
//!
//! Per level it reports committed transfers/s, aborts, errors, latency percentiles, the CPU seconds each
//! process used during the window (`/proc/<pid>/stat`), and fsyncs per committed transfer on each node (the
//! difference of `GET /stats` `fsyncs` over the window), committed transfers per fsync (how well group commit
//! shares each one), the bytes each node sent to disk per committed transfer (`/proc/<pid>/io`), and each
//! node's resident memory at the end of the window. Afterwards it waits for the cluster to settle and checks
//! that the total money is conserved.
//!
//! Only requests that complete inside the measured window count, so a warm-up request finishing late, or the
//! last one still in flight when the window closes, is left out of both the rate and the latencies. All levels
//! of a sweep run against the same cluster, one after another, each with its own warm-up.
//!
//! It measures; it asserts nothing about timing. The only failure is money not being conserved (or the
//! cluster not settling), which is a correctness bug whatever the load.

use crate::cluster::{Cluster, Node, Options};
use crate::drill::Rng;
use crate::fill;
use crate::http1::{Http1Client, Http1Error};
use futures::stream::{self, StreamExt, TryStreamExt};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::fmt;
use std::io::Write as _;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Every transfer goes from one shard to the other, so each is a two-phase commit across both (the issue's setup).
const SHARDS: usize = 2;
/// Large next to `AMOUNT_MAX` times any run's transfers per account, so no account runs dry: an abort then
/// points at the system, not at the workload.
pub const INITIAL_BALANCE: i64 = 1_000_000;
/// Transfer amounts are uniform in `1..=AMOUNT_MAX`.
const AMOUNT_MAX: u64 = 100;
/// Account reads in flight during the final check; reads are cheap, this only bounds open connections.
const READ_CONCURRENCY: usize = 64;
/// One transfer request's timeout. The coordinator gives up on a request after 30 s (its default
/// `--request-timeout-ms`), so waiting longer could never bring an answer; a timeout counts as an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// After the load stops, how long the cluster gets to deliver every decision and release every hold. Decisions
/// are re-sent every second, so anything still unsettled after a minute is stuck, not slow.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);
const SETTLE_POLL: Duration = Duration::from_millis(200);
/// How often the progress line is printed (stderr).
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// Node log lines shown when something went wrong (errors, or money not conserved).
const LOG_TAIL_LINES: usize = 15;
/// The label on every output line of a run without fsync.
pub const NOT_DURABLE: &str = "NOT DURABLE (--no-fsync)";

#[derive(Clone, Debug)]
pub struct Config {
    /// Concurrent clients, one measured window per entry.
    pub levels: Vec<usize>,
    /// Length of each measured window.
    pub duration: Duration,
    /// Load before each window that is not counted (connections open, caches and batches warm up).
    pub warmup: Duration,
    pub accounts_per_shard: usize,
    /// Start the nodes with `--no-fsync`: NOT DURABLE, for measuring what durability costs.
    pub no_fsync: bool,
    /// Send transfers in batches of this many (`POST /transfers/batch`) instead of one request each; latencies
    /// are then per batch.
    pub batch: Option<usize>,
}

#[derive(Debug)]
pub struct BenchError(pub String);

impl fmt::Display for BenchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BenchError {}

type Result<T> = std::result::Result<T, BenchError>;

fn fail<T>(message: impl Into<String>) -> Result<T> {
    Err(BenchError(message.into()))
}

/// Prints every line, labelled NOT DURABLE when the nodes run without fsync.
#[derive(Clone, Copy)]
struct Out {
    no_fsync: bool,
}

impl Out {
    fn line(&self, text: impl fmt::Display) {
        if self.no_fsync {
            println!("{NOT_DURABLE} | {text}");
        } else {
            println!("{text}");
        }
    }

    fn progress(&self, text: impl fmt::Display) {
        if self.no_fsync {
            eprintln!("{NOT_DURABLE} | {text}");
        } else {
            eprintln!("{text}");
        }
    }
}

/// Runs the benchmark and prints its results. `Ok(true)` when money was conserved, `Ok(false)` on a violation.
pub async fn run(config: Config) -> Result<bool> {
    let out = Out { no_fsync: config.no_fsync };
    let durability = if config.no_fsync { NOT_DURABLE } else { "durable (fsync on)" };
    out.line(format_args!(
        "ledger-bench: coordinator + {SHARDS} participants, {} accounts per shard, cross-shard transfers{}, \
         {} s measured after {} s warm-up per level, all levels on one cluster; {durability}",
        config.accounts_per_shard,
        match config.batch {
            Some(n) => format!(" in batches of {n} (POST /transfers/batch; latencies are per batch)"),
            None => String::new(),
        },
        config.duration.as_secs_f64(),
        config.warmup.as_secs_f64()
    ));
    out.line(format_args!("load average before start: {}", loadavg()));

    let started = Instant::now();
    let cluster = Cluster::start_with(cluster_options(config.no_fsync)).await;
    let up_after = started.elapsed();
    let accounts = Arc::new(pick_accounts(config.accounts_per_shard)?);
    create_accounts(&cluster, &accounts).await?;
    out.line(format_args!(
        "setup: cluster up in {:.2} s ({}); {} accounts created in {:.2} s",
        up_after.as_secs_f64(),
        nodes(&cluster).map(|n| format!("{} pid {}", n.name, n.pid().unwrap_or(0))).collect::<Vec<_>>().join(", "),
        accounts.iter().map(Vec::len).sum::<usize>(),
        (started.elapsed() - up_after).as_secs_f64(),
    ));

    let mut reports = Vec::with_capacity(config.levels.len());
    for &clients in &config.levels {
        let report = measure_level(&cluster, &accounts, clients, &config, out).await?;
        out.progress(format_args!("bench: clients={clients} done: {:.1} committed/s", report.rate()));
        reports.push(report);
    }

    for line in table_header() {
        out.line(line);
    }
    for r in &reports {
        out.line(r.row());
    }
    for r in &reports {
        for line in r.details() {
            out.line(line);
        }
    }

    out.progress("bench: load stopped; waiting for the cluster to settle before the money check");
    let check = check_money(&cluster, &accounts).await?;
    out.line(format_args!("load average after the run: {}", loadavg()));
    let conserved = matches!(check, MoneyCheck::Conserved { .. });
    out.line(check);
    if !conserved || reports.iter().any(|r| r.tally.errors > 0) {
        for node in nodes(&cluster) {
            out.progress(format_args!("--- last lines of {}'s log (RUST_LOG=warn):", node.name));
            for line in node.log_tail(LOG_TAIL_LINES).lines() {
                out.progress(line);
            }
        }
    }
    Ok(conserved)
}

/// The benchmark's cluster: two shards, quiet logs, and `--no-fsync` on every node when asked.
fn cluster_options(no_fsync: bool) -> Options {
    let node_flags: Vec<String> = if no_fsync { vec!["--no-fsync".into()] } else { Vec::new() };
    Options {
        participants: SHARDS,
        coordinator_args: node_flags.clone(),
        participant_args: node_flags,
        log_filter: "warn".into(),
        ..Options::default()
    }
}

fn nodes(cluster: &Cluster) -> impl Iterator<Item = &Node> {
    std::iter::once(&cluster.coordinator).chain(&cluster.participants)
}

/// `accounts_per_shard` ids on each shard (`bench-00000`, ...).
fn pick_accounts(per_shard: usize) -> Result<Vec<Vec<String>>> {
    fill::pick_accounts("bench", SHARDS as u32, per_shard).map_err(|e| BenchError(e.to_string()))
}

/// Creates every account with `INITIAL_BALANCE` on the shard it was picked for.
async fn create_accounts(cluster: &Cluster, accounts: &[Vec<String>]) -> Result<()> {
    fill::create_accounts(&cluster.http, &cluster.coordinator.url(), None, accounts, INITIAL_BALANCE, false)
        .await
        .map_err(|e| BenchError(e.to_string()))
}

/// Counters the progress line reads while a level runs (every completion, warm-up included).
#[derive(Default)]
struct Live {
    committed: AtomicU64,
    aborted: AtomicU64,
    errors: AtomicU64,
}

/// What one client saw inside the measured window.
#[derive(Default)]
struct Tally {
    latencies_us: Vec<u64>,
    committed: u64,
    aborts: u64,
    errors: u64,
    abort_reasons: BTreeMap<String, u64>,
    error_kinds: BTreeMap<String, u64>,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        self.latencies_us.extend(other.latencies_us);
        self.committed += other.committed;
        self.aborts += other.aborts;
        self.errors += other.errors;
        for (k, v) in other.abort_reasons {
            *self.abort_reasons.entry(k).or_default() += v;
        }
        for (k, v) in other.error_kinds {
            *self.error_kinds.entry(k).or_default() += v;
        }
    }
}

enum Answer {
    Committed,
    Aborted(String),
    Error(String),
}

/// One random cross-shard transfer's body.
fn write_transfer(body: &mut Vec<u8>, accounts: &[Vec<String>], rng: &mut Rng) -> Result<()> {
    let a = &accounts[0][rng.below(accounts[0].len() as u64) as usize];
    let b = &accounts[1][rng.below(accounts[1].len() as u64) as usize];
    let (from, to) = if rng.below(2) == 0 { (a, b) } else { (b, a) };
    let amount = 1 + rng.below(AMOUNT_MAX);
    let id = uuid::Uuid::new_v4();
    // Account ids are [A-Za-z0-9_-], so they need no JSON escaping.
    write!(body, r#"{{"from":"{from}","to":"{to}","amount":{amount},"id":"{id}"}}"#)
        .map_err(|e| BenchError(format!("formatting a body: {e}")))
}

/// One client: transfers (or batches of them) back to back on its own keep-alive connection until
/// `window_end`.
async fn client_loop(
    url: String,
    accounts: Arc<Vec<Vec<String>>>,
    mut rng: Rng,
    live: Arc<Live>,
    window: (Instant, Instant),
    batch: Option<usize>,
) -> Result<Tally> {
    let (window_start, window_end) = window;
    // A connection of its own per task, as separate clients would hold.
    let mut http = Http1Client::new(&url, REQUEST_TIMEOUT).map_err(|e| BenchError(format!("client for {url}: {e}")))?;
    let mut body = Vec::with_capacity(256 * batch.unwrap_or(1));
    let mut tally = Tally::default();
    while Instant::now() < window_end {
        body.clear();
        match batch {
            None => write_transfer(&mut body, &accounts, &mut rng)?,
            Some(n) => {
                body.extend_from_slice(br#"{"transfers":["#);
                for i in 0..n {
                    if i > 0 {
                        body.push(b',');
                    }
                    write_transfer(&mut body, &accounts, &mut rng)?;
                }
                body.extend_from_slice(b"]}");
            }
        }
        let sent = Instant::now();
        let answers = match batch {
            None => vec![transfer(&mut http, &body).await],
            Some(n) => transfer_batch(&mut http, &body, n).await,
        };
        let done = Instant::now();
        let counted = done >= window_start && done < window_end;
        for answer in answers {
            tally_answer(&mut tally, &live, answer, counted);
        }
        if counted {
            tally.latencies_us.push(done.duration_since(sent).as_micros() as u64);
        }
    }
    Ok(tally)
}

fn tally_answer(tally: &mut Tally, live: &Live, answer: Answer, counted: bool) {
    match answer {
        Answer::Committed => {
            live.committed.fetch_add(1, Relaxed);
            if counted {
                tally.committed += 1;
            }
        }
        Answer::Aborted(reason) => {
            live.aborted.fetch_add(1, Relaxed);
            if counted {
                tally.aborts += 1;
                *tally.abort_reasons.entry(reason).or_default() += 1;
            }
        }
        Answer::Error(kind) => {
            live.errors.fetch_add(1, Relaxed);
            if counted {
                tally.errors += 1;
                *tally.error_kinds.entry(kind).or_default() += 1;
            }
        }
    }
}

/// The fields of a transfer's answer the benchmark looks at.
#[derive(serde::Deserialize)]
struct Reply<'a> {
    #[serde(borrow)]
    status: Option<&'a str>,
    #[serde(borrow)]
    reason: Option<&'a str>,
    #[serde(borrow)]
    error: Option<ReplyError<'a>>,
}

#[derive(serde::Deserialize)]
struct ReplyError<'a> {
    #[serde(borrow)]
    code: Option<&'a str>,
}

/// The answer to a batch: one reply per item, with its status as `code`.
#[derive(serde::Deserialize)]
struct BatchReply<'a> {
    #[serde(borrow)]
    results: Vec<BatchItem<'a>>,
}

#[derive(serde::Deserialize)]
struct BatchItem<'a> {
    code: u16,
    #[serde(borrow, flatten)]
    reply: Reply<'a>,
}

fn transport_error(e: Http1Error) -> Answer {
    match e {
        Http1Error::Timeout => Answer::Error("transport: timeout".into()),
        Http1Error::Connect(_) => Answer::Error("transport: connect".into()),
        e => Answer::Error(format!("transport: {e}")),
    }
}

/// Sends one transfer and classifies the answer.
async fn transfer(http: &mut Http1Client, body: &[u8]) -> Answer {
    let (status, reply) = match http.post_json(body).await {
        Ok(answer) => answer,
        Err(e) => return transport_error(e),
    };
    let Ok(reply) = serde_json::from_slice::<Reply>(reply) else {
        return Answer::Error(format!("{status} with an unreadable body"));
    };
    classify(status, reply)
}

/// Sends one batch of `items` transfers and classifies each item's answer (every item counts as an error if
/// the batch as a whole failed).
async fn transfer_batch(http: &mut Http1Client, body: &[u8], items: usize) -> Vec<Answer> {
    let whole = |answer: Answer| {
        (0..items)
            .map(|_| match &answer {
                Answer::Error(kind) => Answer::Error(kind.clone()),
                _ => Answer::Error("batch refused".into()),
            })
            .collect()
    };
    let (status, reply) = match http.post_json(body).await {
        Ok(answer) => answer,
        Err(e) => return whole(transport_error(e)),
    };
    match serde_json::from_slice::<BatchReply>(reply) {
        Ok(batch) if status == 200 => batch.results.into_iter().map(|item| classify(item.code, item.reply)).collect(),
        _ => whole(Answer::Error(format!("batch answered {status}"))),
    }
}

fn classify(status: u16, reply: Reply) -> Answer {
    match reply.status {
        Some("committed") if (200..300).contains(&status) => Answer::Committed,
        Some("aborted") => Answer::Aborted(format!("{status} {}", reply.reason.unwrap_or("no reason"))),
        _ => Answer::Error(format!("{status} {}", reply.error.and_then(|e| e.code).unwrap_or("no code"))),
    }
}

/// One progress line per `PROGRESS_EVERY` on stderr until aborted.
async fn progress_loop(live: Arc<Live>, clients: usize, start: Instant, window_start: Instant, out: Out) {
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::from_std(start + PROGRESS_EVERY), PROGRESS_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut last_committed, mut last_at) = (0u64, start);
    loop {
        ticks.tick().await;
        let now = Instant::now();
        let committed = live.committed.load(Relaxed);
        let rate = (committed - last_committed) as f64 / now.duration_since(last_at).as_secs_f64();
        let phase = if last_at < window_start { "warm-up" } else { "measuring" };
        out.progress(format_args!(
            "bench: clients={clients} {:>5.1} s {phase:<9} committed {committed:>8} ({rate:>7.0}/s now) aborts {} errors {}",
            now.duration_since(start).as_secs_f64(),
            live.aborted.load(Relaxed),
            live.errors.load(Relaxed),
        ));
        (last_committed, last_at) = (committed, now);
    }
}

/// A node's group-commit counters from `GET /stats`.
#[derive(Clone, Copy, Default)]
struct Flush {
    fsyncs: u64,
    waiters: u64,
    micros: u64,
}

/// CPU and flush counters of every process at one instant. Processes: the nodes in `nodes()` order, then the
/// benchmark itself.
struct Snapshot {
    cpu_seconds: Vec<f64>,
    /// Bytes each node has sent to the storage layer (`write_bytes` of `/proc/<pid>/io`), in `nodes()` order.
    disk_bytes: Vec<Option<u64>>,
    flush: Vec<Flush>,
}

async fn snapshot(cluster: &Cluster) -> Result<Snapshot> {
    let mut cpu_seconds = Vec::new();
    for node in nodes(cluster) {
        let pid = node.pid().ok_or_else(|| BenchError(format!("{} is not running", node.name)))?;
        cpu_seconds.push(cpu_seconds_of(&format!("/proc/{pid}/stat"))?);
    }
    cpu_seconds.push(cpu_seconds_of("/proc/self/stat")?);
    let disk_bytes = nodes(cluster).map(|node| node.pid().and_then(disk_bytes_of)).collect();
    let flush = futures::future::try_join_all(nodes(cluster).map(|node| flush_stats(&cluster.http, node))).await?;
    Ok(Snapshot { cpu_seconds, disk_bytes, flush })
}

/// Bytes a process has caused to be written to storage, page by page (`write_bytes` in `/proc/<pid>/io`).
fn disk_bytes_of(pid: u32) -> Option<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    io.lines().find_map(|l| l.strip_prefix("write_bytes:")).and_then(|v| v.trim().parse().ok())
}

/// utime + stime of a process, in seconds, from its `/proc/<pid>/stat`.
fn cpu_seconds_of(path: &str) -> Result<f64> {
    let text = std::fs::read_to_string(path).map_err(|e| BenchError(format!("reading {path}: {e}")))?;
    // The command name is in parentheses and may contain spaces; the numbered fields follow the last ')'.
    let Some((_, rest)) = text.rsplit_once(')') else {
        return fail(format!("{path}: no command name in {text:?}"));
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state); utime and stime are fields 14 and 15 (proc(5)).
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
    let (Some(utime), Some(stime)) = (field(14), field(15)) else {
        return fail(format!("{path}: cannot read utime and stime from {text:?}"));
    };
    // SAFETY: sysconf has no memory-safety preconditions.
    let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks_per_second <= 0 {
        return fail("sysconf(_SC_CLK_TCK) failed");
    }
    Ok((utime + stime) as f64 / ticks_per_second as f64)
}

async fn flush_stats(http: &reqwest::Client, node: &Node) -> Result<Flush> {
    let url = format!("{}/stats", node.url());
    let reply = http.get(&url).send().await.map_err(|e| BenchError(format!("GET {url}: {e}")))?;
    let body: Value = reply.json().await.map_err(|e| BenchError(format!("GET {url}: {e}")))?;
    let field = |name: &str| body[name].as_u64().ok_or_else(|| BenchError(format!("GET {url}: no {name} in {body}")));
    Ok(Flush { fsyncs: field("fsyncs")?, waiters: field("flush_waiters")?, micros: field("flush_micros")? })
}

/// One concurrency level's results.
struct LevelReport {
    clients: usize,
    window: Duration,
    tally: Tally,
    /// Sorted.
    latencies_us: Vec<u64>,
    /// CPU seconds during the window: the nodes in `nodes()` order, then the benchmark.
    cpu: Vec<f64>,
    /// Per node, in `nodes()` order.
    flush: Vec<Flush>,
    node_names: Vec<String>,
    /// Resident memory of each node at the end of the window, in `nodes()` order (`None`: unreadable).
    rss_bytes: Vec<Option<u64>>,
    /// Bytes each node sent to storage during the window, in `nodes()` order (`None`: unreadable).
    disk_bytes: Vec<Option<u64>>,
    loadavg: String,
}

async fn measure_level(
    cluster: &Cluster,
    accounts: &Arc<Vec<Vec<String>>>,
    clients: usize,
    config: &Config,
    out: Out,
) -> Result<LevelReport> {
    let live = Arc::new(Live::default());
    let start = Instant::now();
    let window_start = start + config.warmup;
    let window_end = window_start + config.duration;
    let seed = uuid::Uuid::new_v4().as_u64_pair().0;
    let url = cluster.api(if config.batch.is_some() { "/transfers/batch" } else { "/transfers" });
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let rng = Rng::new(seed.wrapping_add((c as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)));
            let window = (window_start, window_end);
            tokio::spawn(client_loop(url.clone(), accounts.clone(), rng, live.clone(), window, config.batch))
        })
        .collect();
    let progress = tokio::spawn(progress_loop(live.clone(), clients, start, window_start, out));

    tokio::time::sleep_until(tokio::time::Instant::from_std(window_start)).await;
    let before = snapshot(cluster).await?;
    tokio::time::sleep_until(tokio::time::Instant::from_std(window_end)).await;
    let after = snapshot(cluster).await?;
    let loadavg = loadavg();
    let rss_bytes = nodes(cluster).map(|node| node.pid().and_then(rss_bytes_of)).collect();

    let mut tally = Tally::default();
    for task in tasks {
        let client = task.await.map_err(|e| BenchError(format!("a client task failed: {e}")))?;
        tally.merge(client?);
    }
    progress.abort();

    let cpu = after.cpu_seconds.iter().zip(&before.cpu_seconds).map(|(a, b)| a - b).collect();
    let disk_bytes =
        after.disk_bytes.iter().zip(&before.disk_bytes).map(|(a, b)| Some(a.as_ref()?.saturating_sub((*b)?))).collect();
    let flush = after
        .flush
        .iter()
        .zip(&before.flush)
        .map(|(a, b)| Flush {
            fsyncs: a.fsyncs - b.fsyncs,
            waiters: a.waiters - b.waiters,
            micros: a.micros - b.micros,
        })
        .collect();
    let mut latencies_us = std::mem::take(&mut tally.latencies_us);
    latencies_us.sort_unstable();
    Ok(LevelReport {
        clients,
        window: config.duration,
        tally,
        latencies_us,
        cpu,
        flush,
        node_names: nodes(cluster).map(|n| n.name.clone()).collect(),
        rss_bytes,
        disk_bytes,
        loadavg,
    })
}

/// VmRSS of a process, from `/proc/<pid>/status`.
fn rss_bytes_of(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Column headings; the group labels above them line up with the `|` separators of the second line.
fn table_header() -> [String; 2] {
    let columns = format!(
        "{:>7} {:>11} {:>9} {:>6} {:>6} {:>8} {:>8} {:>8} {:>8} | {:>5} {:>5} {:>5} {:>5} | {:>5} {:>5} {:>5}",
        "clients",
        "committed/s",
        "committed",
        "aborts",
        "errors",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "max ms",
        "coord",
        "p0",
        "p1",
        "bench",
        "coord",
        "p0",
        "p1"
    );
    let first = columns.find('|').unwrap_or(0);
    let second = columns[first + 1..].find('|').map_or(first, |i| first + 1 + i);
    let groups = format!(
        "{:first$}| {:<cpu$}| fsyncs per commit",
        "",
        "CPU seconds in window",
        cpu = second.saturating_sub(first + 2)
    );
    [groups, columns]
}

impl LevelReport {
    fn rate(&self) -> f64 {
        self.tally.committed as f64 / self.window.as_secs_f64()
    }

    /// Nearest-rank percentile of the latencies, in milliseconds.
    fn percentile_ms(&self, q: f64) -> Option<f64> {
        let n = self.latencies_us.len();
        if n == 0 {
            return None;
        }
        let rank = ((q * n as f64).ceil() as usize).clamp(1, n);
        Some(self.latencies_us[rank - 1] as f64 / 1_000.0)
    }

    fn row(&self) -> String {
        let ms = |q: f64| self.percentile_ms(q).map_or("-".to_string(), |v| format!("{v:.2}"));
        let per_commit = |f: &Flush| {
            if self.tally.committed == 0 {
                "-".to_string()
            } else {
                format!("{:.3}", f.fsyncs as f64 / self.tally.committed as f64)
            }
        };
        let cpu: Vec<String> = self.cpu.iter().map(|c| format!("{c:>5.2}")).collect();
        let fsyncs: Vec<String> = self.flush.iter().map(|f| format!("{:>5}", per_commit(f))).collect();
        format!(
            "{:>7} {:>11.1} {:>9} {:>6} {:>6} {:>8} {:>8} {:>8} {:>8} | {} | {}",
            self.clients,
            self.rate(),
            self.tally.committed,
            self.tally.aborts,
            self.tally.errors,
            ms(0.50),
            ms(0.99),
            ms(0.999),
            ms(1.0),
            cpu.join(" "),
            fsyncs.join(" "),
        )
    }

    /// What the table has no room for: group-commit sizes, flush times, CPU per transfer, abort and error kinds.
    fn details(&self) -> Vec<String> {
        let mut lines = Vec::new();
        let group: Vec<String> = self
            .node_names
            .iter()
            .zip(&self.flush)
            .map(|(name, f)| {
                if f.fsyncs == 0 {
                    format!("{name} no fsyncs")
                } else {
                    format!(
                        "{name} {} fsyncs, {:.1} committed transfers/fsync, {:.1} sync calls/fsync, {:.2} ms/fsync",
                        f.fsyncs,
                        self.tally.committed as f64 / f.fsyncs as f64,
                        f.waiters as f64 / f.fsyncs as f64,
                        f.micros as f64 / f.fsyncs as f64 / 1_000.0
                    )
                }
            })
            .collect();
        lines.push(format!("clients={}: group commit: {}", self.clients, group.join("; ")));
        if self.tally.committed > 0 {
            let names = self.node_names.iter().map(String::as_str).chain(["bench"]);
            let per: Vec<String> = names
                .zip(&self.cpu)
                .map(|(name, c)| format!("{name} {:.0}", c * 1e6 / self.tally.committed as f64))
                .collect();
            let total: f64 = self.cpu.iter().sum();
            let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
            lines.push(format!(
                "clients={}: CPU µs per committed transfer: {} (all {:.0}; {:.2} of {cores} cores busy)",
                self.clients,
                per.join(", "),
                total * 1e6 / self.tally.committed as f64,
                total / self.window.as_secs_f64(),
            ));
        }
        let rss: Vec<String> = self
            .node_names
            .iter()
            .zip(&self.rss_bytes)
            .map(|(name, rss)| match rss {
                Some(bytes) => format!("{name} {:.1}", *bytes as f64 / (1024.0 * 1024.0)),
                None => format!("{name} ?"),
            })
            .collect();
        lines.push(format!("clients={}: RSS MiB at the end of the window: {}", self.clients, rss.join(", ")));
        if self.tally.committed > 0 {
            let disk: Vec<String> = self
                .node_names
                .iter()
                .zip(&self.disk_bytes)
                .map(|(name, bytes)| match bytes {
                    Some(bytes) => format!("{name} {:.0}", *bytes as f64 / self.tally.committed as f64),
                    None => format!("{name} ?"),
                })
                .collect();
            lines.push(format!(
                "clients={}: bytes sent to disk per committed transfer (whole pages): {}",
                self.clients,
                disk.join(", ")
            ));
        }
        if !self.tally.abort_reasons.is_empty() {
            lines.push(format!("clients={}: aborts by reason: {:?}", self.clients, self.tally.abort_reasons));
        }
        if !self.tally.error_kinds.is_empty() {
            lines.push(format!("clients={}: errors by kind: {:?}", self.clients, self.tally.error_kinds));
        }
        lines.push(format!("clients={}: load average at the end of the window: {}", self.clients, self.loadavg));
        lines
    }
}

enum MoneyCheck {
    Conserved { total: i128, accounts: usize },
    Violated { total: i128, expected: i128, negative: usize },
    NotSettled(String),
}

impl fmt::Display for MoneyCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MoneyCheck::Conserved { total, accounts } => {
                write!(f, "money: OK: {accounts} accounts hold {total} = {accounts} x {INITIAL_BALANCE}, no holds left")
            }
            MoneyCheck::Violated { total, expected, negative } => write!(
                f,
                "money: VIOLATION: accounts hold {total}, expected {expected} (difference {}); {negative} negative balances",
                total - expected
            ),
            MoneyCheck::NotSettled(why) => {
                write!(f, "money: VIOLATION: the cluster did not settle within {SETTLE_TIMEOUT:?}: {why}")
            }
        }
    }
}

/// Waits until no decision is owed an ack and no account has funds held, then sums every balance.
async fn check_money(cluster: &Cluster, accounts: &[Vec<String>]) -> Result<MoneyCheck> {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    let ids: Vec<&String> = accounts.iter().flatten().collect();
    let expected = ids.len() as i128 * i128::from(INITIAL_BALANCE);
    loop {
        let why = match unsettled(cluster).await? {
            Some(why) => why,
            None => {
                let views = read_accounts(cluster, &ids).await?;
                let held: Vec<&Value> = views.iter().filter(|v| v["held"] != json!(0)).collect();
                if held.is_empty() {
                    let mut total = 0i128;
                    for v in &views {
                        let Some(balance) = v["balance"].as_i64() else {
                            return fail(format!("no balance in {v}"));
                        };
                        total += i128::from(balance);
                    }
                    let negative = views.iter().filter(|v| v["balance"].as_i64().is_some_and(|b| b < 0)).count();
                    return Ok(if total == expected && negative == 0 {
                        MoneyCheck::Conserved { total, accounts: views.len() }
                    } else {
                        MoneyCheck::Violated { total, expected, negative }
                    });
                }
                format!("{} accounts still have funds held, e.g. {}", held.len(), held[0])
            }
        };
        if Instant::now() >= deadline {
            return Ok(MoneyCheck::NotSettled(why));
        }
        tokio::time::sleep(SETTLE_POLL).await;
    }
}

/// `Some(why)` while the coordinator still owes some shard a decision.
async fn unsettled(cluster: &Cluster) -> Result<Option<String>> {
    let url = cluster.api("/transactions?status=unacknowledged");
    let reply = cluster.http.get(&url).send().await.map_err(|e| BenchError(format!("GET {url}: {e}")))?;
    let body: Value = reply.json().await.map_err(|e| BenchError(format!("GET {url}: {e}")))?;
    match body["transactions"].as_array() {
        Some(list) if list.is_empty() => Ok(None),
        Some(list) => Ok(Some(format!("{} decisions unacknowledged, e.g. {}", list.len(), list[0]))),
        None => fail(format!("GET {url}: unexpected answer {body}")),
    }
}

async fn read_accounts(cluster: &Cluster, ids: &[&String]) -> Result<Vec<Value>> {
    stream::iter(ids)
        .map(|id| async move {
            let url = cluster.api(&format!("/accounts/{id}"));
            let reply = cluster.http.get(&url).send().await.map_err(|e| BenchError(format!("GET {url}: {e}")))?;
            let status = reply.status();
            let body: Value = reply.json().await.map_err(|e| BenchError(format!("GET {url}: {e}")))?;
            if !status.is_success() {
                return fail(format!("GET {url}: {status} {body}"));
            }
            Ok(body)
        })
        .buffer_unordered(READ_CONCURRENCY)
        .try_collect()
        .await
}

/// The first three fields of /proc/loadavg (1, 5 and 15 minutes), or why they could not be read.
fn loadavg() -> String {
    match std::fs::read_to_string("/proc/loadavg") {
        Ok(text) => text.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
        Err(e) => format!("unknown ({e})"),
    }
}

/// The history benchmark (`ledger-bench --history N1,N2,...`): what a node costs as its history grows.
#[derive(Clone, Debug)]
pub struct HistoryConfig {
    /// Total transfers sent before each measurement, ascending.
    pub sizes: Vec<u64>,
    pub clients: usize,
    pub accounts_per_shard: usize,
    pub no_fsync: bool,
}

/// One node's cost at one history size.
struct NodeCost {
    name: String,
    dir_bytes: u64,
    restart: Duration,
    rss_after_restart: u64,
    rss_after_load: u64,
}

/// Transfers sent after each restart, so the RSS shown is that of a node at work, not of one just started.
const HISTORY_WARM_TRANSFERS: u64 = 5_000;

/// Builds each history size through the public API (`fill`), then for each node: its data dir's bytes, the
/// time from a SIGKILL'd node's start to `/health` 200, and its RSS just after and after some load.
pub async fn run_history(config: HistoryConfig) -> Result<bool> {
    let out = Out { no_fsync: config.no_fsync };
    let durability = if config.no_fsync { NOT_DURABLE } else { "durable (fsync on)" };
    out.line(format_args!(
        "ledger-bench --history: coordinator + {SHARDS} participants, {} accounts per shard, history sizes {:?}, \
         {} clients; {durability}",
        config.accounts_per_shard, config.sizes, config.clients
    ));
    let mut cluster = Cluster::start_with(cluster_options(config.no_fsync)).await;
    let accounts = pick_accounts(config.accounts_per_shard)?;
    create_accounts(&cluster, &accounts).await?;
    let mut sent = 0u64;
    let mut committed = 0u64;
    out.line("history  committed | node         data dir   B/commit   restart s   RSS MiB after restart / after load");
    for (round, &size) in config.sizes.iter().enumerate() {
        let more = size.saturating_sub(sent);
        let fill_config = fill::Fill {
            url: cluster.coordinator.url(),
            token: None,
            transfers: more,
            clients: config.clients,
            seed: round as u64,
        };
        let filled = fill::fill(&fill_config, &accounts).await.map_err(|e| BenchError(e.to_string()))?;
        sent += more;
        committed += filled.committed;
        out.progress(format_args!(
            "history: {sent} sent, {committed} committed ({:.0}/s, {} failed)",
            filled.rate(),
            filled.errors
        ));
        if let MoneyCheck::NotSettled(why) = check_money(&cluster, &accounts).await? {
            return fail(format!("the cluster did not settle: {why}"));
        }
        let mut costs = Vec::new();
        for name in ["p0", "p1", "coordinator"] {
            costs.push(measure_restart(&mut cluster, name).await?);
        }
        // Load on the restarted nodes, then their RSS at work.
        let warm = fill::Fill { transfers: HISTORY_WARM_TRANSFERS, seed: 1_000 + round as u64, ..fill_config };
        let filled = fill::fill(&warm, &accounts).await.map_err(|e| BenchError(e.to_string()))?;
        sent += HISTORY_WARM_TRANSFERS;
        committed += filled.committed;
        for cost in &mut costs {
            cost.rss_after_load = cluster.node(&cost.name).pid().and_then(rss_bytes_of).unwrap_or(0);
        }
        for cost in &costs {
            out.line(format_args!(
                "{sent:>9} {committed:>9} | {:<11} {:>9.1} MiB {:>8.0} {:>11.2}   {:>6.1} / {:.1}",
                cost.name,
                cost.dir_bytes as f64 / MIB,
                cost.dir_bytes as f64 / committed.max(1) as f64,
                cost.restart.as_secs_f64(),
                cost.rss_after_restart as f64 / MIB,
                cost.rss_after_load as f64 / MIB,
            ));
        }
    }
    let check = check_money(&cluster, &accounts).await?;
    let conserved = matches!(check, MoneyCheck::Conserved { .. });
    out.line(check);
    Ok(conserved)
}

const MIB: f64 = 1024.0 * 1024.0;

/// SIGKILLs a node, measures its data dir, starts it and times its way back to `/health` 200.
async fn measure_restart(cluster: &mut Cluster, name: &str) -> Result<NodeCost> {
    let dir = cluster.data_dir().join(name);
    let node = cluster.node(name);
    node.kill();
    let dir_bytes = dir_bytes(&dir);
    let started = Instant::now();
    node.spawn(None);
    let url = format!("{}/health", node.url());
    let probe = reqwest::Client::builder().pool_max_idle_per_host(0).build().map_err(|e| BenchError(e.to_string()))?;
    loop {
        let ok = probe.get(&url).timeout(Duration::from_secs(1)).send().await;
        if ok.is_ok_and(|r| r.status().is_success()) {
            break;
        }
        if started.elapsed() > SETTLE_TIMEOUT {
            return fail(format!("{name} did not come back within {SETTLE_TIMEOUT:?}"));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let restart = started.elapsed();
    let rss_after_restart = cluster.node(name).pid().and_then(rss_bytes_of).unwrap_or(0);
    Ok(NodeCost { name: name.to_owned(), dir_bytes, restart, rss_after_restart, rss_after_load: 0 })
}

/// Bytes of every file under `dir`.
fn dir_bytes(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Throughput benchmark of the two-phase-commit ledger: a coordinator and two participants on loopback (fresh
/// temp data dirs), C clients sending cross-shard transfers back to back on keep-alive connections. Reports
/// committed transfers/s, aborts, errors, latency percentiles, CPU seconds and fsyncs per committed transfer of
/// each process, then checks that the total money is conserved.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Concurrent clients (one tokio task and one keep-alive connection each).
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    /// Seconds measured per concurrency level.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Seconds of load before each measured window that are not counted.
    #[arg(long, default_value_t = 1)]
    pub warmup: u64,
    /// Comma-separated client counts, one measured window each, against the same cluster (e.g. 1,16,64,256).
    /// Overrides --clients.
    #[arg(long, value_delimiter = ',')]
    pub sweep: Vec<usize>,
    /// Accounts created on each of the two shards, each with a balance of 1,000,000.
    #[arg(long, default_value_t = 1_000)]
    pub accounts_per_shard: usize,
    /// History mode: comma-separated history sizes (e.g. 100000,1000000). Builds each history through the
    /// public API with --clients clients, then prints each node's data dir bytes per committed transfer, its
    /// restart time (SIGKILL, start, /health 200) and its RSS after the restart and after some load.
    #[arg(long, value_delimiter = ',')]
    pub history: Vec<u64>,
    /// NOT DURABLE: start every node with --no-fsync, to measure what durability costs. Every output line is
    /// labelled.
    #[arg(long)]
    pub no_fsync: bool,
    /// Send the transfers in batches of N through POST /transfers/batch (1 to 8190), one batch per request;
    /// the latencies are then per batch.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=8190))]
    pub batch: Option<u16>,
}

/// What `ledger bench` and `ledger-bench` do with their arguments: exit 1 if money was not conserved, 2 if the
/// benchmark itself could not run.
pub async fn run_cli(args: BenchArgs) -> ExitCode {
    if !args.history.is_empty() {
        let mut sizes = args.history.clone();
        sizes.sort_unstable();
        let config = HistoryConfig {
            sizes,
            clients: args.clients.max(1),
            accounts_per_shard: args.accounts_per_shard.max(1),
            no_fsync: args.no_fsync,
        };
        return exit(run_history(config).await);
    }
    let levels = if args.sweep.is_empty() { vec![args.clients] } else { args.sweep };
    let config = Config {
        levels: levels.into_iter().map(|c| c.max(1)).collect(),
        duration: Duration::from_secs(args.duration.max(1)),
        warmup: Duration::from_secs(args.warmup),
        accounts_per_shard: args.accounts_per_shard.max(1),
        no_fsync: args.no_fsync,
        batch: args.batch.map(usize::from),
    };
    exit(run(config).await)
}

fn exit(result: Result<bool>) -> ExitCode {
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("ledger bench: {e}");
            ExitCode::from(2)
        }
    }
}
