//! A retry storm: clients that resend at a fixed rate whatever they are answered, ignoring
//! `Retry-After` (incident 003). It runs as `castellum storm`, a process of its own, so the drill
//! that measures the healthy CAs is not the one flooding the engine; the drill starts it with
//! [`StormProcess::spawn`] and reads its [`StormReport`] when it exits.
//!
//! Loopback only, bounded in requests and in time, and it stops by itself.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use super::DrillError;

/// Longer than any drill needs: a storm asked to run longer is refused.
pub const MAX_DURATION: Duration = Duration::from_secs(600);
/// The answers are counted by when their request was sent, in buckets of this length.
pub const STORM_BUCKET: Duration = Duration::from_millis(500);

/// What to send, how fast, for how long.
#[derive(Debug, Clone)]
pub struct StormPlan {
    /// Engines' base URLs (loopback only); requests go to each in turn.
    pub urls: Vec<String>,
    pub api_key: String,
    /// What is asked for, in turn: a profile and a CSR it accepts.
    pub requests: Vec<(String, String)>,
    /// Requests sent per second, whatever the answers.
    pub rate: u32,
    pub duration: Duration,
    /// Requests outstanding at once; a request due while this many are out is not sent (and is
    /// counted as skipped), so a slow engine cannot make the storm pile up connections.
    pub in_flight: usize,
    pub max_requests: u64,
}

/// What the storm sent and how it was answered.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StormReport {
    pub sent: u64,
    /// Due but not sent: `in_flight` requests were already outstanding.
    pub skipped: u64,
    /// Answers by HTTP status.
    pub by_status: BTreeMap<u16, u64>,
    /// Refusals (`503`, `429`) that came without `Retry-After`.
    pub without_retry_after: u64,
    /// No answer: connection error or the client's timeout.
    pub no_answer: u64,
    pub elapsed_s: f64,
    /// Requests answered, by the [`STORM_BUCKET`] in which they were sent.
    pub answered_per_bucket: Vec<u64>,
}

impl StormReport {
    /// Answers with a 4xx or 5xx status.
    pub fn refusals(&self) -> u64 {
        self.by_status.iter().filter(|(status, _)| **status >= 400).map(|(_, n)| n).sum()
    }

    /// Requests sent per second over the storm.
    pub fn rate(&self) -> f64 {
        if self.elapsed_s > 0.0 {
            self.sent as f64 / self.elapsed_s
        } else {
            0.0
        }
    }

    /// `409 ×120, 429 ×3,400` — for a promise's figures.
    pub fn statuses(&self) -> String {
        let mut parts: Vec<String> = self.by_status.iter().map(|(s, n)| format!("{s} ×{n}")).collect();
        if self.no_answer > 0 {
            parts.push(format!("no answer ×{}", self.no_answer));
        }
        parts.join(", ")
    }
}

/// A URL the storm may target: http on 127.0.0.1, ::1 or localhost.
fn loopback(url: &str) -> Result<(), DrillError> {
    let parsed = reqwest::Url::parse(url).map_err(|e| DrillError::Unsupported(format!("storm URL {url:?}: {e}")))?;
    let host = parsed.host_str().unwrap_or_default();
    if ["127.0.0.1", "[::1]", "localhost"].contains(&host) {
        Ok(())
    } else {
        Err(DrillError::Unsupported(format!("a storm targets loopback only, not {host:?}")))
    }
}

impl StormPlan {
    fn check(&self) -> Result<(), DrillError> {
        if self.urls.is_empty() || self.requests.is_empty() {
            return Err(DrillError::Unsupported("a storm needs at least one --url and one --profile".into()));
        }
        for url in &self.urls {
            loopback(url)?;
        }
        if self.rate == 0 || self.in_flight == 0 || self.max_requests == 0 {
            return Err(DrillError::Unsupported("--rate, --in-flight and --max-requests must be positive".into()));
        }
        if self.duration.is_zero() || self.duration > MAX_DURATION {
            return Err(DrillError::Unsupported(format!(
                "--duration must be between 0 and {} s",
                MAX_DURATION.as_secs()
            )));
        }
        Ok(())
    }

    /// Send the storm from this thread alone (a runtime of its own) and report on it.
    pub fn run_here(&self) -> Result<StormReport, DrillError> {
        tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(self.run())
    }

