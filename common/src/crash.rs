//! Named crash points. A test arms one or more with `LEDGER_CRASH_AT=<name>[,<name>...]`; when the process
//! reaches an armed point it SIGKILLs itself, leaving on disk exactly what a power cut would have left at that
//! step (nothing in memory is flushed on the way out). Unarmed, a point costs one load of a cached flag.

use std::sync::OnceLock;

pub const ENV: &str = "LEDGER_CRASH_AT";

pub const PARTICIPANT_PREPARE_RECEIVED: &str = "participant.prepare.received";
pub const PARTICIPANT_PREPARE_FLUSHED: &str = "participant.prepare.flushed";
pub const PARTICIPANT_DECIDE_RECEIVED: &str = "participant.decide.received";
pub const PARTICIPANT_DECIDE_APPLIED: &str = "participant.decide.applied";
pub const PARTICIPANT_ACCOUNT_CREATED: &str = "participant.account.created";
pub const COORDINATOR_TRANSFER_RECEIVED: &str = "coordinator.transfer.received";
pub const COORDINATOR_PREPARE_SENT: &str = "coordinator.prepare.sent";
/// Every vote is in and the decision is about to go to the log (for a commit, the staging record is durable).
pub const COORDINATOR_VOTES_RECEIVED: &str = "coordinator.votes.received";
/// A sync that made staging records or decisions durable has completed.
pub const COORDINATOR_DECISION_LOGGED: &str = "coordinator.decision.logged";
pub const COORDINATOR_COMMIT_SENT: &str = "coordinator.commit.sent";
pub const COORDINATOR_BEFORE_END: &str = "coordinator.before_end";
/// A frame to a participant has been written to the stream, before anything else happens.
pub const COORDINATOR_FRAME_SENT: &str = "coordinator.frame.sent";
/// A frame from the coordinator has been read and decoded, before any of it is applied.
pub const PARTICIPANT_FRAME_RECEIVED: &str = "participant.frame.received";

/// Every crash point, so tests and `--help` can list them.
pub const ALL: &[&str] = &[
    PARTICIPANT_PREPARE_RECEIVED,
    PARTICIPANT_PREPARE_FLUSHED,
    PARTICIPANT_DECIDE_RECEIVED,
    PARTICIPANT_DECIDE_APPLIED,
    PARTICIPANT_ACCOUNT_CREATED,
    COORDINATOR_TRANSFER_RECEIVED,
    COORDINATOR_PREPARE_SENT,
    COORDINATOR_VOTES_RECEIVED,
    COORDINATOR_DECISION_LOGGED,
    COORDINATOR_COMMIT_SENT,
    COORDINATOR_BEFORE_END,
    COORDINATOR_FRAME_SENT,
    PARTICIPANT_FRAME_RECEIVED,
];

fn armed() -> &'static [String] {
    static ARMED: OnceLock<Vec<String>> = OnceLock::new();
    ARMED.get_or_init(|| {
        std::env::var(ENV)
            .map(|v| v.split(',').map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect())
            .unwrap_or_default()
    })
}

/// Dies here, as if by `kill -9`, if `name` is armed.
pub fn point(name: &'static str) {
    debug_assert!(ALL.contains(&name), "unknown crash point {name}");
    if armed().iter().any(|a| a == name) {
        tracing::warn!(crash_point = name, "crash point reached: killing this process with SIGKILL");
        // SAFETY: getpid and kill have no memory-safety preconditions.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}
