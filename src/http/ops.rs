//! What the load balancer and Prometheus read: `/healthz`, `/readyz`, `/metrics` (the last two
//! also on the admin listener, and `/metrics` only there with `http.metrics = false`).

use actix_web::{get, web, HttpRequest, HttpResponse};
use serde::Serialize;
use utoipa::ToSchema;

use super::problem::Problem;
use super::responses::{ReadRefusals, Throttled};
use crate::engine::Engine;
use crate::types::Readiness;

/// Alive: the process answers.
#[utoipa::path(tag = "operations", responses((status = 200, description = "Alive", body = Object), Throttled))]
#[get("/healthz")]
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({ "status": "ok" }))
}

/// What `/readyz` tells: whether to send traffic to anyone (a load balancer has no key); why,
/// and the pools and CAs behind it, only to an authenticated client or on the admin listener.
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
pub enum ReadinessAnswer {
    Detailed(Readiness),
    Summary(ReadySummary),
}

#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReadySummary {
    pub ready: bool,
}

fn readiness_answer(readiness: Readiness, detailed: bool) -> HttpResponse {
    let mut response = if readiness.ready { HttpResponse::Ok() } else { HttpResponse::ServiceUnavailable() };
    if detailed {
        response.json(ReadinessAnswer::Detailed(readiness))
    } else {
        response.json(ReadinessAnswer::Summary(ReadySummary { ready: readiness.ready }))
    }
}

/// Ready: database reachable, registry loaded, at least one CA serving. With a client's
/// credentials, also why not, the pools and the CAs; without, only whether.
#[utoipa::path(
    tag = "operations",
    responses(
        (status = 200, description = "Ready", body = ReadinessAnswer),
        (status = 503, description = "Not ready (and why, to a client)", body = ReadinessAnswer),
        ReadRefusals,
    ),
    security((), ("api_key" = []), ("client_certificate" = [])),
)]
#[get("/readyz")]
pub async fn readyz(engine: web::Data<Engine>, req: HttpRequest) -> Result<HttpResponse, Problem> {
    // Credentials that do not authenticate are refused (and counted) as anywhere else; none at
    // all is a load balancer's probe.
    let detailed = super::auth::has_credentials(&req);
    if detailed {
        super::auth::authenticate(&req).map_err(Problem)?;
    }
    Ok(readiness_answer(engine.readiness().await, detailed))
}

/// The admin listener's `/readyz`: behind its token, always detailed.
pub async fn detailed_readyz(engine: web::Data<Engine>) -> HttpResponse {
    readiness_answer(engine.readiness().await, true)
}

/// Prometheus metrics.
#[utoipa::path(
    tag = "operations",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain", body = String), Throttled),
)]
#[get("/metrics")]
pub async fn metrics(engine: web::Data<Engine>) -> HttpResponse {
    HttpResponse::Ok().content_type("text/plain; version=0.0.4").body(engine.metrics_text())
}
