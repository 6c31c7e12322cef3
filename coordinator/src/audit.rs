//! The audit: proves the books balance, while transfers keep running.
//!
//! Shards are snapshotted one after the other, so a transfer can be applied on one shard's snapshot and not yet
//! on the other's. The audit finds every such transfer exactly: each snapshot carries the shard's journal
//! sequence number, and the candidates are (a) transfers owed acks before and after the snapshots and (b)
//! transfers each shard committed between a first sequence reading and its snapshot. For each candidate it asks
//! every shard at which sequence number it applied it; a transfer applied on some of its shards but not all,
//! as of their snapshots, accounts for the difference in the totals.
//!
//! Verdict: sum of balances == money created + the in-flight difference; no balance below its overdraft limit; every hold
//! explained by a prepared transfer; no heuristic decision contradicting the coordinator's.

use crate::engine::Engine;
use crate::metric;
use crate::participants::ShardCallError;
use common::ledger::{ShardId, Transfer, TransferId};
use common::records::Outcome;
use common::wire::ShardAudit;
use protocol::coordinator::decision_of;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("shard {0} is unavailable: {1}")]
    ShardUnavailable(ShardId, String),
    #[error("log unreadable: {0}")]
    Wal(#[from] crate::wal::WalError),
    #[error("shard {0} restarted during every attempt at an audit")]
    SnapshotTooOld(ShardId),
}

/// Audits taken again when a shard restarts between its two snapshots (it then answers 409 snapshot_too_old:
/// its list of recent commits starts after the restart).
const AUDIT_ATTEMPTS_MAX: u32 = 3;

impl AuditError {
    fn of(shard: ShardId, error: ShardCallError) -> Self {
        match error {
            ShardCallError::Unavailable(why) => AuditError::ShardUnavailable(shard, why),
            ShardCallError::SnapshotTooOld => AuditError::SnapshotTooOld(shard),
        }
    }
}

async fn snapshot(engine: &Engine, shard: ShardId, after_seq: Option<u64>) -> Result<ShardAudit, AuditError> {
    engine.participants[shard as usize].audit_snapshot(after_seq).await.map_err(|e| AuditError::of(shard, e))
}

async fn commit_seqs(engine: &Engine, shard: ShardId, ids: Vec<TransferId>) -> Result<Vec<Option<u64>>, AuditError> {
    engine.participants[shard as usize].commit_seqs(ids).await.map_err(|e| AuditError::of(shard, e))
}

pub async fn run(engine: &Engine) -> Result<Value, AuditError> {
    let mut attempt = 1;
    loop {
        match run_once(engine).await {
            Err(AuditError::SnapshotTooOld(_)) if attempt < AUDIT_ATTEMPTS_MAX => attempt += 1,
            result => return result,
        }
    }
}

