//! Building and signing one CRL shard (RFC 5280 section 5, Baseline Requirements 7.2).
//!
//! The TBSCertList is built with x509-cert and signed by [`super::tbs::signature`], the same
//! path certificates take to the CA key. rust-openssl's CRL builder is not used: it cannot write
//! per-entry reason codes.

use std::time::{Duration, SystemTime};

use const_oid::db::rfc5280::ID_CE_ISSUING_DISTRIBUTION_POINT;
use der::asn1::{OctetString, Uint};
use der::{Decode, Encode};
use x509_cert::crl::{RevokedCert, TbsCertList};
use x509_cert::ext::pkix::crl::dp::IssuingDistributionPoint;
use x509_cert::ext::pkix::crl::CrlNumber;
use x509_cert::ext::pkix::name::DistributionPointName;
use x509_cert::ext::pkix::{AuthorityKeyIdentifier, CrlReason};
use x509_cert::ext::Extension;
use x509_cert::name::Name;
use x509_cert::serial_number::SerialNumber;
use x509_cert::spki::AlgorithmIdentifierOwned;
use x509_cert::Version;

use super::ca::CaMaterial;
use super::tbs::{assemble, extension, internal, rfc5280_time, signature, uri};
use super::vocabulary::RevocationReason;
use crate::error::EngineError;

/// One revoked certificate on a CRL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrlEntry {
    pub serial_hex: String,
    pub revoked_at: SystemTime,
    pub reason: RevocationReason,
}

/// What a shard's CRL says.
#[derive(Debug)]
pub struct CrlContents<'a> {
    pub shard: u32,
    /// Greater than every earlier CRL number of this shard.
    pub number: u64,
    pub this_update: SystemTime,
    pub next_update: SystemTime,
    pub entries: &'a [CrlEntry],
}

/// The x509-cert form of a reason (CRL entries and OCSP answers).
pub(crate) fn crl_reason(reason: RevocationReason) -> CrlReason {
    match reason {
        RevocationReason::Unspecified => CrlReason::Unspecified,
        RevocationReason::KeyCompromise => CrlReason::KeyCompromise,
        RevocationReason::CaCompromise => CrlReason::CaCompromise,
        RevocationReason::AffiliationChanged => CrlReason::AffiliationChanged,
        RevocationReason::Superseded => CrlReason::Superseded,
        RevocationReason::CessationOfOperation => CrlReason::CessationOfOperation,
        RevocationReason::PrivilegeWithdrawn => CrlReason::PrivilegeWithdrawn,
        RevocationReason::AaCompromise => CrlReason::AaCompromise,
    }
}

fn entry(e: &CrlEntry) -> Result<RevokedCert, EngineError> {
    let serial = hex::decode(&e.serial_hex).map_err(|_| EngineError::Internal(format!("serial {:?}", e.serial_hex)))?;
    // Baseline Requirements 7.2.2: no reasonCode for `unspecified`.
    let extensions = match e.reason {
        RevocationReason::Unspecified => None,
        reason => Some(vec![extension(&crl_reason(reason), false)?]),
    };
    Ok(RevokedCert {
        serial_number: SerialNumber::new(&serial).map_err(internal("serial"))?,
        // Whole seconds: RFC 5280 times carry no fraction.
        revocation_date: rfc5280_time(whole_seconds(e.revoked_at))?,
        crl_entry_extensions: extensions,
    })
}

fn whole_seconds(t: SystemTime) -> SystemTime {
    let since = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    SystemTime::UNIX_EPOCH + Duration::from_secs(since.as_secs())
}

