//! The coordinator's binary stream, against the real participant binary: who may open it, what a bad frame
//! does (the connection closes and nothing of the frame is applied), and that a SIGKILL in the middle of a
//! stream of frames loses no vote that was sent.

use crate::{command, start, start_with, Participant, CLUSTER_ID};
use common::ledger::{AccountId, Amount, Posting, Transfer};
use common::stream::{self, Down, StreamError, Up};
use futures::{SinkExt, StreamExt};
use protocol::coordinator_core::{FromShard, ToShard};
use protocol::msg::{PrepareItem, Vote};
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

const TOKEN: &str = "stream-test-secret-0123456789";
const OTHER_CLUSTER: &str = "00000000-0000-4000-8000-0000000000aa";
/// How long the participant may take to close a connection it refuses.
const CLOSE_WITHIN: Duration = Duration::from_secs(5);

fn address(p: &Participant) -> String {
    p.url.trim_start_matches("http://").to_owned()
}

fn id(s: &str) -> AccountId {
    AccountId::new(s).expect("valid id")
}

fn prepare(account: &str, amount: i64) -> ToShard {
    let transfer = Transfer { from: id(account), to: id("elsewhere"), amount: Amount::new(amount).expect("positive") };
    let item = PrepareItem {
        id: Uuid::new_v4(),
        transfer,
        postings: vec![Posting { account: id(account), delta: -amount }],
        coordinator_url: "http://127.0.0.1:9".into(),
    };
    ToShard::Prepare { item, made_by: None }
}

async fn next_down(framed: &mut stream::FramedStream<tokio::net::TcpStream>) -> Down {
    loop {
        let down = tokio::time::timeout(CLOSE_WITHIN, stream::next::<_, Down>(framed)).await;
        match down.expect("a reply in time").expect("a frame") {
            Down::Heartbeat => continue,
            replies => return replies,
        }
    }
}

