//! The HTTP API (actix-web): JSON in and out, problem details for errors. It holds no issuance
//! logic: every route calls one method of the engine's handle.

pub mod auth;
pub mod certificates;
pub mod identities;
pub mod ops;
pub mod problem;
pub mod revocation;

use std::net::SocketAddr;

use actix_web::dev::Server;
use actix_web::error::JsonPayloadError;
use actix_web::{web, App, HttpServer};

use crate::engine::Engine;
use crate::error::EngineError;
use problem::Problem;

/// Register the API's routes (an embedding application can mount them in its own App).
pub fn routes(cfg: &mut web::ServiceConfig, max_body_bytes: usize) {
    let json = web::JsonConfig::default().limit(max_body_bytes).error_handler(|err, _req| {
        let e = match err {
            JsonPayloadError::Overflow { .. } | JsonPayloadError::OverflowKnownLength { .. } => {
                EngineError::PayloadTooLarge
            }
            JsonPayloadError::ContentType => {
                EngineError::MalformedRequest("Content-Type must be application/json".into())
            }
            other => EngineError::MalformedRequest(other.to_string()),
        };
        Problem(e).into()
    });
    let path = web::PathConfig::default()
        .error_handler(|err, _| Problem(EngineError::MalformedRequest(err.to_string())).into());
    cfg.app_data(json)
        .app_data(path)
        .service(certificates::issue)
        .service(certificates::certificate)
        .service(certificates::request_status)
        .service(certificates::cas)
        .service(revocation::revoke)
        .service(revocation::crl)
        .service(revocation::ca_certificate)
        .service(revocation::ocsp_post)
        .service(revocation::ocsp_get)
        .service(identities::create)
        .service(identities::show)
        .service(identities::sign)
        .service(ops::healthz)
        .service(ops::readyz)
        .service(ops::metrics);
}

/// Bind the API on `listen`; returns the server (to run or stop) and the bound addresses.
pub fn server(engine: Engine, listen: &str) -> std::io::Result<(Server, Vec<SocketAddr>)> {
    let max_body = engine.config().http.max_body_bytes;
    let workers = engine.config().http.workers;
    let keep_alive = engine.config().http.keep_alive;
    // A graceful stop lets every request in flight reach its answer, which none waits for past
    // its lane's deadline (idle keep-alive connections are closed at once, not waited for).
    let lanes = &engine.config().lanes;
    let in_flight_limit = lanes.interactive.max_deadline.max(lanes.background.max_deadline).as_secs() + 1;
    let data = web::Data::new(engine);
    let mut http = HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .wrap(tracing_actix_web::TracingLogger::<problem::RequestSpan>::new())
            .configure(|cfg| routes(cfg, max_body))
            .default_service(web::to(|| async { Err::<actix_web::HttpResponse, _>(Problem(EngineError::NotFound)) }))
    })
    .keep_alive(keep_alive)
    // The binary decides when to stop (it drains first): actix must not stop on a signal itself.
    .disable_signals()
    .shutdown_timeout(in_flight_limit);
    if workers > 0 {
        http = http.workers(workers);
    }
    let http = http.bind(listen)?;
    let addrs = http.addrs();
    Ok((http.run(), addrs))
}
