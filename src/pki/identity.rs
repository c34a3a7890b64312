//! Disposable identities, the cryptographic part: the subject a client asks for, checked against
//! the profile; the key the engine generates for it; and the signature it makes over a digest.

use openssl::md::{Md, MdRef};
use openssl::pkey::{Id, PKey, Private};
use openssl::pkey_ctx::PkeyCtx;
use openssl::rsa::Padding;
use openssl::sign::RsaPssSaltlen;
use serde::Deserialize;
use zeroize::Zeroizing;

use super::csr::{is_valid_email, SanName};
use super::profile::{ApprovedNames, Profile};
use super::vocabulary::{KeyType, RsaSignatureScheme};
use crate::config::IdentityPolicy;
use crate::error::EngineError;

/// What a client asks an identity's certificate to say about it.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IdentitySubject {
    pub common_name: String,
    #[serde(default)]
    pub email: Option<String>,
    #[serde(default)]
    pub organization: Option<String>,
}

impl IdentitySubject {
    /// A stable fingerprint of what was asked, to recognise an idempotent retry.
    pub fn fingerprint(&self, profile: &str) -> Vec<u8> {
        let mut out = Vec::new();
        for part in [
            profile,
            &self.common_name,
            self.email.as_deref().unwrap_or(""),
            self.organization.as_deref().unwrap_or(""),
        ] {
            out.extend_from_slice(&(part.len() as u64).to_be_bytes());
            out.extend_from_slice(part.as_bytes());
        }
        out
    }
}

fn policy_of(profile: &Profile) -> Result<&IdentityPolicy, EngineError> {
    profile.identity.as_ref().ok_or_else(|| {
        EngineError::PolicyViolation(format!(
            "profile {:?} issues certificates for CSRs, not disposable identities",
            profile.id
        ))
    })
}

/// Check a subject against the profile's identity policy; what it approves is what is issued.
pub fn approve_subject(profile: &Profile, subject: &IdentitySubject) -> Result<ApprovedNames, EngineError> {
    let policy = policy_of(profile)?;
    let refuse = |why: String| Err(EngineError::PolicyViolation(why));
    let cn = subject.common_name.trim();
    if cn.is_empty() || cn.chars().count() > 64 {
        return refuse("subject.common_name must be 1 to 64 characters".into());
    }
    if cn.chars().any(|c| c.is_control() || is_invisible_or_bidi(c)) {
        return refuse("subject.common_name contains control, invisible or bidirectional-override characters".into());
    }
    let organization = match subject.organization.as_deref().map(str::trim) {
        None => None,
        Some(o) if policy.organizations.iter().any(|allowed| allowed == o) => Some(o.to_string()),
        Some(o) => return refuse(format!("organization {o:?} is not allowed by profile {:?}", profile.id)),
    };
    let mut sans = Vec::new();
    if let Some(email) = subject.email.as_deref().map(str::trim) {
        if !profile.names.email {
            return refuse(format!("email addresses are not allowed by profile {:?}", profile.id));
        }
        if !is_valid_email(email) {
            return refuse(format!("{:?} is not a valid email address", email.escape_debug().to_string()));
        }
        let domain = email.rsplit_once('@').map(|(_, d)| d.to_ascii_lowercase()).unwrap_or_default();
        // As for DNS suffixes: the domain itself or any name below it.
        let allowed = policy.email_domains.iter().any(|d| {
            let d = d.trim_start_matches('.').to_ascii_lowercase();
            domain == d || domain.ends_with(&format!(".{d}"))
        });
        let allowed = allowed || policy.email_domains.is_empty();
        if !allowed {
            return refuse(format!("email domain {domain:?} is not allowed by profile {:?}", profile.id));
        }
        sans.push(SanName::Email(email.to_string()));
    }
    Ok(ApprovedNames { common_name: Some(cn.to_string()), organization, sans })
}

