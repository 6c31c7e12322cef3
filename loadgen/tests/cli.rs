//! The `ledger` client commands and `ledger demo`, run as the real binary against real clusters: what each prints
//! on success (a table, or the server's JSON with `--json`), how it reports the server's refusals (a line on
//! stderr, exit 1), an aborted transfer (shown, with its reason, exit 1), and a coordinator that cannot be reached
//! (one clear line, exit 2, never a panic). Few clusters: CI has two cores.

use loadgen::cluster::{cross_shard_pair, Cluster, Options};
use serde_json::Value;
use std::process::Command;

/// An admin and a client API token for the cluster that checks tokens (at least 16 characters each).
const ADMIN_TOKEN: &str = "admin-token-0123456789abcdef";
const TELLER_TOKEN: &str = "teller-token-0123456789abcdef";

/// What one run of `ledger` did.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:?}"))
    }

    fn assert_success(&self) -> &Self {
        assert_eq!(self.code, Some(0), "ledger succeeds: {self:?}");
        assert!(self.stderr.is_empty(), "nothing on stderr: {self:?}");
        self
    }

    /// Exit 1 with `ledger: <fragment>...` on stderr: the server refused, and said why.
    fn assert_refused(&self, fragment: &str) -> &Self {
        assert_eq!(self.code, Some(1), "ledger exits 1: {self:?}");
        assert!(self.stderr.contains(&format!("ledger: {fragment}")), "stderr says {fragment:?}: {self:?}");
        self.assert_no_panic()
    }

    /// Exit 2 and the one-line explanation that nothing answered at `url`.
    fn assert_unreachable(&self, url: &str) -> &Self {
        assert_eq!(self.code, Some(2), "ledger exits 2: {self:?}");
        let expected =
            format!("ledger: cannot reach the coordinator at {url} (connection refused); is the cluster up?");
        assert!(self.stderr.starts_with(&expected), "stderr explains: {self:?}");
        assert_eq!(self.stderr.lines().count(), 1, "one line: {self:?}");
        assert!(self.stdout.is_empty(), "nothing on stdout: {self:?}");
        self.assert_no_panic()
    }

    fn assert_no_panic(&self) -> &Self {
        assert!(!self.stderr.contains("panicked") && !self.stderr.contains("RUST_BACKTRACE"), "no panic: {self:?}");
        self
    }
}

