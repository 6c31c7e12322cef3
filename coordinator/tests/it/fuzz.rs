//! An HTTP fuzz run against a live cluster: random and malformed methods, paths, headers and bodies at every
//! route of the coordinator and the participants, some through a proper client and some as raw bytes. Nothing
//! may answer 5xx except a deliberate 503, no process may die, and the only money that moves is what accepted
//! transfers moved. LEDGER_FUZZ_REQUESTS sets the count (default 3000), LEDGER_FUZZ_SEED the seed.

use crate::harness::{cross_shard_pair, Cluster};
use loadgen::drill::Rng;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const METHODS: &[&str] = &["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"];
const CONTENT_TYPES: &[&str] =
    &["application/json", "application/json; charset=utf-8", "text/plain", "application/x-www-form-urlencoded", ""];

fn pick<'a, T>(rng: &mut Rng, items: &'a [T]) -> &'a T {
    &items[rng.below(items.len() as u64) as usize]
}

fn junk(rng: &mut Rng, max: u64) -> String {
    const CHARS: &[u8] = b"abcXYZ019_-%./?&=#{}[]\\\"' :;,@!~*+\x7f";
    (0..rng.below(max + 1)).map(|_| *pick(rng, CHARS) as char).collect()
}

fn path(rng: &mut Rng, accounts: &[String]) -> String {
    let id = match rng.below(4) {
        0 => pick(rng, accounts).clone(),
        1 => uuid::Uuid::from_u128(u128::from(rng.next_u64())).to_string(),
        2 => junk(rng, 80),
        _ => "x".repeat(rng.below(300) as usize),
    };
    match rng.below(17) {
        0 => "/accounts".into(),
        12 => format!("/accounts?{}", junk(rng, 30)),
        13 => format!("/accounts/{id}/entries?{}", junk(rng, 30)),
        14 => "/audit".into(),
        15 => "/".into(),
        16 => format!("/internal/{}", pick(rng, &["account_list", "audit", "in_doubt", "commit_seqs"])),
        1 => format!("/accounts/{id}"),
        2 => "/transfers".into(),
        3 => format!("/transfers/{id}"),
        4 => format!("/transactions?status={}", if rng.below(2) == 0 { "in_doubt".into() } else { junk(rng, 10) }),
        5 => "/health".into(),
        6 => "/stats".into(),
        7 => "/internal/decisions".into(),
        8 => format!("/internal/{}", pick(rng, &["prepare", "decide", "accounts", "applied", "join"])),
        9 => format!("/{}", junk(rng, 40)),
        10 => format!("/accounts/{id}/{}", junk(rng, 10)),
        _ => format!("/transfers?{}", junk(rng, 30)),
    }
}

fn body(rng: &mut Rng, accounts: &[String]) -> Vec<u8> {
    let account = |rng: &mut Rng| -> Value {
        match rng.below(3) {
            0 => json!(pick(rng, accounts)),
            1 => json!(junk(rng, 70)),
            _ => json!(rng.next_u64()),
        }
    };
    let number = |rng: &mut Rng| -> Value {
        match rng.below(6) {
            0 => json!(rng.below(50) as i64 - 10),
            1 => json!(rng.next_u64()),
            2 => json!(rng.below(100) as f64 / 7.0),
            3 => json!(junk(rng, 5)),
            4 => Value::Null,
            _ => json!(1 + rng.below(20)),
        }
    };
    match rng.below(9) {
        0 => Vec::new(),
        1 => (0..rng.below(200)).map(|_| rng.below(256) as u8).collect(),
        2 => junk(rng, 200).into_bytes(),
        3 => format!("{}{}", "[".repeat(200), "]".repeat(200)).into_bytes(),
        4 => vec![b'a'; 20_000],
        5 => json!({"id": account(rng), "balance": number(rng)}).to_string().into_bytes(),
        6 => {
            let mut t = json!({"from": account(rng), "to": account(rng), "amount": number(rng)});
            if rng.below(2) == 0 {
                t["id"] = json!(uuid::Uuid::from_u128(u128::from(rng.below(50))).to_string());
            }
            t.to_string().into_bytes()
        }
        7 => json!({"items": [{"id": junk(rng, 36), "decision": "commit"}], "shard": number(rng)})
            .to_string()
            .into_bytes(),
        _ => {
            // A valid transfer with one byte changed.
            let mut bytes = json!({"from": pick(rng, accounts), "to": pick(rng, accounts), "amount": 1 + rng.below(5)})
                .to_string()
                .into_bytes();
            let at = rng.below(bytes.len() as u64) as usize;
            bytes[at] = rng.below(256) as u8;
            bytes
        }
    }
}

/// A raw request that a well-behaved client would never send.
fn raw_request(rng: &mut Rng, accounts: &[String]) -> Vec<u8> {
    let p = path(rng, accounts);
    let b = body(rng, accounts);
    let mut req = match rng.below(5) {
        0 => format!("{} {p} HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n", junk(rng, 10), b.len()).into_bytes(),
        1 => format!("POST {p} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n", b.len() + 50)
            .into_bytes(),
        2 => format!("POST /transfers HTTP/1.1\r\nhost: x\r\n{}: {}\r\n\r\n", junk(rng, 20), junk(rng, 20)).into_bytes(),
        3 => format!("GET {p} HTTP/9.9\r\n\r\n").into_bytes(),
        _ => format!("POST /transfers HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n{}\r\n", junk(rng, 8))
            .into_bytes(),
    };
    req.extend_from_slice(&b);
    req
}

