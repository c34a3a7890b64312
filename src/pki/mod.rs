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

/// PEM text for a DER certificate (RFC 7468: lines of 64 characters, LF). Not the der crate's
/// encoder: it is constant-time (base64ct, made for private keys); a certificate is public, and
/// with the base64 crate's encoder an issuance takes 8,000 fewer instructions (0.5%,
/// docs/PERFORMANCE.md).
pub fn cert_pem(der: &[u8]) -> String {
    use base64::Engine as _;
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----\n";
    const END: &str = "-----END CERTIFICATE-----\n";
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::with_capacity(BEGIN.len() + body.len() + body.len() / 64 + 1 + END.len());
    pem.push_str(BEGIN);
    let mut rest = body.as_str();
    while !rest.is_empty() {
        // base64 is ASCII: any byte offset is a character boundary.
        let (line, after) = rest.split_at(rest.len().min(64));
        pem.push_str(line);
        pem.push('\n');
        rest = after;
    }
    pem.push_str(END);
    pem
}

#[cfg(test)]
mod tests {
    /// The same text as the der crate's RFC 7468 encoder, for every length around the line
    /// boundaries (48 bytes make one full line) and a real certificate's (never empty).
    #[test]
    fn cert_pem_is_rfc_7468_pem() {
        for len in (1..200).chain([545, 546, 547, 1024]) {
            let der: Vec<u8> = (0..len).map(|i| (i * 37 + len) as u8).collect();
            let expected = der::pem::encode_string("CERTIFICATE", der::pem::LineEnding::LF, &der).unwrap();
            assert_eq!(super::cert_pem(&der), expected, "{len} bytes");
        }
    }
}
