//! Revocation through the engine's handle: a client revokes its own certificates (with the
//! reasons a subscriber may give), an operator any certificate with any reason, or a whole CA's
//! population (a destroyed CA, as in incident 003). Each revocation is committed, with its audit
//! row and its shard's stale mark, before it is answered; the CRL publisher does the rest.

use super::{normalize_serial, Engine};
use crate::db::models::NewAuditEvent;
use crate::db::revocation::{self, Revocation, RevokeOutcome, Revoker};
use crate::error::EngineError;
use crate::pki::{now_ms, RevocationReason};
use crate::types::{Client, RevocationInfo, RevocationOutcome};

/// Certificates revoked per transaction when a whole CA is revoked: each chunk is one short
/// write, so issuance on other CAs (and the CA's own CRL generation) is never held up long.
const REVOKE_CA_CHUNK: i64 = 500;

/// Between chunks the revocation pauses at least as long as the chunk took (and never less
/// than this): on SQLite, a writer that takes the lock again at once starves the issuance Store,
/// whose busy handler sleeps and retries (measured: issuance on another CA failed with
/// `database unavailable` while back-to-back chunks ran).
const REVOKE_CA_PAUSE: std::time::Duration = std::time::Duration::from_millis(5);

fn outcome(serial: String, stored: RevokeOutcome) -> Result<RevocationOutcome, EngineError> {
    let (revocation, newly_revoked) = match stored {
        RevokeOutcome::Revoked(r) => (r, true),
        RevokeOutcome::AlreadyRevoked(r) => (r, false),
    };
    let reason = RevocationReason::from_code(revocation.reason)
        .ok_or_else(|| EngineError::Internal(format!("stored revocation reason {} is unknown", revocation.reason)))?;
    let revocation =
        RevocationInfo { revoked_at: revocation.at, revoked_at_rfc3339: crate::types::rfc3339(revocation.at), reason };
    Ok(RevocationOutcome { serial, revocation, newly_revoked })
}

impl Engine {
    fn revocation_audit(&self, actor: &str, target: &str, reason: RevocationReason, detail: String) -> NewAuditEvent {
        NewAuditEvent {
            at: now_ms(),
            instance: self.instance_id().to_string(),
            actor: actor.to_string(),
            action: "certificate.revoke".into(),
            target: target.to_string(),
            outcome: reason.as_str().to_string(),
            detail,
        }
    }

    /// A client revokes one of its own certificates. Another client's serial is `404`, as for
    /// `GET`; a reason only the CA may assert is `403`.
    pub async fn revoke(
        &self,
        client: &Client,
        serial: &str,
        reason: RevocationReason,
    ) -> Result<RevocationOutcome, EngineError> {
        let serial = normalize_serial(serial)?;
        if !reason.subscriber_may_give() {
            return Err(EngineError::Forbidden(format!(
                "reason {} is the CA's to assert; a subscriber may give unspecified, keyCompromise, superseded, cessationOfOperation or affiliationChanged",
                reason.as_str()
            )));
        }
        let audit = self.revocation_audit(&client.name, &serial, reason, String::new());
        let (owner, target) = (client.name.clone(), serial.clone());
        let revocation = Revocation { at: audit.at, reason: reason.code() };
        let stored = super::on_pool(self.inner.pools.control.clone(), move |conn| {
            revocation::revoke(conn, &target, Revoker::Owner(&owner), revocation, &audit)
        })
        .await?
        .ok_or(EngineError::NotFound)?;
        self.inner.ocsp.forget(&serial);
        outcome(serial, stored)
    }

    /// An operator revokes any issued certificate, with any reason.
    pub async fn admin_revoke(
        &self,
        actor: &str,
        serial: &str,
        reason: RevocationReason,
    ) -> Result<RevocationOutcome, EngineError> {
        let serial = normalize_serial(serial)?;
        let audit = self.revocation_audit(actor, &serial, reason, String::new());
        let target = serial.clone();
        let revocation = Revocation { at: audit.at, reason: reason.code() };
        let stored = self
            .on_admin_pool(move |conn| revocation::revoke(conn, &target, Revoker::Admin, revocation, &audit))
            .await?
            .ok_or(EngineError::NotFound)?;
        self.inner.ocsp.forget(&serial);
        outcome(serial, stored)
    }

    /// An operator revokes every issued certificate of a CA, a chunk per transaction; returns
    /// how many were revoked. Certificates issued while it runs are revoked too, up to the
    /// moment it finds none left (disable the CA first to stop new ones).
    pub async fn revoke_ca(&self, actor: &str, ca: &str, reason: RevocationReason) -> Result<usize, EngineError> {
        let Some(shards) = self.inner.catalog.cas.get(ca).map(|m| m.crl_shards) else {
            return Err(EngineError::NotFound);
        };
        let at = now_ms();
        let mut total = 0;
        loop {
            let (ca_id, engine, actor) = (ca.to_string(), self.clone(), actor.to_string());
            let started = std::time::Instant::now();
            let revoked = self
                .on_admin_pool(move |conn| {
                    revocation::revoke_chunk_of_ca(
                        conn,
                        &ca_id,
                        shards,
                        Revocation { at, reason: reason.code() },
                        REVOKE_CA_CHUNK,
                        |n| engine.revocation_audit(&actor, &ca_id, reason, format!("{n} certificates of the CA")),
                    )
                })
                .await?;
            if revoked == 0 {
                break;
            }
            total += revoked;
            self.inner.ocsp.forget_ca(ca);
            tracing::info!(ca, revoked = total, "revoking the CA's certificates");
            tokio::time::sleep(started.elapsed().max(REVOKE_CA_PAUSE)).await;
        }
        Ok(total)
    }

    /// The latest CRL of a CA's shard: (CRL number, nextUpdate in ms, DER), from the database,
    /// whichever instance made it.
    pub async fn crl(&self, ca: &str, shard: u32) -> Result<(i64, i64, Vec<u8>), EngineError> {
        let Some(material) = self.inner.catalog.cas.get(ca) else { return Err(EngineError::NotFound) };
        if shard >= material.crl_shards {
            return Err(EngineError::NotFound);
        }
        let ca = ca.to_string();
        self.read(move |conn| revocation::latest_crl(conn, &ca, shard as i32)).await?.ok_or(EngineError::NotFound)
    }

    /// A CA's certificate (DER), for the AIA caIssuers URL.
    pub fn ca_certificate(&self, ca: &str) -> Option<Vec<u8>> {
        self.inner.catalog.cas.get(ca).map(|m| m.cert_der.clone())
    }
}
