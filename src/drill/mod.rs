//! `castellum drill NAME`: replay an incident against an engine and report whether it held its
//! promises. Each drill starts an engine (or targets `--url`), drives bounded loopback load,
//! injects the incident's fault through real channels at set moments (key files removed, the
//! admin API, a connection-limited PostgreSQL role, a leaking component), and writes a report
//! folder. The process exits non-zero when a promise fails.

mod error;
pub mod evidence;
pub mod haproxy;
mod lb;
pub mod load;
pub mod report;
mod scenarios;
pub mod series;
pub mod storm;
pub mod target;
pub mod token;

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

pub use error::DrillError;
use load::{Kind, Sample, Stream};
use series::{Gauges, Recording};
use target::{DrillDb, Target};

pub const DRILLS: &[(&str, &str)] = &[
    (
        "issuance-queues-2020",
        "incident 003: two CAs lose their keys under load, then are disabled; parked work is resubmitted",
    ),
    ("connection-surge-2024", "incident 000: a 20x surge of clients against a connection-limited PostgreSQL role"),
    ("pool-leak-2023", "incident 001: a component holds database connections longer than it should"),
    ("pool-too-small-2024", "incident 002: a pool too small for the offered load"),
    (
        "lb-rolling-restart",
        "issue 15: three instances behind HAProxy under mixed load, each restarted in turn (SIGTERM, start again)",
    ),
    (
        "lb-kill-9",
        "issue 15: three instances behind HAProxy under mixed load, one killed with SIGKILL, then started again",
    ),
];

#[derive(Debug, Clone)]
pub struct DrillOptions {
    pub name: String,
    /// Seconds instead of minutes (what CI runs).
    pub short: bool,
    /// Run on a fresh PostgreSQL database on this server (`postgres://user@host:port`).
    pub postgres: Option<String>,
    /// Target an engine already running instead of starting one.
    pub url: Option<String>,
    pub admin_url: Option<String>,
    pub admin_token: String,
    pub api_key: String,
    /// The development PKI and configuration to start engines from.
    pub keys_dev: PathBuf,
    pub out: PathBuf,
    /// The command line, for the report.
    pub command: String,
    /// Deliberate defects built into the engine the drill starts (`--sabotage`), to show that
    /// the drill's judges can fail.
    pub sabotage: Vec<String>,
    /// The `castellum` binary whose `serve` the drill starts (default: this one), to measure an
    /// earlier build with the same drill.
    pub engine: Option<PathBuf>,
    /// The HAProxy configuration the load-balancer drills run (`deploy/haproxy.cfg`).
    pub haproxy_config: PathBuf,
    /// CA keys on SoftHSM tokens instead of key files (issuance-queues-2020).
    pub keys_on_token: bool,
}

/// One promise the engine made, whether it held, and the figures that say so.
#[derive(Debug, Clone)]
pub struct Promise {
    pub name: String,
    pub held: bool,
    pub figures: String,
}

impl Promise {
    pub fn new(name: &str, held: bool, figures: String) -> Promise {
        Promise { name: name.to_string(), held, figures }
    }
}

/// A moment on the chart: the fault's start and end, an operator's action.
#[derive(Debug, Clone)]
pub struct Mark {
    pub at: Duration,
    pub label: String,
}

/// A drill in progress: the target, the clock, and what is being recorded.
pub struct Session {
    pub target: Target,
    pub start: Instant,
    pub length: Duration,
    pub recording: Arc<Mutex<Recording>>,
    marks: Mutex<Vec<Mark>>,
}

impl Session {
    pub fn new(target: Target, length: Duration) -> Session {
        Session { target, start: Instant::now(), length, recording: Arc::default(), marks: Mutex::new(Vec::new()) }
    }

    pub fn mark(&self, label: impl Into<String>) {
        let mark = Mark { at: self.start.elapsed(), label: label.into() };
        eprintln!("\n  [{:5.1} s] {}", mark.at.as_secs_f64(), mark.label);
        lock(&self.marks).push(mark);
    }

    pub fn marks(&self) -> Vec<Mark> {
        lock(&self.marks).clone()
    }

    /// Sleep until `offset` after the start.
    pub async fn at(&self, offset: Duration) {
        tokio::time::sleep_until((self.start + offset).into()).await;
    }

    /// Drive `streams` (and sample the engine) until every stream's window has ended.
    pub async fn drive(&self, streams: Vec<Stream>, max_requests: u64) {
        let (tx, mut rx) = mpsc::unbounded_channel::<Sample>();
        let labels: Vec<&'static str> = streams.iter().map(|s| s.label).collect();
        let load = load::run(
            self.target.http.clone(),
            self.target.base.clone(),
            self.target.api_key.clone(),
            streams,
            self.start,
            max_requests,
            tx,
        );
        let recording = self.recording.clone();
        let (start, length) = (self.start, self.length);
        let collect = async move {
            let mut last_print = Instant::now();
            let mut window: Vec<Sample> = Vec::new();
            while let Some(sample) = rx.recv().await {
                window.push(sample.clone());
                lock(&recording).samples.push(sample);
                if last_print.elapsed() >= Duration::from_secs(1) {
                    progress(start, length, &window, last_print.elapsed(), &labels);
                    window.clear();
                    last_print = Instant::now();
                }
            }
            eprintln!();
        };
        let sample_engine = self.sample_engine();
        tokio::select! {
            _ = async { tokio::join!(load, collect) } => {}
            _ = sample_engine => {}
        }
    }

