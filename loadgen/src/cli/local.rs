//! `ledger cluster ...`: a local cluster for trying things out and for recovery drills. One coordinator and N
//! participants on loopback, started detached from the built binaries through `launch`, with their stores,
//! logs and pid files under one directory (`./data` by default). The layout is fixed by the first `up` and
//! kept in `cluster.json` there, which every later command parses: a restarted node gets the same command
//! line.

use super::utc_timestamp;
use crate::launch::{self, Binaries, Layout, NodeSpec};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// The coordinator's port when `LEDGER_BASE_PORT` is not set at the first `up`.
const DEFAULT_BASE_PORT: u16 = 7100;
const DEFAULT_PARTICIPANTS: usize = 2;
/// How long `up` and `start` wait for a node's `/health` (`LEDGER_START_TIMEOUT_S` overrides it).
const DEFAULT_START_TIMEOUT_S: u64 = 30;
/// How long `down` waits for a node to exit after SIGTERM before it sends SIGKILL (`LEDGER_STOP_TIMEOUT_S`).
const DEFAULT_STOP_TIMEOUT_S: u64 = 20;
/// How long a freshly spawned node may take to show up as a running process of its binary.
const SPAWN_TIMEOUT: Duration = Duration::from_secs(5);
/// Between checks on a process that is starting or stopping.
const PROCESS_POLL: Duration = Duration::from_millis(50);
/// One `GET /health` from `status`.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(1);
/// The coordinator's `/health` body that `status` prints.
const STATUS_BODY_TIMEOUT: Duration = Duration::from_secs(3);
/// Log lines shown when a node fails to start.
const FAILED_START_LOG_LINES: usize = 20;
/// Random bytes in the cluster secret.
const TOKEN_BYTES: usize = 32;
/// The file that keeps the layout; `cluster.env` is what the shell script of earlier versions wrote.
const LAYOUT_FILE: &str = "cluster.json";
const LEGACY_LAYOUT_FILE: &str = "cluster.env";
const TOKEN_FILE: &str = "cluster.token";

/// Variables that configure this command or are set per node by it, so never remembered as node settings.
const NOT_NODE_SETTINGS: &[&str] = &[
    "LEDGER_BASE_PORT",
    "LEDGER_URL",
    "LEDGER_CRASH_AT",
    "LEDGER_LISTEN",
    "LEDGER_DATA",
    "LEDGER_SHARD",
    "LEDGER_PARTICIPANTS",
    "LEDGER_START_TIMEOUT_S",
    "LEDGER_STOP_TIMEOUT_S",
    "LEDGER_TOKEN",
    "LEDGER_BIN_DIR",
    "LEDGER_CLUSTER_DIR",
    "LEDGER_COMMAND_NAME",
];

/// What `ledger cluster` takes; its help is on the `Cluster` subcommand in `bin/ledger.rs`.
#[derive(clap::Args, Debug)]
pub struct ClusterArgs {
    /// Where the nodes keep their stores, logs and pid files, and the cluster its layout and secret.
    #[arg(long, env = "LEDGER_CLUSTER_DIR", default_value = "data")]
    data_dir: PathBuf,
    #[command(subcommand)]
    command: ClusterCommand,
}

#[derive(clap::Subcommand, Debug)]
enum ClusterCommand {
    /// Start every node that is not running and wait until each answers GET /health with 200.
    Up {
        /// Participants (shards) of a new cluster; a cluster keeps the count of its first start.
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
        participants: Option<u16>,
    },
    /// SIGTERM every node and wait for it to exit (the data stays).
    Down,
    /// Which nodes run, and the coordinator's /health. Exits 1 if a node is down.
    Status,
    /// SIGKILL one node: a crash, for recovery drills.
    Kill {
        /// coordinator, p0, p1, ...
        node: String,
    },
    /// Start one node again with the same flags and data, and wait for its /health.
    Start {
        /// coordinator, p0, p1, ...
        node: String,
    },
    /// Show the node's log with tail (default: the last 50 lines; e.g. -f, or -n 200).
    Logs {
        /// coordinator, p0, p1, ...
        node: String,
        /// Arguments for tail.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        tail: Vec<String>,
    },
    /// Down, then delete the data directory (printing what it deletes).
    Reset,
}

