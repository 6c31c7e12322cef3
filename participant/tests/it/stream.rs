//! The coordinator's binary stream (`common::stream`) against the real binary: who may open it, that a
//! malformed frame closes its connection with nothing of it applied and the process unharmed, and that a vote
//! sent on the stream survives a SIGKILL that lands in the middle of a frame.

use crate::{start, start_with_cluster_token, CLUSTER_ID, CLUSTER_TOKEN};
use common::stream::{self, Down, StreamError, Up, FRAME_BYTES_MAX, FRAME_ITEMS_MAX, FRAME_VERSION};
use futures::{SinkExt, StreamExt};
use protocol::ledger::{AccountId, Amount, Posting, Transfer};
use protocol::msg::{Decision, PrepareItem, Vote};
use protocol::msg::{FromShard, ToShard};
use protocol::rng::SplitMix64;
use protocol::state::AccountRecord;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use uuid::Uuid;

type Stream = stream::FramedStream<TcpStream>;

/// Longest the participant may take to answer a frame, or to close a connection it must close (a frame left
/// half sent is only noticed by the silence timeout): room for a machine busy with other builds.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);
const _: () = assert!(2 * stream::SILENCE_TIMEOUT.as_millis() < ANSWER_WITHIN.as_millis());

/// A cluster id other than `CLUSTER_ID`.
const OTHER_CLUSTER_ID: &str = "00000000-0000-4000-8000-000000000001";

fn alice() -> AccountId {
    AccountId::new("alice").expect("valid id")
}

/// A prepare of `amount` from alice, who is on this shard, to bob, who is elsewhere.
fn prepare(id: Uuid, amount: i64, made_by: Option<&str>) -> ToShard {
    let transfer =
        Transfer::one(alice(), AccountId::new("bob").expect("valid id"), Amount::new(amount).expect("positive"));
    let item = PrepareItem {
        id,
        transfer,
        postings: vec![Posting { account: alice(), delta: -amount }],
        coordinator_url: "http://127.0.0.1:9".into(),
    };
    ToShard::Prepare { item, made_by: made_by.map(str::to_owned) }
}

/// `body` behind its 4-byte big-endian length, as `LengthDelimitedCodec` frames it.
fn frame(body: &[u8]) -> Vec<u8> {
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(body);
    out
}

/// The next `Down::Replies`, skipping heartbeats.
async fn replies(stream: &mut Stream) -> Result<Vec<FromShard>, String> {
    loop {
        match tokio::time::timeout(ANSWER_WITHIN, stream::next::<_, Down>(stream)).await {
            Err(_) => return Err(format!("no reply within {ANSWER_WITHIN:?}")),
            Ok(Err(e)) => return Err(format!("no reply: {e}")),
            Ok(Ok(Down::Heartbeat)) => continue,
            Ok(Ok(Down::Replies(replies))) => return Ok(replies),
        }
    }
}

/// Sends one `Read` of alice on `stream` and returns what the participant answered.
async fn read_alice(stream: &mut Stream, read: u64) -> Result<Option<AccountRecord>, String> {
    stream::send(stream, &Up::Items(vec![ToShard::Read { read, account: alice() }]))
        .await
        .map_err(|e| format!("send: {e}"))?;
    match replies(stream).await?.as_slice() {
        [FromShard::Account { read: answered, account }] if *answered == read => Ok(*account),
        other => Err(format!("a Read was answered with {other:?}")),
    }
}

/// The status and JSON body of a refused upgrade.
fn refusal(opened: Result<Stream, StreamError>) -> (u16, Value) {
    let text = match opened {
        Err(StreamError::Refused(text)) => text,
        Err(other) => panic!("expected a refusal, got: {other}"),
        Ok(_) => panic!("expected a refusal, the stream opened"),
    };
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok());
    let body = text.find('{').and_then(|at| serde_json::from_str(&text[at..]).ok());
    (status.unwrap_or_else(|| panic!("no status in {text:?}")), body.unwrap_or(Value::Null))
}

