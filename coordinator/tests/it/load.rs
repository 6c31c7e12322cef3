//! Concurrency: many transfers against one hot account never overdraw it, and money is conserved.

use crate::harness::Cluster;
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_transfers_never_overdraw_a_hot_account() {
    let c = Cluster::start().await;
    c.create_account("hot", 1_000).await;
    let sinks: Vec<String> = (0..8).map(|i| format!("sink{i}")).collect();
    for s in &sinks {
        c.create_account(s, 0).await;
    }
    // 200 transfers of 7 = 1400 asked for, only 1000 there: exactly 142 can commit.
    let requests = (0..200).map(|i| {
        let body = json!({"from": "hot", "to": sinks[i % sinks.len()], "amount": 7});
        c.post("/transfers", body)
    });
    let replies = futures::future::join_all(requests).await;
    let committed = replies.iter().filter(|(s, _)| *s == 200).count();
    let refused = replies.iter().filter(|(s, b)| *s == 422 && b["reason"] == "insufficient_funds").count();
    assert_eq!(committed + refused, 200, "every transfer is committed or refused for funds: {replies:?}");
    assert_eq!(committed, 142);
    let hot = c.account("hot").await;
    assert_eq!(hot["balance"], json!(1_000 - 7 * 142));
    assert_eq!(hot["held"], json!(0));
    let mut total = hot["balance"].as_i64().expect("balance");
    for s in &sinks {
        total += c.balance(s).await;
    }
    assert_eq!(total, 1_000);
}
