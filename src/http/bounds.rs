//! What one source address may cost a listener (issue 16): the connections it holds, the
//! authentications it fails, and the time its request bodies take. Each bound answers in memory:
//! no database, no lock held across a request, and log lines about failures rate-limited.

use std::any::Any;
use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use actix_web::dev::{Extensions, Payload, ServiceRequest, ServiceResponse};
use actix_web::error::PayloadError;
use actix_web::web::Bytes;
use actix_web::HttpMessage as _;
use futures_util::Stream;
use governor::clock::{Clock, DefaultClock};

use super::problem::Problem;
use crate::config::HttpConfig;
use crate::error::EngineError;
use crate::metrics::Metrics;
use prometheus_client::metrics::counter::Counter;

/// One listener's bounds, shared by its workers.
pub struct SourceBounds {
    /// `api` or `admin`: the metrics' label and the log lines' subject.
    listener: &'static str,
    body_timeout: Duration,
    connections_per_source: u32,
    open: Mutex<HashMap<IpAddr, u32>>,
    auth_failures: governor::DefaultKeyedRateLimiter<IpAddr>,
    /// Failed authentications not yet reported in a log line, and ever.
    unlogged_failures: AtomicU64,
    seen_failures: AtomicU64,
    log_lines: governor::DefaultDirectRateLimiter,
    /// The counters, found once (a refusal then costs an atomic add).
    failures_counter: Counter,
    over_connections: Counter,
    over_auth_failures: Counter,
    body_timeouts: Counter,
}

/// What [`SourceBounds::guard`] made of a request.
pub enum Guarded {
    /// On to the routes (its body, if any, bounded in time).
    Pass(ServiceRequest),
    /// Answered here.
    Refused(ServiceResponse),
}

/// A connection's place in its source's count, released when the connection closes (it lives in
/// the connection's extensions).
pub struct SourceConnection {
    bounds: Arc<SourceBounds>,
    ip: IpAddr,
    /// The source held more connections than allowed when this one opened.
    pub over_limit: bool,
}

