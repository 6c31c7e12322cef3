//! Integration tests: the real `coordinator` and `participant` binaries on loopback, killed and restarted.

mod api;
mod books;
mod crash;
mod fuzz;
mod harness;
mod load;
mod security;