async fn send_raw(port: u16, bytes: &[u8]) -> Option<u16> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    s.write_all(bytes).await.ok()?;
    let _ = s.shutdown().await;
    let mut buf = vec![0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf)).await.ok()?.ok()?;
    let line = String::from_utf8_lossy(&buf[..n]).into_owned();
    line.split_whitespace().nth(1).and_then(|code| code.parse().ok())
}

#[tokio::test(flavor = "multi_thread")]
async fn fuzzed_requests_never_crash_or_5xx_and_move_only_accepted_money() {
    let requests: u64 = std::env::var("LEDGER_FUZZ_REQUESTS").ok().and_then(|s| s.parse().ok()).unwrap_or(3_000);
    let seed: u64 = std::env::var("LEDGER_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(7);
    let mut c = Cluster::start().await;
    let (a, b) = cross_shard_pair("fz");
    c.create_account(&a, 1_000).await;
    c.create_account(&b, 1_000).await;
    let accounts = vec![a.clone(), b.clone()];
    let mut expected: HashMap<String, i64> = accounts.iter().map(|x| (x.clone(), 1_000)).collect();
    let mut committed_ids = std::collections::HashSet::new();
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().expect("client");
    let ports: Vec<u16> = std::iter::once(c.coordinator.port).chain(c.participants.iter().map(|p| p.port)).collect();
    let mut rng = Rng::new(seed);
    let mut by_status: HashMap<u16, u64> = HashMap::new();

    for n in 0..requests {
        // Mostly the coordinator; a quarter at the participants' ports.
        let port = if rng.below(4) == 0 { *pick(&mut rng, &ports[1..]) } else { ports[0] };
        let status = if rng.below(5) == 0 {
            let bytes = raw_request(&mut rng, &accounts);
            match send_raw(port, &bytes).await {
                Some(s) => s,
                None => continue, // the server may close a garbled connection without a word
            }
        } else {
            // POST half the time, so bodies reach the handlers rather than 405s.
            let method = if rng.below(2) == 0 { "POST" } else { *pick(&mut rng, METHODS) };
            let url = format!("http://127.0.0.1:{port}{}", path(&mut rng, &accounts));
            let mut req = client.request(method.parse().expect("method"), &url).body(body(&mut rng, &accounts));
            let mut ctype = *pick(&mut rng, CONTENT_TYPES);
            let (method, url) = if rng.below(8) == 0 {
                // A plausible transfer between the real accounts, so money really moves (or is refused).
                let amount =
                    if rng.below(4) == 0 { json!(junk(&mut rng, 4)) } else { json!(rng.below(700) as i64 - 50) };
                let t = json!({"from": pick(&mut rng, &accounts), "to": pick(&mut rng, &accounts), "amount": amount});
                ctype = "application/json";
                req = client.post(c.api("/transfers")).body(t.to_string());
                ("POST", c.api("/transfers"))
            } else {
                (method, url)
            };
            if !ctype.is_empty() {
                req = req.header("content-type", ctype);
            }
            if rng.below(4) == 0 {
                req = req.header("authorization", format!("Bearer {}", junk(&mut rng, 30)));
            }
            if rng.below(6) == 0 {
                req = req.header("x-ledger-cluster-token", junk(&mut rng, 20).replace(['\x7f'], ""));
            }
            let Ok(reply) = req.send().await else { continue };
            let status = reply.status().as_u16();
            let text = reply.text().await.unwrap_or_default();
            // By path: a query or fragment after /transfers still reaches the transfer handler.
            let to_transfers = reqwest::Url::parse(&url).is_ok_and(|u| u.path() == "/transfers");
            if status == 200 && method == "POST" && to_transfers {
                let v: Value = serde_json::from_str(&text).expect("a committed transfer answers JSON");
                if v["status"] == "committed" && committed_ids.insert(v["id"].to_string()) {
                    let amount = v["amount"].as_i64().expect("amount");
                    *expected.get_mut(v["from"].as_str().expect("from")).expect("fuzz account") -= amount;
                    *expected.get_mut(v["to"].as_str().expect("to")).expect("fuzz account") += amount;
                }
            }
            if status >= 400 && method != "HEAD" {
                let v: Result<Value, _> = serde_json::from_str(&text);
                assert!(v.is_ok(), "request {n}: {method} {url} -> {status} with a non-JSON body: {text:?}");
            }
            status
        };
        *by_status.entry(status).or_default() += 1;
        assert!(status < 500 || status == 503, "request {n} (seed {seed}) got {status}");
    }
    eprintln!("fuzz: {requests} requests, seed {seed}, {} committed, statuses {by_status:?}", committed_ids.len());

    for name in ["coordinator", "p0", "p1"] {
        assert!(c.node(name).is_running(), "{name} survived the fuzz run");
    }
    c.settle(&[&a, &b], Duration::from_secs(20)).await;
    for x in &accounts {
        assert_eq!(c.balance(x).await, expected[x], "only accepted transfers moved {x}'s money");
    }
    assert!(by_status.values().sum::<u64>() > requests / 2, "most requests got an answer");
}
