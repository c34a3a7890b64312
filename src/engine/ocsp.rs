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
//! - **Answers.** Signed once and cached (per serial), so answering a known question costs no
//!   signature, no database read and no write; signed again once half their validity has passed,
//!   never valid past their responder. A revocation here evicts its serial at once; one made by
//!   another instance evicts its shard's answers when the CRL publisher sees the shard's
//!   revision move (within `crl.delay` / 4).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix_web::web::Bytes;
use arc_swap::ArcSwapOption;

use super::Engine;
use crate::config::OcspConfig;
use crate::db::models::CrlShardRow;
use crate::db::queries;
use crate::error::EngineError;
use crate::metrics::Metrics;
use crate::pki::ocsp::{read_request, sign_answer, IssuerHashes, Responder, Status, Unanswerable};
use crate::pki::{now_ms, CaMaterial, RevocationReason};
use crate::states::CertState;
use crate::types::{Client, IssueRequest};

/// Answers kept at most; beyond this, answers are signed and not kept (a flood of questions about
/// random serials cannot grow memory).
const MAX_CACHED: usize = 200_000;

/// How often each instance looks at its responders.
const RENEWAL_LOOK: Duration = Duration::from_secs(15);

struct OcspCa {
    hashes: IssuerHashes,
    config: OcspConfig,
    responder: ArcSwapOption<Responder>,
    /// The last renewal failure, for readiness and the console.
    renewal_error: RwLock<Option<String>>,
}

struct Cached {
    der: Bytes,
    /// When it is signed again (half its validity).
    refresh_at: i64,
    next_update: i64,
    ca: String,
    shard: i32,
}

/// The OCSP responders and their answers.
pub struct OcspService {
    cas: HashMap<String, OcspCa>,
    cache: RwLock<HashMap<String, Cached>>,
    /// Each shard's revision as last seen (revocations elsewhere move it).
    revisions: RwLock<HashMap<(String, i32), i64>>,
}

/// An answer, and how long a cache in front may keep it.
pub struct OcspAnswer {
    pub der: Bytes,
    pub max_age: Option<Duration>,
}

impl OcspService {
    pub fn new(
        cas: &HashMap<String, Arc<CaMaterial>>,
        config: &[crate::config::CaConfig],
    ) -> Result<Self, EngineError> {
        let mut out = HashMap::new();
        for cfg in config {
            let (Some(ocsp), Some(material)) = (&cfg.ocsp, cas.get(&cfg.id)) else { continue };
            out.insert(
                cfg.id.clone(),
                OcspCa {
                    hashes: IssuerHashes::of(material)?,
                    config: ocsp.clone(),
                    responder: ArcSwapOption::empty(),
                    renewal_error: RwLock::new(None),
                },
            );
        }
        Ok(OcspService { cas: out, cache: RwLock::new(HashMap::new()), revisions: RwLock::new(HashMap::new()) })
    }

    /// A revocation made here: its answer is signed again at the next question.
    pub fn forget(&self, serial: &str) {
        self.cache.write().unwrap_or_else(|e| e.into_inner()).remove(serial);
    }

    /// The CRL publisher's view of the shards: answers on a shard whose revision moved are dropped.
    pub fn shards_seen(&self, rows: &[CrlShardRow]) {
        let mut moved = Vec::new();
        {
            let mut seen = self.revisions.write().unwrap_or_else(|e| e.into_inner());
            for row in rows.iter().filter(|r| self.cas.contains_key(&r.ca_id)) {
                let key = (row.ca_id.clone(), row.shard);
                if seen.insert(key.clone(), row.revision).is_some_and(|before| before != row.revision) {
                    moved.push(key);
                }
            }
        }
        if !moved.is_empty() {
            let mut cache = self.cache.write().unwrap_or_else(|e| e.into_inner());
            cache.retain(|_, c| !moved.iter().any(|(ca, shard)| *ca == c.ca && *shard == c.shard));
        }
    }

    /// Warnings for readiness and the console: responders missing, or past their renewal point.
    pub fn warnings(&self) -> Vec<String> {
        let now = SystemTime::now();
        let mut out = Vec::new();
        for (id, ca) in &self.cas {
            let error = ca.renewal_error.read().unwrap_or_else(|e| e.into_inner()).clone();
            let why = error.map(|e| format!(" (renewal failing: {e})")).unwrap_or_default();
            match ca.responder.load_full() {
                None => out.push(format!("CA {id}: no OCSP responder certificate yet{why}")),
                Some(r) if renewal_due(&r, now) => {
                    let left = r.not_after.duration_since(now).unwrap_or_default().as_secs();
                    out.push(format!("CA {id}: OCSP responder certificate expires in {left} s, not renewed yet{why}"))
                }
                Some(_) => {}
            }
        }
        out.sort();
        out
    }
}

