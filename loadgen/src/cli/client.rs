//! `ledger account ...`, `ledger transfer`, `ledger transfers` and `ledger audit`: a client of the public API.

use std::process::ExitCode;

#[derive(clap::Subcommand, Debug)]
pub enum ClientCommand {}

pub async fn run(command: ClientCommand) -> ExitCode {
    match command {}
}
