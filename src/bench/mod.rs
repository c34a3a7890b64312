//! `castellum bench`: end-to-end issuance over HTTP on loopback against an engine in its own
//! process (durable storage on), at several concurrencies, beside the machine's crypto ceiling —
//! one P-256 CSR verification plus one CA signature, with the same openssl calls, on every core.
//! With `--refusals`, the same load against a disabled CA: what a retry storm costs the engine
//! per refused request, and how many database rows it writes.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::drill::target::{ca_entry, set, DrillDb, Target};
use crate::drill::DrillError;
use crate::pki::{csr, tbs};

mod drive;
mod level;
mod ocsp;
mod prefill;
mod support;
mod token;
pub use level::Level;
use level::{level, P256_PROFILE};
pub use ocsp::OcspReport;
pub use prefill::Prefilled;
use support::{p256_csrs, process_usage, sample};
pub use token::TokenReport;

pub struct BenchOptions {
    pub postgres: Option<String>,
    pub concurrency: Vec<usize>,
    /// Measured time per concurrency level (after a one-second warm-up).
    pub duration: Duration,
    pub keys_dev: PathBuf,
    pub out: PathBuf,
    /// Measure refusals (the CA disabled) instead of issuances.
    pub refusals: bool,
    /// Idle keep-alive connections held open while c=64 is measured again (0: skip).
    pub idle_connections: usize,
    /// The castellum binary whose engine is measured (default: this one).
    pub engine: Option<PathBuf>,
    /// Issued certificates generated in the database before the levels (0: an empty database).
    pub prefill: u64,
    /// With `--ocsp`: measure the same loads with wrk too.
    pub wrk: bool,
    /// With `--ocsp`: measure each concurrency at this fixed total rate too (requests per second).
    pub rate: Option<u32>,
}

/// A certificate as the engine issues it, DER.
fn sample_certificate(keys_dev: &Path) -> Result<Vec<u8>, DrillError> {
    let (ca, tbs, _) = sample(keys_dev)?;
    tbs::sign(&ca, &tbs).map_err(|e| DrillError::Setup(e.to_string()))
}

