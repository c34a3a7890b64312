//! The audit log's writer, apart from issuance: refusals are tallied in memory
//! ([`ledger::RefusalLedger`]) and written in aggregate, single events (the operator's actions)
//! one row each, by an actor with its own bounded queue and its own connection
//! ([`writer::AuditWriter`]). Issuance's own audit rows are not here: the Store writes each in
//! the transaction that records its certificate.

pub mod chain;
pub mod ledger;
pub mod recent;
pub mod writer;

pub use ledger::{Action, RefusalLedger};
pub use writer::{AuditLog, AuditWriter};
