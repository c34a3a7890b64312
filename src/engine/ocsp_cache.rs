//! OCSP's state, apart from the engine's handle (so the engine can hold it without a module
//! circle): each OCSP CA's responder, the cached answers, and the shards' revisions as last seen.
//! What it is for: `engine::ocsp`.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix_web::web::Bytes;
use arc_swap::ArcSwapOption;

use crate::config::OcspConfig;
use crate::db::models::CrlShardRow;
use crate::error::EngineError;
use crate::pki::ocsp::{IssuerHashes, Responder};
use crate::pki::CaMaterial;

/// Answers kept at most; beyond this, answers are signed and not kept (a flood of questions about
/// random serials cannot grow memory).
pub(super) const MAX_CACHED: usize = 200_000;

/// How often each instance looks at its responders.
pub(super) const RENEWAL_LOOK: Duration = Duration::from_secs(15);

pub(super) struct OcspCa {
    pub(super) hashes: IssuerHashes,
    pub(super) config: OcspConfig,
    pub(super) responder: ArcSwapOption<Responder>,
    /// The last renewal failure, for readiness and the console.
    pub(super) renewal_error: RwLock<Option<String>>,
}

pub(super) struct Cached {
    pub(super) der: Bytes,
    /// When it is signed again (half its validity).
    pub(super) refresh_at: i64,
    pub(super) next_update: i64,
    pub(super) ca: String,
    pub(super) shard: i32,
}

/// The OCSP responders and their answers.
pub struct OcspService {
    pub(super) cas: HashMap<String, OcspCa>,
    pub(super) cache: RwLock<HashMap<String, Cached>>,
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
pub(super) fn renewal_due(r: &Responder, now: SystemTime) -> bool {
    let life = r.not_after.duration_since(r.not_before).unwrap_or_default();
    now >= r.not_before + life * 2 / 3
}

pub(super) fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// A P-256 key and a CSR for it naming `name`.
pub(super) fn responder_request(
    name: &str,
) -> Result<(openssl::pkey::PKey<openssl::pkey::Private>, String), EngineError> {
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

pub(super) fn max_age(next_update: i64, now: i64) -> Option<Duration> {
    (next_update > now).then(|| Duration::from_millis((next_update - now) as u64))
}
