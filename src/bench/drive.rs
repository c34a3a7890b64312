//! The benchmarks' load generator: keep-alive HTTP/1.1 connections to the engine on loopback,
//! each sending a request built up front and waiting for its answer. A connection is hyper's
//! client on its own (no pool, no URL parsed, no body encoded per request), so the load
//! generator's own CPU, which shares the machine's cores with the engine, stays small.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::Request;
use hyper_util::rt::TokioIo;

use crate::drill::target::Target;
use crate::drill::DrillError;

/// The `i`-th request of a load (connection `w` sends `w`, `w + c`, `w + 2c`, …).
pub(super) type Requests = Arc<dyn Fn(usize) -> Request<Full<Bytes>> + Send + Sync>;

/// Whether an answer (status, body) counts as served; any other counts as an error.
pub(super) type Accepts = Arc<dyn Fn(u16, &[u8]) -> bool + Send + Sync>;

/// The engine's API address, which must be on loopback: the benchmarks load nothing else.
pub(super) fn loopback_address(target: &Target) -> Result<SocketAddr, DrillError> {
    let addr: SocketAddr = target
        .base
        .trim_start_matches("http://")
        .parse()
        .map_err(|e| DrillError::Setup(format!("the engine's address {}: {e}", target.base)))?;
    if !addr.ip().is_loopback() {
        return Err(DrillError::Setup(format!("the benchmarks only load loopback, not {addr}")));
    }
    Ok(addr)
}

/// How the load's connections send: each as soon as its last answer came (a closed loop, the
/// most the machine can do), or each on a schedule that adds up to a total rate (an open loop:
/// latency at a given load, not at saturation).
#[derive(Debug, Clone, Copy)]
pub enum Pace {
    Closed,
    Rate(u32),
}

impl Pace {
    pub(super) fn describe(self) -> String {
        match self {
            Pace::Closed => "closed loop".into(),
            Pace::Rate(rate) => format!("{rate}/s"),
        }
    }
}

/// One accepted answer: from its send to its answer, and from when the schedule said to send it
/// (a connection that fell behind sends late, and that wait is the server's doing: counting it
/// avoids coordinated omission). Equal in a closed loop.
#[derive(Debug, Clone, Copy)]
pub(super) struct Sample {
    pub(super) service: Duration,
    pub(super) from_schedule: Duration,
}

/// How long one answer (or one connection's opening) may take before it counts as an error:
/// a wedged engine must end a level, not hang it. The drills' client waits as long.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(15);

/// A keep-alive connection to the engine, ready to send.
type Connection = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(addr: SocketAddr) -> std::io::Result<Connection> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(std::io::Error::other)?;
    tokio::spawn(connection);
    Ok(sender)
}

/// The load itself: a sample per accepted answer, and the count of the rest. A connection that
/// fails (or cannot be opened) counts one error and is opened again, as the clients' own would
/// be; a refused connection is retried after a pause, so a level against a closed port counts
/// errors instead of spinning.
pub(super) async fn drive(
    addr: SocketAddr,
    concurrency: usize,
    length: Duration,
    pace: Pace,
    request: Requests,
    ok: Accepts,
) -> Result<(Vec<Sample>, u64), DrillError> {
    let start = Instant::now();
    let schedule = Schedule {
        start,
        until: start + length,
        stride: concurrency,
        // Connection `w` sends its k-th request at start + (k·c + w)/rate: the connections'
        // schedules interleave evenly.
        slot: match pace {
            Pace::Closed => None,
            Pace::Rate(rate) => Some(Duration::from_secs_f64(1.0 / f64::from(rate.max(1)))),
        },
    };
    let workers: Vec<_> = (0..concurrency)
        .map(|w| tokio::spawn(one_connection(addr, w, schedule, request.clone(), ok.clone())))
        .collect();
    let (mut all, mut errors) = (Vec::new(), 0);
    for worker in workers {
        let (samples, e) = worker.await.map_err(|e| DrillError::Setup(e.to_string()))?;
        all.extend(samples);
        errors += e;
    }
    Ok((all, errors))
}

/// When the connections send: `stride` connections share `start..until`, each every `slot` ×
/// `stride` (at a fixed rate) or as soon as its last answer came (`slot` is `None`).
#[derive(Clone, Copy)]
struct Schedule {
    start: Instant,
    until: Instant,
    stride: usize,
    slot: Option<Duration>,
}

/// Connection `w`'s share of the load: requests `w`, `w + stride`, … until the schedule ends.
async fn one_connection(
    addr: SocketAddr,
    w: usize,
    schedule: Schedule,
    request: Requests,
    ok: Accepts,
) -> (Vec<Sample>, u64) {
    let (mut samples, mut errors, mut i) = (Vec::new(), 0u64, w);
    let mut sender: Option<Connection> = None;
    loop {
        let scheduled = match schedule.slot {
            Some(slot) => schedule.start + slot * i as u32,
            None => Instant::now(),
        };
        if scheduled >= schedule.until {
            return (samples, errors);
        }
        if schedule.slot.is_some() {
            tokio::time::sleep_until(scheduled.into()).await;
        }
        let conn = match &mut sender {
            Some(conn) => conn,
            None => match tokio::time::timeout(ANSWER_TIMEOUT, connect(addr)).await {
                Ok(Ok(conn)) => sender.insert(conn),
                Ok(Err(_)) | Err(_) => {
                    errors += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let sent = Instant::now();
        let answer = async {
            conn.ready().await?;
            let response = conn.send_request(request(i)).await?;
            let status = response.status().as_u16();
            let body = response.into_body().collect().await?.to_bytes();
            Ok::<_, hyper::Error>((status, body))
        };
        match tokio::time::timeout(ANSWER_TIMEOUT, answer).await {
            Ok(Ok((status, body))) if ok(status, &body) => {
                samples.push(Sample { service: sent.elapsed(), from_schedule: scheduled.elapsed() })
            }
            Ok(Ok(_)) => errors += 1,
            // The connection is gone, or in an unknown state: a new one next time.
            Ok(Err(_)) | Err(_) => {
                errors += 1;
                sender = None;
            }
        }
        i += schedule.stride;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A server on loopback that hangs up on its first connection without answering and answers
    /// `200` to every request on the others.
    async fn hanging_up_once() -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut first = true;
            while let Ok((mut stream, _)) = listener.accept().await {
                if std::mem::take(&mut first) {
                    drop(stream);
                    continue;
                }
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut seen = Vec::new();
                    while let Ok(n @ 1..) = stream.read(&mut buf).await {
                        seen.extend_from_slice(&buf[..n]);
                        // Requests without a body: one answer per header block.
                        while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                            seen.drain(..end + 4);
                            let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
                            if stream.write_all(ok).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_connection_that_fails_counts_one_error_and_is_opened_again() {
        let addr = hanging_up_once().await;
        let request: Requests = Arc::new(|_| {
            Request::get("/").header("host", "127.0.0.1").body(Full::new(Bytes::new())).expect("a valid request")
        });
        let accepts: Accepts = Arc::new(|status, _| status == 200);
        let (samples, errors) =
            drive(addr, 1, Duration::from_millis(300), Pace::Closed, request, accepts).await.unwrap();
        assert_eq!(errors, 1, "the hung-up connection is one error");
        assert!(samples.len() > 10, "the load went on over a new connection: {} answers", samples.len());
    }
}
