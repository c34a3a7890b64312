//! Revocation over HTTP: a client revokes its own certificate; relying parties fetch CRLs and
//! the CAs' certificates (no authentication: they are public, and named in every certificate).

use std::time::Duration;

use actix_web::http::header;
use actix_web::{get, post, web, HttpRequest, HttpResponse};
use serde::Deserialize;
use utoipa::ToSchema;

use super::auth::AuthenticatedJson;
use super::problem::Problem;
use super::responses::{Der, OcspRefusals, PublicRefusals, WriteRefusals};
use crate::engine::Engine;
use crate::error::EngineError;
use crate::pki::{now_ms, RevocationReason};

/// Why a certificate is revoked.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RevokeBody {
    /// RFC 5280's name of the reason; `unspecified` when absent.
    #[serde(default = "unspecified")]
    pub reason: RevocationReason,
}

fn unspecified() -> RevocationReason {
    RevocationReason::Unspecified
}

/// Revoke one of the client's certificates: `200` with its revocation, whether made now or
/// earlier (the first time and reason stand; `newly_revoked` says which).
#[utoipa::path(
    tag = "revocation",
    params(("serial" = String, Path, description = "Lower-case hex serial number")),
    request_body = RevokeBody,
    responses((status = 200, description = "Revoked, now or earlier", body = crate::types::RevocationOutcome), WriteRefusals),
    security(("api_key" = []), ("client_certificate" = [])),
)]
#[post("/v1/certificates/{serial}/revoke")]
pub async fn revoke(
    request: AuthenticatedJson<RevokeBody>,
    engine: web::Data<Engine>,
    serial: web::Path<String>,
) -> Result<HttpResponse, Problem> {
    let AuthenticatedJson { client, body } = request;
    let outcome = engine.revoke(&client, &serial, body.reason).await?;
    Ok(HttpResponse::Ok().json(outcome))
}

/// `GET /crl/{ca}/{shard}.crl`: the shard's latest CRL (DER), cacheable until its nextUpdate.
#[utoipa::path(
    tag = "revocation",
    params(
        ("ca" = String, Path, description = "The CA's id"),
        ("file" = String, Path, description = "`{shard}.crl`"),
        ("If-None-Match" = Option<String>, Header),
    ),
    responses(
        (status = 200, description = "The CRL (DER)", content_type = "application/pkix-crl", body = Der,
            headers(("ETag" = String), ("Cache-Control" = String))),
        (status = 304, description = "Not modified since the `ETag` given", headers(("ETag" = String))),
        PublicRefusals,
    ),
)]
#[get("/crl/{ca}/{file}")]
pub async fn crl(
    engine: web::Data<Engine>,
    path: web::Path<(String, String)>,
    req: HttpRequest,
) -> Result<HttpResponse, Problem> {
    let (ca, file) = path.into_inner();
    let shard = file.strip_suffix(".crl").and_then(|n| n.parse::<u32>().ok()).ok_or(Problem(EngineError::NotFound))?;
    let (number, next_update, der) = engine.crl(&ca, shard).await?;
    let etag = format!("\"{ca}-{shard}-{number}\"");
    let max_age = Duration::from_millis((next_update - now_ms()).max(0) as u64).as_secs();
    let cache = format!("public, max-age={max_age}, no-transform");
    let matches = req
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|tag| tag.trim() == etag || tag.trim() == "*"));
    if matches {
        return Ok(HttpResponse::NotModified()
            .insert_header((header::ETAG, etag))
            .insert_header((header::CACHE_CONTROL, cache))
            .finish());
    }
    Ok(HttpResponse::Ok()
        .content_type("application/pkix-crl")
        .insert_header((header::ETAG, etag))
        .insert_header((header::CACHE_CONTROL, cache))
        .body(der))
}

