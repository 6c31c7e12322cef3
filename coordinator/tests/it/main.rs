//! Integration tests: the real `coordinator` and `participant` binaries on loopback, killed and restarted.

mod api;
mod batch;
mod books;
mod console;
mod crash;
mod fuzz;
mod harness;
mod history;
mod holds;
mod legs;
mod load;
mod overdraft;
mod partition;
mod security;
