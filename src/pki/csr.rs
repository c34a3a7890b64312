//! Parsing and checking a PKCS#10 CSR: structure (x509-parser), signature and key (openssl).
//! What comes out is only what the signer needs: the public key and the requested names.

use std::net::IpAddr;

use openssl::ec::EcKey;
use openssl::ecdsa::EcdsaSig;
use openssl::hash::MessageDigest;
use openssl::pkey::{Id, PKey, Public};
use openssl::sign::Verifier;
use openssl::x509::X509Req;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509CertificationRequest};

use super::vocabulary::KeyType;
use crate::error::EngineError;

/// Largest CSR accepted (DER bytes); real CSRs are well under 4 KiB.
const MAX_CSR_DER: usize = 16 * 1024;
const MAX_RSA_BITS: u32 = 8192;

/// A name a certificate can carry in its subjectAltName.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SanName {
    Dns(String),
    Ip(IpAddr),
    Email(String),
}

impl std::fmt::Display for SanName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SanName::Dns(s) | SanName::Email(s) => f.write_str(s),
            SanName::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// A CSR whose structure, signature and key have been checked (not yet against a profile).
#[derive(Debug, Clone)]
pub struct CheckedCsr {
    /// DER of the SubjectPublicKeyInfo, copied as is into the certificate.
    pub spki_der: Vec<u8>,
    pub key_type: KeyType,
    pub key_bits: u32,
    pub common_name: Option<String>,
    /// Names from the extensionRequest's subjectAltName, in order.
    pub names: Vec<SanName>,
    pub der: Vec<u8>,
}

/// Signature algorithms accepted on a CSR; everything else (SHA-1, MD5, unknown) is refused.
fn check_signature_algorithm(oid: &str) -> Result<(), EngineError> {
    const ACCEPTED: &[&str] = &[
        "1.2.840.113549.1.1.11", // sha256WithRSAEncryption
        "1.2.840.113549.1.1.12", // sha384WithRSAEncryption
        "1.2.840.113549.1.1.13", // sha512WithRSAEncryption
        "1.2.840.113549.1.1.10", // RSASSA-PSS
        "1.2.840.10045.4.3.2",   // ecdsa-with-SHA256
        "1.2.840.10045.4.3.3",   // ecdsa-with-SHA384
        "1.2.840.10045.4.3.4",   // ecdsa-with-SHA512
        "1.3.101.112",           // Ed25519
    ];
    const WEAK: &[(&str, &str)] = &[
        ("1.2.840.113549.1.1.4", "md5WithRSAEncryption"),
        ("1.2.840.113549.1.1.5", "sha1WithRSAEncryption"),
        ("1.2.840.10045.4.1", "ecdsa-with-SHA1"),
        ("1.2.840.10040.4.3", "dsa-with-sha1"),
        ("1.3.14.3.2.29", "sha1WithRSASignature"),
    ];
    if ACCEPTED.contains(&oid) {
        return Ok(());
    }
    match WEAK.iter().find(|(o, _)| *o == oid) {
        Some((_, name)) => Err(EngineError::WeakSignatureAlgorithm(format!("{name} is not accepted"))),
        None => Err(EngineError::WeakSignatureAlgorithm(format!("signature algorithm {oid} is not supported"))),
    }
}

/// PEM (`CERTIFICATE REQUEST`) to DER: exactly one PEM block, with nothing but whitespace
/// around it (text before it, trailing garbage or a second CSR after it are refused, not
/// ignored).
pub fn pem_to_der(pem: &str) -> Result<Vec<u8>, EngineError> {
    let text = pem.trim();
    if !text.starts_with("-----BEGIN ") {
        return Err(EngineError::MalformedCsr(
            "not a PEM-encoded CSR: it must start with -----BEGIN CERTIFICATE REQUEST-----".into(),
        ));
    }
    let (rest, parsed) = x509_parser::pem::parse_x509_pem(text.as_bytes())
        .map_err(|_| EngineError::MalformedCsr("not a PEM-encoded CSR".into()))?;
    if !rest.iter().all(u8::is_ascii_whitespace) {
        return Err(EngineError::MalformedCsr(
            "text after the PEM block: send exactly one CERTIFICATE REQUEST per request".into(),
        ));
    }
    // The parser reads its boundary lines loosely (text after a marker, an END label that is not
    // the BEGIN one): they must be exactly the encapsulation boundaries of RFC 7468.
    let (begin, end) = (format!("-----BEGIN {}-----", parsed.label), format!("-----END {}-----", parsed.label));
    let mut lines = text.lines().map(str::trim_end);
    if lines.next() != Some(begin.as_str()) || lines.next_back() != Some(end.as_str()) {
        return Err(EngineError::MalformedCsr(format!("the PEM block must be framed by {begin} and {end}")));
    }
    if parsed.label != "CERTIFICATE REQUEST" && parsed.label != "NEW CERTIFICATE REQUEST" {
        return Err(EngineError::MalformedCsr(format!(
            "PEM label is {:?}, expected CERTIFICATE REQUEST",
            parsed.label
        )));
    }
    Ok(parsed.contents)
}

