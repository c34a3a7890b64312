//! Everything cryptographic: loading CA material, checking CSRs against profiles, building the
//! to-be-signed certificate, linting it, and signing it (Boulder's lint-then-sign).

pub mod ca;
pub mod crl;
pub mod csr;
pub mod devpki;
pub mod identity;
pub mod kek;
pub mod key;
pub mod load_error;
pub mod names;
pub mod ocsp;
pub mod profile;
pub mod tbs;
pub mod token;
pub mod vocabulary;

pub use ca::CaMaterial;
pub use csr::CheckedCsr;
pub use load_error::{CaFile, CaLoadError};
pub use profile::Profile;
pub use tbs::{LintedTbs, PreparedCert};
pub use vocabulary::{ExtendedKeyUsageName, KeyType, KeyUsageName, Lane, RevocationReason, RsaSignatureScheme};

/// Milliseconds since the Unix epoch: the one time unit the database and the engine use.
pub fn unix_ms(t: std::time::SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// SHA-256 for a request's hot path (API keys, admin tokens). `openssl::sha::sha256` is the
/// one-shot `SHA256()`, which on OpenSSL 3 fetches the digest from its provider on every call:
/// ~5% of the engine's CPU under a retry storm of refusals. The hasher does not.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let mut hasher = openssl::sha::Sha256::new();
    hasher.update(data);
    hasher.finish()
}

pub fn now_ms() -> i64 {
    unix_ms(std::time::SystemTime::now())
}

/// PEM text for a DER certificate.
pub fn cert_pem(der: &[u8]) -> String {
    der::pem::encode_string("CERTIFICATE", der::pem::LineEnding::LF, der).unwrap_or_default()
}