impl Drop for SourceConnection {
    fn drop(&mut self) {
        let mut open = self.bounds.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

impl SourceBounds {
    pub fn new(listener: &'static str, config: &HttpConfig, metrics: Arc<Metrics>) -> Arc<SourceBounds> {
        let per_second = NonZeroU32::new(config.auth_failures.per_second).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(config.auth_failures.burst).unwrap_or(NonZeroU32::MIN);
        let one_per_10s = governor::Quota::with_period(Duration::from_secs(10)).expect("a positive period");
        // One statement each: a family's guard lives to the end of its statement, and a second
        // get_or_create on the same family while it lives would wait for it forever.
        let refusals = |why| metrics.source_refusals.get_or_create(&reason(listener, why)).clone();
        let failures_counter = metrics.auth_failures.get_or_create(&listener_label(listener)).clone();
        let over_connections = refusals("connections");
        let over_auth_failures = refusals("auth_failures");
        let body_timeouts = refusals("body_timeout");
        Arc::new(SourceBounds {
            listener,
            body_timeout: config.body_timeout,
            connections_per_source: config.connections_per_source,
            open: Mutex::default(),
            auth_failures: governor::RateLimiter::dashmap(governor::Quota::per_second(per_second).allow_burst(burst)),
            unlogged_failures: AtomicU64::new(0),
            seen_failures: AtomicU64::new(0),
            log_lines: governor::RateLimiter::direct(one_per_10s),
            failures_counter,
            over_connections,
            over_auth_failures,
            body_timeouts,
        })
    }

    /// `HttpServer::on_connect`: count the connection against its source address.
    pub fn on_connect(self: &Arc<Self>, connection: &dyn Any, extensions: &mut Extensions) {
        let Some(ip) = peer_ip(connection).map(source) else { return };
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(ip).or_insert(0);
        *n += 1;
        let over_limit = *n > self.connections_per_source;
        drop(open);
        if over_limit {
            self.over_connections.inc();
        }
        extensions.insert(SourceConnection { bounds: self.clone(), ip, over_limit });
    }

    /// A request on a connection over its source's limit is refused (and the connection closed).
    fn check_connection(&self, connection: Option<&SourceConnection>) -> Result<(), EngineError> {
        match connection {
            Some(c) if c.over_limit => Err(EngineError::TooManyConnections { retry_after: Duration::from_secs(1) }),
            _ => Ok(()),
        }
    }

    /// A failed authentication from `ip`: counted, and once the source is over its burst,
    /// answered `429` instead of `401` until it slows down.
    pub fn auth_failed(&self, ip: Option<IpAddr>) -> EngineError {
        self.failures_counter.inc();
        let seen = self.seen_failures.fetch_add(1, Ordering::Relaxed) + 1;
        self.unlogged_failures.fetch_add(1, Ordering::Relaxed);
        if self.log_lines.check().is_ok() {
            let failures = self.unlogged_failures.swap(0, Ordering::Relaxed);
            tracing::warn!(listener = self.listener, failures, "failed authentications (at most one line per 10 s)");
        }
        // Sources whose failures are all forgiven are forgotten now and then, so that the table
        // holds only sources failing lately.
        if seen % 4096 == 0 {
            self.auth_failures.retain_recent();
        }
        let Some(ip) = ip.map(source) else { return EngineError::Unauthorized };
        match self.auth_failures.check_key(&ip) {
            Ok(()) => EngineError::Unauthorized,
            Err(not_until) => {
                self.over_auth_failures.inc();
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                EngineError::TooManyFailedAuthentications { retry_after: wait.max(Duration::from_secs(1)) }
            }
        }
    }

    /// The middleware both listeners wrap: a request on a connection over its source's limit is
    /// refused; a request with a body gets it cut off `body_timeout` after its headers.
    pub fn guard(&self, mut req: ServiceRequest) -> Guarded {
        if let Err(e) = self.check_connection(req.request().conn_data::<SourceConnection>()) {
            return Guarded::Refused(req.error_response(Problem(e)));
        }
        if has_body(req.headers()) {
            let body = req.take_payload();
            req.set_payload(self.bounded_body(body));
        }
        Guarded::Pass(req)
    }

    /// The request's body, cut off `body_timeout` after this moment.
    pub fn bounded_body(&self, payload: Payload) -> Payload {
        let deadline = Box::pin(actix_web::rt::time::sleep(self.body_timeout));
        let timeouts = self.body_timeouts.clone();
        Payload::Stream { payload: Box::pin(TimedBody { inner: payload, deadline, timeouts, fired: false }) }
    }

    pub fn body_timeout(&self) -> Duration {
        self.body_timeout
    }
}

/// Whether a request declares a body.
fn has_body(headers: &actix_web::http::header::HeaderMap) -> bool {
    use actix_web::http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
    let declared = headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    declared.is_some_and(|n| n > 0) || headers.contains_key(TRANSFER_ENCODING)
}

/// The peer address of a connection, plain TCP or TLS (counted once its handshake is done).
fn peer_ip(connection: &dyn Any) -> Option<IpAddr> {
    let tcp = super::tls::tcp_stream(connection)?;
    tcp.peer_addr().ok().map(|a| a.ip())
}

/// The source a bound counts: an IPv4 address (IPv4-mapped IPv6 included), or an IPv6 address's
/// /64 (one subscriber's prefix: rotating addresses within it escapes nothing).
fn source(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        },
        v4 => v4,
    }
}

fn listener_label(name: &'static str) -> Vec<(&'static str, String)> {
    vec![("listener", name.to_string())]
}

fn reason(name: &'static str, why: &'static str) -> Vec<(&'static str, String)> {
    vec![("listener", name.to_string()), ("reason", why.to_string())]
}

/// A request body that fails with a timeout once its deadline passes, and ends there.
struct TimedBody {
    inner: Payload,
    deadline: Pin<Box<actix_web::rt::time::Sleep>>,
    timeouts: Counter,
    fired: bool,
}

/// The I/O error kind a body cut off by its deadline carries, for the extractors' error handlers.
pub const BODY_TIMEOUT: std::io::ErrorKind = std::io::ErrorKind::TimedOut;

impl Stream for TimedBody {
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.fired {
            return Poll::Ready(None);
        }
        if let Poll::Ready(item) = Pin::new(&mut self.inner).poll_next(cx) {
            return Poll::Ready(item);
        }
        match self.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => {
                self.fired = true;
                self.timeouts.inc();
                let late = std::io::Error::new(BODY_TIMEOUT, "the request body did not arrive in time");
                Poll::Ready(Some(Err(PayloadError::Io(late))))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Whether a payload error is [`TimedBody`]'s.
pub fn is_body_timeout(e: &PayloadError) -> bool {
    matches!(e, PayloadError::Io(io) if io.kind() == BODY_TIMEOUT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_is_an_ipv4_address_or_an_ipv6_prefix() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(source(ip("192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(source(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(source(ip("2001:db8:1:2:aaaa:bbbb:cccc:dddd")), ip("2001:db8:1:2::"));
        assert_eq!(source(ip("2001:db8:1:2::1")), source(ip("2001:db8:1:2:ffff::9")));
        assert_ne!(source(ip("2001:db8:1:2::1")), source(ip("2001:db8:1:3::1")));
    }
}
