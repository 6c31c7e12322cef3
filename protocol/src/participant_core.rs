//! The participant's side of a frame: how a batch of coordinator work is applied to the shard's machine, in
//! order, as one set of writes. The participant's stream shell and the simulator both call this, so the rule
//! they follow is one rule: every item of a frame is applied before any reply leaves, and the replies leave
//! only once the frame's writes are durable (the caller's job: it holds the replies until its sync is done).

use crate::ledger::TransferId;
use crate::msg::{DecideAck, Decision};
use crate::msg::{FromShard, ToShard};
use crate::participant::{FinishedLog, ParticipantMachine, Write};
use crate::state::PreparedRecord;

/// What one frame did, beyond its writes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FrameApplied {
    /// One reply per item, in order.
    pub replies: Vec<FromShard>,
    /// Prepared transfers this frame decided here, with the record the decision settled (for the shell's
    /// journal: its postings and who submitted it).
    pub settled: Vec<(TransferId, Decision, PreparedRecord)>,
    /// Whether the frame held work that writes (or may repeat an answer for a write not yet durable), so its
    /// replies must wait for a sync.
    pub needs_sync: bool,
}

/// Checks a frame before anything of it is applied: a prepare with no postings is a coordinator bug, and the
/// whole frame is refused.
pub fn frame_is_well_formed(items: &[ToShard]) -> bool {
    items.iter().all(|i| !matches!(i, ToShard::Prepare { item, .. } if item.postings.is_empty()))
}

/// Applies `items` in order to `machine`, appending their writes to `writes`. `log` is the store as the
/// shell has applied it; the shell calls [`ParticipantMachine::writes_applied`] once `writes` are in it.
pub fn apply_frame(
    machine: &mut ParticipantMachine,
    items: Vec<ToShard>,
    now_unix_ms: u64,
    log: &dyn FinishedLog,
    writes: &mut Vec<Write>,
) -> FrameApplied {
    assert!(frame_is_well_formed(&items), "frames are checked before they are applied");
    let mut out = FrameApplied { replies: Vec::with_capacity(items.len()), ..FrameApplied::default() };
    for item in items {
        match item {
            ToShard::Prepare { item, made_by } => {
                out.needs_sync = true;
                let vote = machine.prepare_by(&item, made_by, now_unix_ms, log, writes);
                out.replies.push(FromShard::Vote { id: item.id, vote });
            }
            ToShard::Decide { id, decision } => {
                out.needs_sync = true;
                let (ack, settled) = machine.settle(id, decision, log, writes);
                if let (DecideAck::Done, Some(record)) = (ack, settled) {
                    out.settled.push((id, decision, record));
                }
                out.replies.push(FromShard::Ack { id, decision, ack });
            }
            ToShard::Capture { id, amount } => {
                out.needs_sync = true;
                let (ack, settled) = machine.capture(id, amount, log, writes);
                if let (DecideAck::Done, Some(record)) = (ack, settled) {
                    out.settled.push((id, Decision::Commit, record));
                }
                out.replies.push(FromShard::Ack { id, decision: Decision::Commit, ack });
            }
            ToShard::Read { read, account } => {
                out.replies.push(FromShard::Account { read, account: machine.account(&account) });
            }
        }
    }
    out
}
