//! A profile compiled from configuration: what a certificate of this profile may and must carry.

use std::collections::HashSet;
use std::time::Duration;

use super::csr::{is_valid_dns_name, is_valid_email, CheckedCsr, SanName};
use super::names::{normalize_suffix, within_suffixes};
use super::vocabulary::{ExtendedKeyUsageName, KeyType, KeyUsageName, Lane};
use crate::config::{IdentityPolicy, NamePolicy, ProfileConfig};
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
    /// Certificate policies asserted (invalid OIDs are `check-config` errors, never reach here).
    pub policies: Vec<const_oid::ObjectIdentifier>,
    pub omit_common_name: bool,
    pub omit_subject_key_id: bool,
    pub ocsp_no_check: bool,
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
        names.dns_suffixes = names.dns_suffixes.iter().map(|s| normalize_suffix(s)).collect();
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
            policies: cfg.policies.iter().filter_map(|oid| oid.parse().ok()).collect(),
            omit_common_name: cfg.omit_common_name,
            omit_subject_key_id: cfg.omit_subject_key_id,
            ocsp_no_check: cfg.ocsp_no_check,
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
                let allowed = suffixes.is_empty() || within_suffixes(d, suffixes);
                if !allowed {
                    return refuse(format!("{d:?} is outside the DNS names profile {:?} allows", self.id));
                }
                Ok(())
            }
            SanName::Ip(ip) => {
                if !self.names.ip {
                    return refuse(format!("IP address {ip} is not allowed by profile {:?}", self.id));
                }
                if !self.names.ip_ranges.iter().any(|range| range.contains(ip)) {
                    return refuse(format!("IP address {ip} is outside the ranges profile {:?} allows", self.id));
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A TLS-server-like profile: DNS names under example.test, ECDSA P-256 or RSA.
    fn profile(edit: impl FnOnce(&mut ProfileConfig)) -> Profile {
        let mut cfg: ProfileConfig = toml::from_str(
            r#"
            id = "p"
            ca = "ica"
            validity = "90d"
            key_usage = ["digital_signature"]
            allowed_keys = ["ecdsa-p256", "rsa"]
            names = { dns = true, dns_suffixes = [".Example.TEST"], max_names = 3 }
            "#,
        )
        .expect("a valid profile");
        edit(&mut cfg);
        Profile::from_config(&cfg)
    }

    fn csr(cn: Option<&str>, names: &[SanName]) -> CheckedCsr {
        CheckedCsr {
            spki_der: Vec::new(),
            key_type: KeyType::EcdsaP256,
            key_bits: 256,
            common_name: cn.map(String::from),
            names: names.to_vec(),
            der: Vec::new(),
        }
    }

    fn dns(d: &str) -> SanName {
        SanName::Dns(d.into())
    }

    fn refusal(p: &Profile, c: &CheckedCsr) -> String {
        match p.approve(c) {
            Err(EngineError::PolicyViolation(why) | EngineError::WeakKey(why)) => why,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn names_are_lowercased_deduplicated_and_kept_in_order() {
        let p = profile(|_| {});
        let got = p
            .approve(&csr(
                Some("WWW.example.test"),
                &[dns("www.Example.test"), dns("a.example.test"), dns("WWW.EXAMPLE.TEST")],
            ))
            .unwrap();
        assert_eq!(got.sans, vec![dns("www.example.test"), dns("a.example.test")]);
        assert_eq!(got.common_name.as_deref(), Some("www.example.test"));
        assert_eq!(got.organization, None);
    }

    #[test]
    fn a_common_name_alone_becomes_the_only_dns_name() {
        let got = profile(|_| {}).approve(&csr(Some("Only.Example.Test"), &[])).unwrap();
        assert_eq!(got.sans, vec![dns("only.example.test")]);
        assert_eq!(refusal(&profile(|_| {}), &csr(None, &[])), "the CSR requests no name");
    }

    #[test]
    fn the_name_count_is_bounded_by_the_profile() {
        let p = profile(|_| {});
        let three = [dns("a.example.test"), dns("b.example.test"), dns("c.example.test")];
        assert!(p.approve(&csr(None, &three)).is_ok());
        let four = [&three[..], &[dns("d.example.test")]].concat();
        assert!(refusal(&p, &csr(None, &four)).contains("4 names requested, profile allows at most 3"));
    }

    #[test]
    fn dns_suffixes_match_whole_labels() {
        let p = profile(|_| {});
        assert_eq!(p.names.dns_suffixes, vec!["example.test"], "normalised from \".Example.TEST\"");
        assert!(p.approve(&csr(None, &[dns("example.test")])).is_ok());
        assert!(p.approve(&csr(None, &[dns("deep.www.example.test")])).is_ok());
        assert!(refusal(&p, &csr(None, &[dns("badexample.test")])).contains("outside the DNS names"));
        assert!(refusal(&p, &csr(None, &[dns("example.test.evil")])).contains("outside the DNS names"));
        let any = profile(|c| c.names.dns_suffixes.clear());
        assert!(any.approve(&csr(None, &[dns("anything.invalid")])).is_ok());
    }

    #[test]
    fn each_kind_of_name_needs_the_profile_to_allow_it() {
        let ip = SanName::Ip("192.0.2.1".parse().unwrap());
        let email = SanName::Email("ops@example.test".into());
        let none = profile(|c| c.names.dns = false);
        assert!(refusal(&none, &csr(None, &[dns("a.example.test")])).contains("DNS names are not allowed"));
        assert!(refusal(&none, &csr(None, std::slice::from_ref(&ip))).contains("IP address 192.0.2.1 is not allowed"));
        assert!(refusal(&none, &csr(None, std::slice::from_ref(&email))).contains("email addresses are not allowed"));
        let all = profile(|c| {
            c.names.ip = true;
            c.names.ip_ranges = vec!["192.0.2.0/24".parse().unwrap()];
            c.names.email = true;
        });
        let got = all.approve(&csr(None, &[ip.clone(), email.clone()])).unwrap();
        assert_eq!(got.sans, vec![ip, email]);
        for outside in ["8.8.8.8", "::1", "10.0.0.1"] {
            let outside = SanName::Ip(outside.parse().unwrap());
            let why = refusal(&all, &csr(None, std::slice::from_ref(&outside)));
            assert!(why.contains(&format!("IP address {outside} is outside the ranges profile")), "{why}");
        }
        assert!(refusal(&all, &csr(None, &[SanName::Email("not an address".into())])).contains("not a valid email"));
        assert!(refusal(&all, &csr(None, &[dns("bad_name!.example.test")])).contains("not a valid DNS name"));
    }

    #[test]
    fn the_common_name_must_be_a_requested_name_of_at_most_64_characters() {
        let p = profile(|c| c.names.dns_suffixes.clear());
        let long = format!("{}.test", "a".repeat(59)); // 64 characters
        assert_eq!(long.len(), 64);
        assert!(p.approve(&csr(Some(&long), &[dns(&long)])).is_ok());
        let longer = format!("{}.test", "a".repeat(60));
        assert!(refusal(&p, &csr(Some(&longer), &[dns(&longer)])).contains("longer than 64"));
        assert!(refusal(&p, &csr(Some("other.test"), &[dns("a.test")])).contains("is not one of the requested names"));
        let no_cn = profile(|c| c.names.subject_cn = false);
        assert_eq!(no_cn.approve(&csr(Some("a.example.test"), &[dns("a.example.test")])).unwrap().common_name, None);
    }

    #[test]
    fn key_type_and_rsa_size_follow_the_profile() {
        let p = profile(|c| c.min_rsa_bits = 3072);
        let mut rsa = csr(None, &[dns("a.example.test")]);
        rsa.key_type = KeyType::Rsa;
        rsa.key_bits = 3072;
        assert!(p.approve(&rsa).is_ok());
        rsa.key_bits = 3071;
        assert!(refusal(&p, &rsa).contains("RSA-3071 is below this profile's minimum of 3072 bits"));
        let mut p384 = csr(None, &[dns("a.example.test")]);
        p384.key_type = KeyType::EcdsaP384;
        assert!(refusal(&p, &p384).contains("is not allowed by profile"));
        // A configured minimum below 2048 is raised to 2048.
        assert_eq!(profile(|c| c.min_rsa_bits = 1024).min_rsa_bits, 2048);
    }

    #[test]
    fn identity_profiles_take_no_csr() {
        let p = profile(|c| c.identity = Some(toml::from_str("lifetime = \"1h\"").expect("an identity policy")));
        assert!(refusal(&p, &csr(None, &[dns("a.example.test")])).contains("issues disposable identities"));
    }
}
