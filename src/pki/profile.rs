//! A profile compiled from configuration: what a certificate of this profile may and must carry.

use std::collections::HashSet;
use std::time::Duration;

use super::csr::{is_valid_dns_name, is_valid_email, CheckedCsr, SanName};
use crate::config::{ExtendedKeyUsageName, IdentityPolicy, KeyType, KeyUsageName, Lane, NamePolicy, ProfileConfig};
use crate::error::EngineError;

#[derive(Debug, Clone)]
pub struct Profile {
    pub id: String,
    pub ca: String,
    pub lane: Lane,
    pub validity: Duration,
    pub backdate: Duration,
    pub key_usage: Vec<KeyUsageName>,
    pub extended_key_usage: Vec<ExtendedKeyUsageName>,
    pub allowed_keys: HashSet<KeyType>,
    pub min_rsa_bits: u32,
    pub names: NamePolicy,
    /// Set for profiles that issue disposable identities (the engine makes the key).
    pub identity: Option<IdentityPolicy>,
}

/// What the profile approved of a CSR: the names and the subject to issue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovedNames {
    pub common_name: Option<String>,
    /// Identities only: the subject's organisation.
    pub organization: Option<String>,
    pub sans: Vec<SanName>,
}

impl Profile {
    pub fn from_config(cfg: &ProfileConfig) -> Profile {
        let mut names = cfg.names.clone();
        names.dns_suffixes =
            names.dns_suffixes.iter().map(|s| s.trim_start_matches('.').to_ascii_lowercase()).collect();
        Profile {
            id: cfg.id.clone(),
            ca: cfg.ca.clone(),
            lane: cfg.lane,
            validity: cfg.validity,
            backdate: cfg.backdate,
            key_usage: cfg.key_usage.clone(),
            extended_key_usage: cfg.extended_key_usage.clone(),
            allowed_keys: cfg.allowed_keys.iter().copied().collect(),
            min_rsa_bits: cfg.min_rsa_bits.max(2048),
            names,
            identity: cfg.identity.clone(),
        }
    }

    /// Apply the key and name policy to a checked CSR.
    pub fn approve(&self, csr: &CheckedCsr) -> Result<ApprovedNames, EngineError> {
        if self.identity.is_some() {
            return Err(EngineError::PolicyViolation(format!(
                "profile {:?} issues disposable identities (POST /v1/identities), not certificates for CSRs",
                self.id
            )));
        }
        if !self.allowed_keys.contains(&csr.key_type) {
            return Err(EngineError::PolicyViolation(format!(
                "key type {:?} is not allowed by profile {:?}",
                csr.key_type, self.id
            )));
        }
        if csr.key_type == KeyType::Rsa && csr.key_bits < self.min_rsa_bits {
            return Err(EngineError::WeakKey(format!(
                "RSA-{} is below this profile's minimum of {} bits",
                csr.key_bits, self.min_rsa_bits
            )));
        }

        let mut sans: Vec<SanName> = Vec::new();
        for name in &csr.names {
            let normalized = match name {
                SanName::Dns(d) => SanName::Dns(d.to_ascii_lowercase()),
                other => other.clone(),
            };
            if !sans.contains(&normalized) {
                sans.push(normalized);
            }
        }
        let common_name = csr.common_name.clone();
        // A CSR with only a common name (what a plain `openssl req -subj /CN=…` makes) asks for
        // that name; it becomes the single DNS name.
        if sans.is_empty() {
            if let Some(cn) = &common_name {
                sans.push(SanName::Dns(cn.to_ascii_lowercase()));
            }
        }
        if sans.is_empty() {
            return Err(EngineError::PolicyViolation("the CSR requests no name".into()));
        }
        if sans.len() > self.names.max_names {
            return Err(EngineError::PolicyViolation(format!(
                "{} names requested, profile allows at most {}",
                sans.len(),
                self.names.max_names
            )));
        }
        for name in &sans {
            self.check_name(name)?;
        }
        let common_name = match common_name {
            Some(cn) if self.names.subject_cn => {
                if cn.len() > 64 {
                    return Err(EngineError::PolicyViolation("common name longer than 64 characters".into()));
                }
                let matches = sans.iter().any(|s| s.to_string().eq_ignore_ascii_case(&cn));
                if !matches {
                    return Err(EngineError::PolicyViolation(format!(
                        "common name {cn:?} is not one of the requested names"
                    )));
                }
                Some(cn.to_ascii_lowercase())
            }
            _ => None,
        };
        Ok(ApprovedNames { common_name, organization: None, sans })
    }

    fn check_name(&self, name: &SanName) -> Result<(), EngineError> {
        let refuse = |why: String| Err(EngineError::PolicyViolation(why));
        match name {
            SanName::Dns(d) => {
                if !self.names.dns {
                    return refuse(format!("DNS names are not allowed by profile {:?}", self.id));
                }
                if !is_valid_dns_name(d) {
                    return refuse(format!("{:?} is not a valid DNS name", d.escape_debug().to_string()));
                }
                let suffixes = &self.names.dns_suffixes;
                let allowed = suffixes.is_empty() || suffixes.iter().any(|s| d == s || d.ends_with(&format!(".{s}")));
                if !allowed {
                    return refuse(format!("{d:?} is outside the DNS names profile {:?} allows", self.id));
                }
                Ok(())
            }
            SanName::Ip(ip) => {
                if !self.names.ip {
                    return refuse(format!("IP address {ip} is not allowed by profile {:?}", self.id));
                }
                Ok(())
            }
            SanName::Email(e) => {
                if !self.names.email {
                    return refuse(format!("email addresses are not allowed by profile {:?}", self.id));
                }
                if !is_valid_email(e) {
                    return refuse(format!("{:?} is not a valid email address", e.escape_debug().to_string()));
                }
                Ok(())
            }
        }
    }
}