    /// Every half second: the engine's metrics and, on PostgreSQL, the server's connection count.
    async fn sample_engine(&self) {
        let probe = Arc::new(Mutex::new(None));
        loop {
            let at = self.start.elapsed();
            let metrics = self.target.metrics().await.unwrap_or_default();
            let server = match self.target.db.as_ref().and_then(DrillDb::probe) {
                Some(pg) => {
                    let admin = probe.clone();
                    tokio::task::spawn_blocking(move || pg.connections(&mut lock(&admin))).await.ok().flatten()
                }
                None => None,
            };
            lock(&self.recording).gauges.push(Gauges::parse(at, &metrics, server));
            tokio::time::sleep(series::BUCKET).await;
        }
    }

    pub fn recording(&self) -> std::sync::MutexGuard<'_, Recording> {
        lock(&self.recording)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn progress(start: Instant, length: Duration, window: &[Sample], took: Duration, labels: &[&str]) {
    let n = window.len().max(1) as f64;
    let share = |k: Kind| 100.0 * window.iter().filter(|s| s.kind == k).count() as f64 / n;
    let mut ok: Vec<Duration> = window.iter().filter(|s| s.kind == Kind::Success).map(|s| s.latency).collect();
    eprint!(
        "\r  {:5.1} s / {:.0} s  {:6.0} req/s  2xx {:5.1}%  409 {:4.1}%  429 {:4.1}%  503 {:4.1}%  p99 {:6.1} ms  ({} streams)   ",
        start.elapsed().as_secs_f64(),
        length.as_secs_f64(),
        window.len() as f64 / took.as_secs_f64(),
        share(Kind::Success),
        share(Kind::Refused409),
        share(Kind::Limited429),
        share(Kind::Unavailable503),
        load::percentile(&mut ok, 0.99).as_secs_f64() * 1e3,
        labels.len(),
    );
    let _ = std::io::stderr().flush();
}

/// The error for a drill name that is not one of [`DRILLS`].
fn unknown_drill(name: &str) -> DrillError {
    DrillError::Unknown { name: name.to_string(), known: DRILLS.iter().map(|d| d.0).collect::<Vec<_>>().join(", ") }
}

/// Run a drill; `Ok(true)` when every promise held.
pub fn run(opts: DrillOptions) -> Result<bool, DrillError> {
    if !DRILLS.iter().any(|d| d.0 == opts.name) {
        return Err(unknown_drill(&opts.name));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async move {
        let dir = opts.out.join(format!("{}-{}", opts.name, chrono_stamp()));
        std::fs::create_dir_all(&dir)?;
        eprintln!("drill {} ({}) — report in {}", opts.name, if opts.short { "short" } else { "full" }, dir.display());
        if opts.keys_on_token && (opts.name != "issuance-queues-2020" || opts.url.is_some()) {
            return Err(DrillError::Unsupported(
                "--keys-on-token is for issuance-queues-2020 on an engine the drill starts (not --url)".into(),
            ));
        }
        let outcome = match opts.name.as_str() {
            "lb-rolling-restart" => lb::run(&opts, &dir, lb::Fault::RollingRestart).await?,
            "lb-kill-9" => lb::run(&opts, &dir, lb::Fault::Kill9).await?,
            _ => scenarios::run(&opts, &dir).await?,
        };
        let points = outcome.recording.points(outcome.length);
        report::write(&dir, &opts.name, &opts.command, &outcome.promises, &points, &outcome.marks)?;
        let held = outcome.promises.iter().all(|p| p.held);
        println!("\n{}: {}", opts.name, if held { "every promise held" } else { "A PROMISE FAILED" });
        for p in &outcome.promises {
            println!("  [{}] {} — {}", if p.held { "held" } else { "FAIL" }, p.name, p.figures);
        }
        println!("report: {}", dir.join("summary.md").display());
        Ok(held)
    })
}

/// What a scenario hands back for the report.
pub struct Outcome {
    pub promises: Vec<Promise>,
    pub recording: Recording,
    pub marks: Vec<Mark>,
    pub length: Duration,
}

fn chrono_stamp() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    format!("{secs}")
}

/// Success share and p99 of a stream's samples in a window.
pub fn stream_stats(rec: &Recording, stream: usize, from: Duration, until: Duration) -> (usize, f64, Duration) {
    let samples: Vec<&Sample> = rec.samples_of(stream, from, until).collect();
    let ok = samples.iter().filter(|s| s.kind == Kind::Success).count();
    let mut latencies: Vec<Duration> = samples.iter().filter(|s| s.kind == Kind::Success).map(|s| s.latency).collect();
    let share = if samples.is_empty() { 0.0 } else { ok as f64 / samples.len() as f64 };
    (samples.len(), share, load::percentile(&mut latencies, 0.99))
}