/// Characters that change how a name reads without being seen: bidirectional controls and
/// zero-width characters (Unicode format characters a certificate subject has no use for).
fn is_invisible_or_bidi(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{034F}'
            | '\u{061C}'
            | '\u{115F}'..='\u{1160}'
            | '\u{180E}'
            | '\u{200B}'..='\u{200F}'
            | '\u{2028}'..='\u{202E}'
            | '\u{2060}'..='\u{206F}'
            | '\u{3164}'
            | '\u{FE00}'..='\u{FE0F}'
            | '\u{FEFF}'
            | '\u{FFF9}'..='\u{FFFB}'
            | '\u{E0000}'..='\u{E007F}'
    ) || is_private_use(c)
}

fn is_private_use(c: char) -> bool {
    matches!(c, '\u{E000}'..='\u{F8FF}' | '\u{F0000}'..='\u{FFFFD}' | '\u{100000}'..='\u{10FFFD}')
}

/// The hash a client computed over its document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DigestAlgorithm {
    Sha256,
    Sha384,
    Sha512,
}

impl DigestAlgorithm {
    /// `sha256`, `SHA-256`, … ; anything else is refused.
    pub fn parse(name: &str) -> Result<DigestAlgorithm, EngineError> {
        match name.to_ascii_lowercase().replace('-', "").as_str() {
            "sha256" => Ok(DigestAlgorithm::Sha256),
            "sha384" => Ok(DigestAlgorithm::Sha384),
            "sha512" => Ok(DigestAlgorithm::Sha512),
            _ => Err(EngineError::BadDigest(format!(
                "digest_algorithm {:?} is not supported (sha256, sha384, sha512)",
                name.chars().take(32).collect::<String>()
            ))),
        }
    }

    pub fn digest_len(self) -> usize {
        match self {
            DigestAlgorithm::Sha256 => 32,
            DigestAlgorithm::Sha384 => 48,
            DigestAlgorithm::Sha512 => 64,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DigestAlgorithm::Sha256 => "sha256",
            DigestAlgorithm::Sha384 => "sha384",
            DigestAlgorithm::Sha512 => "sha512",
        }
    }

    fn md(self) -> &'static MdRef {
        match self {
            DigestAlgorithm::Sha256 => Md::sha256(),
            DigestAlgorithm::Sha384 => Md::sha384(),
            DigestAlgorithm::Sha512 => Md::sha512(),
        }
    }

    /// The digest's length is the algorithm's.
    pub fn check(self, digest: &[u8]) -> Result<(), EngineError> {
        if digest.len() != self.digest_len() {
            return Err(EngineError::BadDigest(format!(
                "a {} digest is {} bytes, this one is {}",
                self.name(),
                self.digest_len(),
                digest.len()
            )));
        }
        Ok(())
    }
}

/// How an identity signs, fixed when it is created and stored with it (a later change to the
/// profile does not change the scheme of identities that exist).
pub fn signature_scheme(key_type: KeyType, rsa: RsaSignatureScheme) -> &'static str {
    match key_type {
        KeyType::Ed25519 => "ed25519",
        KeyType::Rsa if rsa == RsaSignatureScheme::Pss => "rsa-pss",
        KeyType::Rsa => "rsa-pkcs1",
        _ => "ecdsa",
    }
}

/// The signature algorithm as the API reports it: `ecdsa-sha256`, `rsa-pss-sha512`, `ed25519`, …
pub fn signature_algorithm(scheme: &str, digest: DigestAlgorithm) -> String {
    match scheme {
        "ed25519" => scheme.to_string(),
        _ => format!("{scheme}-{}", digest.name()),
    }
}

/// A freshly generated key: its public half for the certificate, its private half (wiped when
/// dropped) ready to be sealed. The private half is in the encoding OpenSSL reads back fastest —
/// SEC1 `ECPrivateKey` DER, PKCS#1 `RSAPrivateKey` DER, the raw 32-byte Ed25519 key — because
/// PKCS#8 goes through OpenSSL 3's decoder search (333 µs against 10 µs for SEC1, measured by
/// `cargo bench --bench pki -- identity`), and the vault reads one back for every signature.
pub struct GeneratedKey {
    pub spki_der: Vec<u8>,
    pub private: Zeroizing<Vec<u8>>,
    pub bits: u32,
}

