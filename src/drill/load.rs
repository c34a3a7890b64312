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
    /// The answer's `Retry-After`, if it had one.
    pub retry_after: Option<Duration>,
    /// For an error answer: its problem `type` and `detail` (what the client was told).
    pub problem: Option<Problem>,
    /// The request's `Idempotency-Key` (keyed streams).
    pub idempotency_key: Option<Arc<str>>,
    /// For a keyed issuance answered `2xx`: the certificate's serial.
    pub serial: Option<String>,
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

/// What one request of a stream asks.
#[derive(Clone)]
pub enum Call {
    /// `POST /v1/certificates`: this profile, this CSR.
    Issue { profile: String, csr: Arc<String> },
    /// `POST path` with this JSON body (an identity, a signature).
    Post { path: String, body: Arc<serde_json::Value> },
    /// `GET path` (read traffic).
    Get(String),
}

/// A kind of traffic: who sends what, how many at once, when.
#[derive(Clone)]
pub struct Stream {
    pub label: &'static str,
    pub call: Call,
    pub workers: usize,
    /// Pause between one worker's requests.
    pub pause: Duration,
    pub respond_async: bool,
    pub wait: Option<u64>,
    /// Client retries after a `503`/`429` (as the incident's clients did); for a keyed stream,
    /// also after no answer or a `502` (its instance died under it).
    pub retries: u32,
    /// Each request carries an `Idempotency-Key` of its own, the same on each of its retries.
    pub keyed: bool,
    /// Active between these offsets from the start.
    pub from: Duration,
    pub until: Duration,
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
        Stream::of(label, Call::Issue { profile: profile.to_string(), csr }, workers, from, until)
    }

    pub fn of(label: &'static str, call: Call, workers: usize, from: Duration, until: Duration) -> Stream {
        Stream {
            label,
            call,
            workers,
            pause: Duration::ZERO,
            respond_async: false,
            wait: None,
            retries: 0,
            keyed: false,
            from,
            until,
        }
    }

    /// Whether a client of this stream tries `sample`'s request again.
    fn retries_after(&self, sample: &Sample) -> bool {
        match sample.kind {
            Kind::Unavailable503 | Kind::Limited429 => true,
            Kind::NoAnswer => self.keyed,
            Kind::Other => self.keyed && sample.status == 502,
            Kind::Success | Kind::Refused409 => false,
        }
    }
}

/// How long a client goes on retrying one request before it gives up.
const RETRY_PATIENCE: Duration = Duration::from_secs(20);

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
                    let idempotency_key: Option<Arc<str>> =
                        stream.keyed.then(|| uuid::Uuid::new_v4().simple().to_string().into());
                    let (mut attempt, first_attempt) = (0, Instant::now());
                    loop {
                        let sample = one(&http, &base, &key, &stream, index, start, idempotency_key.clone()).await;
                        let retry = stream.retries_after(&sample)
                            && attempt < stream.retries
                            && first_attempt.elapsed() < RETRY_PATIENCE;
                        // A keyed client follows Retry-After (at most 2 s); the incidents' clients
                        // came back after 200 ms whatever they were told.
                        let pause = match (stream.keyed, sample.retry_after) {
                            (true, Some(after)) => after.clamp(Duration::from_millis(200), Duration::from_secs(2)),
                            _ => Duration::from_millis(200),
                        };
                        let _ = samples.send(sample);
                        // A keyed client carries on past the stream's window: it wants its answer.
                        if !retry || (!stream.keyed && start.elapsed() >= stream.until) {
                            break;
                        }
                        attempt += 1;
                        tokio::time::sleep(pause).await;
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

async fn one(
    http: &reqwest::Client,
    base: &str,
    key: &str,
    stream: &Stream,
    index: usize,
    start: Instant,
    idempotency_key: Option<Arc<str>>,
) -> Sample {
    let sent = Instant::now();
    let mut request = match &stream.call {
        Call::Get(path) => http.get(format!("{base}{path}")),
        Call::Post { path, body } => http.post(format!("{base}{path}")).json(body.as_ref()),
        Call::Issue { profile, csr } => http
            .post(format!("{base}/v1/certificates"))
            .json(&serde_json::json!({ "profile": profile, "csr": csr.as_str() })),
    }
    .bearer_auth(key);
    if stream.respond_async {
        request = request.header("prefer", "respond-async");
    } else if let Some(wait) = stream.wait {
        request = request.header("prefer", format!("wait={wait}"));
    }
    if let Some(k) = &idempotency_key {
        request = request.header("idempotency-key", k.as_ref());
    }
    let (kind, status, retry_after) = (Kind::NoAnswer, 0, None);
    let mut sample = Sample {
        at: sent.duration_since(start),
        stream: index,
        kind,
        status,
        latency: Duration::ZERO,
        request_id: None,
        retry_after,
        problem: None,
        idempotency_key,
        serial: None,
    };
    if let Ok(resp) = request.send().await {
        sample.status = resp.status().as_u16();
        sample.kind = Kind::of(sample.status);
        sample.retry_after = resp
            .headers()
            .get("retry-after")
            .map(|v| Duration::from_secs(v.to_str().ok().and_then(|v| v.parse().ok()).unwrap_or(1)));
        if sample.status == 202 {
            let body = resp.json::<serde_json::Value>().await.ok();
            sample.request_id = body.and_then(|v| v["request_id"].as_str().map(String::from));
        } else if sample.status >= 400 {
            sample.problem = resp.json::<serde_json::Value>().await.ok().map(|v| Problem {
                kind: v["type"].as_str().unwrap_or_default().to_string(),
                detail: v["detail"].as_str().unwrap_or_default().to_string(),
            });
        } else if sample.idempotency_key.is_some() {
            let body = resp.json::<serde_json::Value>().await.ok();
            sample.serial = body.and_then(|v| v["serial"].as_str().map(String::from));
            if sample.serial.is_none() {
                // A certificate the client could not read is no answer: it asks again.
                sample.kind = Kind::NoAnswer;
            }
        } else if resp.bytes().await.is_err() {
            sample.kind = Kind::NoAnswer;
        }
    }
    sample.latency = sent.elapsed();
    sample
}

/// Percentile of a set of durations (sorted in place).
pub fn percentile(values: &mut [Duration], p: f64) -> Duration {
    if values.is_empty() {
        return Duration::ZERO;
    }
    values.sort_unstable();
    values[((values.len() as f64 * p).ceil() as usize).clamp(1, values.len()) - 1]
}
