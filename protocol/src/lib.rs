//! The two-phase-commit protocol of the ledger, with no I/O: the ledger's vocabulary, the messages the nodes
//! exchange, the state they keep, the per-transfer and per-shard state machines, and the cores that own every
//! rule the servers follow (batching, timeouts, re-delivery, decision queries, recovery).
//!
//! This crate depends on no runtime, network, disk or clock: every call that needs the time takes it as an
//! argument, and every effect (a frame to send, a store batch to write, a sync to wait for, a timer to set, an
//! answer to release) is handed back for the caller to carry out. The servers and the simulator drive the same
//! code.

#![warn(missing_docs)]

pub mod coordinator;
pub mod coordinator_core;
pub mod journal;
pub mod ledger;
pub mod msg;
pub mod participant;
pub mod participant_core;
pub mod resolver;
pub mod rng;
pub mod state;
