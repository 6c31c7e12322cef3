//! The one launcher of the ledger's processes, used by `ledger cluster`, the integration tests, the benchmark
//! and the drill. It finds the `coordinator` and `participant` binaries, writes every node's command line from
//! one `Layout`, starts a node (as a child that this process reaps, or detached for `ledger cluster`), waits for
//! its `/health`, and stops it.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Long enough for a debug build to open its store and recover on a loaded 2-core machine.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// In the target directory: the lock and the stamp that make one build per nextest run (`build_workspace`).
const BUILD_LOCK_FILE: &str = ".ledger-launch-build.lock";
const BUILD_STAMP_FILE: &str = ".ledger-launch-build.run";
/// How often a starting node's `/health` is asked.
const HEALTH_POLL: Duration = Duration::from_millis(50);
/// One `/health` request; a node that takes longer is not ready.
const HEALTH_REQUEST_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("{0} is missing: build it with `cargo build --release --workspace --bins`, or set LEDGER_BIN_DIR")]
    Missing(PathBuf),
    #[error("building the binaries failed ({0})")]
    Build(String),
    #[error("cannot start {name} ({program}): {error}")]
    Spawn { name: String, program: String, error: std::io::Error },
    #[error("{0}: cannot open its log: {1}")]
    Log(String, std::io::Error),
    #[error("{name} exited during start-up")]
    Exited { name: String },
    #[error("{name} did not answer GET {url}/health with 200 within {timeout:?}")]
    NotHealthy { name: String, url: String, timeout: Duration },
}

/// The directory holding `coordinator`, `participant` and `ledger`.
#[derive(Clone, Debug)]
pub struct Binaries {
    pub dir: PathBuf,
}

impl Binaries {
    /// `LEDGER_BIN_DIR` if set. Otherwise the running executable's directory, except for a test executable
    /// (under `deps/`) run by cargo or cargo-nextest: then the workspace's binaries are built first (once per
    /// process, or once per nextest run), with the same cargo and profile, so that `cargo test` and `cargo
    /// nextest run` need no build step before them.
    pub fn locate() -> Result<&'static Binaries, LaunchError> {
        static FOUND: OnceLock<Result<Binaries, String>> = OnceLock::new();
        FOUND
            .get_or_init(|| Self::find().map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|e| LaunchError::Build(e.clone()))
    }

    fn find() -> Result<Binaries, LaunchError> {
        if let Some(dir) = std::env::var_os("LEDGER_BIN_DIR") {
            return Ok(Binaries { dir: PathBuf::from(dir) });
        }
        let exe = std::env::current_exe().map_err(|e| LaunchError::Build(format!("no path to this program: {e}")))?;
        let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
        if dir.ends_with("deps") {
            dir.pop();
            if let Some(cargo) = std::env::var_os("CARGO") {
                build_workspace(&cargo, &dir, dir.ends_with("release"))?;
            }
        }
        Ok(Binaries { dir })
    }

    /// The path of one of the workspace's binaries, which must exist.
    pub fn path(&self, name: &str) -> Result<PathBuf, LaunchError> {
        let path = self.dir.join(name);
        if path.exists() {
            Ok(path)
        } else {
            Err(LaunchError::Missing(path))
        }
    }
}

/// Builds the workspace's binaries for the tests, once per test process, or once per run under cargo-nextest,
/// which starts every test as a process of its own: the first test of a run (`NEXTEST_RUN_ID`) to get here
/// builds while holding a lock in the target directory, and the others wait for it, find its stamp and build
/// nothing. (Concurrent cargo builds would not race, since cargo locks its build directory, but each would
/// still cost a check of every crate.)
fn build_workspace(cargo: &std::ffi::OsStr, dir: &Path, release: bool) -> Result<(), LaunchError> {
    let Some(run) = std::env::var_os("NEXTEST_RUN_ID") else {
        return cargo_build(cargo, release);
    };
    let io = |what: &str, error: std::io::Error| LaunchError::Build(format!("{what}: {error}"));
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(BUILD_LOCK_FILE))
        .map_err(|e| io("cannot open the build lock", e))?;
    // SAFETY: flock on a descriptor this function owns; the lock ends when `lock` is closed, on return.
    if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) } != 0 {
        return Err(io("cannot take the build lock", std::io::Error::last_os_error()));
    }
    let stamp = dir.join(BUILD_STAMP_FILE);
    let run = run.to_string_lossy();
    if std::fs::read_to_string(&stamp).is_ok_and(|built_for| built_for == run) {
        return Ok(());
    }
    cargo_build(cargo, release)?;
    std::fs::write(&stamp, run.as_bytes()).map_err(|e| io("cannot write the build stamp", e))
}

