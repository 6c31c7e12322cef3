//! The participant binary on its own, driven as a coordinator drives it (the binary stream for the protocol,
//! HTTP for the rest): holds survive SIGKILL, decisions are idempotent, and a store is bound to its shard.
//! `stream` tests the stream itself: who may open it, malformed frames, a SIGKILL in the middle of a frame.

mod stream;

use common::stream::{self as wire_stream, Down, Up};
use loadgen::launch::{Layout, Node, NodeSpec};
use protocol::ledger::{AccountId, Amount, Posting, Transfer, TransferId};
use protocol::msg::{DecideAck, Decision, FromShard, PrepareItem, RefusalReason, ToShard, Vote};
use serde_json::{json, Value};
use std::path::Path;
use std::process::Stdio;

pub(crate) struct Participant {
    /// The process, killed on drop.
    pub(crate) node: Node,
    pub(crate) url: String,
    pub(crate) http: reqwest::Client,
    /// The cluster id these tests present, as a coordinator would.
    pub(crate) cluster_id: String,
    /// The cluster secret the helpers present, when the participant was started with one.
    pub(crate) cluster_token: Option<String>,
}

pub(crate) const CLUSTER_ID: &str = "6f0c1f56-8d0e-4b3f-9a77-3b1f2f0f7a10";
/// The secret of participants started by `start_with_cluster_token`.
pub(crate) const CLUSTER_TOKEN: &str = "0123456789abcdef0123";

/// Shard `shard` with its store (and its log) in `data`, on a free port, as the launcher writes it.
pub(crate) fn spec(shard: usize, data: &Path) -> NodeSpec {
    let mut layout = Layout::with_free_ports(data, shard + 1);
    // The coordinator URL in the prepared records below points nowhere: keep the resolver quiet.
    layout.participant_args = ["--in-doubt-after-ms", "600000"].map(String::from).to_vec();
    let mut spec = layout.participant(Path::new(env!("CARGO_BIN_EXE_participant")), shard);
    spec.set_flag("--data", &data.display().to_string());
    spec.log = data.join("participant.log");
    spec
}

pub(crate) async fn start(shard: usize, data: &Path) -> Participant {
    start_spec(spec(shard, data)).await
}

pub(crate) async fn start_spec(spec: NodeSpec) -> Participant {
    let url = spec.url();
    let mut node = Node::new(spec, Vec::new());
    node.start(None).await.unwrap_or_else(|e| panic!("{e}\n{}", node.log_tail(20)));
    Participant { node, url, http: reqwest::Client::new(), cluster_id: CLUSTER_ID.into(), cluster_token: None }
}

/// A shard 0 participant that requires `CLUSTER_TOKEN` (kept in `dir/token`, its store in `dir/data`); the
/// helpers below present it.
pub(crate) async fn start_with_cluster_token(dir: &Path) -> Participant {
    let token_file = dir.join("token");
    std::fs::write(&token_file, CLUSTER_TOKEN).expect("write token");
    let mut spec = spec(0, &dir.join("data"));
    spec.set_flag("--cluster-token-file", &token_file.display().to_string());
    let mut p = start_spec(spec).await;
    p.cluster_token = Some(CLUSTER_TOKEN.into());
    p
}

impl Participant {
    /// host:port, as `common::stream::connect` takes it.
    pub(crate) fn addr(&self) -> &str {
        self.url.trim_start_matches("http://")
    }

    /// The cluster id, and the secret if there is one, as a coordinator sends them.
    fn internal(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        let request = request.header("x-ledger-cluster-id", &self.cluster_id);
        match &self.cluster_token {
            Some(token) => request.header("x-ledger-cluster-token", token),
            None => request,
        }
    }

    pub(crate) async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = self.internal(self.http.post(format!("{}{path}", self.url))).json(&body).send().await.expect("reply");
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    pub(crate) async fn get(&self, path: &str) -> (u16, Value) {
        let r = self.internal(self.http.get(format!("{}{path}", self.url))).send().await.expect("reply");
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    pub(crate) async fn account(&self, id: &str) -> Value {
        let (status, body) = self.get(&format!("/internal/accounts/{id}")).await;
        assert_eq!(status, 200, "account {id}: {body}");
        body
    }
}

/// The coordinator's end of the stream, as a test speaks it: a frame of items out, its replies back.
pub(crate) struct StreamClient(wire_stream::FramedStream<tokio::net::TcpStream>);

impl StreamClient {
    pub(crate) async fn open(p: &Participant) -> Self {
        let opened = wire_stream::connect(p.addr(), &p.cluster_id, p.cluster_token.as_deref()).await;
        StreamClient(opened.unwrap_or_else(|e| panic!("the stream opens: {e}")))
    }

    /// Sends `items` as one frame and waits for its replies, one per item, in order.
    pub(crate) async fn send(&mut self, items: Vec<ToShard>) -> Vec<FromShard> {
        let count = items.len();
        wire_stream::send(&mut self.0, &Up::Items(items)).await.expect("frame sent");
        loop {
            let next =
                tokio::time::timeout(std::time::Duration::from_secs(10), wire_stream::next::<_, Down>(&mut self.0));
            match next.await.expect("replies in time").expect("replies") {
                Down::Heartbeat => continue,
                Down::Replies(replies) => {
                    assert_eq!(replies.len(), count, "one reply per item: {replies:?}");
                    return replies;
                }
            }
        }
    }
}

/// A prepare of `amount` from alice, on this shard, to bob, elsewhere.
fn prepare_from_alice(id: TransferId, amount: i64) -> ToShard {
    let alice = AccountId::new("alice").expect("valid");
    let transfer =
        Transfer::one(alice.clone(), AccountId::new("bob").expect("valid"), Amount::new(amount).expect(">0"));
    let postings = vec![Posting { account: alice, delta: -amount }];
    let item = PrepareItem { id, transfer, postings, coordinator_url: "http://127.0.0.1:9".into() };
    ToShard::Prepare { item, made_by: None }
}

#[tokio::test(flavor = "multi_thread")]
async fn prepared_holds_survive_sigkill_and_decisions_apply_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let p = start(0, dir.path()).await;
    assert_eq!(p.post("/internal/accounts", json!({"id": "alice", "balance": 100})).await.0, 201);
    let tx = uuid::Uuid::new_v4();
    let mut link = StreamClient::open(&p).await;
    assert_eq!(link.send(vec![prepare_from_alice(tx, 60)]).await, vec![FromShard::Vote { id: tx, vote: Vote::Yes }]);
    drop(link);
    drop(p); // SIGKILL

