//! A CA's material: its certificate, the chain above it, and its private key, loaded and
//! cross-checked (key matches certificate, chain verifies, it is a CA).

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use openssl::pkey::Id;
use openssl::stack::Stack;
use openssl::x509::store::X509StoreBuilder;
use openssl::x509::{X509StoreContext, X509};

use super::key::KeyHandle;
use super::load_error::{CaFile, CaLoadError};
use super::vocabulary::KeyType;
use super::vocabulary::SignatureAlgorithm;
use crate::config::{CaConfig, Mode};

/// The organisation name every dev PKI certificate carries; a chain ending in it is a dev chain.
pub const DEV_PKI_ORGANIZATION: &str = "castellum development PKI - NOT FOR PRODUCTION";

/// One CA's certificate, chain and key, checked.
pub struct CaMaterial {
    pub id: String,
    pub cert: X509,
    pub cert_der: Vec<u8>,
    /// Certificates above this CA, nearest first.
    pub chain: Vec<X509>,
    /// The private key, behind a handle that can lose it (see [`super::key`]).
    pub key: KeyHandle,
    /// Why the key could not be loaded at start-up, if it could not.
    pub key_error: Option<CaLoadError>,
    pub key_type: KeyType,
    pub signature_algorithm: SignatureAlgorithm,
    /// DER of the CA certificate's subject: the issuer of everything it signs.
    pub subject_der: Vec<u8>,
    pub subject_key_id: Vec<u8>,
    pub not_after: SystemTime,
    /// The chain ends in the development root.
    pub is_dev: bool,
    /// PEM of this CA's certificate followed by the chain (what clients get as `chain`).
    pub chain_pem: super::chain::Chain,
    /// Where relying parties reach this CA's CRLs and certificate (`CaConfig::base_url`).
    pub base_url: Option<String>,
    pub crl_shards: u32,
    /// This CA answers OCSP (at `{base_url}/ocsp`).
    pub ocsp: bool,
    /// What every TBS this CA builds has in common, made at its first certificate
    /// (`tbs::prepare`).
    pub tbs_parts: std::sync::OnceLock<CaTbsParts>,
}

/// The parts of a TBS that depend on the CA alone: parsed and encoded once instead of for every
/// certificate (~19,000 instructions an issuance, docs/PERFORMANCE.md).
pub struct CaTbsParts {
    /// Not a CA: the same in every certificate castellum issues.
    pub basic_constraints: x509_cert::ext::Extension,
    pub issuer: x509_cert::name::Name,
    pub signature: x509_cert::spki::AlgorithmIdentifierOwned,
    pub authority_key_id: x509_cert::ext::Extension,
    /// The CRL distribution point of each shard (by shard number), and the authority
    /// information access; both absent when the CA has no `base_url`.
    pub crl_distribution_points: Vec<x509_cert::ext::Extension>,
    pub authority_info_access: Option<x509_cert::ext::Extension>,
}

impl CaMaterial {
    /// The URL of a CRL shard: in the certificates on it, and in its Issuing Distribution Point.
    pub fn crl_url(&self, shard: u32) -> Option<String> {
        self.base_url.as_ref().map(|base| format!("{base}/crl/{}/{shard}.crl", self.id))
    }

    /// The URL of this CA's OCSP responder (AIA ocsp), when it answers OCSP.
    pub fn ocsp_url(&self) -> Option<String> {
        self.base_url.as_ref().filter(|_| self.ocsp).map(|base| format!("{base}/ocsp"))
    }

    /// The URL of this CA's certificate (AIA caIssuers).
    pub fn ca_issuers_url(&self) -> Option<String> {
        self.base_url.as_ref().map(|base| format!("{base}/ca/{}.der", self.id))
    }
}

impl std::fmt::Debug for CaMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaMaterial").field("id", &self.id).field("key_type", &self.key_type).finish()
    }
}