/// Sends `head` (an HTTP/1.1 request head) on a fresh connection; returns the response's status and JSON body.
async fn raw_request(addr: &str, head: &str) -> (u16, Value) {
    let exchange = async {
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        tcp.write_all(head.as_bytes()).await.expect("send head");
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = tcp.read(&mut chunk).await.expect("read response");
            got.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&got).into_owned();
            if let Some(end) = text.find("\r\n\r\n") {
                let length = text[..end]
                    .lines()
                    .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned()))
                    .and_then(|v| v.parse::<usize>().ok())
                    .unwrap_or(0);
                if got.len() >= end + 4 + length || n == 0 {
                    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).expect("status");
                    let body = serde_json::from_slice(&got[end + 4..]).unwrap_or(Value::Null);
                    return (status, body);
                }
            }
            assert!(n > 0, "connection closed before a whole response: {text:?}");
        }
    };
    tokio::time::timeout(ANSWER_WITHIN, exchange).await.expect("a response in time")
}

#[tokio::test(flavor = "multi_thread")]
async fn the_stream_opens_only_with_the_secret_for_this_cluster_and_the_right_upgrade() {
    let dir = tempfile::tempdir().expect("temp dir");
    let p = start_with_cluster_token(dir.path()).await;
    let addr = p.addr();
    let code = |(status, body): (u16, Value)| (status, body["error"]["code"].clone());

    assert_eq!(code(refusal(stream::connect(addr, CLUSTER_ID, None).await)), (401, json!("unauthorized")));
    let wrong = stream::connect(addr, CLUSTER_ID, Some("0123456789abcdef0124")).await;
    assert_eq!(code(refusal(wrong)), (401, json!("unauthorized")));

    // The stream is the shard's first internal call: it fixes the cluster, and reads an account not there yet.
    let mut opened = stream::connect(addr, CLUSTER_ID, Some(CLUSTER_TOKEN)).await.expect("the stream opens");
    assert_eq!(read_alice(&mut opened, 1).await, Ok(None));
    drop(opened);
    let foreign = stream::connect(addr, OTHER_CLUSTER_ID, Some(CLUSTER_TOKEN)).await;
    assert_eq!(code(refusal(foreign)), (403, json!("wrong_cluster")), "the first cluster id presented was adopted");

    let auth = format!("x-ledger-cluster-id: {CLUSTER_ID}\r\nx-ledger-cluster-token: {CLUSTER_TOKEN}\r\n");
    let plain_get = format!("GET /internal/stream HTTP/1.1\r\nHost: {addr}\r\n{auth}\r\n");
    assert_eq!(code(raw_request(addr, &plain_get).await), (400, json!("bad_upgrade")), "no Upgrade header");
    let other_protocol = format!(
        "GET /internal/stream HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: ledger-stream/2\r\n{auth}\r\n"
    );
    assert_eq!(code(raw_request(addr, &other_protocol).await), (400, json!("bad_upgrade")), "another version");
    let no_cluster_id = format!(
        "GET /internal/stream HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: {}\r\nx-ledger-cluster-token: {CLUSTER_TOKEN}\r\n\r\n",
        stream::UPGRADE_PROTOCOL
    );
    assert_eq!(code(raw_request(addr, &no_cluster_id).await), (400, json!("missing_cluster_id")));

    assert_eq!(p.post("/internal/accounts", json!({"id": "alice", "balance": 5})).await.0, 201);
    let mut opened = stream::connect(addr, CLUSTER_ID, Some(CLUSTER_TOKEN)).await.expect("the stream opens");
    assert_eq!(
        read_alice(&mut opened, 2).await,
        Ok(Some(AccountRecord { balance: 5, held: 0, incoming: 0, overdraft_limit: 0 }))
    );
}

