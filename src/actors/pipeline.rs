//! The write-ahead issuance pipeline for one job, run by its CA's cell:
//! prepare (signer) → record the serial and TBS (store) → sign (signer; deadline re-checked)
//! → record the certificate, its request and the audit event (store) → reply.
//! No certificate can exist that the database does not know.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;

use super::cell::Job;
use super::signer::{Prepare, Sign, Signer};
use super::store::StoreHandle;
use crate::config::{Lane, Sabotage, Sabotages};
use crate::db::models::{cert_state, identity_state, request_state, CertificateRow, IdentityRow, NewAuditEvent};
use crate::db::queries::WriteOp;
use crate::engine::types::IssuedCertificate;
use crate::error::EngineError;
use crate::metrics::Metrics;
use crate::pki::identity::IdentityDraft;
use crate::pki::{cert_pem, now_ms, CaMaterial};

/// What the pipeline needs, cloned once per job.
#[derive(Clone)]
pub struct Pipeline {
    pub ca: Arc<CaMaterial>,
    pub signer: Addr<Signer>,
    pub store: StoreHandle,
    pub metrics: Arc<Metrics>,
    pub instance: Arc<str>,
    /// Dev-only deliberate defects (see [`Sabotage`]).
    pub sabotage: Sabotages,
}

fn mailbox_gone(_: MailboxError) -> EngineError {
    EngineError::ShuttingDown
}

impl Pipeline {
    pub async fn run(&self, job: &Job) -> Result<IssuedCertificate, EngineError> {
        let p = self;
        // A key known to be gone fails here, before any database write: a broken CA must not
        // load the store that every other CA shares (its breaker still counts the failure).
        if let Some(reason) = p.ca.key.unavailable_reason() {
            return Err(EngineError::SignerFailure {
                ca: p.ca.id.clone(),
                reason: format!("key unavailable: {reason}"),
            });
        }
        let prepared = p
            .signer
            .send(Prepare { profile: job.profile.clone(), csr: job.csr.clone(), names: job.names.clone() })
            .await
            .map_err(mailbox_gone)??;
        let serial = prepared.serial_hex.clone();
        tracing::debug!(serial = %serial, "recording the certificate before signing");
        p.store
            .write(WriteOp::WriteAhead(Box::new(CertificateRow {
                serial: serial.clone(),
                ca_id: p.ca.id.clone(),
                profile: job.profile.id.clone(),
                client: job.client.clone(),
                request_id: job.request_id.clone(),
                state: cert_state::SIGNING.into(),
                tbs_der: prepared.tbs_der.clone(),
                cert_der: None,
                not_before: prepared.not_before_ms,
                not_after: prepared.not_after_ms,
                created_at: now_ms(),
                issued_at: None,
                revoked_at: None,
                revocation_reason: None,
            })))
            .await?;

        if p.sabotage.has(Sabotage::SlowInteractiveSigning) && job.profile.lane == Lane::Interactive {
            actix_rt::time::sleep(Duration::from_secs(7)).await;
        }
        // Without deadlines (a defect on purpose) the signer's last check never refuses.
        let deadline = match p.sabotage.has(Sabotage::IgnoreDeadlines) {
            true => job.deadline + Duration::from_secs(3600),
            false => job.deadline,
        };
        let signed = p.signer.send(Sign { tbs_der: prepared.tbs_der, deadline }).await.map_err(mailbox_gone)?;
        let cert_der = match signed {
            Ok(der) => der,
            Err(e) => {
                p.store.write_detached(WriteOp::CertificateAbandoned { serial });
                return Err(e);
            }
        };
        let issued_at = now_ms();
        let identity =
            job.identity.as_ref().map(|draft| Box::new(identity_row(job, draft, &serial, prepared.not_after_ms)));
        let audit = match &identity {
            Some(row) => NewAuditEvent {
                at: issued_at,
                instance: p.instance.to_string(),
                actor: job.client.clone(),
                action: "identity.create".into(),
                target: row.id.clone(),
                outcome: "issued".into(),
                detail: format!(
                    "ca={} profile={} serial={serial} key={} max_uses={}",
                    p.ca.id, job.profile.id, row.key_type, row.max_uses
                ),
            },
            None => NewAuditEvent {
                at: issued_at,
                instance: p.instance.to_string(),
                actor: job.client.clone(),
                action: "certificate.issue".into(),
                target: serial.clone(),
                outcome: "issued".into(),
                detail: format!("ca={} profile={}", p.ca.id, job.profile.id),
            },
        };
        p.store
            .write(WriteOp::CertificateIssued {
                serial: serial.clone(),
                cert_der: cert_der.clone(),
                at: issued_at,
                request_id: job.request_id.clone(),
                audit: Box::new(audit),
                identity,
            })
            .await?;
        Ok(IssuedCertificate {
            serial,
            ca: p.ca.id.clone(),
            profile: job.profile.id.clone(),
            certificate: cert_pem(&cert_der),
            chain: p.ca.chain_pem.clone(),
            not_before: prepared.not_before_ms,
            not_after: prepared.not_after_ms,
            request_id: job.request_id.clone(),
        })
    }

