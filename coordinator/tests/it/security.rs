//! Only the cluster may move money: cluster secret and id on internal calls, API tokens and roles on the public
//! API, and limits (in-flight transfers, request time, connections) that hold under slow or greedy clients.

use crate::harness::{cross_shard_pair, Cluster, Options};
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const ADMIN_TOKEN: &str = "admin-token-0123456789";
const CLIENT_TOKEN: &str = "client-token-0123456789";

fn tokens_file() -> String {
    format!("# test tokens\nops admin {ADMIN_TOKEN}\nshop client {CLIENT_TOKEN}\n")
}

async fn call(c: &Cluster, method: &str, path: &str, token: Option<&str>, body: Option<Value>) -> (u16, Value) {
    let mut req = c.http.request(method.parse().expect("method"), c.api(path));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.expect("reply");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread")]
async fn api_tokens_guard_every_route_but_health_and_admin_routes_need_admin() {
    // The hot path logs nothing per transfer at info level; the span with the token's name shows at debug.
    let log_filter = "info,coordinator=debug".to_string();
    let c = Cluster::start_with(Options { api_tokens: Some(tokens_file()), log_filter, ..Options::default() }).await;
    let (alice, bob) = cross_shard_pair("auth");

    assert_eq!(call(&c, "GET", "/health", None, None).await.0, 200);
    let guarded = [
        ("GET", "/accounts/x".to_string(), None),
        ("POST", "/accounts".to_string(), Some(json!({"id": alice, "balance": 100}))),
        ("POST", "/transfers".to_string(), Some(json!({"from": alice, "to": bob, "amount": 1}))),
        ("GET", format!("/transfers/{}", uuid::Uuid::new_v4()), None),
        ("GET", "/transactions?status=unacknowledged".to_string(), None),
        ("GET", "/stats".to_string(), None),
    ];
    for (method, path, body) in &guarded {
        let (status, reply) = call(&c, method, path, None, body.clone()).await;
        assert_eq!((status, reply["error"]["code"].clone()), (401, json!("unauthorized")), "{method} {path}");
        let (status, _) = call(&c, method, path, Some("not-a-real-token-at-all"), body.clone()).await;
        assert_eq!(status, 401, "{method} {path} with an unknown token");
    }

    let create = |id: &str| json!({"id": id, "balance": 100});
    let (status, reply) = call(&c, "POST", "/accounts", Some(CLIENT_TOKEN), Some(create(&alice))).await;
    assert_eq!((status, reply["error"]["code"].clone()), (403, json!("forbidden")), "clients cannot create accounts");
    assert_eq!(call(&c, "POST", "/accounts", Some(ADMIN_TOKEN), Some(create(&alice))).await.0, 201);
    assert_eq!(call(&c, "POST", "/accounts", Some(ADMIN_TOKEN), Some(create(&bob))).await.0, 201);

    let id = uuid::Uuid::new_v4();
    let transfer = json!({"from": alice, "to": bob, "amount": 10, "id": id});
    let (status, reply) = call(&c, "POST", "/transfers", Some(CLIENT_TOKEN), Some(transfer)).await;
    assert_eq!(status, 200, "{reply}");
    let (status, reply) = call(&c, "GET", &format!("/transfers/{id}"), Some(CLIENT_TOKEN), None).await;
    assert_eq!((status, reply["made_by"].clone()), (200, json!("shop")), "the token's name is recorded");

    // The name is in the logs, the tokens never are.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let log = std::fs::read_to_string(c.data_dir().join("coordinator.log")).expect("coordinator log");
    assert!(log.contains("made_by=shop"), "the request span names the token");
    for secret in [ADMIN_TOKEN, CLIENT_TOKEN, c.cluster_token.as_deref().expect("cluster token")] {
        assert!(!log.contains(secret), "a secret leaked into the log");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn internal_calls_need_the_cluster_secret_and_id() {
    let c = Cluster::start().await;
    let token = c.cluster_token.clone().expect("harness clusters have a secret");
    let query = json!({"shard": 0, "items": []});
    let url = format!("{}/internal/decisions", c.coordinator.url());
    let r = c.http.post(&url).json(&query).send().await.expect("reply");
    assert_eq!(r.status(), 401, "a decision query without the secret");
    let r = c.http.post(&url).header("x-ledger-cluster-token", &token).json(&query).send().await.expect("reply");
    assert_eq!(r.status(), 200);
    let other = "00000000-0000-4000-8000-000000000002";
    let r = c.http.post(&url).header("x-ledger-cluster-token", &token).header("x-ledger-cluster-id", other);
    assert_eq!(r.json(&query).send().await.expect("reply").status(), 403, "a query from another cluster");

    // Someone who reaches a participant's port cannot commit or prepare anything without the secret.
    // The coordinator binds its shards to its cluster id as it starts (join), or at the latest on first use.
    c.create_account(&cross_shard_pair("bind").0, 1).await;
    c.create_account(&cross_shard_pair("bind").1, 1).await;
    // The protocol's only way in is the stream's upgrade.
    let p = format!("{}/internal/stream", c.participants[0].url());
    let upgrade = |r: reqwest::RequestBuilder| r.header("connection", "upgrade").header("upgrade", "ledger-stream/1");
    assert_eq!(upgrade(c.http.get(&p)).send().await.expect("reply").status(), 401);
    let r = upgrade(c.http.get(&p)).header("x-ledger-cluster-token", &token).header("x-ledger-cluster-id", other);
    assert_eq!(r.send().await.expect("reply").status(), 403, "the shard belongs to its coordinator");
}

#[tokio::test(flavor = "multi_thread")]
async fn transfers_past_the_in_flight_limit_get_503_with_retry_after() {
    let mut c = Cluster::start_with(Options {
        coordinator_args: vec!["--transfers-in-flight-max".into(), "1".into()],
        ..Options::default()
    })
    .await;
    let (alice, bob) = cross_shard_pair("limit");
    c.create_account(&alice, 100).await;
    c.create_account(&bob, 0).await;
    // Hang shard 1 so the first transfer holds the only slot until its prepare times out.
    let pid = c.node("p1").pid().expect("p1 runs");
    signal(pid, libc::SIGSTOP);
    let first = c.post("/transfers", json!({"from": alice, "to": bob, "amount": 1}));
    let second = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        c.http.post(c.api("/transfers")).json(&json!({"from": alice, "to": bob, "amount": 1})).send().await
    };
    let (first, second) = tokio::join!(first, second);
    signal(pid, libc::SIGCONT);
    let second = second.expect("reply");
    assert_eq!(second.status(), 503);
    assert_eq!(second.headers().get("retry-after").map(|v| v.as_bytes()), Some(&b"1"[..]));
    let body: Value = second.json().await.expect("JSON");
    assert_eq!(body["error"]["code"], "overloaded");
    assert_eq!(first.0, 503, "the hung shard made the first one abort: {}", first.1);
    assert_eq!(first.1["reason"], "participant_unavailable");
    c.settle(&[&alice, &bob], Duration::from_secs(20)).await;
    assert_eq!(c.balance(&alice).await, 100);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_client_times_out_without_holding_up_others() {
    let c = Cluster::start_with(Options {
        coordinator_args: vec!["--request-timeout-ms".into(), "2000".into()],
        ..Options::default()
    })
    .await;
    c.create_account("quick", 10).await;
    let addr = format!("127.0.0.1:{}", c.coordinator.port);
    let mut slow = TcpStream::connect(&addr).await.expect("connect");
    let head = "POST /transfers HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 64\r\n\r\n";
    slow.write_all(head.as_bytes()).await.expect("send head");
    let started = Instant::now();
    let drip = async {
        // One byte a second, far slower than the limit allows.
        for byte in b"{\"from\":\"quick\"".iter() {
            if slow.write_all(&[*byte]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            if started.elapsed() > Duration::from_secs(4) {
                break;
            }
        }
        let mut reply = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), slow.read(&mut reply)).await.ok().and_then(Result::ok);
        String::from_utf8_lossy(&reply[..n.unwrap_or(0)]).into_owned()
    };
    let others = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        for _ in 0..5 {
            let t = Instant::now();
            assert_eq!(c.get("/accounts/quick").await.0, 200);
            assert!(t.elapsed() < Duration::from_millis(1_000), "other clients are served promptly");
        }
    };
    let (reply, ()) = tokio::join!(drip, others);
    assert!(reply.starts_with("HTTP/1.1 408"), "the slow request was cut off: {reply:?}");
    assert!(reply.contains("request_timeout"));
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_past_the_limit_wait_for_a_free_slot() {
    let c = Cluster::start_with(Options {
        coordinator_args: vec!["--connections-max".into(), "2".into()],
        ..Options::default()
    })
    .await;
    // The harness's own client may hold pooled connections; use fresh ones only.
    let fresh = || reqwest::Client::builder().pool_max_idle_per_host(0).build().expect("client");
    let addr = format!("127.0.0.1:{}", c.coordinator.port);
    let idle_a = TcpStream::connect(&addr).await.expect("connect");
    let idle_b = TcpStream::connect(&addr).await.expect("connect");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let blocked = fresh().get(c.api("/health")).timeout(Duration::from_millis(700)).send().await;
    assert!(blocked.is_err(), "a third connection is not served while two are open");
    drop(idle_a);
    let served = fresh().get(c.api("/health")).timeout(Duration::from_secs(5)).send().await.expect("served");
    assert_eq!(served.status(), 200);
    drop(idle_b);
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill has no memory-safety preconditions; the pid is this test's child.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}