fn load_certs(file: CaFile, path: &Path) -> Result<Vec<X509>, CaLoadError> {
    let pem = std::fs::read(path).map_err(|e| CaLoadError::Read {
        file,
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    let no_pem = || CaLoadError::Invalid { file, reason: format!("{} holds no PEM certificate", path.display()) };
    match X509::stack_from_pem(&pem) {
        Ok(certs) if !certs.is_empty() => Ok(certs),
        _ => Err(no_pem()),
    }
}

/// An error in the CA certificate itself.
fn invalid_cert(reason: impl ToString) -> CaLoadError {
    CaLoadError::Invalid { file: CaFile::Cert, reason: reason.to_string() }
}

pub fn key_type_of(key: &openssl::pkey::PKeyRef<impl openssl::pkey::HasPublic>) -> Option<KeyType> {
    use openssl::nid::Nid;
    match key.id() {
        Id::EC => {
            let ec = key.ec_key().ok()?;
            match ec.group().curve_name()? {
                Nid::X9_62_PRIME256V1 => Some(KeyType::EcdsaP256),
                Nid::SECP384R1 => Some(KeyType::EcdsaP384),
                Nid::SECP521R1 => Some(KeyType::EcdsaP521),
                _ => None,
            }
        }
        Id::RSA => Some(KeyType::Rsa),
        Id::ED25519 => Some(KeyType::Ed25519),
        _ => None,
    }
}

fn asn1_to_system_time(t: &openssl::asn1::Asn1TimeRef) -> Result<SystemTime, CaLoadError> {
    let epoch = openssl::asn1::Asn1Time::from_unix(0).map_err(invalid_cert)?;
    let diff = epoch.diff(t).map_err(invalid_cert)?;
    let secs = i64::from(diff.days) * 86_400 + i64::from(diff.secs);
    Ok(UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64))
}

impl CaMaterial {
    pub fn load(cfg: &CaConfig) -> Result<CaMaterial, CaLoadError> {
        let cert = load_certs(CaFile::Cert, &cfg.cert_file)?.remove(0);
        let mut chain = Vec::new();
        for f in &cfg.chain_files {
            chain.extend(load_certs(CaFile::Chain, f)?);
        }
        let public = cert.public_key().map_err(invalid_cert)?;
        let key_type = key_type_of(&public).ok_or_else(|| invalid_cert("unsupported CA key type"))?;
        let signature_algorithm = SignatureAlgorithm::for_key(key_type, cfg.rsa_signature);
        let (key, key_error) = KeyHandle::load(cfg, public, signature_algorithm);
        verify_chain(&cert, &chain)?;
        let is_ca = {
            let der = cert.to_der().map_err(invalid_cert)?;
            let (_, parsed) = x509_parser::parse_x509_certificate(&der)
                .map_err(|e| invalid_cert(format!("CA certificate does not parse: {e}")))?;
            parsed.is_ca()
        };
        if !is_ca {
            return Err(invalid_cert("the certificate is not a CA certificate (basicConstraints)"));
        }
        let subject_key_id = cert
            .subject_key_id()
            .map(|s| s.as_slice().to_vec())
            .ok_or_else(|| invalid_cert("the CA certificate has no subjectKeyIdentifier"))?;
        let subject_der = cert.subject_name().to_der().map_err(invalid_cert)?;
        let not_after = asn1_to_system_time(cert.not_after())?;
        let is_dev = std::iter::once(&cert).chain(chain.iter()).any(is_dev_cert);
        let cert_der = cert.to_der().map_err(invalid_cert)?;
        let mut chain_pem = vec![super::cert_pem(&cert_der)];
        for c in &chain {
            chain_pem.push(super::cert_pem(&c.to_der().map_err(invalid_cert)?));
        }
        Ok(CaMaterial {
            id: cfg.id.clone(),
            cert,
            cert_der,
            chain,
            key,
            key_error,
            key_type,
            signature_algorithm,
            subject_der,
            subject_key_id,
            not_after,
            is_dev,
            chain_pem: super::chain::Chain::new(chain_pem),
            base_url: cfg.base_url.clone(),
            crl_shards: cfg.crl_shards.max(1),
            ocsp: cfg.ocsp.is_some(),
            tbs_parts: std::sync::OnceLock::new(),
        })
    }
}

fn is_dev_cert(cert: &X509) -> bool {
    cert.subject_name()
        .entries_by_nid(openssl::nid::Nid::ORGANIZATIONNAME)
        .any(|e| e.data().as_slice() == DEV_PKI_ORGANIZATION.as_bytes())
}

/// The CA certificate must chain to the last certificate of `chain` (the root).
fn verify_chain(cert: &X509, chain: &[X509]) -> Result<(), CaLoadError> {
    let err = |e: openssl::error::ErrorStack| CaLoadError::Invalid { file: CaFile::Chain, reason: e.to_string() };
    let root = chain.last().unwrap_or(cert);
    let mut store = X509StoreBuilder::new().map_err(err)?;
    store.add_cert(root.clone()).map_err(err)?;
    let store = store.build();
    let mut untrusted = Stack::new().map_err(err)?;
    for c in chain.iter().take(chain.len().saturating_sub(1)) {
        untrusted.push(c.clone()).map_err(err)?;
    }
    let mut ctx = X509StoreContext::new().map_err(err)?;
    let ok = ctx
        .init(&store, cert, &untrusted, |c| {
            let ok = c.verify_cert()?;
            Ok(if ok { None } else { Some(c.error().error_string().to_string()) })
        })
        .map_err(err)?;
    match ok {
        None => Ok(()),
        Some(reason) => {
            Err(CaLoadError::Invalid { file: CaFile::Chain, reason: format!("the CA chain does not verify: {reason}") })
        }
    }
}

/// Whether this CA's material may be used in `mode`.
pub fn allowed_in_mode(material: &CaMaterial, mode: Mode) -> bool {
    mode == Mode::Dev || !material.is_dev
}