/// `cargo build --workspace --bins --tests`: what the tests start is what the tree holds now. `--tests` makes
/// cargo resolve features as `cargo test --workspace` does (dev-dependencies turn on features of shared
/// crates, such as serde's `rc`), so these are the binaries the test build made already; without it cargo
/// would build every crate a second time, with other features.
fn cargo_build(cargo: &std::ffi::OsStr, release: bool) -> Result<(), LaunchError> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap_or(Path::new("."));
    let mut command = Command::new(cargo);
    command.args(["build", "--quiet", "--workspace", "--bins", "--tests"]).current_dir(root);
    if release {
        command.arg("--release");
    }
    eprintln!("launch: building the binaries the tests start ({command:?})");
    let status = command.status().map_err(|e| LaunchError::Build(e.to_string()))?;
    if !status.success() {
        return Err(LaunchError::Build(format!("cargo build exited with {status}")));
    }
    Ok(())
}

/// A loopback port nobody listens on now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free loopback port")
}

/// Where a cluster's nodes listen and keep their files, and the flags they share. Every launcher turns a layout
/// into command lines through `Layout::nodes`, so a test, the benchmark and `ledger cluster` start a node the
/// same way.
#[derive(Clone, Debug)]
pub struct Layout {
    /// `host:port` of the coordinator.
    pub coordinator: String,
    /// `host:port` of each participant, by shard.
    pub participants: Vec<String>,
    /// Node `x` keeps its store in `data/x` and its log in `data/x.log`.
    pub data: PathBuf,
    /// The cluster's shared secret, given to every node.
    pub cluster_token_file: Option<PathBuf>,
    /// Extra flags for the coordinator.
    pub coordinator_args: Vec<String>,
    /// Extra flags for every participant.
    pub participant_args: Vec<String>,
}

impl Layout {
    /// The ports `ledger cluster` uses: the coordinator at `base`, participant `i` at `base + 1 + i`.
    pub fn with_base_port(data: &Path, base: u16, participants: usize) -> Layout {
        let at = |offset: usize| format!("127.0.0.1:{}", base as usize + offset);
        Layout::new(data, at(0), (0..participants).map(|i| at(1 + i)).collect())
    }

    /// Free loopback ports, for a cluster of a test or a benchmark.
    pub fn with_free_ports(data: &Path, participants: usize) -> Layout {
        let at = || format!("127.0.0.1:{}", free_port());
        Layout::new(data, at(), (0..participants).map(|_| at()).collect())
    }

    pub fn new(data: &Path, coordinator: String, participants: Vec<String>) -> Layout {
        Layout {
            coordinator,
            participants,
            data: data.to_path_buf(),
            cluster_token_file: None,
            coordinator_args: Vec::new(),
            participant_args: Vec::new(),
        }
    }

    /// Every node, participants first (the coordinator asks them for their state as it starts).
    pub fn nodes(&self, binaries: &Binaries) -> Result<Vec<NodeSpec>, LaunchError> {
        let participant = binaries.path("participant")?;
        let mut nodes: Vec<NodeSpec> =
            (0..self.participants.len()).map(|shard| self.participant(&participant, shard)).collect();
        nodes.push(self.coordinator(&binaries.path("coordinator")?));
        Ok(nodes)
    }

    /// Participant `shard`, run from `program`.
    pub fn participant(&self, program: &Path, shard: usize) -> NodeSpec {
        let name = format!("p{shard}");
        let listen = &self.participants[shard];
        let mut args = vec!["--shard".to_string(), shard.to_string()];
        args.extend(self.listen_and_data(&name, listen));
        args.extend(self.participant_args.iter().cloned());
        self.spec(name, program, listen, args)
    }

    /// The coordinator, run from `program`.
    pub fn coordinator(&self, program: &Path) -> NodeSpec {
        let urls: Vec<String> = self.participants.iter().map(|a| format!("http://{a}")).collect();
        let mut args = self.listen_and_data("coordinator", &self.coordinator);
        args.extend(["--participants".to_string(), urls.join(",")]);
        args.extend(self.coordinator_args.iter().cloned());
        self.spec("coordinator".into(), program, &self.coordinator, args)
    }

