//! The admin API: a listener of its own (loopback by default), its own bearer tokens (stored
//! hashed), and protection against cross-site requests on every state change. Every lever is
//! one method of the engine's handle and is audited with the admin's name.

#[cfg(feature = "tools")]
pub mod cli;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use actix_web::dev::Server;
use actix_web::http::header;
use actix_web::{get, post, web, App, HttpRequest, HttpResponse, HttpServer};
use serde::Deserialize;

use crate::engine::Engine;
use crate::error::EngineError;
use crate::http::bounds::SourceBounds;
use crate::http::observe::{self, Observed, RouteTable};
use crate::http::problem::Problem;

/// Admin token hashes → admin names.
#[derive(Clone)]
struct AdminTokens(Arc<HashMap<[u8; 32], String>>);

/// The authenticated admin's name, put in the request by [`guard`].
#[derive(Clone)]
struct AdminName(String);

/// Runs before any extractor: authenticate the admin and, for state changes, refuse what a
/// browser could send from another site.
async fn guard(
    req: actix_web::dev::ServiceRequest,
    next: actix_web::middleware::Next<impl actix_web::body::MessageBody + 'static>,
) -> Result<
    actix_web::dev::ServiceResponse<actix_web::body::EitherBody<impl actix_web::body::MessageBody>>,
    actix_web::Error,
> {
    use actix_web::HttpMessage;
    // The page and its script carry no data: they are served to anyone who can reach the
    // listener, and ask for the token themselves.
    if req.method() == actix_web::http::Method::GET && CONSOLE_FILES.contains(&req.path()) {
        return Ok(next.call(req).await?.map_into_left_body());
    }
    let changes_state = req.method() != actix_web::http::Method::GET;
    match check(req.request(), changes_state) {
        Ok(name) => {
            req.extensions_mut().insert(AdminName(name));
            Ok(next.call(req).await?.map_into_left_body())
        }
        Err(problem) => {
            let response = actix_web::ResponseError::error_response(&problem);
            Ok(req.into_response(response).map_into_right_body())
        }
    }
}

fn who(req: &HttpRequest) -> String {
    use actix_web::HttpMessage;
    req.extensions().get::<AdminName>().map(|a| a.0.clone()).unwrap_or_default()
}

/// Authenticate an admin; for state changes also refuse anything a browser could send from
/// another site: a form post (only `application/json` is accepted, which needs a CORS
/// preflight cross-site), or an `Origin` / `Sec-Fetch-Site` that is not this console's.
fn check(req: &HttpRequest, changes_state: bool) -> Result<String, Problem> {
    if changes_state {
        let json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        let host = req.connection_info().host().to_string();
        let origin_ok = req.headers().get(header::ORIGIN).and_then(|v| v.to_str().ok()).is_none_or(|origin| {
            origin.strip_prefix("http://").or_else(|| origin.strip_prefix("https://")) == Some(host.as_str())
        });
        let site_ok = req
            .headers()
            .get("sec-fetch-site")
            .and_then(|v| v.to_str().ok())
            .is_none_or(|v| v == "same-origin" || v == "none");
        if !(json && origin_ok && site_ok) {
            return Err(Problem(EngineError::Forbidden("cross-site or non-JSON state change refused".into())));
        }
    }
    let tokens = req.app_data::<AdminTokens>().ok_or(Problem(EngineError::Internal("no admin tokens".into())))?;
    let name = crate::http::auth::bearer(req).and_then(|token| tokens.0.get(&crate::pki::sha256(token.as_bytes())));
    name.cloned().ok_or_else(|| {
        // Counted against the source address, as on the API listener.
        let bounds = req.app_data::<web::Data<SourceBounds>>();
        Problem(bounds.map_or(EngineError::Unauthorized, |b| b.auth_failed(req.peer_addr().map(|a| a.ip()))))
    })
}

const CONSOLE_FILES: &[&str] = &["/admin", "/admin/", "/admin/console.js"];
const CONSOLE_CSP: &str =
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'; form-action 'none'";

/// The console page (plain HTML and JS, embedded: nothing to build).
#[get("/admin")]
async fn console_page() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .insert_header(("Content-Security-Policy", CONSOLE_CSP))
        .insert_header(("X-Frame-Options", "DENY"))
        .body(include_str!("console.html"))
}

