//! The live console in headless Chromium. The page stays open while a participant dies and comes back and while
//! a transfer in doubt resolves, and its chart follows load and a coordinator restart; amounts past 2^53 are shown
//! exactly, and every panel fits the page at 1400 and 800 pixels; the tests read what the page shows through the
//! DevTools protocol.
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
    let events = page.eval("document.getElementById('events').innerText").await;
    assert!(events.as_str().is_some_and(|t| t.starts_with("nothing yet")), "an empty list says so: {events}");
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
    assert_eq!(states, json!(r#"["chart"]"#), "the coordinator's recent seconds at once, no wait for a second reading");
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

    // A page opened now shows that load at once, from the coordinator's record of its recent seconds.
    page.call("Page.reload", json!({})).await;
    page.wait_until(
        "the transfers before the reload in the reloaded page's chart",
        &chart_shows(&format!("Array.isArray(window.chartStates) && now.committedInWindow === '{total}'")),
    )
    .await;
    let states = page.eval("JSON.stringify(chartStates.filter((s) => s !== 'loading…'))").await;
    assert_eq!(states, json!(r#"["chart"]"#), "the chart at once, with the recent past in it");

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

/// The panels (by title) whose content is wider than the panel, and the page if it scrolls sideways.
const OVERFLOWING: &str = "(() => { const out = []; \
    document.querySelectorAll('section').forEach((s) => { if (s.scrollWidth > s.clientWidth + 1) \
      out.push(s.querySelector('h2').textContent + ': ' + s.scrollWidth + ' > ' + s.clientWidth); }); \
    if (document.documentElement.scrollWidth > window.innerWidth) \
      out.push('the page: ' + document.documentElement.scrollWidth + ' > ' + window.innerWidth); \
    return out; })()";

/// The size in pixels, as drawn, of the chart's smallest label (axis or legend): its font size times the scale
/// of its SVG.
const SMALLEST_CHART_LABEL_PX: &str = "(() => { const sizes = [...document.querySelectorAll('#rates svg text')] \
    .map((t) => { const svg = t.ownerSVGElement; \
      return parseFloat(getComputedStyle(t).fontSize) * svg.getBoundingClientRect().width / svg.viewBox.baseVal.width; }); \
    return sizes.length ? Math.min(...sizes) : 0; })()";

#[tokio::test(flavor = "multi_thread")]
async fn the_console_shows_amounts_past_2_pow_53_exactly_and_fits_1400_and_800_pixels() {
    let c = Cluster::start().await;
    let (rich, other) = cross_shard_pair("exact");
    // The longest account id there is, which must wrap rather than widen its table.
    let long: String = format!("exact-{}", "wrapping-account-name-".repeat(3)).chars().take(64).collect();
    c.create_account(&rich, i64::MAX).await;
    c.create_account(&other, 0).await;
    c.create_account(&long, 0).await;
    // Amounts past 2^53 (9007199254740992), which a double cannot hold exactly.
    let (single, leg_a, leg_b, held) = ((1i64 << 62) + 3, (1i64 << 61) + 1, (1i64 << 60) + 5, (1i64 << 59) + 7);
    let (status, body) = c.post("/transfers", json!({"from": rich, "to": other, "amount": single})).await;
    assert_eq!((status, &body["status"]), (200, &json!("committed")), "{body}");
    let legs =
        json!({"legs": [{"from": rich, "to": other, "amount": leg_a}, {"from": rich, "to": long, "amount": leg_b}]});
    let (status, legs) = c.post("/transfers", legs).await;
    assert_eq!((status, &legs["status"]), (200, &json!("committed")), "{legs}");
    let hold = json!({"from": rich, "to": other, "amount": held, "hold": true, "expires_in_s": 600});
    let (status, hold) = c.post("/transfers", hold).await;
    assert_eq!((status, &hold["status"]), (200, &json!("held")), "{hold}");
    let balance = i64::MAX - single - leg_a - leg_b;
    let account = c.account(&rich).await;
    assert_eq!((account["balance"].as_i64(), account["available"].as_i64()), (Some(balance), Some(balance - held)));

    let mut page = Browser::open(&c.api("/")).await;
    let rich_row = format!("document.querySelector('#accounts tr[data-account=\"{rich}\"]')");
    page.wait_until(
        "the rich account's exact balance, held and available",
        &format!(
            "{rich_row}?.dataset.balance === '{balance}' && {rich_row}?.dataset.held === '{held}' && \
             {rich_row}?.dataset.available === '{}'",
            balance - held
        ),
    )
    .await;
    let cells = page.eval(&format!("[...{rich_row}.cells].map((c) => c.textContent)")).await;
    assert_eq!(
        cells,
        json!([
            rich,
            account["shard"].to_string(),
            balance.to_string(),
            held.to_string(),
            (balance - held).to_string()
        ]),
        "the cells show the exact amounts"
    );
    let legs_id = legs["id"].as_str().expect("id");
    let legs_row = format!("document.querySelector('#transfers tr[data-transfer=\"{legs_id}\"]')");
    let total = i128::from(leg_a) + i128::from(leg_b);
    page.wait_until("the exact total of the legs", &format!("{legs_row}?.dataset.amount === '{total}'")).await;
    let single_id = body["id"].as_str().expect("id");
    page.wait_until(
        "the exact amount of the transfer",
        &format!(
            "document.querySelector('#transfers tr[data-transfer=\"{single_id}\"]')?.dataset.amount === '{single}'"
        ),
    )
    .await;
    let hold_id = hold["id"].as_str().expect("id");
    page.wait_until(
        "the exact amount of the hold",
        &format!("document.querySelector('#holds tr[data-hold=\"{hold_id}\"]')?.dataset.amount === '{held}'"),
    )
    .await;
    page.wait_until(
        "the audit's exact totals",
        &format!("document.getElementById('audit').innerText.includes('{}')", i64::MAX),
    )
    .await;
    page.wait_until("the chart", "document.querySelector('#rates svg') !== null").await;

    for width in [1400, 800] {
        let metrics = json!({"width": width, "height": 1000, "deviceScaleFactor": 1, "mobile": false});
        page.call("Emulation.setDeviceMetricsOverride", metrics).await;
        // Two refreshes: the chart is drawn again at its panel's new width.
        let refreshes = page.eval("Number(document.body.dataset.refreshes)").await.as_u64().unwrap_or(0);
        page.wait_until(
            "two refreshes at the new width",
            &format!("Number(document.body.dataset.refreshes) >= {}", refreshes + 2),
        )
        .await;
        assert_eq!(page.eval("window.innerWidth").await, json!(width));
        assert_eq!(page.eval(OVERFLOWING).await, json!([]), "no panel wider than its box at {width}px");
        let available_right = page.eval(&format!("{rich_row}.cells[4].getBoundingClientRect().right")).await;
        let panel_right = page.eval(&format!("{rich_row}.closest('section').getBoundingClientRect().right")).await;
        assert!(
            available_right.as_f64().zip(panel_right.as_f64()).is_some_and(|(cell, panel)| cell <= panel),
            "the available column is inside the Accounts panel at {width}px: {available_right} vs {panel_right}"
        );
        let label = page.eval(SMALLEST_CHART_LABEL_PX).await.as_f64().unwrap_or(0.0);
        assert!(label >= 11.5, "the chart's labels are legible at {width}px: {label}px");
        if let Ok(path) = std::env::var("LEDGER_CONSOLE_LAYOUT_SCREENSHOT") {
            page.screenshot(&format!("{path}-{width}.png")).await;
        }
    }
}
