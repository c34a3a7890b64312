//! `castellum bench --ocsp`: OCSP answers from the cache, over HTTP on loopback, against an engine
//! in its own process, beside a control measured in the same run at the same concurrency: `GET
//! /healthz`, the same HTTP stack answering without any work. The engine and the load generator
//! share the machine's cores, so the control says what the machine's HTTP path can do at all.
//!
//! Before the load: certificates issued through the API, a tenth revoked, and every question
//! asked once (signed and cached; each answer is checked to say good or revoked as it should).
//! During the load, the engine's OCSP signature counter and the database's rows must not move.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::Request;

use super::drive::{drive, loopback_address, Accepts, Pace, Requests};
use super::support::{p256_csrs, process_usage, rows, sample};
use crate::drill::load::percentile;
use crate::drill::target::Target;
use crate::drill::DrillError;
use crate::pki::ocsp::{answered_status, question_for};

/// One load: answers per second, latency, CPU per answer (engine and load generator).
#[derive(Debug, Clone)]
pub struct Load {
    pub answered: u64,
    pub errors: u64,
    pub per_second: f64,
    pub p50: Duration,
    pub p99: Duration,
    /// At a fixed rate: the p99 counted from when each request was due (see `Sample`).
    pub p99_from_schedule: Duration,
    pub engine_cpu_per_answer: Duration,
    pub client_cpu_per_answer: Duration,
}

#[derive(Debug, Clone)]
pub struct OcspLevel {
    pub concurrency: usize,
    pub pace: Pace,
    /// `GET /healthz` at the same concurrency, just before.
    pub control: Load,
    pub ocsp: Load,
    /// OCSP signatures the engine made while the OCSP load ran (0: every answer from the cache).
    pub signatures: u64,
    /// Database rows added while it ran.
    pub rows_written: Option<i64>,
}

/// The same two loads measured by wrk (a C load generator: less of the shared cores than the
/// built-in one, and its own latency histogram), when `--wrk` asks for it.
#[derive(Debug, Clone)]
pub struct WrkLevel {
    pub concurrency: usize,
    pub control: WrkLoad,
    pub ocsp: WrkLoad,
}

#[derive(Debug, Clone)]
pub struct WrkLoad {
    pub per_second: f64,
    pub p50: String,
    pub p99: String,
    pub errors: String,
}

pub struct OcspReport {
    pub backend: String,
    pub certificates: usize,
    pub revoked: usize,
    pub levels: Vec<OcspLevel>,
    pub wrk: Vec<WrkLevel>,
    pub peak_rss: u64,
}

/// Certificates issued (and asked about) before the load.
const CERTIFICATES: usize = 2_000;

/// What to measure: each concurrency for `length`, in a closed loop and (with a rate) at that
/// fixed total rate; with `wrk` (its working folder), the closed loops by wrk too.
pub(super) struct Loads<'a> {
    pub concurrency: &'a [usize],
    pub rate: Option<u32>,
    pub length: Duration,
    pub wrk: Option<&'a std::path::Path>,
}

