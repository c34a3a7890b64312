//! One concurrency level of the issuance benchmarks: clients asking for certificates over HTTP
//! for a while, with the engine's, PostgreSQL's and the load generator's CPU, and the rows written.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::Request;

use super::drive::{drive, loopback_address, Accepts, Pace, Requests};
use super::support::{process_usage, rows};
use crate::drill::load::percentile;
use crate::drill::target::Target;
use crate::drill::DrillError;

#[derive(Debug, Clone)]
pub struct Level {
    pub concurrency: usize,
    pub issued: u64,
    pub errors: u64,
    pub per_second: f64,
    pub p50: Duration,
    pub p90: Duration,
    pub p99: Duration,
    pub cpu_per_issuance: Duration,
    /// CPU PostgreSQL's processes spent per issuance (on PostgreSQL only).
    pub postgres_cpu_per_issuance: Option<Duration>,
    /// CPU the load generator itself spent per issuance (it shares the machine's cores).
    pub client_cpu_per_issuance: Duration,
    /// Rows added to the database while this level ran (warm-up included).
    pub rows_written: Option<i64>,
}

/// CPU time of every PostgreSQL process on this machine (`comm` = postgres): their own time and
/// that of the children they reaped, so a backend that exited mid-level still counts.
fn postgres_cpu() -> Option<Duration> {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let mut total = 0.0;
    let mut found = false;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let path = entry.path();
        if !std::fs::read_to_string(path.join("comm")).is_ok_and(|c| c.trim() == "postgres") {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(path.join("stat")) else { continue };
        let Some((_, rest)) = stat.rsplit_once(')') else { continue };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // utime, stime, cutime, cstime (fields 14–17 of stat; 11–14 after the command).
        total += fields.get(11..15).map_or(0.0, |f| f.iter().filter_map(|v| v.parse::<f64>().ok()).sum());
        found = true;
    }
    found.then(|| Duration::from_secs_f64(total / ticks))
}

/// The profile the issuance bench asks for (ica-p256's).
pub(super) const P256_PROFILE: &str = "tls-server-p256";

/// One concurrency level: `concurrency` clients asking `profile` for certificates for `length`,
/// after a second of warm-up.
#[allow(clippy::too_many_arguments)]
pub(super) async fn level(
    target: &Target,
    pid: u32,
    csrs: &[Arc<String>],
    profile: &'static str,
    concurrency: usize,
    length: Duration,
    expected: &'static [u16],
    postgres: bool,
) -> Result<Level, DrillError> {
    let addr = loopback_address(target)?;
    // Every request's bytes made once: the load generator's CPU is taken from the engine's cores.
    let bodies: Vec<Bytes> = csrs
        .iter()
        .map(|csr| Bytes::from(serde_json::json!({"profile": profile, "csr": csr.as_str()}).to_string()))
        .collect();
    let authorization = HeaderValue::try_from(format!("Bearer {}", target.api_key))
        .map_err(|e| DrillError::Setup(format!("the API key is not a header value: {e}")))?;
    let request: Requests = Arc::new(move |i| {
        let mut request = Request::post("/v1/certificates")
            .body(Full::new(bodies[i % bodies.len()].clone()))
            .expect("a valid request");
        let headers = request.headers_mut();
        headers.insert(HOST, HeaderValue::from_static("127.0.0.1"));
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(AUTHORIZATION, authorization.clone());
        request
    });
    let accepts: Accepts = Arc::new(|status, _| expected.contains(&status));
    let rows_before = rows(target).await;
    let _ = drive(addr, concurrency, Duration::from_secs(1), Pace::Closed, request.clone(), accepts.clone()).await?;
    let before = process_usage(pid).map(|u| u.0).unwrap_or_default();
    let client_before = process_usage(std::process::id()).map(|u| u.0).unwrap_or_default();
    let postgres_before = postgres.then(postgres_cpu).flatten();
    let started = Instant::now();
    let (samples, errors) = drive(addr, concurrency, length, Pace::Closed, request, accepts).await?;
    let elapsed = started.elapsed();
    let cpu = process_usage(pid).map(|u| u.0).unwrap_or_default().saturating_sub(before);
    let client_cpu = process_usage(std::process::id()).map(|u| u.0).unwrap_or_default().saturating_sub(client_before);
    let postgres_cpu = postgres_before.zip(postgres_cpu()).map(|(before, after)| after.saturating_sub(before));
    let mut latencies: Vec<Duration> = samples.iter().map(|s| s.service).collect();
    let issued = latencies.len() as u64;
    Ok(Level {
        concurrency,
        issued,
        errors,
        per_second: issued as f64 / elapsed.as_secs_f64(),
        p50: percentile(&mut latencies, 0.50),
        p90: percentile(&mut latencies, 0.90),
        p99: percentile(&mut latencies, 0.99),
        cpu_per_issuance: cpu / issued.max(1) as u32,
        client_cpu_per_issuance: client_cpu / issued.max(1) as u32,
        postgres_cpu_per_issuance: postgres_cpu.map(|cpu| cpu / issued.max(1) as u32),
        rows_written: rows(target).await.zip(rows_before).map(|(after, before)| after - before),
    })
}
