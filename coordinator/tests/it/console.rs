//! The live console in headless Chromium. The page stays open while a participant dies and comes back and while
//! a transfer in doubt resolves, and its chart follows load and a coordinator restart; the tests read what the page
//! shows through the DevTools protocol.
//! Set `LEDGER_CONSOLE_SCREENSHOT=<file.png>` to keep a screenshot of the page at the end (and
//! `LEDGER_CONSOLE_CHART_SCREENSHOT` for the chart's test, with load and a coordinator restart behind it).

use crate::harness::*;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// How long the page may take to show a change (it refreshes every second).
const SHOW_TIMEOUT: Duration = Duration::from_secs(20);

/// A headless Chromium with one page open, driven over the DevTools protocol.
struct Browser {
    child: Child,
    socket: Socket,
    next_id: u64,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn open(url: &str) -> Browser {
        let program = std::env::var("CHROMIUM").unwrap_or_else(|_| "chromium".into());
        let profile = tempfile::tempdir().expect("profile dir");
        // The flags keep Chromium from reaching out to the network at start-up (this machine has none).
        let mut child = Command::new(&program)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--window-size=1300,1000",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(url)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program} ({e}): install Debian's chromium (scripts/deps.sh)"));
        // Chromium prints its DevTools address on stderr; keep draining stderr so it never blocks.
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(address) = line.strip_prefix("DevTools listening on ") {
                    let _ = tx.send(address.to_owned());
                }
            }
        });
        let browser_ws = rx.recv_timeout(Duration::from_secs(30)).expect("Chromium printed its DevTools address");
        let port = browser_ws.trim_start_matches("ws://").split(['/', ':']).nth(1).expect("port").to_owned();
        let page_ws = loop {
            let pages: Value = reqwest::get(format!("http://127.0.0.1:{port}/json/list"))
                .await
                .expect("DevTools answers")
                .json()
                .await
                .expect("JSON");
            let page = pages.as_array().into_iter().flatten().find(|p| p["type"] == "page" && p["url"] == url);
            if let Some(ws) = page.and_then(|p| p["webSocketDebuggerUrl"].as_str()) {
                break ws.to_owned();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let (socket, _) = tokio_tungstenite::connect_async(page_ws.as_str()).await.expect("DevTools socket");
        Browser { child, socket, next_id: 0, _profile: profile }
    }

    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let request = json!({"id": id, "method": method, "params": params}).to_string();
        self.socket.send(Message::text(request)).await.expect("send to DevTools");
        while let Some(message) = self.socket.next().await {
            if let Message::Text(text) = message.expect("DevTools message") {
                let reply: Value = serde_json::from_str(&text).expect("JSON from DevTools");
                if reply["id"] == id {
                    assert!(reply.get("error").is_none(), "{method} failed: {reply}");
                    return reply["result"].clone();
                }
            }
        }
        panic!("DevTools closed the socket");
    }

    /// Evaluates a JavaScript expression in the page and returns its value.
    async fn eval(&mut self, expression: &str) -> Value {
        let result = self.call("Runtime.evaluate", json!({"expression": expression, "returnByValue": true})).await;
        result["result"]["value"].clone()
    }

    /// Waits until `expression` is true in the page; panics with `what` and the page's text otherwise.
    async fn wait_until(&mut self, what: &str, expression: &str) {
        let deadline = Instant::now() + SHOW_TIMEOUT;
        while Instant::now() < deadline {
            if self.eval(expression).await == json!(true) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let text = self.eval("document.body.innerText").await;
        panic!("the console never showed {what} within {SHOW_TIMEOUT:?}; it shows:\n{}", text.as_str().unwrap_or(""));
    }

    async fn screenshot(&mut self, path: &str) {
        use base64::Engine;
        let shot = self.call("Page.captureScreenshot", json!({"format": "png"})).await;
        let png = base64::engine::general_purpose::STANDARD.decode(shot["data"].as_str().expect("data")).expect("PNG");
        std::fs::write(path, png).expect("write screenshot");
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn shard_is(shard: usize, up: bool) -> String {
    format!("document.querySelector('#shards tr[data-shard=\"{shard}\"]')?.dataset.up === '{up}'")
}

#[tokio::test(flavor = "multi_thread")]
async fn the_console_shows_a_shard_die_and_return_and_a_decision_wait_for_its_acknowledgement() {
    let mut c = Cluster::start().await;
    let (alice, bob) = cross_shard_pair("console");
    c.create_account(&alice, 1_000).await;
    c.create_account(&bob, 0).await;
    let bob_shard = c.account(&bob).await["shard"].as_u64().expect("shard") as usize;
    let bob_node = format!("p{bob_shard}");

    let mut page = Browser::open(&c.api("/")).await;
    page.wait_until("both shards up", &format!("{} && {}", shard_is(0, true), shard_is(1, true))).await;
    page.wait_until(
        "the accounts",
        &format!("document.querySelector('#accounts tr[data-account=\"{alice}\"]')?.dataset.balance === '1000'"),
    )
    .await;
    page.wait_until("the audit's verdict", "document.querySelector('#audit [data-ok]')?.dataset.ok === 'true'").await;

    c.node(&bob_node).kill();
    page.wait_until("the shard down", &shard_is(bob_shard, false)).await;
    page.wait_until(
        "the last accounts seen, marked stale while a shard is down",
        &format!(
            "document.querySelector('#accounts p.stale') !== null && \
             document.querySelector('#accounts tr[data-account=\"{alice}\"]') !== null"
        ),
    )
    .await;
    // Back up, but armed to die as soon as it hears a decision: the next decision stays unacknowledged.
    c.restart(&bob_node, Some(common::crash::PARTICIPANT_DECIDE_RECEIVED)).await;
    page.wait_until("the shard back up", &shard_is(bob_shard, true)).await;

    let id = uuid::Uuid::new_v4().to_string();
    let (status, body) = c.post("/transfers", json!({"from": alice, "to": bob, "amount": 40, "id": id})).await;
    assert_eq!(status, 200, "the decision is logged before the shard dies: {body}");
    assert!(c.node(&bob_node).wait_for_death(Duration::from_secs(10)), "the armed shard dies on the decision");
    let row = format!("document.querySelector('#unacknowledged tr[data-unacknowledged=\"{id}\"]')");
    page.wait_until("the decision unacknowledged", &format!("{row} !== null")).await;
    page.wait_until(
        "the transfer committed in the latest transfers",
        &format!("document.querySelector('#transfers tr[data-transfer=\"{id}\"]')?.dataset.status === 'committed'"),
    )
    .await;

    c.restart(&bob_node, None).await;
    page.wait_until("the decision acknowledged", &format!("{row} === null")).await;
    page.wait_until(
        "the acknowledgement in the list of changes",
        &format!("document.getElementById('events').innerText.includes('{id} acknowledged by every shard')"),
    )
    .await;
    page.wait_until(
        "bob credited",
        &format!("document.querySelector('#accounts tr[data-account=\"{bob}\"]')?.dataset.balance === '40'"),
    )
    .await;
    page.wait_until("the books balanced", "document.querySelector('#audit [data-ok]')?.dataset.ok === 'true'").await;
    assert_eq!(page.eval("document.querySelector('#accounts p.stale') === null").await, json!(true), "fresh again");

    // A hold shows among the active holds with its expiry, and leaves the list once released.
    let hold = json!({"from": alice, "to": bob, "amount": 5, "hold": true, "expires_in_s": 600});
    let (status, held) = c.post("/transfers", hold).await;
    assert_eq!((status, held["status"].clone()), (200, json!("held")), "{held}");
    let hold_id = held["id"].as_str().expect("id").to_string();
    let hold_row = format!("document.querySelector('#holds tr[data-hold=\"{hold_id}\"]')");
    let expires_in = format!("Number({hold_row}?.dataset.expiresInS)");
    page.wait_until(
        "the hold among the active holds, with its expiry",
        &format!("{expires_in} > 590 && {expires_in} <= 600"),
    )
    .await;
    assert_eq!(c.post(&format!("/transfers/{hold_id}/release"), json!({})).await.0, 200);
    page.wait_until("the hold gone once released", &format!("{hold_row} === null")).await;
    if let Ok(path) = std::env::var("LEDGER_CONSOLE_SCREENSHOT") {
        page.screenshot(&path).await;
    }
}

/// Records each state the chart panel passes through (`loading…`, `waiting` for a second reading, `chart`, or its
/// text otherwise), from before the page's script runs, so the test can see states that last only a second.
const RECORD_CHART_STATES: &str = "window.chartStates = []; new MutationObserver(() => { \
    const box = document.getElementById('rates'); if (!box) return; \
    const state = document.getElementById('rates-waiting') ? 'waiting' \
      : box.querySelector('svg') ? 'chart' : box.textContent; \
    if (chartStates[chartStates.length - 1] !== state) chartStates.push(state); \
  }).observe(document, { childList: true, subtree: true, characterData: true });";

/// What the chart panel shows now, as the page's `#rates-now` data attributes.
async fn chart_now(page: &mut Browser) -> Value {
    page.eval("JSON.stringify(document.getElementById('rates-now')?.dataset ?? null)")
        .await
        .as_str()
        .map(|text| serde_json::from_str(text).expect("JSON"))
        .unwrap_or(Value::Null)
}

fn chart_shows(condition: &str) -> String {
    format!("(() => {{ const now = document.getElementById('rates-now')?.dataset; return !!now && ({condition}); }})()")
}

#[tokio::test(flavor = "multi_thread")]
async fn the_console_charts_committed_transfers_per_second_and_latency_across_a_coordinator_restart() {
    let mut c = Cluster::start().await;
    let (alice, bob) = cross_shard_pair("chart");
    c.create_account(&alice, 1_000_000).await;
    c.create_account(&bob, 1_000_000).await;
    let (_, stats) = c.get("/stats").await;
    let bounds: Vec<u64> = serde_json::from_value(stats["transfers"]["latency_bounds_micros"].clone()).expect("bounds");
    assert_eq!(stats["transfers"]["committed"], 0, "no transfer yet");

    let mut page = Browser::open(&c.api("/")).await;
    // The reload runs the recorder from the page's start (Page.reload did nothing here until Page was enabled).
    page.call("Page.enable", json!({})).await;
    page.call("Page.addScriptToEvaluateOnNewDocument", json!({"source": RECORD_CHART_STATES})).await;
    page.call("Page.reload", json!({})).await;
    page.wait_until(
        "an idle interval in the reloaded page: nothing committed, no latency",
        &chart_shows(
            "Array.isArray(window.chartStates) && now.committedPerSecond === '0' && now.p50Micros === '' && \
             now.p99Micros === ''",
        ),
    )
    .await;
    let states = page.eval("JSON.stringify(chartStates.filter((s) => s !== 'loading…'))").await;
    assert_eq!(states, json!(r#"["waiting","chart"]"#), "a waiting state until the second reading, then the chart");
    let idle = page.eval("document.getElementById('rates-now').innerText").await;
    assert_eq!(idle, json!("0 committed/s · 0 aborted/s · p50 – · p99 –"), "the idle figures as text");

    // Load (throttled: the machine is shared) until the page shows it, so the page sees it whatever its timing.
    let committed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = [(alice.clone(), bob.clone()), (bob.clone(), alice.clone())]
        .into_iter()
        .map(|(from, to)| {
            let (http, url) = (c.http.clone(), c.api("/transfers"));
            let (committed, stop) = (committed.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Relaxed) {
                    let body = json!({"from": from, "to": to, "amount": 1});
                    let reply = http.post(&url).json(&body).send().await.expect("answer");
                    let reply: Value = reply.json().await.expect("JSON");
                    assert_eq!(reply["status"], "committed", "{reply}");
                    committed.fetch_add(1, Relaxed);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
        })
        .collect();
    let bounds_js = format!("{bounds:?}");
    page.wait_until(
        "committed transfers per second, and p50 <= p99 among the histogram's bounds, while transfers run",
        &chart_shows(&format!(
            "Number(now.committedPerSecond) > 0 && {bounds_js}.includes(Number(now.p50Micros)) && \
             {bounds_js}.includes(Number(now.p99Micros)) && Number(now.p50Micros) <= Number(now.p99Micros)"
        )),
    )
    .await;
    let text = page.eval("document.getElementById('rates-now').innerText").await;
    let text = text.as_str().expect("text");
    assert!(text.contains(" committed/s · ") && text.contains(" · p50 ") && !text.contains("p50 –"), "{text}");
    let lines = page.eval("[...document.querySelectorAll('#rates path.series')].map((p) => p.dataset.series)").await;
    assert_eq!(lines, json!(["committed", "p50", "p99"]), "a line each for committed/s, p50 and p99");
    stop.store(true, Relaxed);
    for client in clients {
        client.await.expect("client");
    }
    let total = committed.load(Relaxed);
    assert_eq!(c.get("/stats").await.1["transfers"]["committed"], total, "the coordinator counted every transfer");

    page.wait_until(
        "the rate back to zero once the load stops, and every committed transfer in the chart's window",
        &chart_shows(&format!("now.committedPerSecond === '0' && now.committedInWindow === '{total}'")),
    )
    .await;
    let committed_line = "document.querySelector('#rates path[data-series=\"committed\"]').getAttribute('d')";
    let segments = page.eval(&format!("{committed_line}.split(' L').length")).await;
    assert!(segments.as_u64().is_some_and(|n| n >= 3), "the committed/s line joins its readings: {segments}");

    c.node("coordinator").kill();
    page.wait_until(
        "the last chart, marked stale, while the coordinator is down",
        "document.querySelector('#rates p.stale') !== null && document.querySelector('#rates svg') !== null",
    )
    .await;
    let points_before_restart = chart_now(&mut page).await["points"].clone();
    // The restarted coordinator counts from zero: the chart must take that as a new start, not a negative interval.
    c.restart("coordinator", None).await;
    page.wait_until(
        "the restart noticed, the chart fresh again",
        "document.getElementById('events').innerText.includes('counters started again from zero') && \
         document.querySelector('#rates p.stale') === null",
    )
    .await;
    for _ in 0..5 {
        let (status, body) = c.post("/transfers", json!({"from": alice, "to": bob, "amount": 1})).await;
        assert_eq!((status, &body["status"]), (200, &json!("committed")), "{body}");
    }
    let after = total + 5;
    page.wait_until(
        "the transfers after the restart added to the chart's window",
        &chart_shows(&format!("now.committedInWindow === '{after}'")),
    )
    .await;
    let now = chart_now(&mut page).await;
    let points = |v: &Value| v.as_str().and_then(|s| s.parse::<u64>().ok()).expect("points");
    assert!(points(&now["points"]) > points(&points_before_restart), "the chart kept its history: {now}");
    if let Ok(path) = std::env::var("LEDGER_CONSOLE_CHART_SCREENSHOT") {
        page.screenshot(&path).await;
    }
}
