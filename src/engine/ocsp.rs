//! OCSP through the engine's handle (incident 003's responder certificates, made castellum's
//! own work):
//!
//! - **Responders.** For each CA with `[cas.ocsp]`, every instance makes a P-256 key in memory
//!   (never stored) and has the CA issue its responder certificate through the CA's own cell, on
//!   the background lane, with the configured profile (`id-kp-OCSPSigning`,
//!   `id-pkix-ocsp-nocheck`) — the same queue, breaker and coalescing as any renewal, so many CAs
//!   renewing at once never slow interactive issuance. It is renewed once two thirds of its
//!   validity have passed; a CA whose renewal keeps failing keeps answering with its current
//!   responder until it expires, and readiness and metrics say so from the renewal point on.
//! - **Answers.** Signed when this instance issues the certificate (synchronously), or else at
//!   the first question about a serial, and cached (per serial and issuer
//!   hash algorithm), so answering it again costs no signature, no database read and no write;
//!   signed again in the background before half their validity has passed (and after a responder
//!   renewal), never valid past their responder, and served while valid even if the database is
//!   down. A revocation here evicts its serial at once; one made by
//!   another instance evicts its shard's answers when the CRL publisher sees the shard's
//!   revision move (within `crl.delay` / 4).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix_web::web::Bytes;

use super::ocsp_cache::{
    max_age, renewal_due, responder_request, unix_ms, AnswerKey, Cached, OcspAnswer, OcspCa, REFRESH_PER_LOOK,
    RENEWAL_LOOK,
};
use super::Engine;
use crate::db::models::CertificateRow;
use crate::db::queries;
use crate::error::EngineError;
use crate::metrics::Metrics;
use crate::pki::ocsp::{read_request, sign_answer, Question, Responder, Status, Unanswerable};
use crate::pki::tbs::crl_shard_of;
use crate::pki::{now_ms, RevocationReason};
use crate::states::CertState;
use crate::types::{Client, IssueRequest, IssuedCertificate};

impl Engine {
    /// Answer an OCSP request (DER): always an OCSPResponse, signed or one of the unsigned
    /// statuses (malformedRequest, unauthorized, tryLater).
    pub async fn ocsp(&self, request: &[u8]) -> OcspAnswer {
        match self.ocsp_answer(request).await {
            Ok(answer) => answer,
            Err(why) => OcspAnswer { der: Bytes::from(why.response()), max_age: None },
        }
    }

    async fn ocsp_answer(&self, request: &[u8]) -> Result<OcspAnswer, Unanswerable> {
        let service = &self.inner.ocsp;
        let question = read_request(request)?;
        let (id, ca) =
            service.cas.iter().find(|(_, ca)| ca.hashes.matches(&question)).ok_or(Unanswerable::Unauthorized)?;
        let key = AnswerKey::of(&question);
        if let Some(answer) = service.cached(&key, id, now_ms()) {
            return Ok(answer);
        }
        // Not asked before (or evicted by a revocation): read its status and sign, once.
        let generation = service.generation();
        let (status, shard) = self.status_of(id, &key.serial).await.map_err(|_| Unanswerable::TryLater)?;
        self.sign_and_keep(id, ca, generation, key, question, status, shard)
    }

