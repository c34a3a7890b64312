//! OCSP's state, apart from the engine's handle (so the engine can hold it without a module
//! circle): each OCSP CA's responder, the cached answers, and the shards' revisions as last seen.
//! What it is for: `engine::ocsp`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix_web::web::Bytes;
use arc_swap::ArcSwapOption;

use crate::config::OcspConfig;
use crate::db::models::CrlShardRow;
use crate::error::EngineError;
use crate::pki::ocsp::{IssuerHashes, Question, Responder};
use crate::pki::CaMaterial;

/// Answers kept at most; beyond this, answers are signed and not kept (a flood of questions about
/// random serials cannot grow memory).
const MAX_CACHED: usize = 200_000;

/// How often each instance looks at its responders and at answers nearing half their validity.
pub(super) const RENEWAL_LOOK: Duration = Duration::from_secs(15);

/// Answers signed again per look at most: a responder renewal makes every answer of its CA due at
/// once, and they stay valid (signed by the previous responder) while this paces them.
pub(super) const REFRESH_PER_LOOK: usize = 2_000;

/// What an answer is cached under: the serial and the hash algorithm of the question's CertID (the
/// answer repeats the question's CertID, and a client matches it hash by hash).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct AnswerKey {
    pub(super) serial: String,
    pub(super) sha256: bool,
}

impl AnswerKey {
    pub(super) fn of(question: &Question) -> AnswerKey {
        AnswerKey { serial: question.serial_hex(), sha256: question.uses_sha256() }
    }
}

pub(super) struct OcspCa {
    pub(super) hashes: IssuerHashes,
    pub(super) config: OcspConfig,
    pub(super) responder: ArcSwapOption<Responder>,
    /// The last renewal failure, for readiness and the console.
    pub(super) renewal_error: RwLock<Option<String>>,
}

pub(super) struct Cached {
    pub(super) der: Bytes,
    /// The question it answers, to sign it again.
    pub(super) question: Question,
    /// When it is signed again in the background (half its validity); it is served until
    /// `next_update`, so a database outage does not stop answers that are still valid.
    pub(super) refresh_at: i64,
    pub(super) next_update: i64,
    pub(super) ca: String,
    pub(super) shard: i32,
}

/// The OCSP responders and their answers.
pub struct OcspService {
    pub(super) cas: HashMap<String, OcspCa>,
    cache: RwLock<HashMap<AnswerKey, Cached>>,
    /// Moves on every eviction: an answer signed from a status read before an eviction is not
    /// cached (it may say `good` of a certificate revoked meanwhile).
    evictions: AtomicU64,
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
        Ok(OcspService {
            cas: out,
            cache: RwLock::new(HashMap::new()),
            evictions: AtomicU64::new(0),
            revisions: RwLock::new(HashMap::new()),
        })
    }

    /// A cached answer still valid at `now` (ms).
    pub(super) fn cached(&self, key: &AnswerKey, ca: &str, now: i64) -> Option<OcspAnswer> {
        let cache = self.cache.read().unwrap_or_else(|e| e.into_inner());
        let hit = cache.get(key).filter(|hit| now < hit.next_update && hit.ca == ca)?;
        Some(OcspAnswer { der: hit.der.clone(), max_age: max_age(hit.next_update, now) })
    }

    /// The eviction count, read before a status is: pass it to [`Self::keep`].
    pub(super) fn generation(&self) -> u64 {
        self.evictions.load(Ordering::Acquire)
    }

    /// Cache an answer, unless something was evicted since `generation` was read (its status may
    /// be older than the eviction) or the cache is full of other answers.
    pub(super) fn keep(&self, generation: u64, key: AnswerKey, answer: Cached) {
        let mut cache = self.cache.write().unwrap_or_else(|e| e.into_inner());
        if self.evictions.load(Ordering::Acquire) != generation {
            return;
        }
        if cache.len() < MAX_CACHED || cache.contains_key(&key) {
            cache.insert(key, answer);
        }
    }

    /// Up to `limit` answers to sign again: those whose refresh point is before `by` (ms).
    pub(super) fn due(&self, by: i64, limit: usize) -> Vec<(AnswerKey, Question, String)> {
        let cache = self.cache.read().unwrap_or_else(|e| e.into_inner());
        cache
            .iter()
            .filter(|(_, c)| c.refresh_at <= by)
            .take(limit)
            .map(|(k, c)| (k.clone(), c.question.clone(), c.ca.clone()))
            .collect()
    }

    /// A new responder for `ca`: its answers are signed again in the background (they stay valid
    /// meanwhile: never past the previous responder's expiry).
    pub(super) fn refresh_all_of(&self, ca: &str) {
        let mut cache = self.cache.write().unwrap_or_else(|e| e.into_inner());
        cache.values_mut().filter(|c| c.ca == ca).for_each(|c| c.refresh_at = 0);
    }

    /// How many answers are cached (the console shows it).
    pub fn cached_count(&self) -> usize {
        self.cache.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// A revocation made here: its answers are signed again at the next question.
    pub fn forget(&self, serial: &str) {
        let mut cache = self.cache.write().unwrap_or_else(|e| e.into_inner());
        self.evictions.fetch_add(1, Ordering::AcqRel);
        for sha256 in [false, true] {
            cache.remove(&AnswerKey { serial: serial.to_string(), sha256 });
        }
    }

    /// A whole CA's population revoked here: all its answers go.
    pub fn forget_ca(&self, ca: &str) {
        let mut cache = self.cache.write().unwrap_or_else(|e| e.into_inner());
        self.evictions.fetch_add(1, Ordering::AcqRel);
        cache.retain(|_, c| c.ca != ca);
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
            self.evictions.fetch_add(1, Ordering::AcqRel);
            cache.retain(|_, c| !moved.iter().any(|(ca, shard)| *ca == c.ca && *shard == c.shard));
        }
    }

    /// Each OCSP CA's responder, for the console.
    pub fn responders(&self) -> Vec<ResponderStatus> {
        let mut out: Vec<ResponderStatus> = self
            .cas
            .iter()
            .map(|(id, ca)| {
                let responder = ca.responder.load_full();
                ResponderStatus {
                    ca: id.clone(),
                    expires_at: responder.as_ref().map(|r| unix_ms(r.not_after)),
                    renewal_due_at: responder.as_ref().map(|r| unix_ms(renewal_point(r))),
                    renewal_error: ca.renewal_error.read().unwrap_or_else(|e| e.into_inner()).clone(),
                }
            })
            .collect();
        out.sort_by(|a, b| a.ca.cmp(&b.ca));
        out
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

/// A CA's OCSP responder as the console shows it (times in Unix ms).
#[derive(Debug, Clone, serde::Serialize)]
pub struct ResponderStatus {
    pub ca: String,
    /// None: no responder certificate yet.
    pub expires_at: Option<i64>,
    pub renewal_due_at: Option<i64>,
    /// The last renewal's failure, until one succeeds.
    pub renewal_error: Option<String>,
}

/// Renew once two thirds of the responder's validity have passed.
pub(super) fn renewal_due(r: &Responder, now: SystemTime) -> bool {
    now >= renewal_point(r)
}

fn renewal_point(r: &Responder) -> SystemTime {
    let life = r.not_after.duration_since(r.not_before).unwrap_or_default();
    r.not_before + life * 2 / 3
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