/// True once the participant has closed the connection (EOF or reset), within `CLOSE_WITHIN`.
async fn closed_by_peer(mut tcp: tokio::net::TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + CLOSE_WITHIN;
    loop {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue, // heartbeats before the close
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_stream_needs_the_secret_the_cluster_and_the_upgrade_header() {
    let dir = tempfile::tempdir().expect("temp dir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, TOKEN).expect("write token");
    let mut cmd = command(0, crate::free_port(), &dir.path().join("data"));
    cmd.arg("--cluster-token-file").arg(&token_file);
    let p = start_with(cmd).await;
    let addr = address(&p);

    let refused = |r: Result<_, StreamError>| match r {
        Err(StreamError::Refused(why)) => why,
        Err(other) => panic!("expected a refusal, got {other}"),
        Ok(_) => panic!("the stream opened"),
    };
    let why = refused(stream::connect(&addr, CLUSTER_ID, None).await);
    assert!(why.starts_with("HTTP/1.1 401") && why.contains("unauthorized"), "no token: {why}");
    let why = refused(stream::connect(&addr, CLUSTER_ID, Some("stream-test-secret-0123456780")).await);
    assert!(why.starts_with("HTTP/1.1 401"), "wrong token: {why}");

    // The right secret: the shard adopts this cluster, and the stream serves a read.
    let mut framed = stream::connect(&addr, CLUSTER_ID, Some(TOKEN)).await.expect("the stream opens");
    framed.send(stream::encode(&Up::Items(vec![ToShard::Read { read: 7, account: id("nobody") }]))).await.expect("send");
    assert_eq!(next_down(&mut framed).await, Down::Replies(vec![FromShard::Account { read: 7, account: None }]));

    let why = refused(stream::connect(&addr, OTHER_CLUSTER, Some(TOKEN)).await);
    assert!(why.starts_with("HTTP/1.1 403") && why.contains("wrong_cluster"), "foreign cluster: {why}");

    // A plain GET of the route, without asking to upgrade, is a 400 in the usual error shape.
    let reply = p
        .http
        .get(format!("{}{}", p.url, stream::PATH_STREAM))
        .header("x-ledger-cluster-token", TOKEN)
        .header("x-ledger-cluster-id", CLUSTER_ID)
        .send()
        .await
        .expect("reply");
    assert_eq!(reply.status(), 400);
    let body: Value = reply.json().await.expect("JSON");
    assert_eq!(body["error"]["code"], "bad_upgrade");
}

/// SplitMix64, written out so the seed means the same cases on every build.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A frame's body encoded, then spoiled one way or another.
fn bad_frame(rng: &mut Rng, case: u64) -> (Vec<u8>, &'static str) {
    let valid = stream::encode(&Up::Items(vec![prepare("fuzzed", 10)])).to_vec();
    match case {
        0 => {
            let len = 8 + rng.below(200) as usize;
            let mut body: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            if rng.below(2) == 0 {
                body[0] = stream::FRAME_VERSION; // past the version check, into the decoder
            }
            (length_prefixed(&body), "random bytes")
        }
        1 => {
            let cut = 1 + rng.below(valid.len() as u64 - 1) as usize;
            (length_prefixed(&valid[..cut]), "a valid prepare cut short")
        }
        2 => {
            let mut frame = ((stream::FRAME_BYTES_MAX + 1 + rng.below(1 << 20) as usize) as u32).to_be_bytes().to_vec();
            frame.extend_from_slice(&valid);
            (frame, "a length above the frame limit")
        }
        3 => {
            let mut body = valid.clone();
            body[0] = stream::FRAME_VERSION + 1 + rng.below(200) as u8;
            (length_prefixed(&body), "another version")
        }
        4 => {
            let ToShard::Prepare { mut item, made_by } = prepare("fuzzed", 10) else { unreachable!() };
            item.postings.clear();
            (length_prefixed(&stream::encode(&Up::Items(vec![ToShard::Prepare { item, made_by }]))), "no postings")
        }
        5 => {
            let items = (0..=stream::FRAME_ITEMS_MAX as u64).map(|read| ToShard::Read { read, account: id("fuzzed") });
            (length_prefixed(&stream::encode(&Up::Items(items.collect()))), "too many items")
        }
        _ => {
            // The frame announces its whole length, then the connection ends half way.
            let mut frame = (valid.len() as u32).to_be_bytes().to_vec();
            frame.extend_from_slice(&valid[..valid.len() / 2]);
            (frame, "a frame torn by the connection closing")
        }
    }
}

fn length_prefixed(body: &[u8]) -> Vec<u8> {
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(body);
    frame
}

#[tokio::test(flavor = "multi_thread")]
async fn fuzzed_frames_close_the_connection_and_apply_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut p = start(0, dir.path()).await;
    assert_eq!(p.post("/internal/accounts", json!({"id": "fuzzed", "balance": 1_000})).await.0, 201);
    let addr = address(&p);
    let mut rng = Rng(11);
    for round in 0..240 {
        let mut framed = stream::connect(&addr, CLUSTER_ID, None).await.expect("the stream opens");
        if round % 10 == 9 {
            // Between the bad ones, a good frame on a fresh connection is still served.
            let read = ToShard::Read { read: round, account: id("fuzzed") };
            framed.send(stream::encode(&Up::Items(vec![read]))).await.expect("send");
            match next_down(&mut framed).await {
                Down::Replies(replies) => assert!(
                    matches!(&replies[..], [FromShard::Account { account: Some(a), .. }] if a.balance == 1_000 && a.held == 0),
                    "round {round}: {replies:?}"
                ),
                other => panic!("round {round}: {other:?}"),
            }
            continue;
        }
        let case = rng.below(7);
        let (bytes, what) = bad_frame(&mut rng, case);
        let mut tcp = framed.into_inner();
        tcp.write_all(&bytes).await.expect("write");
        if case == 6 {
            tcp.shutdown().await.expect("half-close");
        }
        assert!(closed_by_peer(tcp).await, "round {round}: {what}: the participant kept the connection open");
    }
    assert!(matches!(p.child.try_wait(), Ok(None)), "the participant is still running");
    let account = p.account("fuzzed").await;
    assert_eq!((account["balance"].clone(), account["held"].clone()), (json!(1_000), json!(0)), "nothing applied");
    let doubt: Value = p
        .http
        .get(format!("{}/internal/in_doubt", p.url))
        .send()
        .await
        .expect("reply")
        .json()
        .await
        .expect("JSON");
    assert_eq!(doubt["transactions"], json!([]), "no prepare from a bad frame was kept");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_participant_killed_mid_stream_keeps_every_vote_it_sent() {
    const FRAMES: usize = 4_000;
    const PER_FRAME: usize = 8;
    let dir = tempfile::tempdir().expect("temp dir");
    let mut p = start(0, dir.path()).await;
    assert_eq!(p.post("/internal/accounts", json!({"id": "rich", "balance": 1_000_000})).await.0, 201);
    let framed = stream::connect(&address(&p), CLUSTER_ID, None).await.expect("the stream opens");
    let (mut sink, mut source) = framed.split();
    let voted: Arc<Mutex<Vec<Uuid>>> = Arc::default();
    let reader = {
        let voted = voted.clone();
        tokio::spawn(async move {
            while let Some(Ok(frame)) = source.next().await {
                if let Ok(Down::Replies(replies)) = stream::decode::<Down>(&frame) {
                    for reply in replies {
                        if let FromShard::Vote { id, vote: Vote::Yes } = reply {
                            voted.lock().expect("lock").push(id);
                        }
                    }
                }
            }
        })
    };
    let writer = tokio::spawn(async move {
        for _ in 0..FRAMES {
            let items = (0..PER_FRAME).map(|_| prepare("rich", 1)).collect();
            if sink.send(stream::encode(&Up::Items(items))).await.is_err() {
                return;
            }
        }
    });
    // Kill it once some votes are out and more frames are on the way.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while voted.lock().expect("lock").len() < 4 * PER_FRAME {
        assert!(std::time::Instant::now() < deadline, "no votes came back");
        tokio::task::yield_now().await;
    }
    p.child.kill().expect("SIGKILL");
    let _ = p.child.wait();
    let _ = writer.await;
    let _ = reader.await;
    let acknowledged = voted.lock().expect("lock").clone();
    assert!(acknowledged.len() < FRAMES * PER_FRAME, "the kill came before the last frame was answered");

    let p = start(0, dir.path()).await;
    let doubt: Value = p
        .http
        .get(format!("{}/internal/in_doubt", p.url))
        .send()
        .await
        .expect("reply")
        .json()
        .await
        .expect("JSON");
    let prepared: Vec<Uuid> = doubt["transactions"]
        .as_array()
        .expect("list")
        .iter()
        .map(|t| Uuid::parse_str(t["id"].as_str().expect("id")).expect("uuid"))
        .collect();
    eprintln!("killed mid-stream: {} YES votes received, {} transfers prepared after the restart", acknowledged.len(), prepared.len());
    for id in &acknowledged {
        assert!(prepared.contains(id), "transfer {id} got a YES before the kill but is not prepared after it");
    }
    let rich = p.account("rich").await;
    assert_eq!(rich["held"], json!(prepared.len()), "every surviving prepare holds its 1, and nothing else does");
    assert_eq!(rich["balance"], json!(1_000_000));
}
