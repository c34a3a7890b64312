//! What the load balancer and Prometheus read: `/healthz`, `/readyz`, `/metrics`.

use actix_web::{get, web, HttpResponse};

use crate::engine::Engine;

/// Alive: the process answers.
#[get("/healthz")]
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({ "status": "ok" }))
}

/// Ready: database reachable, registry loaded, at least one CA serving; says why not.
#[get("/readyz")]
pub async fn readyz(engine: web::Data<Engine>) -> HttpResponse {
    let readiness = engine.readiness().await;
    if readiness.ready {
        HttpResponse::Ok().json(readiness)
    } else {
        HttpResponse::ServiceUnavailable().json(readiness)
    }
}

#[get("/metrics")]
pub async fn metrics(engine: web::Data<Engine>) -> HttpResponse {
    HttpResponse::Ok().content_type("text/plain; version=0.0.4").body(engine.metrics_text())
}
