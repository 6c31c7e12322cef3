//! Carries out what the participant's core asks of the store: its writes, applied as one group, and the syncs
//! its barriers wait for. Below the routes, the stream and the resolver, which all change money through here.

use crate::{storage, Node};
use common::store::StoreError;
use protocol::participant_core::ParticipantCore;

/// Metric names of a participant.
pub mod metric {
    pub const VOTES: &str = "ledger_participant_votes_total";
    pub const DECISIONS: &str = "ledger_participant_decisions_total";
    pub const PREPARED: &str = "ledger_participant_prepared_transfers";
    pub const RECOVERY_RESOLVED: &str = "ledger_recovery_in_doubt_resolved_total";

    pub fn describe() {
        metrics::describe_counter!(VOTES, "Prepare votes cast, by vote");
        metrics::describe_counter!(DECISIONS, "Decisions applied, by decision");
        metrics::describe_gauge!(PREPARED, "Prepared transfers awaiting a decision (holding funds)");
        metrics::describe_counter!(RECOVERY_RESOLVED, "In-doubt transfers resolved by asking the coordinator");
    }
}

/// Applies the core's writes to the store, under the state lock, and returns the barrier something waits for,
/// if any: the caller then syncs and reports it ([`sync`]). A failed in-memory write leaves memory ahead of the
/// store, which only a restart from disk can repair.
pub(crate) fn persist(node: &Node, core: &mut ParticipantCore) -> Option<u64> {
    let batch = core.poll_writes()?;
    if let Err(error) = storage::apply(&node.store, &batch.writes) {
        tracing::error!(%error, "store write failed: stopping to recover from disk");
        std::process::abort();
    }
    // The store now answers for the decisions just written: the machine may forget the oldest it holds.
    core.writes_applied();
    batch.sync
}

/// Makes every write so far durable, then tells the core `barrier` is synced.
pub(crate) async fn sync(node: &Node, barrier: Option<u64>) -> Result<(), StoreError> {
    node.store.sync().await?;
    if let Some(barrier) = barrier {
        node.core().handle_synced(common::http::now_unix_ms(), barrier);
    }
    Ok(())
}
