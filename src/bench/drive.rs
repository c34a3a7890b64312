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

/// The load itself: a sample per accepted answer, and the count of the rest.
pub(super) async fn drive(
    addr: SocketAddr,
    concurrency: usize,
    length: Duration,
    pace: Pace,
    request: Requests,
    ok: Accepts,
) -> Result<(Vec<Sample>, u64), DrillError> {
    let start = Instant::now();
    let until = start + length;
    // Connection `w` sends its k-th request at start + (k·c + w)/rate: the connections' schedules
    // interleave evenly.
    let slot = match pace {
        Pace::Closed => None,
        Pace::Rate(rate) => Some(Duration::from_secs_f64(1.0 / f64::from(rate.max(1)))),
    };
    let workers: Vec<_> = (0..concurrency)
        .map(|w| {
            let (request, ok) = (request.clone(), ok.clone());
            tokio::spawn(async move {
                let stream = tokio::net::TcpStream::connect(addr).await?;
                stream.set_nodelay(true)?;
                let (mut sender, connection) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(std::io::Error::other)?;
                tokio::spawn(connection);
                let (mut samples, mut errors, mut i) = (Vec::new(), 0u64, w);
                loop {
                    let scheduled = match slot {
                        Some(slot) => start + slot * i as u32,
                        None => Instant::now(),
                    };
                    if scheduled >= until {
                        break;
                    }
                    if slot.is_some() {
                        tokio::time::sleep_until(scheduled.into()).await;
                    }
                    let sent = Instant::now();
                    let answer = async {
                        sender.ready().await?;
                        let response = sender.send_request(request(i)).await?;
                        let status = response.status().as_u16();
                        let body = response.into_body().collect().await?.to_bytes();
                        Ok::<_, hyper::Error>((status, body))
                    };
                    match answer.await {
                        Ok((status, body)) if ok(status, &body) => {
                            samples.push(Sample { service: sent.elapsed(), from_schedule: scheduled.elapsed() })
                        }
                        Ok(_) => errors += 1,
                        Err(_) => {
                            errors += 1;
                            break; // the connection is gone
                        }
                    }
                    i += concurrency;
                }
                Ok::<_, std::io::Error>((samples, errors))
            })
        })
        .collect();
    let (mut all, mut errors) = (Vec::new(), 0);
    for worker in workers {
        let (samples, e) = worker.await.map_err(|e| DrillError::Setup(e.to_string()))??;
        all.extend(samples);
        errors += e;
    }
    Ok((all, errors))
}
