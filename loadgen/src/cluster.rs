//! The cluster of a test, the benchmark or the drill: a coordinator and N participants on free loopback ports,
//! each with its own data dir inside a temp dir, started through `launch`. Nodes can be SIGKILLed, restarted
//! with the same flags, or started with a crash point armed. Children are killed on drop; if the test is
//! failing, every node's command line and log tail is printed.

pub use crate::launch::{free_port, Binaries, Node};
use crate::launch::{Layout, NodeSpec, START_TIMEOUT};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The directory holding `coordinator`, `participant` and the tools (see `Binaries::locate`).
pub fn bin_dir() -> PathBuf {
    Binaries::locate().unwrap_or_else(|e| panic!("{e}")).dir.clone()
}

/// Attempts at creating an account that the coordinator answers 503.
const CREATE_ATTEMPTS_MAX: u32 = 5;

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
    /// `host:port` of the coordinator and of each participant, instead of free loopback ports.
    pub addresses: Option<(String, Vec<String>)>,
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
            addresses: None,
        }
    }
}

impl Cluster {
    pub async fn start() -> Cluster {
        Cluster::start_with(Options::default()).await
    }

    pub async fn start_with(options: Options) -> Cluster {
        Cluster::start_adjusted(options, |_| {}).await
    }

    /// Starts a cluster whose command lines `adjust` may change first (a node run inside a network namespace,
    /// say), from the layout that `options` give.
    pub async fn start_adjusted(options: Options, adjust: impl FnOnce(&mut Vec<NodeSpec>)) -> Cluster {
        // LEDGER_KEEP_DATA=1 keeps the data directories after the run, to inspect a failed drill.
        let keep = std::env::var("LEDGER_KEEP_DATA").is_ok_and(|v| v == "1");
        let dir = tempfile::Builder::new().disable_cleanup(keep).tempdir().expect("temp dir");
        let mut layout = Layout::with_free_ports(dir.path(), options.participants);
        if let Some(addresses) = options.addresses {
            layout.coordinator = addresses.0;
            layout.participants = addresses.1;
        }
        let cluster_token = options.cluster_token.then(|| {
            let token = format!("{:032x}", uuid::Uuid::new_v4().as_u128());
            let path = dir.path().join("cluster.token");
            std::fs::write(&path, &token).expect("write cluster token");
            layout.cluster_token_file = Some(path);
            token
        });
        // Short, so tests see in-doubt transfers resolved quickly.
        layout.participant_args = ["--in-doubt-after-ms", "500"].map(String::from).to_vec();
        layout.participant_args.extend(options.participant_args);
        layout.coordinator_args = ["--prepare-timeout-ms", "1500"].map(String::from).to_vec();
        if let Some(tokens) = &options.api_tokens {
            let path = dir.path().join("api.tokens");
            std::fs::write(&path, tokens).expect("write API tokens");
            layout.coordinator_args.extend(["--api-tokens-file".to_string(), path.display().to_string()]);
        }
        layout.coordinator_args.extend(options.coordinator_args);
        let mut specs =
            layout.nodes(Binaries::locate().unwrap_or_else(|e| panic!("{e}"))).unwrap_or_else(|e| panic!("{e}"));
        adjust(&mut specs);
        let env = vec![("RUST_LOG".to_string(), options.log_filter.clone())];
        let mut nodes: Vec<Node> = specs.into_iter().map(|spec| Node::new(spec, env.clone())).collect();
        let coordinator = nodes.pop().expect("a coordinator");
        let http = reqwest::Client::builder().timeout(Duration::from_secs(20)).build().expect("http client");
        let mut cluster = Cluster { dir, coordinator, participants: nodes, http, cluster_token };
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
        crate::launch::wait_healthy(url, url, START_TIMEOUT, || true).await.unwrap_or_else(|e| panic!("{e}"));
    }

    /// Restarts a node (with crash points disarmed unless given) and waits until it is healthy.
    pub async fn restart(&mut self, name: &str, crash_at: Option<&str>) {
        let node = self.node(name);
        node.kill();
        node.start(crash_at).await.unwrap_or_else(|e| panic!("restarting {name}: {e}"));
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
            let (_, doubt) = self.get("/transactions?status=unacknowledged").await;
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
            assert!(Instant::now() < deadline, "cluster did not settle in {timeout:?}: unacknowledged {doubt}");
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

/// An account id that starts with `prefix` and lives on `shard` of `shard_count`.
pub fn account_on_shard(prefix: &str, shard: u32, shard_count: u32) -> String {
    use common::ledger::{shard_of, AccountId};
    let on = |s: &str| shard_of(&AccountId::new(s).expect("valid id"), shard_count);
    (0..).map(|i| format!("{prefix}-{i}")).find(|id| on(id) == shard).expect("some id on the shard")
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
