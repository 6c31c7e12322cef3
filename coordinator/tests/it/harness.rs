//! The process harness lives in `loadgen` so the benchmark and the drill run clusters the same way.

pub use loadgen::cluster::*;
