//! The PKI's own vocabulary: key types, key usages, signature schemes and lanes. Configuration
//! names them, and so does everything cryptographic; they live here so that `pki` depends on
//! nothing above it for its words.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Lane {
    Interactive,
    Background,
}

impl Lane {
    pub fn as_str(self) -> &'static str {
        match self {
            Lane::Interactive => "interactive",
            Lane::Background => "background",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyUsageName {
    DigitalSignature,
    NonRepudiation,
    KeyEncipherment,
    DataEncipherment,
    KeyAgreement,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExtendedKeyUsageName {
    ServerAuth,
    ClientAuth,
    CodeSigning,
    EmailProtection,
    TimeStamping,
    OcspSigning,
    /// id-kp-documentSigning (RFC 9336).
    DocumentSigning,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyType {
    EcdsaP256,
    EcdsaP384,
    EcdsaP521,
    Rsa,
    Ed25519,
}

impl KeyType {
    pub fn parse(name: &str) -> Option<KeyType> {
        [KeyType::EcdsaP256, KeyType::EcdsaP384, KeyType::EcdsaP521, KeyType::Rsa, KeyType::Ed25519]
            .into_iter()
            .find(|k| k.as_str() == name)
    }

    /// The name configuration and the API use.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyType::EcdsaP256 => "ecdsa-p256",
            KeyType::EcdsaP384 => "ecdsa-p384",
            KeyType::EcdsaP521 => "ecdsa-p521",
            KeyType::Rsa => "rsa",
            KeyType::Ed25519 => "ed25519",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RsaSignatureScheme {
    /// RSASSA-PKCS1-v1_5.
    #[default]
    Pkcs1,
    /// RSASSA-PSS, MGF1 with the digest's hash, salt as long as the digest.
    Pss,
}

/// Why a certificate was revoked: RFC 5280 5.3.1's CRLReason, named as the RFC names it (the
/// API's `reason`). `removeFromCRL` (delta CRLs only) and `certificateHold` (forbidden by the
/// Baseline Requirements) are not offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum RevocationReason {
    Unspecified,
    KeyCompromise,
    #[serde(rename = "cACompromise")]
    CaCompromise,
    AffiliationChanged,
    Superseded,
    CessationOfOperation,
    PrivilegeWithdrawn,
    #[serde(rename = "aACompromise")]
    AaCompromise,
}

impl RevocationReason {
    pub const ALL: [RevocationReason; 8] = [
        Self::Unspecified,
        Self::KeyCompromise,
        Self::CaCompromise,
        Self::AffiliationChanged,
        Self::Superseded,
        Self::CessationOfOperation,
        Self::PrivilegeWithdrawn,
        Self::AaCompromise,
    ];

    /// The CRLReason code (stored, and written into CRL entries and OCSP answers).
    pub const fn code(self) -> i32 {
        match self {
            Self::Unspecified => 0,
            Self::KeyCompromise => 1,
            Self::CaCompromise => 2,
            Self::AffiliationChanged => 3,
            Self::Superseded => 4,
            Self::CessationOfOperation => 5,
            Self::PrivilegeWithdrawn => 9,
            Self::AaCompromise => 10,
        }
    }

    pub fn from_code(code: i32) -> Option<RevocationReason> {
        Self::ALL.into_iter().find(|r| r.code() == code)
    }

    /// The name the API and the RFC use.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Unspecified => "unspecified",
            Self::KeyCompromise => "keyCompromise",
            Self::CaCompromise => "cACompromise",
            Self::AffiliationChanged => "affiliationChanged",
            Self::Superseded => "superseded",
            Self::CessationOfOperation => "cessationOfOperation",
            Self::PrivilegeWithdrawn => "privilegeWithdrawn",
            Self::AaCompromise => "aACompromise",
        }
    }

    /// The reasons a subscriber may give for its own certificate (Baseline Requirements
    /// 4.9.1.1 and 7.2.2: the others are the CA's to assert).
    pub const fn subscriber_may_give(self) -> bool {
        matches!(
            self,
            Self::Unspecified
                | Self::KeyCompromise
                | Self::Superseded
                | Self::CessationOfOperation
                | Self::AffiliationChanged
        )
    }
}

/// Signature algorithms castellum signs with, one per CA key type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureAlgorithm {
    EcdsaSha256,
    EcdsaSha384,
    EcdsaSha512,
    RsaSha256,
    /// RSASSA-PSS with SHA-256, MGF1-SHA-256 and a 32-byte salt (the one PSS encoding the
    /// Baseline Requirements 7.1.3.2.1 allow with SHA-256).
    RsaPssSha256,
    Ed25519,
}

impl SignatureAlgorithm {
    /// The algorithm a CA key of `key_type` signs with (`rsa` names the RSA scheme).
    pub fn for_key(key_type: KeyType, rsa: RsaSignatureScheme) -> SignatureAlgorithm {
        match (key_type, rsa) {
            (KeyType::EcdsaP256, _) => Self::EcdsaSha256,
            (KeyType::EcdsaP384, _) => Self::EcdsaSha384,
            (KeyType::EcdsaP521, _) => Self::EcdsaSha512,
            (KeyType::Rsa, RsaSignatureScheme::Pkcs1) => Self::RsaSha256,
            (KeyType::Rsa, RsaSignatureScheme::Pss) => Self::RsaPssSha256,
            (KeyType::Ed25519, _) => Self::Ed25519,
        }
    }

    /// DER of the AlgorithmIdentifier (RFC 5758, RFC 4055, RFC 8410).
    pub fn algorithm_identifier_der(self) -> &'static [u8] {
        match self {
            // ecdsa-with-SHA256, no parameters
            Self::EcdsaSha256 => &[0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02],
            Self::EcdsaSha384 => &[0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03],
            Self::EcdsaSha512 => &[0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x04],
            // sha256WithRSAEncryption, NULL parameters
            Self::RsaSha256 => {
                &[0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0b, 0x05, 0x00]
            }
            // id-RSASSA-PSS with SHA-256, MGF1-SHA-256, salt 32: the Baseline Requirements' bytes
            Self::RsaPssSha256 => &[
                0x30, 0x41, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0a, 0x30, 0x34, 0xa0, 0x0f,
                0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05, 0x00, 0xa1, 0x1c,
                0x30, 0x1a, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x08, 0x30, 0x0d, 0x06, 0x09,
                0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05, 0x00, 0xa2, 0x03, 0x02, 0x01, 0x20,
            ],
            // id-Ed25519, absent parameters
            Self::Ed25519 => &[0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70],
        }
    }

    pub fn digest(self) -> Option<openssl::hash::MessageDigest> {
        use openssl::hash::MessageDigest;
        match self {
            Self::EcdsaSha256 | Self::RsaSha256 | Self::RsaPssSha256 => Some(MessageDigest::sha256()),
            Self::EcdsaSha384 => Some(MessageDigest::sha384()),
            Self::EcdsaSha512 => Some(MessageDigest::sha512()),
            Self::Ed25519 => None,
        }
    }
}
