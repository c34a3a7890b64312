//! The database's write operations: what the issuance path asks the store to write, and what
//! each write answers. The store folds many into one transaction
//! (`apply_batch` in `queries.rs`); this module only names them.

use super::models::{CertificateRow, IdentityRow, NewAuditEvent, RequestRow};
use crate::states::RequestState;

/// A write on the issuance path. The Store folds many into one transaction.
#[derive(Debug, Clone)]
pub enum WriteOp {
    /// Insert a request; [`WriteOutcome::Conflict`] if (client, idempotency key) exists.
    InsertRequest(Box<RequestRow>),
    /// Write-ahead: the serial and TBS, recorded before the key signs.
    WriteAhead(Box<CertificateRow>),
    /// The signed certificate, its request's new state, and the issuance audit event, atomically.
    CertificateIssued {
        serial: String,
        cert_der: Vec<u8>,
        at: i64,
        request_id: Option<String>,
        audit: Box<NewAuditEvent>,
        /// A disposable identity comes into existence with its certificate, never without it.
        identity: Option<Box<IdentityRow>>,
    },
    CertificateAbandoned {
        serial: String,
    },
    /// A coalesced request answered with another request's certificate.
    RequestIssued {
        id: String,
        serial: String,
        at: i64,
    },
    RequestFinished {
        id: String,
        state: RequestState,
        error_type: Option<String>,
        error_detail: Option<String>,
        at: i64,
        /// For `pending`: when another instance may take the request up again.
        claimed_until: Option<i64>,
    },
    Audit(NewAuditEvent),
    /// Count one signature of a disposable identity (destroying it after its last use) and
    /// hand back its sealed key; audited in the same transaction.
    UseIdentity {
        id: String,
        client: String,
        at: i64,
        instance: String,
        digest_algorithm: &'static str,
    },
}

#[derive(Debug, Clone)]
pub enum WriteOutcome {
    Done,
    Conflict,
    IdentityUsed(Box<IdentityUse>),
    /// No such identity for this client (another client's identity is indistinguishable).
    IdentityNotFound,
    /// The identity exists but will never sign again: why, and whether this found it expired
    /// and destroyed it.
    IdentityGone {
        why: String,
        expired_now: bool,
    },
}

/// A use granted: the identity as it was when the use was counted (with its sealed key, which
/// the caller opens to sign), and whether that was its last use.
#[derive(Debug, Clone)]
pub struct IdentityUse {
    pub row: IdentityRow,
    pub destroyed: bool,
}

/// Writes for unit tests to build batches from.
#[cfg(test)]
pub(crate) mod test_writes {
    use super::*;
    use crate::states::CertState;

    /// A write-ahead record of `serial` (CA `ica-p256`, profile `p`, client `c`).
    pub(crate) fn write_ahead(serial: &str) -> WriteOp {
        WriteOp::WriteAhead(Box::new(CertificateRow {
            serial: serial.into(),
            ca_id: "ica-p256".into(),
            profile: "p".into(),
            client: "c".into(),
            request_id: None,
            state: CertState::Signing,
            tbs_der: vec![0x30, 0x00],
            cert_der: None,
            not_before: 0,
            not_after: 1,
            created_at: 0,
            issued_at: None,
            revoked_at: None,
            revocation_reason: None,
            crl_shard: None,
        }))
    }
}