async fn run_once(engine: &Engine) -> Result<Value, AuditError> {
    let shard_count = engine.config.shard_count;
    let shards: Vec<ShardId> = (0..shard_count).collect();
    let mut first_seq = Vec::new();
    for &s in &shards {
        first_seq.push(snapshot(engine, s, Some(u64::MAX)).await?.seq);
    }
    let owed_before: Vec<TransferId> = engine.unacknowledged().await.into_iter().map(|d| d.id).collect();
    let mut snapshots = Vec::new();
    for &s in &shards {
        snapshots.push(snapshot(engine, s, Some(first_seq[s as usize])).await?);
    }
    let owed_after: Vec<TransferId> = engine.unacknowledged().await.into_iter().map(|d| d.id).collect();

    let mut candidates: BTreeSet<TransferId> = owed_before.into_iter().chain(owed_after).collect();
    for snap in &snapshots {
        candidates.extend(snap.commits_since.iter().copied());
    }
    // Each candidate's transfer and the shards it touches.
    let mut transfers = BTreeMap::new();
    for id in &candidates {
        if let Some(record) = engine.wal.get(id)? {
            if record.outcome == Outcome::Committed {
                transfers.insert(*id, record.transfer);
            }
        }
    }
    let mut applied: BTreeMap<(TransferId, ShardId), bool> = BTreeMap::new();
    for &s in &shards {
        let ids: Vec<TransferId> =
            transfers.iter().filter(|(_, t)| t.shards(shard_count).contains(&s)).map(|(id, _)| *id).collect();
        let seqs = commit_seqs(engine, s, ids.clone()).await?;
        let upto = snapshots[s as usize].seq;
        for (id, seq) in ids.into_iter().zip(seqs) {
            applied.insert((id, s), seq.is_some_and(|q| q <= upto));
        }
    }

    let outcomes: BTreeMap<TransferId, Outcome> = {
        let mut m = BTreeMap::new();
        for snap in &snapshots {
            for h in &snap.heuristics {
                if let Some(record) = engine.wal.get(&h.id)? {
                    m.insert(h.id, record.outcome);
                }
            }
        }
        m
    };
    let verdict = judge(shard_count, &snapshots, &transfers, &applied, &outcomes);
    if !verdict.violations.is_empty() {
        metrics::counter!(metric::AUDIT_VIOLATIONS).increment(verdict.violations.len() as u64);
        tracing::error!(violations = ?verdict.violations, "audit found violations");
    }
    let Verdict { violations, in_flight, in_flight_total, balance_total, created_total } = verdict;
    let shard_reports: Vec<Value> = snapshots
        .iter()
        .map(|s| {
            json!({
                "shard": s.shard, "seq": s.seq, "accounts": s.accounts,
                "balance_total": num(s.balance_total), "held_total": num(s.held_total),
                "incoming_total": num(s.incoming_total), "created_total": num(s.created_total),
                "prepared": s.prepared.len(), "heuristics": s.heuristics,
            })
        })
        .collect();
    Ok(json!({
        "ok": violations.is_empty(),
        "balance_total": num(balance_total),
        "created_total": num(created_total),
        "in_flight_total": num(in_flight_total),
        "in_flight": in_flight,
        "shards": shard_reports,
        "violations": violations,
    }))
}

/// What the audit concludes from the snapshots.
#[derive(Debug)]
pub struct Verdict {
    pub violations: Vec<String>,
    pub in_flight: Vec<Value>,
    pub in_flight_total: i128,
    pub balance_total: i128,
    pub created_total: i128,
}

/// The audit's reasoning, free of I/O: `applied[(id, shard)]` says whether the committed transfer `id` was
/// applied on `shard` as of that shard's snapshot; `outcomes` holds the coordinator's decision for each
/// transfer a shard decided heuristically.
pub fn judge(
    shard_count: u32,
    snapshots: &[ShardAudit],
    transfers: &BTreeMap<TransferId, Transfer>,
    applied: &BTreeMap<(TransferId, ShardId), bool>,
    outcomes: &BTreeMap<TransferId, Outcome>,
) -> Verdict {
    let mut violations: Vec<String> = Vec::new();
    let mut in_flight = Vec::new();
    let mut in_flight_total: i128 = 0;
    for (id, t) in transfers {
        let touched = t.shards(shard_count);
        let done: Vec<ShardId> = touched.iter().copied().filter(|s| applied.get(&(*id, *s)) == Some(&true)).collect();
        if done.is_empty() || done.len() == touched.len() {
            continue;
        }
        let delta: i128 = done.iter().flat_map(|s| t.postings_for(*s, shard_count)).map(|p| i128::from(p.delta)).sum();
        in_flight_total += delta;
        let pending: Vec<ShardId> = touched.iter().copied().filter(|s| !done.contains(s)).collect();
        let fields = json!({"id": id, "applied_on": done, "pending_on": pending});
        in_flight.push(common::wire::transfer_json(t, fields));
    }

    let balance_total: i128 = snapshots.iter().map(|s| s.balance_total).sum();
    let created_total: i128 = snapshots.iter().map(|s| s.created_total).sum();
    if balance_total != created_total + in_flight_total {
        violations.push(format!(
            "money not conserved: balances add up to {balance_total}, but {created_total} was created and \
             transfers in flight account for {in_flight_total}"
        ));
    }
    for snap in snapshots {
        for account in &snap.below_overdraft_limit {
            violations.push(format!("shard {}: account {account} has a balance below its overdraft limit", snap.shard));
        }
        if let Some(v) = &snap.invariant_violation {
            violations.push(format!("shard {}: {v}", snap.shard));
        }
        for h in &snap.heuristics {
            if let Some(outcome) = outcomes.get(&h.id) {
                if decision_of(*outcome) != h.decision {
                    violations.push(format!(
                        "shard {}: heuristic {:?} of transfer {} by {} contradicts the coordinator's {:?}",
                        snap.shard, h.decision, h.id, h.operator, outcome
                    ));
                }
            }
        }
    }
    Verdict { violations, in_flight, in_flight_total, balance_total, created_total }
}

