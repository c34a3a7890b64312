//! `castellum bench --token` (issue 17): what a CA key on a PKCS#11 token costs, on SoftHSM2
//! against the same key in memory, for P-256 and RSA-3072. Two measures: signatures per second
//! through the CA's key handle (`KeyHandle::sign`, the one place a CA key signs), on one thread
//! and on every core; and issuances per second over HTTP against an engine in its own process
//! whose CAs sign from key files, then one whose CAs sign through the dev token.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::level::{level, Level};
use super::support::{p256_csrs, process_usage};
use crate::config::{CaKeyConfig, Config, Pkcs11KeyConfig};
use crate::drill::target::{ca_entry, set, DrillDb, Target};
use crate::drill::token::{dev_token, keys_on_tokens, DEV_TOKEN, SOFTHSM_MODULE};
use crate::drill::DrillError;
use crate::pki::CaMaterial;

/// The CAs measured: (CA id, its key, the profile that issues from it).
const KEYS: [(&str, &str, &str); 2] =
    [("ica-p256", "P-256", "tls-server-p256"), ("ica-rsa3072", "RSA-3072", "tls-server-rsa")];

/// Where the key is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyStore {
    Memory,
    SoftHsm,
}

impl KeyStore {
    fn name(self) -> &'static str {
        match self {
            KeyStore::Memory => "in memory (key file)",
            KeyStore::SoftHsm => "SoftHSM2 token",
        }
    }
}

pub struct TokenRow {
    pub key: &'static str,
    pub store: KeyStore,
    /// Signatures per second on one thread, and on every core.
    pub one_thread: f64,
    pub all_cores: f64,
    /// Issuance over HTTP, one level per concurrency.
    pub issuance: Vec<Level>,
}

pub struct TokenReport {
    pub cores: usize,
    pub signed_bytes: usize,
    /// How long each signature measure ran.
    pub signing: Duration,
    pub rows: Vec<TokenRow>,
}

/// What each signature in the signature measure signs: the size of a typical TBS certificate.
const SIGNED_BYTES: usize = 1_000;

