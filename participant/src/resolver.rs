//! The in-doubt resolver: asks the coordinator what became of prepared transfers that have waited too long for
//! a decision (all of them right after a restart), applies the answers, and backs off while the coordinator is
//! unreachable. Holds stay in place until an answer arrives: a participant never decides alone.

use crate::{server, Node};
use common::http::now_unix_ms;
use common::wire::{self, Decision, DecisionAnswers, DecisionQuery, DecisionQueryItem, QueryAnswer};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// How often to look for transfers in doubt when all is well.
const SCAN_INTERVAL: Duration = Duration::from_millis(500);
/// Backoff bounds while the coordinator does not answer.
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Transfers per query: bounds one request's size.
const QUERY_ITEMS_MAX: usize = 1_000;

pub async fn run(node: Arc<Node>) {
    let mut backoff = BACKOFF_MIN;
    // Right after start every prepared transfer is in doubt: its decision may have come and gone while down.
    let mut age_min = Duration::ZERO;
    loop {
        let in_doubt = node.machine().in_doubt(now_unix_ms(), age_min.as_millis() as u64);
        let mut by_coordinator: BTreeMap<String, Vec<DecisionQueryItem>> = BTreeMap::new();
        for (id, prepared) in in_doubt {
            let items = by_coordinator.entry(prepared.coordinator_url).or_default();
            if items.len() < QUERY_ITEMS_MAX {
                items.push(DecisionQueryItem { id, transfer: prepared.transfer });
            }
        }
        let mut all_answered = true;
        for (url, items) in by_coordinator {
            match ask(&node, &url, items).await {
                Ok(resolved) if resolved > 0 => {
                    tracing::info!(resolved, "resolved transfers in doubt")
                }
                Ok(_) => {}
                Err(error) => {
                    all_answered = false;
                    tracing::warn!(coordinator = %url, %error, retry_in_ms = backoff.as_millis() as u64, "cannot reach the coordinator for decisions");
                }
            }
        }
        if all_answered {
            backoff = BACKOFF_MIN;
            age_min = node.config.in_doubt_after;
            tokio::time::sleep(SCAN_INTERVAL).await;
        } else {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }
}

/// One query round trip; returns how many transfers it resolved.
async fn ask(node: &Node, url: &str, items: Vec<DecisionQueryItem>) -> Result<usize, String> {
    let ids: Vec<uuid::Uuid> = items.iter().map(|i| i.id).collect();
    let answers = match query(node, url, items).await {
        Ok(answers) => answers,
        Err(error) => {
            let now = now_unix_ms();
            let mut state = node.machine();
            for id in &ids {
                state.last_heard.insert(*id, (format!("unreachable: {error}"), now));
            }
            return Err(error);
        }
    };
    let decided: Vec<(uuid::Uuid, Decision)> = {
        let now = now_unix_ms();
        let mut state = node.machine();
        ids.into_iter()
            .zip(answers)
            .filter_map(|(id, answer)| match answer {
                QueryAnswer::Commit => Some((id, Decision::Commit)),
                QueryAnswer::Abort => Some((id, Decision::Abort)),
                QueryAnswer::Pending => {
                    state.last_heard.insert(id, ("pending".into(), now));
                    None
                }
            })
            .collect()
    };
    for (id, decision) in &decided {
        tracing::info_span!("transfer", transfer_id = %id)
            .in_scope(|| tracing::info!(?decision, "in-doubt transfer resolved by the coordinator"));
    }
    metrics::counter!(server::metric::RECOVERY_RESOLVED).increment(decided.len() as u64);
    let count = decided.len();
    {
        let mut state = node.machine();
        for (id, _) in &decided {
            state.last_heard.remove(id);
        }
    }
    server::apply_decisions(node, decided.into_iter(), None).await.map_err(|e| e.to_string())?;
    Ok(count)
}

/// Asks the coordinator at `url` about `items`; one answer per item, in order.
pub async fn query(node: &Node, url: &str, items: Vec<DecisionQueryItem>) -> Result<Vec<QueryAnswer>, String> {
    let count = items.len();
    let query = DecisionQuery { shard: node.shard, items };
    let mut request = node.http.post(format!("{url}{}", wire::PATH_DECISIONS)).json(&query);
    if let Some(token) = &node.config.cluster_token {
        request = request.header(wire::HEADER_CLUSTER_TOKEN, token.as_str());
    }
    if let Some(id) = *node.cluster_id.lock().await {
        request = request.header(wire::HEADER_CLUSTER_ID, id.to_string());
    }
    let reply = request.send().await.map_err(|e| e.to_string())?;
    if !reply.status().is_success() {
        return Err(format!("coordinator answered {}", reply.status()));
    }
    let answers: DecisionAnswers = reply.json().await.map_err(|e| e.to_string())?;
    if answers.answers.len() != count {
        return Err(format!("{} answers for {count} questions", answers.answers.len()));
    }
    Ok(answers.answers)
}
