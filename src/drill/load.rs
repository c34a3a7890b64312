//! The built-in load generator: closed-loop workers per stream, loopback only, bounded in
//! requests and in time, stopping by themselves. Each attempt is one [`Sample`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

/// How a request was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Success,
    Refused409,
    Limited429,
    Unavailable503,
    Other,
    /// No answer (connection error or client timeout).
    NoAnswer,
}

impl Kind {
    fn of(status: u16) -> Kind {
        match status {
            200..=299 => Kind::Success,
            409 => Kind::Refused409,
            429 => Kind::Limited429,
            503 => Kind::Unavailable503,
            _ => Kind::Other,
        }
    }
}

/// One request of one stream.
#[derive(Debug, Clone)]
pub struct Sample {
    pub at: Duration,
    pub stream: usize,
    pub kind: Kind,
    pub status: u16,
    pub latency: Duration,
    /// For `202`: the request id, to follow it later.
    pub request_id: Option<String>,
    pub retry_after: bool,
    /// For an error answer: its problem `type` and `detail` (what the client was told).
    pub problem: Option<Problem>,
}

/// The problem details of an error answer, as the client read them.
#[derive(Debug, Clone, Default)]
pub struct Problem {
    pub kind: String,
    pub detail: String,
}

impl Sample {
    /// Refused because the CA's circuit breaker is open (as the client was told).
    pub fn breaker_open(&self) -> bool {
        self.problem.as_ref().is_some_and(|p| p.kind.ends_with(":ca-unavailable") && p.detail.contains("breaker"))
    }
}

/// A kind of traffic: who sends what, how many at once, when.
#[derive(Clone)]
pub struct Stream {
    pub label: &'static str,
    pub profile: String,
    pub csr: Arc<String>,
    pub workers: usize,
    /// Pause between one worker's requests.
    pub pause: Duration,
    pub respond_async: bool,
    pub wait: Option<u64>,
    /// Client retries after a `503`/`429` (as the incident's clients did).
    pub retries: u32,
    /// Active between these offsets from the start.
    pub from: Duration,
    pub until: Duration,
    /// `GET` this path instead of issuing (read traffic).
    pub get: Option<String>,
}

impl Stream {
    pub fn issue(
        label: &'static str,
        profile: &str,
        csr: Arc<String>,
        workers: usize,
        from: Duration,
        until: Duration,
    ) -> Stream {
        Stream {
            label,
            profile: profile.to_string(),
            csr,
            workers,
            pause: Duration::ZERO,
            respond_async: false,
            wait: None,
            retries: 0,
            from,
            until,
            get: None,
        }
    }
}

/// Run every stream's workers until their windows end or `max_requests` have been sent.
pub async fn run(
    http: reqwest::Client,
    base: String,
    api_key: String,
    streams: Vec<Stream>,
    start: Instant,
    max_requests: u64,
    samples: mpsc::UnboundedSender<Sample>,
) {
    let sent = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::new();
    for (index, stream) in streams.into_iter().enumerate() {
        for _ in 0..stream.workers {
            let (http, base, key, stream, samples, sent) =
                (http.clone(), base.clone(), api_key.clone(), stream.clone(), samples.clone(), sent.clone());
            handles.push(tokio::spawn(async move {
                tokio::time::sleep_until((start + stream.from).into()).await;
                while start.elapsed() < stream.until && sent.fetch_add(1, Ordering::Relaxed) < max_requests {
                    let mut attempt = 0;
                    loop {
                        let sample = one(&http, &base, &key, &stream, index, start).await;
                        let retry =
                            matches!(sample.kind, Kind::Unavailable503 | Kind::Limited429) && attempt < stream.retries;
                        let _ = samples.send(sample);
                        if !retry || start.elapsed() >= stream.until {
                            break;
                        }
                        attempt += 1;
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    if !stream.pause.is_zero() {
                        tokio::time::sleep(stream.pause).await;
                    }
                }
            }));
        }
    }
    for handle in handles {
        let _ = handle.await;
    }
}

async fn one(http: &reqwest::Client, base: &str, key: &str, stream: &Stream, index: usize, start: Instant) -> Sample {
    let sent = Instant::now();
    let request = match &stream.get {
        Some(path) => http.get(format!("{base}{path}")).bearer_auth(key),
        None => {
            let mut r = http
                .post(format!("{base}/v1/certificates"))
                .bearer_auth(key)
                .json(&serde_json::json!({ "profile": stream.profile, "csr": stream.csr.as_str() }));
            if stream.respond_async {
                r = r.header("prefer", "respond-async");
            } else if let Some(wait) = stream.wait {
                r = r.header("prefer", format!("wait={wait}"));
            }
            r
        }
    };
    let (kind, status, request_id, retry_after, problem) = match request.send().await {
        Ok(resp) => {
            let status = resp.status().as_u16();
            let retry_after = resp.headers().contains_key("retry-after");
            let (mut id, mut problem) = (None, None);
            if status == 202 {
                let body = resp.json::<serde_json::Value>().await.ok();
                id = body.and_then(|v| v["request_id"].as_str().map(String::from));
            } else if status >= 400 {
                problem = resp.json::<serde_json::Value>().await.ok().map(|v| Problem {
                    kind: v["type"].as_str().unwrap_or_default().to_string(),
                    detail: v["detail"].as_str().unwrap_or_default().to_string(),
                });
            } else {
                let _ = resp.bytes().await;
            }
            (Kind::of(status), status, id, retry_after, problem)
        }
        Err(_) => (Kind::NoAnswer, 0, None, false, None),
    };
    Sample {
        at: sent.duration_since(start),
        stream: index,
        kind,
        status,
        latency: sent.elapsed(),
        request_id,
        retry_after,
        problem,
    }
}

/// Percentile of a set of durations (sorted in place).
pub fn percentile(values: &mut [Duration], p: f64) -> Duration {
    if values.is_empty() {
        return Duration::ZERO;
    }
    values.sort_unstable();
    values[((values.len() as f64 * p).ceil() as usize).clamp(1, values.len()) - 1]
}
