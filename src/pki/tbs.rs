//! Building the to-be-signed certificate, linting it, and signing it.
//!
//! The TBS is built as a DER structure with x509-cert (never by openssl's builder, which can
//! only produce an already-signed certificate): that is what makes write-ahead issuance
//! possible. The Store records the serial and these exact TBS bytes before the CA key signs.

use std::time::{Duration, SystemTime};

use const_oid::db::rfc4519::{COMMON_NAME, ORGANIZATION_NAME};
use const_oid::db::rfc5280 as oids;
use const_oid::AssociatedOid;
use der::asn1::{BitString, GeneralizedTime, Ia5String, OctetString, SetOfVec, UtcTime, Utf8StringRef};
use der::{Any, Decode, Encode, Header, Length, Tag};
use x509_cert::attr::AttributeTypeAndValue;
use x509_cert::certificate::{TbsCertificate, Version};
use x509_cert::ext::pkix::certpolicy::PolicyInformation;
use x509_cert::ext::pkix::crl::dp::DistributionPoint;
use x509_cert::ext::pkix::name::DistributionPointName;
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::{
    AccessDescription, AuthorityInfoAccessSyntax, AuthorityKeyIdentifier, BasicConstraints, CertificatePolicies,
    CrlDistributionPoints, ExtendedKeyUsage, KeyUsage, KeyUsages, SubjectAltName, SubjectKeyIdentifier,
};
use x509_cert::ext::Extension;
use x509_cert::name::{Name, RdnSequence, RelativeDistinguishedName};
use x509_cert::serial_number::SerialNumber;
use x509_cert::spki::{AlgorithmIdentifierOwned, SubjectPublicKeyInfoOwned};
use x509_cert::time::{Time, Validity};

use super::ca::{CaMaterial, CaTbsParts};
use super::csr::{CheckedCsr, SanName};
use super::profile::{ApprovedNames, Profile};
use super::vocabulary::{ExtendedKeyUsageName, KeyType, KeyUsageName};
use crate::error::EngineError;

/// A certificate ready to be signed: recorded by the Store before the signature exists.
#[derive(Debug)]
pub struct PreparedCert {
    pub serial_hex: String,
    /// The CRL shard the certificate names (and will be listed on if revoked).
    pub crl_shard: u32,
    pub tbs: LintedTbs,
    pub not_before_ms: i64,
    pub not_after_ms: i64,
}

/// TBSCertificate bytes that passed [`lint`]. Only [`prepare`] makes one and [`sign`] takes
/// nothing else, so nothing unlinted can reach a CA key; it is not `Clone`, so each is handed to
/// the signer once (a caller that must sign the same bytes again, like the benchmark, shares it).
#[derive(Debug)]
pub struct LintedTbs {
    der: Vec<u8>,
}

impl LintedTbs {
    /// The exact bytes the write-ahead record stores and the key signs.
    pub fn der(&self) -> &[u8] {
        &self.der
    }
}

pub(crate) fn internal(what: &str) -> impl Fn(der::Error) -> EngineError + '_ {
    move |e| EngineError::Internal(format!("{what}: {e}"))
}

/// A new serial, 20 octets: `0x01` (a positive INTEGER of exactly 20 octets, never needing a
/// sign-padding byte), the time in milliseconds (6 octets, big-endian), then 13 octets from the
/// thread's CSPRNG, seeded from the OS (104 bits; the Baseline Requirements ask for at least 64,
/// and for serials that are not sequential, which the random tail makes them). Serials grow with
/// time, so a new certificate's row goes to the end of the certificates table's primary key rather
/// than to a random page of it: with fully random serials an issuance read and dirtied a random
/// index page, and at 10 million stored certificates SQLite issued a quarter as fast as on an
/// empty database.
pub fn new_serial() -> [u8; 20] {
    let mut serial = [0u8; 20];
    // ThreadRng: ChaCha12 seeded and periodically reseeded from the OS, a CSPRNG in user space.
    // OpenSSL's RAND_bytes took ~1% of the engine's CPU at c=64 (its DRBG's lock and fork check).
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut serial[7..]);
    serial[0] = 0x01;
    let ms = u64::try_from(super::now_ms()).unwrap_or(0);
    serial[1..7].copy_from_slice(&ms.to_be_bytes()[2..]);
    serial
}