/// A JSON number when it fits (the usual case), else a decimal string.
fn num(v: i128) -> Value {
    i64::try_from(v).map_or_else(|_| json!(v.to_string()), |n| json!(n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::ledger::{shard_of, AccountId, Amount};
    use common::records::AbortReason;
    use common::wire::{Decision, HeuristicView};

    fn snap(shard: ShardId, balance_total: i128, created_total: i128) -> ShardAudit {
        ShardAudit {
            shard,
            seq: 10,
            accounts: 1,
            balance_total,
            held_total: 0,
            incoming_total: 0,
            created_total,
            below_overdraft_limit: Vec::new(),
            invariant_violation: None,
            prepared: Vec::new(),
            commits_since: Vec::new(),
            heuristics: Vec::new(),
        }
    }

    fn cross_shard_transfer(amount: i64) -> Transfer {
        let id = |s: &str| AccountId::new(s).expect("valid");
        let (from, to) = (id("alice"), id("bob"));
        assert_ne!(shard_of(&from, 2), shard_of(&to, 2));
        Transfer::one(from, to, Amount::new(amount).expect("positive"))
    }

    #[test]
    fn a_commit_applied_on_one_shard_only_is_in_flight_not_a_violation() {
        let t = cross_shard_transfer(120);
        let id = uuid::Uuid::new_v4();
        let leg = t.single().expect("one leg");
        let (debit_shard, credit_shard) = (shard_of(&leg.from, 2), shard_of(&leg.to, 2));
        // The debit shard applied it (its balances show -120); the credit shard not yet.
        let mut snapshots = vec![snap(0, 0, 0), snap(1, 0, 0)];
        snapshots[debit_shard as usize] = snap(debit_shard, 380, 500);
        snapshots[credit_shard as usize] = snap(credit_shard, 0, 0);
        let transfers = BTreeMap::from([(id, t)]);
        let applied = BTreeMap::from([((id, debit_shard), true), ((id, credit_shard), false)]);
        let v = judge(2, &snapshots, &transfers, &applied, &BTreeMap::new());
        assert!(v.violations.is_empty(), "{:?}", v.violations);
        assert_eq!(v.in_flight_total, -120);
        assert_eq!(v.in_flight.len(), 1);

        // The same books without knowing about the transfer do not balance.
        let v = judge(2, &snapshots, &BTreeMap::new(), &BTreeMap::new(), &BTreeMap::new());
        assert_eq!(v.violations.len(), 1);
        assert!(v.violations[0].contains("not conserved"));
    }

    #[test]
    fn balances_below_their_limit_broken_holds_and_contradicting_heuristics_are_violations() {
        let mut s = snap(0, 100, 100);
        s.below_overdraft_limit.push(AccountId::new("eve").expect("valid"));
        s.invariant_violation = Some("account eve: stored held is 5, but the prepared transfers add up to 0".into());
        let id = uuid::Uuid::new_v4();
        s.heuristics.push(HeuristicView { id, decision: Decision::Commit, operator: "carol".into(), at_unix_ms: 1 });
        let outcomes = BTreeMap::from([(id, Outcome::Aborted(AbortReason::CoordinatorRestarted))]);
        let v = judge(1, &[s], &BTreeMap::new(), &BTreeMap::new(), &outcomes);
        assert_eq!(v.violations.len(), 3, "{:?}", v.violations);
        assert!(v.violations.iter().any(|m| m.contains("contradicts")));
    }
}
