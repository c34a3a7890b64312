//! The HTTP API (actix-web): JSON in and out, problem details for errors. It holds no issuance
//! logic: every route calls one method of the engine's handle.

pub mod auth;
pub mod bounds;
pub mod certificates;
pub mod identities;
pub mod observe;
pub mod openapi;
pub mod ops;
pub mod problem;
pub mod responses;
pub mod revocation;
pub mod tls;

use std::net::SocketAddr;

use actix_web::dev::Server;
use actix_web::error::JsonPayloadError;
use actix_web::{web, App, HttpServer};

use crate::engine::Engine;
use crate::error::EngineError;
use bounds::SourceBounds;
use problem::Problem;

/// Run `service` on `req` within its source's bounds ([`SourceBounds::guard`]).
pub fn bounded<S, B>(
    bounds: &SourceBounds,
    req: actix_web::dev::ServiceRequest,
    service: &S,
) -> futures_util::future::LocalBoxFuture<'static, Result<actix_web::dev::ServiceResponse, actix_web::Error>>
where
    S: actix_web::dev::Service<
        actix_web::dev::ServiceRequest,
        Response = actix_web::dev::ServiceResponse<B>,
        Error = actix_web::Error,
    >,
    S::Future: 'static,
    B: actix_web::body::MessageBody + 'static,
{
    use futures_util::FutureExt as _;
    match bounds.guard(req) {
        bounds::Guarded::Pass(req) => service.call(req).map(|r| r.map(|r| r.map_into_boxed_body())).boxed_local(),
        bounds::Guarded::Refused(refused) => std::future::ready(Ok(refused)).boxed_local(),
    }
}

/// Register the API's routes (an embedding application can mount them in its own App).
pub fn routes(cfg: &mut web::ServiceConfig, http: &crate::config::HttpConfig) {
    let json = web::JsonConfig::default().limit(http.max_body_bytes).error_handler(|err, req| {
        let e = match err {
            JsonPayloadError::Overflow { .. } | JsonPayloadError::OverflowKnownLength { .. } => {
                EngineError::PayloadTooLarge
            }
            JsonPayloadError::Payload(e) if bounds::is_body_timeout(&e) => body_timeout(req),
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
        .service(openapi::openapi_json);
    if http.metrics {
        cfg.service(ops::metrics);
    }
}

/// No route took the request: `405` with `Allow` when the API's description has its path with
/// other methods, else `404`.
pub async fn unrouted(req: actix_web::HttpRequest) -> Result<actix_web::HttpResponse, Problem> {
    match openapi::allow_header(req.path(), req.method()) {
        Some(allowed) => Err(Problem(EngineError::MethodNotAllowed { allowed })),
        None => Err(Problem(EngineError::NotFound)),
    }
}

/// The error for a body cut off by its listener's `body_timeout`.
pub fn body_timeout(req: &actix_web::HttpRequest) -> EngineError {
    let bounds = req.app_data::<web::Data<SourceBounds>>();
    EngineError::BodyTimeout(bounds.map(|b| b.body_timeout()).unwrap_or_default())
}

/// Load a listener's TLS files (when configured) as an I/O error for the caller that binds.
pub fn listener_tls(
    listener: &'static str,
    tls: Option<&crate::config::TlsConfig>,
    engine: &Engine,
) -> std::io::Result<Option<rustls::ServerConfig>> {
    tls.map(|files| tls::ListenerTls::start(listener, files, engine.shared_metrics().as_ref()))
        .transpose()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{listener} TLS: {e}")))
}

/// Bind the API on `listen`; returns the server (to run or stop) and the bound addresses.
pub fn server(engine: Engine, listen: &str) -> std::io::Result<(Server, Vec<SocketAddr>)> {
    let tls = listener_tls("api", engine.config().http.tls.as_ref(), &engine)?;
    let http_config = engine.config().http.clone();
    let workers = engine.config().http.workers;
    let keep_alive = engine.config().http.keep_alive;
    // A graceful stop lets every request in flight reach its answer, which none waits for past
    // its lane's deadline (idle keep-alive connections are closed at once, not waited for).
    let lanes = &engine.config().lanes;
    let in_flight_limit = lanes.interactive.max_deadline.max(lanes.background.max_deadline).as_secs() + 1;
    let bounds = SourceBounds::new("api", &engine.config().http, engine.shared_metrics());
    let counted = bounds.clone();
    let observed = web::Data::new(observe::Observed::new(
        "api",
        openapi::route_table(),
        engine.config().http.access_log,
        engine.shared_metrics(),
    ));
    let data = web::Data::new(engine);
    let mut http = HttpServer::new(move || {
        let bounds = web::Data::from(bounds.clone());
        App::new()
            .app_data(data.clone())
            .app_data(bounds.clone())
            .app_data(observed.clone())
            .wrap_fn(move |req, service| bounded(&bounds, req, service))
            // Outside the bounds: their refusals are counted too.
            .wrap(actix_web::middleware::from_fn(observe::observe))
            // Answers carry keys' certificates and clients' requests: never stored by a cache
            // unless a route says otherwise (CRLs, OCSP, CA certificates), never sniffed.
            .wrap(
                actix_web::middleware::DefaultHeaders::new()
                    .add((actix_web::http::header::CACHE_CONTROL, "no-store"))
                    .add((actix_web::http::header::X_CONTENT_TYPE_OPTIONS, "nosniff")),
            )
            .wrap(tracing_actix_web::TracingLogger::<problem::RequestSpan>::new())
            .configure(|cfg| routes(cfg, &http_config))
            .default_service(web::to(unrouted))
    })
    .on_connect(move |connection, extensions| {
        counted.on_connect(connection, extensions);
        tls::on_connect(connection, extensions);
    })
    .keep_alive(keep_alive)
    // The binary decides when to stop (it drains first): actix must not stop on a signal itself.
    .disable_signals()
    .shutdown_timeout(in_flight_limit);
    if workers > 0 {
        http = http.workers(workers);
    }
    let http = match tls {
        Some(tls) => http.bind_rustls_0_23(listen, tls)?,
        None => http.bind(listen)?,
    };
    let addrs = http.addrs();
    Ok((http.run(), addrs))
}
