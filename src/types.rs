//! The types an embedding application exchanges with the engine.

use std::time::Duration;

use serde::Serialize;
use utoipa::ToSchema;

use crate::error::EngineError;
use crate::states::{CertState, IdentityState, RequestState};

/// A time in milliseconds since the Unix epoch as RFC 3339 text (UTC, milliseconds): every time
/// in an answer is given both ways, a number for programs and a date for people.
pub fn rfc3339(ms: i64) -> String {
    let at = std::time::UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_millis(at).to_string()
}

pub use crate::pki::chain::Chain;

/// A client of the engine (an API key holder), as configured.
#[derive(Debug, Clone)]
pub struct Client {
    pub name: String,
    pub profiles: std::collections::HashSet<String>,
    /// The names it may request, within its profiles' policies.
    pub names: crate::pki::names::ClientNames,
}

/// A request to issue a certificate from a CSR.
#[derive(Debug, Clone, Default)]
pub struct IssueRequest {
    pub profile: String,
    /// PEM `CERTIFICATE REQUEST`.
    pub csr_pem: String,
    /// The client's own wait limit (`Prefer: wait=N`); only ever shortens the lane's deadline.
    pub wait: Option<Duration>,
    /// Per-client idempotency key: a retry with the same key never issues twice.
    pub idempotency_key: Option<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq, ToSchema)]
pub struct IssuedCertificate {
    /// Lower-case hex of the serial number (40 digits).
    pub serial: String,
    pub ca: String,
    pub profile: String,
    /// PEM of the certificate.
    pub certificate: String,
    /// PEM of the issuing CA's certificate and the certificates above it, nearest first.
    #[schema(value_type = Vec<String>)]
    pub chain: Chain,
    /// Milliseconds since the Unix epoch (and the same as RFC 3339 text, UTC, in `*_rfc3339`).
    pub not_before: i64,
    pub not_before_rfc3339: String,
    pub not_after: i64,
    pub not_after_rfc3339: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

/// An asynchronous request was stored; poll it at `/v1/requests/{id}`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, ToSchema)]
pub struct Accepted {
    pub request_id: String,
    /// The Idempotency-Key matched an earlier request: this is that request.
    pub replayed: bool,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct RequestStatus {
    pub id: String,
    pub state: RequestState,
    pub profile: String,
    pub ca: String,
    pub created_at: i64,
    pub created_at_rfc3339: String,
    pub updated_at: i64,
    pub updated_at_rfc3339: String,
    pub expires_at: i64,
    pub expires_at_rfc3339: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub certificate: Option<IssuedCertificate>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<RecordedError>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct RecordedError {
    #[serde(rename = "type")]
    pub problem_type: String,
    pub detail: String,
}

impl From<&EngineError> for RecordedError {
    fn from(e: &EngineError) -> Self {
        RecordedError { problem_type: e.problem_type(), detail: e.to_string() }
    }
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CertificateRecord {
    pub serial: String,
    pub ca: String,
    pub profile: String,
    pub state: CertState,
    pub certificate: String,
    #[schema(value_type = Vec<String>)]
    pub chain: Chain,
    pub not_before: i64,
    pub not_before_rfc3339: String,
    pub not_after: i64,
    pub not_after_rfc3339: String,
    pub issued_at: Option<i64>,
    pub issued_at_rfc3339: Option<String>,
    /// Set once the certificate is revoked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revocation: Option<RevocationInfo>,
}

/// When and why a certificate was revoked (the first revocation stands).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct RevocationInfo {
    pub revoked_at: i64,
    pub revoked_at_rfc3339: String,
    pub reason: crate::pki::RevocationReason,
}

/// The answer to a revocation: the certificate's revocation, and whether this call made it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct RevocationOutcome {
    pub serial: String,
    #[serde(flatten)]
    pub revocation: RevocationInfo,
    /// False when it was already revoked: the first time and reason stand, nothing was written.
    pub newly_revoked: bool,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CaInfo {
    pub id: String,
    pub state: String,
    pub key_type: String,
    pub not_after: i64,
    pub not_after_rfc3339: String,
    #[schema(value_type = Vec<String>)]
    pub chain: Chain,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Readiness {
    pub ready: bool,
    pub database: String,
    pub registry_version: i64,
    pub cas_serving: usize,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<String>,
    /// Trouble that does not make the instance unready but explains errors (a saturated pool).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    pub pools: Vec<PoolReadiness>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PoolReadiness {
    pub name: &'static str,
    pub in_use: u32,
    pub max: u32,
    /// Since the previous readiness check.
    pub checkout_timeouts: u64,
    pub refused: u64,
}

/// A request for a disposable identity: the engine generates the key and issues its certificate.
#[derive(Debug, Clone)]
pub struct CreateIdentity {
    pub profile: String,
    pub subject: crate::pki::identity::IdentitySubject,
    /// As for [`IssueRequest::wait`].
    pub wait: Option<Duration>,
    pub idempotency_key: Option<String>,
}

/// A disposable identity as its client sees it. The private key never leaves the engine.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, ToSchema)]
pub struct Identity {
    pub id: String,
    pub profile: String,
    pub ca: String,
    /// `active`, or `destroyed` once its key is gone (last use, expiry).
    pub state: IdentityState,
    pub key_type: String,
    pub serial: String,
    /// PEM of the identity's certificate.
    pub certificate: String,
    /// PEM of the issuing CA's certificate and the certificates above it, nearest first.
    #[schema(value_type = Vec<String>)]
    pub chain: Chain,
    /// Milliseconds since the Unix epoch (and as RFC 3339 text, UTC).
    pub created_at: i64,
    pub created_at_rfc3339: String,
    pub expires_at: i64,
    pub expires_at_rfc3339: String,
    pub max_uses: i64,
    pub remaining_uses: i64,
}

/// A digest to sign with an identity's key.
#[derive(Clone)]
pub struct SignDigestRequest {
    /// The digest, base64 (standard alphabet), as the HTTP API takes it.
    pub digest: String,
    /// `sha256`, `sha384` or `sha512`: the hash that produced `digest`.
    pub digest_algorithm: String,
}

impl std::fmt::Debug for SignDigestRequest {
    // A digest stands for a document: it has no business in a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignDigestRequest").field("digest_algorithm", &self.digest_algorithm).finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq, ToSchema)]
pub struct IdentitySignature {
    pub identity: String,
    /// The signature (DER ECDSA-Sig-Value for ECDSA; raw for RSA and Ed25519), base64.
    #[serde(serialize_with = "base64_bytes")]
    #[schema(value_type = String, content_encoding = "base64")]
    pub signature: Vec<u8>,
    /// `ecdsa-sha256`, `rsa-pkcs1-sha256`, `rsa-pss-sha256`, `ed25519`, …
    pub signature_algorithm: String,
    pub remaining_uses: i64,
    /// `destroyed` when this was the identity's last signature.
    pub state: IdentityState,
}

fn base64_bytes<S: serde::Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
    use base64::Engine as _;
    s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
}
