//! `ledger cluster ...`: a local cluster for trying things out and for recovery drills.

use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct ClusterArgs {}

pub async fn run(_args: ClusterArgs) -> ExitCode {
    ExitCode::FAILURE
}