/// Renew once two thirds of the responder's validity have passed.
fn renewal_due(r: &Responder, now: SystemTime) -> bool {
    let life = r.not_after.duration_since(r.not_before).unwrap_or_default();
    now >= r.not_before + life * 2 / 3
}

fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// A P-256 key and a CSR for it naming `name`.
fn responder_request(name: &str) -> Result<(openssl::pkey::PKey<openssl::pkey::Private>, String), EngineError> {
    use openssl::ec::{EcGroup, EcKey};
    use openssl::x509::extension::SubjectAlternativeName;
    use openssl::x509::{X509NameBuilder, X509ReqBuilder};
    let fail = |e: openssl::error::ErrorStack| EngineError::Internal(format!("OCSP responder request: {e}"));
    let group = EcGroup::from_curve_name(openssl::nid::Nid::X9_62_PRIME256V1).map_err(fail)?;
    let key = openssl::pkey::PKey::from_ec_key(EcKey::generate(&group).map_err(fail)?).map_err(fail)?;
    let mut subject = X509NameBuilder::new().map_err(fail)?;
    subject.append_entry_by_text("CN", name).map_err(fail)?;
    let mut req = X509ReqBuilder::new().map_err(fail)?;
    req.set_pubkey(&key).map_err(fail)?;
    req.set_subject_name(&subject.build()).map_err(fail)?;
    let mut extensions = openssl::stack::Stack::new().map_err(fail)?;
    let san = SubjectAlternativeName::new().dns(name).build(&req.x509v3_context(None)).map_err(fail)?;
    extensions.push(san).map_err(fail)?;
    req.add_extensions(&extensions).map_err(fail)?;
    req.sign(&key, openssl::hash::MessageDigest::sha256()).map_err(fail)?;
    let pem = req.build().to_pem().map_err(fail)?;
    Ok((key, String::from_utf8_lossy(&pem).into_owned()))
}

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
        let serial = question.serial_hex();
        let now = now_ms();
        if let Some(hit) = service.cache.read().unwrap_or_else(|e| e.into_inner()).get(&serial) {
            if now < hit.refresh_at && hit.ca == *id {
                return Ok(OcspAnswer { der: hit.der.clone(), max_age: max_age(hit.next_update, now) });
            }
        }
        let responder = ca.responder.load_full().ok_or(Unanswerable::TryLater)?;
        if responder.not_after <= SystemTime::now() {
            return Err(Unanswerable::TryLater);
        }
        let (status, shard) = self.status_of(id, &serial).await.map_err(|_| Unanswerable::TryLater)?;
        let this_update = SystemTime::now();
        let next_update = (this_update + ca.config.response_validity).min(responder.not_after);
        let der = sign_answer(&responder, &question, status, this_update, next_update).map_err(|e| {
            tracing::warn!(ca = %id, error = %e, "could not sign an OCSP answer");
            Unanswerable::TryLater
        })?;
        let der = Bytes::from(der);
        let (this_ms, next_ms) = (unix_ms(this_update), unix_ms(next_update));
        let mut cache = service.cache.write().unwrap_or_else(|e| e.into_inner());
        if cache.len() < MAX_CACHED || cache.contains_key(&serial) {
            let refresh_at = this_ms + (next_ms - this_ms) / 2;
            cache.insert(serial, Cached { der: der.clone(), refresh_at, next_update: next_ms, ca: id.clone(), shard });
        }
        Ok(OcspAnswer { der, max_age: max_age(next_ms, now) })
    }

    /// What the database says of a serial under `ca`, and its CRL shard.
    async fn status_of(&self, ca: &str, serial: &str) -> Result<(Status, i32), EngineError> {
        if serial.len() > 40 {
            return Ok((Status::Unknown, -1));
        }
        let key = serial.to_string();
        let row = self.read(move |c| queries::load_certificate(c, &key)).await?;
        Ok(match row {
            Some(row) if row.ca_id == ca => {
                let shard = row.crl_shard.unwrap_or(0);
                match row.state {
                    CertState::Issued => (Status::Good, shard),
                    CertState::Revoked => (
                        Status::Revoked {
                            at: UNIX_EPOCH + Duration::from_millis(row.revoked_at.unwrap_or(0).max(0) as u64),
                            reason: row
                                .revocation_reason
                                .and_then(RevocationReason::from_code)
                                .unwrap_or(RevocationReason::Unspecified),
                        },
                        shard,
                    ),
                    CertState::Signing | CertState::Abandoned => (Status::Unknown, shard),
                }
            }
            _ => (Status::Unknown, -1),
        })
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
                // Answers signed by the previous responder are signed again at the next question.
                self.inner.ocsp.cache.write().unwrap_or_else(|e| e.into_inner()).retain(|_, c| c.ca != id);
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

fn max_age(next_update: i64, now: i64) -> Option<Duration> {
    (next_update > now).then(|| Duration::from_millis((next_update - now) as u64))
}
