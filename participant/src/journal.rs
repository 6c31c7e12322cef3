//! The journal's keys in the participant's store. Its entries are computed by the participant's core
//! (`protocol::journal`) and written in the same atomic group as the change they describe, never edited.
//!
//! Key layout (participant store, beside the protocol records):
//! - `j` account `\0` seq → [`JournalEntry`]: an account's entries in order;
//! - `mjournal_next_seq` → the next sequence number, so a restart need not scan the entries;
//! - `mcreated_total` → the sum of every opening balance;
//! - `h` transfer id → [`HeuristicRecord`]: outcomes an operator forced here.
//!
//! The entry that applied a committed transfer here is named by its finished record (`commit_seq`).

use common::ledger::AccountId;
pub use protocol::journal::{JournalState, TooOld, RECENT_COMMITS_MAX};
pub use protocol::state::{EntryKind, HeuristicRecord, JournalEntry};

pub const ENTRY: u8 = b'j';
/// Sum of all opening balances: money that entered the ledger.
pub const CREATED_TOTAL_KEY: &[u8] = b"mcreated_total";
/// The journal's next sequence number, written with every group that adds entries.
pub const NEXT_SEQ_KEY: &[u8] = b"mjournal_next_seq";
/// `h` transfer id → [`HeuristicRecord`]: outcomes an operator forced here.
pub const HEURISTIC: u8 = b'h';

pub fn account_prefix(account: &AccountId) -> Vec<u8> {
    let mut k = Vec::with_capacity(account.as_str().len() + 10);
    k.push(ENTRY);
    k.extend_from_slice(account.as_str().as_bytes());
    k.push(0); // never part of an account id: one account's prefix cannot match another's
    k
}

pub fn entry_key(account: &AccountId, seq: u64) -> Vec<u8> {
    let mut k = account_prefix(account);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

pub fn prefixed(prefix: u8, rest: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + rest.len());
    k.push(prefix);
    k.extend_from_slice(rest);
    k
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::records;

    /// The size `ARCHITECTURE.md` gives for a journal entry (an account of 11 characters, a token name of 6, the
    /// millionth posting, a time of 2026), in layout 5 and in the fixed-width body before it.
    #[test]
    fn a_journal_entry_takes_about_half_the_bytes_in_layout_5() {
        let entry = JournalEntry {
            seq: 1_000_000,
            account: AccountId::new("acct-000123").expect("valid"),
            kind: EntryKind::Posting,
            transfer_id: Some(uuid::Uuid::new_v4()),
            amount: -250,
            balance_after: 999_750,
            at_unix_ms: 1_796_000_000_000,
            made_by: Some("loadgen".into()),
        };
        let fixed = 1 + bincode::serialize(&entry).expect("serialises").len();
        assert_eq!((records::encode(&entry).len(), fixed), (63, 97));
        assert_eq!(entry_key(&entry.account, entry.seq).len(), 21);
    }
}
