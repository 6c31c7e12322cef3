//! The two-phase-commit protocol as plain state machines: no sockets, no disk, no clock of their own. The
//! servers feed them messages (and the time), perform the writes and sends they ask for, and nothing else.
//! This keeps every protocol decision testable in-process, including crashes and lost messages.

pub mod coordinator;
pub mod participant;