pub(super) async fn run(
    target: &Target,
    pid: u32,
    keys_dev: &std::path::Path,
    backend: String,
    loads: Loads<'_>,
) -> Result<OcspReport, DrillError> {
    let Loads { concurrency, rate, length, wrk } = loads;
    let addr = loopback_address(target)?;
    wait_for_responder(target).await?;
    eprintln!("issuing {CERTIFICATES} certificates and revoking a tenth of them…");
    let serials = issue(target, CERTIFICATES).await?;
    let revoked: Vec<&String> = serials.iter().step_by(10).collect();
    for serial in &revoked {
        let status = target
            .http
            .post(format!("{}/v1/certificates/{serial}/revoke", target.base))
            .bearer_auth(&target.api_key)
            .json(&serde_json::json!({ "reason": "superseded" }))
            .send()
            .await
            .map_err(|e| DrillError::Setup(format!("revoke: {e}")))?
            .status();
        if status != 200 {
            return Err(DrillError::Setup(format!("revoking {serial}: {status}")));
        }
    }
    // The CRL publisher sees the shards' revisions move (every 250 ms with the bench's 1 s CRL
    // delay) and drops their cached answers: let it, before the answers are cached.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (ca, _, _) = sample(keys_dev)?;
    let requests: Vec<Bytes> = serials
        .iter()
        .map(|s| {
            let serial = hex::decode(s).map_err(|e| DrillError::Setup(format!("serial {s}: {e}")))?;
            let question = question_for(&ca, &serial).map_err(|e| DrillError::Setup(e.to_string()))?;
            question.request_der().map(Bytes::from).map_err(|e| DrillError::Setup(e.to_string()))
        })
        .collect::<Result<_, _>>()?;
    let requests = Arc::new(requests);

    // Every question once: signed and cached, and each answer says what it should.
    let mut said = (0usize, 0usize);
    for (i, body) in requests.iter().enumerate() {
        let der = target
            .http
            .post(format!("{}/ocsp", target.base))
            .header("content-type", "application/ocsp-request")
            .body(body.to_vec())
            .send()
            .await
            .map_err(|e| DrillError::Setup(format!("OCSP: {e}")))?
            .bytes()
            .await
            .map_err(|e| DrillError::Setup(format!("OCSP: {e}")))?;
        let expected = if i % 10 == 0 { "revoked" } else { "good" };
        match answered_status(&der) {
            Some(s) if s == expected => {
                if expected == "good" {
                    said.0 += 1
                } else {
                    said.1 += 1
                }
            }
            other => {
                return Err(DrillError::Setup(format!("serial {} answered {other:?}, not {expected}", serials[i])))
            }
        }
    }
    eprintln!("  every question answered once: {} good, {} revoked", said.0, said.1);

    // Each concurrency in a closed loop, then (with `--rate`) at that fixed rate.
    let paces = std::iter::once(Pace::Closed).chain(rate.map(Pace::Rate));
    let loads: Vec<(usize, Pace)> = paces.flat_map(|pace| concurrency.iter().map(move |&c| (c, pace))).collect();
    let mut levels = Vec::new();
    for (c, pace) in loads {
        let healthz: Requests = Arc::new(|_| {
            Request::get("/healthz").header("host", "127.0.0.1").body(Full::new(Bytes::new())).expect("a valid request")
        });
        let control = measure(addr, pid, c, length, pace, healthz, Arc::new(|status, _| status == 200)).await?;
        let signatures_before = signatures(target).await?;
        let rows_before = rows(target).await;
        let bodies = requests.clone();
        let ocsp: Requests = Arc::new(move |i| {
            Request::post("/ocsp")
                .header("host", "127.0.0.1")
                .header("content-type", "application/ocsp-request")
                .body(Full::new(bodies[i % bodies.len()].clone()))
                .expect("a valid request")
        });
        let answered: Accepts = Arc::new(|status, body| status == 200 && successful(body));
        let ocsp = measure(addr, pid, c, length, pace, ocsp, answered).await?;
        let signatures = signatures(target).await?.saturating_sub(signatures_before);
        let rows_written = rows(target).await.zip(rows_before).map(|(after, before)| after - before);
        eprintln!(
            "  c={c}, {}: OCSP {:.0}/s (p99 {:.2} ms, from schedule {:.2} ms), control GET /healthz {:.0}/s (p99 {:.2} ms, from schedule {:.2} ms); {signatures} signatures, {} rows written",
            pace.describe(),
            ocsp.per_second,
            ocsp.p99.as_secs_f64() * 1e3,
            ocsp.p99_from_schedule.as_secs_f64() * 1e3,
            control.per_second,
            control.p99.as_secs_f64() * 1e3,
            control.p99_from_schedule.as_secs_f64() * 1e3,
            rows_written.map_or("?".into(), |n| n.to_string()),
        );
        levels.push(OcspLevel { concurrency: c, pace, control, ocsp, signatures, rows_written });
    }
    let mut wrk_levels = Vec::new();
    if let Some(dir) = wrk {
        for &c in concurrency {
            let control = run_wrk(dir, &target.base, "/healthz", None, c, length).await?;
            let ocsp = run_wrk(dir, &target.base, "/ocsp", Some(&requests), c, length).await?;
            eprintln!(
                "  wrk c={c}: OCSP {:.0}/s (p99 {}), control {:.0}/s (p99 {})",
                ocsp.per_second, ocsp.p99, control.per_second, control.p99
            );
            wrk_levels.push(WrkLevel { concurrency: c, control, ocsp });
        }
    }
    let peak_rss = process_usage(pid).map(|u| u.1).unwrap_or(0);
    Ok(OcspReport { backend, certificates: serials.len(), revoked: revoked.len(), levels, wrk: wrk_levels, peak_rss })
}