    /// Send the storm (on the caller's runtime) and report on it.
    pub async fn run(&self) -> Result<StormReport, DrillError> {
        self.check()?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .pool_max_idle_per_host(self.in_flight)
            .pool_idle_timeout(Duration::from_secs(1))
            .build()
            .map_err(|e| DrillError::Setup(e.to_string()))?;
        // The bodies are serialised once: the storm's CPU should go to sending, not to JSON.
        let bodies: Vec<String> = self
            .requests
            .iter()
            .map(|(profile, csr)| serde_json::json!({ "profile": profile, "csr": csr }).to_string())
            .collect();
        let targets: Vec<String> =
            self.urls.iter().map(|u| format!("{}/v1/certificates", u.trim_end_matches('/'))).collect();
        let buckets = (self.duration.as_secs_f64() / STORM_BUCKET.as_secs_f64()).ceil() as usize + 1;
        let report =
            Arc::new(Mutex::new(StormReport { answered_per_bucket: vec![0; buckets], ..StormReport::default() }));
        let permits = Arc::new(Semaphore::new(self.in_flight));
        let start = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(2));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut due_so_far = 0u64;
        while start.elapsed() < self.duration && due_so_far < self.max_requests {
            tick.tick().await;
            let due = ((self.rate as f64 * start.elapsed().as_secs_f64()) as u64).min(self.max_requests);
            while due_so_far < due {
                let n = due_so_far as usize;
                due_so_far += 1;
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    lock(&report).skipped += 1;
                    continue;
                };
                let request = http
                    .post(&targets[n % targets.len()])
                    .bearer_auth(&self.api_key)
                    .header("content-type", "application/json")
                    .body(bodies[(n / targets.len()) % bodies.len()].clone());
                let (report, bucket) =
                    (report.clone(), (start.elapsed().as_secs_f64() / STORM_BUCKET.as_secs_f64()) as usize);
                lock(&report).sent += 1;
                tokio::spawn(async move {
                    let answer = request.send().await;
                    let mut r = lock(&report);
                    match answer {
                        Ok(resp) => {
                            let status = resp.status().as_u16();
                            *r.by_status.entry(status).or_default() += 1;
                            if matches!(status, 429 | 503) && !resp.headers().contains_key("retry-after") {
                                r.without_retry_after += 1;
                            }
                            if let Some(n) = r.answered_per_bucket.get_mut(bucket) {
                                *n += 1;
                            }
                        }
                        Err(_) => r.no_answer += 1,
                    }
                    drop(permit);
                });
            }
        }
        let elapsed = start.elapsed();
        // Wait for the answers still out (each is bounded by the client's timeout).
        let _ = permits.acquire_many(self.in_flight as u32).await;
        let mut report = lock(&report).clone();
        report.elapsed_s = elapsed.as_secs_f64();
        Ok(report)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A storm running in a child process (`castellum storm`), started by a drill.
pub struct StormProcess {
    child: Child,
    report: PathBuf,
    /// When the drill started it, from the drill's start.
    pub started_at: Duration,
}

impl StormProcess {
    /// Start `castellum storm` for `plan`; its report goes to `dir/{name}.json`.
    pub fn spawn(plan: &StormPlan, dir: &Path, name: &str, started_at: Duration) -> Result<StormProcess, DrillError> {
        let report = dir.join(format!("{name}.json"));
        let mut command = Command::new(std::env::current_exe()?);
        command.arg("storm");
        for url in &plan.urls {
            command.args(["--url", url]);
        }
        for (i, (profile, csr)) in plan.requests.iter().enumerate() {
            let file = dir.join(format!("{name}-{i}.csr.pem"));
            std::fs::write(&file, csr)?;
            command.args(["--profile", profile]).arg("--csr").arg(file);
        }
        command
            .args(["--rate", &plan.rate.to_string()])
            .args(["--duration", &format!("{}ms", plan.duration.as_millis())])
            .args(["--in-flight", &plan.in_flight.to_string()])
            .args(["--max-requests", &plan.max_requests.to_string()])
            // The key in the environment, not on a command line anyone can read.
            .env("CASTELLUM_STORM_API_KEY", &plan.api_key)
            .stdout(Stdio::from(std::fs::File::create(&report)?))
            .stderr(Stdio::from(std::fs::File::create(dir.join(format!("{name}.log")))?));
        Ok(StormProcess { child: command.spawn()?, report, started_at })
    }

    /// Wait for the storm to end and read its report.
    pub async fn finish(mut self) -> Result<StormReport, DrillError> {
        let status = tokio::task::spawn_blocking(move || self.child.wait().map(|s| (s, self.report)))
            .await
            .map_err(|e| DrillError::Setup(e.to_string()))??;
        let (status, report) = status;
        if !status.success() {
            return Err(DrillError::Setup(format!("the storm process exited with {status}")));
        }
        let text = std::fs::read_to_string(&report)?;
        serde_json::from_str(&text).map_err(|e| DrillError::Setup(format!("storm report {}: {e}", report.display())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(url: &str) -> StormPlan {
        StormPlan {
            urls: vec![url.into()],
            api_key: "k".into(),
            requests: vec![("p".into(), String::new())],
            rate: 10,
            duration: Duration::from_secs(1),
            in_flight: 1,
            max_requests: 10,
        }
    }

    #[test]
    fn a_storm_targets_loopback_only() {
        assert!(plan("http://127.0.0.1:8080").check().is_ok());
        assert!(plan("http://localhost:8080").check().is_ok());
        assert!(plan("http://[::1]:8080").check().is_ok());
        for far in ["http://10.0.0.1:8080", "http://example.test", "http://127.0.0.1.example.test"] {
            assert!(plan(far).check().is_err(), "{far}");
        }
    }

    #[test]
    fn a_storm_is_bounded() {
        let mut p = plan("http://127.0.0.1:1");
        p.duration = MAX_DURATION + Duration::from_secs(1);
        assert!(p.check().is_err());
        let mut p = plan("http://127.0.0.1:1");
        p.max_requests = 0;
        assert!(p.check().is_err());
    }
}