/// The fuzz run's seed: fixed, so a failure replays exactly.
const FUZZ_SEED: u64 = 0x5eed_1ed6_e700_0001;
const FUZZ_CASES: usize = 300;
/// Connections the fuzz run keeps open at once, so the cases that wait out the silence timeout overlap.
const FUZZ_CONNECTIONS_AT_ONCE: usize = 8;
/// Alice's balance in the fuzz run: enough for any prepare the garbage carries to be voted YES, if applied.
const FUZZ_BALANCE: i64 = 1_000_000;

/// One connection of the fuzz run.
enum Case {
    /// Bytes after which the participant must close the connection, having answered and applied nothing.
    Garbage {
        kind: &'static str,
        what: String,
        bytes: Vec<u8>,
        /// Shut our write side after the bytes, so a frame left incomplete meets the end of the stream rather
        /// than the silence timeout.
        half_close: bool,
    },
    /// A well-formed Read, which must be answered with the untouched account.
    Read { read: u64 },
}

impl Case {
    fn kind(&self) -> &'static str {
        match self {
            Case::Garbage { kind, .. } => kind,
            Case::Read { .. } => "read",
        }
    }

    fn describe(&self) -> String {
        match self {
            Case::Garbage { what, bytes, half_close, .. } => {
                let head: Vec<u8> = bytes.iter().copied().take(16).collect();
                format!("{what}, {} bytes starting {head:02x?}, half_close {half_close}", bytes.len())
            }
            Case::Read { read } => format!("a Read (read {read})"),
        }
    }
}

/// A few items that would change alice's hold, and through a commit her balance, if they were applied.
fn items_that_would_apply(rng: &mut SplitMix64) -> Vec<ToShard> {
    let mut items = Vec::new();
    for _ in 0..1 + rng.below(4) {
        let id = rng.uuid();
        let made_by = if rng.below(2) == 0 { Some("fuzz") } else { None };
        items.push(prepare(id, 1 + rng.below(100) as i64, made_by));
        match rng.below(3) {
            0 => items.push(ToShard::Decide { id, decision: Decision::Commit }),
            1 => items.push(ToShard::Read { read: rng.next_u64(), account: alice() }),
            _ => {}
        }
    }
    items
}