/// Runs the `ledger` binary with `args` (and `env`), away from the test's runtime threads. The variables that
/// choose the coordinator and the token are cleared unless given, so the caller's environment cannot leak in.
async fn ledger(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ledger"));
    command.args(args).envs(env.iter().copied());
    for name in ["LEDGER_URL", "LEDGER_TOKEN", "LEDGER_CLUSTER_DIR", "LEDGER_BASE_PORT"] {
        if !env.iter().any(|(given, _)| *given == name) {
            command.env_remove(name);
        }
    }
    let described = format!("ledger {}", args.join(" "));
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("the blocking task runs")
        .unwrap_or_else(|e| panic!("{described} starts: {e}"));
    Run {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// A line of a plain-text answer holding all of `words`.
fn has_line(text: &str, words: &[&str]) -> bool {
    text.lines().any(|line| {
        let cells: Vec<&str> = line.split_whitespace().collect();
        words.iter().all(|word| cells.contains(word))
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn client_commands_print_answers_and_report_the_servers_refusals() {
    let cluster = Cluster::start().await;
    let url = cluster.coordinator.url();
    let url = url.as_str();
    let (alice, bob) = cross_shard_pair("cli");
    let (alice, bob) = (alice.as_str(), bob.as_str());

    // account create: a key/value block, or the server's JSON.
    let created = ledger(&["account", "create", alice, "--balance", "1000", "--url", url], &[]).await;
    created.assert_success();
    assert!(
        has_line(&created.stdout, &["id", alice]) && has_line(&created.stdout, &["balance", "1000"]),
        "{created:?}"
    );
    let created = ledger(&["account", "create", bob, "--balance", "100", "--url", url, "--json"], &[]).await;
    let body = created.assert_success().json();
    assert_eq!((body["id"].as_str(), body["balance"].as_i64()), (Some(bob), Some(100)), "{created:?}");
    assert!(body["shard"].is_u64(), "{created:?}");
    let extra = "cli-c";
    ledger(&["account", "create", extra, "--url", url], &[]).await.assert_success();
    assert_eq!(cluster.balance(extra).await, 0, "the balance defaults to 0");

    // account show.
    let shown = ledger(&["account", "show", alice, "--url", url], &[]).await;
    shown.assert_success();
    for (key, value) in [("id", alice), ("balance", "1000"), ("held", "0"), ("available", "1000")] {
        assert!(has_line(&shown.stdout, &[key, value]), "{key} {value}: {shown:?}");
    }
    let body = ledger(&["account", "show", bob, "--json", "--url", url], &[]).await.assert_success().json();
    assert_eq!(body["id"], bob);
    assert_eq!(body["balance"], 100);
    assert_eq!(body["available"], 100);
    assert_eq!(body["held"], 0);
    assert!(body["shard"].is_u64());

    // transfer: it commits, the table says so, and the money moves (as the harness reads it).
    let id = "5f0c6f1e-8d1b-4c1a-9a57-3f7e2b9d8c01";
    let moved = ledger(&["transfer", alice, bob, "250", "--id", id, "--url", url], &[]).await;
    moved.assert_success();
    for (key, value) in [("id", id), ("status", "committed"), ("from", alice), ("to", bob), ("amount", "250")] {
        assert!(has_line(&moved.stdout, &[key, value]), "{key} {value}: {moved:?}");
    }
    assert_eq!((cluster.balance(alice).await, cluster.balance(bob).await), (750, 350));
    // The same id and body again (with the flags after the arguments): the same answer, and no second move.
    let again = ledger(&["transfer", alice, bob, "250", "--url", url, "--json", "--id", id], &[]).await;
    let body = again.assert_success().json();
    assert_eq!(
        (body["id"].as_str(), body["status"].as_str(), body["amount"].as_i64()),
        (Some(id), Some("committed"), Some(250))
    );
    assert_eq!((cluster.balance(alice).await, cluster.balance(bob).await), (750, 350));
    // Without --id, the client picks one, and says which.
    let body = ledger(&["transfer", bob, alice, "50", "--url", url, "--json"], &[]).await.assert_success().json();
    assert!(body["id"].as_str().is_some_and(|id| uuid::Uuid::parse_str(id).is_ok()), "{body}");
    assert_eq!((cluster.balance(alice).await, cluster.balance(bob).await), (800, 300));

    // The server's refusals: `ledger: <status> <code>: <message>` on stderr, exit 1, nothing moved.
    ledger(&["account", "create", alice, "--url", url], &[])
        .await
        .assert_refused("409 account_exists: account already exists");
    ledger(&["account", "show", "cli-nobody", "--url", url], &[]).await.assert_refused("404 account_not_found: ");
    ledger(&["transfer", alice, bob, "0", "--url", url], &[])
        .await
        .assert_refused("400 invalid_request: amount must be a whole number");
    ledger(&["transfer", alice, alice, "5", "--url", url], &[])
        .await
        .assert_refused("400 invalid_request: from and to must be different accounts");
    ledger(&["transfer", alice, bob, "999", "--id", id, "--url", url], &[])
        .await
        .assert_refused("409 idempotency_conflict: this transfer id was already used with a different body");
    ledger(&["account", "list", "--limit", "0", "--url", url], &[]).await.assert_refused("400 invalid_request: limit");
    assert_eq!((cluster.balance(alice).await, cluster.balance(bob).await), (800, 300));

    // An aborted transfer is shown as any transfer, and stderr says it aborted and why.
    let aborted = ledger(&["transfer", bob, alice, "1000000", "--url", url], &[]).await;
    aborted.assert_refused("422 transfer ");
    assert!(aborted.stderr.contains("aborted: insufficient_funds"), "{aborted:?}");
    assert!(has_line(&aborted.stdout, &["status", "aborted"]), "{aborted:?}");
    assert!(has_line(&aborted.stdout, &["reason", "insufficient_funds"]), "{aborted:?}");
    let aborted = ledger(&["transfer", bob, alice, "1000000", "--json", "--url", url], &[]).await;
    let body = aborted.assert_refused("422 transfer ").json();
    assert_eq!((body["status"].as_str(), body["reason"].as_str()), (Some("aborted"), Some("insufficient_funds")));
    let missing = ledger(&["transfer", alice, "cli-nobody", "1", "--url", url], &[]).await;
    missing.assert_refused("404 transfer ");
    assert!(missing.stderr.contains("aborted: account_not_found"), "{missing:?}");
    assert_eq!((cluster.balance(alice).await, cluster.balance(bob).await), (800, 300));

    // account list: every account, also when it takes one request per account.
    let listed = ledger(&["account", "list", "--url", url], &[]).await;
    listed.assert_success();
    assert!(has_line(&listed.stdout, &["ID", "BALANCE", "HELD", "AVAILABLE", "SHARD"]), "{listed:?}");
    assert!(has_line(&listed.stdout, &[alice, "800", "0", "800"]), "{listed:?}");
    assert!(has_line(&listed.stdout, &[bob, "300", "0", "300"]), "{listed:?}");
    let body =
        ledger(&["account", "list", "--page-size", "1", "--json", "--url", url], &[]).await.assert_success().json();
    let ids: Vec<&str> =
        body["accounts"].as_array().expect("accounts").iter().filter_map(|a| a["id"].as_str()).collect();
    let mut expected = vec![alice, bob, extra];
    expected.sort_unstable();
    assert_eq!(ids, expected, "{body}");
    assert_eq!(body["next"], Value::Null);
    let body = ledger(&["account", "list", "--limit", "2", "--page-size", "1", "--json", "--url", url], &[])
        .await
        .assert_success()
        .json();
    assert_eq!(body["accounts"].as_array().map(Vec::len), Some(2), "{body}");
    assert_eq!(body["next"].as_str(), Some(expected[1]), "the cursor of what was left out: {body}");

    // transfers: the ledger's newest, or one account's committed ones.
    let listed = ledger(&["transfers", "--url", url], &[]).await;
    listed.assert_success();
    assert!(has_line(&listed.stdout, &["ID", "STATUS", "FROM", "TO", "AMOUNT", "LEGS", "REASON"]), "{listed:?}");
    assert!(has_line(&listed.stdout, &[id, "committed", alice, bob, "250", "1"]), "{listed:?}");
    assert!(has_line(&listed.stdout, &["aborted", bob, alice, "1000000", "insufficient_funds"]), "{listed:?}");
    let body = ledger(&["transfers", "--account", alice, "--json", "--url", url], &[]).await.assert_success().json();
    assert_eq!(body["account"], alice);
    let transfers = body["transfers"].as_array().expect("transfers");
    assert_eq!(transfers.len(), 2, "alice's two committed transfers: {body}");
    assert!(transfers.iter().all(|t| t["status"] == "committed"), "{body}");
    assert!(transfers.iter().any(|t| t["id"] == id && t["amount"] == 250), "{body}");
    let body = ledger(&["transfers", "--limit", "1", "--json", "--url", url], &[]).await.assert_success().json();
    assert_eq!(body["transfers"].as_array().map(Vec::len), Some(1), "{body}");

    // audit: the books balance.
    let audited = ledger(&["audit", "--url", url], &[]).await;
    audited.assert_success();
    assert!(has_line(&audited.stdout, &["ok", "true"]), "{audited:?}");
    assert!(has_line(&audited.stdout, &["balance_total", "1100"]), "{audited:?}");
    assert!(has_line(&audited.stdout, &["violations:", "none"]), "{audited:?}");
    let body = ledger(&["audit", "--json", "--url", url], &[]).await.assert_success().json();
    assert_eq!(body["ok"], true, "{body}");
    assert_eq!((body["balance_total"].as_i64(), body["created_total"].as_i64()), (Some(1100), Some(1100)));
    assert_eq!(body["shards"].as_array().map(Vec::len), Some(2), "{body}");

    // A bank's own account may go below zero, down to its overdraft limit: a deposit is a transfer from it.
    let cash = "cli-cash";
    let created = ledger(&["account", "create", cash, "--overdraft-limit", "1000", "--url", url, "--json"], &[]).await;
    assert_eq!(created.assert_success().json()["overdraft_limit"], 1000, "{created:?}");
    ledger(&["transfer", cash, alice, "500", "--url", url], &[]).await.assert_success();
    assert_eq!((cluster.balance(cash).await, cluster.balance(alice).await), (-500, 1300));

    // Several legs, all or nothing: the legs are shown as a table; an abort names the failing leg.
    let legs_id = "7a1d2c3b-4e5f-4a6b-8c7d-9e0f1a2b3c4d";
    let paid = ledger(
        &[
            "transfer",
            "--leg",
            &format!("{alice}:{bob}:100"),
            "--leg",
            &format!("{alice}:{extra}:5"),
            "--id",
            legs_id,
            "--url",
            url,
        ],
        &[],
    )
    .await;
    paid.assert_success();
    assert!(has_line(&paid.stdout, &["status", "committed"]) && has_line(&paid.stdout, &["legs:"]), "{paid:?}");
    assert!(has_line(&paid.stdout, &["LEG", "FROM", "TO", "AMOUNT"]), "{paid:?}");
    assert!(
        has_line(&paid.stdout, &["0", alice, bob, "100"]) && has_line(&paid.stdout, &["1", alice, extra, "5"]),
        "{paid:?}"
    );
    let failed = ledger(
        &["transfer", "--leg", &format!("{bob}:{alice}:1"), "--leg", &format!("{extra}:{alice}:1000000"), "--url", url],
        &[],
    )
    .await;
    failed.assert_refused("422 transfer ");
    assert!(failed.stderr.contains("aborted at leg 1: insufficient_funds"), "{failed:?}");
    assert!(has_line(&failed.stdout, &["leg", "1"]), "{failed:?}");
    assert_eq!(
        (cluster.balance(alice).await, cluster.balance(bob).await, cluster.balance(extra).await),
        (1195, 400, 5)
    );
    // In the listing, a transfer of several legs shows its accounts, its total and how many legs it has.
    let listed = ledger(&["transfers", "--url", url], &[]).await;
    let to = format!("{bob},{extra}");
    assert!(has_line(&listed.assert_success().stdout, &[legs_id, "committed", alice, &to, "105", "2"]), "{listed:?}");

    // A hold: listed while active, captured in part (again: the same answer), then no longer releasable.
    let hold_id = "2b3c4d5e-6f70-4a81-9b2c-3d4e5f607182";
    let held = ledger(
        &["transfer", alice, bob, "200", "--hold", "--expires-in-s", "600", "--id", hold_id, "--url", url, "--json"],
        &[],
    )
    .await;
    let body = held.assert_success().json();
    assert_eq!((body["status"].as_str(), body["amount"].as_i64()), (Some("held"), Some(200)), "{held:?}");
    assert!(body["expires_at_unix_ms"].is_u64(), "{held:?}");
    let holds = ledger(&["holds", "--account", alice, "--url", url], &[]).await;
    holds.assert_success();
    assert!(has_line(&holds.stdout, &["ID", "FROM", "TO", "AMOUNT", "EXPIRES_AT", "EXPIRES_IN"]), "{holds:?}");
    assert!(has_line(&holds.stdout, &[hold_id, alice, bob, "200", "min"]), "{holds:?}");
    let expires_at = body["expires_at_unix_ms"].as_u64().expect("expiry");
    let at_a_time = |line: &str| line.split_whitespace().any(|w| w.len() == 20 && w.ends_with('Z') && w.contains('T'));
    assert!(holds.stdout.lines().any(|l| l.contains(hold_id) && at_a_time(l)), "a time (UTC): {holds:?}");
    assert!(!holds.stdout.contains(&expires_at.to_string()), "no raw milliseconds: {holds:?}");
    // An account that does not exist: 404, as for its transfers.
    ledger(&["holds", "--account", "cli-nobody", "--url", url], &[]).await.assert_refused("404 account_not_found: ");
    ledger(&["transfers", "--account", "cli-nobody", "--url", url], &[])
        .await
        .assert_refused("404 account_not_found: ");
    for _ in 0..2 {
        let captured = ledger(&["capture", hold_id, "--amount", "150", "--url", url], &[]).await;
        captured.assert_success();
        assert!(
            has_line(&captured.stdout, &["status", "captured"]) && has_line(&captured.stdout, &["amount", "150"]),
            "{captured:?}"
        );
    }
    ledger(&["release", hold_id, "--url", url], &[]).await.assert_refused("409 hold_not_active: ");
    assert_eq!((cluster.balance(alice).await, cluster.balance(bob).await), (1045, 550));
    let held = ledger(&["transfer", bob, alice, "50", "--hold", "--url", url, "--json"], &[]).await;
    let released_id = held.assert_success().json()["id"].as_str().expect("an id").to_owned();
    let released = ledger(&["release", &released_id, "--url", url], &[]).await;
    assert!(has_line(&released.assert_success().stdout, &["status", "released"]), "{released:?}");
    let holds = ledger(&["holds", "--url", url], &[]).await;
    assert_eq!(holds.assert_success().stdout, "no active holds\n", "{holds:?}");
    ledger(&["capture", &released_id, "--url", url], &[]).await.assert_refused("409 hold_not_active: ");
    assert_eq!((cluster.balance(alice).await, cluster.balance(bob).await), (1045, 550));

    // Without --url or LEDGER_URL, the commands find the local cluster as `ledger cluster` does: the port in its
    // cluster.json, else LEDGER_BASE_PORT.
    let port = cluster.coordinator.port.to_string();
    let local = tempfile::tempdir().expect("a temp dir");
    let layout = format!(r#"{{"base_port": {port}, "participants": 2, "node_settings": {{}}}}"#);
    std::fs::write(local.path().join("cluster.json"), layout).expect("cluster.json");
    let local_dir = local.path().to_str().expect("a UTF-8 path");
    let from_layout = [("LEDGER_CLUSTER_DIR", local_dir), ("LEDGER_BASE_PORT", "1")];
    let shown = ledger(&["account", "show", alice], &from_layout).await;
    assert!(has_line(&shown.assert_success().stdout, &["id", alice]), "{shown:?}");
    let empty = tempfile::tempdir().expect("a temp dir");
    let from_port = [("LEDGER_CLUSTER_DIR", empty.path().to_str().expect("UTF-8")), ("LEDGER_BASE_PORT", &port)];
    let shown = ledger(&["account", "show", alice], &from_port).await;
    assert!(has_line(&shown.assert_success().stdout, &["id", alice]), "{shown:?}");

    // The tour, on the same cluster (its names have a suffix of their own), found the same way.
    let demo = ledger(&["demo"], &from_layout).await;
    demo.assert_success();
    assert!(demo.stdout.starts_with(&format!("Ledger demo against {url}\n")), "{demo:?}");
    assert!(demo.stdout.trim_end().ends_with("Demo finished: every answer was as expected."), "{demo:?}");
    assert!(demo.stdout.contains("== 13. Health"), "{demo:?}");
    assert!(demo.stdout.contains("check: status = captured: ok"), "the hold captured in part: {demo:?}");
    assert!(demo.stdout.contains("check: the failing leg = 1: ok"), "the fee payment: {demo:?}");
    assert!(demo.stdout.contains("check: cash's balance = -500: ok"), "the deposit from cash: {demo:?}");
    assert!(!demo.stdout.contains("UNEXPECTED"), "{demo:?}");
    assert!(demo.stdout.contains("transfers between them are cross-shard"), "{demo:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn client_commands_send_the_token_and_report_a_shard_down_and_a_coordinator_down() {
    let tokens = format!("ops admin {ADMIN_TOKEN}\nteller client {TELLER_TOKEN}\n");
    let mut cluster = Cluster::start_with(Options { api_tokens: Some(tokens), ..Options::default() }).await;
    let url = cluster.coordinator.url();
    let url = url.as_str();
    let admin = [("LEDGER_TOKEN", ADMIN_TOKEN)];
    let (first, second) = cross_shard_pair("tok");
    let (first, second) = (first.as_str(), second.as_str());

    // Without a token, or with one of too low a role, the server's refusal is shown.
    ledger(&["account", "list", "--url", url], &[]).await.assert_refused("401 unauthorized: ");
    ledger(&["account", "create", first, "--url", url, "--token", TELLER_TOKEN], &[])
        .await
        .assert_refused("403 forbidden: ");

    // With the admin token (from the environment, or the flag), and the token is never printed.
    for id in [first, second] {
        let created = ledger(&["account", "create", id, "--balance", "500", "--url", url], &admin).await;
        created.assert_success();
        assert!(!created.stdout.contains(ADMIN_TOKEN), "{created:?}");
    }
    let body = ledger(&["account", "show", first, "--json", "--url", url, "--token", ADMIN_TOKEN], &[])
        .await
        .assert_success()
        .json();
    let first_shard = body["shard"].as_u64().expect("shard");
    let moved = ledger(&["transfer", first, second, "10", "--url", url, "--token", TELLER_TOKEN], &[]).await;
    moved.assert_success();
    assert!(has_line(&moved.stdout, &["status", "committed"]), "{moved:?}");

    // A shard down: a transfer that needs it aborts (participant_unavailable, 503), a read of it is refused.
    let (on_p0, other) = if first_shard == 0 { (first, second) } else { (second, first) };
    cluster.node("p0").kill();
    let aborted = ledger(&["transfer", other, on_p0, "5", "--url", url], &admin).await;
    aborted.assert_refused("503 transfer ");
    assert!(aborted.stderr.contains("aborted: participant_unavailable"), "{aborted:?}");
    assert!(has_line(&aborted.stdout, &["reason", "participant_unavailable"]), "{aborted:?}");
    assert!(!aborted.stderr.contains(ADMIN_TOKEN) && !aborted.stdout.contains(ADMIN_TOKEN), "{aborted:?}");
    ledger(&["account", "show", on_p0, "--url", url], &admin)
        .await
        .assert_refused("503 participant_unavailable: shard 0 is unavailable");
    ledger(&["audit", "--url", url], &admin).await.assert_refused("503 participant_unavailable: ");

    // The coordinator down: one clear line and exit 2, from every command.
    cluster.coordinator.kill();
    let hold = "3c4d5e6f-7081-4a92-8b3c-4d5e6f708192";
    let commands: [&[&str]; 9] = [
        &["account", "create", "tok-new"],
        &["account", "show", first],
        &["account", "list"],
        &["transfer", first, second, "1"],
        &["transfers", "--account", first],
        &["audit"],
        &["holds"],
        &["capture", hold],
        &["release", hold],
    ];
    for command in commands {
        let args: Vec<&str> = command.iter().copied().chain(["--url", url]).collect();
        ledger(&args, &admin).await.assert_unreachable(url);
    }
    let demo = ledger(&["demo", "--url", url], &admin).await;
    assert_eq!(demo.code, Some(2), "no answer: exit 2, as the client commands: {demo:?}");
    assert!(demo.stderr.contains(&format!("no answer from {url}/health (connection refused)")), "{demo:?}");
    assert!(demo.stderr.contains("ledger cluster up") && demo.stderr.contains("scripts/cluster.sh up"), "{demo:?}");
    demo.assert_no_panic();
}

#[tokio::test(flavor = "multi_thread")]
async fn client_commands_explain_an_unreachable_coordinator_and_reject_bad_arguments() {
    // A port that was free a moment ago: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
    let url = format!("http://127.0.0.1:{port}");
    ledger(&["account", "show", "alice", "--url", &url], &[]).await.assert_unreachable(&url);
    // From the environment, with a trailing slash.
    let env_url = format!("{url}/");
    ledger(&["transfer", "alice", "bob", "5", "--json"], &[("LEDGER_URL", &env_url)]).await.assert_unreachable(&url);
    // The local cluster's port (no cluster.json there), for the client commands and the demo alike.
    let empty = tempfile::tempdir().expect("a temp dir");
    let port_text = port.to_string();
    let local =
        [("LEDGER_CLUSTER_DIR", empty.path().to_str().expect("UTF-8")), ("LEDGER_BASE_PORT", port_text.as_str())];
    ledger(&["holds"], &local).await.assert_unreachable(&url);
    let demo = ledger(&["demo"], &local).await;
    assert_eq!(demo.code, Some(2), "{demo:?}");
    assert!(demo.stderr.contains(&format!("no answer from {url}/health")), "{demo:?}");

    // A server that hangs up without answering: a transfer's outcome is unknown, and the client says how to
    // repeat it safely (its id).
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    let hang_up_url = format!("http://{}", listener.local_addr().expect("its address"));
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            drop(stream);
        }
    });
    let id = "0b7f3c5e-1d2a-4e8b-9c6d-5a4f3e2d1c0b";
    let lost = ledger(&["transfer", "alice", "bob", "5", "--id", id, "--url", &hang_up_url], &[]).await;
    assert_eq!(lost.code, Some(2), "{lost:?}");
    let expected = format!("ledger: the connection to the coordinator at {hang_up_url} broke before it answered");
    assert!(lost.stderr.starts_with(&expected), "{lost:?}");
    assert!(lost.stderr.contains(&format!("repeat the same command with --id {id}")), "{lost:?}");
    assert_eq!(lost.stderr.lines().count(), 1, "one line: {lost:?}");
    lost.assert_no_panic();

    // A negative amount is refused with the reason, not with advice to write it after `--`.
    for args in [
        &["transfer", "alice", "bob", "-5"][..],
        &["transfer", "alice", "bob", "--", "-5"],
        &["capture", "0b7f3c5e-1d2a-4e8b-9c6d-5a4f3e2d1c0b", "--amount", "-5"],
    ] {
        let run = ledger(args, &[]).await;
        assert_eq!(run.code, Some(2), "{run:?}");
        assert!(run.stderr.contains("amounts are positive"), "{run:?}");
        assert!(!run.stderr.contains("-- -5") && !run.stderr.contains("invalid digit"), "{run:?}");
    }
    // Usage lines show every flag as optional, also when it was given (clap's own would show `--url <URL>`).
    for env in [&[][..], &[("LEDGER_URL", url.as_str())]] {
        let run = ledger(&["account", "show", "--url", &url], env).await;
        assert_eq!(run.code, Some(2), "{run:?}");
        assert!(run.stderr.contains("Usage: ledger account show <ID> [--url URL] [--token TOKEN] [--json]"), "{run:?}");
    }
    let run = ledger(&["holds", "--help"], &[("LEDGER_URL", url.as_str())]).await;
    assert!(run.stdout.contains("Usage: ledger holds [--account ID] [--limit N] [--url URL]"), "{run:?}");

    // Arguments that are not integers or UUIDs are clap's errors (exit 2), before any request.
    for args in [
        &["transfer", "alice", "bob", "abc", "--url", &url][..],
        &["transfer", "alice", "bob", "5", "--id", "not-a-uuid", "--url", &url],
        &["account", "create", "alice", "--balance", "lots", "--url", &url],
        &["account", "show", "alice", "--url", "not a url"],
        &["transfer", "--leg", "alice:bob", "--url", &url],
        &["capture", "not-a-uuid", "--url", &url],
    ] {
        let run = ledger(args, &[]).await;
        assert_eq!(run.code, Some(2), "{run:?}");
        assert!(run.stderr.starts_with("error: invalid value"), "{run:?}");
        run.assert_no_panic();
    }
    // Arguments that do not go together, or a leg with the three arguments: clap says so (exit 2).
    for args in [
        &["transfer", "alice", "bob", "5", "--expires-in-s", "60", "--url", &url][..],
        &["transfer", "alice", "bob", "5", "--leg", "alice:bob:5", "--url", &url],
        &["transfer", "--leg", "alice:bob:5", "--hold", "--url", &url],
        &["transfer", "alice", "bob", "--url", &url],
    ] {
        let run = ledger(args, &[]).await;
        assert_eq!(run.code, Some(2), "{run:?}");
        assert!(run.stderr.starts_with("error: "), "{run:?}");
        run.assert_no_panic();
    }
}