/// Check a PEM CSR: structure, signature algorithm, key, signature, and requested names.
pub fn check_csr_pem(pem: &str) -> Result<CheckedCsr, EngineError> {
    check_csr_der(pem_to_der(pem)?)
}

pub fn check_csr_der(der: Vec<u8>) -> Result<CheckedCsr, EngineError> {
    if der.len() > MAX_CSR_DER {
        return Err(EngineError::MalformedCsr("CSR is too large".into()));
    }
    let (rest, csr) = X509CertificationRequest::from_der(&der)
        .map_err(|e| EngineError::MalformedCsr(format!("DER does not parse as PKCS#10: {e}")))?;
    if !rest.is_empty() {
        return Err(EngineError::MalformedCsr("trailing bytes after the CSR".into()));
    }
    let algorithm = csr.signature_algorithm.algorithm.to_id_string();
    check_signature_algorithm(&algorithm)?;

    let info = &csr.certification_request_info;
    let key = public_key(&info.subject_pki)?;
    let (key_type, key_bits) = classify_key(&key)?;
    if !signature_verifies(&der, &algorithm, info.raw, csr.signature_value.as_ref(), &key) {
        return Err(EngineError::BadCsrSignature);
    }

    let mut common_name = None;
    for cn in info.subject.iter_common_name() {
        let value = cn.as_str().map_err(|_| EngineError::MalformedCsr("common name is not a string".into()))?;
        if common_name.is_some() {
            return Err(EngineError::PolicyViolation("more than one common name".into()));
        }
        common_name = Some(value.to_string());
    }

    let mut names = Vec::new();
    if let Some(exts) = csr.requested_extensions() {
        for ext in exts {
            match ext {
                ParsedExtension::SubjectAlternativeName(san) => {
                    for gn in &san.general_names {
                        names.push(san_name(gn)?);
                    }
                }
                ParsedExtension::ParseError { error } => {
                    return Err(EngineError::MalformedCsr(format!("a requested extension does not parse: {error}")))
                }
                // Other requested extensions are ignored: the profile decides what is issued.
                _ => {}
            }
        }
    }
    Ok(CheckedCsr { spki_der: info.subject_pki.raw.to_vec(), key_type, key_bits, common_name, names, der })
}

