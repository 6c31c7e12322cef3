//! Runs the real binaries: a coordinator and N participants on free loopback ports, each with its own data dir
//! inside a temp dir (or a given one). Nodes can be SIGKILLed, restarted with the same flags, or started with a crash point
//! armed. Children are killed on drop; if the test is failing, every node's command line and log tail is printed.

use serde_json::{json, Value};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Long enough for a debug build to open sled and recover on a loaded 2-core machine.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The directory holding `coordinator` and `participant`: next to the running executable (or its parent, for
/// test binaries under `deps/`), unless `LEDGER_BIN_DIR` says otherwise.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("LEDGER_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("path of the running executable");
    let mut dir = exe.parent().expect("executable has a directory").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

pub fn coordinator_bin() -> PathBuf {
    binary("coordinator")
}

pub fn participant_bin() -> PathBuf {
    binary("participant")
}

fn binary(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` (scripts/test.sh does)",
        path.display()
    );
    path
}

/// Attempts at creating an account that the coordinator answers 503.
const CREATE_ATTEMPTS_MAX: u32 = 5;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free loopback port")
}

pub struct Node {
    pub name: String,
    pub port: u16,
    program: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    log_filter: String,
    child: Option<Child>,
}

impl Node {
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Starts the process; `crash_at` arms crash points for this run only.
    pub fn spawn(&mut self, crash_at: Option<&str>) {
        assert!(self.child.is_none(), "{} is already running", self.name);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("open log");
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
        cmd.env("RUST_LOG", &self.log_filter).env_remove("LEDGER_CRASH_AT");
        if let Some(points) = crash_at {
            cmd.env("LEDGER_CRASH_AT", points);
        }
        self.child = Some(cmd.spawn().expect("spawn node"));
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn terminate(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill has no memory-safety preconditions; the pid is our own child's.
            unsafe {
                libc::kill(child.id() as i32, libc::SIGTERM);
            }
            let status = child.wait().expect("wait for node");
            assert!(status.success(), "{} exited with {status} after SIGTERM", self.name);
        }
    }

    /// Waits for the process to die by itself (an armed crash point); true if it did within `timeout`.
    pub fn wait_for_death(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            match self.child.as_mut().map(|c| c.try_wait()) {
                None => return true,
                Some(Ok(Some(_))) => {
                    self.child = None;
                    return true;
                }
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        false
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn describe(&self) -> String {
        format!("{} {}", self.program.display(), self.args.join(" "))
    }
}

pub struct Cluster {
    /// The cluster secret the nodes were given, for tests that call internal routes.
    pub cluster_token: Option<String>,
    pub dir: tempfile::TempDir,
    pub coordinator: Node,
    pub participants: Vec<Node>,
    pub http: reqwest::Client,
}

pub struct Options {
    pub participants: usize,
    /// Extra coordinator flags.
    pub coordinator_args: Vec<String>,
    /// Extra flags for every participant.
    pub participant_args: Vec<String>,
    /// `RUST_LOG` for the nodes.
    pub log_filter: String,
    /// Give every node a generated cluster secret (as `scripts/cluster.sh` does).
    pub cluster_token: bool,
    /// Contents of an API tokens file for the coordinator, if any.
    pub api_tokens: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            participants: 2,
            coordinator_args: Vec::new(),
            participant_args: Vec::new(),
            log_filter: "info".into(),
            cluster_token: true,
            api_tokens: None,
        }
    }
}

impl Cluster {
    pub async fn start() -> Cluster {
        Cluster::start_with(Options::default()).await
    }

    pub async fn start_with(options: Options) -> Cluster {
        // LEDGER_KEEP_DATA=1 keeps the data directories after the run, to inspect a failed drill.
        let keep = std::env::var("LEDGER_KEEP_DATA").is_ok_and(|v| v == "1");
        let dir = tempfile::Builder::new().disable_cleanup(keep).tempdir().expect("temp dir");
        let mut shared_args: Vec<String> = Vec::new();
        let cluster_token = options.cluster_token.then(|| {
            let token = format!("{:032x}", uuid::Uuid::new_v4().as_u128());
            let path = dir.path().join("cluster.token");
            std::fs::write(&path, &token).expect("write cluster token");
            shared_args.extend(["--cluster-token-file".to_string(), path.display().to_string()]);
            token
        });
        let participants: Vec<Node> = (0..options.participants)
            .map(|shard| {
                let port = free_port();
                let data = dir.path().join(format!("p{shard}"));
                let args = vec![
                    "--shard".into(),
                    shard.to_string(),
                    "--listen".into(),
                    format!("127.0.0.1:{port}"),
                    "--data".into(),
                    data.display().to_string(),
                    // Short, so tests see in-doubt transfers resolved quickly.
                    "--in-doubt-after-ms".into(),
                    "500".into(),
                ];
                let args = args
                    .into_iter()
                    .chain(shared_args.iter().cloned())
                    .chain(options.participant_args.iter().cloned())
                    .collect();
                let log = dir.path().join(format!("p{shard}.log"));
                Node {
                    name: format!("p{shard}"),
                    port,
                    program: participant_bin(),
                    args,
                    log,
                    log_filter: options.log_filter.clone(),
                    child: None,
                }
            })
            .collect();
        let port = free_port();
        let urls: Vec<String> = participants.iter().map(Node::url).collect();
        let mut args = vec![
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--data".into(),
            dir.path().join("coordinator").display().to_string(),
            "--participants".into(),
            urls.join(","),
            "--prepare-timeout-ms".into(),
            "1500".into(),
        ];
        args.extend(shared_args);
        if let Some(tokens) = &options.api_tokens {
            let path = dir.path().join("api.tokens");
            std::fs::write(&path, tokens).expect("write API tokens");
            args.extend(["--api-tokens-file".to_string(), path.display().to_string()]);
        }
        args.extend(options.coordinator_args);
        let log = dir.path().join("coordinator.log");
        let coordinator = Node {
            name: "coordinator".into(),
            port,
            program: coordinator_bin(),
            args,
            log,
            log_filter: options.log_filter.clone(),
            child: None,
        };
        let http = reqwest::Client::builder().timeout(Duration::from_secs(20)).build().expect("http client");
        let mut cluster = Cluster { dir, coordinator, participants, http, cluster_token };
        for i in 0..cluster.participants.len() {
            cluster.participants[i].spawn(None);
        }
        cluster.coordinator.spawn(None);
        for i in 0..cluster.participants.len() {
            cluster.wait_ready(&cluster.participants[i].url()).await;
        }
        cluster.wait_ready(&cluster.coordinator.url()).await;
        cluster
    }

    pub fn node(&mut self, name: &str) -> &mut Node {
        if name == "coordinator" {
            return &mut self.coordinator;
        }
        self.participants.iter_mut().find(|n| n.name == name).unwrap_or_else(|| panic!("no node {name}"))
    }

    pub async fn wait_ready(&self, url: &str) {
        let deadline = Instant::now() + START_TIMEOUT;
        // Unpooled, so waiting for a node leaves no connection to it open.
        let probe = reqwest::Client::builder().pool_max_idle_per_host(0).build().expect("http client");
        loop {
            let ok = probe.get(format!("{url}/health")).timeout(Duration::from_secs(1)).send().await;
            if ok.is_ok_and(|r| r.status().is_success()) {
                return;
            }
            assert!(Instant::now() < deadline, "{url} did not become healthy within {START_TIMEOUT:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Restarts a node (with crash points disarmed unless given) and waits until it is healthy.
    pub async fn restart(&mut self, name: &str, crash_at: Option<&str>) {
        let node = self.node(name);
        node.kill();
        node.spawn(crash_at);
        let url = node.url();
        self.wait_ready(&url).await;
    }

    pub fn api(&self, path: &str) -> String {
        format!("{}{path}", self.coordinator.url())
    }

    /// POSTs JSON to the coordinator; returns status and body (Value::Null for a non-JSON body).
    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = self.http.post(self.api(path)).json(&body).send().await.expect("request reaches the coordinator");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Like `post`, but a failed connection (the coordinator died) is `None`.
    pub async fn try_post(&self, path: &str, body: Value) -> Option<(u16, Value)> {
        let r = self.http.post(self.api(path)).json(&body).send().await.ok()?;
        let status = r.status().as_u16();
        Some((status, r.json().await.unwrap_or(Value::Null)))
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let r = self.http.get(self.api(path)).send().await.expect("request reaches the coordinator");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Creates an account; a 503 (its shard slower than the coordinator's participant timeout, as when many
    /// test clusters share two cores) is retried, and a 409 after it means the first attempt landed.
    pub async fn create_account(&self, id: &str, balance: i64) -> u32 {
        let mut unavailable = 0;
        loop {
            let (status, body) = self.post("/accounts", json!({"id": id, "balance": balance})).await;
            match status {
                503 if unavailable < CREATE_ATTEMPTS_MAX => {
                    unavailable += 1;
                    eprintln!("creating {id}: 503 ({body}), trying again");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                409 if unavailable > 0 => return self.account(id).await["shard"].as_u64().expect("shard") as u32,
                _ => {
                    assert_eq!(status, 201, "creating {id}: {body}");
                    return body["shard"].as_u64().expect("shard in body") as u32;
                }
            }
        }
    }

    pub async fn account(&self, id: &str) -> Value {
        let (status, body) = self.get(&format!("/accounts/{id}")).await;
        assert_eq!(status, 200, "reading {id}: {body}");
        body
    }

    pub async fn balance(&self, id: &str) -> i64 {
        self.account(id).await["balance"].as_i64().expect("balance")
    }

    /// Waits until no decision is owed an ack and none of `accounts` has funds held; panics after `timeout`.
    pub async fn settle(&self, accounts: &[&str], timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let (_, doubt) = self.get("/transactions?status=in_doubt").await;
            let mut settled = doubt["transactions"].as_array().is_some_and(|t| t.is_empty());
            for a in accounts {
                settled &= self.account(a).await["held"] == json!(0);
            }
            // A prepared credit holds nothing visible: ask every shard whether it still holds a transfer prepared.
            for p in &self.participants {
                let health = self.http.get(format!("{}/health", p.url())).send().await;
                let prepared = match health {
                    Ok(r) => r.json::<Value>().await.ok().and_then(|h| h["prepared"].as_u64()),
                    Err(_) => None,
                };
                settled &= prepared == Some(0);
            }
            if settled {
                return;
            }
            assert!(Instant::now() < deadline, "cluster did not settle in {timeout:?}: in doubt {doubt}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// An account read straight from shard `shard`, bypassing the coordinator (which may be down).
    pub async fn account_from(&self, shard: usize, id: &str) -> Value {
        let url = format!("{}/internal/accounts/{id}", self.participants[shard].url());
        let mut request = self.http.get(url);
        if let Some(token) = &self.cluster_token {
            request = request.header(common::wire::HEADER_CLUSTER_TOKEN, token);
        }
        request.send().await.expect("participant answers").json().await.expect("account JSON")
    }

    /// The transfer ids shard `shard` has finished, with their decisions, straight from the participant.
    pub async fn applied(&self, shard: usize) -> Vec<Value> {
        let url = format!("{}/internal/applied", self.participants[shard].url());
        let mut request = self.http.get(url);
        if let Some(token) = &self.cluster_token {
            request = request.header(common::wire::HEADER_CLUSTER_TOKEN, token);
        }
        let r = request.send().await.expect("participant answers");
        r.json().await.expect("applied list")
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for node in std::iter::once(&self.coordinator).chain(&self.participants) {
                eprintln!("--- {} : {}\n{}\n", node.name, node.describe(), node.log_tail(40));
            }
        }
        self.coordinator.kill();
        for p in &mut self.participants {
            p.kill();
        }
    }
}

/// Two account ids that live on different shards of two.
pub fn cross_shard_pair(prefix: &str) -> (String, String) {
    use common::ledger::{shard_of, AccountId};
    let shard = |s: &str| shard_of(&AccountId::new(s).expect("valid id"), 2);
    let a = format!("{prefix}-a");
    let b =
        (0..).map(|i| format!("{prefix}-b{i}")).find(|b| shard(b) != shard(&a)).expect("some id on the other shard");
    (a, b)
}
