//! Disposable identities through the engine: created like a certificate (intake, the CA's cell,
//! the interactive lane, its deadline and idempotency rules) with a key the engine generates and
//! keeps sealed; used to sign digests by the client that created it, a bounded number of times.

use std::sync::Arc;
use std::time::Instant;

use super::identity_services::{key_spec, IdentityServices};
pub use super::identity_services::{IdentitiesStatus, KeyStock};
use super::issue::{check_idempotency_key, Provenance};
use super::Engine;
use crate::actors::intake::{Route, Subject};
use crate::actors::vault::SignDigest;
use crate::audit::Action;
use crate::types::*;
use base64::Engine as _;

use crate::db::identities;
use crate::db::models::IdentityRow;
use crate::db::queries;
use crate::db::writes::{IdentityUse, WriteOp, WriteOutcome};
use crate::error::EngineError;
use crate::pki::identity::{self as pki_identity, DigestAlgorithm, IdentityDraft};
use crate::pki::KeyType;
use crate::pki::{now_ms, CheckedCsr};
use crate::states::IdentityState;

/// Identity ids are UUIDs; anything else names no identity.
fn plausible_id(id: &str) -> bool {
    id.len() == 36 && id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

impl Engine {
    fn identity_services(&self) -> Result<&IdentityServices, EngineError> {
        self.inner
            .identities
            .as_ref()
            .ok_or_else(|| EngineError::PolicyViolation("disposable identities are not configured".into()))
    }

    /// Create a disposable identity: a key generated here, sealed, and certified by the
    /// profile's CA through its cell, within the interactive lane's deadline.
    pub async fn create_identity(&self, client: &Client, req: CreateIdentity) -> Result<Identity, EngineError> {
        let span = tracing::info_span!("create_identity", client = %client.name, profile = %req.profile, ca = tracing::field::Empty, identity = tracing::field::Empty, request_id = tracing::field::Empty);
        let result =
            tracing::Instrument::instrument(self.create_identity_inner(client, &req, span.clone()), span).await;
        self.count_identity("create", result.as_ref().map(|_| "created"));
        if let Err(e) = &result {
            self.refused(client, Action::IdentityCreate, &req.profile, e);
        }
        result
    }

    async fn create_identity_inner(
        &self,
        client: &Client,
        req: &CreateIdentity,
        span: tracing::Span,
    ) -> Result<Identity, EngineError> {
        self.refuse_if_stopping()?;
        check_idempotency_key(req.idempotency_key.as_deref())?;
        let route = Route::Sync { wait: req.wait };
        let pending = self.inner.intake.admit(client, &req.profile, Subject(&req.subject), route)?;
        let profile = pending.profile.clone();
        span.record("ca", profile.ca.as_str());
        let policy =
            profile.identity.clone().ok_or_else(|| EngineError::Internal("identity policy vanished".into()))?;

        let spec = key_spec(policy.key_type, policy.rsa_bits);
        let key = self.identity_services()?.keys.take(spec, pending.deadline).await?;
        span.record("identity", key.id.as_str());
        let created_at = now_ms();
        // The identity's request as the cell and signer see a CSR's: its public key and approved
        // names. (With an Idempotency-Key, the stored request's `csr_der` holds this SPKI; its
        // fingerprint is the profile and subject, since every attempt has a new key.)
        let csr = CheckedCsr {
            spki_der: key.spki_der.clone(),
            key_type: policy.key_type,
            key_bits: key.bits,
            common_name: pending.names.common_name.clone(),
            names: pending.names.sans.clone(),
            der: key.spki_der.clone(),
        };
        let draft = Arc::new(IdentityDraft {
            signature_scheme: pki_identity::signature_scheme(policy.key_type, policy.rsa_signature),
            fingerprint: req.subject.fingerprint(&profile.id),
            max_uses: policy.max_uses,
            created_at,
            expires_at: created_at + policy.lifetime.as_millis() as i64,
            key,
        });
        let admitted = pending.with_key(csr, draft.clone());
        let (issued, provenance) = self.issue_admitted(client, admitted, req.idempotency_key.as_deref(), span).await?;
        match provenance {
            Provenance::Fresh => Ok(Identity {
                id: draft.key.id.clone(),
                profile: profile.id.clone(),
                ca: issued.ca,
                state: IdentityState::Active,
                key_type: policy.key_type.as_str().into(),
                serial: issued.serial,
                certificate: issued.certificate,
                chain: issued.chain,
                created_at,
                created_at_rfc3339: rfc3339(created_at),
                // As stored: the key never outlives its certificate.
                expires_at: draft.expires_at.min(issued.not_after),
                expires_at_rfc3339: rfc3339(draft.expires_at.min(issued.not_after)),
                max_uses: i64::from(policy.max_uses),
                remaining_uses: i64::from(policy.max_uses),
            }),
            // An earlier attempt with this Idempotency-Key created it: answer with that identity.
            // (This attempt's key is dropped, not stocked again: its id is already in this
            // request's log lines and must never name another client's identity.)
            Provenance::Replayed => {
                let serial = issued.serial.clone();
                let row = self
                    .read(move |c| identities::load_identity_by_serial(c, &serial))
                    .await?
                    .ok_or_else(|| EngineError::Internal("issued identity request without identity".into()))?;
                Ok(self.identity_view(row, issued.certificate))
            }
        }
    }

    /// An identity of this client; another client's is "not found".
    pub async fn identity(&self, client: &Client, id: &str) -> Result<Identity, EngineError> {
        if !plausible_id(id) {
            return Err(EngineError::NotFound);
        }
        let (id, owner) = (id.to_string(), client.name.clone());
        let found = self
            .read(move |c| {
                let Some(row) = identities::load_identity(c, &id)?.filter(|r| r.client == owner) else {
                    return Ok(None);
                };
                let cert = queries::load_certificate(c, &row.serial)?.and_then(|cert| cert.cert_der);
                Ok(cert.map(|der| (row, der)))
            })
            .await?;
        let (row, der) = found.ok_or(EngineError::NotFound)?;
        Ok(self.identity_view(row, crate::pki::cert_pem(&der)))
    }

    fn identity_view(&self, row: IdentityRow, certificate: String) -> Identity {
        Identity {
            chain: self.chain_of(&row.ca_id),
            remaining_uses: if row.state == IdentityState::Active { (row.max_uses - row.uses).max(0) } else { 0 },
            id: row.id,
            profile: row.profile,
            ca: row.ca_id,
            state: row.state,
            key_type: row.key_type,
            serial: row.serial,
            certificate,
            created_at: row.created_at,
            created_at_rfc3339: rfc3339(row.created_at),
            expires_at: row.expires_at,
            expires_at_rfc3339: rfc3339(row.expires_at),
            max_uses: row.max_uses,
        }
    }

    /// Sign a digest with an identity's key, counting one of its uses. Bad input is refused
    /// before anything is counted. The signature is made first and released only once its use
    /// is counted (in the Store's transaction, which also destroys the key after the last use):
    /// a failure on the way costs no use, and concurrent requests, on any instance, can never
    /// get more than `max_uses` signatures out.
    pub async fn sign_with_identity(
        &self,
        client: &Client,
        id: &str,
        req: SignDigestRequest,
    ) -> Result<IdentitySignature, EngineError> {
        let span = tracing::info_span!("identity_signature", client = %client.name, identity = %id.chars().take(36).collect::<String>());
        let result = tracing::Instrument::instrument(self.sign_inner(client, id, req), span).await;
        self.count_identity("sign", result.as_ref().map(|_| "signed"));
        if let Err(e) = &result {
            // Gone is audited with the attempt, in the store's transaction.
            if !matches!(e, EngineError::Gone(_)) {
                self.refused(client, Action::IdentitySign, id, e);
            }
        }
        result
    }

    async fn sign_inner(
        &self,
        client: &Client,
        id: &str,
        req: SignDigestRequest,
    ) -> Result<IdentitySignature, EngineError> {
        self.refuse_if_stopping()?;
        self.inner.intake.check_rate(client)?;
        let algorithm = DigestAlgorithm::parse(&req.digest_algorithm)?;
        let digest = base64::engine::general_purpose::STANDARD
            .decode(req.digest.trim())
            .map_err(|_| EngineError::BadDigest("digest is not valid base64".into()))?;
        algorithm.check(&digest)?;
        let Some(services) = self.inner.identities.as_ref().filter(|_| plausible_id(id)) else {
            return Err(EngineError::NotFound);
        };
        let deadline = Instant::now() + self.inner.config.lanes.interactive.default_deadline;
        let (owner, wanted) = (client.name.clone(), id.to_string());
        let row = self
            .read(move |c| identities::load_identity(c, &wanted))
            .await?
            .filter(|row| row.client == owner)
            .ok_or(EngineError::NotFound)?;
        // Sign only what can still be counted (judged at the same `at` the Store counts with); an
        // expired one goes straight to the Store, which destroys it and answers Gone.
        let at = now_ms();
        let signature = match (&row.sealed_key, row.uses < row.max_uses && row.expires_at > at) {
            (Some(sealed), true) => {
                Some(self.vault_sign(services, &row, sealed.clone(), algorithm, digest, deadline).await?)
            }
            _ => None,
        };
        let outcome = self
            .inner
            .store
            .write(WriteOp::UseIdentity {
                id: row.id.clone(),
                client: client.name.clone(),
                at,
                instance: self.inner.instance.to_string(),
                digest_algorithm: algorithm.name(),
            })
            .await?;
        let IdentityUse { row, destroyed } = match outcome {
            WriteOutcome::IdentityUsed(used) => *used,
            WriteOutcome::IdentityNotFound => return Err(EngineError::NotFound),
            WriteOutcome::IdentityGone { why, expired_now } => {
                if expired_now {
                    self.inner
                        .metrics
                        .identities_destroyed
                        .get_or_create(&vec![("reason", "expired".to_string())])
                        .inc();
                }
                return Err(EngineError::Gone(why));
            }
            other => return Err(EngineError::Internal(format!("the store answered a use with {other:?}"))),
        };
        let signature =
            signature.ok_or_else(|| EngineError::Internal("a use was counted without a signature".into()))?;
        if destroyed {
            self.inner.metrics.identities_destroyed.get_or_create(&vec![("reason", "used".to_string())]).inc();
        }
        Ok(IdentitySignature {
            identity: row.id,
            signature,
            signature_algorithm: pki_identity::signature_algorithm(&row.signature_scheme, algorithm),
            remaining_uses: if destroyed { 0 } else { row.max_uses - row.uses },
            state: if destroyed { IdentityState::Destroyed } else { IdentityState::Active },
        })
    }

    /// Open the sealed key and sign in the vault, within the deadline; at most
    /// [`MAX_WAITING`](crate::actors::vault::MAX_WAITING) signatures wait for a vault thread.
    async fn vault_sign(
        &self,
        services: &IdentityServices,
        row: &IdentityRow,
        sealed: Vec<u8>,
        algorithm: DigestAlgorithm,
        digest: Vec<u8>,
        deadline: Instant,
    ) -> Result<Vec<u8>, EngineError> {
        let key_type = KeyType::parse(&row.key_type)
            .ok_or_else(|| EngineError::Internal(format!("unknown stored key type {:?}", row.key_type)))?;
        services
            .vault
            .sign(SignDigest {
                id: row.id.clone(),
                key_type,
                sealed,
                kek_id: row.kek_id.clone(),
                scheme: row.signature_scheme.clone(),
                algorithm,
                digest,
                deadline,
            })
            .await
    }

    fn count_identity(&self, operation: &'static str, outcome: Result<&str, &EngineError>) {
        let outcome = match outcome {
            Ok(o) => o,
            Err(e) => e.slug(),
        };
        let labels = vec![("operation", operation.to_string()), ("outcome", outcome.to_string())];
        self.inner.metrics.identity_operations.get_or_create(&labels).inc();
    }
}