/// Issuances per second the machine's cores can do if all they did was the crypto.
pub fn crypto_ceiling(keys_dev: &Path, length: Duration) -> Result<(f64, Duration), DrillError> {
    let (ca, tbs, pem) = sample(keys_dev)?;
    // One linted TBS, shared by every thread: the ceiling is the signature, not the build.
    let tbs = Arc::new(tbs);
    let der = csr::pem_to_der(&pem).map_err(|e| DrillError::Setup(e.to_string()))?;
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..cores)
        .map(|_| {
            let (ca, der, tbs, done, stop) = (ca.clone(), der.clone(), tbs.clone(), done.clone(), stop.clone());
            std::thread::spawn(move || {
                use x509_parser::prelude::FromDer;
                let (_, req) =
                    x509_parser::certification_request::X509CertificationRequest::from_der(&der).expect("CSR");
                let key = csr::public_key(&req.certification_request_info.subject_pki).expect("key");
                let (info, signature) = (req.certification_request_info.raw, req.signature_value.data.as_ref());
                while !stop.load(Ordering::Relaxed) {
                    // The crypto alone: the CSR's signature verified, the certificate signed.
                    let mut verifier =
                        openssl::sign::Verifier::new(openssl::hash::MessageDigest::sha256(), &key).expect("verifier");
                    verifier.update(info).expect("update");
                    assert!(verifier.verify(signature).expect("verify"));
                    tbs::sign(&ca, &tbs).expect("sign");
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    std::thread::sleep(length);
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let per_second = done.load(Ordering::Relaxed) as f64 / length.as_secs_f64();
    // CPU per issuance: every core was busy for `length`.
    let cpu = Duration::from_secs_f64(cores as f64 / per_second.max(1.0));
    Ok((per_second, cpu))
}

pub struct BenchReport {
    pub backend: String,
    /// What was counted: issuances, or refusals.
    pub refusals: bool,
    pub levels: Vec<Level>,
    pub peak_rss: u64,
    /// c=64 measured again beside idle keep-alive connections.
    pub idle: Option<IdleLevel>,
    /// What the database held before the levels, when prefilled.
    pub prefilled: Option<Prefilled>,
    /// The database's size on disk at the end.
    pub stored_bytes: Option<u64>,
    pub ceiling_per_second: f64,
    pub ceiling_cpu: Duration,
}

pub fn run(opts: BenchOptions) -> Result<BenchReport, DrillError> {
    eprintln!("measuring the crypto ceiling (P-256 CSR verification + P-256 signature, all cores)…");
    let (ceiling_per_second, ceiling_cpu) = crypto_ceiling(&opts.keys_dev, Duration::from_secs(3))?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let dir = opts.out.join(format!("bench-{}", std::process::id()));
    let sqlite_file = dir.join("bench.db");
    let report = runtime.block_on(async move {
        std::fs::create_dir_all(&dir)?;
        let db = match &opts.postgres {
            Some(url) => DrillDb::postgres(url, None)?,
            None => DrillDb::Sqlite(dir.join("bench.db")),
        };
        let backend = if opts.postgres.is_some() { "PostgreSQL" } else { "SQLite" }.to_string();
        let postgres = opts.postgres.is_some();
        let engine = match &opts.engine {
            Some(path) => path.clone(),
            None => std::env::current_exe()?,
        };
        let target = Target::start(&engine, &opts.keys_dev, &dir.join("engine"), db, Vec::new(), |c| {
            let ca = ca_entry(c, "ica-p256");
            set(ca, &["signer_threads"], 2.into());
            set(ca, &["expected_sign_rate"], 20000.0.into());
            set(ca, &["queue", "in_flight"], 256.into());
            set(ca, &["queue", "interactive_capacity"], 4096.into());
            // The idle keep-alive connections all come from this address.
            set(c, &["http", "connections_per_source"], 100_000.into());
            if postgres {
                set(c, &["database", "pools", "issuance", "max_size"], 2.into());
            }
        })
        .await?;
        let pid = target.pid().ok_or(DrillError::Setup("no engine process".into()))?;
        let prefilled = match (opts.prefill, target.db.as_ref()) {
            (0, _) | (_, None) => None,
            (n, Some(db)) => {
                eprintln!("prefilling {n} issued certificates…");
                let cert = sample_certificate(&opts.keys_dev)?;
                Some(tokio::task::block_in_place(|| prefill::prefill(db, n as i64, &cert))?)
            }
        };
        // Refusals: the CA is disabled, so every request is answered 409 (or, past the client's
        // retry budget, 429) by intake, before any CSR work.
        let expected: &[u16] = if opts.refusals {
            let state = serde_json::json!({"state": "disabled"});
            let status = target.admin_post("/admin/v1/cas/ica-p256/state", state).await?;
            if status != 200 {
                return Err(DrillError::Lever { path: "/admin/v1/cas/ica-p256/state".into(), status });
            }
            &[409, 429]
        } else {
            &[201]
        };
        let what = if opts.refusals { "refusal" } else { "issuance" };
        let csrs = p256_csrs(64)?;
        let mut levels = Vec::new();
        for &concurrency in &opts.concurrency {
            levels.push(level(&target, pid, &csrs, P256_PROFILE, concurrency, opts.duration, expected, postgres).await?);
            let l = levels.last().expect("just pushed");
            eprintln!(
                "  {backend} c={concurrency}: {:.0}/s, p50 {:.2} ms, p99 {:.2} ms, {:.0} µs CPU per {what}, {} database rows written",
                l.per_second,
                l.p50.as_secs_f64() * 1e3,
                l.p99.as_secs_f64() * 1e3,
                l.cpu_per_issuance.as_secs_f64() * 1e6,
                l.rows_written.map_or("?".to_string(), |n| n.to_string()),
            );
        }
        let peak_rss = process_usage(pid).map(|u| u.1).unwrap_or(0);
        let idle = match opts.idle_connections {
            0 => None,
            n => Some(beside_idle_connections(&target, pid, &csrs, n, opts.duration, expected, postgres).await?),
        };
        let stored_bytes = target.db.as_ref().and_then(prefill::size);
        Ok(BenchReport {
            backend,
            refusals: opts.refusals,
            levels,
            peak_rss,
            idle,
            prefilled,
            stored_bytes,
            ceiling_per_second,
            ceiling_cpu,
        })
    });
    // A bench's database is thrown away (a prefilled one is gigabytes).
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", sqlite_file.display()));
    }
    report
}

/// `castellum bench --ocsp`: OCSP answers from the cache at each concurrency, beside a control
/// (see `ocsp`), against an engine with OCSP on for ica-p256.
pub fn run_ocsp(opts: BenchOptions) -> Result<OcspReport, DrillError> {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let dir = opts.out.join(format!("bench-ocsp-{}", std::process::id()));
    let sqlite_file = dir.join("bench.db");
    let report = runtime.block_on(async {
        std::fs::create_dir_all(&dir)?;
        let db = match &opts.postgres {
            Some(url) => DrillDb::postgres(url, None)?,
            None => DrillDb::Sqlite(sqlite_file.clone()),
        };
        let backend = if opts.postgres.is_some() { "PostgreSQL" } else { "SQLite" }.to_string();
        let engine = match &opts.engine {
            Some(path) => path.clone(),
            None => std::env::current_exe()?,
        };
        let mut target = Target::start(&engine, &opts.keys_dev, &dir.join("engine"), db, Vec::new(), |c| {
            let ca = ca_entry(c, "ica-p256");
            set(ca, &["ocsp", "responder_profile"], "ocsp-renewal".into());
            set(ca, &["ocsp", "responder_name"], "ocsp.ica-p256.example.test".into());
            set(c, &["crl", "delay"], "1s".into());
        })
        .await?;
        let pid = target.pid().ok_or(DrillError::Setup("no engine process".into()))?;
        let wrk = opts.wrk.then(|| dir.join("wrk"));
        let report = ocsp::run(
            &target,
            pid,
            &opts.keys_dev,
            backend,
            ocsp::Loads { concurrency: &opts.concurrency, rate: opts.rate, length: opts.duration, wrk: wrk.as_deref() },
        )
        .await;
        target.stop();
        report
    });
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", sqlite_file.display()));
    }
    report
}

/// `castellum bench --token`: a CA key on a SoftHSM token against the same key in memory.
pub fn run_token(opts: BenchOptions) -> Result<TokenReport, DrillError> {
    token::run(&opts.keys_dev, &opts.out, &opts.concurrency, opts.duration, opts.engine.as_deref())
}

/// c=64 beside idle keep-alive connections: how many were opened, how many the engine still
/// held at the end, and the level measured meanwhile.
#[derive(Debug, Clone)]
pub struct IdleLevel {
    pub opened: usize,
    pub still_open: usize,
    pub level: Level,
    /// The engine's resident memory with them open.
    pub rss: u64,
}

/// Open `n` connections, one `GET /healthz` on each (so each is an HTTP keep-alive connection
/// the engine holds), measure c=64 while they stay idle, then ask each once more.
async fn beside_idle_connections(
    target: &Target,
    pid: u32,
    csrs: &[Arc<String>],
    n: usize,
    length: Duration,
    expected: &'static [u16],
    postgres: bool,
) -> Result<IdleLevel, DrillError> {
    let addr = drive::loopback_address(target)?;
    eprintln!("  opening {n} idle keep-alive connections…");
    let opened = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<std::net::TcpStream>> {
        let mut conns = Vec::with_capacity(n);
        for _ in 0..n {
            let conn = std::net::TcpStream::connect(addr)?;
            conn.set_read_timeout(Some(Duration::from_secs(5)))?;
            if ask_health(&conn) {
                conns.push(conn);
            }
        }
        Ok(conns)
    })
    .await
    .map_err(|e| DrillError::Setup(e.to_string()))??;
    let count = opened.len();
    let level = level(target, pid, csrs, P256_PROFILE, 64, length, expected, postgres).await?;
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024;
    let still_open = tokio::task::spawn_blocking(move || opened.iter().filter(|c| ask_health(c)).count())
        .await
        .map_err(|e| DrillError::Setup(e.to_string()))?;
    Ok(IdleLevel { opened: count, still_open, level, rss })
}

/// One `GET /healthz` on a kept-alive connection: answered 200 (and the connection kept).
fn ask_health(mut conn: &std::net::TcpStream) -> bool {
    use std::io::{Read, Write};
    if conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: castellum\r\n\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 1024];
    let mut got = Vec::new();
    // The answer is small: read until its headers and body are in.
    while let Ok(k) = conn.read(&mut buf) {
        if k == 0 {
            return false;
        }
        got.extend_from_slice(&buf[..k]);
        let text = String::from_utf8_lossy(&got);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string()))
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0);
            if body.len() >= length {
                return head.starts_with("HTTP/1.1 200");
            }
        }
    }
    false
}