#[derive(Debug, thiserror::Error)]
enum ClusterError {
    /// A message for the person at the terminal, printed as is.
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Launch(#[from] launch::LaunchError),
}

/// The layout every command after the first `up` repeats.
#[derive(Debug, Serialize, Deserialize)]
struct Saved {
    /// The coordinator's port; participant I listens at base + 1 + I.
    base_port: u16,
    /// Fixed for this data: the coordinator refuses another count.
    participants: usize,
    /// LEDGER_* variables given to every node, as they were at the first `up`.
    node_settings: BTreeMap<String, String>,
}

struct NodeSettings {
    /// Set in the node's environment.
    given: Vec<(String, String)>,
    /// `NAME=value` of every setting the node runs with.
    shown: Vec<String>,
}

/// The command's view of its directory.
struct Local {
    data: PathBuf,
    /// How the person called this command (`ledger cluster`, or `scripts/cluster.sh` through the shim), for
    /// messages that tell them what to type next.
    name: String,
    saved: Option<Saved>,
}

pub async fn run(args: ClusterArgs) -> ExitCode {
    let name = std::env::var("LEDGER_COMMAND_NAME").unwrap_or_else(|_| "ledger cluster".into());
    let mut local = Local { data: args.data_dir, name, saved: None };
    let result = match local.load() {
        Ok(()) => local.dispatch(args.command).await,
        Err(e) => Err(e),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("{}: {e}", local.name);
            ExitCode::FAILURE
        }
    }
}

/// The local cluster's coordinator, for the client commands and the demo when neither --url nor LEDGER_URL is
/// given: found as `ledger cluster` finds it, from the base port kept in `cluster.json` (under
/// LEDGER_CLUSTER_DIR, default ./data), else LEDGER_BASE_PORT, else 7100.
pub fn local_coordinator_url() -> String {
    let data = std::env::var_os("LEDGER_CLUSTER_DIR").map_or_else(|| PathBuf::from("data"), PathBuf::from);
    let saved = std::fs::read_to_string(data.join(LAYOUT_FILE))
        .ok()
        .and_then(|text| serde_json::from_str::<Saved>(&text).ok())
        .or_else(|| std::fs::read_to_string(data.join(LEGACY_LAYOUT_FILE)).ok().and_then(|t| parse_legacy(&t)));
    let port = match saved {
        Some(saved) => saved.base_port,
        None => std::env::var("LEDGER_BASE_PORT").ok().and_then(|p| p.parse().ok()).unwrap_or(DEFAULT_BASE_PORT),
    };
    format!("http://127.0.0.1:{port}")
}

fn refused(message: impl Into<String>) -> ClusterError {
    ClusterError::Refused(message.into())
}

fn env_seconds(name: &str, default: u64) -> Duration {
    Duration::from_secs(std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default))
}

impl Local {
    async fn dispatch(&mut self, command: ClusterCommand) -> Result<ExitCode, ClusterError> {
        match command {
            ClusterCommand::Up { participants } => self.up(participants.map(usize::from)).await,
            ClusterCommand::Down => {
                self.down(false)?;
                Ok(ExitCode::SUCCESS)
            }
            ClusterCommand::Status => self.status().await,
            ClusterCommand::Kill { node } => self.kill(&node),
            ClusterCommand::Start { node } => {
                self.check_node(&node)?;
                if let Ok(points) = std::env::var("LEDGER_CRASH_AT") {
                    println!("Crash point armed for this run of {node}: LEDGER_CRASH_AT={points}");
                }
                self.start_node(&node).await?;
                Ok(ExitCode::SUCCESS)
            }
            ClusterCommand::Logs { node, tail } => self.logs(&node, tail),
            ClusterCommand::Reset => self.reset(),
        }
    }

    /// The data directory as the messages name it: `./data` for a relative path.
    fn shown(&self) -> String {
        if self.data.is_relative() && !self.data.starts_with(".") {
            format!("./{}", self.data.display())
        } else {
            self.data.display().to_string()
        }
    }

    // ---- layout ----------------------------------------------------------------------------------------------

