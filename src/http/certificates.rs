//! `/v1/certificates`, `/v1/requests`, `/v1/cas`: adapters from HTTP to the engine's handle.

use std::time::Duration;

use actix_web::http::header;
use actix_web::{get, post, web, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};

use super::auth::{Authenticated, AuthenticatedJson};
use super::problem::Problem;
use crate::engine::Engine;
use crate::error::EngineError;
use crate::types::IssueRequest;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssueBody {
    pub profile: String,
    /// PEM `CERTIFICATE REQUEST`.
    pub csr: String,
}

/// RFC 7240 preferences this API honours.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Prefer {
    pub respond_async: bool,
    pub wait: Option<Duration>,
}

pub fn parse_prefer(req: &HttpRequest) -> Prefer {
    let mut prefer = Prefer::default();
    for value in req.headers().get_all("prefer") {
        let Ok(text) = value.to_str() else { continue };
        for token in text.split(',').map(str::trim) {
            let (name, arg) = match token.split_once('=') {
                Some((n, v)) => (n.trim(), Some(v.trim().trim_matches('"'))),
                None => (token, None),
            };
            match (name.to_ascii_lowercase().as_str(), arg) {
                ("respond-async", _) => prefer.respond_async = true,
                ("wait", Some(secs)) => prefer.wait = secs.parse::<u64>().ok().map(Duration::from_secs),
                _ => {}
            }
        }
    }
    prefer
}

pub fn idempotency_key(req: &HttpRequest) -> Result<Option<String>, Problem> {
    match req.headers().get("idempotency-key") {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(|s| Some(s.trim().trim_matches('"').to_string()))
            .map_err(|_| Problem(EngineError::MalformedRequest("Idempotency-Key is not ASCII".into()))),
    }
}

#[derive(Serialize)]
struct AcceptedBody {
    request_id: String,
    status_url: String,
}

#[post("/v1/certificates")]
pub async fn issue(
    request: AuthenticatedJson<IssueBody>,
    engine: web::Data<Engine>,
    req: HttpRequest,
) -> Result<HttpResponse, Problem> {
    let prefer = parse_prefer(&req);
    let AuthenticatedJson { client, body } = request;
    let request = IssueRequest {
        profile: body.profile,
        csr_pem: body.csr,
        wait: prefer.wait,
        idempotency_key: idempotency_key(&req)?,
    };
    if prefer.respond_async {
        let accepted = engine.submit(&client, request).await?;
        let location = format!("/v1/requests/{}", accepted.request_id);
        return Ok(HttpResponse::Accepted()
            .insert_header((header::LOCATION, location.clone()))
            .insert_header(("Preference-Applied", "respond-async"))
            .json(AcceptedBody { request_id: accepted.request_id, status_url: location }));
    }
    let issued = engine.issue(&client, request).await?;
    Ok(HttpResponse::Created()
        .insert_header((header::LOCATION, format!("/v1/certificates/{}", issued.serial)))
        .json(issued))
}

#[get("/v1/certificates/{serial}")]
pub async fn certificate(
    client: Authenticated,
    engine: web::Data<Engine>,
    serial: web::Path<String>,
    req: HttpRequest,
) -> Result<HttpResponse, Problem> {
    let record = engine.certificate(&client.0, &serial).await?;
    let wants_pem = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/pem-certificate-chain"));
    if wants_pem {
        let mut pem = record.certificate.clone();
        pem.extend(record.chain.iter().map(String::as_str));
        return Ok(HttpResponse::Ok().content_type("application/pem-certificate-chain").body(pem));
    }
    Ok(HttpResponse::Ok().json(record))
}

#[get("/v1/requests/{id}")]
pub async fn request_status(
    client: Authenticated,
    engine: web::Data<Engine>,
    id: web::Path<String>,
) -> Result<HttpResponse, Problem> {
    Ok(HttpResponse::Ok().json(engine.request_status(&client.0, &id).await?))
}

#[get("/v1/cas")]
pub async fn cas(_client: Authenticated, engine: web::Data<Engine>) -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({ "cas": engine.cas() }))
}