/// Build the shard's TBSCertList and sign it with the CA key: the CRL's DER.
pub fn sign_crl(ca: &CaMaterial, crl: &CrlContents<'_>) -> Result<Vec<u8>, EngineError> {
    let mut entries = crl.entries.iter().map(entry).collect::<Result<Vec<_>, _>>()?;
    entries.sort_by(|a, b| a.serial_number.as_bytes().cmp(b.serial_number.as_bytes()));

    let number = Uint::new(&crl.number.to_be_bytes()).map_err(internal("CRL number"))?;
    let aki = AuthorityKeyIdentifier {
        key_identifier: Some(OctetString::new(ca.subject_key_id.clone()).map_err(internal("AKI"))?),
        authority_cert_issuer: None,
        authority_cert_serial_number: None,
    };
    // The shard's own URL, as its certificates name it: a relying party can tell this CRL
    // covers them (RFC 5280 5.2.5). x509-cert 0.2 gives IssuingDistributionPoint the wrong OID
    // (subjectInfoAccess), so the extension is written with the right one here.
    let idp = IssuingDistributionPoint {
        distribution_point: match ca.crl_url(crl.shard) {
            Some(url) => Some(DistributionPointName::FullName(vec![uri(&url)?])),
            None => None,
        },
        only_contains_user_certs: true,
        only_contains_ca_certs: false,
        only_some_reasons: None,
        indirect_crl: false,
        only_contains_attribute_certs: false,
    };
    let idp = Extension {
        extn_id: ID_CE_ISSUING_DISTRIBUTION_POINT,
        critical: true,
        extn_value: OctetString::new(idp.to_der().map_err(internal("IDP"))?).map_err(internal("IDP"))?,
    };

    let tbs = TbsCertList {
        version: Version::V2,
        signature: AlgorithmIdentifierOwned::from_der(ca.signature_algorithm.algorithm_identifier_der())
            .map_err(internal("signature algorithm"))?,
        issuer: Name::from_der(&ca.subject_der).map_err(internal("issuer"))?,
        this_update: rfc5280_time(whole_seconds(crl.this_update))?,
        next_update: Some(rfc5280_time(whole_seconds(crl.next_update))?),
        revoked_certificates: (!entries.is_empty()).then_some(entries),
        crl_extensions: Some(vec![extension(&aki, false)?, extension(&CrlNumber(number), false)?, idp]),
    };
    let tbs_der = tbs.to_der().map_err(internal("TBSCertList"))?;
    let signature = signature(ca, &tbs_der)?;
    assemble(&tbs_der, ca.signature_algorithm.algorithm_identifier_der(), &signature)
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::UNIX_EPOCH;

    use openssl::x509::X509Crl;
    use x509_parser::prelude::{FromDer, ParsedExtension};
    use x509_parser::revocation_list::CertificateRevocationList;

    use super::*;
    use crate::config::Config;

    fn ca(id: &str) -> CaMaterial {
        let mut config = Config::load(Some(&Path::new(env!("CARGO_MANIFEST_DIR")).join("keys-dev/castellum.toml")))
            .expect("the dev configuration");
        let ca = config.cas.iter_mut().find(|c| c.id == id).expect("a dev CA");
        ca.base_url = Some("http://crl.example.test".into());
        CaMaterial::load(ca).expect("the dev CA loads")
    }

    #[test]
    fn a_crl_carries_its_entries_reasons_number_and_distribution_point_and_verifies() {
        let ca = ca("ica-p256");
        let at = UNIX_EPOCH + Duration::from_secs(1_795_780_800);
        let entries = [
            CrlEntry { serial_hex: "01aa".into(), revoked_at: at, reason: RevocationReason::KeyCompromise },
            CrlEntry { serial_hex: "0155".into(), revoked_at: at, reason: RevocationReason::Unspecified },
        ];
        let der = sign_crl(
            &ca,
            &CrlContents {
                shard: 3,
                number: 300,
                this_update: at,
                next_update: at + Duration::from_secs(86_400),
                entries: &entries,
            },
        )
        .unwrap();
        // openssl checks the signature; x509-parser (not the encoder) reads the rest.
        let crl = X509Crl::from_der(&der).unwrap();
        assert!(crl.verify(&ca.cert.public_key().unwrap()).unwrap());
        let (_, parsed) = CertificateRevocationList::from_der(&der).unwrap();
        assert_eq!(parsed.version(), Some(x509_parser::x509::X509Version(1)));
        assert_eq!(parsed.crl_number().map(|n| n.to_string()), Some("300".into()));
        let revoked: Vec<_> = parsed.iter_revoked_certificates().collect();
        assert_eq!(revoked.len(), 2);
        assert_eq!(hex::encode(revoked[0].raw_serial()), "0155", "sorted by serial");
        assert_eq!(revoked[0].reason_code(), None, "no reasonCode for unspecified");
        assert_eq!(revoked[1].reason_code().map(|(_, r)| r.0), Some(1));
        let idp = parsed.extensions().iter().find(|e| e.oid.to_id_string() == "2.5.29.28").expect("IDP");
        assert!(idp.critical);
        match idp.parsed_extension() {
            ParsedExtension::IssuingDistributionPoint(p) => {
                assert!(p.only_contains_user_certs);
                let text = format!("{:?}", p.distribution_point);
                assert!(text.contains("http://crl.example.test/crl/ica-p256/3.crl"), "{text}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(parsed.last_update().timestamp(), 1_795_780_800);
        assert_eq!(parsed.next_update().map(|t| t.timestamp()), Some(1_795_780_800 + 86_400));
    }
}
