//! Everything cryptographic: loading CA material, checking CSRs against profiles, building the
//! to-be-signed certificate, linting it, and signing it (Boulder's lint-then-sign).

pub mod ca;
pub mod chain;
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

/// The SHA digests of the request path (API keys, admin tokens, a CSR's signed data, a new
/// certificate's key identifier and its TBS). `openssl::sha::sha256` and its siblings are the
/// one-shot `SHA256()` …, which on OpenSSL 3 fetch the digest from its provider on every call:
/// ~5% of the engine's CPU under a retry storm of refusals, and three fetches an issuance. The
/// hashers (`SHA256_Init` …) do not.
macro_rules! digests {
    ($($name:ident: $hasher:ident, $len:literal;)*) => {$(
        pub fn $name(data: &[u8]) -> [u8; $len] {
            let mut hasher = openssl::sha::$hasher::new();
            hasher.update(data);
            hasher.finish()
        }
    )*};
}

digests! {
    sha1: Sha1, 20;
    sha256: Sha256, 32;
    sha384: Sha384, 48;
    sha512: Sha512, 64;
}

pub fn now_ms() -> i64 {
    unix_ms(std::time::SystemTime::now())
}

/// PEM text for a DER certificate.
pub fn cert_pem(der: &[u8]) -> String {
    der::pem::encode_string("CERTIFICATE", der::pem::LineEnding::LF, der).unwrap_or_default()
}