/// What wrk runs: `GET /healthz`, or `POST` of each request body in turn (read from a file of
/// hex lines, one per request).
const WRK_SCRIPT: &str = r#"
local bodies, i = {}, 0
function init(args)
  if args[1] then
    for line in io.lines(args[1]) do
      bodies[#bodies + 1] = (line:gsub("..", function(h) return string.char(tonumber(h, 16)) end))
    end
  end
end
function request()
  if #bodies == 0 then return wrk.format("GET", wrk.path) end
  i = i % #bodies + 1
  return wrk.format("POST", wrk.path, { ["Content-Type"] = "application/ocsp-request" }, bodies[i])
end
function response(status, headers, body)
  if status ~= 200 then wrk.thread:stop() end
end
"#;

/// `wrk -t2 -cC -dD --latency -s script URL [-- bodies]`: its rate, p50, p99 and error line.
async fn run_wrk(
    dir: &std::path::Path,
    base: &str,
    path: &str,
    bodies: Option<&[Bytes]>,
    concurrency: usize,
    length: Duration,
) -> Result<WrkLoad, DrillError> {
    std::fs::create_dir_all(dir)?;
    let script = dir.join("ocsp.lua");
    std::fs::write(&script, WRK_SCRIPT)?;
    let mut cmd = std::process::Command::new("wrk");
    cmd.args(["-t2", &format!("-c{concurrency}"), &format!("-d{}s", length.as_secs().max(1)), "--latency", "-s"])
        .arg(&script)
        .arg(format!("{base}{path}"));
    if let Some(bodies) = bodies {
        let file = dir.join("requests.hex");
        let lines: Vec<String> = bodies.iter().map(hex::encode).collect();
        std::fs::write(&file, lines.join("\n") + "\n")?;
        cmd.arg("--").arg(&file);
    }
    let output = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .map_err(|e| DrillError::Setup(e.to_string()))?
        .map_err(|e| DrillError::Setup(format!("wrk (apt-get install wrk): {e}")))?;
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    if !output.status.success() {
        return Err(DrillError::Setup(format!("wrk failed: {text}{}", String::from_utf8_lossy(&output.stderr))));
    }
    let field =
        |prefix: &str| text.lines().map(str::trim).find_map(|l| l.strip_prefix(prefix)).map(|v| v.trim().to_string());
    let per_second = field("Requests/sec:").and_then(|v| v.parse().ok()).unwrap_or(0.0);
    let errors = text
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("Non-2xx") || l.starts_with("Socket errors"))
        .collect::<Vec<_>>()
        .join("; ");
    Ok(WrkLoad {
        per_second,
        p50: field("50%").unwrap_or_default(),
        p99: field("99%").unwrap_or_default(),
        errors: if errors.is_empty() { "none".into() } else { errors },
    })
}

/// A successful OCSPResponse: SEQUENCE { ENUMERATED 0, ... } (the SEQUENCE's length in short or
/// long form). The warm-up pass parsed every answer in full; this is what the load can afford.
fn successful(der: &[u8]) -> bool {
    let Some(&length) = der.get(1) else { return false };
    let start = if length & 0x80 == 0 { 2 } else { 2 + (length & 0x7f) as usize };
    der.first() == Some(&0x30) && der.get(start..start + 3) == Some(&[0x0a, 0x01, 0x00])
}

