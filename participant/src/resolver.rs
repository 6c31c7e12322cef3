//! The in-doubt resolver's shell: carries out what [`ResolverCore`] asks (which prepared transfers to ask the
//! coordinator about, when, and how long to back off). It sends the queries, applies the answers durably and
//! reports back. Holds stay in place until an answer arrives: a participant never decides alone.

use crate::{server, Node};
use common::http::now_unix_ms;
use common::wire::{self, DecisionAnswers, DecisionQuery, DecisionQueryItem, QueryAnswer};
use protocol::resolver::Query;
use std::sync::Arc;
use std::time::Duration;

pub use protocol::resolver::{ResolverConfig, ResolverCore};

pub async fn run(node: Arc<Node>) {
    loop {
        let (queries, due) = {
            let now = now_unix_ms();
            let mut guard = node.machine();
            let state = &mut *guard;
            state.resolver.handle_timeout(now, state.machine.prepared());
            (std::iter::from_fn(|| state.resolver.poll_query()).collect::<Vec<_>>(), state.resolver.poll_timeout())
        };
        for query in queries {
            ask(&node, query).await;
        }
        // While a round is under way `due` is none; every query above has been reported, so it is set again.
        let wait_ms =
            due.or_else(|| node.machine().resolver.poll_timeout()).map_or(0, |at| at.saturating_sub(now_unix_ms()));
        tokio::time::sleep(Duration::from_millis(wait_ms.max(1))).await;
    }
}

/// One query round trip, reported to the core.
async fn ask(node: &Node, query: Query) {
    let answers = match self::query(node, &query.coordinator_url, query.items).await {
        Ok(answers) => answers,
        Err(error) => {
            let mut state = node.machine();
            let retry_in_ms = state.resolver.retry_in_ms();
            tracing::warn!(coordinator = %query.coordinator_url, %error, retry_in_ms, "cannot reach the coordinator for decisions");
            state.resolver.handle_unreachable(now_unix_ms(), query.id, &error);
            return;
        }
    };
    let decided = node.machine().resolver.handle_answers(now_unix_ms(), query.id, &answers);
    let decided = match decided {
        Ok(decided) => decided,
        Err(error) => {
            tracing::warn!(coordinator = %query.coordinator_url, %error, "unusable answer to a decision query");
            return;
        }
    };
    for (id, decision) in &decided {
        tracing::info_span!("transfer", transfer_id = %id)
            .in_scope(|| tracing::info!(?decision, "in-doubt transfer resolved by the coordinator"));
    }
    metrics::counter!(server::metric::RECOVERY_RESOLVED).increment(decided.len() as u64);
    let applied = server::apply_decisions(node, decided.into_iter(), None).await;
    let mut state = node.machine();
    match applied {
        Ok(_) => state.resolver.handle_applied(now_unix_ms(), query.id),
        Err(error) => {
            tracing::warn!(%error, "cannot apply the coordinator's decisions; asking again after the backoff");
            state.resolver.handle_apply_failed(now_unix_ms(), query.id);
        }
    }
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