/// The CRL shard of a new certificate: from the serial's random tail, so shards fill evenly.
pub fn crl_shard_of(serial: &[u8; 20], shards: u32) -> u32 {
    u32::from(serial[19]) % shards.max(1)
}

/// A URI as a GeneralName (CRL distribution points, authority information access).
pub(crate) fn uri(url: &str) -> Result<GeneralName, EngineError> {
    Ok(GeneralName::UniformResourceIdentifier(Ia5String::new(url).map_err(internal("URI"))?))
}

pub(crate) fn extension<T: AssociatedOid + Encode>(value: &T, critical: bool) -> Result<Extension, EngineError> {
    let der = value.to_der().map_err(internal("extension"))?;
    Ok(Extension { extn_id: T::OID, critical, extn_value: OctetString::new(der).map_err(internal("extension"))? })
}

fn key_usage_flags(profile: &Profile, key_type: KeyType) -> KeyUsage {
    let mut flags = der::flagset::FlagSet::<KeyUsages>::default();
    for ku in &profile.key_usage {
        // Key encipherment only makes sense for RSA keys, key agreement only for EC keys, and an
        // Ed25519 key may only sign (RFC 8410): the profile says what is wanted, the key decides.
        let (flag, applies) = match ku {
            KeyUsageName::DigitalSignature => (KeyUsages::DigitalSignature, true),
            KeyUsageName::NonRepudiation => (KeyUsages::NonRepudiation, true),
            KeyUsageName::KeyEncipherment => (KeyUsages::KeyEncipherment, key_type == KeyType::Rsa),
            KeyUsageName::DataEncipherment => (KeyUsages::DataEncipherment, key_type == KeyType::Rsa),
            KeyUsageName::KeyAgreement => (
                KeyUsages::KeyAgreement,
                matches!(key_type, KeyType::EcdsaP256 | KeyType::EcdsaP384 | KeyType::EcdsaP521),
            ),
        };
        if applies {
            flags |= flag;
        }
    }
    KeyUsage(flags)
}

fn eku_oid(eku: ExtendedKeyUsageName) -> const_oid::ObjectIdentifier {
    match eku {
        ExtendedKeyUsageName::ServerAuth => oids::ID_KP_SERVER_AUTH,
        ExtendedKeyUsageName::ClientAuth => oids::ID_KP_CLIENT_AUTH,
        ExtendedKeyUsageName::CodeSigning => oids::ID_KP_CODE_SIGNING,
        ExtendedKeyUsageName::EmailProtection => oids::ID_KP_EMAIL_PROTECTION,
        ExtendedKeyUsageName::TimeStamping => oids::ID_KP_TIME_STAMPING,
        ExtendedKeyUsageName::OcspSigning => oids::ID_KP_OCSP_SIGNING,
        ExtendedKeyUsageName::DocumentSigning => ID_KP_DOCUMENT_SIGNING,
    }
}

/// id-kp-documentSigning (RFC 9336).
const ID_KP_DOCUMENT_SIGNING: const_oid::ObjectIdentifier =
    const_oid::ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.3.36");

/// The subject: organisation (identities only), then common name, each a UTF8String.
fn subject_name(names: &ApprovedNames) -> Result<Name, EngineError> {
    let mut rdns = Vec::new();
    for (oid, value) in [(ORGANIZATION_NAME, &names.organization), (COMMON_NAME, &names.common_name)] {
        let Some(value) = value else { continue };
        let value =
            Any::encode_from(&Utf8StringRef::new(value).map_err(internal("subject"))?).map_err(internal("subject"))?;
        let atv = AttributeTypeAndValue { oid, value };
        rdns.push(RelativeDistinguishedName(SetOfVec::try_from(vec![atv]).map_err(internal("subject"))?));
    }
    Ok(RdnSequence(rdns))
}

fn general_name(name: &SanName) -> Result<GeneralName, EngineError> {
    Ok(match name {
        SanName::Dns(d) => GeneralName::DnsName(Ia5String::new(d).map_err(internal("dNSName"))?),
        SanName::Email(e) => GeneralName::Rfc822Name(Ia5String::new(e).map_err(internal("rfc822Name"))?),
        SanName::Ip(ip) => GeneralName::from(*ip),
    })
}