/// The CSR's public key, built from its parts. `PKey::public_key_from_der` goes through
/// OpenSSL 3's decoder search, which cost more than the ECDSA verification it prepares for.
pub fn public_key(spki: &x509_parser::x509::SubjectPublicKeyInfo<'_>) -> Result<PKey<Public>, EngineError> {
    use openssl::bn::{BigNum, BigNumContext};
    use openssl::ec::{EcGroup, EcKey, EcPoint};
    use openssl::nid::Nid;
    use std::sync::OnceLock;
    use x509_parser::public_key::PublicKey;

    static CURVES: OnceLock<Vec<(&'static str, Nid, EcGroup)>> = OnceLock::new();
    let bad = |what: &str| EngineError::WeakKey(format!("the public key does not parse: {what}"));
    let data = spki.subject_public_key.data.as_ref();
    match spki.algorithm.algorithm.to_id_string().as_str() {
        "1.2.840.10045.2.1" => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|oid| oid.to_id_string())
                .ok_or_else(|| bad("EC key without a named curve"))?;
            let curves = CURVES.get_or_init(|| {
                [
                    ("1.2.840.10045.3.1.7", Nid::X9_62_PRIME256V1),
                    ("1.3.132.0.34", Nid::SECP384R1),
                    ("1.3.132.0.35", Nid::SECP521R1),
                ]
                .into_iter()
                .filter_map(|(oid, nid)| EcGroup::from_curve_name(nid).ok().map(|g| (oid, nid, g)))
                .collect()
            });
            let (_, _, group) = curves.iter().find(|(oid, _, _)| *oid == curve).ok_or_else(|| {
                EngineError::WeakKey("elliptic curve not supported (P-256, P-384, P-521 only)".into())
            })?;
            let mut ctx = BigNumContext::new().map_err(|_| bad("EC context"))?;
            // oct2point refuses a point that is not on the curve.
            let point = EcPoint::from_bytes(group, data, &mut ctx).map_err(|_| bad("EC point"))?;
            let ec = EcKey::from_public_key(group, &point).map_err(|_| bad("EC key"))?;
            PKey::from_ec_key(ec).map_err(|_| bad("EC key"))
        }
        "1.2.840.113549.1.1.1" => match spki.parsed() {
            Ok(PublicKey::RSA(rsa)) => {
                let n = BigNum::from_slice(rsa.modulus).map_err(|_| bad("RSA modulus"))?;
                let e = BigNum::from_slice(rsa.exponent).map_err(|_| bad("RSA exponent"))?;
                let rsa = openssl::rsa::Rsa::from_public_components(n, e).map_err(|_| bad("RSA key"))?;
                PKey::from_rsa(rsa).map_err(|_| bad("RSA key"))
            }
            _ => Err(bad("RSA key")),
        },
        "1.3.101.112" => PKey::public_key_from_raw_bytes(data, Id::ED25519).map_err(|_| bad("Ed25519 key")),
        // Anything else is refused by `classify_key`; the decoder says what it is.
        _ => PKey::public_key_from_der(spki.raw).map_err(|_| bad("unknown key type")),
    }
}

/// Verify the CSR's signature over the exact CertificationRequestInfo bytes x509-parser found,
/// with the key already decoded: openssl's own `X509_REQ_verify` parses the request again and
/// re-encodes it first, which cost three times the ECDSA verification itself. RSA-PSS, whose
/// parameters live in the algorithm identifier, takes openssl's path.
fn signature_verifies(der: &[u8], algorithm: &str, info: &[u8], signature: &[u8], key: &PKey<Public>) -> bool {
    let digest = match algorithm {
        "1.2.840.113549.1.1.11" | "1.2.840.10045.4.3.2" => Some(Sha2::Sha256),
        "1.2.840.113549.1.1.12" | "1.2.840.10045.4.3.3" => Some(Sha2::Sha384),
        "1.2.840.113549.1.1.13" | "1.2.840.10045.4.3.4" => Some(Sha2::Sha512),
        "1.3.101.112" => None,
        _ => {
            return X509Req::from_der(der).ok().and_then(|req| req.verify(key).ok()).unwrap_or(false);
        }
    };
    if let (Some(digest), Ok(ec)) = (digest, key.ec_key()) {
        return ecdsa_verifies(digest, info, signature, &ec);
    }
    let verified = match digest {
        Some(digest) => Verifier::new(digest.md(), key).and_then(|mut v| {
            v.update(info)?;
            v.verify(signature)
        }),
        None => Verifier::new_without_digest(key).and_then(|mut v| v.verify_oneshot(signature, info)),
    };
    verified.unwrap_or(false)
}

/// The digests a CSR's signature may use.
#[derive(Clone, Copy)]
enum Sha2 {
    Sha256,
    Sha384,
    Sha512,
}

impl Sha2 {
    fn md(self) -> MessageDigest {
        match self {
            Sha2::Sha256 => MessageDigest::sha256(),
            Sha2::Sha384 => MessageDigest::sha384(),
            Sha2::Sha512 => MessageDigest::sha512(),
        }
    }

    fn digest(self, data: &[u8]) -> Vec<u8> {
        match self {
            Sha2::Sha256 => super::sha256(data).to_vec(),
            Sha2::Sha384 => super::sha384(data).to_vec(),
            Sha2::Sha512 => super::sha512(data).to_vec(),
        }
    }
}

/// ECDSA straight on the curve key. Through `EVP_DigestVerifyInit`, OpenSSL 3 first copies a
/// key it has not seen into its provider (every CSR's key is new): that copy cost half as much
/// as the verification itself (perf, c=64). The DER must be the signature's one encoding, as
/// `ECDSA_verify` requires.
fn ecdsa_verifies(digest: Sha2, info: &[u8], signature: &[u8], key: &EcKey<Public>) -> bool {
    let Ok(sig) = EcdsaSig::from_der(signature) else { return false };
    if sig.to_der().ok().as_deref() != Some(signature) {
        return false;
    }
    sig.verify(&digest.digest(info), key).unwrap_or(false)
}

