//! Everything the coordinator and the participants agree on: ledger types and their validation, the
//! account-to-shard map, the internal wire messages, the on-disk records, and the two 2PC state machines.
//! The protocol modules (`protocol`) do no I/O; the shells' shared plumbing (durable store with group commit,
//! HTTP error shape, crash points, logging set-up) lives beside them so both binaries use one copy.

pub mod auth;
pub mod crash;
pub mod http;
pub use protocol::ledger;
pub mod records;
pub mod redo;
pub mod runs;
pub mod store;
pub mod stream;
pub mod telemetry;
pub mod wire;