/// RFC 5280 4.1.2.5: UTCTime through 2049, GeneralizedTime from 2050.
pub(crate) fn rfc5280_time(t: SystemTime) -> Result<Time, EngineError> {
    match UtcTime::from_system_time(t) {
        Ok(utc) => Ok(Time::UtcTime(utc)),
        Err(_) => Ok(Time::GeneralTime(GeneralizedTime::from_system_time(t).map_err(internal("time"))?)),
    }
}

/// Build the TBSCertificate for `csr` under `profile`, issued by `ca` at `now`, then lint it.
pub fn prepare(
    ca: &CaMaterial,
    profile: &Profile,
    csr: &CheckedCsr,
    names: &ApprovedNames,
    now: SystemTime,
) -> Result<PreparedCert, EngineError> {
    let serial = new_serial();
    let crl_shard = crl_shard_of(&serial, ca.crl_shards);
    let not_before = now - profile.backdate;
    // A CSR's certificate spans exactly `validity` (the Baseline Requirements count from
    // notBefore). An identity's counts it from now: the backdate for clock skew comes on top,
    // or an identity of lifetime 10m would die with its certificate after 9.
    let not_after = match profile.identity {
        Some(_) => now + profile.validity,
        None => not_before + profile.validity,
    };
    let spki = SubjectPublicKeyInfoOwned::from_der(&csr.spki_der).map_err(internal("public key"))?;
    let subject = if profile.omit_common_name {
        subject_name(&ApprovedNames { common_name: None, ..names.clone() })?
    } else {
        subject_name(names)?
    };
    let parts = ca_parts(ca)?;

    let ski = super::sha1(spki.subject_public_key.raw_bytes());
    let sans = names.sans.iter().map(general_name).collect::<Result<Vec<_>, _>>()?;
    let mut extensions =
        vec![parts.basic_constraints.clone(), extension(&key_usage_flags(profile, csr.key_type), true)?];
    if !profile.extended_key_usage.is_empty() {
        let ekus = profile.extended_key_usage.iter().map(|e| eku_oid(*e)).collect();
        extensions.push(extension(&ExtendedKeyUsage(ekus), false)?);
    }
    if !profile.omit_subject_key_id {
        extensions
            .push(extension(&SubjectKeyIdentifier(OctetString::new(ski.to_vec()).map_err(internal("SKI"))?), false)?);
    }
    extensions.push(parts.authority_key_id.clone());
    if let (Some(crl), Some(access)) =
        (parts.crl_distribution_points.get(crl_shard as usize), &parts.authority_info_access)
    {
        extensions.push(crl.clone());
        extensions.push(access.clone());
    }
    if profile.ocsp_no_check {
        let no_check = Extension {
            extn_id: const_oid::db::rfc6960::ID_PKIX_OCSP_NOCHECK,
            critical: false,
            extn_value: OctetString::new(der::asn1::Null.to_der().map_err(internal("nocheck"))?)
                .map_err(internal("nocheck"))?,
        };
        extensions.push(no_check);
    }
    if !profile.policies.is_empty() {
        let policies = profile
            .policies
            .iter()
            .map(|oid| PolicyInformation { policy_identifier: *oid, policy_qualifiers: None })
            .collect();
        extensions.push(extension(&CertificatePolicies(policies), false)?);
    }
    // RFC 5280 4.2.1.6: with an empty subject the subjectAltName must be critical. An identity
    // named by its subject alone (no email) has none.
    if !sans.is_empty() {
        extensions.push(extension(&SubjectAltName(sans), subject.0.is_empty())?);
    }

    let tbs = TbsCertificate {
        version: Version::V3,
        serial_number: SerialNumber::new(&serial).map_err(internal("serial"))?,
        signature: parts.signature.clone(),
        issuer: parts.issuer.clone(),
        validity: Validity { not_before: rfc5280_time(not_before)?, not_after: rfc5280_time(not_after)? },
        subject,
        subject_public_key_info: spki,
        issuer_unique_id: None,
        subject_unique_id: None,
        extensions: Some(extensions),
    };
    lint(&tbs, ca, now)?;
    Ok(PreparedCert {
        serial_hex: hex::encode(serial),
        crl_shard,
        tbs: LintedTbs { der: tbs.to_der().map_err(internal("TBS"))? },
        not_before_ms: super::unix_ms(not_before),
        not_after_ms: super::unix_ms(not_after),
    })
}