    /// A certificate this instance has just issued synchronously, by a CA with OCSP on: its `good`
    /// answer is signed now, off the request's path, so the first question about it costs no
    /// signature either. Pre-signed as RFC 5019 clients ask (SHA-1 CertID); other instances, a
    /// SHA-256 question, and certificates issued asynchronously are signed at their first question.
    pub(super) fn presign_ocsp(&self, issued: &IssuedCertificate) {
        let Some(ca) = self.inner.ocsp.cas.get(&issued.ca) else { return };
        if issued.profile == ca.config.responder_profile || ca.responder.load().is_none() {
            return;
        }
        let Some(material) = self.inner.catalog.cas.get(&issued.ca) else { return };
        let Ok(serial) = hex::decode(&issued.serial) else { return };
        let Ok(fixed) = <[u8; 20]>::try_from(serial.as_slice()) else { return };
        let shard = crl_shard_of(&fixed, material.crl_shards) as i32;
        // The issuer's hashes were computed once, at start-up: no certificate parsing here.
        let Ok(question) = ca.hashes.question(&serial) else { return };
        // Read now: a revocation before the answer is kept bumps it, and the answer is dropped.
        let generation = self.inner.ocsp.generation();
        let (engine, id) = (self.clone(), issued.ca.clone());
        actix_web::rt::spawn(async move {
            let Some(ca) = engine.inner.ocsp.cas.get(&id) else { return };
            let key = AnswerKey::of(&question);
            let _ = engine.sign_and_keep(&id, ca, generation, key, question, Status::Good, shard);
        });
    }

    /// Sign an answer with the CA's current responder and cache it.
    #[allow(clippy::too_many_arguments)]
    fn sign_and_keep(
        &self,
        id: &str,
        ca: &OcspCa,
        generation: u64,
        key: AnswerKey,
        question: Question,
        status: Status,
        shard: i32,
    ) -> Result<OcspAnswer, Unanswerable> {
        let responder = ca.responder.load_full().ok_or(Unanswerable::TryLater)?;
        let this_update = SystemTime::now();
        if responder.not_after <= this_update {
            return Err(Unanswerable::TryLater);
        }
        let next_update = (this_update + ca.config.response_validity).min(responder.not_after);
        let der = sign_answer(&responder, &question, status, this_update, next_update).map_err(|e| {
            tracing::warn!(ca = %id, error = %e, "could not sign an OCSP answer");
            Unanswerable::TryLater
        })?;
        self.inner.metrics.ocsp_signatures.inc();
        let der = Bytes::from(der);
        let (this_ms, next_ms) = (unix_ms(this_update), unix_ms(next_update));
        let refresh_at = this_ms + (next_ms - this_ms) / 2;
        let cached = Cached { der: der.clone(), question, refresh_at, next_update: next_ms, ca: id.to_string(), shard };
        self.inner.ocsp.keep(generation, key, cached);
        Ok(OcspAnswer { der, max_age: max_age(next_ms, this_ms) })
    }

    /// Sign again, in the background, the cached answers whose half validity comes before the
    /// next look: a question never waits for a signature once its serial has been asked about.
    async fn refresh_due_answers(&self) {
        let service = &self.inner.ocsp;
        let by = now_ms() + RENEWAL_LOOK.as_millis() as i64;
        let due = service.due(by, REFRESH_PER_LOOK);
        if due.is_empty() {
            return;
        }
        let generation = service.generation();
        let serials: Vec<String> = due.iter().map(|(key, _, _)| key.serial.clone()).collect();
        let rows = self
            .read(move |c| serials.iter().map(|s| queries::load_certificate(c, s)).collect::<Result<Vec<_>, _>>())
            .await;
        let rows = match rows {
            Ok(rows) => rows,
            Err(e) => {
                // They stay cached and valid until their nextUpdate; the next look tries again.
                tracing::warn!(error = %e, due = due.len(), "could not read statuses to refresh OCSP answers");
                return;
            }
        };
        for ((key, question, id), row) in due.into_iter().zip(rows) {
            let Some(ca) = service.cas.get(&id) else { continue };
            let (status, shard) = status_from_row(&id, row);
            if self.sign_and_keep(&id, ca, generation, key, question, status, shard).is_err() {
                break;
            }
        }
    }

    /// What the database says of a serial under `ca`, and its CRL shard.
    async fn status_of(&self, ca: &str, serial: &str) -> Result<(Status, i32), EngineError> {
        if serial.len() > 40 {
            return Ok((Status::Unknown, -1));
        }
        let key = serial.to_string();
        let row = self.read(move |c| queries::load_certificate(c, &key)).await?;
        Ok(status_from_row(ca, row))
    }