/// `GET /ca/{ca}.der`: the CA's certificate (the caIssuers URL of what it issues).
#[utoipa::path(
    tag = "revocation",
    params(("file" = String, Path, description = "`{ca}.der`")),
    responses(
        (status = 200, description = "The CA's certificate (DER)", content_type = "application/pkix-cert", body = Der),
        PublicRefusals,
    ),
)]
#[get("/ca/{file}")]
pub async fn ca_certificate(engine: web::Data<Engine>, file: web::Path<String>) -> Result<HttpResponse, Problem> {
    let ca = file.strip_suffix(".der").ok_or(Problem(EngineError::NotFound))?;
    let der = engine.ca_certificate(ca).ok_or(Problem(EngineError::NotFound))?;
    Ok(HttpResponse::Ok()
        .content_type("application/pkix-cert")
        .insert_header((header::CACHE_CONTROL, "public, max-age=86400"))
        .body(der))
}

/// The largest OCSP request read (a request for one certificate is ~80 bytes; signed ones with
/// certificates a few KiB).
const MAX_OCSP_REQUEST: usize = 16 * 1024;

fn ocsp_response(answer: crate::engine::OcspAnswer, cacheable: bool) -> HttpResponse {
    let mut response = HttpResponse::Ok();
    response.content_type("application/ocsp-response");
    // RFC 5019 5: a GET answer may be cached until its nextUpdate.
    match answer.max_age {
        Some(age) if cacheable => {
            response.insert_header((header::CACHE_CONTROL, format!("public, max-age={}, no-transform", age.as_secs())))
        }
        _ => response.insert_header((header::CACHE_CONTROL, "no-cache")),
    };
    response.body(answer.der)
}

/// `POST /ocsp` (RFC 6960 appendix A): the DER request is the body. Every answer is `200` with
/// an OCSPResponse: OCSP clients read its status, not HTTP's.
#[utoipa::path(
    tag = "revocation",
    request_body(content = Der, content_type = "application/ocsp-request", description = "A DER OCSPRequest"),
    responses(
        (status = 200, description = "An OCSPResponse (DER), also for a malformed request", content_type = "application/ocsp-response", body = Der),
        OcspRefusals,
    ),
)]
#[post("/ocsp")]
pub async fn ocsp_post(engine: web::Data<Engine>, req: HttpRequest, mut payload: web::Payload) -> HttpResponse {
    use futures_util::StreamExt as _;
    let malformed = || crate::engine::OcspAnswer {
        der: web::Bytes::from(crate::pki::ocsp::Unanswerable::Malformed.response()),
        max_age: None,
    };
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        match chunk {
            Ok(chunk) if body.len() + chunk.len() <= MAX_OCSP_REQUEST => body.extend_from_slice(&chunk),
            Ok(_) => return ocsp_response(malformed(), false),
            // A body that never came is a client's problem at the HTTP level: 408, closed.
            Err(e) if super::bounds::is_body_timeout(&e) => {
                return actix_web::ResponseError::error_response(&Problem(super::body_timeout(&req)))
            }
            Err(_) => return ocsp_response(malformed(), false),
        }
    }
    ocsp_response(engine.ocsp(&body).await, false)
}

/// `GET /ocsp/{base64 of the DER request}` (RFC 5019: URL-encoded; standard base64 may hold `/`).
#[utoipa::path(
    tag = "revocation",
    params(("request" = String, Path, description = "The DER OCSPRequest, base64, URL-encoded")),
    responses(
        (status = 200, description = "An OCSPResponse (DER), also for a malformed request", content_type = "application/ocsp-response", body = Der),
        super::responses::Throttled,
    ),
)]
#[get("/ocsp/{request:.*}")]
pub async fn ocsp_get(engine: web::Data<Engine>, req: HttpRequest) -> HttpResponse {
    let der = ocsp_get_request(req.match_info().get("request").unwrap_or_default());
    ocsp_response(engine.ocsp(&der).await, true)
}

/// The DER request of a GET's path (URL-encoded base64); empty, hence malformed, when it is not.
pub fn ocsp_get_request(path: &str) -> Vec<u8> {
    use base64::Engine as _;
    let decoded = percent_encoding::percent_decode_str(path).decode_utf8_lossy();
    base64::engine::general_purpose::STANDARD.decode(decoded.trim()).unwrap_or_default()
}
