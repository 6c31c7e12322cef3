//! Tools that drive a real local cluster: the process harness the integration tests use, the benchmark
//! (`ledger-bench`), the kill-and-restart drill (`ledger-drill`) and the history filler (`ledger-fill`).

pub mod bench;
pub mod cli;
pub mod cluster;
pub mod drill;
pub mod fill;
pub mod http1;
pub mod launch;
