//! Every answer a listener gives, counted and timed by route and status, and (as configured)
//! logged as an access line. Counting happens in memory with counters found once, so a refusal
//! in a storm costs an atomic add; the access log leaves refusals out unless asked.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;

use super::openapi;
use crate::config::AccessLog;
use crate::metrics::Metrics;

/// The statuses counted apart; any other is counted as `other`.
const STATUSES: [u16; 18] = [200, 201, 202, 304, 400, 401, 403, 404, 405, 408, 409, 410, 413, 415, 422, 429, 500, 503];
const SLOTS: usize = STATUSES.len() + 1;

/// One listener's counters and timers, per described route (plus one for every other path).
pub struct Observed {
    listener: &'static str,
    access_log: AccessLog,
    metrics: Arc<Metrics>,
    requests: Vec<[OnceLock<Counter>; SLOTS]>,
    durations: Vec<[OnceLock<Histogram>; SLOTS]>,
}

impl Observed {
    pub fn new(listener: &'static str, access_log: AccessLog, metrics: Arc<Metrics>) -> Observed {
        let routes = openapi::route_count() + 1;
        Observed {
            listener,
            access_log,
            metrics,
            requests: (0..routes).map(|_| std::array::from_fn(|_| OnceLock::new())).collect(),
            durations: (0..routes).map(|_| std::array::from_fn(|_| OnceLock::new())).collect(),
        }
    }

    fn record(&self, route: Option<usize>, status: u16, seconds: f64) {
        let (row, template) = (route.unwrap_or(openapi::route_count()), openapi::route_template(route));
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
    let route = openapi::route_index(req.path());
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
                route = openapi::route_template(route),
                status = status.as_u16(),
                duration_ms = took.as_secs_f64() * 1000.0,
                peer = %request.peer_addr().map(|a| a.ip().to_string()).unwrap_or_default(),
                "request"
            );
        }
    }
    Ok(response)
}