/// Until the engine's readiness no longer warns that a responder is missing.
async fn wait_for_responder(target: &Target) -> Result<(), DrillError> {
    let started = Instant::now();
    loop {
        let readiness: serde_json::Value = target
            .http
            .get(format!("{}/readyz", target.base))
            .send()
            .await
            .map_err(|e| DrillError::Setup(format!("readyz: {e}")))?
            .json()
            .await
            .unwrap_or_default();
        let warnings = readiness["warnings"].as_array().cloned().unwrap_or_default();
        if !warnings.iter().any(|w| w.as_str().unwrap_or("").contains("OCSP responder")) {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(30) {
            return Err(DrillError::Setup(format!("no OCSP responder after 30 s: {readiness}")));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Issue `n` certificates of ica-p256 through the API, 16 at a time; their serials in order.
async fn issue(target: &Target, n: usize) -> Result<Vec<String>, DrillError> {
    let csrs = p256_csrs(16)?;
    let mut serials = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(16) {
        let calls = chunk.iter().map(|&i| {
            let (http, base, key, csr) =
                (target.http.clone(), target.base.clone(), target.api_key.clone(), csrs[i % 16].clone());
            async move {
                let r = http
                    .post(format!("{base}/v1/certificates"))
                    .bearer_auth(key)
                    .json(&serde_json::json!({"profile": "tls-server-p256", "csr": csr.as_str()}))
                    .send()
                    .await
                    .map_err(|e| DrillError::Setup(format!("issue: {e}")))?;
                if r.status() != 201 {
                    return Err(DrillError::Setup(format!("issue: {}", r.status())));
                }
                let body: serde_json::Value = r.json().await.map_err(|e| DrillError::Setup(format!("issue: {e}")))?;
                body["serial"].as_str().map(str::to_string).ok_or(DrillError::Setup("no serial".into()))
            }
        });
        for serial in futures_util::future::join_all(calls).await {
            serials.push(serial?);
        }
    }
    Ok(serials)
}

/// The engine's OCSP signature counter, from its metrics.
async fn signatures(target: &Target) -> Result<u64, DrillError> {
    let metrics = target.metrics().await?;
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("castellum_ocsp_signatures_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .ok_or(DrillError::Setup("castellum_ocsp_signatures_total missing from /metrics".into()))
}

/// `concurrency` keep-alive connections, each sending `request(i)` and waiting for its answer,
/// for one second of warm-up and then `length`; answers `ok` does not accept count as errors.
async fn measure(
    addr: SocketAddr,
    pid: u32,
    concurrency: usize,
    length: Duration,
    pace: Pace,
    request: Requests,
    ok: Accepts,
) -> Result<Load, DrillError> {
    let _ = drive(addr, concurrency, Duration::from_secs(1), pace, request.clone(), ok.clone()).await?;
    let engine_before = process_usage(pid).map(|u| u.0).unwrap_or_default();
    let client_before = process_usage(std::process::id()).map(|u| u.0).unwrap_or_default();
    let started = Instant::now();
    let (samples, errors) = drive(addr, concurrency, length, pace, request, ok).await?;
    let elapsed = started.elapsed();
    let engine = process_usage(pid).map(|u| u.0).unwrap_or_default().saturating_sub(engine_before);
    let client = process_usage(std::process::id()).map(|u| u.0).unwrap_or_default().saturating_sub(client_before);
    let answered = samples.len() as u64;
    let mut service: Vec<Duration> = samples.iter().map(|s| s.service).collect();
    let mut from_schedule: Vec<Duration> = samples.iter().map(|s| s.from_schedule).collect();
    Ok(Load {
        answered,
        errors,
        per_second: answered as f64 / elapsed.as_secs_f64(),
        p50: percentile(&mut service, 0.50),
        p99: percentile(&mut service, 0.99),
        p99_from_schedule: percentile(&mut from_schedule, 0.99),
        engine_cpu_per_answer: engine / answered.max(1) as u32,
        client_cpu_per_answer: client / answered.max(1) as u32,
    })
}

impl OcspReport {
    /// The Markdown table docs/PERFORMANCE.md records.
    pub fn markdown(&self) -> String {
        let mut out = String::from(
            "| backend | concurrency | load | what | answers/s | p50 | p99 | p99 from schedule | engine CPU per answer | load generator CPU per answer | OCSP signatures | database rows written | errors |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
        );
        for l in &self.levels {
            let row = |what: &str, load: &Load, signatures: String, rows: String| {
                let from_schedule = match l.pace {
                    Pace::Closed => "–".to_string(),
                    Pace::Rate(_) => format!("{:.2} ms", load.p99_from_schedule.as_secs_f64() * 1e3),
                };
                format!(
                    "| {} | {} | {} | {what} | {:.0} | {:.2} ms | {:.2} ms | {from_schedule} | {:.1} µs | {:.1} µs | {signatures} | {rows} | {} |\n",
                    self.backend,
                    l.concurrency,
                    l.pace.describe(),
                    load.per_second,
                    load.p50.as_secs_f64() * 1e3,
                    load.p99.as_secs_f64() * 1e3,
                    load.engine_cpu_per_answer.as_secs_f64() * 1e6,
                    load.client_cpu_per_answer.as_secs_f64() * 1e6,
                    load.errors
                )
            };
            out.push_str(&row("control: GET /healthz", &l.control, "–".into(), "–".into()));
            let rows = l.rows_written.map_or("?".to_string(), |n| n.to_string());
            out.push_str(&row("POST /ocsp, cached", &l.ocsp, l.signatures.to_string(), rows));
        }
        if !self.wrk.is_empty() {
            out.push_str("\nThe same loads by wrk (`-t2`, `--latency`):\n\n| concurrency | what | answers/s | p50 | p99 | errors |\n|---|---|---|---|---|---|\n");
            for w in &self.wrk {
                for (what, load) in [("control: GET /healthz", &w.control), ("POST /ocsp, cached", &w.ocsp)] {
                    out.push_str(&format!(
                        "| {} | {what} | {:.0} | {} | {} | {} |\n",
                        w.concurrency, load.per_second, load.p50, load.p99, load.errors
                    ));
                }
            }
        }
        out.push_str(&format!(
            "\n{} certificates of ica-p256 asked about in turn ({} revoked), each asked once before the load. In a closed loop, OCSP at {:.0}% of the control's rate at the highest concurrency. Engine peak RSS: {:.1} MB.\n",
            self.certificates,
            self.revoked,
            self.levels
                .iter()
                .rfind(|l| matches!(l.pace, Pace::Closed))
                .map_or(0.0, |l| 100.0 * l.ocsp.per_second / l.control.per_second.max(1.0)),
            self.peak_rss as f64 / 1e6
        ));
        out
    }
}