/// The CA's share of every TBS it builds, made at its first certificate and kept on it.
fn ca_parts(ca: &CaMaterial) -> Result<&CaTbsParts, EngineError> {
    if let Some(parts) = ca.tbs_parts.get() {
        return Ok(parts);
    }
    let authority_key_id = extension(
        &AuthorityKeyIdentifier {
            key_identifier: Some(OctetString::new(ca.subject_key_id.clone()).map_err(internal("AKI"))?),
            authority_cert_issuer: None,
            authority_cert_serial_number: None,
        },
        false,
    )?;
    let (mut crl_distribution_points, mut authority_info_access) = (Vec::new(), None);
    if let Some(ca_issuers) = ca.ca_issuers_url() {
        for crl in (0..ca.crl_shards).filter_map(|shard| ca.crl_url(shard)) {
            let point = DistributionPoint {
                distribution_point: Some(DistributionPointName::FullName(vec![uri(&crl)?])),
                reasons: None,
                crl_issuer: None,
            };
            crl_distribution_points.push(extension(&CrlDistributionPoints(vec![point]), false)?);
        }
        let mut access = Vec::new();
        if let Some(ocsp) = ca.ocsp_url() {
            access.push(AccessDescription { access_method: oids::ID_AD_OCSP, access_location: uri(&ocsp)? });
        }
        access.push(AccessDescription { access_method: oids::ID_AD_CA_ISSUERS, access_location: uri(&ca_issuers)? });
        authority_info_access = Some(extension(&AuthorityInfoAccessSyntax(access), false)?);
    }
    let parts = CaTbsParts {
        basic_constraints: extension(&BasicConstraints { ca: false, path_len_constraint: None }, true)?,
        issuer: Name::from_der(&ca.subject_der).map_err(internal("issuer"))?,
        signature: AlgorithmIdentifierOwned::from_der(ca.signature_algorithm.algorithm_identifier_der())
            .map_err(internal("signature algorithm"))?,
        authority_key_id,
        crl_distribution_points,
        authority_info_access,
    };
    // Two threads may both make them the first time; either's are the same.
    Ok(ca.tbs_parts.get_or_init(|| parts))
}

/// The last look before the key is used: properties every certificate castellum issues must
/// have, whatever the profile says. A failure here is a bug or a misconfiguration, never the
/// client's fault, and nothing is signed.
pub fn lint(tbs: &TbsCertificate, ca: &CaMaterial, now: SystemTime) -> Result<(), EngineError> {
    let fail = |why: &str| Err(EngineError::Internal(format!("certificate lint failed: {why}")));
    let serial = tbs.serial_number.as_bytes();
    if serial.is_empty() || serial.len() > 20 || serial[0] & 0x80 != 0 {
        return fail("serial is not a positive integer of at most 20 octets");
    }
    let not_before = tbs.validity.not_before.to_system_time();
    let not_after = tbs.validity.not_after.to_system_time();
    if not_after <= not_before {
        return fail("notAfter is not after notBefore");
    }
    if not_after > ca.not_after {
        return fail("the certificate would outlive its CA");
    }
    if not_before > now + Duration::from_secs(300) {
        return fail("notBefore is in the future");
    }
    let issuer_der = tbs.issuer.to_der().map_err(internal("issuer"))?;
    if issuer_der != ca.subject_der {
        return fail("issuer is not the CA's subject");
    }
    let Some(exts) = &tbs.extensions else {
        return fail("no extensions");
    };
    let mut seen = std::collections::HashSet::new();
    for e in exts {
        if !seen.insert(e.extn_id) {
            return fail("duplicate extension");
        }
    }
    let san = exts.iter().find(|e| e.extn_id == SubjectAltName::OID);
    match san {
        None if tbs.subject.0.is_empty() => return fail("neither a subject nor a subjectAltName"),
        Some(e) if tbs.subject.0.is_empty() && !e.critical => {
            return fail("empty subject with a non-critical subjectAltName")
        }
        _ => {}
    }
    match exts.iter().find(|e| e.extn_id == KeyUsage::OID) {
        Some(e) => {
            let ku = KeyUsage::from_der(e.extn_value.as_bytes()).map_err(internal("key usage"))?;
            if ku.0.is_empty() {
                return fail("key usage has no bit set for this key type");
            }
        }
        None => return fail("no key usage"),
    }
    Ok(())
}