fn fuzz_case(rng: &mut SplitMix64, index: usize) -> Case {
    if index % 10 == 9 {
        return Case::Read { read: index as u64 };
    }
    let half_close = rng.below(2) == 0;
    match rng.below(6) {
        0 => {
            let len = rng.below(65) as usize;
            if rng.below(2) == 0 {
                let len = len.max(1);
                Case::Garbage { kind: "random", what: "random bytes".into(), bytes: rng.bytes(len), half_close }
            } else {
                let mut body = rng.bytes(len);
                if len > 0 && rng.below(2) == 0 {
                    body[0] = FRAME_VERSION; // past the version check, into the decoder
                }
                let bytes = frame(&body);
                Case::Garbage { kind: "random", what: "a frame of random bytes".into(), bytes, half_close }
            }
        }
        1 => {
            let body = stream::encode(&Up::Items(items_that_would_apply(rng))).to_vec();
            let cut = if rng.below(2) == 0 { 1 } else { 1 + rng.below(16.min(body.len() as u64 - 1)) as usize };
            let kept = &body[..body.len() - cut];
            if rng.below(2) == 0 {
                // A whole frame, whose body is a prepare frame missing its last bytes: it must not decode.
                let what = format!("a frame of prepares cut short by {cut} bytes");
                Case::Garbage { kind: "truncated", what, bytes: frame(kept), half_close }
            } else {
                // The frame's length, and fewer bytes than it promises.
                let mut bytes = (body.len() as u32).to_be_bytes().to_vec();
                bytes.extend_from_slice(kept);
                let what = format!("a prepare frame sent without its last {cut} bytes");
                Case::Garbage { kind: "truncated", what, bytes, half_close }
            }
        }
        2 => {
            let over = FRAME_BYTES_MAX as u64 + 1 + rng.below(u64::from(u32::MAX) - FRAME_BYTES_MAX as u64);
            let mut bytes = (over as u32).to_be_bytes().to_vec();
            bytes.extend_from_slice(&stream::encode(&Up::Items(items_that_would_apply(rng))));
            let what = format!("a length prefix of {over}, above {FRAME_BYTES_MAX}");
            Case::Garbage { kind: "oversized", what, bytes, half_close }
        }
        3 => {
            let mut body = stream::encode(&Up::Items(items_that_would_apply(rng))).to_vec();
            body[0] = loop {
                let version = rng.next_u64() as u8;
                if version != FRAME_VERSION {
                    break version;
                }
            };
            let what = format!("a prepare frame of version {}", body[0]);
            Case::Garbage { kind: "wrong_version", what, bytes: frame(&body), half_close }
        }
        4 => {
            let mut items = items_that_would_apply(rng);
            let ToShard::Prepare { mut item, made_by } = prepare(rng.uuid(), 1, None) else { unreachable!() };
            item.postings.clear();
            let at = rng.below(items.len() as u64 + 1) as usize;
            items.insert(at, ToShard::Prepare { item, made_by });
            let what = format!("{} items, item {at} a prepare without postings", items.len());
            Case::Garbage { kind: "empty_postings", what, bytes: frame(&stream::encode(&Up::Items(items))), half_close }
        }
        _ => {
            let count = FRAME_ITEMS_MAX + 1 + rng.below(64) as usize;
            let items: Vec<ToShard> = (0..count).map(|_| prepare(rng.uuid(), 1, None)).collect();
            let what = format!("{count} prepares, above {FRAME_ITEMS_MAX}");
            Case::Garbage { kind: "too_many_items", what, bytes: frame(&stream::encode(&Up::Items(items))), half_close }
        }
    }
}