    fn listen_and_data(&self, name: &str, listen: &str) -> Vec<String> {
        let mut args =
            vec!["--listen".into(), listen.into(), "--data".into(), self.data.join(name).display().to_string()];
        if let Some(token) = &self.cluster_token_file {
            args.extend(["--cluster-token-file".into(), token.display().to_string()]);
        }
        args
    }

    fn spec(&self, name: String, program: &Path, listen: &str, args: Vec<String>) -> NodeSpec {
        let log = self.data.join(format!("{name}.log"));
        NodeSpec { name, program: program.to_path_buf(), prefix: Vec::new(), args, listen: listen.into(), log }
    }
}

/// One node's command line and files.
#[derive(Clone, Debug)]
pub struct NodeSpec {
    /// `coordinator`, `p0`, `p1`, ...
    pub name: String,
    pub program: PathBuf,
    /// A command the node runs under, such as `ip netns exec <ns>` (empty: none).
    pub prefix: Vec<String>,
    pub args: Vec<String>,
    /// `host:port` the node serves HTTP on.
    pub listen: String,
    /// Its stdout and stderr are appended here.
    pub log: PathBuf,
}

impl NodeSpec {
    pub fn url(&self) -> String {
        format!("http://{}", self.listen)
    }

    pub fn port(&self) -> u16 {
        self.listen.rsplit(':').next().and_then(|p| p.parse().ok()).unwrap_or(0)
    }

    /// Gives `flag` this value, in place if the command line has it already.
    pub fn set_flag(&mut self, flag: &str, value: &str) {
        match self.args.iter().position(|a| a == flag) {
            Some(i) if i + 1 < self.args.len() => self.args[i + 1] = value.into(),
            _ => self.args.extend([flag.to_string(), value.to_string()]),
        }
    }

    /// The full command line, as a person would type it.
    pub fn describe(&self) -> String {
        let program = self.program.display().to_string();
        self.prefix.iter().chain(std::iter::once(&program)).chain(&self.args).cloned().collect::<Vec<_>>().join(" ")
    }

    /// The process to start: output appended to the log, `LEDGER_CRASH_AT` set only if `crash_at` is given.
    pub fn command(&self, env: &[(String, String)], crash_at: Option<&str>) -> Result<Command, LaunchError> {
        let open = || std::fs::OpenOptions::new().create(true).append(true).open(&self.log);
        let log_error = |e| LaunchError::Log(self.name.clone(), e);
        if let Some(dir) = self.log.parent() {
            std::fs::create_dir_all(dir).map_err(log_error)?;
        }
        let stdout = open().map_err(log_error)?;
        let stderr = open().map_err(log_error)?;
        let mut command = match self.prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(&self.program);
                c
            }
            None => Command::new(&self.program),
        };
        command.args(&self.args).stdin(Stdio::null()).stdout(stdout).stderr(stderr);
        command.env_remove("LEDGER_CRASH_AT").envs(env.iter().map(|(k, v)| (k, v)));
        if let Some(points) = crash_at {
            command.env("LEDGER_CRASH_AT", points);
        }
        Ok(command)
    }
}

/// Asks `url/health` until it answers 200. `alive` is asked between tries, so a node that dies while starting
/// is reported at once rather than after the timeout.
pub async fn wait_healthy(
    name: &str,
    url: &str,
    timeout: Duration,
    mut alive: impl FnMut() -> bool,
) -> Result<(), LaunchError> {
    let deadline = Instant::now() + timeout;
    // Unpooled, so waiting for a node leaves no connection to it open.
    let probe = reqwest::Client::builder().pool_max_idle_per_host(0).build().expect("an HTTP client");
    loop {
        let answer = probe.get(format!("{url}/health")).timeout(HEALTH_REQUEST_TIMEOUT).send().await;
        if answer.is_ok_and(|r| r.status().is_success()) {
            return Ok(());
        }
        if !alive() {
            return Err(LaunchError::Exited { name: name.into() });
        }
        if Instant::now() >= deadline {
            return Err(LaunchError::NotHealthy { name: name.into(), url: url.into(), timeout });
        }
        tokio::time::sleep(HEALTH_POLL).await;
    }
}

