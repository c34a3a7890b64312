//! What the load balancer and Prometheus read: `/healthz`, `/readyz`, `/metrics`.

use actix_web::{get, web, HttpResponse};

use super::openapi::Throttled;
use crate::engine::Engine;

/// Alive: the process answers.
#[utoipa::path(tag = "operations", responses((status = 200, description = "Alive", body = Object), Throttled))]
#[get("/healthz")]
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({ "status": "ok" }))
}

/// Ready: database reachable, registry loaded, at least one CA serving; says why not.
#[utoipa::path(
    tag = "operations",
    responses(
        (status = 200, description = "Ready", body = crate::types::Readiness),
        (status = 503, description = "Not ready, and why", body = crate::types::Readiness),
        Throttled,
    ),
)]
#[get("/readyz")]
pub async fn readyz(engine: web::Data<Engine>) -> HttpResponse {
    let readiness = engine.readiness().await;
    if readiness.ready {
        HttpResponse::Ok().json(readiness)
    } else {
        HttpResponse::ServiceUnavailable().json(readiness)
    }
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
