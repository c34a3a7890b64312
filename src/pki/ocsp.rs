//! OCSP (RFC 6960, RFC 5019's lightweight profile): reading a request, and signing an answer
//! with a CA's delegated responder (a certificate with `id-kp-OCSPSigning` and
//! `id-pkix-ocsp-nocheck` that castellum issues itself, see `engine::ocsp`).
//!
//! x509-ocsp gives the ASN.1 types; the responder key signs with openssl, as CA keys do.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use const_oid::db::rfc5912::{ID_SHA_1, ID_SHA_256};
use der::asn1::{BitString, GeneralizedTime, OctetString};
use der::{Decode, Encode};
use openssl::pkey::{PKey, Private};
use openssl::sign::Signer;
use x509_cert::serial_number::SerialNumber;
use x509_cert::spki::AlgorithmIdentifierOwned;
use x509_cert::Certificate;
use x509_ocsp::{
    BasicOcspResponse, CertId, CertStatus, OcspGeneralizedTime, OcspRequest, OcspResponse, ResponderId, ResponseData,
    RevokedInfo, SingleResponse,
};

use super::ca::CaMaterial;
use super::crl::crl_reason;
use super::vocabulary::RevocationReason;
use crate::error::EngineError;

/// ecdsa-with-SHA256, no parameters: the responder keys are P-256.
const ECDSA_SHA256: &[u8] = &[0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02];

fn internal(what: &'static str) -> impl Fn(der::Error) -> EngineError {
    move |e| EngineError::Internal(format!("OCSP {what}: {e}"))
}

/// Why a request gets no signed answer; each is an unsigned OCSP status (clients do not read
/// problem details).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Unanswerable {
    /// Not an OCSP request, or not one certificate (RFC 5019 asks for exactly one).
    #[error("malformed request")]
    Malformed,
    /// The issuer is not a CA this engine answers for.
    #[error("unauthorized")]
    Unauthorized,
    /// The CA answers OCSP but has no responder certificate yet (or it expired).
    #[error("try later")]
    TryLater,
}

impl Unanswerable {
    /// The unsigned OCSPResponse that says so.
    pub fn response(self) -> Vec<u8> {
        let response = match self {
            Unanswerable::Malformed => OcspResponse::malformed_request(),
            Unanswerable::Unauthorized => OcspResponse::unauthorized(),
            Unanswerable::TryLater => OcspResponse::try_later(),
        };
        // A two-field SEQUENCE of an enum and nothing else: encoding cannot fail.
        response.to_der().unwrap_or_default()
    }
}

/// The one certificate a request asks about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    pub cert_id: CertId,
}

impl Question {
    /// The serial asked about, as castellum stores serials (lower-case hex).
    pub fn serial_hex(&self) -> String {
        hex::encode(self.cert_id.serial_number.as_bytes())
    }

    /// Whether the question names its issuer by SHA-256 hashes (else SHA-1).
    pub fn uses_sha256(&self) -> bool {
        self.cert_id.hash_algorithm.oid == ID_SHA_256
    }

    /// The question as an OCSP request (DER), unsigned and without a nonce, as RFC 5019 clients
    /// send it.
    pub fn request_der(&self) -> Result<Vec<u8>, EngineError> {
        let request = OcspRequest {
            tbs_request: x509_ocsp::TbsRequest {
                version: Default::default(),
                requestor_name: None,
                request_list: vec![x509_ocsp::Request {
                    req_cert: self.cert_id.clone(),
                    single_request_extensions: None,
                }],
                request_extensions: None,
            },
            optional_signature: None,
        };
        request.to_der().map_err(internal("request"))
    }
}

/// Read an OCSP request (DER): exactly one certificate, SHA-1 or SHA-256 issuer hashes.
pub fn read_request(der: &[u8]) -> Result<Question, Unanswerable> {
    let request = OcspRequest::from_der(der).map_err(|_| Unanswerable::Malformed)?;
    let [one] = request.tbs_request.request_list.as_slice() else { return Err(Unanswerable::Malformed) };
    let algorithm = one.req_cert.hash_algorithm.oid;
    if algorithm != ID_SHA_1 && algorithm != ID_SHA_256 {
        return Err(Unanswerable::Malformed);
    }
    Ok(Question { cert_id: one.req_cert.clone() })
}

/// A CA's name and key hashes, as OCSP requests name their issuer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuerHashes {
    sha1: (Vec<u8>, Vec<u8>),
    sha256: (Vec<u8>, Vec<u8>),
}

impl IssuerHashes {
    pub fn of(ca: &CaMaterial) -> Result<IssuerHashes, EngineError> {
        let cert = Certificate::from_der(&ca.cert_der).map_err(internal("CA certificate"))?;
        let key = cert.tbs_certificate.subject_public_key_info.subject_public_key.raw_bytes();
        Ok(IssuerHashes {
            sha1: (openssl::sha::sha1(&ca.subject_der).to_vec(), openssl::sha::sha1(key).to_vec()),
            sha256: (openssl::sha::sha256(&ca.subject_der).to_vec(), openssl::sha::sha256(key).to_vec()),
        })
    }

    /// A question about `serial` naming this issuer by its SHA-1 hashes (RFC 5019's profile).
    pub fn question(&self, serial: &[u8]) -> Result<Question, EngineError> {
        Ok(Question {
            cert_id: CertId {
                hash_algorithm: AlgorithmIdentifierOwned { oid: ID_SHA_1, parameters: Some(der::asn1::Null.into()) },
                issuer_name_hash: OctetString::new(self.sha1.0.clone()).map_err(internal("name hash"))?,
                issuer_key_hash: OctetString::new(self.sha1.1.clone()).map_err(internal("key hash"))?,
                serial_number: SerialNumber::new(serial).map_err(internal("serial"))?,
            },
        })
    }

