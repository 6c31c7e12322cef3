//! The in-doubt resolver's shell: carries out what [`ResolverCore`] asks (which prepared transfers to ask the
//! coordinator about, when, and how long to back off). It sends the queries, applies the answers durably and
//! reports back. Holds stay in place until an answer arrives: a participant never decides alone.

use crate::apply::{metric, persist, sync};
use crate::{storage, Node};
use common::http::now_unix_ms;
use common::wire::{self, DecisionAnswers, DecisionQuery, DecisionQueryItem, QueryAnswer};
use protocol::msg::{DecideAck, Decision};
use protocol::resolver::Query;
use std::sync::Arc;
use std::time::Duration;

pub async fn run(node: Arc<Node>) {
    loop {
        let (queries, due) = {
            let now = now_unix_ms();
            let mut core = node.core();
            core.handle_resolver_timeout(now);
            let resolver = core.resolver_mut();
            (std::iter::from_fn(|| resolver.poll_query()).collect::<Vec<_>>(), resolver.poll_timeout())
        };
        for query in queries {
            ask(&node, query).await;
        }
        // While a round is under way `due` is none; every query above has been reported, so it is set again.
        let wait_ms =
            due.or_else(|| node.core().resolver().poll_timeout()).map_or(0, |at| at.saturating_sub(now_unix_ms()));
        tokio::time::sleep(Duration::from_millis(wait_ms.max(1))).await;
    }
}

/// One query round trip, reported to the core.
async fn ask(node: &Node, query: Query) {
    let answers = match self::query(node, &query.coordinator_url, query.items).await {
        Ok(answers) => answers,
        Err(error) => {
            let mut core = node.core();
            let resolver = core.resolver_mut();
            let retry_in_ms = resolver.retry_in_ms();
            tracing::warn!(coordinator = %query.coordinator_url, %error, retry_in_ms, "cannot reach the coordinator for decisions");
            resolver.handle_unreachable(now_unix_ms(), query.id, &error);
            return;
        }
    };
    let (decided, barrier) = {
        let mut core = node.core();
        let decided = core.handle_answers(now_unix_ms(), query.id, &answers, &storage::Decisions(&node.store));
        (decided, persist(node, &mut core))
    };
    let decided = match decided {
        Ok(decided) => decided,
        Err(error) => {
            tracing::warn!(coordinator = %query.coordinator_url, %error, "unusable answer to a decision query");
            return;
        }
    };
    for (id, decision, ack) in &decided {
        let span = tracing::info_span!("transfer", transfer_id = %id);
        if *ack == DecideAck::Refused {
            span.in_scope(|| tracing::error!(?decision, "the coordinator's decision contradicts this shard's state"));
        } else {
            span.in_scope(|| tracing::info!(?decision, "in-doubt transfer resolved by the coordinator"));
            let label = if *decision == Decision::Commit { "commit" } else { "abort" };
            metrics::counter!(metric::DECISIONS, "decision" => label).increment(1);
        }
    }
    metrics::counter!(metric::RECOVERY_RESOLVED).increment(decided.len() as u64);
    if let Err(error) = sync(node, barrier).await {
        tracing::warn!(%error, "cannot apply the coordinator's decisions; asking again after the backoff");
        node.core().handle_answers_failed(now_unix_ms(), query.id);
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