/// Generate a key of `key_type` (`rsa_bits` for RSA). CPU work: never on an event loop, never
/// on a CA's signer threads.
pub fn generate_key(key_type: KeyType, rsa_bits: u32) -> Result<GeneratedKey, openssl::error::ErrorStack> {
    use openssl::ec::{EcGroup, EcKey};
    use openssl::nid::Nid;
    let ec = |curve: Nid| -> Result<(PKey<Private>, Zeroizing<Vec<u8>>), openssl::error::ErrorStack> {
        let group = EcGroup::from_curve_name(curve)?;
        let key = EcKey::generate(&group)?;
        let private = Zeroizing::new(key.private_key_to_der()?);
        Ok((PKey::from_ec_key(key)?, private))
    };
    let (key, private) = match key_type {
        KeyType::EcdsaP256 => ec(Nid::X9_62_PRIME256V1)?,
        KeyType::EcdsaP384 => ec(Nid::SECP384R1)?,
        KeyType::EcdsaP521 => ec(Nid::SECP521R1)?,
        KeyType::Ed25519 => {
            let key = PKey::generate_ed25519()?;
            let private = Zeroizing::new(key.raw_private_key()?);
            (key, private)
        }
        KeyType::Rsa => {
            let rsa = openssl::rsa::Rsa::generate(rsa_bits)?;
            let private = Zeroizing::new(rsa.private_key_to_der()?);
            (PKey::from_rsa(rsa)?, private)
        }
    };
    Ok(GeneratedKey { spki_der: key.public_key_to_der()?, private, bits: key.bits() })
}

/// Read back a private key in [`GeneratedKey::private`]'s encoding.
pub fn private_key(key_type: KeyType, private: &[u8]) -> Result<PKey<Private>, openssl::error::ErrorStack> {
    match key_type {
        KeyType::Ed25519 => PKey::private_key_from_raw_bytes(private, Id::ED25519),
        KeyType::Rsa => PKey::from_rsa(openssl::rsa::Rsa::private_key_from_der(private)?),
        _ => PKey::from_ec_key(openssl::ec::EcKey::private_key_from_der(private)?),
    }
}

/// A key generated ahead of need and sealed under the KEK for the identity id it will carry
/// (the id is the seal's additional data, so it is chosen with the key).
pub struct SealedKey {
    pub id: String,
    pub key_type: KeyType,
    pub bits: u32,
    pub spki_der: Vec<u8>,
    pub sealed: Vec<u8>,
    pub kek_id: String,
}

/// Generate a key and seal it for a new identity id.
pub fn generate_sealed(key_type: KeyType, rsa_bits: u32, kek: &super::kek::Kek) -> Result<SealedKey, EngineError> {
    let key =
        generate_key(key_type, rsa_bits).map_err(|e| EngineError::Internal(format!("identity key generation: {e}")))?;
    let id = uuid::Uuid::now_v7().to_string();
    let sealed = kek.seal(&id, &key.private).map_err(|e| EngineError::Internal(e.to_string()))?;
    Ok(SealedKey { id, key_type, bits: key.bits, spki_der: key.spki_der, sealed, kek_id: kek.id().to_string() })
}

/// An identity on its way to existence: it travels with its job through the CA's cell and is
/// stored with its certificate, in the same transaction.
pub struct IdentityDraft {
    pub key: SealedKey,
    /// [`signature_scheme`], stored with the identity.
    pub signature_scheme: &'static str,
    /// What the client asked for ([`IdentitySubject::fingerprint`]), for idempotent retries.
    pub fingerprint: Vec<u8>,
    pub max_uses: u32,
    pub created_at: i64,
    /// Creation plus the profile's lifetime (the certificate's notAfter may come sooner).
    pub expires_at: i64,
}