    /// Whether the question names this issuer.
    pub fn matches(&self, question: &Question) -> bool {
        let id = &question.cert_id;
        let (name, key) = if id.hash_algorithm.oid == ID_SHA_1 { &self.sha1 } else { &self.sha256 };
        id.issuer_name_hash.as_bytes() == name.as_slice() && id.issuer_key_hash.as_bytes() == key.as_slice()
    }
}

/// A CA's delegated OCSP responder: its key (in memory only, never stored) and certificate.
pub struct Responder {
    key: PKey<Private>,
    /// The certificate as issued (DER), sent in every answer.
    pub cert_der: Vec<u8>,
    cert: Certificate,
    key_hash: Vec<u8>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl std::fmt::Debug for Responder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Responder").field("not_after", &self.not_after).finish()
    }
}

impl Responder {
    /// A responder from its key and the certificate the CA issued for it.
    pub fn new(key: PKey<Private>, cert_der: Vec<u8>) -> Result<Responder, EngineError> {
        let cert = Certificate::from_der(&cert_der).map_err(internal("responder certificate"))?;
        let spki = &cert.tbs_certificate.subject_public_key_info;
        let public = key.public_key_to_der().map_err(|e| EngineError::Internal(e.to_string()))?;
        if spki.to_der().map_err(internal("responder key"))? != public {
            return Err(EngineError::Internal("the responder certificate is not for the responder's key".into()));
        }
        let key_hash = openssl::sha::sha1(spki.subject_public_key.raw_bytes()).to_vec();
        let validity = &cert.tbs_certificate.validity;
        Ok(Responder {
            key,
            not_before: validity.not_before.to_system_time(),
            not_after: validity.not_after.to_system_time(),
            cert_der,
            cert,
            key_hash,
        })
    }
}

/// What an answer says of a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Good,
    Revoked {
        at: SystemTime,
        reason: RevocationReason,
    },
    /// castellum never issued this serial (or never finished issuing it).
    Unknown,
}

fn generalized(t: SystemTime) -> Result<OcspGeneralizedTime, EngineError> {
    // Whole seconds: DER GeneralizedTime carries no fraction here.
    let secs = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    Ok(OcspGeneralizedTime(GeneralizedTime::from_unix_duration(Duration::from_secs(secs)).map_err(internal("time"))?))
}

/// Sign the answer to `question`: a successful OCSPResponse (DER) valid from `this_update` to
/// `next_update`, signed by the responder, carrying its certificate.
pub fn sign_answer(
    responder: &Responder,
    question: &Question,
    status: Status,
    this_update: SystemTime,
    next_update: SystemTime,
) -> Result<Vec<u8>, EngineError> {
    let cert_status = match status {
        Status::Good => CertStatus::good(),
        Status::Unknown => CertStatus::unknown(),
        Status::Revoked { at, reason } => CertStatus::revoked(RevokedInfo {
            revocation_time: generalized(at)?,
            // RFC 5280 and the BRs: no reason code for `unspecified`.
            revocation_reason: (reason != RevocationReason::Unspecified).then(|| crl_reason(reason)),
        }),
    };
    let data = ResponseData {
        version: Default::default(),
        responder_id: ResponderId::ByKey(OctetString::new(responder.key_hash.clone()).map_err(internal("key hash"))?),
        produced_at: generalized(this_update)?,
        responses: vec![SingleResponse {
            cert_id: question.cert_id.clone(),
            cert_status,
            this_update: generalized(this_update)?,
            next_update: Some(generalized(next_update)?),
            single_extensions: None,
        }],
        response_extensions: None,
    };
    let tbs = data.to_der().map_err(internal("response data"))?;
    let signature = (|| -> Result<Vec<u8>, openssl::error::ErrorStack> {
        let mut signer = Signer::new(openssl::hash::MessageDigest::sha256(), &responder.key)?;
        signer.update(&tbs)?;
        signer.sign_to_vec()
    })()
    .map_err(|e| EngineError::Internal(format!("OCSP responder signature: {e}")))?;
    let basic = BasicOcspResponse {
        tbs_response_data: data,
        signature_algorithm: AlgorithmIdentifierOwned::from_der(ECDSA_SHA256).map_err(internal("algorithm"))?,
        signature: BitString::from_bytes(&signature).map_err(internal("signature"))?,
        certs: Some(vec![responder.cert.clone()]),
    };
    OcspResponse::successful(basic).map_err(internal("response"))?.to_der().map_err(internal("response"))
}

/// What a (successful, basic) OCSP response says of its one certificate; None if it is not one.
pub fn answered_status(der: &[u8]) -> Option<&'static str> {
    let response = OcspResponse::from_der(der).ok()?;
    let bytes = response.response_bytes?;
    let basic = BasicOcspResponse::from_der(bytes.response.as_bytes()).ok()?;
    let [single] = basic.tbs_response_data.responses.as_slice() else { return None };
    Some(match single.cert_status {
        CertStatus::Good(_) => "good",
        CertStatus::Revoked(_) => "revoked",
        CertStatus::Unknown(_) => "unknown",
    })
}

/// A question about `serial` under `ca`, as RFC 5019 clients ask it (SHA-1 CertID).
pub fn question_for(ca: &CaMaterial, serial: &[u8]) -> Result<Question, EngineError> {
    IssuerHashes::of(ca)?.question(serial)
}