fn classify_key(key: &openssl::pkey::PKey<openssl::pkey::Public>) -> Result<(KeyType, u32), EngineError> {
    let key_type = super::ca::key_type_of(key).ok_or_else(|| match key.id() {
        Id::EC => EngineError::WeakKey("elliptic curve not supported (P-256, P-384, P-521 only)".into()),
        _ => EngineError::WeakKey("key type not supported (ECDSA, RSA, Ed25519 only)".into()),
    })?;
    let bits = key.bits();
    if key_type == KeyType::Rsa {
        if bits < 2048 {
            return Err(EngineError::WeakKey(format!("RSA-{bits} is too small (at least 2048 bits)")));
        }
        if bits > MAX_RSA_BITS {
            return Err(EngineError::WeakKey(format!("RSA-{bits} is too large (at most {MAX_RSA_BITS} bits)")));
        }
    }
    Ok((key_type, bits))
}

fn san_name(gn: &GeneralName<'_>) -> Result<SanName, EngineError> {
    match gn {
        GeneralName::DNSName(s) => Ok(SanName::Dns(s.to_string())),
        GeneralName::RFC822Name(s) => Ok(SanName::Email(s.to_string())),
        GeneralName::IPAddress(bytes) => match bytes.len() {
            4 => Ok(SanName::Ip(IpAddr::from(<[u8; 4]>::try_from(*bytes).unwrap_or_default()))),
            16 => Ok(SanName::Ip(IpAddr::from(<[u8; 16]>::try_from(*bytes).unwrap_or_default()))),
            n => Err(EngineError::MalformedCsr(format!("IP address of {n} bytes"))),
        },
        GeneralName::Invalid(_, _) => Err(EngineError::PolicyViolation("a requested name is not valid text".into())),
        other => Err(EngineError::PolicyViolation(format!("name type not supported: {other:?}"))),
    }
}

/// A DNS name as RFC 1034/5280 allow it in a certificate: LDH labels, no wildcard, no NUL.
pub fn is_valid_dns_name(name: &str) -> bool {
    if name.is_empty() || name.len() > 253 || name.ends_with('.') {
        return false;
    }
    let ldh = name.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    });
    ldh && is_canonical_idn(name)
}

/// Whether a label is an IDNA A-label (`xn--…`, Punycode).
fn is_a_label(label: &str) -> bool {
    label.len() >= 4 && label[..4].eq_ignore_ascii_case("xn--")
}

/// Each A-label is what UTS-46 (the `idna` crate, strict) makes of itself: invalid Punycode
/// (`xn--zz`), one that decodes to disallowed code points, or one not in its canonical form is
/// refused. Only A-labels are judged so (a name without one passes at once): the other labels
/// follow the LDH rule alone.
fn is_canonical_idn(name: &str) -> bool {
    name.split('.')
        .filter(|l| is_a_label(l))
        .all(|label| matches!(idna::domain_to_ascii_strict(label), Ok(ascii) if ascii.eq_ignore_ascii_case(label)))
}