#[get("/admin/console.js")]
async fn console_script() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/javascript; charset=utf-8")
        .insert_header(("Content-Security-Policy", CONSOLE_CSP))
        .body(include_str!("console.js"))
}

#[get("/admin/v1/status")]
async fn status(engine: web::Data<Engine>) -> Result<HttpResponse, Problem> {
    Ok(HttpResponse::Ok().json(engine.admin_status().await?))
}

#[derive(Deserialize)]
struct CaStateBody {
    state: String,
}

#[post("/admin/v1/cas/{ca}/state")]
async fn ca_state(
    req: HttpRequest,
    engine: web::Data<Engine>,
    ca: web::Path<String>,
    body: web::Json<CaStateBody>,
) -> Result<HttpResponse, Problem> {
    let who = who(&req);
    let version = engine.set_ca_state(&who, &ca, &body.state).await?;
    Ok(HttpResponse::Ok()
        .json(serde_json::json!({ "ca": ca.as_str(), "state": body.state, "registry_version": version })))
}

#[post("/admin/v1/cas/{ca}/resubmit")]
async fn resubmit(req: HttpRequest, engine: web::Data<Engine>, ca: web::Path<String>) -> Result<HttpResponse, Problem> {
    let who = who(&req);
    let parked = engine.resubmit(&who, &ca).await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "ca": ca.as_str(), "resubmitting": parked })))
}

#[post("/admin/v1/cas/{ca}/breaker/reset")]
async fn reset_breaker(
    req: HttpRequest,
    engine: web::Data<Engine>,
    ca: web::Path<String>,
) -> Result<HttpResponse, Problem> {
    let who = who(&req);
    engine.reset_breaker(&who, &ca).await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "ca": ca.as_str(), "breaker": "closed" })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeBody {
    reason: crate::pki::RevocationReason,
}

/// Revoke any certificate, with any RFC 5280 reason (idempotent: the first revocation stands).
#[post("/admin/v1/certificates/{serial}/revoke")]
async fn revoke_certificate(
    req: HttpRequest,
    engine: web::Data<Engine>,
    serial: web::Path<String>,
    body: web::Json<RevokeBody>,
) -> Result<HttpResponse, Problem> {
    let who = who(&req);
    Ok(HttpResponse::Ok().json(engine.admin_revoke(&who, &serial, body.reason).await?))
}

/// Revoke every issued certificate of a CA (a destroyed or compromised CA).
#[post("/admin/v1/cas/{ca}/revoke-all")]
async fn revoke_ca(
    req: HttpRequest,
    engine: web::Data<Engine>,
    ca: web::Path<String>,
    body: web::Json<RevokeBody>,
) -> Result<HttpResponse, Problem> {
    let who = who(&req);
    let revoked = engine.revoke_ca(&who, &ca, body.reason).await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "ca": ca.as_str(), "revoked": revoked, "reason": body.reason })))
}

#[derive(Deserialize)]
struct ProfileStateBody {
    enabled: bool,
}

#[post("/admin/v1/profiles/{profile}/state")]
async fn profile_state(
    req: HttpRequest,
    engine: web::Data<Engine>,
    profile: web::Path<String>,
    body: web::Json<ProfileStateBody>,
) -> Result<HttpResponse, Problem> {
    let who = who(&req);
    let version = engine.set_profile_state(&who, &profile, body.enabled).await?;
    Ok(HttpResponse::Ok()
        .json(serde_json::json!({ "profile": profile.as_str(), "enabled": body.enabled, "registry_version": version })))
}

#[derive(Deserialize)]
struct LeakBody {
    pool: String,
    connections: u32,
    every_ms: u64,
    hold_ms: u64,
}

/// Dev-mode fault injection for the pool-leak drill.
#[post("/admin/v1/faults/leak")]
async fn leak(req: HttpRequest, engine: web::Data<Engine>, body: web::Json<LeakBody>) -> Result<HttpResponse, Problem> {
    engine.inject_leak(
        &who(&req),
        &body.pool,
        body.connections,
        std::time::Duration::from_millis(body.every_ms),
        std::time::Duration::from_millis(body.hold_ms),
    )?;
    Ok(HttpResponse::Accepted().json(serde_json::json!({ "leaking": body.pool })))
}