/// Sign `digest` with an identity's key (opened just for this). ECDSA and RSA sign
/// the digest as computed by the client; Ed25519 (PureEdDSA, RFC 8032) signs the digest bytes as
/// its message. The key is freed (and cleansed by OpenSSL) on return.
pub fn sign_digest(
    key_type: KeyType,
    private: &[u8],
    scheme: &str,
    algorithm: DigestAlgorithm,
    digest: &[u8],
) -> Result<Vec<u8>, EngineError> {
    let fail = |e: openssl::error::ErrorStack| EngineError::Internal(format!("identity signature: {e}"));
    algorithm.check(digest)?;
    let key = private_key(key_type, private).map_err(fail)?;
    let mismatch =
        || EngineError::Internal(format!("signature scheme {scheme:?} does not fit a {} key", key_type.as_str()));
    match (key.id(), scheme) {
        (Id::ED25519, "ed25519") => {
            let mut signer = openssl::sign::Signer::new_without_digest(&key).map_err(fail)?;
            return signer.sign_oneshot_to_vec(digest).map_err(fail);
        }
        (Id::EC, "ecdsa") | (Id::RSA, "rsa-pkcs1") | (Id::RSA, "rsa-pss") => {}
        _ => return Err(mismatch()),
    }
    let mut ctx = PkeyCtx::new(&key).map_err(fail)?;
    ctx.sign_init().map_err(fail)?;
    match scheme {
        "rsa-pss" => {
            ctx.set_rsa_padding(Padding::PKCS1_PSS).map_err(fail)?;
            ctx.set_rsa_pss_saltlen(RsaPssSaltlen::DIGEST_LENGTH).map_err(fail)?;
        }
        "rsa-pkcs1" => ctx.set_rsa_padding(Padding::PKCS1).map_err(fail)?,
        _ => {}
    }
    ctx.set_signature_md(algorithm.md()).map_err(fail)?;
    let mut signature = Vec::new();
    ctx.sign_to_vec(digest, &mut signature).map_err(fail)?;
    Ok(signature)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_type_signs_a_digest_that_verifies() {
        let digest = openssl::sha::sha256(b"a document");
        for (kind, scheme) in [
            (KeyType::EcdsaP256, RsaSignatureScheme::Pkcs1),
            (KeyType::EcdsaP384, RsaSignatureScheme::Pkcs1),
            (KeyType::Ed25519, RsaSignatureScheme::Pkcs1),
            (KeyType::Rsa, RsaSignatureScheme::Pkcs1),
            (KeyType::Rsa, RsaSignatureScheme::Pss),
        ] {
            let key = generate_key(kind, 2048).unwrap();
            let sig = sign_digest(kind, &key.private, signature_scheme(kind, scheme), DigestAlgorithm::Sha256, &digest)
                .unwrap();
            let public = PKey::public_key_from_der(&key.spki_der).unwrap();
            let ok = if kind == KeyType::Ed25519 {
                openssl::sign::Verifier::new_without_digest(&public).unwrap().verify_oneshot(&sig, &digest).unwrap()
            } else {
                let mut v = openssl::sign::Verifier::new(openssl::hash::MessageDigest::sha256(), &public).unwrap();
                if scheme == RsaSignatureScheme::Pss {
                    v.set_rsa_padding(Padding::PKCS1_PSS).unwrap();
                    v.set_rsa_pss_saltlen(RsaPssSaltlen::DIGEST_LENGTH).unwrap();
                }
                v.update(b"a document").unwrap();
                v.verify(&sig).unwrap()
            };
            assert!(ok, "{kind:?} {scheme:?}");
        }
    }

    #[test]
    fn digest_length_and_algorithm_are_checked() {
        assert!(DigestAlgorithm::parse("SHA-256").is_ok());
        assert!(matches!(DigestAlgorithm::parse("md5"), Err(EngineError::BadDigest(_))));
        assert!(matches!(DigestAlgorithm::Sha384.check(&[0u8; 32]), Err(EngineError::BadDigest(_))));
    }

    #[test]
    fn invisible_and_bidi_characters_are_refused_in_names() {
        assert!(is_invisible_or_bidi('\u{202E}'));
        assert!(is_invisible_or_bidi('\u{200B}'));
        assert!(is_invisible_or_bidi('\u{E0041}'));
        assert!(is_invisible_or_bidi('\u{2028}'));
        assert!(!is_invisible_or_bidi('é'));
    }
}