    /// Record a stored request's failure (issued requests were recorded with their certificate).
    /// `retry_at`: when a request that failed for a passing reason may be taken up again.
    pub fn request_failed(&self, request_id: Option<&str>, is_async: bool, err: &EngineError, retry_at: Option<i64>) {
        let Some(id) = request_id else { return };
        let now = now_ms();
        let (state, claimed_until) = if err.is_permanent() {
            (request_state::FAILED, None)
        } else if is_async {
            // Back to pending: any instance may take it up again after a pause.
            (request_state::PENDING, Some(retry_at.unwrap_or(now + 1_000)))
        } else {
            (request_state::RETRYABLE, None)
        };
        self.store.write_detached(WriteOp::RequestFinished {
            id: id.to_string(),
            state,
            error_type: Some(err.slug().to_string()),
            error_detail: Some(err.to_string()),
            at: now,
            claimed_until,
        });
    }

    /// A coalesced request shares its leader's certificate.
    pub fn request_issued(&self, request_id: &str, serial: &str) {
        self.store.write_detached(WriteOp::RequestIssued {
            id: request_id.to_string(),
            serial: serial.to_string(),
            at: now_ms(),
        });
    }

    /// Hold an asynchronous request durably until an operator resubmits it.
    pub fn park_request(&self, request_id: Option<&str>) {
        let Some(id) = request_id else { return };
        self.store.write_detached(WriteOp::RequestFinished {
            id: id.to_string(),
            state: request_state::PARKED,
            error_type: None,
            error_detail: None,
            at: now_ms(),
            claimed_until: None,
        });
    }
}

/// The stored form of an identity created with the certificate `serial`.
fn identity_row(job: &Job, draft: &IdentityDraft, serial: &str, not_after_ms: i64) -> IdentityRow {
    IdentityRow {
        id: draft.key.id.clone(),
        client: job.client.clone(),
        profile: job.profile.id.clone(),
        ca_id: job.profile.ca.clone(),
        serial: serial.to_string(),
        key_type: draft.key.key_type.as_str().to_string(),
        signature_scheme: draft.signature_scheme.to_string(),
        state: identity_state::ACTIVE.to_string(),
        sealed_key: Some(draft.key.sealed.clone()),
        kek_id: draft.key.kek_id.clone(),
        uses: 0,
        max_uses: i64::from(draft.max_uses),
        created_at: draft.created_at,
        // The key never outlives its certificate.
        expires_at: draft.expires_at.min(not_after_ms),
        destroyed_at: None,
        destroy_reason: None,
    }
}

/// Time kept, before a deadline, to record a signed certificate and answer: a job that does not
/// have it left is not signed, so nobody is answered 503 for a certificate that was issued.
pub const FINISH_MARGIN: Duration = Duration::from_millis(50);

pub fn deadline_exceeded() -> EngineError {
    EngineError::DeadlineExceeded { retry_after: Duration::from_secs(1) }
}