impl BenchReport {
    /// The Markdown table docs/PERFORMANCE.md records.
    pub fn markdown(&self) -> String {
        let (done, what) = if self.refusals { ("refused", "refusal") } else { ("issued", "issuance") };
        let postgres = self.levels.iter().any(|l| l.postgres_cpu_per_issuance.is_some());
        let pg_header = if postgres { format!(" PostgreSQL CPU per {what} |") } else { String::new() };
        let pg_rule = if postgres { "---|" } else { "" };
        let mut out = format!(
            "| backend | concurrency | {done}/s | share of crypto ceiling | p50 | p90 | p99 | engine CPU per {what} | × raw crypto CPU |{pg_header} load generator CPU per {what} | database rows written | errors |\n|---|---|---|---|---|---|---|---|---|{pg_rule}---|---|---|\n"
        );
        let mut row = |l: &Level, label: String| {
            let pg = match (postgres, l.postgres_cpu_per_issuance) {
                (false, _) => String::new(),
                (true, Some(cpu)) => format!(" {:.0} µs |", cpu.as_secs_f64() * 1e6),
                (true, None) => " ? |".to_string(),
            };
            out.push_str(&format!(
                "| {} | {} | {:.0} | {:.0}% | {:.2} ms | {:.2} ms | {:.2} ms | {:.0} µs | {:.1}× |{pg} {:.0} µs | {} | {} |\n",
                self.backend,
                label,
                l.per_second,
                100.0 * l.per_second / self.ceiling_per_second,
                l.p50.as_secs_f64() * 1e3,
                l.p90.as_secs_f64() * 1e3,
                l.p99.as_secs_f64() * 1e3,
                l.cpu_per_issuance.as_secs_f64() * 1e6,
                l.cpu_per_issuance.as_secs_f64() / self.ceiling_cpu.as_secs_f64(),
                l.client_cpu_per_issuance.as_secs_f64() * 1e6,
                l.rows_written.map_or("?".to_string(), |n| n.to_string()),
                l.errors
            ));
        };
        for l in &self.levels {
            row(l, l.concurrency.to_string());
        }
        if let Some(idle) = &self.idle {
            row(&idle.level, format!("64 + {} idle", idle.opened));
        }
        out.push_str(&format!(
            "\nCrypto ceiling: {:.0} issuances/s on all cores ({:.0} µs of CPU each). Engine peak RSS: {:.1} MB.\n",
            self.ceiling_per_second,
            self.ceiling_cpu.as_secs_f64() * 1e6,
            self.peak_rss as f64 / 1e6
        ));
        if let Some(p) = &self.prefilled {
            out.push_str(&format!(
                "Prefilled with {} issued certificates (and their audit rows) in {:.0} s: {:.2} GB on disk, {:.0} bytes per stored certificate.\n",
                p.certificates,
                p.took.as_secs_f64(),
                p.bytes as f64 / 1e9,
                p.bytes as f64 / p.certificates.max(1) as f64
            ));
        }
        if let Some(bytes) = self.stored_bytes {
            out.push_str(&format!("Database size at the end: {:.2} GB.\n", bytes as f64 / 1e9));
        }
        if let Some(idle) = &self.idle {
            let plain = self.levels.iter().find(|l| l.concurrency == 64).map(|l| l.per_second);
            out.push_str(&format!(
                "Beside {} idle keep-alive connections ({} still open after the level, engine RSS {:.1} MB): c=64 at {:.0}/s{}.\n",
                idle.opened,
                idle.still_open,
                idle.rss as f64 / 1e6,
                idle.level.per_second,
                plain.map_or(String::new(), |p| format!(", {:.0}% of c=64 without them", 100.0 * idle.level.per_second / p))
            ));
        }
        out
    }
}