    /// Keep every OCSP CA's responder certificate current, until the engine stops.
    pub(super) fn renew_ocsp_responders_periodically(&self) {
        if self.inner.ocsp.cas.is_empty() {
            return;
        }
        let engine = self.clone();
        actix_web::rt::spawn(async move {
            let mut tick = tokio::time::interval(RENEWAL_LOOK);
            while !engine.is_shutting_down() {
                tick.tick().await;
                for id in engine.inner.ocsp.cas.keys() {
                    engine.renew_responder_if_due(id).await;
                }
                engine.refresh_due_answers().await;
            }
        });
    }

    async fn renew_responder_if_due(&self, id: &str) {
        let Some(ca) = self.inner.ocsp.cas.get(id) else { return };
        let metrics: &Metrics = &self.inner.metrics;
        let current = ca.responder.load_full();
        if let Some(r) = &current {
            let left = r.not_after.duration_since(SystemTime::now()).unwrap_or_default();
            metrics.ocsp_responder_seconds_left.get_or_create(&crate::metrics::ca(id)).set(left.as_secs() as i64);
        }
        if current.is_some_and(|r| !renewal_due(&r, SystemTime::now())) {
            return;
        }
        match self.issue_responder(ca).await {
            Ok(responder) => {
                let left = responder.not_after.duration_since(SystemTime::now()).unwrap_or_default();
                metrics.ocsp_responder_seconds_left.get_or_create(&crate::metrics::ca(id)).set(left.as_secs() as i64);
                ca.responder.store(Some(Arc::new(responder)));
                *ca.renewal_error.write().unwrap_or_else(|e| e.into_inner()) = None;
                // Answers signed by the previous responder are signed again in the background.
                self.inner.ocsp.refresh_all_of(id);
                tracing::info!(ca = id, expires_in_s = left.as_secs(), "OCSP responder certificate issued");
            }
            Err(e) => {
                metrics.ocsp_renewal_failures.get_or_create(&crate::metrics::ca(id)).inc();
                tracing::warn!(ca = id, error = %e, "could not renew the OCSP responder certificate");
                *ca.renewal_error.write().unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
            }
        }
    }

    /// A new responder key, and its certificate issued by the CA through its cell (background lane).
    async fn issue_responder(&self, ca: &OcspCa) -> Result<Responder, EngineError> {
        let (key, csr_pem) = responder_request(&ca.config.responder_name)?;
        let client = Client {
            name: "castellum-ocsp".into(),
            profiles: std::iter::once(ca.config.responder_profile.clone()).collect(),
            // The responder's name is the operator's (`responder_name`), within its profile.
            names: Default::default(),
        };
        let request =
            IssueRequest { profile: ca.config.responder_profile.clone(), csr_pem, wait: None, idempotency_key: None };
        let issued = self.issue(&client, request).await?;
        let der = openssl::x509::X509::from_pem(issued.certificate.as_bytes())
            .and_then(|c| c.to_der())
            .map_err(|e| EngineError::Internal(format!("responder certificate: {e}")))?;
        Responder::new(key, der)
    }
}

/// A certificate's OCSP status under `ca` (unknown if it is another CA's, or was never finished),
/// and its CRL shard.
fn status_from_row(ca: &str, row: Option<CertificateRow>) -> (Status, i32) {
    match row {
        Some(row) if row.ca_id == ca => {
            let shard = row.crl_shard.unwrap_or(0);
            let status = match row.state {
                CertState::Issued => Status::Good,
                CertState::Revoked => Status::Revoked {
                    at: UNIX_EPOCH + Duration::from_millis(row.revoked_at.unwrap_or(0).max(0) as u64),
                    reason: row
                        .revocation_reason
                        .and_then(RevocationReason::from_code)
                        .unwrap_or(RevocationReason::Unspecified),
                },
                CertState::Signing | CertState::Abandoned => Status::Unknown,
            };
            (status, shard)
        }
        _ => (Status::Unknown, -1),
    }
}