pub fn is_valid_email(addr: &str) -> bool {
    match addr.split_once('@') {
        Some((local, domain)) => {
            !local.is_empty() && local.bytes().all(|b| b.is_ascii_graphic() && b != b'@') && is_valid_dns_name(domain)
        }
        None => false,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn dns_names() {
        assert!(is_valid_dns_name("www.example.test"));
        assert!(is_valid_dns_name("a-b.example"));
        assert!(!is_valid_dns_name("foo\0.example.test"));
        assert!(!is_valid_dns_name("*.example.test"));
        assert!(!is_valid_dns_name("-a.example"));
        assert!(!is_valid_dns_name(""));
        assert!(!is_valid_dns_name("a..b"));
        // Internationalised names: A-labels must be valid, canonical Punycode (UTS-46).
        assert!(is_valid_dns_name("xn--bcher-kva.example")); // bücher
        assert!(is_valid_dns_name("XN--BCHER-KVA.example"));
        assert!(!is_valid_dns_name("xn--zz.example.test"));
        assert!(!is_valid_dns_name("xn--a.example")); // decodes to U+0080, disallowed
        assert!(!is_valid_dns_name("a.xn--zz.example"));
        // The A-labels alone are judged by UTS-46: a hyphenated LDH label beside one is as
        // acceptable as on its own.
        assert!(is_valid_dns_name("xn--bcher-kva.ab--cd.example"));
        assert!(is_valid_dns_name("ab--cd.example"));
    }

    #[test]
    fn weak_algorithms_are_named() {
        let e = check_signature_algorithm("1.2.840.113549.1.1.5").unwrap_err();
        assert!(e.to_string().contains("sha1WithRSAEncryption"));
        assert!(check_signature_algorithm("1.2.840.10045.4.3.2").is_ok());
    }

    #[test]
    fn garbage_is_malformed() {
        assert_eq!(check_csr_pem("hello").unwrap_err().slug(), "malformed-csr");
        assert_eq!(check_csr_der(vec![0x30, 0x82, 0x01]).unwrap_err().slug(), "malformed-csr");
    }

    use openssl::ec::{EcGroup, EcKey};
    use openssl::nid::Nid;
    use openssl::pkey::Private;
    use openssl::stack::Stack;
    use openssl::x509::extension::SubjectAlternativeName;
    use openssl::x509::{X509NameBuilder, X509ReqBuilder};

    fn ec(nid: Nid) -> PKey<Private> {
        PKey::from_ec_key(EcKey::generate(&EcGroup::from_curve_name(nid).unwrap()).unwrap()).unwrap()
    }

    fn rsa(bits: u32) -> PKey<Private> {
        PKey::from_rsa(openssl::rsa::Rsa::generate(bits).unwrap()).unwrap()
    }

    /// A DER CSR: common names, then SAN entries (`ip:` / `email:` prefixed, else DNS).
    pub(crate) fn request(key: &PKey<Private>, cns: &[&str], names: &[&str], digest: MessageDigest) -> Vec<u8> {
        let mut b = X509ReqBuilder::new().unwrap();
        let mut subject = X509NameBuilder::new().unwrap();
        for cn in cns {
            subject.append_entry_by_text("CN", cn).unwrap();
        }
        b.set_subject_name(&subject.build()).unwrap();
        b.set_pubkey(key).unwrap();
        if !names.is_empty() {
            let mut san = SubjectAlternativeName::new();
            for n in names {
                match (n.strip_prefix("ip:"), n.strip_prefix("email:")) {
                    (Some(ip), _) => san.ip(ip),
                    (_, Some(email)) => san.email(email),
                    _ => san.dns(n),
                };
            }
            let mut exts = Stack::new().unwrap();
            exts.push(san.build(&b.x509v3_context(None)).unwrap()).unwrap();
            b.add_extensions(&exts).unwrap();
        }
        b.sign(key, digest).unwrap();
        b.build().to_der().unwrap()
    }

    #[test]
    fn every_accepted_key_is_classified_and_its_names_kept_in_order() {
        let p256 = check_csr_der(request(
            &ec(Nid::X9_62_PRIME256V1),
            &["a.test"],
            &["a.test", "b.test"],
            MessageDigest::sha256(),
        ))
        .unwrap();
        assert_eq!((p256.key_type, p256.key_bits), (KeyType::EcdsaP256, 256));
        assert_eq!(p256.common_name.as_deref(), Some("a.test"));
        assert_eq!(p256.names, [SanName::Dns("a.test".into()), SanName::Dns("b.test".into())]);
        let p384 =
            check_csr_der(request(&ec(Nid::SECP384R1), &[], &["ip:10.0.0.1", "ip:::1"], MessageDigest::sha384()))
                .unwrap();
        assert_eq!((p384.key_type, p384.key_bits, p384.common_name), (KeyType::EcdsaP384, 384, None));
        assert_eq!(p384.names, [SanName::Ip("10.0.0.1".parse().unwrap()), SanName::Ip("::1".parse().unwrap())]);
        assert_eq!(p384.names.iter().map(ToString::to_string).collect::<Vec<_>>(), ["10.0.0.1", "::1"]);
        let p521 =
            check_csr_der(request(&ec(Nid::SECP521R1), &[], &["email:a@b.test"], MessageDigest::sha512())).unwrap();
        assert_eq!(p521.key_bits, 521);
        assert_eq!(p521.names, [SanName::Email("a@b.test".into())]);
        assert_eq!(p521.names[0].to_string(), "a@b.test");
        let ed = PKey::generate_ed25519().unwrap();
        let ed = check_csr_der(request(&ed, &["e.test"], &[], MessageDigest::null())).unwrap();
        assert_eq!(ed.key_type, KeyType::Ed25519);
        for digest in [MessageDigest::sha256(), MessageDigest::sha384(), MessageDigest::sha512()] {
            let r = check_csr_der(request(&rsa(2048), &[], &["r.test"], digest)).unwrap();
            assert_eq!((r.key_type, r.key_bits), (KeyType::Rsa, 2048));
        }
    }

    #[test]
    fn the_spki_and_request_are_kept_as_sent() {
        let key = ec(Nid::X9_62_PRIME256V1);
        let der = request(&key, &[], &["k.test"], MessageDigest::sha256());
        let checked = check_csr_der(der.clone()).unwrap();
        assert_eq!(checked.der, der);
        assert_eq!(checked.spki_der, key.public_key_to_der().unwrap());
    }

    #[test]
    fn a_signature_that_does_not_verify_is_refused_for_every_key_type() {
        for key in [ec(Nid::X9_62_PRIME256V1), ec(Nid::SECP384R1), PKey::generate_ed25519().unwrap(), rsa(2048)] {
            let digest = if key.id() == Id::ED25519 { MessageDigest::null() } else { MessageDigest::sha256() };
            let mut der = request(&key, &[], &["s.test"], digest);
            let last = der.len() - 1;
            der[last] ^= 0x01; // inside the signature
            assert_eq!(check_csr_der(der).unwrap_err(), EngineError::BadCsrSignature, "{:?}", key.id());
        }
    }

    /// A DER TLV (definite length, minimal unless `long_length`).
    fn tlv(tag: u8, content: &[u8], long_length: bool) -> Vec<u8> {
        let mut out = vec![tag];
        match content.len() {
            n if n < 0x80 && !long_length => out.push(n as u8),
            n if n < 0x100 => out.extend([0x81, n as u8]),
            n => out.extend([0x82, (n >> 8) as u8, n as u8]),
        }
        out.extend_from_slice(content);
        out
    }

    /// The same CSR with another signature value.
    fn resigned(der: &[u8], signature: &[u8]) -> Vec<u8> {
        let (_, csr) = X509CertificationRequest::from_der(der).unwrap();
        let info = csr.certification_request_info.raw;
        let algorithm = tlv(0x30, &tlv(0x06, csr.signature_algorithm.algorithm.as_bytes(), false), false);
        let bits = [&[0u8][..], signature].concat();
        tlv(0x30, &[info, &algorithm, &tlv(0x03, &bits, false)].concat(), false)
    }

    #[test]
    fn an_ecdsa_signature_verifies_only_in_its_one_der_encoding() {
        let der = request(&ec(Nid::X9_62_PRIME256V1), &[], &["d.test"], MessageDigest::sha256());
        let (_, csr) = X509CertificationRequest::from_der(&der).unwrap();
        let signature = csr.signature_value.data.to_vec();
        let sig = EcdsaSig::from_der(&signature).unwrap();
        let integer = |n: &openssl::bn::BigNumRef, pad: usize| {
            let mut bytes = vec![0u8; pad];
            if n.to_vec()[0] & 0x80 != 0 {
                bytes.push(0);
            }
            bytes.extend(n.to_vec());
            tlv(0x02, &bytes, false)
        };
        let (r, s) = (integer(sig.r(), 0), integer(sig.s(), 0));
        // Re-encoded minimally, it is the same signature and verifies (the helper is right).
        assert!(check_csr_der(resigned(&der, &tlv(0x30, &[r.clone(), s.clone()].concat(), false))).is_ok());
        let long_length = tlv(0x30, &[r.clone(), s.clone()].concat(), true);
        let padded_r = tlv(0x30, &[integer(sig.r(), 1), s].concat(), false);
        for (what, encoding) in [("a long-form length", long_length), ("an integer with a leading zero", padded_r)] {
            // OpenSSL's own check of the whole request agrees: these are not signatures.
            let req = X509Req::from_der(&resigned(&der, &encoding)).unwrap();
            assert!(!req.verify(&req.public_key().unwrap()).unwrap_or(false), "{what}: openssl accepts it");
            assert_eq!(check_csr_der(resigned(&der, &encoding)).unwrap_err(), EngineError::BadCsrSignature, "{what}");
        }
    }

    #[test]
    fn small_rsa_keys_and_two_common_names_are_refused() {
        let small = check_csr_der(request(&rsa(1024), &[], &["r.test"], MessageDigest::sha256())).unwrap_err();
        assert_eq!(small.slug(), "weak-key");
        assert!(small.to_string().contains("RSA-1024"), "{small}");
        let two = request(&ec(Nid::X9_62_PRIME256V1), &["a.test", "b.test"], &[], MessageDigest::sha256());
        assert_eq!(check_csr_der(two).unwrap_err().slug(), "policy-violation");
    }

    #[test]
    fn structure_is_checked_before_anything_else() {
        let der = request(&ec(Nid::X9_62_PRIME256V1), &[], &["t.test"], MessageDigest::sha256());
        let mut trailing = der.clone();
        trailing.push(0);
        assert!(check_csr_der(trailing).unwrap_err().to_string().contains("trailing bytes"));
        let mut large = der.clone();
        large.resize(MAX_CSR_DER + 1, 0);
        assert!(check_csr_der(large).unwrap_err().to_string().contains("too large"));
        let mut at_limit = der;
        at_limit.resize(MAX_CSR_DER, 0);
        assert!(check_csr_der(at_limit).unwrap_err().to_string().contains("trailing bytes"), "the size is allowed");
    }

    #[test]
    fn pem_labels() {
        let der = request(&ec(Nid::X9_62_PRIME256V1), &[], &["p.test"], MessageDigest::sha256());
        let pem = |label: &str| {
            use base64::Engine as _;
            let body = base64::engine::general_purpose::STANDARD.encode(&der);
            format!("\n  -----BEGIN {label}-----\n{body}\n-----END {label}-----\n")
        };
        assert_eq!(pem_to_der(&pem("CERTIFICATE REQUEST")).unwrap(), der);
        assert_eq!(pem_to_der(&pem("NEW CERTIFICATE REQUEST")).unwrap(), der);
        assert!(pem_to_der(&pem("CERTIFICATE")).unwrap_err().to_string().contains("expected CERTIFICATE REQUEST"));
        assert_eq!(check_csr_pem(&pem("CERTIFICATE REQUEST")).unwrap().names, [SanName::Dns("p.test".into())]);
        // Exactly one block, whitespace aside.
        let one = pem("CERTIFICATE REQUEST");
        assert_eq!(pem_to_der(&format!("\n\t{one}\n\n")).unwrap(), der);
        for (bad, why) in [
            (format!("hello\n{one}"), "must start with -----BEGIN"),
            (format!("{one}trailing garbage"), "text after the PEM block"),
            (format!("{one}{one}"), "text after the PEM block"),
            (one.replace("-----\n", "-----garbage\n"), "must be framed by"),
            (one.replace("-----END CERTIFICATE REQUEST-----", "-----END FOO-----"), "must be framed by"),
        ] {
            let e = pem_to_der(&bad).unwrap_err();
            assert!(e.to_string().contains(why), "{bad:?}: {e}");
            assert_eq!(e.slug(), "malformed-csr");
        }
    }

    #[test]
    fn every_accepted_algorithm_passes_and_unknown_ones_are_named() {
        for oid in [
            "1.2.840.113549.1.1.11",
            "1.2.840.113549.1.1.12",
            "1.2.840.113549.1.1.13",
            "1.2.840.113549.1.1.10",
            "1.2.840.10045.4.3.2",
            "1.2.840.10045.4.3.3",
            "1.2.840.10045.4.3.4",
            "1.3.101.112",
        ] {
            assert!(check_signature_algorithm(oid).is_ok(), "{oid}");
        }
        for (oid, name) in [
            ("1.2.840.113549.1.1.4", "md5"),
            ("1.2.840.10045.4.1", "ecdsa-with-SHA1"),
            ("1.3.14.3.2.29", "sha1WithRSASignature"),
        ] {
            assert!(check_signature_algorithm(oid).unwrap_err().to_string().contains(name), "{oid}");
        }
        assert!(check_signature_algorithm("1.2.3.4").unwrap_err().to_string().contains("1.2.3.4 is not supported"));
    }

    #[test]
    fn dns_name_boundaries() {
        let label63 = "a".repeat(63);
        assert!(is_valid_dns_name(&format!("{label63}.test")));
        assert!(!is_valid_dns_name(&format!("{label63}a.test")), "a 64-byte label");
        let long = |n: usize| (0..n).map(|_| "a").collect::<Vec<_>>().join(".") + "b";
        assert_eq!(long(126).len(), 252);
        assert!(is_valid_dns_name(&(long(126) + "c")), "253 bytes");
        assert!(!is_valid_dns_name(&(long(126) + "cd")), "254 bytes");
        assert!(!is_valid_dns_name("example.test."), "trailing dot");
        assert!(!is_valid_dns_name("a-.example"), "trailing hyphen");
        assert!(!is_valid_dns_name("a_b.example"));
        assert!(is_valid_dns_name("0-9.example"));
    }

    #[test]
    fn email_addresses() {
        assert!(is_valid_email("ops@example.test"));
        assert!(is_valid_email("o.p+s@example.test"));
        assert!(!is_valid_email("@example.test"), "empty local part");
        assert!(!is_valid_email("o ps@example.test"), "space");
        assert!(!is_valid_email("ops.example.test"), "no @");
        assert!(!is_valid_email("ops@exa mple.test"), "domain not a DNS name");
        assert!(!is_valid_email("ops@"), "empty domain");
    }

    #[test]
    fn requests_up_to_16_kib_are_read_and_larger_ones_refused() {
        let key = ec(Nid::X9_62_PRIME256V1);
        let names = |n: usize| (0..n).map(|i| format!("host-{i:04}.example.test")).collect::<Vec<_>>();
        let many = names(200);
        let der = request(&key, &[], &many.iter().map(String::as_str).collect::<Vec<_>>(), MessageDigest::sha256());
        assert!((4 * 1024..16 * 1024).contains(&der.len()), "{} bytes", der.len());
        assert_eq!(check_csr_der(der).unwrap().names.len(), 200);
        let too_many = names(800);
        let der = request(&key, &[], &too_many.iter().map(String::as_str).collect::<Vec<_>>(), MessageDigest::sha256());
        assert!(der.len() > 16 * 1024, "{} bytes", der.len());
        assert!(check_csr_der(der).unwrap_err().to_string().contains("too large"));
    }

    #[test]
    fn a_requested_extension_that_does_not_parse_is_refused() {
        use openssl::asn1::{Asn1Object, Asn1OctetString};
        use openssl::x509::X509Extension;
        let key = ec(Nid::X9_62_PRIME256V1);
        let mut b = X509ReqBuilder::new().unwrap();
        b.set_pubkey(&key).unwrap();
        // A subjectAltName whose value is a truncated SEQUENCE.
        let san = Asn1Object::from_str("2.5.29.17").unwrap();
        let value = Asn1OctetString::new_from_bytes(&[0x30, 0x05, 0x82, 0x03, b'a']).unwrap();
        let mut exts = Stack::new().unwrap();
        exts.push(X509Extension::new_from_der(&san, false, &value).unwrap()).unwrap();
        b.add_extensions(&exts).unwrap();
        b.sign(&key, MessageDigest::sha256()).unwrap();
        let err = check_csr_der(b.build().to_der().unwrap()).unwrap_err();
        assert_eq!(err.slug(), "malformed-csr", "{err}");
        assert!(err.to_string().contains("a requested extension does not parse"), "{err}");
    }

    #[test]
    fn rsa_keys_up_to_8192_bits_are_classified_and_larger_ones_refused() {
        use openssl::bn::BigNum;
        // A modulus of exactly `bits` bits (odd, top bit set): no key generation needed to
        // classify a public key.
        let public = |bits: i32| {
            let mut n = BigNum::new().unwrap();
            n.set_bit(bits - 1).unwrap();
            n.set_bit(0).unwrap();
            let rsa = openssl::rsa::Rsa::from_public_components(n, BigNum::from_u32(65537).unwrap()).unwrap();
            PKey::from_rsa(rsa).unwrap()
        };
        assert_eq!(classify_key(&public(2048)).unwrap(), (KeyType::Rsa, 2048));
        assert_eq!(classify_key(&public(8192)).unwrap(), (KeyType::Rsa, 8192));
        assert!(classify_key(&public(8193)).unwrap_err().to_string().contains("RSA-8193 is too large"));
        assert!(classify_key(&public(2047)).unwrap_err().to_string().contains("RSA-2047 is too small"));
        let p521 = ec(Nid::SECP521R1);
        let p521 = PKey::public_key_from_der(&p521.public_key_to_der().unwrap()).unwrap();
        assert_eq!(classify_key(&p521).unwrap(), (KeyType::EcdsaP521, 521));
    }
}