    fn load(&mut self) -> Result<(), ClusterError> {
        let path = self.data.join(LAYOUT_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let saved = serde_json::from_str(&text)
                    .map_err(|e| refused(format!("{} is not a cluster layout ({e})", path.display())))?;
                self.saved = Some(saved);
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let legacy = self.data.join(LEGACY_LAYOUT_FILE);
                match std::fs::read_to_string(&legacy) {
                    Ok(text) => {
                        let saved = parse_legacy(&text).ok_or_else(|| {
                            refused(format!(
                                "cannot read the layout in {} (written by an earlier version)",
                                legacy.display()
                            ))
                        })?;
                        self.saved = Some(saved);
                        self.save()
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    Err(e) => Err(e.into()),
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    fn save(&self) -> Result<(), ClusterError> {
        let Some(saved) = &self.saved else { return Ok(()) };
        std::fs::create_dir_all(&self.data)?;
        let text = serde_json::to_string_pretty(saved).map_err(std::io::Error::other)?;
        let path = self.data.join(LAYOUT_FILE);
        let temporary = path.with_extension("json.tmp");
        std::fs::write(&temporary, text + "\n")?;
        std::fs::rename(temporary, path)?;
        Ok(())
    }

    fn saved(&self) -> Result<&Saved, ClusterError> {
        self.saved.as_ref().ok_or_else(|| {
            refused(format!(
                "no cluster in {} (no {}): run {} up first",
                self.shown(),
                self.data.join(LAYOUT_FILE).display(),
                self.name
            ))
        })
    }

    fn layout(&self) -> Result<Layout, ClusterError> {
        let saved = self.saved()?;
        let mut layout = Layout::with_base_port(&self.data, saved.base_port, saved.participants);
        layout.cluster_token_file = Some(self.data.join(TOKEN_FILE));
        Ok(layout)
    }

    fn nodes(&self) -> Result<Vec<NodeSpec>, ClusterError> {
        let binaries = Binaries::locate()?;
        Ok(self.layout()?.nodes(binaries)?)
    }

    /// Node names, participants first.
    fn names(&self) -> Result<Vec<String>, ClusterError> {
        let participants = self.saved()?.participants;
        Ok((0..participants).map(|i| format!("p{i}")).chain(std::iter::once("coordinator".into())).collect())
    }

    fn check_node(&self, node: &str) -> Result<(), ClusterError> {
        let names = self.names()?;
        if names.iter().any(|n| n == node) {
            Ok(())
        } else {
            Err(refused(format!("unknown node '{node}': the nodes are {}", names.join(" "))))
        }
    }

    fn spec(&self, node: &str) -> Result<NodeSpec, ClusterError> {
        self.check_node(node)?;
        let nodes = self.nodes()?;
        nodes.into_iter().find(|n| n.name == node).ok_or_else(|| refused(format!("unknown node '{node}'")))
    }

    fn url_of(&self, node: &str) -> Result<String, ClusterError> {
        let layout = self.layout()?;
        let listen = match node.strip_prefix('p').and_then(|i| i.parse::<usize>().ok()) {
            Some(i) => &layout.participants[i],
            None => &layout.coordinator,
        };
        Ok(format!("http://{listen}"))
    }

    /// A fresh random secret, readable by this user only; kept across restarts (every node must share it).
    fn ensure_token(&self) -> Result<(), ClusterError> {
        use std::os::unix::fs::OpenOptionsExt as _;
        let path = self.data.join(TOKEN_FILE);
        if std::fs::metadata(&path).is_ok_and(|m| m.len() > 0) {
            return Ok(());
        }
        std::fs::create_dir_all(&self.data)?;
        let mut bytes = Vec::with_capacity(TOKEN_BYTES);
        while bytes.len() < TOKEN_BYTES {
            bytes.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
        }
        let token: String = bytes[..TOKEN_BYTES].iter().map(|b| format!("{b:02x}")).collect();
        let temporary = path.with_extension("token.tmp");
        let _ = std::fs::remove_file(&temporary);
        let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&temporary)?;
        file.write_all(token.as_bytes())?;
        std::fs::rename(temporary, path)?;
        Ok(())
    }

    // ---- processes -------------------------------------------------------------------------------------------

    fn pid_file(&self, node: &str) -> PathBuf {
        self.data.join(format!("{node}.pid"))
    }

    fn log_file(&self, node: &str) -> PathBuf {
        self.data.join(format!("{node}.log"))
    }

    fn pid_of(&self, node: &str) -> Option<u32> {
        std::fs::read_to_string(self.pid_file(node)).ok().and_then(|s| s.trim().parse().ok())
    }

    fn running(&self, node: &str) -> Option<u32> {
        self.pid_of(node).filter(|pid| pid_alive(node, *pid))
    }

    fn remove_pid_file(&self, node: &str) {
        let _ = std::fs::remove_file(self.pid_file(node));
    }

    /// Remembered settings, except those the caller's environment sets now: those to give the node, and every
    /// setting it runs with, for its log.
    fn settings(&self) -> Result<NodeSettings, ClusterError> {
        let mut given = Vec::new();
        let mut shown = Vec::new();
        for (name, value) in &self.saved()?.node_settings {
            match std::env::var(name) {
                Ok(now) => shown.push(format!("{name}={now}")),
                Err(_) => {
                    given.push((name.clone(), value.clone()));
                    shown.push(format!("{name}={value}"));
                }
            }
        }
        Ok(NodeSettings { given, shown })
    }

    /// Starts one node detached from this process (its own session, so Ctrl-C here does not reach it) and
    /// records its pid.
    fn spawn(&self, spec: &NodeSpec) -> Result<std::process::Child, ClusterError> {
        let port = spec.port();
        if port_busy(port) {
            return Err(refused(format!(
                "{}: port {port} is already in use by another process (set LEDGER_BASE_PORT, or stop it)",
                spec.name
            )));
        }
        let NodeSettings { given: settings, mut shown } = self.settings()?;
        std::fs::create_dir_all(self.data.join(&spec.name))?;
        self.remove_pid_file(&spec.name);
        let crash_at = std::env::var("LEDGER_CRASH_AT").ok().filter(|s| !s.is_empty());
        if let Some(points) = &crash_at {
            shown.push(format!("LEDGER_CRASH_AT={points}"));
        }
        let mut log = std::fs::OpenOptions::new().create(true).append(true).open(&spec.log)?;
        let settings_text = if shown.is_empty() { String::new() } else { format!("{} ", shown.join(" ")) };
        let started = utc_timestamp(std::time::SystemTime::now());
        writeln!(log, "==== {started} {} starting {}: {settings_text}{}", self.name, spec.name, spec.describe())?;
        let mut command = spec.command(&settings, crash_at.as_deref())?;
        // SAFETY: setsid is async-signal-safe and touches no memory of this process.
        unsafe {
            command.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let child = command.spawn().map_err(|error| launch::LaunchError::Spawn {
            name: spec.name.clone(),
            program: spec.program.display().to_string(),
            error,
        })?;
        std::fs::write(self.pid_file(&spec.name), format!("{}\n", child.id()))?;
        Ok(child)
    }

    /// Starts a node unless it runs, and waits until it answers /health; reports a node that dies while
    /// starting with the end of its log.
    async fn start_node(&self, node: &str) -> Result<(), ClusterError> {
        if let Some(pid) = self.running(node) {
            println!("{node} is already running (pid {pid})");
            return Ok(());
        }
        let spec = self.spec(node)?;
        let mut child = self.spawn(&spec)?;
        let pid = child.id();
        let started = Instant::now();
        while !pid_alive(node, pid) && child.try_wait().is_ok_and(|s| s.is_none()) {
            if started.elapsed() > SPAWN_TIMEOUT {
                return Err(refused(format!("{node}: did not start (not running the binary after 5 s)")));
            }
            tokio::time::sleep(PROCESS_POLL).await;
        }
        let timeout = env_seconds("LEDGER_START_TIMEOUT_S", DEFAULT_START_TIMEOUT_S);
        let url = spec.url();
        let healthy = launch::wait_healthy(node, &url, timeout, || child.try_wait().is_ok_and(|s| s.is_none()));
        match healthy.await {
            Ok(()) => {
                let data = self.data.join(node);
                println!("{:<12} {:<24} pid {:<8} data {}", node, spec.url(), pid, data.display());
                Ok(())
            }
            Err(launch::LaunchError::Exited { .. }) => {
                self.remove_pid_file(node);
                eprintln!("{}: {node} (pid {pid}) exited during start-up", self.name);
                self.print_log_tail(node);
                Err(refused(format!("{node} did not start")))
            }
            Err(_) => {
                eprintln!(
                    "{}: {node} (pid {pid}) did not answer GET {}/health with 200 within {}s; it is still running \
                     ({} logs {node}; kill {node})",
                    self.name,
                    spec.url(),
                    timeout.as_secs(),
                    self.name
                );
                self.print_log_tail(node);
                Err(refused(format!("{node} did not become healthy")))
            }
        }
    }

    fn print_log_tail(&self, node: &str) {
        let log = self.log_file(node);
        eprintln!("---- last lines of {} ----", log.display());
        let tail = launch::log_tail(&log, FAILED_START_LOG_LINES);
        eprintln!("{}", if tail.is_empty() { "(no log)" } else { &tail });
        eprintln!("----");
    }

    /// SIGTERM to each node that runs, then waits for each (SIGKILL after the stop timeout).
    fn stop(&self, nodes: &[String]) {
        let mut stopping = Vec::new();
        for node in nodes {
            match self.running(node) {
                Some(pid) => {
                    signal(pid, libc::SIGTERM);
                    println!("{node}: SIGTERM sent (pid {pid})");
                    stopping.push((node, pid));
                }
                None => {
                    if self.pid_file(node).exists() {
                        println!("{node}: not running (removing a stale pid file)");
                    }
                    self.remove_pid_file(node);
                }
            }
        }
        let timeout = env_seconds("LEDGER_STOP_TIMEOUT_S", DEFAULT_STOP_TIMEOUT_S);
        let deadline = Instant::now() + timeout;
        for (node, pid) in stopping {
            while pid_alive(node, pid) && Instant::now() < deadline {
                std::thread::sleep(PROCESS_POLL);
            }
            if pid_alive(node, pid) {
                eprintln!("{node}: still running {}s after SIGTERM; SIGKILL (its data is durable)", timeout.as_secs());
                signal(pid, libc::SIGKILL);
                while pid_alive(node, pid) {
                    std::thread::sleep(PROCESS_POLL);
                }
            }
            println!("{node}: stopped");
            self.remove_pid_file(node);
        }
    }

    // ---- commands --------------------------------------------------------------------------------------------

    async fn up(&mut self, want: Option<usize>) -> Result<ExitCode, ClusterError> {
        let data = self.shown();
        let base_port_now = std::env::var("LEDGER_BASE_PORT").ok();
        match &self.saved {
            Some(saved) => {
                if want.is_some_and(|n| n != saved.participants) {
                    return Err(refused(format!(
                        "{data} was set up with {} participants, and the coordinator refuses another count \
                         (accounts would map to other shards). Run {} reset first to start from scratch.",
                        saved.participants, self.name
                    )));
                }
                if base_port_now.as_ref().is_some_and(|p| *p != saved.base_port.to_string()) {
                    return Err(refused(format!(
                        "{data} was set up with LEDGER_BASE_PORT={} (participants remember the coordinator's \
                         URL). Use that, or run {} reset first.",
                        saved.base_port, self.name
                    )));
                }
            }
            None => {
                let participants = want.unwrap_or(DEFAULT_PARTICIPANTS);
                let base_port = match &base_port_now {
                    None => DEFAULT_BASE_PORT,
                    Some(text) => text
                        .parse::<u16>()
                        .ok()
                        .filter(|p| *p >= 1 && usize::from(*p) + participants <= usize::from(u16::MAX))
                        .ok_or_else(|| {
                            refused("LEDGER_BASE_PORT must be a port number with room for the nodes after it")
                        })?,
                };
                let node_settings = std::env::vars()
                    .filter(|(name, _)| name.starts_with("LEDGER_") && !NOT_NODE_SETTINGS.contains(&name.as_str()))
                    .collect();
                self.saved = Some(Saved { base_port, participants, node_settings });
                self.save()?;
            }
        }
        self.ensure_token()?;
        let names = self.names()?;
        let to_start: Vec<&String> = names.iter().filter(|n| self.running(n).is_none()).collect();
        if to_start.is_empty() {
            println!("The cluster is already running; nothing to do.");
            return self.status().await;
        }
        if to_start.len() < names.len() {
            let list: Vec<&str> = to_start.iter().map(|s| s.as_str()).collect();
            println!("Some nodes are already running; starting only: {}", list.join(" "));
        }
        println!("Starting (data in {data}, logs in {data}/<node>.log):");
        for node in to_start {
            self.start_node(node).await?;
        }
        println!();
        let url = self.url_of("coordinator")?;
        println!("Cluster up. Public API: {url}   (try: scripts/demo.sh, or curl {url}/health)");
        let settings: Vec<String> = self.saved()?.node_settings.iter().map(|(k, v)| format!("{k}={v}")).collect();
        if !settings.is_empty() {
            println!("Node settings: {}", settings.join(" "));
        }
        Ok(ExitCode::SUCCESS)
    }

    fn down(&self, quiet: bool) -> Result<(), ClusterError> {
        if self.saved.is_none() {
            println!("No cluster in {}; nothing to stop.", self.shown());
            return Ok(());
        }
        // The coordinator first, so it stops sending work to participants that are going away.
        let mut names = self.names()?;
        names.rotate_right(1);
        self.stop(&names);
        if !quiet {
            println!("Cluster down. Data kept in {} ({} reset deletes it).", self.shown(), self.name);
        }
        Ok(())
    }

    async fn status(&self) -> Result<ExitCode, ClusterError> {
        let mut all_up = true;
        println!("{:<12} {:<24} {:<8} {:<14} GET /health", "NODE", "URL", "PID", "PROCESS");
        let http = reqwest::Client::builder().timeout(HEALTH_TIMEOUT).build().map_err(std::io::Error::other)?;
        for node in self.names()? {
            let url = self.url_of(&node)?;
            let pid = self.pid_of(&node);
            let (state, code) = match pid {
                Some(pid) if pid_alive(&node, pid) => {
                    let code = match http.get(format!("{url}/health")).send().await {
                        Ok(r) => r.status().as_u16().to_string(),
                        Err(_) => "000".to_string(),
                    };
                    ("running", code)
                }
                Some(_) => ("dead", "-".to_string()),
                None => ("not running", "-".to_string()),
            };
            if state != "running" {
                all_up = false;
            }
            let pid = pid.map_or("-".to_string(), |p| p.to_string());
            println!("{node:<12} {url:<24} {pid:<8} {state:<14} {code}");
        }
        println!();
        println!("Coordinator GET /health:");
        let url = self.url_of("coordinator")?;
        let body = async {
            let r = http.get(format!("{url}/health")).timeout(STATUS_BODY_TIMEOUT).send().await.ok()?;
            r.text().await.ok()
        };
        match body.await {
            Some(text) => match serde_json::from_str::<serde_json::Value>(&text) {
                Ok(json) => println!("{}", serde_json::to_string_pretty(&json).unwrap_or(text)),
                Err(_) => println!("{text}"),
            },
            None => {
                println!("(no answer from {url})");
                all_up = false;
            }
        }
        Ok(if all_up { ExitCode::SUCCESS } else { ExitCode::FAILURE })
    }

    fn kill(&self, node: &str) -> Result<ExitCode, ClusterError> {
        self.check_node(node)?;
        let Some(pid) = self.running(node) else {
            self.remove_pid_file(node);
            println!("{node} is not running.");
            return Ok(ExitCode::SUCCESS);
        };
        signal(pid, libc::SIGKILL);
        while pid_alive(node, pid) {
            std::thread::sleep(PROCESS_POLL);
        }
        self.remove_pid_file(node);
        println!("{node}: killed with SIGKILL (pid {pid}). Bring it back with: {} start {node}", self.name);
        Ok(ExitCode::SUCCESS)
    }

    fn logs(&self, node: &str, mut tail: Vec<String>) -> Result<ExitCode, ClusterError> {
        self.check_node(node)?;
        let log = self.log_file(node);
        if !log.exists() {
            return Err(refused(format!("no log yet at {}", log.display())));
        }
        if tail.is_empty() {
            tail = vec!["-n".into(), "50".into()];
        }
        let error = std::process::Command::new("tail").args(&tail).arg(&log).exec();
        Err(refused(format!("cannot run tail: {error}")))
    }

    fn reset(&mut self) -> Result<ExitCode, ClusterError> {
        if self.saved.is_some() {
            self.down(true)?;
        }
        let shown = self.shown();
        if !self.data.is_dir() {
            println!("No ./{shown} to delete.");
            return Ok(ExitCode::SUCCESS);
        }
        println!("Deleting ./{shown}:");
        let mut entries: Vec<PathBuf> =
            std::fs::read_dir(&self.data)?.filter_map(|e| e.ok().map(|e| e.path())).collect();
        entries.sort();
        for entry in entries {
            println!("  {}", entry.display());
        }
        std::fs::remove_dir_all(&self.data)?;
        self.saved = None;
        println!("Deleted.");
        Ok(ExitCode::SUCCESS)
    }
}

/// True if `pid` is a live (not zombie) process of this node's binary: pids get reused.
fn pid_alive(node: &str, pid: u32) -> bool {
    let binary = if node == "coordinator" { "coordinator" } else { "participant" };
    let Ok(pid_signed) = i32::try_from(pid) else { return false };
    // SAFETY: signal 0 only checks that the process exists and may be signalled.
    if unsafe { libc::kill(pid_signed, 0) } != 0 {
        return false;
    }
    let proc_dir = Path::new("/proc").join(pid.to_string());
    match std::fs::read_to_string(proc_dir.join("comm")) {
        Ok(comm) => {
            let state = std::fs::read_to_string(proc_dir.join("stat")).ok().and_then(|stat| {
                // The state follows the command name in parentheses, which may itself hold spaces.
                stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next().map(str::to_owned))
            });
            comm.trim() == binary && state.as_deref() != Some("Z")
        }
        // No /proc (not Linux): ask ps.
        Err(_) => std::process::Command::new("ps")
            .args(["-o", "comm=", "-p", &pid.to_string()])
            .output()
            .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim().ends_with(binary)),
    }
}

fn signal(pid: u32, signal: i32) {
    if let Ok(pid) = i32::try_from(pid) {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe {
            libc::kill(pid, signal);
        }
    }
}

/// True if something accepts connections on this loopback port.
fn port_busy(port: u16) -> bool {
    let address = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    std::net::TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_ok()
}

/// The layout that the shell script of earlier versions kept in `cluster.env`: read, never executed. Only
/// plain words are accepted; anything quoted or escaped is refused rather than guessed at.
fn parse_legacy(text: &str) -> Option<Saved> {
    let mut base_port = None;
    let mut participants = None;
    let mut node_settings = BTreeMap::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let (key, value) = line.split_once('=')?;
        match key {
            "CLUSTER_BASE_PORT" => base_port = value.parse().ok(),
            "CLUSTER_PARTICIPANTS" => participants = value.parse().ok(),
            "CLUSTER_NODE_SETTINGS" => {
                let inner = value.strip_prefix('(')?.strip_suffix(')')?;
                for word in inner.split_whitespace() {
                    if word.contains(['\\', '\'', '"', '$', '`']) {
                        return None;
                    }
                    let (name, setting) = word.split_once('=')?;
                    node_settings.insert(name.to_string(), setting.to_string());
                }
            }
            _ => return None,
        }
    }
    Some(Saved { base_port: base_port?, participants: participants?, node_settings })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_utc_calendar_dates() {
        let at = |s: u64| utc_timestamp(std::time::UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(at(1_796_354_339), "2026-12-04T03:18:59Z");
    }

    #[test]
    fn the_shell_scripts_layout_is_read_and_never_run() {
        let text = "# Written by scripts/cluster.sh up\nCLUSTER_BASE_PORT=7300\nCLUSTER_PARTICIPANTS=3\n\
                    CLUSTER_NODE_SETTINGS=( LEDGER_IN_DOUBT_AFTER_MS=500 )\n";
        let saved = parse_legacy(text).expect("a layout");
        assert_eq!((saved.base_port, saved.participants), (7300, 3));
        assert_eq!(saved.node_settings.get("LEDGER_IN_DOUBT_AFTER_MS").map(String::as_str), Some("500"));
        assert!(parse_legacy("CLUSTER_BASE_PORT=7100\nCLUSTER_PARTICIPANTS=2\nCLUSTER_NODE_SETTINGS=( X=$(rm) )\n")
            .is_none());
        assert!(parse_legacy("CLUSTER_PARTICIPANTS=2\n").is_none(), "a port is required");
    }
}
