//! The two-phase-commit protocol tested without processes: the real state machines of `protocol`,
//! driven the way the coordinator and participant shells drive them, over a simulated network and simulated
//! disks.
//!
//! - [`sim`]: a seeded, deterministic simulation of a whole cluster (one coordinator, two or three
//!   participants, clients) with message loss, delay, duplication and reordering, partitions, crashes that lose
//!   unflushed writes, and restarts. Every step is checked against the ledger's safety properties, and every
//!   run ends healed and quiescent with every transfer decided everywhere. Replay one run with
//!   `SIM_SEED=<n> cargo test -p protocol --test protocol`.
//! - [`model`]: an exhaustive model check (stateright) of the coordinator and two participants for small
//!   transfer workloads with crashes and a lossy, duplicating network, including the property that every
//!   transfer can still be decided once the network heals.

mod model;
mod sim;