/// The admin listener's routes, as [`routes`] registers them: its answers' labels in the
/// metrics (`tests/admin_api.rs` checks that each is served under its own label).
pub const ROUTE_TEMPLATES: [&str; 12] = [
    "/admin",
    "/admin/console.js",
    "/admin/v1/status",
    "/admin/v1/cas/{ca}/state",
    "/admin/v1/cas/{ca}/resubmit",
    "/admin/v1/cas/{ca}/breaker/reset",
    "/admin/v1/cas/{ca}/revoke-all",
    "/admin/v1/certificates/{serial}/revoke",
    "/admin/v1/profiles/{profile}/state",
    "/admin/v1/faults/leak",
    "/metrics",
    "/readyz",
];

fn route_table() -> &'static RouteTable {
    static TABLE: OnceLock<RouteTable> = OnceLock::new();
    TABLE.get_or_init(|| RouteTable::new(ROUTE_TEMPLATES.map(String::from)))
}

/// Register the admin routes.
pub fn routes(cfg: &mut web::ServiceConfig) {
    let json = web::JsonConfig::default().limit(16 * 1024).error_handler(|err, req| match err {
        actix_web::error::JsonPayloadError::Payload(e) if crate::http::bounds::is_body_timeout(&e) => {
            Problem(crate::http::body_timeout(req)).into()
        }
        other => Problem(EngineError::MalformedRequest(other.to_string())).into(),
    });
    cfg.app_data(json)
        .service(status)
        .service(ca_state)
        .service(resubmit)
        .service(reset_breaker)
        .service(profile_state)
        .service(revoke_certificate)
        .service(revoke_ca)
        .service(leak)
        .service(console_page)
        .service(console_script)
        // Behind the admin token: the detailed readiness and the metrics (the only place for
        // them with `http.metrics = false`).
        .service(crate::http::ops::metrics)
        .route("/readyz", web::get().to(crate::http::ops::detailed_readyz));
}

/// Bind the admin listener.
pub fn server(engine: Engine, listen: &str) -> std::io::Result<(Server, Vec<SocketAddr>)> {
    let tokens: HashMap<[u8; 32], String> = engine
        .config()
        .admin
        .tokens
        .iter()
        .filter_map(|t| {
            let mut hash = [0u8; 32];
            hex::decode_to_slice(t.token_sha256.to_ascii_lowercase(), &mut hash).ok()?;
            Some((hash, t.name.clone()))
        })
        .collect();
    let tokens = AdminTokens(Arc::new(tokens));
    let tls = crate::http::listener_tls("admin", engine.config().admin.tls.as_ref(), &engine)?;
    let bounds = SourceBounds::new("admin", &engine.config().http, engine.shared_metrics());
    let counted = bounds.clone();
    let observed =
        web::Data::new(Observed::new("admin", route_table(), engine.config().http.access_log, engine.shared_metrics()));
    let data = web::Data::new(engine);
    let http = HttpServer::new(move || {
        let bounds = web::Data::from(bounds.clone());
        App::new()
            .app_data(data.clone())
            .app_data(tokens.clone())
            .app_data(bounds.clone())
            .app_data(observed.clone())
            .configure(routes)
            .wrap(actix_web::middleware::from_fn(guard))
            .wrap_fn(move |req, service| crate::http::bounded(&bounds, req, service))
            // Outside the bounds and the token check: their refusals are counted too.
            .wrap(actix_web::middleware::from_fn(observe::observe))
            .wrap(tracing_actix_web::TracingLogger::<crate::http::problem::RequestSpan>::new())
            .default_service(web::to(|| async { Err::<HttpResponse, _>(Problem(EngineError::NotFound)) }))
    })
    .on_connect(move |connection, extensions| counted.on_connect(connection, extensions))
    .workers(1)
    // The binary stops it, after the API's drain (see `serve`).
    .disable_signals()
    .shutdown_timeout(5);
    let http = match tls {
        Some(tls) => http.bind_rustls_0_23(listen, tls)?,
        None => http.bind(listen)?,
    };
    let addrs = http.addrs();
    Ok((http.run(), addrs))
}
