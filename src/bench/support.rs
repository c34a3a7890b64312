//! What the issuance and OCSP benchmarks share: the CPU and memory of a process, the rows the
//! database gained, and the dev CA's material and CSRs to ask with.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::config::Config;
use crate::drill::target::Target;
use crate::drill::DrillError;
use crate::pki::KeyType;
use crate::pki::{csr, tbs, CaMaterial, LintedTbs, Profile};

/// (utime + stime, peak RSS bytes) of a process, from /proc.
pub(super) fn process_usage(pid: u32) -> Option<(Duration, u64)> {
    let cpu = crate::drill::target::process_cpu(pid)?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let hwm_kb: u64 = status.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some((cpu, hwm_kb * 1024))
}

pub(super) fn p256_csrs(n: usize) -> Result<Vec<Arc<String>>, DrillError> {
    (0..n)
        .map(|i| {
            let key =
                crate::pki::devpki::generate_key(KeyType::EcdsaP256).map_err(|e| DrillError::Setup(e.to_string()))?;
            let build = || -> Result<String, openssl::error::ErrorStack> {
                let mut req = openssl::x509::X509ReqBuilder::new()?;
                let mut name = openssl::x509::X509NameBuilder::new()?;
                name.append_entry_by_text("CN", &format!("bench{i}.example.test"))?;
                req.set_subject_name(&name.build())?;
                req.set_pubkey(&key)?;
                let mut exts = openssl::stack::Stack::new()?;
                exts.push(
                    openssl::x509::extension::SubjectAlternativeName::new()
                        .dns(&format!("bench{i}.example.test"))
                        .build(&req.x509v3_context(None))?,
                )?;
                req.add_extensions(&exts)?;
                req.sign(&key, openssl::hash::MessageDigest::sha256())?;
                Ok(String::from_utf8_lossy(&req.build().to_pem()?).into_owned())
            };
            build().map(Arc::new).map_err(|e| DrillError::Setup(e.to_string()))
        })
        .collect()
}

/// The ceiling's and the prefill's material: the dev CA `ica-p256`, one linted TBS for its
/// P-256 profile, and the CSR it was made from.
pub(super) fn sample(keys_dev: &Path) -> Result<(Arc<CaMaterial>, LintedTbs, Arc<String>), DrillError> {
    let config = Config::load(Some(&keys_dev.join("castellum.toml"))).map_err(|e| DrillError::Setup(e.to_string()))?;
    let ca_cfg = config.cas.iter().find(|c| c.id == "ica-p256").ok_or(DrillError::Setup("no ica-p256".into()))?;
    let ca = Arc::new(CaMaterial::load(ca_cfg).map_err(|e| DrillError::Setup(e.to_string()))?);
    let profile = Profile::from_config(
        config.profiles.iter().find(|p| p.ca == "ica-p256").ok_or(DrillError::Setup("no profile".into()))?,
    );
    let pem = p256_csrs(1)?.remove(0);
    let checked = csr::check_csr_pem(&pem).map_err(|e| DrillError::Setup(e.to_string()))?;
    let names = profile.approve(&checked).map_err(|e| DrillError::Setup(e.to_string()))?;
    let tbs = tbs::prepare(&ca, &profile, &checked, &names, SystemTime::now())
        .map_err(|e| DrillError::Setup(e.to_string()))?
        .tbs;
    Ok((ca, tbs, pem))
}

/// Every row of the tables a request can write.
const ROWS: &str = "SELECT (SELECT count(*) FROM audit_log) + (SELECT count(*) FROM requests) \
                    + (SELECT count(*) FROM certificates) AS n";

pub(super) async fn rows(target: &Target) -> Option<i64> {
    crate::drill::evidence::Evidence::read(target.db.as_ref(), |e| e.count(ROWS)).await.ok()
}
