//! The README's quick start, run as written: the commands are read out of README.md, and each is run by bash
//! from the repository's root against a real cluster. Only the environment differs from a person's terminal:
//! the cluster lives in a temp dir on free ports (`LEDGER_CLUSTER_DIR`, `LEDGER_BASE_PORT`), and the binaries
//! are the ones this test run built (`LEDGER_BIN_DIR`), so nothing is built in release mode here. The demo is
//! given no URL: it finds the cluster on its port as a person's would.

use loadgen::launch::Binaries;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Ports tried for the cluster lie below Linux's ephemeral range (32768 and up), where the other tests' free
/// ports come from, so a port found free here is not taken by them a moment later.
const PORTS_FROM: u16 = 20_000;
const PORTS_TO: u16 = 32_000;
const PARTICIPANTS: u16 = 2;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace root").to_path_buf()
}

/// The commands of the README's "Quick start" section: every line of its `sh` blocks, without the comments.
fn quick_start_commands() -> Vec<String> {
    let readme = std::fs::read_to_string(root().join("README.md")).expect("README.md");
    let section = readme.split("\n## Quick start\n").nth(1).expect("a Quick start section");
    let section = section.split("\n## ").next().unwrap_or(section);
    let mut commands = Vec::new();
    let mut in_block = false;
    for line in section.lines() {
        if line.starts_with("```") {
            in_block = line == "```sh";
            continue;
        }
        if in_block {
            let command = line.split('#').next().unwrap_or("").trim();
            if !command.is_empty() {
                commands.push(command.to_string());
            }
        }
    }
    commands
}

/// A base port with the ports of the whole cluster free after it.
fn free_base_port() -> u16 {
    let start = PORTS_FROM + (std::process::id() % u32::from(PORTS_TO - PORTS_FROM)) as u16;
    (start..PORTS_TO)
        .chain(PORTS_FROM..start)
        .find(|base| (0..=PARTICIPANTS).all(|i| TcpListener::bind(("127.0.0.1", base + i)).is_ok()))
        .expect("a free run of ports")
}

struct Terminal {
    env: Vec<(String, String)>,
    data: PathBuf,
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Terminal {
    fn run(&self, command: &str) -> Run {
        let out = Command::new("bash")
            .args(["-c", command])
            .current_dir(root())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env_remove("LEDGER_CRASH_AT")
            .env_remove("LEDGER_URL")
            .output()
            .expect("bash runs");
        let run = Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        };
        eprintln!("$ {command}   (exit {})\n{}{}", run.code, run.stdout, run.stderr);
        run
    }
}

impl Drop for Terminal {
    /// A failing test leaves no node behind: whatever still runs is stopped.
    fn drop(&mut self) {
        if self.data.join("cluster.json").exists() {
            let _ = self.run("scripts/cluster.sh down");
        }
    }
}

#[test]
fn the_readme_quick_start_works_as_written() {
    let commands = quick_start_commands();
    let cluster_up = "scripts/cluster.sh up";
    // The cluster, the demo right after it, then the test suite (which takes minutes).
    let first = commands.get(..3).unwrap_or_default();
    assert_eq!(first, [cluster_up, "scripts/demo.sh", "scripts/test.sh"], "the quick start begins so: {commands:?}");
    let binaries = Binaries::locate().expect("the binaries");
    let dir = tempfile::tempdir().expect("temp dir");
    let base = free_base_port();
    let url = format!("http://127.0.0.1:{base}");
    let data = dir.path().join("data");
    let terminal = Terminal {
        env: vec![
            ("LEDGER_BIN_DIR".into(), binaries.dir.display().to_string()),
            ("LEDGER_CLUSTER_DIR".into(), data.display().to_string()),
            ("LEDGER_BASE_PORT".into(), base.to_string()),
            ("RUST_LOG".into(), "info".into()),
        ],
        data: data.clone(),
    };

    // The quick start itself, except scripts/test.sh, which is what runs this test.
    for command in commands.iter().filter(|c| *c != "scripts/test.sh") {
        let run = terminal.run(command);
        assert_eq!(run.code, 0, "`{command}` succeeds");
        if command == cluster_up {
            for node in ["p0", "p1", "coordinator"] {
                assert!(run.stdout.lines().any(|l| l.starts_with(node) && l.contains(" pid ")), "{node} started");
            }
            assert!(run.stdout.contains(&format!("Cluster up. Public API: {url}")), "the URL is shown");
            let status = terminal.run("scripts/cluster.sh status");
            assert_eq!(status.code, 0, "every node is up");
            assert_eq!(status.stdout.lines().filter(|l| l.contains(" running ") && l.ends_with(" 200")).count(), 3);
            assert!(status.stdout.contains("\"status\": \"ok\""), "the coordinator's health is shown");
        } else if command == "scripts/demo.sh" {
            assert!(run.stdout.starts_with(&format!("Ledger demo against {url}\n")), "the demo found the cluster");
            assert!(run.stdout.trim_end().ends_with("Demo finished: every answer was as expected."), "the demo passed");
        }
    }

    // A crash and a recovery, as the README's drills do them.
    let kill = terminal.run("scripts/cluster.sh kill p0");
    assert_eq!(kill.code, 0);
    assert!(kill.stdout.starts_with("p0: killed with SIGKILL"), "{}", kill.stdout);
    let status = terminal.run("scripts/cluster.sh status");
    assert_eq!(status.code, 1, "status fails while a node is down");
    assert!(status.stdout.lines().any(|l| l.starts_with("p0 ") && l.contains("not running")), "p0 is shown down");
    let start = terminal.run("scripts/cluster.sh start p0");
    assert_eq!(start.code, 0);
    assert!(start.stdout.starts_with("p0 "), "{}", start.stdout);
    assert_eq!(terminal.run("scripts/cluster.sh status").code, 0, "every node is up again");
    let demo = terminal.run("scripts/demo.sh");
    assert_eq!(demo.code, 0, "the restarted shard serves the demo again");

    let down = terminal.run("scripts/cluster.sh down");
    assert_eq!(down.code, 0);
    assert!(down.stdout.contains("Cluster down."), "{}", down.stdout);
    for node in ["p0", "p1", "coordinator"] {
        assert!(down.stdout.contains(&format!("{node}: stopped")), "{node} stopped");
        assert!(!data.join(format!("{node}.pid")).exists(), "{node}'s pid file is gone");
    }
    let status = terminal.run("scripts/cluster.sh status");
    assert_eq!(status.code, 1, "nothing runs after down");
    assert!(status.stderr.is_empty(), "status of a stopped cluster is a report, not an error: {}", status.stderr);
    assert!(data.join("p0").is_dir(), "down keeps the data");
}
