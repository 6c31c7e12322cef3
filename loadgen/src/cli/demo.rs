//! `ledger demo`: a tour of the public API against a running cluster.

use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct DemoArgs {}

pub async fn run(_args: DemoArgs) -> ExitCode {
    ExitCode::FAILURE
}