/// Measure in `out` with the dev PKI in `keys_dev`, each issuance level for `length`, against
/// `engine`'s `serve` (default: this binary).
pub fn run(
    keys_dev: &Path,
    out: &Path,
    concurrency: &[usize],
    length: Duration,
    engine: Option<&Path>,
) -> Result<TokenReport, DrillError> {
    let dir = out.join(format!("bench-token-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let conf = dev_token(keys_dev, &dir.join("tokens"))?;
    // This process signs through the token too (the signature measure). Set before any thread
    // of this process starts: SoftHSM reads it when the module is initialised.
    std::env::set_var("SOFTHSM2_CONF", &conf);
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let config = Config::load(Some(&keys_dev.join("castellum.toml"))).map_err(|e| DrillError::Setup(e.to_string()))?;
    // 3 s per signature measure, or the levels' length when it is shorter (a quick run).
    let signing = length.min(Duration::from_secs(3));
    let mut rows = Vec::new();
    for (ca, key, _) in KEYS {
        for store in [KeyStore::Memory, KeyStore::SoftHsm] {
            let material = Arc::new(material(&config, ca, store, keys_dev)?);
            eprintln!("signatures, {key} {}…", store.name());
            let one_thread = signatures_per_second(&material, 1, signing);
            let all_cores = signatures_per_second(&material, cores, signing);
            eprintln!("  {one_thread:.0}/s on one thread, {all_cores:.0}/s on {cores}");
            rows.push(TokenRow { key, store, one_thread, all_cores, issuance: Vec::new() });
        }
    }

    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async {
        let engine = match engine {
            Some(path) => path.to_path_buf(),
            None => std::env::current_exe()?,
        };
        let csrs = p256_csrs(64)?;
        for store in [KeyStore::Memory, KeyStore::SoftHsm] {
            let workdir = dir.join(format!("engine-{store:?}").to_lowercase());
            let db = DrillDb::Sqlite(workdir.join("bench.db"));
            let env = match store {
                KeyStore::Memory => Vec::new(),
                KeyStore::SoftHsm => vec![("SOFTHSM2_CONF", conf.clone())],
            };
            let mut target = Target::start(&engine, keys_dev, &workdir, db, env, |c| {
                if store == KeyStore::SoftHsm {
                    keys_on_tokens(c, |_| DEV_TOKEN);
                }
                for (ca, _, _) in KEYS {
                    let ca = ca_entry(c, ca);
                    set(ca, &["signer_threads"], 2.into());
                    set(ca, &["expected_sign_rate"], 20000.0.into());
                    set(ca, &["queue", "in_flight"], 256.into());
                    set(ca, &["queue", "interactive_capacity"], 4096.into());
                }
            })
            .await?;
            let pid = target.pid().ok_or(DrillError::Setup("no engine process".into()))?;
            for (ca, key, profile) in KEYS {
                let row = rows.iter_mut().find(|r| r.key == key && r.store == store).expect("a row per key and store");
                for &concurrency in concurrency {
                    let l = level(&target, pid, &csrs, profile, concurrency, length, &[201], false).await?;
                    eprintln!(
                        "  issuance, {key} ({ca}) {} c={concurrency}: {:.0}/s, p99 {:.2} ms, {} errors",
                        store.name(),
                        l.per_second,
                        l.p99.as_secs_f64() * 1e3,
                        l.errors
                    );
                    row.issuance.push(l);
                }
            }
            if let Some((_, rss)) = process_usage(pid) {
                eprintln!("  engine peak RSS {:.1} MB", rss as f64 / 1e6);
            }
            target.stop();
        }
        Ok::<_, DrillError>(())
    })?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(TokenReport { cores, signed_bytes: SIGNED_BYTES, signing, rows })
}

/// The dev CA `ca` with its key in `store` (the dev token for SoftHSM).
fn material(config: &Config, ca: &str, store: KeyStore, keys_dev: &Path) -> Result<CaMaterial, DrillError> {
    let mut ca_config = config.cas.iter().find(|c| c.id == ca).cloned().ok_or(DrillError::Setup(format!("no {ca}")))?;
    if store == KeyStore::SoftHsm {
        ca_config.key_file = None;
        ca_config.key_passphrase = None;
        ca_config.key = Some(CaKeyConfig {
            pkcs11: Pkcs11KeyConfig {
                module: SOFTHSM_MODULE.into(),
                token_label: DEV_TOKEN.into(),
                key_label: ca.into(),
                pin_file: Some(keys_dev.join("pkcs11-dev-pin")),
                pin_env: None,
                pin: None,
            },
        });
    }
    let material = CaMaterial::load(&ca_config).map_err(|e| DrillError::Setup(e.to_string()))?;
    match &material.key_error {
        Some(e) => Err(DrillError::Setup(format!("{ca}'s key: {e}"))),
        None => Ok(material),
    }
}

/// Signatures per second by `threads` threads signing in a loop for `length`.
fn signatures_per_second(material: &Arc<CaMaterial>, threads: usize, length: Duration) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let (material, done, stop) = (material.clone(), done.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut data = vec![0x5a_u8; SIGNED_BYTES];
                data[0] = t as u8;
                while !stop.load(Ordering::Relaxed) {
                    if material.key.sign(&data).is_ok() {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(length);
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.join();
    }
    done.load(Ordering::Relaxed) as f64 / length.as_secs_f64()
}

impl TokenReport {
    pub fn markdown(&self) -> String {
        let mut out = format!(
            "| key | where | signatures/s, 1 thread | signatures/s, {} threads | issuance c | issuances/s | p50 | p99 | engine CPU per issuance | errors |\n|---|---|---|---|---|---|---|---|---|---|\n",
            self.cores
        );
        for r in &self.rows {
            for (i, l) in r.issuance.iter().enumerate() {
                let (one, all) = match i {
                    0 => (format!("{:.0}", r.one_thread), format!("{:.0}", r.all_cores)),
                    _ => (String::new(), String::new()),
                };
                out += &format!(
                    "| {} | {} | {one} | {all} | {} | {:.0} | {:.2} ms | {:.2} ms | {:.0} µs | {} |\n",
                    r.key,
                    r.store.name(),
                    l.concurrency,
                    l.per_second,
                    l.p50.as_secs_f64() * 1e3,
                    l.p99.as_secs_f64() * 1e3,
                    l.cpu_per_issuance.as_secs_f64() * 1e6,
                    l.errors
                );
            }
        }
        out += &format!(
            "\nSignatures: `KeyHandle::sign` over {} bytes in a loop for {:?} per row. Issuance: `POST /v1/certificates` \
             (P-256 CSRs) over loopback against an engine in its own process on SQLite, ica-p256 and ica-rsa3072 with 2 \
             signer threads; the load generator shares the cores.\n",
            self.signed_bytes, self.signing
        );
        out
    }
}
