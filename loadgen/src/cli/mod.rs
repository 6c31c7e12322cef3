//! The `ledger` command's subcommands that are not the benchmark or the drill: the local cluster under
//! `./data` (`local`), the client of the public API (`client`) and the guided tour (`demo`).

pub mod client;
pub mod demo;
pub mod local;