/// The last `lines` lines of a log file (empty if there is none).
pub fn log_tail(log: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A node run as a child of this process, which reaps it: the harness of tests, the benchmark and the drill.
pub struct Node {
    pub spec: NodeSpec,
    pub name: String,
    pub port: u16,
    /// Environment every start of this node gets, such as `RUST_LOG`.
    env: Vec<(String, String)>,
    child: Option<Child>,
}

impl Node {
    pub fn new(spec: NodeSpec, env: Vec<(String, String)>) -> Node {
        Node { name: spec.name.clone(), port: spec.port(), spec, env, child: None }
    }

    pub fn url(&self) -> String {
        self.spec.url()
    }

    /// Starts the process; `crash_at` arms crash points for this run only.
    pub fn spawn(&mut self, crash_at: Option<&str>) {
        assert!(self.child.is_none(), "{} is already running", self.name);
        let mut command = self.spec.command(&self.env, crash_at).unwrap_or_else(|e| panic!("{e}"));
        self.child = Some(command.spawn().unwrap_or_else(|e| panic!("spawn {}: {e}", self.spec.describe())));
    }

    /// Starts the process and waits until it answers `/health`.
    pub async fn start(&mut self, crash_at: Option<&str>) -> Result<(), LaunchError> {
        self.spawn(crash_at);
        let url = self.url();
        let name = self.name.clone();
        wait_healthy(&name, &url, START_TIMEOUT, || self.is_running()).await
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
            // SAFETY: kill has no memory-safety preconditions; the pid is our own unreaped child's.
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
        log_tail(&self.spec.log, lines)
    }

    pub fn describe(&self) -> String {
        self.spec.describe()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            let name = entry.file_name();
            if path.is_dir() && name != "target" && name != "vendor" && !name.to_string_lossy().starts_with('.') {
                rust_files(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    /// A node is started one way everywhere: no code but this module runs `coordinator` or `participant`.
    #[test]
    fn only_the_launcher_starts_the_ledgers_processes() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root");
        let mut files = Vec::new();
        rust_files(root, &mut files);
        assert!(files.len() > 20, "found the workspace's sources: {}", files.len());
        let this = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/launch.rs");
        let mut offenders = Vec::new();
        for file in files.iter().filter(|f| **f != this) {
            let text = std::fs::read_to_string(file).unwrap_or_default();
            for (number, line) in text.lines().enumerate() {
                let starts_node =
                    line.contains("Command::new(") && (line.contains("coordinator") || line.contains("participant"));
                if starts_node {
                    offenders.push(format!("{}:{}: {}", file.display(), number + 1, line.trim()));
                }
            }
        }
        assert!(offenders.is_empty(), "start nodes through loadgen::launch:\n{}", offenders.join("\n"));
    }

    #[test]
    fn a_layout_gives_every_node_its_port_data_and_secret() {
        let binaries = Binaries { dir: PathBuf::from("/bin-dir") };
        let mut layout = Layout::with_base_port(Path::new("/data"), 7100, 2);
        layout.cluster_token_file = Some(PathBuf::from("/data/cluster.token"));
        let programs = (Path::new("/bin-dir/participant"), Path::new("/bin-dir/coordinator"));
        let nodes =
            [layout.participant(programs.0, 0), layout.participant(programs.0, 1), layout.coordinator(programs.1)];
        let lines: Vec<String> = nodes.iter().map(NodeSpec::describe).collect();
        assert_eq!(
            lines,
            [
                "/bin-dir/participant --shard 0 --listen 127.0.0.1:7101 --data /data/p0 --cluster-token-file /data/cluster.token",
                "/bin-dir/participant --shard 1 --listen 127.0.0.1:7102 --data /data/p1 --cluster-token-file /data/cluster.token",
                "/bin-dir/coordinator --listen 127.0.0.1:7100 --data /data/coordinator --cluster-token-file \
                 /data/cluster.token --participants http://127.0.0.1:7101,http://127.0.0.1:7102",
            ]
        );
        assert_eq!(nodes[2].log, Path::new("/data/coordinator.log"));
        assert!(layout.nodes(&binaries).is_err(), "missing binaries are reported, not started");
        let mut spec = nodes[0].clone();
        spec.set_flag("--data", "/elsewhere");
        spec.set_flag("--in-doubt-after-ms", "5");
        assert!(spec
            .describe()
            .ends_with("--data /elsewhere --cluster-token-file /data/cluster.token --in-doubt-after-ms 5"));
    }
}