    let p = start(0, dir.path()).await;
    let alice = p.account("alice").await;
    assert_eq!((alice["balance"].clone(), alice["held"].clone()), (json!(100), json!(60)), "hold survived");
    // Only 40 is available while the hold stands.
    let mut link = StreamClient::open(&p).await;
    let other = uuid::Uuid::new_v4();
    let refused = Vote::No { reason: RefusalReason::InsufficientFunds, posting: Some(0) };
    assert_eq!(
        link.send(vec![prepare_from_alice(other, 41)]).await,
        vec![FromShard::Vote { id: other, vote: refused }]
    );

    for _ in 0..2 {
        let acked = link.send(vec![ToShard::Decide { id: tx, decision: Decision::Commit }]).await;
        assert_eq!(acked, vec![FromShard::Ack { id: tx, decision: Decision::Commit, ack: DecideAck::Done }]);
    }
    let refused = link.send(vec![ToShard::Decide { id: tx, decision: Decision::Abort }]).await;
    assert_eq!(refused, vec![FromShard::Ack { id: tx, decision: Decision::Abort, ack: DecideAck::Refused }]);
    drop(link);
    drop(p);

    let p = start(0, dir.path()).await;
    let alice = p.account("alice").await;
    assert_eq!((alice["balance"].clone(), alice["held"].clone()), (json!(40), json!(0)));
    let applied: Value =
        p.http.get(format!("{}/internal/applied", p.url)).send().await.expect("reply").json().await.expect("list");
    assert_eq!(applied, json!([{"id": tx, "decision": "commit"}]));
    // The commit is journaled with the balance after it, and the journal survives the restarts.
    let (status, page) = p.get("/internal/accounts/alice/entries").await;
    assert_eq!(status, 200, "{page}");
    let entries: Vec<(Value, Value, Value)> = page["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| (e["kind"].clone(), e["amount"].clone(), e["balance_after"].clone()))
        .collect();
    let expected = vec![(json!("posting"), json!(-60), json!(40)), (json!("opened"), json!(100), json!(100))];
    assert_eq!(entries, expected);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_store_belongs_to_one_shard() {
    let dir = tempfile::tempdir().expect("temp dir");
    drop(start(0, dir.path()).await);
    let mut command = spec(1, dir.path()).command(&[], None).expect("a command line");
    let out = command.stderr(Stdio::piped()).output().expect("run participant");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("belongs to shard 0, not shard 1"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn calls_without_the_secret_or_from_another_cluster_are_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let p = start_with_cluster_token(dir.path()).await;
    let create = json!({"id": "alice", "balance": 5});
    let url = format!("{}/internal/accounts", p.url);

    let no_token =
        p.http.post(&url).header("x-ledger-cluster-id", CLUSTER_ID).json(&create).send().await.expect("reply");
    assert_eq!(no_token.status(), 401);
    let wrong = p.http.post(&url).header("x-ledger-cluster-token", "0123456789abcdef0124").json(&create);
    assert_eq!(wrong.send().await.expect("reply").status(), 401);
    let read = p.http.get(format!("{}/internal/applied", p.url)).send().await.expect("reply");
    assert_eq!(read.status(), 401, "reads of internal state need the secret too");

    let with =
        |id: &str| p.http.post(&url).header("x-ledger-cluster-token", CLUSTER_TOKEN).header("x-ledger-cluster-id", id);
    assert_eq!(with(CLUSTER_ID).json(&create).send().await.expect("reply").status(), 201);
    let other = with("00000000-0000-4000-8000-000000000001").json(&json!({"id": "bob"})).send().await.expect("reply");
    assert_eq!(other.status(), 403, "the first coordinator fixed the cluster");
    let body: Value = other.json().await.expect("JSON");
    assert_eq!(body["error"]["code"], "wrong_cluster");
    let missing = p.http.post(&url).header("x-ledger-cluster-token", CLUSTER_TOKEN).json(&json!({"id": "bob"}));
    assert_eq!(missing.send().await.expect("reply").status(), 400);
    // The health check stays open for load balancers.
    assert_eq!(p.http.get(format!("{}/health", p.url)).send().await.expect("reply").status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_secret_only_loopback_is_served() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut spec = spec(0, dir.path());
    spec.set_flag("--listen", "0.0.0.0:0");
    let out =
        spec.command(&[], None).expect("a command line").stderr(Stdio::piped()).output().expect("run participant");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("refusing to listen on 0.0.0.0"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_coordinator_listing_this_process_as_another_shard_is_told_so() {
    let dir = tempfile::tempdir().expect("temp dir");
    let p = start(0, dir.path()).await;
    let (status, body) = p.post("/internal/join", json!({"shard": 1})).await;
    assert_eq!((status, body["error"]["code"].clone()), (409, json!("wrong_shard")), "{body}");
    assert_eq!(p.post("/internal/join", json!({"shard": 0})).await, (200, json!({"shard": 0})));
}
