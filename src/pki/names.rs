//! Which names a request may carry beyond its profile's policy (issue 16): each client's own DNS
//! suffixes and IP ranges, checked after the profile approved the names, so that a certificate
//! carries only names both allow and one client cannot obtain another's domain.

use ipnet::IpNet;

use super::csr::SanName;
use crate::config::ClientNamePolicy;
use crate::error::EngineError;

/// A TLS client certificate's name as compared with `clients[].certificate_names`: DNS names and
/// common names without regard to case, URIs as they are (their paths are case-sensitive).
pub fn certificate_name(name: &str) -> String {
    match name.contains("://") {
        true => name.to_string(),
        false => name.to_ascii_lowercase(),
    }
}

/// Whether `name` (lower case) is one of `suffixes` or ends with `.` + one of them.
pub fn within_suffixes(name: &str, suffixes: &[String]) -> bool {
    suffixes.iter().any(|s| {
        name == s
            || (name.len() > s.len() && name.ends_with(s.as_str()) && name.as_bytes()[name.len() - s.len() - 1] == b'.')
    })
}

/// A DNS suffix as configured (`.Example.TEST`) in the form names are compared with.
pub fn normalize_suffix(suffix: &str) -> String {
    suffix.trim_start_matches('.').to_ascii_lowercase()
}

/// The names one client may request.
#[derive(Debug, Clone, Default)]
pub struct ClientNames {
    /// Empty: any DNS name its profiles allow.
    dns_suffixes: Vec<String>,
    /// Empty: no IP address.
    ip_ranges: Vec<IpNet>,
}

impl ClientNames {
    pub fn from_config(policy: &ClientNamePolicy) -> ClientNames {
        ClientNames {
            dns_suffixes: policy.dns_suffixes.iter().map(|s| normalize_suffix(s)).collect(),
            ip_ranges: policy.ip_ranges.clone(),
        }
    }

    /// Refuse the first name this client may not request, naming it.
    pub fn check(&self, client: &str, sans: &[SanName]) -> Result<(), EngineError> {
        for name in sans {
            let allowed = match name {
                SanName::Dns(d) => self.dns_suffixes.is_empty() || within_suffixes(d, &self.dns_suffixes),
                SanName::Email(e) => {
                    let domain = e.rsplit_once('@').map(|(_, d)| d.to_ascii_lowercase()).unwrap_or_default();
                    self.dns_suffixes.is_empty() || within_suffixes(&domain, &self.dns_suffixes)
                }
                SanName::Ip(ip) => self.ip_ranges.iter().any(|range| range.contains(ip)),
            };
            if !allowed {
                return Err(EngineError::PolicyViolation(format!(
                    "{name} is outside the names client {client:?} may request"
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(dns: &[&str], ip: &[&str]) -> ClientNames {
        ClientNames::from_config(&ClientNamePolicy {
            dns_suffixes: dns.iter().map(|s| s.to_string()).collect(),
            ip_ranges: ip.iter().map(|r| r.parse().unwrap()).collect(),
        })
    }

    #[test]
    fn suffixes_match_whole_labels() {
        let suffixes = vec!["example.test".to_string()];
        assert!(within_suffixes("example.test", &suffixes));
        assert!(within_suffixes("a.b.example.test", &suffixes));
        assert!(!within_suffixes("badexample.test", &suffixes));
        assert!(!within_suffixes("example.test.evil", &suffixes));
    }

    #[test]
    fn a_client_gets_only_its_names_and_no_ip_unless_listed() {
        let other = client(&[".Other.example.TEST"], &[]);
        assert!(other.check("other", &[SanName::Dns("a.other.example.test".into())]).is_ok());
        let e = other.check("other", &[SanName::Dns("demo.example.test".into())]).unwrap_err();
        assert!(e.to_string().contains("demo.example.test is outside the names client \"other\""), "{e}");
        let e = other.check("other", &[SanName::Ip("192.0.2.1".parse().unwrap())]).unwrap_err();
        assert!(e.to_string().contains("192.0.2.1"), "{e}");
        assert!(other.check("other", &[SanName::Email("x@other.example.test".into())]).is_ok());
        assert!(other.check("other", &[SanName::Email("x@example.test".into())]).is_err());

        let ranges = client(&[], &["192.0.2.0/24", "2001:db8::/32"]);
        assert!(ranges.check("c", &[SanName::Ip("192.0.2.200".parse().unwrap())]).is_ok());
        assert!(ranges.check("c", &[SanName::Ip("2001:db8::1".parse().unwrap())]).is_ok());
        for outside in ["8.8.8.8", "10.0.0.1", "::1", "192.0.3.1"] {
            let e = ranges.check("c", &[SanName::Ip(outside.parse().unwrap())]).unwrap_err();
            assert!(e.to_string().contains(outside), "{e}");
        }
        assert!(ranges.check("c", &[SanName::Dns("any.example".into())]).is_ok(), "no DNS restriction");
    }
}
