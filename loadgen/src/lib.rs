//! Tools that drive a real local cluster: the process harness the integration tests use, the benchmark
//! (`ledger-bench`) and the kill-and-restart drill (`ledger-drill`).

pub mod bench;
pub mod cluster;
pub mod drill;
pub mod http1;
