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
use openssl::sign::Signer;
use x509_cert::attr::AttributeTypeAndValue;
use x509_cert::certificate::{TbsCertificate, Version};
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::{
    AuthorityKeyIdentifier, BasicConstraints, ExtendedKeyUsage, KeyUsage, KeyUsages, SubjectAltName,
    SubjectKeyIdentifier,
};
use x509_cert::ext::Extension;
use x509_cert::name::{Name, RdnSequence, RelativeDistinguishedName};
use x509_cert::serial_number::SerialNumber;
use x509_cert::spki::{AlgorithmIdentifierOwned, SubjectPublicKeyInfoOwned};
use x509_cert::time::{Time, Validity};

use super::ca::CaMaterial;
use super::csr::{CheckedCsr, SanName};
use super::profile::{ApprovedNames, Profile};
use crate::config::{ExtendedKeyUsageName, KeyType, KeyUsageName};
use crate::error::EngineError;

/// A certificate ready to be signed: recorded by the Store before the signature exists.
#[derive(Debug, Clone)]
pub struct PreparedCert {
    pub serial_hex: String,
    pub tbs_der: Vec<u8>,
    pub not_before_ms: i64,
    pub not_after_ms: i64,
}

fn internal(what: &str) -> impl Fn(der::Error) -> EngineError + '_ {
    move |e| EngineError::Internal(format!("{what}: {e}"))
}

/// 20 random bytes, first byte in 0x01..=0x7f: a positive INTEGER of exactly 20 octets,
/// at least 150 bits of entropy, never needing a sign-padding byte.
pub fn random_serial() -> [u8; 20] {
    let mut serial = [0u8; 20];
    openssl::rand::rand_bytes(&mut serial).expect("the OS random generator works");
    serial[0] = (serial[0] & 0x7f).max(1);
    serial
}

fn extension<T: AssociatedOid + Encode>(value: &T, critical: bool) -> Result<Extension, EngineError> {
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
fn rfc5280_time(t: SystemTime) -> Result<Time, EngineError> {
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
    let serial = random_serial();
    let not_before = now - profile.backdate;
    let not_after = not_before + profile.validity;
    let spki = SubjectPublicKeyInfoOwned::from_der(&csr.spki_der).map_err(internal("public key"))?;
    let subject = subject_name(names)?;
    let issuer = Name::from_der(&ca.subject_der).map_err(internal("issuer"))?;
    let signature = AlgorithmIdentifierOwned::from_der(ca.signature_algorithm.algorithm_identifier_der())
        .map_err(internal("signature algorithm"))?;

    let ski = openssl::sha::sha1(spki.subject_public_key.raw_bytes());
    let sans = names.sans.iter().map(general_name).collect::<Result<Vec<_>, _>>()?;
    let mut extensions = vec![
        extension(&BasicConstraints { ca: false, path_len_constraint: None }, true)?,
        extension(&key_usage_flags(profile, csr.key_type), true)?,
    ];
    if !profile.extended_key_usage.is_empty() {
        let ekus = profile.extended_key_usage.iter().map(|e| eku_oid(*e)).collect();
        extensions.push(extension(&ExtendedKeyUsage(ekus), false)?);
    }
    extensions.push(extension(&SubjectKeyIdentifier(OctetString::new(ski.to_vec()).map_err(internal("SKI"))?), false)?);
    extensions.push(extension(
        &AuthorityKeyIdentifier {
            key_identifier: Some(OctetString::new(ca.subject_key_id.clone()).map_err(internal("AKI"))?),
            authority_cert_issuer: None,
            authority_cert_serial_number: None,
        },
        false,
    )?);
    // RFC 5280 4.2.1.6: with an empty subject the subjectAltName must be critical. An identity
    // named by its subject alone (no email) has none.
    if !sans.is_empty() {
        extensions.push(extension(&SubjectAltName(sans), subject.0.is_empty())?);
    }

    let tbs = TbsCertificate {
        version: Version::V3,
        serial_number: SerialNumber::new(&serial).map_err(internal("serial"))?,
        signature,
        issuer,
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
        tbs_der: tbs.to_der().map_err(internal("TBS"))?,
        not_before_ms: super::unix_ms(not_before),
        not_after_ms: super::unix_ms(not_after),
    })
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

/// Sign prepared TBS bytes with the CA key and assemble the certificate's DER.
pub fn sign(ca: &CaMaterial, tbs_der: &[u8]) -> Result<Vec<u8>, EngineError> {
    let signer_failure = |reason: String| EngineError::SignerFailure { ca: ca.id.clone(), reason };
    let signature = ca
        .key
        .with_key(|key| -> Result<Vec<u8>, openssl::error::ErrorStack> {
            match ca.signature_algorithm.digest() {
                Some(md) => {
                    let mut signer = Signer::new(md, key)?;
                    signer.update(tbs_der)?;
                    signer.sign_to_vec()
                }
                None => Signer::new_without_digest(key)?.sign_oneshot_to_vec(tbs_der),
            }
        })
        .map_err(signer_failure)?
        .map_err(|e| signer_failure(e.to_string()))?;
    assemble(tbs_der, ca.signature_algorithm.algorithm_identifier_der(), &signature)
}

/// Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signatureValue BIT STRING }
fn assemble(tbs_der: &[u8], algorithm_der: &[u8], signature: &[u8]) -> Result<Vec<u8>, EngineError> {
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
