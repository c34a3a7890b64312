//! PostgreSQL: the Store's two commonest batches written by one statement each, without a
//! transaction around it.
//!
//! In a transaction a batch costs a round trip for `BEGIN`, one per statement and one for
//! `COMMIT`, each a wake-up of the server's backend and then of the Store's worker: seven an
//! issuance at c=1. A statement on its own is a transaction — all of it is written or none —
//! and with `synchronous_commit` on (the server's default) it is durable when its answer
//! arrives, as a `COMMIT` is. Two batches are written that way, with statements kept prepared
//! (parsed once per connection):
//!
//! - write-ahead records only: the records' insert;
//! - one signed certificate (for a caller that waits: no stored request, no identity): its
//!   record's update by serial as a data-modifying `WITH` clause of its audit row's insert.
//!
//! Any other batch is written in a transaction. A statement that joined a batch of
//! certificates against the table would have to be planned on every run (`unnest.rs`): parsed
//! and planned, it cost the server more than the round trips it saved (measured, PostgreSQL's
//! CPU per issuance at c=16: 251–255 µs against 222–229 µs).

use diesel::pg::Pg;
use diesel::prelude::*;
use diesel::query_builder::{AstPass, QueryFragment};
use diesel::sql_types::{BigInt, Binary, Text};

use super::audit::{AuditEntry, InsertAudit};
use super::models::TBS_ONCE_ISSUED;
use super::unnest::{kept_prepared, InsertCertificates};
use super::writes::WriteOp;
use crate::states::CertState;

/// A batch one statement writes.
pub enum OneStatement<'a> {
    WriteAhead(InsertCertificates<'a>),
    Issued(IssuedWithAudit<'a>),
}

impl<'a> OneStatement<'a> {
    /// The statement for `ops`, or `None` if they need a transaction.
    pub fn of(ops: &'a [WriteOp]) -> Option<OneStatement<'a>> {
        match ops {
            [WriteOp::CertificateIssued { serial, cert_der, at, request_id: None, audit, identity: None }] => {
                Some(OneStatement::Issued(IssuedWithAudit {
                    serial,
                    cert_der,
                    at: *at,
                    audit: InsertAudit::new(std::iter::once(audit.fields())),
                }))
            }
            [] => None,
            _ if ops.iter().all(|op| matches!(op, WriteOp::WriteAhead(_))) => {
                let rows = ops.iter().filter_map(|op| match op {
                    WriteOp::WriteAhead(row) => Some(row.as_ref()),
                    _ => None,
                });
                Some(OneStatement::WriteAhead(InsertCertificates::new(rows)))
            }
            _ => None,
        }
    }

    pub fn execute(self, conn: &mut PgConnection) -> QueryResult<usize> {
        match self {
            OneStatement::WriteAhead(insert) => insert.execute(conn),
            OneStatement::Issued(issued) => issued.execute(conn),
        }
    }
}

/// `WITH issued AS (UPDATE certificates SET … WHERE serial = $5) INSERT INTO audit_log …`: a
/// certificate's record and its audit row. The update is found by its primary key, so the one
/// plan the server keeps for it fits a table of any size.
pub struct IssuedWithAudit<'a> {
    serial: &'a str,
    cert_der: &'a [u8],
    at: i64,
    audit: InsertAudit<'a>,
}

kept_prepared!(IssuedWithAudit);

impl QueryFragment<Pg> for IssuedWithAudit<'_> {
    fn walk_ast<'q>(&'q self, mut out: AstPass<'_, 'q, Pg>) -> QueryResult<()> {
        // A data-modifying WITH clause runs exactly once, to completion, though nothing reads it.
        out.push_sql("WITH issued AS (UPDATE certificates SET state = ");
        out.push_bind_param::<Text, str>(CertState::Issued.as_str())?;
        out.push_sql(", cert_der = ");
        out.push_bind_param::<Binary, [u8]>(self.cert_der)?;
        out.push_sql(", tbs_der = ");
        out.push_bind_param::<Binary, [u8]>(TBS_ONCE_ISSUED)?;
        out.push_sql(", issued_at = ");
        out.push_bind_param::<BigInt, i64>(&self.at)?;
        out.push_sql(" WHERE serial = ");
        out.push_bind_param::<Text, str>(self.serial)?;
        out.push_sql(") ");
        self.audit.walk_ast(out.reborrow())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::models::{IdentityRow, NewAuditEvent};
    use crate::db::writes::test_writes::write_ahead as ahead;
    use crate::states::IdentityState;

    fn issued(serial: &str, request_id: Option<&str>, identity: bool) -> WriteOp {
        let identity = identity.then(|| {
            Box::new(IdentityRow {
                id: "i".into(),
                client: "c".into(),
                profile: "p".into(),
                ca_id: "ica-p256".into(),
                serial: serial.into(),
                key_type: "ecdsa-p256".into(),
                signature_scheme: "ecdsa-sha256".into(),
                state: IdentityState::Active,
                sealed_key: None,
                kek_id: "k".into(),
                uses: 0,
                max_uses: 1,
                created_at: 0,
                expires_at: 1,
                destroyed_at: None,
                destroy_reason: None,
            })
        });
        WriteOp::CertificateIssued {
            serial: serial.into(),
            cert_der: vec![0x30, 0x00],
            at: 1,
            request_id: request_id.map(String::from),
            audit: Box::new(NewAuditEvent {
                at: 1,
                instance: "i".into(),
                actor: "c".into(),
                action: "certificate.issue".into(),
                target: serial.into(),
                outcome: "issued".into(),
                detail: String::new(),
            }),
            identity,
        }
    }

    /// Which statement a batch gets, by name (`None`: a transaction).
    fn statement(ops: &[WriteOp]) -> Option<&'static str> {
        OneStatement::of(ops).map(|s| match s {
            OneStatement::WriteAhead(_) => "write-ahead",
            OneStatement::Issued(_) => "issued",
        })
    }

    /// The batches written without a transaction are exactly the two named: anything else a
    /// batch holds (a stored request to update, an identity to insert, a second certificate)
    /// needs several statements, and so a transaction.
    #[test]
    fn only_the_two_common_batches_skip_the_transaction() {
        assert_eq!(statement(&[ahead("a")]), Some("write-ahead"));
        assert_eq!(statement(&[ahead("a"), ahead("b"), ahead("c")]), Some("write-ahead"));
        assert_eq!(statement(&[issued("a", None, false)]), Some("issued"));

        assert_eq!(statement(&[]), None);
        assert_eq!(statement(&[issued("a", Some("r"), false)]), None, "its request is updated too");
        assert_eq!(statement(&[issued("a", None, true)]), None, "its identity is inserted too");
        assert_eq!(statement(&[issued("a", None, false), issued("b", None, false)]), None);
        assert_eq!(statement(&[ahead("a"), issued("b", None, false)]), None);
        assert_eq!(statement(&[ahead("a"), WriteOp::CertificateAbandoned { serial: "b".into() }]), None);
    }
}