/// Sign linted TBS bytes with the CA key and assemble the certificate's DER.
pub fn sign(ca: &CaMaterial, tbs: &LintedTbs) -> Result<Vec<u8>, EngineError> {
    let tbs_der = tbs.der();
    let signature = signature(ca, tbs_der)?;
    assemble(tbs_der, ca.signature_algorithm.algorithm_identifier_der(), &signature)
}

/// The CA key's signature over `tbs_der` (a TBSCertificate or a TBSCertList): the one place a CA
/// key signs, whatever it signs.
pub(crate) fn signature(ca: &CaMaterial, tbs_der: &[u8]) -> Result<Vec<u8>, EngineError> {
    let signer_failure = |reason: String| EngineError::SignerFailure { ca: ca.id.clone(), reason };
    ca.key.sign(tbs_der).map_err(signer_failure)
}

/// Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signatureValue BIT STRING }
/// (a CertificateList has the same shape).
pub(crate) fn assemble(tbs_der: &[u8], algorithm_der: &[u8], signature: &[u8]) -> Result<Vec<u8>, EngineError> {
    let bits =
        BitString::from_bytes(signature).map_err(internal("signature"))?.to_der().map_err(internal("signature"))?;
    let body_len = tbs_der.len() + algorithm_der.len() + bits.len();
    let header = Header::new(Tag::Sequence, Length::try_from(body_len).map_err(internal("length"))?)
        .map_err(internal("header"))?;
    let mut out = header.to_der().map_err(internal("header"))?;
    out.reserve(body_len);
    out.extend_from_slice(tbs_der);
    out.extend_from_slice(algorithm_der);
    out.extend_from_slice(&bits);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::UNIX_EPOCH;

    use openssl::hash::MessageDigest;
    use openssl::x509::X509;
    use x509_parser::prelude::{FromDer, GeneralName as Parsed, ParsedExtension, X509Certificate};

    use super::*;
    use crate::config::{Config, ProfileConfig};
    use crate::pki::csr::check_csr_der;
    use crate::pki::csr::tests::request;
    use crate::pki::devpki::generate_key;

    fn ca(id: &str) -> CaMaterial {
        let config = Config::load(Some(&Path::new(env!("CARGO_MANIFEST_DIR")).join("keys-dev/castellum.toml")))
            .expect("the dev configuration");
        CaMaterial::load(config.cas.iter().find(|c| c.id == id).expect("a dev CA")).expect("the dev CA loads")
    }

    fn profile(key_usage: &str, eku: &str) -> Profile {
        let cfg: ProfileConfig = toml::from_str(&format!(
            "id = \"p\"\nca = \"ica-p256\"\nvalidity = \"90d\"\nbackdate = \"60s\"\nkey_usage = [{key_usage}]\nextended_key_usage = [{eku}]\nallowed_keys = [\"ecdsa-p256\", \"rsa\", \"ed25519\"]"
        ))
        .expect("a valid profile");
        Profile::from_config(&cfg)
    }

    fn checked_csr(kind: KeyType, name: &str) -> CheckedCsr {
        let digest = if kind == KeyType::Ed25519 { MessageDigest::null() } else { MessageDigest::sha256() };
        check_csr_der(request(&generate_key(kind).unwrap(), &[name], &[name], digest)).unwrap()
    }

    fn names(cn: Option<&str>, org: Option<&str>, sans: &[&str]) -> ApprovedNames {
        ApprovedNames {
            common_name: cn.map(String::from),
            organization: org.map(String::from),
            sans: sans.iter().map(|s| SanName::Dns(s.to_string())).collect(),
        }
    }

    /// 2026-11-27T12:00:00Z: whole seconds, so validity can be compared exactly.
    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_795_780_800)
    }

    /// A prepared certificate signed by the CA and read back by x509-parser, a parser that is not
    /// the x509-cert encoder that built it.
    fn issue(ca: &CaMaterial, profile: &Profile, csr: &CheckedCsr, names: &ApprovedNames) -> (PreparedCert, Vec<u8>) {
        let prepared = prepare(ca, profile, csr, names, now()).expect("prepared");
        let der = sign(ca, &prepared.tbs).expect("signed");
        (prepared, der)
    }

    #[test]
    fn a_prepared_certificate_carries_what_the_profile_and_request_say() {
        let ca = ca("ica-p256");
        let csr = checked_csr(KeyType::EcdsaP256, "www.example.test");
        let p = profile("\"digital_signature\", \"key_agreement\"", "\"server_auth\", \"client_auth\"");
        let (prepared, der) =
            issue(&ca, &p, &csr, &names(Some("www.example.test"), None, &["www.example.test", "a.example.test"]));
        // The signature verifies with the CA's public key (openssl, not our code).
        let cert = X509::from_der(&der).unwrap();
        assert!(cert.verify(&ca.cert.public_key().unwrap()).unwrap());
        let (_, parsed) = X509Certificate::from_der(&der).unwrap();
        let serial = parsed.raw_serial();
        assert_eq!(serial.len(), 20);
        assert!((1..=0x7f).contains(&serial[0]));
        assert_eq!(hex::encode(serial), prepared.serial_hex);
        assert_eq!(parsed.validity().not_before.timestamp(), 1_795_780_800 - 60);
        assert_eq!(parsed.validity().not_after.timestamp() - parsed.validity().not_before.timestamp(), 90 * 86_400);
        assert_eq!(prepared.not_before_ms, (1_795_780_800 - 60) * 1000);
        assert_eq!(prepared.not_after_ms - prepared.not_before_ms, 90 * 86_400 * 1000);
        assert_eq!(parsed.issuer().as_raw(), ca.subject_der.as_slice());
        assert_eq!(parsed.subject().to_string(), "CN=www.example.test");
        assert_eq!(parsed.public_key().raw, csr.spki_der.as_slice());
        let exts = parsed.extensions();
        let find = |oid: &str| exts.iter().find(|e| e.oid.to_id_string() == oid).unwrap_or_else(|| panic!("{oid}"));
        let bc = find("2.5.29.19");
        assert!(bc.critical);
        assert!(matches!(bc.parsed_extension(), ParsedExtension::BasicConstraints(b) if !b.ca));
        let ku = find("2.5.29.15");
        assert!(ku.critical);
        match ku.parsed_extension() {
            ParsedExtension::KeyUsage(k) => {
                assert!(k.digital_signature() && k.key_agreement());
                assert!(!k.key_encipherment() && !k.non_repudiation() && !k.data_encipherment());
            }
            other => panic!("{other:?}"),
        }
        let eku = find("2.5.29.37");
        assert!(!eku.critical);
        match eku.parsed_extension() {
            ParsedExtension::ExtendedKeyUsage(e) => {
                assert!(e.server_auth && e.client_auth && !e.code_signing && !e.ocsp_signing && e.other.is_empty())
            }
            other => panic!("{other:?}"),
        }
        let ski = find("2.5.29.14");
        let expected_ski = openssl::sha::sha1(parsed.public_key().subject_public_key.data.as_ref());
        assert!(matches!(ski.parsed_extension(), ParsedExtension::SubjectKeyIdentifier(k) if k.0 == expected_ski));
        let aki = find("2.5.29.35");
        assert!(matches!(aki.parsed_extension(), ParsedExtension::AuthorityKeyIdentifier(a)
            if a.key_identifier.as_ref().map(|k| k.0) == Some(ca.subject_key_id.as_slice())));
        let san = find("2.5.29.17");
        assert!(!san.critical, "a subject is present: the SAN is not critical");
        match san.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(s) => assert_eq!(
                s.general_names,
                vec![Parsed::DNSName("www.example.test"), Parsed::DNSName("a.example.test")]
            ),
            other => panic!("{other:?}"),
        }
        // The dev CA has a base URL: its CRL shard and its certificate are named.
        let crl = format!("http://127.0.0.1:8080/crl/ica-p256/{}.crl", prepared.crl_shard);
        match find("2.5.29.31").parsed_extension() {
            ParsedExtension::CRLDistributionPoints(points) => {
                assert!(format!("{:?}", points.points).contains(&crl), "{points:?}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(prepared.crl_shard, u32::from(serial[19]) % 4, "the shard comes from the serial's random tail");
        match find("1.3.6.1.5.5.7.1.1").parsed_extension() {
            ParsedExtension::AuthorityInfoAccess(aia) => {
                assert!(format!("{aia:?}").contains("http://127.0.0.1:8080/ca/ica-p256.der"), "{aia:?}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(exts.len(), 8);
    }

    #[test]
    fn without_a_subject_the_san_is_critical_and_without_ekus_there_is_no_eku_extension() {
        let ca = ca("ica-p256");
        let csr = checked_csr(KeyType::EcdsaP256, "a.example.test");
        let (_, der) = issue(&ca, &profile("\"digital_signature\"", ""), &csr, &names(None, None, &["a.example.test"]));
        let (_, parsed) = X509Certificate::from_der(&der).unwrap();
        assert!(parsed.subject().as_raw().len() <= 2, "an empty subject");
        let san = parsed.extensions().iter().find(|e| e.oid.to_id_string() == "2.5.29.17").unwrap();
        assert!(san.critical);
        assert!(parsed.extensions().iter().all(|e| e.oid.to_id_string() != "2.5.29.37"));
    }

    #[test]
    fn an_identity_subject_is_organisation_then_common_name_and_may_have_no_san() {
        let ca = ca("ica-p256");
        let csr = checked_csr(KeyType::EcdsaP256, "x.example.test");
        let (_, der) =
            issue(&ca, &profile("\"digital_signature\"", ""), &csr, &names(Some("Signer 1"), Some("Example Ltd"), &[]));
        let (_, parsed) = X509Certificate::from_der(&der).unwrap();
        assert_eq!(parsed.subject().to_string(), "O=Example Ltd, CN=Signer 1");
        assert!(parsed.extensions().iter().all(|e| e.oid.to_id_string() != "2.5.29.17"));
    }

    #[test]
    fn key_usage_bits_follow_the_key_type() {
        let all = profile(
            "\"digital_signature\", \"non_repudiation\", \"key_encipherment\", \"data_encipherment\", \"key_agreement\"",
            "",
        );
        use KeyUsages::*;
        let bits = |k| key_usage_flags(&all, k).0;
        assert_eq!(bits(KeyType::Rsa), DigitalSignature | NonRepudiation | KeyEncipherment | DataEncipherment);
        for ec in [KeyType::EcdsaP256, KeyType::EcdsaP384, KeyType::EcdsaP521] {
            assert_eq!(bits(ec), DigitalSignature | NonRepudiation | KeyAgreement, "{ec:?}");
        }
        assert_eq!(bits(KeyType::Ed25519), DigitalSignature | NonRepudiation);
    }

    #[test]
    fn extended_key_usages_have_their_registered_oids() {
        use ExtendedKeyUsageName::*;
        let expected = [
            (ServerAuth, "1.3.6.1.5.5.7.3.1"),
            (ClientAuth, "1.3.6.1.5.5.7.3.2"),
            (CodeSigning, "1.3.6.1.5.5.7.3.3"),
            (EmailProtection, "1.3.6.1.5.5.7.3.4"),
            (TimeStamping, "1.3.6.1.5.5.7.3.8"),
            (OcspSigning, "1.3.6.1.5.5.7.3.9"),
            (DocumentSigning, "1.3.6.1.5.5.7.3.36"),
        ];
        for (eku, oid) in expected {
            assert_eq!(eku_oid(eku).to_string(), oid, "{eku:?}");
        }
    }

    #[test]
    fn times_are_utc_through_2049_and_generalized_from_2050() {
        let end_2049 = UNIX_EPOCH + Duration::from_secs(2_524_607_999); // 2049-12-31T23:59:59Z
        assert!(matches!(rfc5280_time(end_2049).unwrap(), Time::UtcTime(_)));
        assert!(matches!(rfc5280_time(end_2049 + Duration::from_secs(1)).unwrap(), Time::GeneralTime(_)));
    }

    #[test]
    fn serials_are_positive_20_octet_integers_that_never_repeat_and_grow_with_time() {
        let mut seen = std::collections::HashSet::new();
        let first = new_serial();
        for _ in 0..2000 {
            let s = new_serial();
            assert!((1..=0x7f).contains(&s[0]), "{s:?}");
            assert!(seen.insert(s), "a serial came twice");
            assert!(s[..7] >= first[..7], "the time prefix never goes back");
        }
        std::thread::sleep(Duration::from_millis(2));
        assert!(new_serial() > first, "a later serial sorts after an earlier one");
        // The random tail: 13 octets that differ between serials of the same millisecond.
        let (a, b) = (new_serial(), new_serial());
        assert_ne!(a[7..], b[7..]);
    }

    #[test]
    fn rsa_and_ed25519_cas_sign_what_openssl_verifies() {
        for (id, kind) in
            [("ica-rsa3072", KeyType::Rsa), ("ica-ed25519", KeyType::Ed25519), ("ica-p384", KeyType::EcdsaP256)]
        {
            let ca = ca(id);
            let csr = checked_csr(kind, "a.example.test");
            let (_, der) =
                issue(&ca, &profile("\"digital_signature\"", ""), &csr, &names(None, None, &["a.example.test"]));
            let cert = X509::from_der(&der).unwrap();
            assert!(cert.verify(&ca.cert.public_key().unwrap()).unwrap(), "{id}");
        }
    }

    /// Lint refuses each property broken alone, starting from a TBS that passes.
    #[test]
    fn lint_refuses_each_broken_property() {
        let ca = ca("ica-p256");
        let csr = checked_csr(KeyType::EcdsaP256, "a.example.test");
        let p = profile("\"digital_signature\"", "");
        let prepared =
            prepare(&ca, &p, &csr, &names(Some("a.example.test"), None, &["a.example.test"]), now()).unwrap();
        let good = TbsCertificate::from_der(prepared.tbs.der()).unwrap();
        lint(&good, &ca, now()).expect("the prepared TBS passes");
        let refused = |edit: &dyn Fn(&mut TbsCertificate), why: &str| {
            let mut tbs = good.clone();
            edit(&mut tbs);
            match lint(&tbs, &ca, now()) {
                Err(EngineError::Internal(msg)) => assert!(msg.contains(why), "{msg} (expected {why})"),
                other => panic!("expected {why}, got {other:?}"),
            }
        };
        let at = |t: SystemTime| Time::GeneralTime(GeneralizedTime::from_system_time(t).unwrap());
        // A negative INTEGER, and one of 21 octets (x509-cert decodes both; RFC 5280 forbids them).
        refused(&|t| t.serial_number = SerialNumber::from_der(&[0x02, 0x01, 0x80]).unwrap(), "serial");
        let long: Vec<u8> = [0x02, 21].into_iter().chain([0x01; 21]).collect();
        refused(&|t| t.serial_number = SerialNumber::from_der(&long).unwrap(), "serial");
        refused(&|t| t.validity.not_after = t.validity.not_before, "notAfter is not after notBefore");
        refused(&|t| t.validity.not_after = at(ca.not_after + Duration::from_secs(1)), "outlive its CA");
        refused(&|t| t.validity.not_before = at(now() + Duration::from_secs(301)), "notBefore is in the future");
        refused(&|t| t.issuer = RdnSequence(Vec::new()), "issuer is not the CA's subject");
        refused(&|t| t.extensions = None, "no extensions");
        refused(
            &|t| {
                let exts = t.extensions.as_mut().unwrap();
                exts.push(exts[0].clone());
            },
            "duplicate extension",
        );
        refused(&|t| t.extensions.as_mut().unwrap().retain(|e| e.extn_id != KeyUsage::OID), "no key usage");
        refused(
            &|t| {
                let ku = extension(&KeyUsage(der::flagset::FlagSet::default()), true).unwrap();
                let exts = t.extensions.as_mut().unwrap();
                exts.retain(|e| e.extn_id != KeyUsage::OID);
                exts.push(ku);
            },
            "key usage has no bit set",
        );
        refused(
            &|t| {
                t.subject = RdnSequence(Vec::new());
                t.extensions.as_mut().unwrap().retain(|e| e.extn_id != SubjectAltName::OID);
            },
            "neither a subject nor a subjectAltName",
        );
        refused(&|t| t.subject = RdnSequence(Vec::new()), "empty subject with a non-critical subjectAltName");
        // At the edges: exactly 300 s ahead, and ending with the CA, pass.
        let mut edge = good.clone();
        edge.validity.not_before = at(now() + Duration::from_secs(300));
        edge.validity.not_after = at(ca.not_after);
        lint(&edge, &ca, now()).expect("notBefore 300 s ahead and notAfter = the CA's notAfter pass");
        // A shorter positive serial is not what castellum makes, but it is not wrong.
        let mut short = good.clone();
        short.serial_number = SerialNumber::new(&[0x01; 19]).unwrap();
        lint(&short, &ca, now()).expect("a 19-octet serial passes");
    }
}
