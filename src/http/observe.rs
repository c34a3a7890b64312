//! Every answer a listener gives, counted and timed by route and status, and (as configured)
//! logged as an access line. Counting happens in memory with counters found once, so a refusal
//! in a storm costs an atomic add; the access log leaves refusals out unless asked.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{ResourceDef, ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;

use crate::config::AccessLog;
use crate::metrics::Metrics;

/// The statuses counted apart; any other is counted as `other`.
const STATUSES: [u16; 18] = [200, 201, 202, 304, 400, 401, 403, 404, 405, 408, 409, 410, 413, 415, 422, 429, 500, 503];
const SLOTS: usize = STATUSES.len() + 1;

/// A listener's routes by path template: what its answers are labelled with. A path no template
/// matches is `(other)`, so a scan of random paths cannot grow the metrics.
pub struct RouteTable {
    templates: Vec<String>,
    matchers: Vec<ResourceDef>,
}

impl RouteTable {
    pub fn new(templates: impl IntoIterator<Item = String>) -> RouteTable {
        let templates: Vec<String> = templates.into_iter().collect();
        let matchers = templates.iter().map(|t| ResourceDef::new(t.as_str())).collect();
        RouteTable { templates, matchers }
    }

    pub fn len(&self) -> usize {
        self.templates.len()
    }

    pub fn is_empty(&self) -> bool {
        self.templates.is_empty()
    }

    /// Which route `path` is: its place in the table.
    pub fn find(&self, path: &str) -> Option<usize> {
        self.matchers.iter().position(|route| route.is_match(path))
    }

    /// The template of a route [`RouteTable::find`] found, or `(other)`.
    pub fn template(&self, route: Option<usize>) -> &str {
        route.and_then(|i| self.templates.get(i)).map_or("(other)", String::as_str)
    }
}

/// One listener's counters and timers, per route of its table (plus one for every other path).
pub struct Observed {
    listener: &'static str,
    routes: &'static RouteTable,
    access_log: AccessLog,
    metrics: Arc<Metrics>,
    requests: Vec<[OnceLock<Counter>; SLOTS]>,
    durations: Vec<[OnceLock<Histogram>; SLOTS]>,
}

impl Observed {
    pub fn new(
        listener: &'static str,
        routes: &'static RouteTable,
        access_log: AccessLog,
        metrics: Arc<Metrics>,
    ) -> Observed {
        let rows = routes.len() + 1;
        Observed {
            listener,
            routes,
            access_log,
            metrics,
            requests: (0..rows).map(|_| std::array::from_fn(|_| OnceLock::new())).collect(),
            durations: (0..rows).map(|_| std::array::from_fn(|_| OnceLock::new())).collect(),
        }
    }

    fn record(&self, route: Option<usize>, status: u16, seconds: f64) {
        let (row, template) = (route.unwrap_or(self.routes.len()), self.routes.template(route));
        let slot = STATUSES.iter().position(|s| *s == status).unwrap_or(STATUSES.len());
        let labels = || {
            let status = STATUSES.get(slot).map_or_else(|| "other".to_string(), u16::to_string);
            vec![("listener", self.listener.to_string()), ("route", template.to_string()), ("status", status)]
        };
        self.requests[row][slot].get_or_init(|| self.metrics.http_requests.get_or_create(&labels()).clone()).inc();
        self.durations[row][slot]
            .get_or_init(|| self.metrics.http_request_seconds.get_or_create(&labels()).clone())
            .observe(seconds);
    }
}

/// The middleware: time the request, count its answer, log it as configured.
pub async fn observe(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let started = Instant::now();
    let observed = req.app_data::<actix_web::web::Data<Observed>>().cloned();
    let route = observed.as_ref().and_then(|o| o.routes.find(req.path()));
    let response = next.call(req).await?;
    if let Some(observed) = observed {
        let took = started.elapsed();
        let status = response.status();
        observed.record(route, status.as_u16(), took.as_secs_f64());
        let logged = match observed.access_log {
            AccessLog::Off => false,
            AccessLog::Served => status.is_success() || status.is_redirection(),
            AccessLog::All => true,
        };
        if logged {
            let request = response.request();
            tracing::info!(
                target: "castellum::access",
                listener = observed.listener,
                method = %request.method(),
                route = observed.routes.template(route),
                status = status.as_u16(),
                duration_ms = took.as_micros() as f64 / 1000.0,
                peer = %Peer(request.peer_addr()),
                "request"
            );
        }
    }
    Ok(response)
}

/// A peer's IP address for the access line, formatted into the line itself (no `String` per
/// request); empty when the connection has none (a Unix socket).
struct Peer(Option<std::net::SocketAddr>);

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(addr) => addr.ip().fmt(f),
            None => Ok(()),
        }
    }
}
