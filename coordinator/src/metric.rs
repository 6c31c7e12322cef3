//! Metric names of the coordinator, described once so that `/metrics` carries help text.

pub const TRANSFERS: &str = "ledger_transfers_total";
pub const TRANSFER_SECONDS: &str = "ledger_transfer_seconds";
pub const PREPARE_SECONDS: &str = "ledger_prepare_round_trip_seconds";
pub const COMMIT_SECONDS: &str = "ledger_commit_round_trip_seconds";
pub const ABORT_SECONDS: &str = "ledger_abort_round_trip_seconds";
pub const UNACKNOWLEDGED: &str = "ledger_transfers_unacknowledged";
pub const UNACKNOWLEDGED_OLDEST_SECONDS: &str = "ledger_unacknowledged_oldest_age_seconds";
/// The same two gauges under the names of earlier versions, which said "in doubt" for what a participant
/// means by it (prepared, the decision unknown): kept for existing dashboards.
pub const UNACKNOWLEDGED_OLD_NAME: &str = "ledger_transfers_in_doubt";
pub const UNACKNOWLEDGED_OLDEST_SECONDS_OLD_NAME: &str = "ledger_in_doubt_oldest_age_seconds";
pub const PARTICIPANT_UP: &str = "ledger_participant_up";
pub const RECOVERY_COMMITS_RESENT: &str = "ledger_recovery_commits_resent_total";
pub const DECISION_QUERIES: &str = "ledger_decision_queries_total";
pub const AUDIT_VIOLATIONS: &str = "ledger_audit_violations_total";

/// Describes every metric once, so `/metrics` carries help text.
pub fn describe() {
    metrics::describe_counter!(TRANSFERS, "Transfers decided, by outcome and abort reason");
    metrics::describe_histogram!(TRANSFER_SECONDS, "End-to-end time of POST /transfers");
    metrics::describe_histogram!(PREPARE_SECONDS, "Round trip of a stream frame carrying Prepares, per shard");
    metrics::describe_histogram!(COMMIT_SECONDS, "Round trip of a stream frame carrying Commits, per shard");
    metrics::describe_histogram!(ABORT_SECONDS, "Round trip of a stream frame carrying Aborts, per shard");
    metrics::describe_gauge!(UNACKNOWLEDGED, "Decided transfers some shard has not acknowledged");
    metrics::describe_gauge!(UNACKNOWLEDGED_OLDEST_SECONDS, "Age of the oldest unacknowledged decision");
    metrics::describe_gauge!(UNACKNOWLEDGED_OLD_NAME, "ledger_transfers_unacknowledged, by its earlier name");
    metrics::describe_gauge!(
        UNACKNOWLEDGED_OLDEST_SECONDS_OLD_NAME,
        "ledger_unacknowledged_oldest_age_seconds, by its earlier name"
    );
    metrics::describe_gauge!(PARTICIPANT_UP, "1 if the shard answered its last health probe");
    metrics::describe_counter!(RECOVERY_COMMITS_RESENT, "Committed transfers re-sent after a restart");
    metrics::describe_counter!(DECISION_QUERIES, "Decision queries from participants, by answer");
    metrics::describe_counter!(AUDIT_VIOLATIONS, "Audit violations found");
}