/// Runs one case on a fresh connection.
async fn run_fuzz_case(addr: &str, case: &Case) -> Result<(), String> {
    let mut opened =
        stream::connect(addr, CLUSTER_ID, None).await.map_err(|e| format!("the stream did not open: {e}"))?;
    match case {
        Case::Read { read } => match read_alice(&mut opened, *read).await? {
            Some(AccountRecord { balance: FUZZ_BALANCE, held: 0, incoming: 0, overdraft_limit: 0 }) => Ok(()),
            other => Err(format!("alice changed: {other:?}")),
        },
        Case::Garbage { bytes, half_close, .. } => {
            // A write may fail: the participant can close before it has read everything we send.
            let _ = opened.get_mut().write_all(bytes).await;
            if *half_close {
                let _ = opened.get_mut().shutdown().await;
            }
            let closed = async {
                loop {
                    match opened.next().await {
                        None | Some(Err(_)) => return Ok(()),
                        Some(Ok(frame)) => match stream::decode::<Down>(&frame) {
                            Ok(Down::Heartbeat) => continue,
                            other => return Err(format!("the participant answered: {other:?}")),
                        },
                    }
                }
            };
            tokio::time::timeout(ANSWER_WITHIN, closed)
                .await
                .map_err(|_| format!("the connection was still open after {ANSWER_WITHIN:?}"))?
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_frames_close_the_connection_and_apply_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut p = start(0, dir.path()).await;
    assert_eq!(p.post("/internal/accounts", json!({"id": "alice", "balance": FUZZ_BALANCE})).await.0, 201);

    let mut rng = SplitMix64::new(FUZZ_SEED);
    let cases: Vec<Case> = (0..FUZZ_CASES).map(|i| fuzz_case(&mut rng, i)).collect();
    let mut kinds: HashMap<&str, usize> = HashMap::new();
    for case in &cases {
        *kinds.entry(case.kind()).or_default() += 1;
    }
    for kind in ["random", "truncated", "oversized", "wrong_version", "empty_postings", "too_many_items", "read"] {
        assert!(kinds.get(kind).is_some_and(|n| *n >= 5), "seed {FUZZ_SEED:#x} makes too few {kind} cases: {kinds:?}");
    }

    let addr = p.addr().to_owned();
    let addr = addr.as_str();
    let failures: Vec<String> = futures::stream::iter(cases.iter().enumerate())
        .map(|(i, case)| async move {
            run_fuzz_case(addr, case).await.err().map(|e| format!("case {i}, {}: {e}", case.describe()))
        })
        .buffer_unordered(FUZZ_CONNECTIONS_AT_ONCE)
        .filter_map(|failure| async move { failure })
        .collect()
        .await;
    assert!(
        failures.is_empty(),
        "seed {FUZZ_SEED:#x}: {} of {FUZZ_CASES} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );

    assert!(p.node.is_running(), "the participant is still running");
    let health = p.http.get(format!("{}/health", p.url)).send().await.expect("reply");
    assert_eq!(health.status(), 200);
    let alice = p.account("alice").await;
    assert_eq!((alice["balance"].clone(), alice["held"].clone()), (json!(FUZZ_BALANCE), json!(0)), "{alice}");
    let (status, in_doubt) = p.get("/internal/in_doubt").await;
    assert_eq!((status, in_doubt["transactions"].clone()), (200, json!([])), "{in_doubt}");
    assert_eq!(p.get("/internal/applied").await, (200, json!([])), "no decision was applied");
}

const KILL_SEED: u64 = 0x6b11_1ed0_0000_0003;
/// Alice's balance in the kill test: room for some 10,000 YES votes (amounts average 5), far more than come
/// back before the kill, so the kill lands while YES votes are still being sent.
const KILL_BALANCE: i64 = 50_000;
/// Frames the writer would send if nothing stopped it: far more than are answered before the kill.
const KILL_FRAMES: usize = 20_000;
const KILL_ITEMS_PER_FRAME: usize = 8;
/// The participant is killed once this many votes have arrived.
const KILL_AFTER_VOTES: usize = 400;

/// The amount of transfer `id` in the kill test, so the reader and the checks know it from the id alone.
fn kill_amount(id: Uuid) -> i64 {
    1 + (id.as_u128() % 9) as i64
}

/// The ids of the kill test's next frame.
fn kill_frame(rng: &mut SplitMix64) -> Vec<Uuid> {
    (0..KILL_ITEMS_PER_FRAME).map(|_| rng.uuid()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn votes_sent_on_the_stream_survive_a_sigkill_in_the_middle_of_a_frame() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut p = start(0, dir.path()).await;
    assert_eq!(p.post("/internal/accounts", json!({"id": "alice", "balance": KILL_BALANCE})).await.0, 201);
    let opened = stream::connect(p.addr(), CLUSTER_ID, None).await.expect("the stream opens");
    let (mut sink, mut source) = opened.split();

    // Frames back to back, never waiting for an answer, until the connection breaks.
    let writer = tokio::spawn(async move {
        let mut rng = SplitMix64::new(KILL_SEED);
        let mut sent = 0;
        while sent < KILL_FRAMES {
            let items = kill_frame(&mut rng).into_iter().map(|id| prepare(id, kill_amount(id), Some("kill"))).collect();
            if sink.send(stream::encode(&Up::Items(items))).await.is_err() {
                break;
            }
            sent += 1;
        }
        sent
    });

    // One reply frame per frame, in order; the YES votes are what a crash must not take back.
    let mut expected = SplitMix64::new(KILL_SEED);
    let (mut answered, mut votes, mut killed) = (0usize, 0usize, false);
    let mut acknowledged: Vec<Uuid> = Vec::new();
    loop {
        let next = tokio::time::timeout(ANSWER_WITHIN, source.next()).await.expect("a reply or the end in time");
        let frame = match next {
            None | Some(Err(_)) => break,
            Some(Ok(frame)) => frame,
        };
        let replies = match stream::decode::<Down>(&frame).expect("a reply decodes") {
            Down::Heartbeat => continue,
            Down::Replies(replies) => replies,
        };
        let ids = kill_frame(&mut expected);
        assert_eq!(replies.len(), ids.len(), "reply frame {answered}: one reply per item");
        for (reply, id) in replies.iter().zip(ids) {
            match reply {
                FromShard::Vote { id: voted, vote: Vote::Yes } if *voted == id => acknowledged.push(id),
                FromShard::Vote { id: voted, vote: Vote::No { .. } } if *voted == id => {}
                other => panic!("reply frame {answered}: expected the vote on {id}, got {other:?}"),
            }
        }
        answered += 1;
        votes += replies.len();
        if !killed && votes >= KILL_AFTER_VOTES {
            p.node.kill();
            killed = true;
        }
    }
    assert!(killed, "the stream ended after {votes} votes, before the kill");
    let sent = tokio::time::timeout(ANSWER_WITHIN, writer).await.expect("the writer stops").expect("writer");
    assert!(answered < sent, "{answered} of {sent} frames answered: the kill came after the last frame");
    let acknowledged_held: i64 = acknowledged.iter().map(|id| kill_amount(*id)).sum();
    assert!(acknowledged_held <= KILL_BALANCE, "YES votes for {acknowledged_held}, above the balance");
    assert!(!acknowledged.is_empty(), "no YES vote arrived before the kill");
    eprintln!(
        "killed after {answered} of {sent} frames were answered: {votes} votes, {} YES for {acknowledged_held}",
        acknowledged.len()
    );
    drop(p);

    let p = start(0, dir.path()).await;
    let alice = p.account("alice").await;
    let held = alice["held"].as_i64().expect("held");
    assert_eq!(alice["balance"], json!(KILL_BALANCE), "{alice}");
    assert!(
        held >= acknowledged_held,
        "held {held} < {acknowledged_held} acknowledged over {} YES votes",
        acknowledged.len()
    );
    assert!(held <= KILL_BALANCE, "held {held} exceeds the balance");

    let (status, in_doubt) = p.get("/internal/in_doubt").await;
    assert_eq!(status, 200, "{in_doubt}");
    let mut rng = SplitMix64::new(KILL_SEED);
    let sent_ids: HashSet<Uuid> = (0..sent).flat_map(|_| kill_frame(&mut rng)).collect();
    let mut prepared = HashSet::new();
    let mut prepared_held = 0;
    for transaction in in_doubt["transactions"].as_array().expect("a list") {
        let id: Uuid = transaction["id"].as_str().and_then(|s| s.parse().ok()).expect("an id");
        assert!(sent_ids.contains(&id), "{id} is prepared but was never sent");
        let amount = kill_amount(id);
        assert_eq!(transaction["amount"], json!(amount), "{transaction}");
        assert_eq!(transaction["postings"], json!([{"account": "alice", "delta": -amount}]), "{transaction}");
        prepared_held += amount;
        prepared.insert(id);
    }
    let lost: Vec<&Uuid> = acknowledged.iter().filter(|id| !prepared.contains(id)).collect();
    assert!(lost.is_empty(), "{} of {} YES votes lost by the kill: {lost:?}", lost.len(), acknowledged.len());
    assert_eq!(prepared_held, held, "the hold is the sum of the prepared transfers");
    eprintln!("after the restart: {} transfers prepared, holding {held}", prepared.len());

    // The restarted participant serves the same state on the stream.
    let mut opened = stream::connect(p.addr(), CLUSTER_ID, None).await.expect("the stream opens again");
    let record = AccountRecord { balance: KILL_BALANCE, held, incoming: 0, overdraft_limit: 0 };
    assert_eq!(read_alice(&mut opened, 1).await, Ok(Some(record)));
}
